#!/usr/bin/env python3
"""Moved into the package: `ascend-v4 bench offline` (logic in ascend_v4/bench/offline.py). Kept so the
command line in older notes still works; every argument is passed through, e.g.

    python tools/bench_offline.py --concurrency 1 --concurrency 4 --concurrency 16

Differences from the former script: `--json` now takes a PATH (`--json -` prints JSON on stdout), and the
transformers peer can be switched off with `--peer none`. See `ascend-v4 bench offline --help`.
"""

from __future__ import annotations

import sys

from ascend_v4.cli import main

if __name__ == "__main__":
    main(["bench", "offline", *sys.argv[1:]], prog_name="ascend-v4")
