"""MQTT entry point, as the original's users run it: a node that takes flow
requests on comm.conf `mqtt.topic` (and is the orchestrator runtime when
runtime.conf has an orchestrator section).

    python -m runtime_manager.rm_mqtt --config-dir config_files
    python runtime_manager/rm_mqtt.py --config-dir config_files
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python runtime_manager/rm_mqtt.py`
    # the project root instead of this folder, whose `http` package would hide the standard library's
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from runtime_manager import hangup

hangup.take_early()  # before the imports below: a SIGHUP during start-up is a reload once started

from runtime_manager.cli import base_parser, load_or_exit, reloader
from runtime_manager.node import Parts
from runtime_manager.process import run


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("Runtime manager, MQTT entry point: runs flows requested on comm.conf mqtt.topic.")
    args = parser.parse_args(argv)
    return run(load_or_exit(args), Parts(mqtt=True, rest=False, orchestrator=True), reload=reloader(args))


if __name__ == "__main__":
    sys.exit(main())
