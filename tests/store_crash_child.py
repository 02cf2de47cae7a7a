"""Child process of the store crash test: adds versions forever, reporting each commit.

Usage: ``python -m tests.store_crash_child ROOT START``. Version k holds
``np.full(64, k)`` valid from run k; every 5th commit also retires the previous one.
It prints ``ready`` once the detector is open, then after each completed call ``added K
VID`` (or ``retired VID``), flushing each line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from loop.store import CalibStore


def main() -> None:
    root, start = Path(sys.argv[1]), int(sys.argv[2])
    detector = CalibStore(root).detector("ecal-0001", create=True)
    print("ready", flush=True)  # the parent kills at random moments after this
    previous = None
    for k in range(start, start + 100_000):
        vid = detector.add(
            "pedestals", np.full(64, float(k)), begin=k, metadata={"k": k}, comment=f"k={k}"
        )
        print(f"added {k} {vid}", flush=True)
        if k % 5 == 0 and previous is not None:
            detector.retire(previous, f"retire after {k}")
            print(f"retired {previous}", flush=True)
        previous = vid


if __name__ == "__main__":
    main()
