"""``config/REFERENCE.md``: every configuration key, generated from the models.

The reference is built from the pydantic models of :mod:`loop.config` (type, bounds,
default, ``description=``) and the live-key lists of :mod:`loop.reload`, so it cannot
drift from what is validated; a test fails when the committed file differs from
:func:`reference_markdown` and names :data:`REFRESH_COMMAND`.
"""

from __future__ import annotations

import inspect
import json
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from loop.config import CalibrationConfig, LoopConfig
from loop.reload import LIVE_CALIBRATION_KEYS, LIVE_LOOP_KEYS, restart_keys
from workers.kinds import builtin_kinds, get_kind

REFERENCE_PATH = Path(__file__).resolve().parent.parent / "config" / "REFERENCE.md"
REFRESH_COMMAND = "calloop config reference --write"

FILES: tuple[tuple[str, type[BaseModel], tuple[str, ...]], ...] = (
    ("loop.yaml", LoopConfig, LIVE_LOOP_KEYS),
    ("calibrations/<Name>.yaml", CalibrationConfig, LIVE_CALIBRATION_KEYS),
)
"""Each configuration file: its name, its model and the keys SIGHUP applies live."""

HEADER = f"""\
# Configuration reference

<!-- Generated from loop/config.py and loop/reload.py by `{REFRESH_COMMAND}`; do not edit. -->

Every key of `config/loop.yaml` and of a `config/calibrations/<Name>.yaml`. Unknown keys
are errors. `calloop config check` validates the files, `calloop config show` prints the
effective values (defaults resolved) and `calloop config schema` a JSON Schema.

**Live**: `yes` means `kill -HUP <pid>` applies a change at once; `no` means it needs a
restart (a reload that changes it is refused as a whole); `partly`: some keys of the
section are live.
"""

SCALARS: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
    type(None): "null",
    Any: "any",
}
BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


@dataclass(frozen=True)
class Key:
    """One row of the reference."""

    path: str
    type: str
    default: str
    live: str
    description: str

    def row(self) -> str:
        """The Markdown table row."""
        # "|" would end the cell; "<raw_root>" would be read as an HTML tag
        description = self.description.replace("<", "\\<")
        cells = (f"`{self.path}`", self.type, self.default, self.live, description)
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def reference_markdown() -> str:
    """The whole of ``config/REFERENCE.md``."""
    parts = [HEADER]
    for title, model, live in FILES:
        parts.append(f"## `{title}`\n\n{_summary(model)}\n")
        parts.append("| Key | Type | Default | Live | Description |\n|---|---|---|---|---|")
        parts.extend(key.row() for key in keys(model, live))
        parts.append("")
    parts.extend(_kind_sections())
    return "\n".join(parts)


def _kind_sections() -> Iterator[str]:
    """The built-in calibration kinds: their payload and their ``parameters`` keys."""
    yield "## Built-in calibration kinds (`kind:`)\n"
    yield (
        "Other kinds come from installed plug-ins (entry-point group `calloop.kinds`, API in "
        "`workers/kinds/base.py`); `calloop calibrations show <Name>` describes any.\n"
    )
    for name in builtin_kinds():
        kind = get_kind(name)
        schema = kind.schema
        yield f"### `kind: {name}`\n\n{_summary(type(kind))}\n"
        yield f"Payload: `{schema.dtype}` `{schema.shape}`, {schema.description}.\n"
        yield "| Key | Type | Default | Live | Description |\n|---|---|---|---|---|"
        yield from (k.row() for k in keys(kind.Parameters, LIVE_CALIBRATION_KEYS, "parameters."))
        yield ""


def keys(model: type[BaseModel], live: tuple[str, ...], prefix: str = "") -> Iterator[Key]:
    """Every key of ``model``, depth first, as dotted paths below ``prefix``."""
    for name, field in model.model_fields.items():
        path = prefix + name
        section = _section(field.annotation)
        children = list(keys(section, live, path + ".")) if section else []
        yield Key(
            path,
            _type(field),
            _default(field, section),
            _liveness(path, live, children),
            " ".join(filter(None, [_summary(section) if section else "", field.description])),
        )
        yield from children


def _liveness(path: str, live: tuple[str, ...], children: list[Key]) -> str:
    mine = "no" if restart_keys([path], live) else "yes"
    if children and any(child.live != mine for child in children):
        return "partly"  # e.g. a live section with restart-only keys, or the reverse
    return mine


def _section(annotation: Any) -> type[BaseModel] | None:
    """The model of a section key (``Histogram | None`` included), else None."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _summary(model: type) -> str:
    return inspect.cleandoc(model.__doc__ or "").split("\n\n")[0].replace("\n", " ")


def _type(field: FieldInfo) -> str:
    bounds = []
    for item in field.metadata:
        bounds += [f"{sign} {getattr(item, a)}" for a, sign in BOUNDS if hasattr(item, a)]
        if getattr(item, "min_length", None) == 1:
            bounds.append("non-empty")
        if getattr(item, "pattern", None):
            bounds.append(f"matching `{item.pattern}`")
    return ", ".join([_type_name(field.annotation), *bounds])


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}"
    if origin is tuple:  # a fixed-length list, e.g. a [min, max] range
        return f"[{', '.join(_type_name(arg) for arg in args)}]"
    if origin is Literal:
        return " | ".join(json.dumps(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    return "section" if _section(annotation) else SCALARS[annotation]


def _default(field: FieldInfo, section: type[BaseModel] | None) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if section and value is not None:
        return ""  # the defaults are those of the keys below
    return f"`{json.dumps(to_jsonable_python(value))}`"
