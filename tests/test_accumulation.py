"""Statistics gathered over consecutive runs (``statistics.across_runs``): runs short of
``statistics.min_events`` never get a payload of their own; their statistics go on into
the next run, and the payload that reaches the target is valid from the first run used
and is derived from exactly the runs used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loop.conddb.client import ConditionsDB
from loop.config import load_calibration
from loop.errors import ConfigError
from loop.sim.scenario import RunSpec
from states.accumulation import predecessor
from tests.daemon_harness import harness, scenario
from tests.helpers import calibration, reference_payload, workspace

CAL = "EcalPedestals"
RUN_1, RUN_2, RUN_3 = 9501, 9502, 9503
NEEDED = 200  # pedestal events: ~120 per run of the small detector, so two runs reach it


def _run(number: int, start: float) -> RunSpec:
    return RunSpec(run_number=number, start=start, ls_seconds=1.0, ls_count=4)


def test_a_run_inherits_from_the_newest_earlier_run() -> None:
    runs = [(1, "Done"), (2, "WaitingForFiles"), (4, "Failed"), (5, "NotRunning")]
    assert predecessor(runs, 5) == (4, "Failed") and predecessor(runs, 2) == (1, "Done")
    assert predecessor(runs, 1) is None


def test_across_runs_needs_a_target_and_run_iovs(tmp_path: Path) -> None:
    loop_config = workspace(tmp_path)
    path = loop_config.calibrations_dir / f"{CAL}.yaml"
    text = path.read_text()
    path.write_text(text + "statistics:\n  across_runs: true\n")
    with pytest.raises(ConfigError, match=r"statistics.*across_runs needs min_events"):
        load_calibration(path)
    path.write_text(
        text.replace("time_type: run", "time_type: lumi")
        + "statistics:\n  across_runs: true\n  min_events: 10\n"
    )
    with pytest.raises(ConfigError, match=r"needs payload\.time_type run"):
        load_calibration(path)


def test_runs_short_of_statistics_accumulate_into_one_payload_from_the_first_run(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path, scenario(_run(RUN_1, 0), _run(RUN_2, 6), _run(RUN_3, 12)))
    try:
        h.edit_calibration(CAL, {"statistics": {"min_events": NEEDED, "across_runs": True}})
        daemons = [h.start(step, CAL) for step in ("step2", "step3", "step4")]
        assert daemons[2].step is not None
        step4 = daemons[2].step
        h.play()
        h.run_until(
            lambda: all(step4.journal.run_state(r) == "Done" for r in (RUN_1, RUN_2, RUN_3)),
            timeout=120,
        )
        cal = calibration(h.loop_config, CAL)
        summaries = {
            run: json.loads((step4.step_dir(run) / "summary.json").read_text())
            for run in (RUN_1, RUN_2, RUN_3)
        }
        # run 1 alone is short: no payload of its own, its statistics handed on
        assert summaries[RUN_1]["outcome"] == "carried"
        assert summaries[RUN_1]["final_version"] is None
        assert summaries[RUN_1]["carried"]["runs"] == [RUN_1]
        assert 0 < summaries[RUN_1]["carried"]["events"] < NEEDED
        # run 2 reaches the target with run 1: one payload valid from run 1
        assert summaries[RUN_2]["outcome"] == "accepted"
        assert summaries[RUN_2]["source_runs"] == [RUN_1, RUN_2]
        expected, events = reference_payload(h.loop_config.raw_root, cal, [RUN_1, RUN_2])
        detector = step4.store.detector(cal.detector)  # type: ignore[attr-defined]
        final = detector.get(cal.payload.ctype, version=summaries[RUN_2]["uploaded_version"])
        assert final.metadata["source_runs"] == [RUN_1, RUN_2]
        assert final.metadata["quality"]["events"] == events >= NEEDED  # exactly these runs
        np.testing.assert_allclose(final.array, expected, rtol=1e-9)
        assert [r.name for r in detector.ranges(cal.payload.ctype)] == [final.range]
        assert final.validity.begin_run == RUN_1 and final.validity.end_run is None
        # run 3 is short again: held back, handed on; nothing stored for it
        assert summaries[RUN_3]["outcome"] == "carried"
        assert summaries[RUN_3]["carried"]["runs"] == [RUN_3]
        # the conditions DB: one open-ended IOV from run 1, nothing before it
        conditions = ConditionsDB.connect(h.loop_config.conddb_url)
        iovs = conditions.iovs(cal.payload.destination_tag)
        assert sorted({i.since for i in iovs}) == [RUN_1]
        for run in (RUN_1, RUN_2, RUN_3):
            resolved = conditions.resolve(tag=cal.payload.destination_tag, run=run)
            np.testing.assert_allclose(
                conditions.payload(resolved.payload_hash).array(), expected, rtol=1e-9
            )
    finally:
        h.stop()
