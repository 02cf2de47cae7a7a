"""Writes ``tests/data/store_v1/``: a calibration store made by calloop before the in-file
lookup index (store format 1, only the ``/_index`` log), for the compatibility tests.

It was made with the code of that version (``PYTHONPATH=<old checkout> python
tests/data/make_store_v1.py``) and is kept as a binary file: the current code cannot
write format 1 any more.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from loop.store import CalibStore

ROOT = Path(__file__).resolve().parent / "store_v1"


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    det = CalibStore(ROOT).detector("ecal-0001", create=True)
    first = det.add("pedestals", np.full(64, 1.0), begin=1, metadata={"k": 1}, comment="first")
    det.add("pedestals", np.full(64, 2.0), begin=1, metadata={"k": 2})
    det.add("pedestals", np.full(64, 3.0), begin=10, end=20, metadata={"k": 3})
    bad = det.add("pedestals", np.full(64, 4.0), begin=30, metadata={"k": 4})
    det.retire(bad, "validation failed")
    det.add("pedestals", np.full(64, 5.0), begin=40, retired=True, metadata={"k": 5})
    det.add("pedestals", np.full(64, 6.0), begin=50, end=60, metadata={"k": 6})
    det.set_default(first, comment="expert pin")
    det.add("gain", np.ones(3), begin_time=1000.0, end_time=2000.0)
    det.add("gain", np.full(3, 2.0), begin=7, begin_time=1500.0)
    det.set_links(predecessor="ecal-0000", parameters={"gain_mode": "high"})
    for lock in ROOT.glob("*/*.lock"):
        lock.unlink()


if __name__ == "__main__":
    main()
