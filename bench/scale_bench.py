"""Scale-out on this machine: one node process, one node as two worker processes
(`serve --processes 2`), and two nodes in one shared group, on the same flow as
bench.py (flow 1 of the original: a load-balancer GET and three POSTs).

    .venv/bin/python bench/scale_bench.py [--rounds 3] [--requests 4000]

Each setup gets QoS 1 bursts, each compared with the tight sequential client
measured just before and just after it (the machine is shared and noisy). Every
process (broker, fake service, nodes, this load generator) shares the 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import LoadGenerator, Setup, run_burst, tight_client


def setups(tmp: Path) -> list[tuple[str, Setup]]:
    one = Setup(tmp / "one", command=("-m", "runtime_manager", "serve", "--no-rest"))
    two_workers = Setup(tmp / "two-workers", command=("-m", "runtime_manager", "serve", "--no-rest", "--processes", "2"))
    two_nodes = Setup(tmp / "two-nodes", processes=2, command=("-m", "runtime_manager", "serve", "--no-rest"))
    for i, cfg in enumerate(two_nodes.cfgs):  # two nodes, one shared subscription
        runtime = json.loads((cfg / "runtime.conf").read_text())
        runtime["node_id"] = str(i + 1)
        (cfg / "runtime.conf").write_text(json.dumps(runtime))
    return [("one process (serve)", one), ("one node, 2 worker processes (serve --processes 2)", two_workers),
            ("two nodes, one shared group (2 × serve)", two_nodes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4000)
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {}
    tights: list[float] = []
    with tempfile.TemporaryDirectory(prefix="rm-scale-") as tmp:
        for label, setup in setups(Path(tmp)):
            setup.start()
            gen = LoadGenerator(setup.broker_port)
            try:
                time.sleep(2.0)  # every worker subscribed
                run_burst(setup, gen, f"warmup {label}", 300, 1)
                tights.append(tight_client(setup.service_port, 2.3))
                for rnd in range(args.rounds):
                    row = run_burst(setup, gen, f"{label} r{rnd}", args.requests, 1)
                    tights.append(tight_client(setup.service_port, 2.3))
                    row["ratio"] = row["flows_per_s"] / ((tights[-1] + tights[-2]) / 2)
                    row["rss"] = setup.peak_rss_mb()
                    rows.setdefault(label, []).append(row)
            finally:
                gen.close()
                setup.stop()
    print(f"tight sequential keep-alive client: median {statistics.median(tights):.0f} flows/s "
          f"(min {min(tights):.0f}, max {max(tights):.0f}, {len(tights)} runs)\n")
    print(f"| setup ({args.requests:,} requests, QoS 1, median of {args.rounds}) | flows/s | × tight client | "
          "× one process | lost | p50 ms | p99 ms | CPU µs/flow | peak RSS MB (largest process) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = None
    for label, runs in rows.items():
        runs.sort(key=lambda r: r["ratio"])
        r = runs[len(runs) // 2]
        base = base or r["ratio"]
        lost = sum(x["lost"] for x in runs)
        print(f"| {label} | {r['flows_per_s']:.0f} | {r['ratio']:.2f} | {r['ratio'] / base:.2f} | {lost} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['cpu_us_per_flow']:.0f} | {r['rss']:.1f} |")


if __name__ == "__main__":
    main()
