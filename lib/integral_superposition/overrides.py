"""Dotted ``NAME=VALUE`` overrides (``--set``, ``--param``) and one-line validation messages,
shared by the config loaders, the ``isup`` command line and the SAE launcher."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from integral_superposition.experiment_sections import ConfigError

__all__ = ["apply_overrides", "describe_errors", "params_from_overrides"]

M = TypeVar("M", bound=BaseModel)


def describe_errors(e: ValidationError, prefix: str = "") -> str:
    """A validation error as one line per field: ``loc: message (got value)``, the value left
    out where the message names it already (``k=0: expected ...``); ``prefix`` goes before
    every location (``sae`` for a section checked on its own)."""
    lines = []
    for err in e.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        if prefix:
            loc = f"{prefix}.{loc}" if loc else prefix
        msg = err["msg"].removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        got = err.get("input")
        field = str(err["loc"][-1]) if err["loc"] else ""
        # a message that starts with "field=value" names the value already
        named = bool(field) and msg.startswith(f"{field}=")
        shown = "" if named or isinstance(got, dict | list) or got is None else f" (got {got!r})"
        lines.append(f"{loc}: {msg}{shown}" if loc else msg)
    return "; ".join(lines)


def apply_overrides(
    data: Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any]
) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML: ``sae.k=4096``,
    ``sweep.k=[512,1024]``, ``data.label_col=null``) to a raw config mapping."""
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        for o in overrides:
            if "=" not in o:
                raise ConfigError(f"override {o!r}: expected key.path=value")
            key, raw = o.split("=", 1)
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
            items.append((key.strip(), value))
    out = json.loads(json.dumps(dict(data), default=str))
    for key, value in items:
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {key!r}: empty path component")
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def params_from_overrides(model: type[M], overrides: Sequence[str] | Mapping[str, Any]) -> M:
    """A step's parameter model (``AnalysisParams``, ``ReportOptions``, ...) from ``NAME=VALUE``
    overrides (``--param``; values parsed as YAML, dotted names for nested fields); raises
    :class:`ConfigError` naming each bad field and its value."""
    data = apply_overrides({}, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid {model.__name__}: {describe_errors(e)}") from None
