"""A worker wrapper for tests: ``python tests/litter_worker.py MODULE ARGS``.

Runs ``workers.MODULE`` with ARGS, then leaves a stale temporary file in its output
directory, as a worker killed during an atomic write would.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def main() -> int:
    module, *args = sys.argv[1:]
    code = int(importlib.import_module(f"workers.{module}").main(args))
    output_dir = Path(args[args.index("--output-dir") + 1])
    (output_dir / ".reco.h5.killed.h5.tmp").write_bytes(b"half a file")
    return code


if __name__ == "__main__":
    sys.exit(main())
