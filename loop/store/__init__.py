"""Versioned HDF5 calibration store: see :mod:`loop.store.store`."""

from loop.store.aliases import Alias, AliasTable
from loop.store.lookup import RangeEntry, Validity
from loop.store.store import CalibStore, Constants, Detector, HistoryRecord, VersionInfo

__all__ = [
    "Alias",
    "AliasTable",
    "CalibStore",
    "Constants",
    "Detector",
    "HistoryRecord",
    "RangeEntry",
    "Validity",
    "VersionInfo",
]
