"""Diagrams of the step machines (transitions' GraphMachine): SVG/PNG via graphviz,
Markdown via Mermaid."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Literal

from transitions.extensions import GraphMachine

from loop.errors import CalloopError
from loop.fsutil import atomic_write_text


class _Diagram:
    """A bare model: the diagram needs states and transitions, not behaviour."""


def draw(step: str, out: Path) -> None:
    """Write the machine of ``step`` to ``out`` (.svg, .png or .md)."""
    module = importlib.import_module(f"states.{step}")
    model_class = getattr(module, f"{step.capitalize()}Run")
    engine: Literal["mermaid", "graphviz"] = "mermaid" if out.suffix == ".md" else "graphviz"
    machine = GraphMachine(
        model=_Diagram(),
        states=model_class.STATES,
        transitions=module.TRANSITIONS,
        initial=next(iter(model_class.STATES)),
        auto_transitions=False,
        show_conditions=True,
        graph_engine=engine,
        title=f"calloop {step}",
    )
    graph = machine.get_graph()
    if engine == "mermaid":
        atomic_write_text(out, f"# calloop {step}\n\n```mermaid\n{graph.draw(None)}\n```\n")
        return
    try:
        graph.draw(str(out), format=out.suffix.lstrip("."), prog="dot")
    except Exception as exc:  # graphviz raises several unrelated types when dot is missing
        raise CalloopError(f"cannot render {out}: {exc} (is graphviz's 'dot' installed?)") from exc
