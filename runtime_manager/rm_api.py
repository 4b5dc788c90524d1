"""REST entry point, as the original's users run it: a node that runs flows
posted to comm.conf `rest.endpoint` (default /startrm).

    python -m runtime_manager.rm_api --config-dir config_files [--port N]
    python runtime_manager/rm_api.py --config-dir config_files
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python runtime_manager/rm_api.py`
    # the project root instead of this folder, whose `http` package would hide the standard library's
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from runtime_manager import hangup

hangup.take_early()  # before the imports below: a SIGHUP during start-up is a reload once started

from runtime_manager.cli import base_parser, load_or_exit, reloader
from runtime_manager.node import Parts
from runtime_manager.process import run


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("Runtime manager, REST entry point: runs flows posted to comm.conf rest.endpoint.")
    parser.add_argument("--port", type=int, help="overrides comm.conf rest.port")
    args = parser.parse_args(argv)
    return run(load_or_exit(args), Parts(mqtt=False, rest=True, orchestrator=False), reload=reloader(args))


if __name__ == "__main__":
    sys.exit(main())
