"""``calloop conddb ...``: create, serve, inspect and write a conditions database.

Nothing here prints a database password or a token's secret, except ``token create``,
which prints the new token once (:mod:`loop.redact`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loop.commands.common import add_json_flag, emit, when
from loop.conddb import DEFAULT_MAX_BODY
from loop.config import default_config_dir, load_loop_config
from loop.errors import ConditionsError
from loop.fsutil import atomic_write_text
from loop.logs import setup_logging
from loop.redact import redact_url

if TYPE_CHECKING:  # the SQL and web stacks load only when a command needs them
    import numpy as np

    from loop.conddb.client import Conditions
    from loop.conddb.db import ConditionsDatabase, UploadResult


def register(subparsers: Any) -> None:
    """Add the ``conddb`` group."""
    group = subparsers.add_parser("conddb", help="conditions database (library, service, client)")
    group.add_argument("--db", help="sqlite:///..., postgresql+psycopg://... or http(s)://...")
    group.add_argument(
        "--token",
        help="bearer token for writes; prefer $CALLOOP_CONDDB_TOKEN (arguments are visible "
        "to every user of the machine)",
    )
    group.add_argument("--config", type=Path, help="loop.yaml to take conddb_url from")
    sub = group.add_subparsers(dest="conddb_command", required=True, metavar="ACTION")

    init = sub.add_parser("init", help="create the schema in a SQL database")
    init.add_argument("url", nargs="?")
    init.set_defaults(handler=cmd_init)

    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--port", type=int, default=8081, help="TCP port (0: any free port)")
    serve.add_argument("--port-file", type=Path, help="write the bound port here (for --port 0)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--read-token-required", action="store_true")
    serve.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY)
    serve.set_defaults(handler=cmd_serve)

    _register_tokens(sub)
    _register_reads(sub)
    _register_writes(sub)


def _register_tokens(sub: Any) -> None:
    token = sub.add_parser("token", help="upload tokens (stored hashed)")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_sub.add_parser("create", help="create a token and print it once")
    create.add_argument("--user", required=True)
    create.add_argument("--tags", required=True, help="comma-separated patterns, e.g. 'Ecal*'")
    create.add_argument(
        "--role",
        choices=["uploader", "admin", "operator"],
        default="uploader",
        help="uploader: its tags only; admin: also create and edit global tags; "
        "operator: actions in the web control room (calloop web), no conditions-DB write",
    )
    create.set_defaults(handler=cmd_token_create)
    ls = token_sub.add_parser("ls", help="list tokens (without secrets)")
    add_json_flag(ls)
    ls.set_defaults(handler=cmd_token_ls)
    revoke = token_sub.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id", type=int)
    revoke.set_defaults(handler=cmd_token_revoke)
    fcsr = sub.add_parser("fcsr", help="set (or clear with 'none') the first condition-safe run")
    fcsr.add_argument("run")
    fcsr.set_defaults(handler=cmd_fcsr)


def _register_reads(sub: Any) -> None:
    tags = sub.add_parser("tags", help="list tags")
    add_json_flag(tags)
    tags.set_defaults(handler=cmd_tags)
    iovs = sub.add_parser("iovs", help="IOVs of a tag")
    iovs.add_argument("tag")
    iovs.add_argument("--snapshot", type=float)
    iovs.add_argument("--history", action="store_true")
    add_json_flag(iovs)
    iovs.set_defaults(handler=cmd_iovs)
    resolve = sub.add_parser("resolve", help="payload valid at a run/time")
    resolve.add_argument("--tag")
    resolve.add_argument("--gt")
    resolve.add_argument("--record")
    resolve.add_argument("--label", default="")
    resolve.add_argument("--run", type=int)
    resolve.add_argument("--ls", type=int)
    resolve.add_argument("--time", type=float)
    add_json_flag(resolve)
    resolve.set_defaults(handler=cmd_resolve)
    log = sub.add_parser("log", help="audit log of a tag or a global tag")
    which = log.add_mutually_exclusive_group(required=True)
    which.add_argument("--tag")
    which.add_argument("--global-tag")
    add_json_flag(log)
    log.set_defaults(handler=cmd_log)
    payload = sub.add_parser("payload", help="show or save a payload by hash")
    payload.add_argument("hash")
    payload.add_argument("--out", type=Path)
    add_json_flag(payload)
    payload.set_defaults(handler=cmd_payload)


def _register_writes(sub: Any) -> None:
    create = sub.add_parser("create-tag", help="create a tag")
    create.add_argument("name")
    create.add_argument("--time-type", default="run", choices=["run", "lumi", "time"])
    create.add_argument("--object-type", required=True)
    create.add_argument("--synchronization", default="any")
    create.add_argument("--description", default="")
    create.set_defaults(handler=cmd_create_tag)
    upload = sub.add_parser("upload", help="upload a .npy array (not .npz) as a new IOV")
    upload.add_argument("tag")
    upload.add_argument("file", type=Path)
    upload.add_argument("--since", type=int, required=True)
    upload.add_argument("--user-text", default="")
    upload.add_argument("--input-tag", default="")
    add_json_flag(upload)
    upload.set_defaults(handler=cmd_upload)
    bulk = sub.add_parser(
        "upload-bulk", help="upload many .npy arrays to a tag in one transaction (all or none)"
    )
    bulk.add_argument("tag")
    bulk.add_argument("iovs", nargs="+", metavar="SINCE=FILE", help="e.g. 386001=ped.npy")
    bulk.add_argument("--key", help="idempotency key: the same command again writes nothing")
    bulk.add_argument("--user-text", default="")
    bulk.add_argument("--input-tag", default="")
    add_json_flag(bulk)
    bulk.set_defaults(handler=cmd_upload_bulk)
    gt = sub.add_parser("gt", help="global tags")
    gt_sub = gt.add_subparsers(dest="gt_command", required=True, metavar="ACTION")
    gt_create = gt_sub.add_parser("create", help="create a global tag")
    gt_create.add_argument("name")
    gt_create.add_argument("--description", default="")
    gt_create.add_argument("--release", default="")
    gt_create.add_argument("--snapshot-time", type=float)
    gt_create.set_defaults(handler=cmd_gt_create)
    gt_map = gt_sub.add_parser("map", help="map (record, label) to a tag")
    gt_map.add_argument("name")
    gt_map.add_argument("record")
    gt_map.add_argument("tag")
    gt_map.add_argument("--label", default="")
    gt_map.set_defaults(handler=cmd_gt_map)
    gt_show = gt_sub.add_parser("show", help="show a global tag (or list them)")
    gt_show.add_argument("name", nargs="?")
    add_json_flag(gt_show)
    gt_show.set_defaults(handler=cmd_gt_show)


def _url(args: argparse.Namespace) -> str:
    if getattr(args, "url", None):
        return str(args.url)
    if args.db:
        return str(args.db)
    config = load_loop_config(args.config or default_config_dir() / "loop.yaml")
    return config.conddb_url


def _sql(args: argparse.Namespace) -> ConditionsDatabase:
    from loop.conddb.db import ConditionsDatabase

    url = _url(args)
    if url.startswith("http"):
        raise ConditionsError(f"this command needs direct database access, not {redact_url(url)}")
    return ConditionsDatabase(url)


def _connect(args: argparse.Namespace) -> Conditions:
    from loop.conddb.client import ConditionsDB

    token = args.token or os.environ.get("CALLOOP_CONDDB_TOKEN")
    return ConditionsDB.connect(_url(args), token, create=False)


def cmd_init(args: argparse.Namespace) -> int:
    """Create the schema."""
    db = _sql(args)
    db.create_schema()
    print(f"conditions DB schema ready at {db.url}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT."""
    import uvicorn

    from loop.conddb.server import create_app, listen

    setup_logging(None, "conddb", "serve")
    db = _sql(args)
    db.create_schema()  # idempotent: an upgrade gets its new tables (upload_request)
    app = create_app(db, read_token_required=args.read_token_required, max_body_bytes=args.max_body)
    # bound here, not by uvicorn, so that the port of --port 0 is known before serving
    listener = listen(args.host, args.port)
    port = listener.getsockname()[1]
    if args.port_file:
        atomic_write_text(args.port_file, f"{port}\n")
    print(f"conditions DB service on http://{args.host}:{port} ({db.url})", flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    server.run(sockets=[listener])
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    """Create a token."""
    token = _sql(args).create_token(args.user, args.tags.split(","), role=args.role)
    print(token)
    return 0


def cmd_token_ls(args: argparse.Namespace) -> int:
    """List tokens."""
    rows = _sql(args).tokens()
    return emit(
        args,
        rows,
        lambda: (
            "\n".join(
                f"{r['id']:>4}  {r['user']:<12} {r['role']:<8} {r['tags']:<30} "
                f"{when(r['created'])}"
                f"{'  REVOKED' if r['revoked'] else ''}"
                for r in rows
            )
            or "(no tokens)"
        ),
    )


def cmd_token_revoke(args: argparse.Namespace) -> int:
    """Revoke a token."""
    _sql(args).revoke_token(args.id)
    print(f"token {args.id} revoked")
    return 0


def cmd_fcsr(args: argparse.Namespace) -> int:
    """Set the first condition-safe run."""
    run = None if args.run.lower() == "none" else int(args.run)
    _sql(args).set_fcsr(run)
    print(f"first condition-safe run: {run}")
    return 0


def cmd_tags(args: argparse.Namespace) -> int:
    """List tags."""
    tags = _connect(args).tags()
    return emit(
        args,
        [dataclasses.asdict(t) for t in tags],
        lambda: (
            "\n".join(
                f"{t.name:<36} {t.time_type:<5} {t.synchronization:<10} {t.object_type}"
                for t in tags
            )
            or "(no tags)"
        ),
    )


def cmd_iovs(args: argparse.Namespace) -> int:
    """List IOVs."""
    iovs = _connect(args).iovs(args.tag, snapshot=args.snapshot, history=args.history)
    return emit(
        args,
        [dataclasses.asdict(i) for i in iovs],
        lambda: (
            "\n".join(f"{i.since:>14}  {when(i.insertion_time)}  {i.payload_hash}" for i in iovs)
            or "(none)"
        ),
    )


def cmd_resolve(args: argparse.Namespace) -> int:
    """Resolve a point."""
    result = _connect(args).resolve(
        tag=args.tag,
        global_tag=args.gt,
        record=args.record,
        label=args.label,
        run=args.run,
        ls=args.ls,
        time_point=args.time,
    )
    data = dataclasses.asdict(result)
    return emit(args, data, lambda: "\n".join(f"{k}: {v}" for k, v in data.items()))


def cmd_log(args: argparse.Namespace) -> int:
    """Show the audit log of a tag or a global tag."""
    conditions = _connect(args)
    if args.tag:
        entries = conditions.taglog(args.tag)
    else:
        entries = conditions.global_tag_log(args.global_tag)
    return emit(
        args,
        entries,
        lambda: (
            "\n".join(
                f"{when(e['time'])}  {e['user']:<12} {e['action']:<10} "
                + "  ".join(
                    f"{field}: {e[field]}" for field in ("before", "after", "text") if e[field]
                )
                for e in entries
            )
            or "(no entries)"
        ),
    )


def cmd_payload(args: argparse.Namespace) -> int:
    """Show or save a payload."""
    blob = _connect(args).payload(args.hash)
    if args.out:
        args.out.write_bytes(blob.data)
    data = {
        "hash": blob.hash,
        "object_type": blob.object_type,
        "size": len(blob.data),
        "streamer_info": blob.streamer_info,
        "insertion_time": blob.insertion_time,
    }
    if blob.streamer_info.startswith("numpy"):
        array = blob.array()
        data.update(shape=list(array.shape), dtype=str(array.dtype))
    return emit(args, data, lambda: "\n".join(f"{k}: {v}" for k, v in data.items()))


def cmd_create_tag(args: argparse.Namespace) -> int:
    """Create a tag."""
    tag = _connect(args).create_tag(
        args.name,
        time_type=args.time_type,
        object_type=args.object_type,
        synchronization=args.synchronization,
        description=args.description,
    )
    print(f"tag {tag.name} ({tag.time_type}, {tag.synchronization})")
    return 0


def _read_array(path: Path) -> np.ndarray:
    """A .npy file's array (no pickles); errors name the file."""
    from loop.conddb.npy import load_npy

    try:
        return load_npy(path.read_bytes())
    except OSError as exc:
        raise ConditionsError(f"cannot read {path}: {exc.strerror}") from None
    except ConditionsError as exc:
        raise ConditionsError(f"{path}: {exc}") from None


def _outcome_line(result: UploadResult) -> str:
    text = f"{result.status}: {result.tag} since {result.since} payload {result.payload_hash}"
    return f"{text} {result.note}".rstrip()


def cmd_upload(args: argparse.Namespace) -> int:
    """Upload an array."""
    result = _connect(args).upload(
        args.tag,
        args.since,
        _read_array(args.file),
        user_text=args.user_text,
        input_tag=args.input_tag,
    )
    return emit(args, dataclasses.asdict(result), lambda: _outcome_line(result))


def cmd_upload_bulk(args: argparse.Namespace) -> int:
    """Upload SINCE=FILE arrays in one request and one transaction."""
    rows: list[tuple[int, np.ndarray | bytes]] = []
    for item in args.iovs:
        since, separator, file = item.partition("=")
        if not separator or not since.isascii() or not since.isdigit():
            raise ConditionsError(f"{item!r}: expected SINCE=FILE, e.g. 386001=ped.npy")
        rows.append((int(since), _read_array(Path(file))))
    results = _connect(args).upload_bulk(
        args.tag, rows, user_text=args.user_text, input_tag=args.input_tag, key=args.key
    )
    return emit(
        args,
        [dataclasses.asdict(r) for r in results],
        lambda: "\n".join(_outcome_line(r) for r in results),
    )


def cmd_gt_create(args: argparse.Namespace) -> int:
    """Create a global tag."""
    _connect(args).create_global_tag(
        args.name,
        description=args.description,
        release=args.release,
        snapshot_time=args.snapshot_time,
    )
    print(f"global tag {args.name}")
    return 0


def cmd_gt_map(args: argparse.Namespace) -> int:
    """Map a record to a tag."""
    _connect(args).map_global_tag(args.name, args.record, args.label, args.tag)
    print(f"{args.name}: {args.record}/{args.label} -> {args.tag}")
    return 0


def cmd_gt_show(args: argparse.Namespace) -> int:
    """Show a global tag or list them."""
    conditions = _connect(args)
    if args.name is None:
        names = conditions.global_tags()
        return emit(args, names, lambda: "\n".join(names) or "(no global tags)")
    gt = conditions.global_tag(args.name)
    return emit(
        args,
        gt,
        lambda: "\n".join(
            [f"{gt['name']} (snapshot {gt['snapshot_time']}) {gt['description']}"]
            + [f"  {m['record']}/{m['label']} -> {m['tag']}" for m in gt["map"]]
        ),
    )
