"""The registry client against the real simulated server on loopback, faults included."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from loop.errors import RegistryError
from loop.registry import RegistryClient, iso
from loop.sim.registry_server import QueryError, RegistryServer, apply_query
from loop.sim.state import RegistryState

NOW = datetime.now(UTC)


def _state(runs: int = 5, faults: list[dict[str, object]] | None = None) -> RegistryState:
    state = RegistryState()
    for i in range(runs):
        number = 1000 + i
        start = NOW - timedelta(minutes=10 * (runs - i))
        state.runs[str(number)] = {
            "run_number": number,
            "start_time": iso(start),
            "end_time": iso(start + timedelta(minutes=5)) if i < runs - 1 else None,
            "run_type": "cosmics" if i == 1 else "collisions",
            "stable_beam": i != 2,
            "last_lumisection_number": 3,
        }
        state.lumisections[str(number)] = [
            {
                "run_number": number,
                "lumisection_number": ls,
                "start_time": iso(start),
                "end_time": iso(start),
            }
            for ls in (1, 2, 3)
        ]
    state.faults = faults or []
    return state


def _client(server: RegistryServer, **kwargs: float) -> RegistryClient:
    options = {"timeout_s": 2.0, "attempts": 2, "backoff_s": 0.01, **kwargs}
    return RegistryClient(server.url, page_size=2, **options)  # type: ignore[arg-type]


def _save(server: RegistryServer, state: RegistryState) -> None:
    state.save(server.cache.path)


def test_lists_runs_over_all_pages(registry: RegistryServer) -> None:
    _save(registry, _state())
    with _client(registry) as client:
        runs = client.runs(NOW - timedelta(hours=8))
    assert [r.run_number for r in runs] == [1004, 1003, 1002, 1001, 1000]
    assert not runs[0].ended and runs[1].ended
    assert runs[3].run_type == "cosmics" and not runs[2].stable_beam


def test_filters_by_start_time_and_type(registry: RegistryServer) -> None:
    _save(registry, _state())
    with _client(registry) as client:
        recent = client.runs(NOW - timedelta(minutes=25))
        assert [r.run_number for r in recent] == [1004, 1003]
        cosmics = client.runs(NOW - timedelta(hours=1), run_types=["cosmics"])
        assert [r.run_number for r in cosmics] == [1001]


def test_single_run_and_lumisections(registry: RegistryServer) -> None:
    _save(registry, _state())
    with _client(registry) as client:
        assert client.run(1002).run_number == 1002
        assert [ls.lumisection_number for ls in client.lumisections(1003)] == [1, 2, 3]
        with pytest.raises(RegistryError, match="HTTP 404"):
            client.run(99)


def _fault(kind: str, seconds: float = 30.0, **extra: object) -> dict[str, object]:
    return {"kind": kind, "start": time.time() - 1, "end": time.time() + seconds, **extra}


FAULTS = {
    "503": ({"kind": "http_error", "status": 503}, "HTTP 503"),
    "500": ({"kind": "http_error", "status": 500}, "HTTP 500"),
    "malformed": ({"kind": "malformed"}, "malformed JSON"),
    "bad_schema": ({"kind": "bad_schema"}, "violates the schema"),
    "refused": ({"kind": "refuse"}, "cannot connect"),
    "timeout": ({"kind": "timeout", "seconds": 3.0}, "no answer within"),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_every_fault_is_a_registry_error(registry: RegistryServer, name: str) -> None:
    spec, message = FAULTS[name]
    kind = str(spec["kind"])
    extra = {k: v for k, v in spec.items() if k not in ("kind", "seconds")}
    _save(registry, _state(faults=[_fault(kind, float(spec.get("seconds", 30.0)), **extra)]))
    time.sleep(0.2)  # let the serving loop notice a refuse fault
    with _client(registry, timeout_s=0.5) as client:
        with pytest.raises(RegistryError, match=message) as info:
            client.runs(NOW - timedelta(hours=8))
        assert registry.url in str(info.value)
        if name != "bad_schema":  # transport faults are retried; a wrong schema is not
            assert "after 2 attempts" in str(info.value)
        with pytest.raises(RegistryError):
            client.run(1004)  # the open run is never reported as ended during a fault


def test_client_recovers_after_fault_window(registry: RegistryServer) -> None:
    _save(registry, _state(faults=[_fault("refuse", seconds=0.6)]))
    time.sleep(0.2)
    with _client(registry) as client:
        with pytest.raises(RegistryError):
            client.runs(NOW - timedelta(hours=8))
        time.sleep(0.8)
        run = client.run(1004)
    assert run.run_number == 1004 and not run.ended


def test_retries_through_a_short_outage(registry: RegistryServer) -> None:
    _save(registry, _state(faults=[_fault("http_error", seconds=0.3, status=503)]))
    with _client(registry, attempts=4, backoff_s=0.2) as client:
        assert len(client.runs(NOW - timedelta(hours=8))) == 5


def test_invalid_attribute_values_are_schema_errors(registry: RegistryServer) -> None:
    state = _state()
    state.runs["1004"]["run_number"] = -3
    _save(registry, state)
    with _client(registry) as client, pytest.raises(RegistryError, match="run_number"):
        client.runs(NOW - timedelta(hours=8))


def test_server_rejects_bad_query_with_400(registry: RegistryServer) -> None:
    _save(registry, _state())
    response = requests.get(
        f"{registry.url}/api/v1/runs", params={"filter[run_number][XX]": "1"}, timeout=5
    )
    assert response.status_code == 400 and "operator" in response.text


def test_apply_query_pure() -> None:
    items = [{"n": i, "t": "x" if i % 2 else "y"} for i in range(10)]
    page = apply_query(
        items,
        [
            ("filter[n][GE]", "3"),
            ("filter[t][EQ]", "x"),
            ("sort", "-n"),
            ("page[offset]", "1"),
            ("page[limit]", "2"),
        ],
    )
    assert [item["n"] for item in page] == [7, 5]
    with pytest.raises(QueryError):
        apply_query(items, [("page[limit]", "-1")])


def test_unreachable_registry(tmp_path: Path) -> None:
    client = RegistryClient("http://127.0.0.1:9", timeout_s=0.5, attempts=2, backoff_s=0.01)
    with pytest.raises(RegistryError, match="cannot connect"):
        client.runs(NOW)
