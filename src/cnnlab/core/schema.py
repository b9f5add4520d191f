"""The YAML formats' schemas (tuning spaces, claims, GPU job files): pydantic models that forbid unknown keys, and
their errors as one line naming the file, the field and the bad value."""
from __future__ import annotations

from pathlib import Path
from typing import get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    """A mapping of a YAML file: unknown keys are errors."""
    model_config = ConfigDict(extra="forbid")


def read_yaml(path: str | Path):
    """The parsed YAML of `path`; an unreadable file or a syntax error names the file."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None


def validate(model: type[BaseModel], raw, where: str | Path):
    """`raw` as a `model`; a ValueError `where: field: what is wrong, got VALUE` (every error, `;`-separated)."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ValueError(f"{where}: " + "; ".join(_line(err, model) for err in e.errors())) from None


def _line(err: dict, model: type[BaseModel]) -> str:
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"] if p != "[key]").lstrip(".")
    if err["type"] == "extra_forbidden":
        known = _keys_at(model, err["loc"][:-1])
        return f"{loc}: unknown key" + (f"; known: {known}" if known else "")
    if err["type"] == "missing":
        return f"{loc}: missing"
    what = err["msg"].removeprefix("Value error, ")
    if not loc and err["type"] == "value_error":  # a check of the whole file: its message says what is wrong
        return what
    return f"{loc + ': ' if loc else ''}{what}, got {err['input']!r}"


def _keys_at(model, loc: tuple) -> list[str]:
    """The keys the mapping at `loc` may have (following model fields and dict values), or [] if unknown."""
    for part in loc:
        if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            model = model.model_fields[part].annotation
        elif get_origin(model) is dict:
            model = get_args(model)[1]
        else:
            return []
    return sorted(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
