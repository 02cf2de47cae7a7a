"""Hostile and malformed input to the calibration store: refused in one line, nothing written.

Each attack file is a genuine export edited with h5py; each is imported through the
library and through ``calloop store import``, and the whole test directory (store, import
file and its surroundings) must hash the same before and after.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from loop.cli import main
from loop.errors import StoreError
from loop.store import AliasTable, CalibStore
from loop.store.store import content_hash
from loop.store.transfer import ImportLimits, export_detector, import_file
from tests.conftest import run_cli

VERSION = "pedestals/run000000100-open/v000001"
SECRET = b"root:x:0:0:root:/root:/bin/bash\n" * 2

Edit = Callable[[h5py.File, Path], None]


@pytest.fixture
def store(tmp_path: Path) -> CalibStore:
    """A store deep below tmp_path, so that ``../..`` escapes still land inside it."""
    store = CalibStore(tmp_path / "site" / "data" / "calib", lock_timeout_s=2)
    det = store.detector("ecal-0001", create=True)
    det.add("pedestals", np.arange(8.0), begin=100)
    det.add("noise", np.ones(8), begin=100)
    return store


def _digest(root: Path) -> dict[str, str]:
    """Every entry under ``root``: files by content, symlinks by target, directories."""
    tree = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            tree[name] = "-> " + os.readlink(path)
        elif path.is_file():
            tree[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            tree[name] = "dir" if path.is_dir() else "special"
    return tree


def _craft(store: CalibStore, tmp_path: Path, edit: Edit) -> Path:
    """A genuine export of ecal-0001, then edited into an attack."""
    path = export_detector(store.detector("ecal-0001"), tmp_path / "export")
    with h5py.File(path, "r+") as h5:
        edit(h5, tmp_path)
    return path


def _replace_calib(h5: h5py.File, **dataset: object) -> h5py.Group:
    group = h5[VERSION]
    del group["calib"]
    group.create_dataset("calib", **dataset)
    return group


def _secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "passwd"
    path.write_bytes(SECRET)
    return path


def _secret_h5(tmp_path: Path) -> Path:
    path = tmp_path / "secret.h5"
    with h5py.File(path, "w") as h5:
        h5["data"] = np.arange(8.0) * 1000
    return path


def _assert_refused(
    store: CalibStore,
    path: Path,
    match: str,
    capsys: pytest.CaptureFixture[str],
    limits: ImportLimits | None = None,
) -> None:
    """Library and CLI both refuse with one line naming the file; nothing changes."""
    top = store.root.parent.parent.parent
    before = _digest(top)
    with pytest.raises(StoreError) as info:
        import_file(store, path, limits=limits)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and re.search(match, message), message
    assert _digest(top) == before
    if limits is not None:  # the CLI imports with the default limits
        return
    capsys.readouterr()
    assert main(["store", "--root", str(store.root), "import", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"calloop: error: cannot import {path}: ") and err.count("\n") == 1
    assert re.search(match, err), err
    assert _digest(top) == before


def _external_storage(h5: h5py.File, tmp_path: Path) -> None:
    group = _replace_calib(
        h5,
        shape=(len(SECRET),),
        dtype="u1",
        external=[(str(_secret_file(tmp_path)), 0, len(SECRET))],
    )
    group.attrs["content_hash"] = content_hash(np.frombuffer(SECRET, "u1"))


def _virtual(h5: h5py.File, tmp_path: Path) -> None:
    layout = h5py.VirtualLayout(shape=(8,), dtype="f8")
    layout[:] = h5py.VirtualSource(str(_secret_h5(tmp_path)), "data", shape=(8,))
    group = h5[VERSION]
    del group["calib"]
    group.create_virtual_dataset("calib", layout)
    group.attrs["content_hash"] = content_hash(np.arange(8.0) * 1000)


def _soft_link(h5: h5py.File, tmp_path: Path) -> None:
    h5["stash"] = np.arange(8.0) * 1000
    del h5[VERSION]["calib"]
    h5[VERSION]["calib"] = h5py.SoftLink("/stash")


def _external_link(h5: h5py.File, tmp_path: Path) -> None:
    del h5[VERSION]["calib"]
    h5[VERSION]["calib"] = h5py.ExternalLink(str(_secret_h5(tmp_path)), "/data")


def _set_attr(where: str, key: str, value: object) -> Edit:
    def edit(h5: h5py.File, tmp_path: Path) -> None:
        h5[where].attrs[key] = value

    return edit


def _rename_ctype(name: str) -> Edit:
    def edit(h5: h5py.File, tmp_path: Path) -> None:
        h5.move("pedestals", name)

    return edit


ATTACKS: dict[str, tuple[Edit, str]] = {
    "dotdot-dettype": (_set_attr("/", "dettype", "../.."), "invalid detector type '../..'"),
    "absolute-dettype": (
        lambda h5, tmp: h5.attrs.__setitem__("dettype", str(tmp / "outside")),
        "invalid detector type '/",
    ),
    "dash-dettype": (_set_attr("/", "dettype", "ecal-x"), "invalid detector type"),
    "dotdot-detid": (_set_attr("/", "detid", "../../x"), "invalid detector id"),
    "bytes-dettype": (_set_attr("/", "dettype", np.bytes_(b"ecal")), "invalid detector type"),
    "external-storage": (_external_storage, "keeps its data in external files"),
    "virtual-dataset": (_virtual, "is a virtual dataset"),
    "soft-link": (_soft_link, "calib is a SoftLink"),
    "soft-link-group": (
        lambda h5, tmp: h5.__setitem__("gain", h5py.SoftLink("/pedestals")),
        "/gain is a SoftLink",
    ),
    "external-link": (_external_link, "calib is a ExternalLink"),
    "oversize-lazy-dataset": (  # 16 GiB never written: a tiny file that would fill memory
        lambda h5, tmp: _replace_calib(h5, shape=(1 << 31,), dtype="f8", chunks=(1 << 16,)),
        "over the per-dataset import limit",
    ),
    "object-dtype": (
        lambda h5, tmp: _replace_calib(h5, data=["a", "b"], dtype=h5py.string_dtype()),
        "not a plain numeric",
    ),
    "compound-dtype": (
        lambda h5, tmp: _replace_calib(h5, data=np.zeros(2, dtype=[("a", "f8"), ("b", "i4")])),
        "not a plain numeric",
    ),
    "null-dataspace": (
        lambda h5, tmp: _replace_calib(h5, data=h5py.Empty("f8")),
        "has no dataspace",
    ),
    "non-ascii-ctype": (_rename_ctype("pédestals"), "invalid calibration type 'pédestals'"),
    "overlong-ctype": (_rename_ctype("p" * 65), "invalid calibration type 'ppp"),
    "index-ctype": (_rename_ctype("_index2"), "invalid calibration type '_index2'"),
    "dataset-as-ctype": (
        lambda h5, tmp: h5.__setitem__("gain", np.zeros(3)),
        "/gain is a Dataset, expected a Group",
    ),
    "missing-attribute": (
        lambda h5, tmp: h5[VERSION].attrs.__delitem__("comment"),
        "attribute 'comment' is missing",
    ),
    "metadata-not-json": (_set_attr(VERSION, "metadata", "{oops"), "Expecting"),
    "metadata-not-object": (_set_attr(VERSION, "metadata", "[1, 2]"), "not a JSON object"),
    "negative-run": (
        _set_attr("pedestals/run000000100-open", "begin_run", -5),
        "cannot be negative",
    ),
    "infinite-time": (
        _set_attr("pedestals/run000000100-open", "begin_time", np.inf),
        "must be finite",
    ),
    "huge-time": (  # finite, but its range name would overflow the index log
        lambda h5, tmp: h5["pedestals/run000000100-open"].attrs.update(
            begin_run=-1, begin_time=1e300
        ),
        "does not fit the index log",
    ),
    "damaged-content": (
        lambda h5, tmp: h5[VERSION]["calib"].__setitem__(0, 42.0),
        "does not match its recorded content hash",
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_hostile_import_is_refused_and_writes_nothing(
    attack: str, store: CalibStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit, match = ATTACKS[attack]
    path = _craft(store, tmp_path, edit)
    _assert_refused(store, path, re.escape(match), capsys)


@pytest.mark.parametrize(
    ("limits", "match"),
    [
        (ImportLimits(max_file_bytes=1000), "over the import limit of 1000"),
        (ImportLimits(max_total_bytes=100), "arrays total more than 100 bytes"),
        (ImportLimits(max_dataset_bytes=32), "over the per-dataset import limit of 32"),
        (ImportLimits(max_objects=3), "more than 3 objects"),
    ],
)
def test_size_limits_are_enforced_before_reading(
    limits: ImportLimits,
    match: str,
    store: CalibStore,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _craft(store, tmp_path, lambda h5, tmp: None)
    _assert_refused(store, path, re.escape(match), capsys, limits=limits)


def _truncated(store: CalibStore, tmp_path: Path) -> Path:
    whole = _craft(store, tmp_path, lambda h5, tmp: None).read_bytes()
    path = tmp_path / "truncated.h5"
    path.write_bytes(whole[: len(whole) // 2])
    return path


def _garbage(store: CalibStore, tmp_path: Path) -> Path:
    path = tmp_path / "garbage.h5"
    path.write_bytes(np.random.default_rng(7).bytes(4096))
    return path


def _fifo(store: CalibStore, tmp_path: Path) -> Path:
    path = tmp_path / "pipe.h5"
    os.mkfifo(path)  # opening it for reading would block forever
    return path


def _directory(store: CalibStore, tmp_path: Path) -> Path:
    path = tmp_path / "dir.h5"
    path.mkdir()
    return path


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (_truncated, "."),  # wherever HDF5 notices, one line
        (_garbage, "not a readable HDF5 file"),
        (_fifo, "not a regular file"),
        (_directory, "not a regular file"),
    ],
)
def test_damaged_import_file_is_refused_and_writes_nothing(
    make: Callable[[CalibStore, Path], Path],
    match: str,
    store: CalibStore,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _assert_refused(store, make(store, tmp_path), match, capsys)


def test_cli_subprocess_refuses_path_traversal(store: CalibStore, tmp_path: Path) -> None:
    path = _craft(store, tmp_path, _set_attr("/", "dettype", "../.."))
    before = _digest(tmp_path)
    done = run_cli("store", "--root", str(store.root), "import", str(path))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "invalid detector type '../..'" in done.stderr
    assert _digest(tmp_path) == before


def test_genuine_export_still_imports(store: CalibStore, tmp_path: Path) -> None:
    """The checks refuse attacks, not what the store itself writes."""
    det = store.detector("ecal-0001")
    det.add("gain", np.array([1, 2, 3], dtype=np.int16), begin_time=1000.0, end_time=2000.0)
    det.add("mask", np.array([True, False]), begin=5, retired=True)
    path = export_detector(det, tmp_path / "export")
    other = CalibStore(tmp_path / "other")
    report = import_file(other, path)
    assert len(report.added) == 4 and report.skipped == []
    copy = other.detector("ecal-0001")
    assert copy.get("gain", time=1500.0).array.dtype == np.int16
    assert copy.get("pedestals", run=100).metadata["imported_from"].endswith("v000001")


# ------------------------------------------------------------- names through the API and CLI


@pytest.mark.parametrize("name", ["../..-0001", "/tmp/x-0001", "ecal-../x", "ecal-a/b", "é-1"])
def test_api_refuses_bad_detector_names(store: CalibStore, tmp_path: Path, name: str) -> None:
    before = _digest(tmp_path)
    with pytest.raises(StoreError, match="invalid detector"):
        store.detector(name, create=True).add("pedestals", np.zeros(2), begin=1)
    assert _digest(tmp_path) == before


@pytest.mark.parametrize("ctype", ["../x", "a/b", "_index", "p" * 65, "pédestals", "", ".hidden"])
def test_api_refuses_bad_ctypes(store: CalibStore, tmp_path: Path, ctype: str) -> None:
    det = store.detector("ecal-0001")
    before = _digest(tmp_path)
    with pytest.raises(StoreError, match="invalid calibration type"):
        det.add(ctype, np.zeros(2), begin=1)
    assert _digest(tmp_path) == before
    assert sorted(det.ctypes()) == ["noise", "pedestals"]


def test_api_refuses_unstorable_arrays_and_validities(store: CalibStore) -> None:
    det = store.detector("ecal-0001")
    with pytest.raises(StoreError, match="not a plain numeric"):
        det.add("labels", np.array(["a", "b"]), begin=1)
    with pytest.raises(StoreError, match="must be finite"):
        det.add("gain", np.zeros(2), begin_time=float("nan"))
    with pytest.raises(StoreError, match="cannot be negative"):
        det.add("gain", np.zeros(2), begin=-1)
    with pytest.raises(StoreError, match="does not fit the index log"):
        det.add("gain", np.zeros(2), begin_time=1e300)
    assert sorted(det.ctypes()) == ["noise", "pedestals"]  # the file still reads


def test_refused_first_write_leaves_no_detector_file(store: CalibStore) -> None:
    det = store.detector("ecal-0002", create=True)
    with pytest.raises(StoreError, match="NaN"):
        det.add("pedestals", np.array([np.nan]), begin=1)
    assert not det.exists() and "ecal-0002" not in store.detector_names()


def test_symlinked_directory_out_of_the_root_is_refused(store: CalibStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "evil").symlink_to(outside)
    with pytest.raises(StoreError, match="outside the store root"):
        store.detector("evil-0001", create=True)
    with pytest.raises(StoreError, match="outside the store root"):
        AliasTable(store.root, "evil")
    assert list(outside.iterdir()) == []


def test_cli_refuses_bad_names_in_one_line(
    store: CalibStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    array = tmp_path / "a.npy"
    np.save(array, np.zeros(2))
    before = _digest(tmp_path)
    root = str(store.root)
    for argv, match in (
        (["add", "../..-0001", "pedestals", str(array), "--begin", "1"], "invalid detector"),
        (["add", "ecal-0001", "../x", str(array), "--begin", "1"], "invalid calibration type"),
        (["alias", "add", "Evil", "../..-0001"], "invalid detector type"),
        (["alias", "add", "Evil", "ecal-../x"], "invalid detector id"),
    ):
        assert main(["store", "--root", root, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("calloop: error: ") and err.count("\n") == 1 and match in err, err
    assert _digest(tmp_path) == before
