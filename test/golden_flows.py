"""Every flow of the original FRACTAL flows.conf and of the shipped one, run
against the fake services with fixed payloads: the results, byte for byte.

    PYTHONPATH=<a tree> python test/golden_flows.py > test/golden/flows_results.json

wrote test/golden/flows_results.json from the tree before the language grew
(ab24941); test_language.py runs the same with this tree and compares.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PAYLOADS: list[Any] = [2, "0x03abcdefghil", {"temp": 31.5, "site": "a", "items": [1, 2]}, [1, "two", None], None]


def shipped_config(dest: Path, mock_port: int) -> Path:
    """config_files/ pointed at the fake services and at the repository's modules."""
    shutil.copytree(ROOT / "config_files", dest)
    comps = (dest / "components.conf").read_bytes().replace(b"6000", str(mock_port).encode())
    (dest / "components.conf").write_bytes(comps)
    runtime = json.loads((dest / "runtime.conf").read_text())
    runtime.pop("orchestrator", None)
    runtime.update(heartbeat_interval_ms=0, module_dir=str(ROOT / "runtimes"), state_dir=str(dest))
    (dest / "runtime.conf").write_text(json.dumps(runtime))
    lb = (dest / "load_balancer.conf").read_bytes().replace(b"6000", str(mock_port).encode())
    (dest / "load_balancer.conf").write_bytes(lb)
    return dest


def run_every_flow(cfg: Path) -> dict[str, str]:
    """flow id / payload -> the results as JSON (compact, keys in order)."""
    from helpers import InProcessNode

    from runtime_manager.config import load_config
    from runtime_manager.core.request import FlowRequest

    config = load_config(cfg)
    node = InProcessNode(config).start()
    out: dict[str, str] = {}
    try:
        for flow_id in config.flows:
            for i, payload in enumerate(PAYLOADS):
                res = node.run(FlowRequest(flow_id, payload), timeout=20)
                out[f"{flow_id}/{i}"] = json.dumps(res.get("results", res.get("error")), separators=(",", ":"))
    finally:
        node.kill()
    return out


def golden(tmp: Path) -> dict[str, dict[str, str]]:
    from conftest import write_config
    from mock_services import MockServices

    mock = MockServices(lb_answer=None).start()
    try:
        original = write_config(tmp / "original", mock.port)
        return {"original": run_every_flow(original),
                "shipped": run_every_flow(shipped_config(tmp / "shipped", mock.port))}
    finally:
        mock.stop()


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(HERE))
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(golden(Path(tmp)), indent=1, sort_keys=True))
