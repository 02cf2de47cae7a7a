"""The control room's FastAPI application: server-rendered pages (Jinja2), live parts
pushed as Server-Sent Events, plots rendered server-side.

Live updates: a page's live part is a Jinja2 fragment; the browser connects to
``/events/...`` (htmx's SSE extension, vendored under ``static/vendor``) and the server
re-renders the fragment whenever a journal, status or YAML file changed (polled every
``poll_s``, plus every 2 s so heartbeat ages move), sending it only when its HTML
differs. The same fragment serves the first page load, so there is one template per
view and no client-side rendering.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from loop.commands.common import when
from loop.commands.daemon_cmd import collect_status
from loop.conddb.auth import Identity
from loop.conddb.client import Conditions, ConditionsDB
from loop.config import LoopConfig
from loop.control.runcontrol import RERUN_STEP, CommandQueue, approve_refusal, rerun_refusal
from loop.errors import CalloopError
from loop.logs import get_logger
from loop.store import AliasTable, CalibStore
from loop.web import data, plots
from loop.web.payloads import load_payload
from loop.web.security import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    AuditLog,
    Refused,
    Sessions,
    TokenChecker,
    csrf_ok,
)

HERE = Path(__file__).resolve().parent
MAX_FORM_BYTES = 16 * 1024
MAX_REASON = 500
PAGE = 100  # rows per page of run and conditions-DB listings
KEEPALIVE_S = 15.0


@dataclass
class ControlRoom:
    """What every request shares: the site, the store, the checker, the audit log."""

    site: data.Site
    checker: TokenChecker
    audit: AuditLog
    poll_s: float
    store: CalibStore
    sessions: Sessions = field(default_factory=Sessions)
    _conditions: Conditions | None = None

    def conditions(self) -> Conditions:
        """The conditions DB (read-only use), opened on first need."""
        if self._conditions is None:
            loop_config = self.site.loop_config
            self._conditions = ConditionsDB.connect(
                loop_config.conddb_url, create=False, policy=loop_config.timeouts.conddb_policy()
            )
        return self._conditions

    def close(self) -> None:
        """Release database handles."""
        self.checker.close()
        self.store.close()
        if self._conditions is not None:
            self._conditions.close()


def create_app(
    loop_config: LoopConfig, *, auth_db_url: str | None = None, poll_s: float = 0.25
) -> FastAPI:
    """The application; ``auth_db_url`` is the SQL conditions database whose tokens
    may act (default: ``conddb_url`` when it is SQL; none: the site is read-only)."""
    if auth_db_url is None and not loop_config.conddb_url.startswith(("http://", "https://")):
        auth_db_url = loop_config.conddb_url
    site = data.Site(loop_config)
    site.reload()
    room = ControlRoom(
        site=site,
        checker=TokenChecker(auth_db_url),
        audit=AuditLog(loop_config.work_dir / "web" / "audit.sqlite"),
        poll_s=poll_s,
        store=CalibStore(loop_config.store_root, lock_timeout_s=loop_config.timeouts.store_lock_s),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        room.close()

    app = FastAPI(title="calloop control room", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.room = room
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    _add_pages(app, room)
    _add_browsers(app, room)
    _add_actions(app, room)
    return app


# ------------------------------------------------------------------------ rendering

TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
TEMPLATES.filters["when"] = when
TEMPLATES.filters["short"] = lambda text: (text or "")[:12]


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


TEMPLATES.filters["age"] = _age


def render(name: str, **context: Any) -> str:
    """One template (or fragment) as HTML."""
    return TEMPLATES.get_template(name).render(**context)


def page(
    request: Request,
    room: ControlRoom,
    template: str,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    """A full page; sets the CSRF cookie the page's forms echo when it is missing."""
    csrf = request.cookies.get(CSRF_COOKIE) or os.urandom(18).hex()
    identity = room.sessions.get(request.cookies.get(SESSION_COOKIE))
    html = render(
        template,
        csrf=csrf,
        user=identity,
        can_act=room.checker.enabled,
        path=request.url.path,
        **context,
    )
    response = HTMLResponse(html, status_code=status_code)
    if request.cookies.get(CSRF_COOKIE) != csrf:
        response.set_cookie(CSRF_COOKIE, csrf, **_cookie_flags(request))
    return response


def _cookie_flags(request: Request) -> dict[str, Any]:
    """Cookies only for this site's own requests, never readable by scripts, and only
    over TLS when the page came over TLS (a reverse proxy on loopback that sends
    ``X-Forwarded-Proto: https``: uvicorn trusts it from 127.0.0.1)."""
    return {"httponly": True, "samesite": "strict", "secure": request.url.scheme == "https"}


def _sse(event: str, html: str) -> str:
    """One Server-Sent Event; each line of the HTML is a ``data:`` line."""
    lines = "".join(f"data: {line}\n" for line in html.splitlines() or [""])
    return f"event: {event}\n{lines}\n"


def live(request: Request, room: ControlRoom, event: str, fragment: Callable[[], str]) -> Any:
    """A stream of ``event``: the fragment, sent again whenever its HTML changes."""

    async def stream() -> AsyncIterator[str]:
        yield "retry: 2000\n\n"
        last_mark: Any = None
        last_html = None
        quiet = 0.0
        while not await request.is_disconnected():
            mark = await run_in_threadpool(room.site.fingerprint)
            if mark != last_mark:
                last_mark = mark
                html = await run_in_threadpool(fragment)
                if html != last_html:
                    last_html, quiet = html, 0.0
                    yield _sse(event, html)
            quiet += room.poll_s
            if quiet >= KEEPALIVE_S:  # a comment keeps proxies from closing the stream
                quiet = 0.0
                yield ": keepalive\n\n"
            await asyncio.sleep(room.poll_s)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# ---------------------------------------------------------------------------- pages


def _add_pages(app: FastAPI, room: ControlRoom) -> None:
    site = room.site

    def overview_fragment() -> str:
        return render("_overview.html", groups=data.overview(site), problems=site.problems)

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request) -> HTMLResponse:
        return page(request, room, "overview.html", fragment=overview_fragment())

    @app.get("/fragment/overview", response_class=HTMLResponse)
    def overview_only() -> HTMLResponse:
        return HTMLResponse(overview_fragment())

    @app.get("/events/overview")
    def overview_events(request: Request) -> Any:
        return live(request, room, "overview", overview_fragment)

    def run_fragment(calibration: str, run: int) -> str:
        steps = data.run_detail(site.loop_config, calibration, run)
        return render(
            "_run.html",
            calibration=calibration,
            config=site.calibrations[calibration],
            run=run,
            steps=steps,
        )

    @app.get("/runs/{calibration}/{run}", response_class=HTMLResponse)
    def run_page(request: Request, calibration: str, run: int) -> HTMLResponse:
        _known(room, calibration)
        fragment = run_fragment(calibration, run)
        return page(request, room, "run.html", calibration=calibration, run=run, fragment=fragment)

    @app.get("/events/runs/{calibration}/{run}")
    def run_events(request: Request, calibration: str, run: int) -> Any:
        _known(room, calibration)
        return live(request, room, "run", lambda: run_fragment(calibration, run))

    @app.get("/runs/{calibration}", response_class=HTMLResponse)
    def run_list(request: Request, calibration: str, offset: int = 0) -> HTMLResponse:
        _known(room, calibration)
        with data.Journals(site.loop_config, calibration) as journals:
            first = journals.readers.get("step2") or next(iter(journals.readers.values()), None)
            rows = [] if first is None else first.runs_page(PAGE, max(offset, 0))
            total = 0 if first is None else first.count_runs()
            listed = [(run, journals.states(run)) for run, _state, _at in rows]
        return page(
            request,
            room,
            "runs.html",
            calibration=calibration,
            rows=listed,
            offset=max(offset, 0),
            total=total,
            page_size=PAGE,
        )

    @app.get("/payload/{detector}/{ctype}", response_class=HTMLResponse)
    def payload_page(
        request: Request, detector: str, ctype: str, version: str | None = None
    ) -> HTMLResponse:
        view = load_payload(
            room.store,
            site.loop_config,
            site.owner(detector, ctype),
            detector=detector,
            ctype=ctype,
            version=version,
        )
        return page(request, room, "payload.html", view=view)

    @app.get("/plot/{detector}/{ctype}/{version}.{fmt}")
    def plot(detector: str, ctype: str, version: str, fmt: str) -> Response:
        if fmt not in plots.FORMATS:
            raise CalloopError(f"unknown plot format {fmt!r}; use png or svg")
        view = load_payload(
            room.store,
            site.loop_config,
            site.owner(detector, ctype),
            detector=detector,
            ctype=ctype,
            version=version,
        )
        return Response(plots.render(view, fmt), media_type=plots.FORMATS[fmt])

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "calibrations": sorted(site.calibrations)}

    @app.exception_handler(CalloopError)
    async def domain_error(request: Request, exc: CalloopError) -> HTMLResponse:
        return page(request, room, "message.html", 404, title="Not found", message=str(exc))


def _known(room: ControlRoom, calibration: str) -> None:
    if calibration not in room.site.calibrations:
        raise CalloopError(f"unknown calibration {calibration!r}")


# ------------------------------------------------------------------------- browsers


def _add_browsers(app: FastAPI, room: ControlRoom) -> None:
    """Read-only views of the calibration store and the conditions DB."""

    @app.get("/store", response_class=HTMLResponse)
    def store_index(request: Request) -> HTMLResponse:
        names = room.store.detector_names()
        aliases = [a for table in AliasTable.tables(room.store.root) for a in table.entries()]
        return page(request, room, "store.html", detectors=names, aliases=aliases)

    @app.get("/store/{name}", response_class=HTMLResponse)
    def store_detector(request: Request, name: str) -> HTMLResponse:
        detector = room.store.detector(name)
        ctypes = {
            ctype: {"ranges": detector.ranges(ctype), "versions": detector.versions(ctype)}
            for ctype in detector.ctypes()
        }
        return page(
            request,
            room,
            "store_detector.html",
            detector=detector,
            attributes=detector.attributes(),
            ctypes=ctypes,
            history=list(reversed(detector.history()))[:PAGE],
        )

    @app.get("/conddb", response_class=HTMLResponse)
    def conddb_index(request: Request, offset: int = 0) -> HTMLResponse:
        conditions = room.conditions()
        return page(
            request,
            room,
            "conddb.html",
            tags=conditions.tags(limit=PAGE, offset=max(offset, 0)),
            global_tags=conditions.global_tags(limit=PAGE),
            offset=max(offset, 0),
            page_size=PAGE,
        )

    @app.get("/conddb/tags/{name}", response_class=HTMLResponse)
    def conddb_tag(request: Request, name: str, offset: int = 0) -> HTMLResponse:
        conditions = room.conditions()
        return page(
            request,
            room,
            "conddb_tag.html",
            tag=conditions.tag(name),
            iovs=conditions.iovs(name, history=True, limit=PAGE, offset=max(offset, 0)),
            log=conditions.taglog(name, limit=PAGE),
            offset=max(offset, 0),
            page_size=PAGE,
        )

    @app.get("/conddb/globaltags/{name}", response_class=HTMLResponse)
    def conddb_global_tag(request: Request, name: str) -> HTMLResponse:
        conditions = room.conditions()
        return page(
            request,
            room,
            "conddb_gt.html",
            name=name,
            global_tag=conditions.global_tag(name),
            log=conditions.global_tag_log(name, limit=PAGE),
        )

    @app.get("/audit", response_class=HTMLResponse)
    def audit(request: Request) -> HTMLResponse:
        return page(request, room, "audit.html", entries=room.audit.entries())


# -------------------------------------------------------------------------- actions


async def _form(request: Request) -> dict[str, str]:
    """The urlencoded form (bounded; the last value of a repeated field wins)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise Refused(413, "form too large")
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _add_actions(app: FastAPI, room: ControlRoom) -> None:
    log = get_logger("calloop.web")
    actions: dict[str, Callable[[ControlRoom, Identity, dict[str, str], str], tuple[str, str]]]
    actions = {
        "retry": act_retry,
        "skip": act_skip,
        "rerun": act_rerun,
        "approve": act_approve,
        "retire": act_retire,
        "pin": act_pin,
        "reload": act_reload,
    }

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/") -> HTMLResponse:
        return page(request, room, "login.html", next=_local(next), error="")

    @app.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        form = await _form(request)
        target = _local(form.get("next", "/"))
        if not csrf_ok(request.cookies.get(CSRF_COOKIE), form.get("csrf")):
            return page(request, room, "login.html", 403, next=target, error="CSRF check failed")
        identity = await run_in_threadpool(room.checker.identity, form.get("token", ""))
        audit = functools.partial(
            room.audit.record, identity, _client(request), action="login", target="-", reason=""
        )
        if identity is None:
            audit(outcome="refused", detail="bad token")
            error = "not a valid operator or admin token"
            return page(request, room, "login.html", 401, next=target, error=error)
        audit(outcome="done", detail="")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, room.sessions.open(identity), **_cookie_flags(request))
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        form = await _form(request)
        if csrf_ok(request.cookies.get(CSRF_COOKIE), form.get("csrf")):
            room.sessions.close(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @app.post("/actions/{name}", response_class=HTMLResponse)
    async def action(request: Request, name: str) -> HTMLResponse:
        identity = room.sessions.get(request.cookies.get(SESSION_COOKIE))
        form: dict[str, str] = {}
        target = "-"
        try:
            form = await _form(request)
            target = _target(form)
            if name not in actions:
                raise Refused(404, f"unknown action {name!r}")
            if not csrf_ok(request.cookies.get(CSRF_COOKIE), form.get("csrf")):
                raise Refused(403, "CSRF check failed: reload the page and submit again")
            if identity is None:
                raise Refused(401, "log in with an operator token first")
            reason = " ".join(form.get("reason", "").split())[:MAX_REASON]
            if not reason:
                raise Refused(400, "a reason is required")
            target, result = await run_in_threadpool(actions[name], room, identity, form, reason)
        except Refused as exc:
            room.audit.record(
                identity,
                _client(request),
                action=name,
                target=target,
                reason=form.get("reason", ""),
                outcome="refused",
                detail=str(exc),
            )
            log.warning("action refused", action=name, target=target, why=str(exc))
            return page(
                request, room, "message.html", exc.status, title="Refused", message=str(exc)
            )
        room.audit.record(
            identity,
            _client(request),
            action=name,
            target=target,
            reason=reason,
            outcome="done",
            detail=result,
        )
        log.info("action done", action=name, target=target, user=identity.user, result=result)
        return page(request, room, "message.html", title="Done", message=result, back=form)


def _local(path: str) -> str:
    """Only a path on this site (never ``//host`` or a URL) is a redirect target."""
    return path if path.startswith("/") and not path.startswith("//") else "/"


def _target(form: dict[str, str]) -> str:
    keys = ("calibration", "run", "detector", "ctype", "version")
    return " ".join(f"{k}={form[k]}" for k in keys if form.get(k)) or "-"


def _run_of(room: ControlRoom, form: dict[str, str]) -> tuple[str, int]:
    calibration = form.get("calibration", "")
    if calibration not in room.site.calibrations:
        raise Refused(400, f"unknown calibration {calibration!r}")
    try:
        return calibration, int(form.get("run", ""))
    except ValueError:
        raise Refused(400, "run must be a number") from None


def _queue(
    room: ControlRoom,
    identity: Identity,
    *,
    calibration: str,
    run: int,
    action: str,
    steps: list[str],
    reason: str,
) -> str:
    """Queue the command in each step's journal, as ``calloop runs`` does; the daemon
    applies it at its next cycle (the run page shows the acknowledgement)."""
    queued = []
    for step in steps:
        queue = CommandQueue(data.journal_path(room.site.loop_config, calibration, step))
        try:
            command = queue.submit(run, action, reason=f"{reason} [web: {identity.user}]")
        finally:
            queue.close()
        queued.append(f"{step} #{command.id}")
    return f"{action} of run {run} queued in {', '.join(queued)}"


def act_retry(
    room: ControlRoom, identity: Identity, form: dict[str, str], reason: str
) -> tuple[str, str]:
    """Retry a Failed run from the step where it failed."""

    def steps(run: int, states: dict[str, str | None]) -> list[str]:
        step = data.first_failed_step(states)
        if step is None:
            shown = ", ".join(f"{s}: {v or 'not seen'}" for s, v in states.items())
            raise Refused(409, f"run {run} is not Failed in any step ({shown}); nothing to retry")
        return [step]

    return _run_command(room, identity, form, reason, action="retry", steps_for=steps)


def act_skip(
    room: ControlRoom, identity: Identity, form: dict[str, str], reason: str
) -> tuple[str, str]:
    """Close a run on purpose in every step that has not finished it."""

    def steps(run: int, states: dict[str, str | None]) -> list[str]:
        found = data.open_steps(states)
        if not found:
            raise Refused(409, f"run {run} is closed in every step; nothing to skip")
        return found

    return _run_command(room, identity, form, reason, action="skip", steps_for=steps)


def act_rerun(
    room: ControlRoom, identity: Identity, form: dict[str, str], reason: str
) -> tuple[str, str]:
    """Recalibrate a finished run: step 4 harvests it again with the current configuration."""
    return _step4_command(room, identity, form, reason, action="rerun", refusal=rerun_refusal)


def act_approve(
    room: ControlRoom, identity: Identity, form: dict[str, str], reason: str
) -> tuple[str, str]:
    """An expert's approval of a Rejected run's payload: stored accepted, uploaded."""
    return _step4_command(room, identity, form, reason, action="approve", refusal=approve_refusal)


def _step4_command(
    room: ControlRoom,
    identity: Identity,
    form: dict[str, str],
    reason: str,
    *,
    action: str,
    refusal: Callable[[str | None], str | None],
) -> tuple[str, str]:
    """Queue ``action`` in step 4 when ``refusal`` of the run's step-4 state says none."""

    def steps(run: int, states: dict[str, str | None]) -> list[str]:
        why = refusal(states.get(RERUN_STEP))
        if why is not None:
            raise Refused(409, f"run {run}: {why}")
        return [RERUN_STEP]

    return _run_command(room, identity, form, reason, action=action, steps_for=steps)


def _run_command(
    room: ControlRoom,
    identity: Identity,
    form: dict[str, str],
    reason: str,
    *,
    action: str,
    steps_for: Callable[[int, dict[str, str | None]], list[str]],
) -> tuple[str, str]:
    """Queue a run command in the steps ``steps_for`` picks from the run's state in each
    step that has a journal (it raises :class:`Refused` when the command does not apply)."""
    calibration, run = _run_of(room, form)
    with data.Journals(room.site.loop_config, calibration) as journals:
        states = {s: v for s, v in journals.states(run).items() if s in journals.readers}
    steps = steps_for(run, states)
    result = _queue(
        room,
        identity,
        calibration=calibration,
        run=run,
        action=action,
        steps=steps,
        reason=reason,
    )
    return f"calibration={calibration} run={run}", result


def _version_of(room: ControlRoom, form: dict[str, str]) -> tuple[Any, str]:
    try:
        detector = room.store.detector(form.get("detector", ""))
    except CalloopError as exc:
        raise Refused(400, str(exc)) from None
    version = form.get("version", "")
    if not version:
        raise Refused(400, "version is required")
    return detector, version


def act_retire(
    room: ControlRoom, identity: Identity, form: dict[str, str], reason: str
) -> tuple[str, str]:
    """Flag a store version: retired, never a default again (still readable by id)."""
    return _store_action(room, identity, form, reason, "retired")


def act_pin(
    room: ControlRoom, identity: Identity, form: dict[str, str], reason: str
) -> tuple[str, str]:
    """Approve a store version: pin it as its range's default."""
    return _store_action(room, identity, form, reason, "pinned")


def _store_action(
    room: ControlRoom, identity: Identity, form: dict[str, str], reason: str, done: str
) -> tuple[str, str]:
    """Retire or pin the form's version, the user named in the store's history."""
    detector, version = _version_of(room, form)
    change = detector.retire if done == "retired" else detector.set_default
    try:
        change(version, comment=f"{reason} [web: {identity.user}]")
    except CalloopError as exc:
        raise Refused(409, str(exc)) from None
    return f"detector={detector.name} version={version}", f"{version} of {detector.name} {done}"


def act_reload(
    room: ControlRoom, _identity: Identity, _form: dict[str, str], _reason: str
) -> tuple[str, str]:
    """Re-read the calibrations here, and ask every live daemon on this host to reload
    (SIGHUP: all or nothing, see the README's "Reloading")."""
    room.site.reload()
    host = socket.gethostname()
    signalled = []
    for row in collect_status(room.site.loop_config):
        if row.get("alive") and row.get("host") == host:
            try:
                os.kill(int(row["pid"]), signal.SIGHUP)
            except OSError:
                continue
            signalled.append(f"{row['calibration']}/{row['step']}")
    problems = f"; {len(room.site.problems)} problem(s) in the YAML" if room.site.problems else ""
    return "configuration", (
        f"{len(room.site.calibrations)} calibration(s) read{problems}; SIGHUP sent to "
        f"{', '.join(signalled) or 'no running daemon on this host'}"
    )
