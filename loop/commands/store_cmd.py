"""``calloop store ...``: inspect and manage the versioned calibration store."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loop.commands.common import add_json_flag, emit, when
from loop.config import default_config_dir, load_loop_config
from loop.errors import StoreError

if TYPE_CHECKING:  # h5py and numpy load only when a store command runs
    import numpy as np

    from loop.store import CalibStore


def register(subparsers: Any) -> None:
    """Add the ``store`` group."""
    group = subparsers.add_parser("store", help="versioned HDF5 calibration store")
    group.add_argument(
        "--root", type=Path, help="store root (default: $CALLOOP_STORE or loop.yaml)"
    )
    group.add_argument("--config", type=Path, help="loop.yaml to take store_root from")
    sub = group.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    _register_reads(sub)
    _register_writes(sub)
    _register_transfer(sub)


def _register_reads(sub: Any) -> None:
    ls = sub.add_parser("ls", help="list detectors, or the versions of one detector")
    ls.add_argument("detector", nargs="?")
    add_json_flag(ls)
    ls.set_defaults(handler=cmd_ls)

    for name, helptext, handler in (
        ("show", "show constants and metadata", cmd_show),
        ("get", "write constants to a .npy or .txt file", cmd_get),
    ):
        parser = sub.add_parser(name, help=helptext)
        parser.add_argument("detector")
        parser.add_argument("ctype")
        point = parser.add_mutually_exclusive_group()
        point.add_argument("--run", type=int)
        point.add_argument("--time", type=float, help="Unix seconds")
        point.add_argument("--version")
        if name == "get":
            parser.add_argument("--out", type=Path, required=True)
        else:
            add_json_flag(parser)
        parser.set_defaults(handler=handler)


def _register_writes(sub: Any) -> None:
    add = sub.add_parser("add", help="add a new version from a .npy or .txt file")
    add.add_argument("detector")
    add.add_argument("ctype")
    add.add_argument("file", type=Path)
    add.add_argument("--begin", type=int, help="first valid run")
    add.add_argument("--end", type=int, help="last valid run (default: open)")
    add.add_argument("--begin-time", type=float)
    add.add_argument("--end-time", type=float)
    add.add_argument("--comment", default="")
    add.add_argument("--metadata", default="{}", help="JSON object")
    add.add_argument("--force", action="store_true", help="accept a shape/dtype change")
    add.add_argument("--allow-nonfinite", action="store_true")
    add.set_defaults(handler=cmd_add)

    default = sub.add_parser("default", help="pin a version as its range's default (or unpin)")
    default.add_argument("detector")
    default.add_argument("version", nargs="?")
    default.add_argument("--unpin", action="store_true")
    default.add_argument("--ctype")
    default.add_argument("--range", dest="range_name")
    default.add_argument("--comment", default="")
    default.set_defaults(handler=cmd_default)

    retire = sub.add_parser("retire", help="retire a version (readable, never default)")
    retire.add_argument("detector")
    retire.add_argument("version")
    retire.add_argument("--comment", default="")
    retire.set_defaults(handler=cmd_retire)

    _register_history_diff(sub)


def _register_history_diff(sub: Any) -> None:
    history = sub.add_parser("history", help="history records of a detector file")
    history.add_argument("detector")
    history.add_argument("--ctype")
    add_json_flag(history)
    history.set_defaults(handler=cmd_history)

    diff = sub.add_parser("diff", help="compare two versions element by element")
    diff.add_argument("detector")
    diff.add_argument("ctype")
    diff.add_argument("v1")
    diff.add_argument("v2")
    add_json_flag(diff)
    diff.set_defaults(handler=cmd_diff)


def _register_transfer(sub: Any) -> None:
    export = sub.add_parser("export", help="write a squeezed copy (ctypes, run/time window)")
    export.add_argument("detector")
    export.add_argument("--out", type=Path, required=True, help="destination store root")
    export.add_argument("--ctype", action="append")
    export.add_argument("--runs", type=int, nargs=2, metavar=("FIRST", "LAST"))
    export.add_argument("--times", type=float, nargs=2, metavar=("BEGIN", "END"))
    export.set_defaults(handler=cmd_export)

    imp = sub.add_parser("import", help="merge a detector file into the store")
    imp.add_argument("file", type=Path)
    imp.add_argument("--force", action="store_true")
    imp.set_defaults(handler=cmd_import)

    _register_alias(sub)


def _register_alias(sub: Any) -> None:
    alias = sub.add_parser("alias", help="alias tables (human names, DAQ sources)")
    alias_sub = alias.add_subparsers(dest="alias_command", required=True, metavar="ACTION")
    alias_add = alias_sub.add_parser("add", help="map an alias to a detector for a period")
    alias_add.add_argument("alias")
    alias_add.add_argument("detector")
    alias_add.add_argument("--source", default="")
    alias_add.add_argument("--begin", type=float, help="Unix seconds (default now)")
    alias_add.add_argument("--end", type=float)
    alias_add.set_defaults(handler=cmd_alias_add)
    alias_ls = alias_sub.add_parser("ls", help="list aliases")
    add_json_flag(alias_ls)
    alias_ls.set_defaults(handler=cmd_alias_ls)


def open_store(args: argparse.Namespace) -> CalibStore:
    """The store named by --root, $CALLOOP_STORE or loop.yaml's store_root."""
    from loop.store import CalibStore

    if args.root:
        return CalibStore(args.root)
    if os.environ.get("CALLOOP_STORE"):
        return CalibStore(Path(os.environ["CALLOOP_STORE"]))
    config = load_loop_config(args.config or default_config_dir() / "loop.yaml")
    return CalibStore(config.store_root, lock_timeout_s=config.timeouts.store_lock_s)


def cmd_ls(args: argparse.Namespace) -> int:
    """List detectors or versions."""
    store = open_store(args)
    if args.detector is None:
        names = store.detector_names()
        return emit(args, names, lambda: "\n".join(names) or "(store is empty)")
    versions = store.detector(args.detector).versions()
    rows = [dataclasses.asdict(v) for v in versions]
    return emit(
        args,
        rows,
        lambda: (
            "\n".join(
                f"{v.version}  {v.ctype:<14} {v.range:<28} {when(v.produced)}  "
                f"{'default' if v.is_default else 'retired' if v.retired else '       '}  "
                f"{v.dtype}{list(v.shape)}  {v.comment}"
                for v in versions
            )
            or "(no versions)"
        ),
    )


def _constants(args: argparse.Namespace) -> Any:
    store = open_store(args)
    detector = store.detector(args.detector)
    if args.run is None and args.time is None and args.version is None:
        raise StoreError("give --run, --time or --version")
    return detector.get(args.ctype, run=args.run, time=args.time, version=args.version)


def cmd_show(args: argparse.Namespace) -> int:
    """Show one version."""
    import numpy as np

    c = _constants(args)
    array = c.array.astype(np.float64)
    data = {
        "version": c.version,
        "ctype": c.ctype,
        "range": c.range,
        "validity": c.validity.describe(),
        "produced": c.produced,
        "retired": c.retired,
        "comment": c.comment,
        "metadata": c.metadata,
        "shape": list(c.array.shape),
        "dtype": str(c.array.dtype),
        "summary": {
            "min": float(np.nanmin(array)),
            "max": float(np.nanmax(array)),
            "mean": float(np.nanmean(array)),
        }
        if array.size
        else {},
    }
    return emit(args, data, lambda: "\n".join(f"{k}: {v}" for k, v in data.items()))


def cmd_get(args: argparse.Namespace) -> int:
    """Write one version's array to a file."""
    import numpy as np

    c = _constants(args)
    if args.out.suffix == ".npy":
        np.save(args.out, c.array)
    elif args.out.suffix == ".txt":
        np.savetxt(args.out, np.atleast_1d(c.array) if c.array.ndim <= 2 else c.array.reshape(-1))
    else:
        raise StoreError(f"--out {args.out}: use a .npy or .txt file name")
    print(f"{c.version} ({c.ctype}, {c.range}) written to {args.out}")
    return 0


def _load_array(path: Path) -> np.ndarray:
    import numpy as np

    try:
        return np.load(path) if path.suffix == ".npy" else np.loadtxt(path)
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read array from {path}: {exc}") from None


def cmd_add(args: argparse.Namespace) -> int:
    """Add a version."""
    try:
        metadata = json.loads(args.metadata)
    except ValueError as exc:
        raise StoreError(f"--metadata is not valid JSON: {exc}") from None
    store = open_store(args)
    detector = store.detector(args.detector, create=True)
    vid = detector.add(
        args.ctype,
        _load_array(args.file),
        begin=args.begin,
        end=args.end,
        begin_time=args.begin_time,
        end_time=args.end_time,
        metadata=metadata,
        comment=args.comment,
        force=args.force,
        allow_nonfinite=args.allow_nonfinite,
    )
    print(f"added {vid} to {detector.name} {args.ctype}")
    return 0


def cmd_default(args: argparse.Namespace) -> int:
    """Pin or unpin a default."""
    detector = open_store(args).detector(args.detector)
    if args.unpin == (args.version is not None):
        raise StoreError("give a VERSION to pin, or --unpin with --ctype and --range")
    detector.set_default(
        None if args.unpin else args.version,
        ctype=args.ctype,
        range_name=args.range_name,
        comment=args.comment,
    )
    print("default updated")
    return 0


def cmd_retire(args: argparse.Namespace) -> int:
    """Retire a version."""
    open_store(args).detector(args.detector).retire(args.version, args.comment)
    print(f"retired {args.version}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """Print history records."""
    records = open_store(args).detector(args.detector).history(args.ctype)
    rows = [dataclasses.asdict(r) for r in records]
    return emit(
        args,
        rows,
        lambda: "\n".join(
            f"{when(r.time)}  {r.user:<10} {r.action:<12} {r.where}  {r.text}" for r in records
        ),
    )


def cmd_diff(args: argparse.Namespace) -> int:
    """Compare two versions."""
    result = open_store(args).detector(args.detector).diff(args.ctype, args.v1, args.v2)
    return emit(args, result, lambda: "\n".join(f"{k}: {v}" for k, v in result.items()))


def cmd_export(args: argparse.Namespace) -> int:
    """Export a squeezed copy."""
    from loop.store.transfer import export_detector

    detector = open_store(args).detector(args.detector)
    target = export_detector(
        detector,
        args.out,
        ctypes=args.ctype,
        runs=tuple(args.runs) if args.runs else None,
        times=tuple(args.times) if args.times else None,
    )
    print(f"exported {detector.name} to {target}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Merge a file into the store."""
    from loop.store.transfer import import_file

    report = import_file(open_store(args), args.file, force=args.force)
    print(
        f"imported into {report.detector}: {len(report.added)} added, "
        f"{len(report.skipped)} already present"
    )
    return 0


def cmd_alias_add(args: argparse.Namespace) -> int:
    """Add an alias."""
    from loop.store import AliasTable

    store = open_store(args)
    dettype = args.detector.partition("-")[0]
    entry = AliasTable(store.root, dettype).add(
        args.alias,
        args.detector,
        source=args.source,
        begin=args.begin,
        end=args.end,
        lock_timeout_s=store.lock_timeout_s,
    )
    print(f"alias {entry.alias} -> {entry.detector} from {when(entry.begin)}")
    return 0


def cmd_alias_ls(args: argparse.Namespace) -> int:
    """List aliases."""
    from loop.store import AliasTable

    store = open_store(args)
    entries = [e for table in AliasTable.tables(store.root) for e in table.entries()]
    rows = [dataclasses.asdict(e) for e in entries]
    return emit(
        args,
        rows,
        lambda: (
            "\n".join(
                f"{e.alias:<16} {e.source:<20} -> {e.detector:<18} {when(e.begin)} .. "
                f"{when(e.end) if e.end else 'open'}"
                for e in entries
            )
            or "(no aliases)"
        ),
    )
