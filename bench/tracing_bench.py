"""What tracing costs a node: the same flows with tracing off, on (every trace
sampled) and on with no trace sampled, in one run, rounds interleaved.

    .venv/bin/python bench/tracing_bench.py [--rounds 8] [--requests 2000] [--qos 0] [--paced-rounds 6]
                                            [--before ../before]

Flow 1 of the original (the load balancer asked, then three POSTs to a fast
HTTP service) over MQTT, bursts as in bench.py, every setup running side by
side, the order of the setups flipped every round (the machine drifts within a
run: a fixed order shows up as a difference); then the same at a steady
500 flows a second for 4 s (`--paced-rounds`), where a node is not saturated
and each flow pays for itself (a saturated node batches more: its CPU per flow
moves with how busy it is, in both directions). With tracing on, each request
makes 7 spans (the request, accept, placement, three steps, the result), sent
over OTLP/HTTP to a receiver in this process that answers 200 and counts what
it gets. The node's CPU per flow includes the export.
`--before DIR` adds a node of another tree (a `git worktree` of the commit
before tracing) beside them: "off costs nothing" is off against it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import LoadGenerator, Setup, run_burst, run_paced


class Sink:
    """An OTLP/HTTP receiver that answers 200 and counts requests and bytes."""

    def __init__(self) -> None:
        self.requests = self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                self.rfile.read(n)
                sink.requests += 1
                sink.bytes += n
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"


def traced(setup: Setup, endpoint: str, ratio: float) -> Setup:
    for cfg in setup.cfgs:
        runtime = json.loads((cfg / "runtime.conf").read_text())
        runtime["tracing"] = {"otlp_endpoint": endpoint, "sampling_ratio": ratio}
        (cfg / "runtime.conf").write_text(json.dumps(runtime))
    return setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--qos", type=int, choices=(0, 1), default=0)
    parser.add_argument("--paced-rounds", type=int, default=6, help="rounds at 500 flows/s for 4 s (0: none)")
    parser.add_argument("--before", help="the tree of an older commit, run beside (tracing absent there)")
    args = parser.parse_args()
    sink = Sink()
    rows: dict[str, list[dict]] = {}
    paced: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="rm-tracing-") as tmp:
        setups = [("off", Setup(Path(tmp) / "off")),
                  ("on, sampling 1.0", traced(Setup(Path(tmp) / "on"), sink.endpoint, 1.0)),
                  ("on, sampling 0", traced(Setup(Path(tmp) / "none"), sink.endpoint, 0.0))]
        if args.before:
            setups.append((f"before ({args.before})", Setup(Path(tmp) / "before", root=Path(args.before).resolve(),
                                                            label="before")))
        gens: dict[str, LoadGenerator] = {}
        try:
            for _, setup in setups:
                setup.start()
            time.sleep(2.0)
            gens = {label: LoadGenerator(setup.broker_port) for label, setup in setups}
            for label, setup in setups:
                run_burst(setup, gens[label], f"warmup {label}", 300, args.qos)
            for rnd in range(args.rounds):
                for label, setup in (setups if rnd % 2 == 0 else setups[::-1]):
                    row = run_burst(setup, gens[label], f"{label} r{rnd}", args.requests, args.qos)
                    rows.setdefault(label, []).append(row)
                    print(f"{label:18} round {rnd}: {row['flows_per_s']:7.0f} flows/s, "
                          f"{row['cpu_us_per_flow']:5.0f} µs CPU per flow, lost {row['lost']}", flush=True)
            for rnd in range(args.paced_rounds):
                for label, setup in (setups if rnd % 2 == 0 else setups[::-1]):
                    row = run_paced(setup, gens[label], f"{label} p{rnd}", 500, 4.0, args.qos)
                    paced.setdefault(label, []).append(row)
                    print(f"{label:18} paced {rnd}: {row['cpu_us_per_flow']:5.0f} µs CPU per flow, "
                          f"p99 {row['p99_ms']:.1f} ms, lost {row['lost']}", flush=True)
            time.sleep(2.0)  # the last batches sent
        finally:
            for gen in gens.values():
                gen.close()
            for _, setup in setups:
                setup.stop()
    print(f"\nQoS {args.qos}; the OTLP receiver got {sink.requests} exports, {sink.bytes / 1e6:.1f} MB")
    print(f"\nBursts of {args.requests}, median of {args.rounds} rounds:")
    _table(rows, "p99 ms (burst)")
    if paced:
        print(f"\n500 flows/s for 4 s, median of {args.paced_rounds} rounds:")
        _table(paced, "p99 ms")


def _table(rows: dict[str, list[dict]], p99: str) -> None:
    off = statistics.median(r["cpu_us_per_flow"] for r in rows["off"])
    print(f"| node | flows/s | CPU µs per flow | vs off | {p99} |\n|---|---|---|---|---|")
    for label, rs in rows.items():
        cpu = statistics.median(r["cpu_us_per_flow"] for r in rs)
        print(f"| {label} | {statistics.median(r['flows_per_s'] for r in rs):.0f} | {cpu:.0f} | "
              f"{cpu / off:.2f}× | {statistics.median(r['p99_ms'] for r in rs):.1f} |")


if __name__ == "__main__":
    main()
