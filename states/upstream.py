"""Steps 3 and 4: inputs are the upstream step's witnesses, verified on arrival.

A witness is taken only if it speaks for the run, step and batch its location says,
its outputs lie inside that job's directory and match their SHA-256; otherwise that
input is recorded bad (one ERROR) and the run completes without it. The verified
output paths are kept in the journal, so a witness deleted later changes nothing. A run
ends when the upstream marker is in and every witness it lists was taken or refused;
the marker carries each witness in full, so a witness file that never arrived (or was
deleted or damaged) is recovered from it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import ClassVar

from loop.journal import NewInput
from loop.witness import (
    WITNESS_SUFFIX,
    Witness,
    WitnessError,
    read_marker,
    read_witness,
    verify_witness,
)
from states.machine import Facts
from states.step import Step


class FollowsUpstream(Step):
    """The common logic of steps 3 and 4."""

    upstream: ClassVar[str]
    upstream_marker: ClassVar[str]

    def watch_roots(self) -> list[Path]:
        return [self.cal_dir]

    def accept(self, path: Path) -> bool:
        return path.parent.name == self.upstream and (
            path.name.endswith(WITNESS_SUFFIX) or path.name == self.upstream_marker
        )

    def _run_of(self, path: Path) -> int | None:
        name = path.parent.parent.name
        return int(name[3:]) if name.startswith("run") and name[3:].isdigit() else None

    def ingest(self, path: Path) -> None:
        run = self._run_of(path)
        if run is None:
            return
        if path.name == self.upstream_marker:
            self._ingest_marker(run, path)
        else:
            self._ingest_witness(run, path)

    def _ingest_marker(self, run: int, path: Path) -> None:
        try:
            marker = read_marker(path)
        except WitnessError as exc:
            self.log.error(
                "unusable upstream marker; waiting for a valid one", run=run, error=str(exc)
            )
            return
        if self.track(run) is None:
            return
        for witness_path, content in marker.witnesses.items():
            self._ingest_witness(run, Path(witness_path), fallback=content)
        self.journal.update_info(
            run,
            upstream_witnesses=list(marker.witnesses),
            upstream_failed=marker.failed_batches,
            upstream_bad=marker.bad_inputs,
        )

    def _ingest_witness(self, run: int, path: Path, fallback: Witness | None = None) -> None:
        name = str(path)
        if self.journal.has_input(run, name):
            return  # taken (or refused) already: events and scans repeat
        if self.track(run) is None:
            self.log.warning(
                "witness arrived for a run already closed; ignored", run=run, witness=name
            )
            return
        try:
            witness = read_witness(path)
        except WitnessError as exc:
            if fallback is None:
                self.log.error("unusable upstream witness; waiting for the marker", error=str(exc))
                return
            self.log.warning(
                "upstream witness file missing or damaged; taken from the upstream marker",
                run=run,
                witness=name,
                error=str(exc),
            )
            witness = fallback
        try:
            outputs = verify_witness(path, witness, run=run, step=self.upstream)
        except WitnessError as exc:
            self.journal.add_inputs(run, [NewInput(name, bad=str(exc))], self.clock())
            self.log.error(
                "upstream witness refused; the run continues without it",
                run=run,
                witness=name,
                reason=str(exc),
            )
            return
        self.journal.add_inputs(run, [NewInput(name, meta={"outputs": outputs})], self.clock())

    def startup_scan(self) -> None:
        if not self.cal_dir.is_dir():
            return
        closed = {run for run, _ in self.journal.all_runs()} - set(self.models)
        for run_dir in sorted(self.cal_dir.glob("run*")):
            run = self._run_of(run_dir / "x" / "y")
            if run is None or run in closed:
                continue
            upstream = run_dir / self.upstream
            found = self.watcher.scan(upstream, f"*{WITNESS_SUFFIX}")
            marker = upstream / self.upstream_marker
            for path in sorted(found) + ([marker] if marker.exists() else []):
                self.ingest_isolated(path)

    def upstream_ended(self, run: int) -> bool:
        """The upstream marker is in and every witness it lists was taken or refused."""
        record = self.journal.info(run)
        if record.upstream_complete:
            return True
        listed = record.upstream_witnesses
        if listed is None or not all(self.journal.has_input(run, name) for name in listed):
            return False
        self.journal.update_info(run, upstream_complete=True)  # checked once, remembered
        return True

    def input_paths(self, run: int, inputs: list[str]) -> list[str]:
        paths: list[str] = []
        for name in inputs:
            meta = self.journal.input_meta(run, name)
            paths.extend(meta.get("outputs", []) if meta else [])
        return paths

    def facts(self, run: int, now: float) -> Facts:
        return replace(super().facts(run, now), ended=self.upstream_ended(run))

    def end_reason(self, run: int) -> str:
        failed = self.journal.info(run).upstream_failed
        return f"{self.upstream} complete" + (
            f" (upstream gave up batches {failed})" if failed else ""
        )
