"""The control room over HTTP (a real uvicorn server on a loopback port) against real
journals, a real store and a real conditions DB; ``calloop plot``; the operator role.
The browser tests (tests/test_web_browser.py) run the same pages in Chromium against a
live loop."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from matplotlib import image

from loop.conddb.auth import Forbidden, Identity, check_tags
from loop.conddb.db import ConditionsDatabase
from loop.conddb.server import ServiceThread
from loop.config import LoopConfig, load_loop_config
from loop.control.runcontrol import CommandQueue
from loop.demo import write_workspace
from loop.journal import Journal
from loop.store import CalibStore
from loop.web.app import create_app
from tests.conftest import run_cli
from tests.web_loop import fill_journals, make_tokens

RUNS = 30
FIRST = 100000
NEWEST_DONE = FIRST + RUNS - 6  # the five newest stay in flight
TEMPLATES = Path(__file__).resolve().parent.parent / "loop" / "web" / "templates"


@dataclass
class Room:
    """A served control room over a filled work directory."""

    url: str
    loop_yaml: Path
    loop_config: LoopConfig
    operator: str
    uploader: str
    versions: list[str]


def _store_versions(loop_config: LoopConfig) -> list[str]:
    """Two pedestal versions; channel 3 of the second is noisy and moved by 40 ADC."""
    rng = np.random.default_rng(1)
    mean = rng.normal(200, 10, 64)
    noise = rng.uniform(2, 4, 64)
    second = np.stack([mean.copy(), noise.copy()])
    second[0, 3] += 40.0
    second[1, 3] = 30.0
    quality = {"events": 500, "bad_fraction": 1 / 64, "nonfinite_channels": []}
    store = CalibStore(loop_config.store_root)
    try:
        detector = store.detector("ecal-0001", create=True)
        return [
            detector.add(
                "pedestals", array, begin=FIRST, metadata={"quality": quality}, comment=comment
            )
            for array, comment in ((np.stack([mean, noise]), "first"), (second, "second"))
        ]
    finally:
        store.close()


@pytest.fixture
def room(tmp_path: Path) -> Iterator[Room]:
    loop_yaml = write_workspace(tmp_path)
    loop_config = load_loop_config(loop_yaml)
    fill_journals(loop_config, "EcalPedestals", RUNS, first=FIRST)
    versions = _store_versions(loop_config)
    operator, uploader = make_tokens(loop_config.conddb_url)
    app = create_app(loop_config, poll_s=0.05)
    service = ServiceThread(app).start()
    try:
        yield Room(service.url, loop_yaml, loop_config, operator, uploader, versions)
    finally:
        service.stop()
        app.state.room.close()


def _login(room: Room, token: str) -> tuple[requests.Session, str]:
    """A browser-like session: the CSRF cookie from a page, then the login form."""
    session = requests.Session()
    session.get(room.url + "/", timeout=10).raise_for_status()
    csrf = session.cookies["calloop_csrf"]
    session.post(
        room.url + "/login",
        data={"csrf": csrf, "token": token, "next": "/"},
        timeout=10,
        allow_redirects=False,
    )
    return session, csrf


def _audit(room: Room) -> list[tuple[Any, ...]]:
    import sqlite3

    db = sqlite3.connect(room.loop_config.work_dir / "web" / "audit.sqlite")
    try:
        return db.execute("SELECT user, action, outcome, reason, detail FROM audit").fetchall()
    finally:
        db.close()


def test_overview_shows_calibrations_runs_in_flight_and_last_payloads(room: Room) -> None:
    html = requests.get(room.url + "/fragment/overview", timeout=10).text
    assert 'id="cal-EcalPedestals"' in html and 'id="cal-SiStripBad"' in html
    assert "ECAL pedestals" in html and "ecal-calib-oncall@example.org" in html
    for run in range(FIRST + RUNS - 5, FIRST + RUNS):
        assert f'id="run-EcalPedestals-{run}"' in html
    assert f'id="run-EcalPedestals-{NEWEST_DONE}"' not in html
    last = html.split('id="last-ok-EcalPedestals"')[1].split("</p>")[0]
    assert f"run {NEWEST_DONE}" in last
    assert "never started" in html  # no daemon ran here: shown, not hidden


def test_run_page_shows_history_jobs_and_uploads(room: Room) -> None:
    html = requests.get(f"{room.url}/runs/EcalPedestals/{NEWEST_DONE}", timeout=10).text
    step4 = html.split('id="history-step4"')[1].split("</ol>")[0]
    assert step4.count("<li") == 10 and "Done" in step4 and "PreparingFinalFiles" in step4
    assert "succeeded" in html and "EcalPedestals" in html
    unknown = requests.get(f"{room.url}/runs/NoSuchCalibration/1", timeout=10)
    assert unknown.status_code == 404 and "unknown calibration" in unknown.text


def _events(response: requests.Response) -> Iterator[tuple[str, str]]:
    """(event, data) of a Server-Sent Events stream."""
    event, lines = "", []
    for raw in response.iter_lines(decode_unicode=True):
        if raw.startswith("event: "):
            event = raw[7:]
        elif raw.startswith("data: "):
            lines.append(raw[6:])
        elif raw == "" and event:
            yield event, "\n".join(lines)
            event, lines = "", []


def test_overview_stream_pushes_a_state_change(room: Room) -> None:
    run = FIRST + RUNS - 1
    with requests.get(room.url + "/events/overview", stream=True, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response)
        name, first = next(events)
        assert name == "overview" and f'id="run-EcalPedestals-{run}"' in first
        journal = Journal(room.loop_config.work_dir / "EcalPedestals" / "step4.journal.sqlite")
        try:
            journal.set_state(run, "Failed", active=True)
        finally:
            journal.close()
        deadline = time.monotonic() + 20  # the stream is read with a 30 s timeout too
        for _name, html in events:
            row = html.split(f'id="run-EcalPedestals-{run}"')[1].split("</tr>")[0]
            if "Failed" in row:
                break
            assert time.monotonic() < deadline, "the change was not pushed"


def test_actions_need_csrf_and_a_session_and_every_attempt_is_audited(room: Room) -> None:
    form = {"detector": "ecal-0001", "version": room.versions[0], "reason": "looks fine"}
    bare = requests.post(room.url + "/actions/pin", data=form, timeout=10)
    assert bare.status_code == 403 and "CSRF" in bare.text
    session = requests.Session()
    session.get(room.url + "/", timeout=10)
    csrf = session.cookies["calloop_csrf"]
    anonymous = session.post(room.url + "/actions/pin", data={**form, "csrf": csrf}, timeout=10)
    assert anonymous.status_code == 401
    uploader, csrf = _login(room, room.uploader)
    refused = uploader.post(room.url + "/actions/pin", data={**form, "csrf": csrf}, timeout=10)
    assert refused.status_code == 401  # an uploader token opens no session
    outcomes = [(user, action, outcome) for user, action, outcome, *_ in _audit(room)]
    assert outcomes.count(("(anonymous)", "pin", "refused")) == 3
    assert ("(anonymous)", "login", "refused") in outcomes
    store = CalibStore(room.loop_config.store_root)
    try:
        assert not any(
            v.is_default and v.version == room.versions[0]
            for v in store.detector("ecal-0001").versions("pedestals")
        )
    finally:
        store.close()


def test_operator_pins_retires_and_queues_run_commands(room: Room) -> None:
    session, csrf = _login(room, room.operator)
    first, second = room.versions

    def act(name: str, **fields: str) -> requests.Response:
        return session.post(f"{room.url}/actions/{name}", data={"csrf": csrf, **fields}, timeout=10)

    pinned = act("pin", detector="ecal-0001", version=first, reason="the second is noisy")
    assert pinned.status_code == 200 and "pinned" in pinned.text
    retired = act("retire", detector="ecal-0001", version=second, reason="channel 3 broke")
    assert retired.status_code == 200 and "retired" in retired.text
    store = CalibStore(room.loop_config.store_root)
    try:
        versions = {v.version: v for v in store.detector("ecal-0001").versions("pedestals")}
    finally:
        store.close()
    assert versions[first].is_default and versions[second].retired

    done = act("retry", calibration="EcalPedestals", run=str(NEWEST_DONE), reason="again")
    assert done.status_code == 409 and "not Failed" in done.text
    in_flight = FIRST + RUNS - 1
    skip = act("skip", calibration="EcalPedestals", run=str(in_flight), reason="beam test")
    assert skip.status_code == 200 and "queued in step2" in skip.text
    queue = CommandQueue(room.loop_config.work_dir / "EcalPedestals" / "step4.journal.sqlite")
    try:
        [command] = queue.pending()
    finally:
        queue.close()
    assert (command.run, command.action) == (in_flight, "skip")
    assert command.reason == "beam test [web: shift-operator]"

    # the one-click recalibration: queued in step 4 for a finished run, refused in flight
    early = act("rerun", calibration="EcalPedestals", run=str(in_flight), reason="too early")
    assert early.status_code == 409 and "needs it finished" in early.text
    rerun = act("rerun", calibration="EcalPedestals", run=str(NEWEST_DONE), reason="new gains")
    assert rerun.status_code == 200 and "rerun of run" in rerun.text and "step4" in rerun.text
    done = act("approve", calibration="EcalPedestals", run=str(NEWEST_DONE), reason="ok")
    assert done.status_code == 409 and "only a Rejected run" in done.text
    queue = CommandQueue(room.loop_config.work_dir / "EcalPedestals" / "step4.journal.sqlite")
    try:
        assert [(c.run, c.action) for c in queue.pending()] == [
            (in_flight, "skip"),
            (NEWEST_DONE, "rerun"),
        ]
    finally:
        queue.close()
    audit = _audit(room)
    assert ("shift-operator", "pin", "done", "the second is noisy") in [a[:4] for a in audit]
    assert ("shift-operator", "retry", "refused", "again") in [a[:4] for a in audit]


def test_payload_page_compares_versions_and_flags_channels(room: Room) -> None:
    second = room.versions[1]
    html = requests.get(f"{room.url}/payload/ecal-0001/pedestals", timeout=10).text
    assert f'id="payload-version">{second}<' in html
    assert f"previous <b>{room.versions[0]}</b>" in html
    grid = html.split('id="outside"')[1].split("</table>")[0]
    assert "<td>3</td>" in grid and "pedestal shift 40.0" in grid and "noise outside" in grid
    assert grid.count('class="bad"') == 1
    png = requests.get(f"{room.url}/plot/ecal-0001/pedestals/{second}.png", timeout=30)
    assert png.headers["content-type"] == "image/png"
    pixels = image.imread(io.BytesIO(png.content), format="png")
    assert pixels.shape[0] > 100 and float(pixels.std()) > 0.01  # decoded, not blank
    unknown = requests.get(f"{room.url}/payload/ecal-0001/nosuchtype", timeout=10)
    assert unknown.status_code == 404


def test_plot_command_writes_png_and_svg(room: Room, tmp_path: Path) -> None:
    png, svg = tmp_path / "ped.png", tmp_path / "ped.svg"
    config = ["--config", str(room.loop_yaml)]
    result = run_cli("plot", "ecal-0001", "pedestals", "--out", str(png), *config)
    assert result.returncode == 0, result.stderr
    assert room.versions[1] in result.stdout and "1 channel(s) outside" in result.stdout
    assert float(image.imread(png).std()) > 0.01
    first = room.versions[0]
    result = run_cli(
        "plot", "ecal-0001", "pedestals", "--version", first, "--out", str(svg), *config
    )
    assert result.returncode == 0, result.stderr
    assert b"<svg" in svg.read_bytes()[:2000]
    bad = run_cli("plot", "ecal-0001", "pedestals", "--out", str(tmp_path / "x.gif"), *config)
    assert bad.returncode == 2 and ".png or .svg" in bad.stderr


def test_operator_role_tokens_are_made_by_the_cli_and_write_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'conddb.sqlite'}"
    ConditionsDatabase(url).create_schema()
    created = run_cli(
        "conddb",
        "--db",
        url,
        "token",
        "create",
        "--user",
        "op",
        "--tags",
        "*",
        "--role",
        "operator",
    )
    assert created.returncode == 0, created.stderr
    database = ConditionsDatabase(url)
    try:
        identity = database.authenticate(created.stdout.strip())
    finally:
        database.close()
    assert identity is not None and identity.role == "operator"
    with pytest.raises(Forbidden, match="operator"):
        check_tags(identity, ["AnyTag"])
    check_tags(Identity("loop", "uploader", ("*",), 1), ["AnyTag"])  # unchanged for others


def test_front_end_is_served_from_the_package(room: Room) -> None:
    for asset in ("vendor/htmx.min.js", "vendor/htmx-ext-sse.js", "style.css"):
        response = requests.get(f"{room.url}/static/{asset}", timeout=10)
        assert response.status_code == 200 and len(response.content) > 500
    for template in TEMPLATES.glob("*.html"):  # nothing fetched from elsewhere at run time
        text = template.read_text()
        assert 'src="http' not in text and 'href="http' not in text, template
    assert json.loads(requests.get(room.url + "/healthz", timeout=10).text)["ok"] is True
