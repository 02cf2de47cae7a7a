"""The optimized worker path (parallel raw inflate, uncompressed reco files, integer
accumulation in blocks) gives, byte for byte, what the straightforward float64 numpy
formulas give: payloads, accumulators, and on the edge cases (an LS whose events are all
rejected, one event, counts past what 32-bit accumulators hold)."""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loop.config import CalibrationConfig
from loop.rawformat import (
    TRIGGER_CODES,
    RawFileError,
    RawLS,
    raw_path,
    read_raw_ls,
    write_raw_ls,
)
from loop.sim.detector import generate_ls, make_truth
from loop.sim.scenario import DetectorSpec
from tests.helpers import calibration, workspace
from workers import alca, harvest, reco
from workers.accumulators import Accumulators, ChannelStats, load_accumulators
from workers.algorithms import compute_payload

RUN = 610
FIELDS = ("mean", "m2", "minimum", "maximum", "occupancy")


# ------------------------------------------------------------------ the reference


def ref_stats(frames: np.ndarray, threshold: float) -> ChannelStats:
    """The definition: float64 copy, mean, squared deviations summed over events."""
    values = frames.astype(np.float64)
    if len(values) == 0:
        return ChannelStats.empty(values.shape[1])
    mean = values.mean(axis=0)
    return ChannelStats(
        count=len(values),
        mean=mean,
        m2=((values - mean) ** 2).sum(axis=0),
        minimum=values.min(axis=0),
        maximum=values.max(axis=0),
        occupancy=(values > threshold).sum(axis=0).astype(np.int64),
    )


def ref_merge(a: ChannelStats, b: ChannelStats) -> ChannelStats:
    """Chan, Golub & LeVeque, written out."""
    if b.count == 0:
        return a
    if a.count == 0:
        return b
    total = a.count + b.count
    delta = b.mean - a.mean
    return ChannelStats(
        total,
        a.mean + delta * (b.count / total),
        a.m2 + b.m2 + delta**2 * (a.count * b.count / total),
        np.minimum(a.minimum, b.minimum),
        np.maximum(a.maximum, b.maximum),
        a.occupancy + b.occupancy,
    )


def ref_merge_all(parts: list[Accumulators]) -> Accumulators:
    merged: Accumulators = {}
    for part in parts:
        for name, stats in part.items():
            merged[name] = ref_merge(merged[name], stats) if name in merged else stats
    return merged


def ref_reco(paths: list[Path], cal: CalibrationConfig) -> tuple[np.ndarray, np.ndarray]:
    """The kept events of a batch of raw files, read by h5py's own filter pipeline."""
    frames, triggers = [], []
    codes = [TRIGGER_CODES[name] for name in cal.step2.trigger_types]
    for path in paths:
        with h5py.File(path) as h5:
            f, t = h5["frames"][()], h5["trigger"][()]
        keep = np.isin(t, codes)
        frames.append(f[keep])
        triggers.append(t[keep])
    return np.concatenate(frames), np.concatenate(triggers)


def ref_alca(recos: list[tuple[np.ndarray, np.ndarray]], cal: CalibrationConfig) -> Accumulators:
    names = {code: name for name, code in TRIGGER_CODES.items()}
    threshold = cal.step3.occupancy_threshold
    parts = [
        {names[int(c)]: ref_stats(frames[trigger == c], threshold) for c in np.unique(trigger)}
        for frames, trigger in recos
    ]
    return ref_merge_all(parts)


def assert_same_bytes(actual: ChannelStats, expected: ChannelStats) -> None:
    assert actual.count == expected.count
    for name in FIELDS:
        a, e = getattr(actual, name), getattr(expected, name)
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert a.tobytes() == e.tobytes(), name


# ------------------------------------------------------------------ the pipeline


def _ns(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**kw)


def _write_run(root: Path, stream: str, spec: DetectorSpec, lumis: int) -> list[Path]:
    truth = make_truth(spec, seed=4)
    paths = []
    for ls in range(1, lumis + 1):
        content = generate_ls(
            spec, truth, detector=stream, run=RUN, ls=ls, seed=4, start_time=0, end_time=1
        )
        if ls == 3:  # only physics triggers: a pedestal calibration rejects every event
            content = _replace_trigger(content, TRIGGER_CODES["physics"])
        paths.append(raw_path(root, stream, RUN, ls))
        write_raw_ls(paths[-1], content)
    return paths


def _with_channels(cal: CalibrationConfig, channels: int) -> CalibrationConfig:
    raw_input = cal.raw_input.model_copy(update={"channels": channels})
    return cal.model_copy(update={"raw_input": raw_input})


def _replace_trigger(content: RawLS, code: int) -> RawLS:
    return RawLS(**{**content.__dict__, "trigger": np.full_like(content.trigger, code)})


@pytest.mark.parametrize("name", ["EcalPedestals", "SiStripBad"])
def test_payload_equals_float64_reference_byte_for_byte(tmp_path: Path, name: str) -> None:
    """Three reco jobs, two ALCA jobs (one merging two reco files), two chained harvests:
    payload, summary and every accumulator equal the reference's bytes."""
    loop_config = workspace(tmp_path)
    cal = _with_channels(calibration(loop_config, name), 300)
    spec = DetectorSpec(channels=300, events_per_ls=150, dead=2, noisy=2, hot=2)
    raw = _write_run(loop_config.raw_root, cal.raw_input.stream, spec, 7)
    batches = [raw[0:3], raw[3:5], raw[5:7]]
    recos = []
    for i, batch in enumerate(batches):
        reco.run(cal, batch, tmp_path / f"reco{i}", _ns())
        recos.append(tmp_path / f"reco{i}" / reco.OUTPUT)
    alca_jobs = [recos[0:2], recos[2:3]]
    previous, expected_state = None, None
    for i, inputs in enumerate(alca_jobs):
        alca.run(cal, inputs, tmp_path / f"alca{i}", _ns())
        output = tmp_path / f"alca{i}" / alca.OUTPUT
        expected = ref_alca([ref_reco(batches[recos.index(r)], cal) for r in inputs], cal)
        actual = load_accumulators(output)
        assert sorted(actual) == sorted(expected)
        for trigger in expected:
            assert_same_bytes(actual[trigger], expected[trigger])
        harvest.run(cal, [output], tmp_path / f"h{i}", _ns(previous_state=previous))
        previous = tmp_path / f"h{i}" / harvest.STATE
        parts = [expected] if expected_state is None else [expected_state, expected]
        expected_state = ref_merge_all(parts)
    assert expected_state is not None
    reference = compute_payload(expected_state, cal)
    array = np.load(tmp_path / "h1" / harvest.PAYLOAD)
    assert array.dtype == reference.array.dtype and array.tobytes() == reference.array.tobytes()
    summary = json.loads((tmp_path / "h1" / harvest.SUMMARY).read_text())
    assert summary == json.loads(json.dumps(reference.summary))
    with h5py.File(recos[0]) as h5:  # LS 3 lost every event to the selection, not its number
        assert list(h5.attrs["lumisections"]) == [1, 2, 3]
        assert h5["frames"].compression is None


def test_reco_output_is_the_concatenated_selection_even_moved_and_widened(
    tmp_path: Path,
) -> None:
    """``frames`` and ``trigger`` equal numpy's concatenation of the selections (dtype
    included: a float32 LS after uint16 ones widens it), and still do once the file is
    moved elsewhere (the per-LS parts are found in the file itself)."""
    loop_config = workspace(tmp_path)
    cal = _with_channels(calibration(loop_config, "EcalPedestals"), 50)
    spec = DetectorSpec(channels=50, events_per_ls=70, dead=0, noisy=0, hot=0)
    raw = _write_run(loop_config.raw_root, "ecal", spec, 4)
    content = read_raw_ls(raw[3])
    write_raw_ls(raw[3], RawLS(**{**content.__dict__, "frames": content.frames.astype(np.float32)}))
    reco.run(cal, raw, tmp_path / "reco", _ns())
    moved = tmp_path / "elsewhere" / "moved.h5"
    moved.parent.mkdir()
    (tmp_path / "reco" / reco.OUTPUT).rename(moved)
    frames, trigger = ref_reco(raw, cal)
    assert frames.dtype == np.float32
    with h5py.File(moved) as h5:
        assert h5["frames"].dtype == frames.dtype and h5["trigger"].dtype == trigger.dtype
        assert h5["frames"][()].tobytes() == frames.tobytes()
        assert h5["trigger"][()].tobytes() == trigger.tobytes()
        assert list(h5.attrs["lumisections"]) == [1, 2, 3, 4]


def test_every_event_rejected_and_one_event(tmp_path: Path) -> None:
    """A batch whose events are all rejected gives an empty reco file and no accumulators;
    an LS of one event gives count 1 and M2 exactly 0."""
    loop_config = workspace(tmp_path)
    cal = calibration(loop_config, "EcalPedestals")
    spec = DetectorSpec(channels=64, events_per_ls=1, dead=0, noisy=0, hot=0)
    truth = make_truth(spec, seed=5)
    kw = {"detector": "ecal", "run": RUN, "seed": 5, "start_time": 0, "end_time": 1}
    one = generate_ls(spec, truth, ls=1, **kw)  # type: ignore[arg-type]
    one = _replace_trigger(one, TRIGGER_CODES["pedestal"])
    rejected = generate_ls(spec, truth, ls=2, **kw)  # type: ignore[arg-type]
    rejected = _replace_trigger(rejected, TRIGGER_CODES["physics"])
    cal = _with_channels(cal, spec.channels)
    paths = [raw_path(loop_config.raw_root, "ecal", RUN, ls) for ls in (1, 2)]
    write_raw_ls(paths[0], one)
    write_raw_ls(paths[1], rejected)
    reco.run(cal, [paths[1]], tmp_path / "none", _ns())
    with h5py.File(tmp_path / "none" / reco.OUTPUT) as h5:
        assert h5["frames"].shape == (0, spec.channels) and h5["trigger"].shape == (0,)
        assert list(h5.attrs["lumisections"]) == [2]
    alca.run(cal, [tmp_path / "none" / reco.OUTPUT], tmp_path / "alca_none", _ns())
    assert load_accumulators(tmp_path / "alca_none" / alca.OUTPUT) == {}
    reco.run(cal, paths, tmp_path / "one", _ns())
    alca.run(cal, [tmp_path / "one" / reco.OUTPUT], tmp_path / "alca_one", _ns())
    stats = load_accumulators(tmp_path / "alca_one" / alca.OUTPUT)["pedestal"]
    assert_same_bytes(stats, ref_stats(one.frames, cal.step3.occupancy_threshold))
    assert stats.count == 1 and not stats.m2.any()


def test_counts_past_32_bit_accumulators() -> None:
    """Sums of 16-bit ADC counts go past 2**32 after 65,538 events: int64 holds 1.4e14
    events of 65,535, and counts are int64 too. 600,000 events also cross the blocks."""
    events = 600_000
    frames = np.full((events, 3), 65_535, dtype=np.uint16)
    frames[::7, 1] = 0
    frames[::5, 2] = 401
    assert int(frames[:, 0].sum(dtype=np.int64)) > 2**32
    stats = ChannelStats.from_frames(frames, 400.0)
    assert_same_bytes(stats, ref_stats(frames, 400.0))
    assert stats.mean[0] == 65_535.0 and stats.occupancy[0] == events
    rows = np.arange(1, events, 2)
    selected = ChannelStats.from_frames(frames, 0.5, rows=rows)
    assert_same_bytes(selected, ref_stats(frames[rows], 0.5))


@settings(max_examples=60, deadline=None)
@given(
    events=st.integers(min_value=1, max_value=300),
    channels=st.integers(min_value=1, max_value=70),
    options=st.tuples(
        st.sampled_from([400.0, 399.5, -3.0, 0.0, 70_000.0, float("inf"), float("nan")]),
        st.sampled_from([None, (64, 0.0, 4096.0), (7, 190.25, 230.5), (1, 0.0, 1.0)]),
        st.booleans(),
    ),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_integer_path_is_bit_identical(
    events: int,
    channels: int,
    options: tuple[float, tuple[int, float, float] | None, bool],
    seed: int,
) -> None:
    """Every statistic of every shape, threshold and histogram equals the float64
    formulas bit for bit (one channel too, which numpy sums pairwise)."""
    threshold, histogram, subset = options
    rng = np.random.default_rng(seed)
    values = rng.normal(210.0, 4.0, (events, channels))
    values += (rng.random(values.shape) < 0.05) * rng.exponential(3000.0, values.shape)
    frames = np.clip(np.rint(values), 0, 65_535).astype(np.uint16)
    rows = np.flatnonzero(rng.random(events) < 0.5) if subset else None
    selected = frames if rows is None else frames[rows]
    actual = ChannelStats.from_frames(frames, threshold, histogram, rows=rows)
    expected = ChannelStats._from_float(selected, threshold, histogram) if len(selected) else None
    if expected is None:
        assert actual.count == 0
        return
    assert_same_bytes(actual, expected)
    assert_same_bytes(expected, ref_stats(selected, threshold))
    if histogram is not None:
        assert actual.histogram is not None and expected.histogram is not None
        assert actual.histogram.tobytes() == expected.histogram.tobytes()


# ------------------------------------------------------------------ formats


def test_alca_reads_compressed_reco_files_of_earlier_versions(tmp_path: Path) -> None:
    """A gzip-compressed reco file (as earlier versions wrote, still on disk in a running
    deployment) gives the accumulators of the uncompressed one."""
    loop_config = workspace(tmp_path)
    cal = calibration(loop_config, "SiStripBad")
    spec = DetectorSpec(channels=256, events_per_ls=90)
    raw = _write_run(loop_config.raw_root, "sistrip", spec, 2)
    reco.run(cal, raw, tmp_path / "reco", _ns())
    new = tmp_path / "reco" / reco.OUTPUT
    old = tmp_path / "old" / reco.OUTPUT
    old.parent.mkdir()
    with h5py.File(new) as src, h5py.File(old, "w") as dst:
        dst.create_dataset(
            "frames", data=src["frames"][()], compression="gzip", compression_opts=1, shuffle=True
        )
        dst.create_dataset("trigger", data=src["trigger"][()])
        dst.attrs.update(src.attrs)
    for path, out in ((new, "a_new"), (old, "a_old")):
        alca.run(cal, [path], tmp_path / out, _ns())
    a_new = load_accumulators(tmp_path / "a_new" / alca.OUTPUT)
    a_old = load_accumulators(tmp_path / "a_old" / alca.OUTPUT)
    assert sorted(a_new) == sorted(a_old) == ["pedestal", "physics"]
    for trigger, stats in a_new.items():
        assert_same_bytes(a_old[trigger], stats)


def _h5py_frames(path: Path) -> np.ndarray:
    with h5py.File(path) as h5:
        return h5["frames"][()]


@pytest.mark.parametrize(
    "dtype,layout",
    [
        (np.uint16, {"compression": "gzip", "shuffle": True, "chunks": (64, 40)}),
        (np.float32, {"compression": "gzip", "shuffle": True, "chunks": (7, 40)}),
        (np.float64, {"compression": "gzip", "shuffle": False, "chunks": (64, 40)}),
        (np.uint16, {"compression": "lzf", "chunks": (64, 40)}),  # h5py reads it
        (np.uint16, {"compression": "gzip", "chunks": (8, 20)}),  # not whole rows: h5py
        (np.uint16, {}),  # contiguous: h5py
    ],
)
def test_parallel_raw_reader_equals_h5py(
    tmp_path: Path, dtype: type, layout: dict[str, object]
) -> None:
    """Events not a multiple of the chunk rows (the last chunk is stored whole)."""
    rng = np.random.default_rng(7)
    frames: np.ndarray = rng.integers(0, 4000, (150, 40)).astype(dtype)
    path = tmp_path / "run1" / "run1_ls0001.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as h5:
        h5.create_dataset("frames", data=frames, **layout)
        h5.create_dataset("trigger", data=np.zeros(150, np.uint8))
        h5.attrs.update(run=1, ls=1, detector="d", start_time=0.0, end_time=1.0)
    with ThreadPoolExecutor(2) as pool:
        content = read_raw_ls(path, pool)
    assert content.frames.dtype == frames.dtype
    assert content.frames.tobytes() == frames.tobytes() == _h5py_frames(path).tobytes()


def test_parallel_raw_reader_chunk_with_a_filter_skipped_and_a_corrupt_chunk(
    tmp_path: Path,
) -> None:
    """A chunk stored with its filters skipped is read by h5py; a chunk whose deflate
    stream is damaged makes the file unreadable (rejected), not wrong."""
    spec = DetectorSpec(channels=32, events_per_ls=100)
    content = generate_ls(
        spec, make_truth(spec, 1), detector="d", run=1, ls=1, seed=1, start_time=0, end_time=1
    )
    path = raw_path(tmp_path, "d", 1, 1)
    write_raw_ls(path, content)
    skipped = content.frames[64:].copy()
    skipped.resize((64, 32))  # the edge chunk is stored whole
    with h5py.File(path, "r+") as h5:
        h5["frames"].id.write_direct_chunk((64, 0), skipped.tobytes(), filter_mask=0b11)
    with ThreadPoolExecutor(2) as pool:
        assert read_raw_ls(path, pool).frames.tobytes() == content.frames.tobytes()
        with h5py.File(path, "r+") as h5:
            h5["frames"].id.write_direct_chunk((0, 0), b"x\x9c not deflate", filter_mask=0)
        with pytest.raises(RawFileError, match="unreadable"):
            read_raw_ls(path, pool)
