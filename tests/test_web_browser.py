"""The control room in a real browser (headless Chromium driven by Selenium) against a
live loop: registry, six daemons, a one-run scenario and ``calloop web``, each its own
process. Every page the tests visit is saved as a screenshot under
``$CALLOOP_ARTIFACTS/web`` (default ``tests/artifacts/web``).

The tests run in order on one loop (module scope): the overview follows the run to its
final state, then the run page, the payload pages, the browsers and the actions look at
what it produced.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.support.wait import WebDriverWait

from loop.store import CalibStore
from tests.conftest import require
from tests.web_loop import (
    RUN,
    LiveLoop,
    chrome,
    chromedriver_binary,
    chromium_binary,
    quit_chrome,
    screenshot,
    start_live_loop,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveLoop]:
    """The live loop, with the control room serving it."""
    loop = start_live_loop(tmp_path_factory.mktemp("web"))
    yield loop
    codes = loop.stop()
    assert all(code == 0 for name, code in codes.items() if name != "player"), codes


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module."""
    hint = "apt-get install chromium chromium-driver (tests/run.sh does it as root)"
    require("Chromium", chromium_binary() is not None, hint)
    require("chromedriver", chromedriver_binary() is not None, hint)
    driver = chrome()
    yield driver
    quit_chrome(driver)


def _text(driver: Any, element_id: str) -> str:
    """The element's text ("" when absent), read in one script: a live swap replaces
    elements, so a reference held across two calls may be gone."""
    text = driver.execute_script(
        "const e = document.getElementById(arguments[0]); return e ? e.innerText : '';",
        element_id,
    )
    return str(text)


def _texts(driver: Any, selector: str) -> list[str]:
    """The texts of every element matching ``selector``, read in one script."""
    texts = driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText);",
        selector,
    )
    return [str(t) for t in texts]


def _submit(driver: Any, form_id: str, reason: str) -> None:
    """Fill in the form's reason, submit it and wait for the answer page to replace it
    (``click`` returns before the navigation: reading at once would read the old page)."""
    form = driver.find_element("id", form_id)
    form.find_element("name", "reason").send_keys(reason)
    _click_and_wait(driver, form.find_element("css selector", "button[type=submit]"))


def _click_and_wait(driver: Any, button: Any) -> None:
    """Click a form's button and wait until the answer page has replaced the form's and
    loaded: the old page carries a mark that a navigation wipes. (Selenium's
    ``staleness_of`` may hit a node while Chromium detaches it, an "unknown error".)"""
    driver.execute_script("window.calloopOldPage = true")
    button.click()
    WebDriverWait(driver, 30, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script(
            "return window.calloopOldPage === undefined && document.readyState === 'complete'"
        )
    )


def test_overview_follows_a_run_to_its_final_state_without_reload(
    browser: Any, live: LiveLoop
) -> None:
    browser.get(live.web_url + "/")
    for name, label in (("EcalPedestals", "ECAL pedestals"), ("SiStripBad", "SiStrip bad")):
        card = _text(browser, f"cal-{name}")
        assert label in card and "Expert:" in card
        for step in ("step2", "step3", "step4"):
            wait_for(
                lambda n=name, s=step: "running" in _text(browser, f"daemon-{n}-{s}"),
                60,
                f"{name} {step} shown running",
            )
    browser.execute_script("window.calloopMarker = 'no reload'")
    live.play(speed=10)
    # in flight first, then the final state: both arrive through the event stream
    wait_for(lambda: _text(browser, f"run-EcalPedestals-{RUN}"), 90, "the run listed as in flight")
    for name in ("EcalPedestals", "SiStripBad"):
        wait_for(
            lambda name=name: "Done" in _text(browser, f"last-{name}"),
            180,
            f"run {RUN} Done in step 4 of {name} on the overview",
        )
        assert str(RUN) in _text(browser, f"last-{name}")
        assert "passed" in _text(browser, f"last-{name}")
        assert str(RUN) in _text(browser, f"last-ok-{name}")
    assert browser.execute_script("return window.calloopMarker") == "no reload"
    screenshot(browser, "overview")


def test_run_page_shows_the_history_of_every_step(browser: Any, live: LiveLoop) -> None:
    browser.get(f"{live.web_url}/runs/EcalPedestals/{RUN}")
    for step, final in (("step2", "Done"), ("step3", "Done"), ("step4", "Done")):
        assert _text(browser, f"state-{step}") == final
        entries = _texts(browser, f"#history-{step} li")
        assert len(entries) >= 3, f"{step}: {entries}"
        assert entries[-1].startswith(final)
    jobs = _texts(browser, "#step-step2 table.jobs tr")
    assert len(jobs) >= 2  # header + at least one job
    assert "succeeded" in jobs[1]
    assert _text(browser, "version-step4").startswith("v")
    screenshot(browser, "run")


def _plot_is_drawn(browser: Any) -> dict[str, int]:
    """The plot image as the browser decoded it: its size and how many distinct
    colours a sample of its pixels has (a blank image has one)."""
    return browser.execute_script(
        """
        const img = document.getElementById('payload-plot');
        if (!img.complete || img.naturalWidth === 0) { return {width: 0, colours: 0}; }
        const canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        const ctx = canvas.getContext('2d');
        ctx.drawImage(img, 0, 0);
        const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
        const colours = new Set();
        for (let i = 0; i < data.length; i += 4 * 97) {
            colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
        }
        return {width: img.naturalWidth, colours: colours.size};
        """
    )


@pytest.mark.parametrize(
    ("detector", "ctype", "name"),
    [("ecal-0001", "pedestals", "pedestals"), ("sistrip-0001", "bad_channels", "bad_channels")],
)
def test_payload_page_shows_a_decoded_plot(
    browser: Any, live: LiveLoop, detector: str, ctype: str, name: str
) -> None:
    browser.get(f"{live.web_url}/payload/{detector}/{ctype}")
    drawn = wait_for(
        lambda: (d := _plot_is_drawn(browser))["width"] > 0 and d, 30, "the plot decoded"
    )
    assert drawn["colours"] > 5, drawn
    checks = browser.find_element("id", "checks").text
    assert "events" in checks and "bad-channel fraction" in checks
    outside = _texts(browser, "#outside tr.bad")
    assert outside, "the simulated detector has bad channels: the grid must list them"
    version = _text(browser, "payload-version")
    svg = requests.get(f"{live.web_url}/plot/{detector}/{ctype}/{version}.svg", timeout=30)
    assert svg.headers["content-type"].startswith("image/svg+xml")
    assert b"<svg" in svg.content[:1000]
    screenshot(browser, f"payload_{name}")


def test_store_and_conditions_db_browsers(browser: Any, live: LiveLoop) -> None:
    browser.get(f"{live.web_url}/store")
    assert "ecal-0001" in _text(browser, "detectors")
    browser.get(f"{live.web_url}/store/ecal-0001")
    assert "pedestals" in browser.page_source
    screenshot(browser, "store")
    browser.get(f"{live.web_url}/conddb")
    assert "EcalPedestals_prompt_v1" in _text(browser, "tags")
    browser.get(f"{live.web_url}/conddb/tags/EcalPedestals_prompt_v1")
    assert str(RUN) in _text(browser, "iovs")
    screenshot(browser, "conddb")


def test_an_action_needs_an_operator_token_and_is_audited(browser: Any, live: LiveLoop) -> None:
    page = f"{live.web_url}/payload/ecal-0001/pedestals"
    browser.get(page)
    version = _text(browser, "payload-version")
    _submit(browser, "form-pin", "approved by the shift")  # nobody logged in
    assert _text(browser, "result-title") == "Refused"
    assert "log in" in _text(browser, "result")
    screenshot(browser, "action_refused")

    browser.get(f"{live.web_url}/login?next=/payload/ecal-0001/pedestals")
    browser.find_element("id", "token").send_keys(live.uploader_token)
    _click_and_wait(browser, browser.find_element("css selector", "#login-form button"))
    assert "not a valid operator" in _text(browser, "login-error")

    browser.find_element("id", "token").send_keys(live.operator_token)
    _click_and_wait(browser, browser.find_element("css selector", "#login-form button"))
    wait_for(lambda: "shift-operator" in _text(browser, "logged-in"), 10, "logged in")
    _submit(browser, "form-pin", "approved by the shift")
    assert _text(browser, "result-title") == "Done", _text(browser, "result")
    screenshot(browser, "action_done")
    store = CalibStore(live.loop_config.store_root)
    try:
        detector = store.detector("ecal-0001")
        pinned = [v for v in detector.versions("pedestals") if v.is_default]
        history = detector.history("pedestals")
    finally:
        store.close()
    assert [v.version for v in pinned] == [version]
    assert any("[web: shift-operator]" in h.text for h in history)

    browser.get(f"{live.web_url}/audit")
    rows = _texts(browser, "#audit tr")[1:]
    assert any("(anonymous)" in r and "pin" in r and "refused" in r for r in rows), rows
    assert any(
        "shift-operator" in r and "pin" in r and "done" in r and "approved by the shift" in r
        for r in rows
    ), rows
    screenshot(browser, "audit")


def test_run_control_from_the_run_page_reaches_the_daemons(browser: Any, live: LiveLoop) -> None:
    """Logged in (previous test): a skip of a run no step has seen is queued in every
    step's journal and acknowledged by the running daemons; the page shows it live."""
    run = RUN + 49
    browser.get(f"{live.web_url}/runs/EcalPedestals/{run}")
    assert _text(browser, "run-unknown")
    browser.execute_script("window.calloopMarker = 'no reload'")
    _submit(browser, "form-skip", "beam test, not for calibration")
    assert _text(browser, "result-title") == "Done", _text(browser, "result")
    browser.get(f"{live.web_url}/runs/EcalPedestals/{run}")
    for step in ("step2", "step3", "step4"):
        wait_for(lambda s=step: _text(browser, f"state-{s}") == "Skipped", 60, f"{step} skip")
    assert all("done" in table for table in _texts(browser, "table.commands"))
    screenshot(browser, "run_skipped")


def test_refresh_configuration_signals_the_daemons(browser: Any, live: LiveLoop) -> None:
    browser.get(live.web_url + "/")
    _submit(browser, "form-reload", "new thresholds")
    assert _text(browser, "result-title") == "Done", _text(browser, "result")
    assert "SIGHUP sent to" in _text(browser, "result")
    assert "EcalPedestals/step2" in _text(browser, "result")
    log = Path(live.loop_config.log_dir) / "EcalPedestals" / "step2_INFO.log"
    wait_for(lambda: "configuration reloaded" in log.read_text(), 30, "the daemon reloaded")


def test_one_click_recalibration_of_a_finished_run(browser: Any, live: LiveLoop) -> None:
    """Logged in: "Recalibrate" on the page of the finished run makes step 4 harvest it
    again; the page follows it live back to Done, and a new store version appears."""

    def versions() -> list[str]:
        store = CalibStore(live.loop_config.store_root)
        try:
            return [v.version for v in store.detector("ecal-0001").versions("pedestals")]
        finally:
            store.close()

    before = versions()
    browser.get(f"{live.web_url}/runs/EcalPedestals/{RUN}")
    _submit(browser, "form-rerun", "recalibrate with the new thresholds")
    assert _text(browser, "result-title") == "Done", _text(browser, "result")
    browser.get(f"{live.web_url}/runs/EcalPedestals/{RUN}")
    wait_for(lambda: len(versions()) == len(before) + 1, 90, "a new version stored")
    wait_for(lambda: _text(browser, "state-step4") == "Done", 90, "step 4 Done again")
    assert any("rerun" in t and "done" in t for t in _texts(browser, "table.commands"))
    screenshot(browser, "run_recalibrated")
