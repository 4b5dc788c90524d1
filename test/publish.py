"""Publish one flow request over MQTT and print its result.

    python test/publish.py --flow 1 --payload '"hello"' [--config-dir config_files] [--qos 1]

The broker, topic and result topic come from comm.conf. The payload is JSON
(a bare word that is not JSON is sent as a string).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime_manager.config import MqttConfig, load_config, resolve_config_dir
from runtime_manager.mqtt.link import make_client


def request(cfg: MqttConfig, id_flow: str, payload: Any, timeout: float = 30, qos: int | None = None) -> dict:
    """Send a request with a reply_to topic of its own and wait for its result."""
    rid = uuid.uuid4().hex
    reply_to = f"{cfg.topic}/reply/{rid}"
    got: dict[str, Any] = {}
    done, subscribed = threading.Event(), threading.Event()
    client, connect = make_client(cfg, f"publish-{rid[:8]}", persistent=False)  # the node's settings: TLS, credentials

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        # only this request's first result: some brokers (amqtt) also hand over retained
        # messages of other topics, and a redelivered request may be answered twice
        try:
            result = json.loads(msg.payload)
        except ValueError:
            return
        if msg.topic == reply_to and isinstance(result, dict) and result.get("request_id") == rid and not done.is_set():
            got.update(result)
            done.set()

    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(reply_to, qos=1)
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect(cfg.host, cfg.port, 30, **connect)
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise SystemExit(f"could not subscribe on {cfg.host}:{cfg.port}")
        body = {"id_flow": id_flow, "payload": payload, "request_id": rid, "reply_to": reply_to}
        client.publish(cfg.topic, json.dumps(body), qos=cfg.qos if qos is None else qos).wait_for_publish(10)
        if not done.wait(timeout):
            raise SystemExit(f"no result within {timeout} s (is rm_mqtt running on topic '{cfg.topic}'?)")
        return got
    finally:
        client.disconnect()
        client.loop_stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flow", required=True, help="the flow id")
    parser.add_argument("--payload", default="null", help="JSON payload (default null)")
    parser.add_argument("--config-dir")
    parser.add_argument("--qos", type=int, choices=(0, 1, 2))
    parser.add_argument("--timeout", type=float, default=30)
    args = parser.parse_args()
    try:
        payload = json.loads(args.payload)
    except ValueError:
        payload = args.payload
    config = load_config(resolve_config_dir(args.config_dir))
    print(json.dumps(request(config.mqtt, args.flow, payload, args.timeout, args.qos), indent=2))


if __name__ == "__main__":
    main()
