"""Per-lumisection payloads (``payload.time_type: lumi``): one IOV per group of LS, each
uploaded as soon as its LS are in (the last, short one at the end of the run), with
exact LS ranges, each payload derived from exactly its LS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loop.conddb.client import ConditionsDB
from loop.conddb.rules import lumi_since
from loop.sim.scenario import RunSpec
from tests.daemon_harness import harness, scenario
from tests.helpers import calibration, reference_payload
from workers.accumulators import ChannelStats
from workers.kinds.base import AlgorithmError
from workers.kinds.occupancy import Occupancy, OccupancyParameters, hit_fraction
from workers.lumi import LumiGroup, by_lumi, group_of, groups, lumi_key

CAL = "EcalPedestals"
RUN = 9601
LS_COUNT, GROUP = 5, 2  # groups [1, 2], [3, 4] and the short [5]


def test_groups_are_fixed_by_their_first_ls() -> None:
    assert [group_of(ls, 3) for ls in (1, 3, 4, 6, 7)] == [1, 1, 4, 4, 7]
    assert groups([7, 1, 2, 5], 2) == {1: [1, 2], 5: [5], 7: [7]}
    assert LumiGroup(1, 2, [1, 2], "f").complete and not LumiGroup(3, 4, [4], "f").complete
    stats = ChannelStats.empty(4)
    split = by_lumi({lumi_key(3, "pedestal"): stats, lumi_key(12, "physics"): stats})
    assert split == {3: {"pedestal": stats}, 12: {"physics": stats}}
    with pytest.raises(ValueError, match="not per lumisection"):
        by_lumi({"pedestal": stats})


def test_one_iov_per_ls_group_with_exact_ranges(tmp_path: Path) -> None:
    spec = RunSpec(run_number=RUN, start=0, ls_seconds=1.0, ls_count=LS_COUNT)
    h = harness(tmp_path, scenario(spec))
    try:
        h.edit_calibration(
            CAL,
            {
                "payload": {"time_type": "lumi", "lumi_group": GROUP},
                "validation": {"min_events": 10},
                "step4": {"harvest_every_files": 1},
            },
        )
        daemons = [h.start(step, CAL) for step in ("step2", "step3", "step4")]
        h.play()
        h.run_until(lambda: daemons[2].step.journal.run_state(RUN) == "Done", timeout=90)  # type: ignore[union-attr]
        cal = calibration(h.loop_config, CAL)
        conditions = ConditionsDB.connect(h.loop_config.conddb_url)
        iovs = conditions.iovs(cal.payload.destination_tag)
        firsts = (1, 3, 5)
        assert sorted(i.since for i in iovs) == [lumi_since(RUN, first) for first in firsts]
        everything = set(range(1, LS_COUNT + 1))
        for first in firsts:
            own = {ls for ls in everything if first <= ls < first + GROUP}
            expected, _ = reference_payload(
                h.loop_config.raw_root, cal, RUN, exclude=tuple(everything - own)
            )
            for ls in sorted(own):  # every LS of the group resolves to its payload
                resolved = conditions.resolve(tag=cal.payload.destination_tag, run=RUN, ls=ls)
                assert resolved.since == lumi_since(RUN, first)
                np.testing.assert_allclose(
                    conditions.payload(resolved.payload_hash).array(), expected, rtol=1e-9
                )
        history = conditions.iovs(cal.payload.destination_tag, history=True)
        assert len(history) == len(firsts)  # each group uploaded once
        detector = daemons[2].step.store.detector(cal.detector)  # type: ignore[union-attr]
        final = detector.get(cal.payload.ctype, run=RUN)
        groups_stored = final.metadata["quality"]["lumi_groups"]
        assert [(g["first_ls"], g["ls"]) for g in groups_stored] == [
            (1, [1, 2]),
            (3, [3, 4]),
            (5, [5]),
        ]
        assert final.array.shape[0] == len(firsts) and final.metadata["rejected_lumi_groups"] == {}
    finally:
        h.stop()


def test_occupancy_counts_entries_strictly_above_pedestal_plus_n_noise() -> None:
    params = OccupancyParameters(pedestals_from="P", bins=20, low=0.0, high=200.0, hot_fraction=0.1)
    histogram = np.zeros((3, 20), dtype=np.int64)
    histogram[0, [2, 19]] = [8, 2]  # 20-30 ADC: pedestal; 190+ (and overflow): hits
    histogram[1, 3] = 5  # a dead channel reads exactly its pedestal, 30, on a bin edge
    pedestals = np.array([[22.0, 30.0, 0.0], [1.0, 0.0, 1.0]])  # channel 2: no entries
    fraction = hit_fraction(histogram, pedestals, params)
    np.testing.assert_allclose(fraction, [0.2, 0.0, 0.0])
    kind = Occupancy()
    stats = ChannelStats.empty(3, bins=20)
    stats.histogram = histogram
    stats.count = 10
    payload = kind.finalize({"physics": stats}, params, {"P": pedestals})
    assert payload.summary["events"] == 10 and payload.summary["hot_channels"] == [0]
    with pytest.raises(AlgorithmError, match="needs the pedestal payload of P"):
        kind.finalize({"physics": stats}, params, {})
