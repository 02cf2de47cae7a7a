"""Calibration algorithms: pure functions from merged accumulators to payloads."""

from __future__ import annotations

from enum import IntEnum


class ChannelStatus(IntEnum):
    """Per-channel status codes of bad-channel payloads (and of the simulator's truth)."""

    GOOD = 0
    DEAD = 1
    NOISY = 2
    HOT = 3
