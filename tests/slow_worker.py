"""A worker wrapper for tests: ``python tests/slow_worker.py DELAY FAIL_BATCH BATCH MODULE ARGS``.

Sleeps DELAY seconds, exits 3 if BATCH equals FAIL_BATCH (a crashing job), otherwise runs
``workers.MODULE`` with ARGS: a slow or broken experiment command with the same contract.
"""

from __future__ import annotations

import importlib
import sys
import time


def main() -> int:
    delay, fail_batch, batch, module, *args = sys.argv[1:]
    time.sleep(float(delay))
    if batch == fail_batch:
        print(f"simulated crash of batch {batch}", file=sys.stderr)
        return 3
    return int(importlib.import_module(f"workers.{module}").main(args))


if __name__ == "__main__":
    sys.exit(main())
