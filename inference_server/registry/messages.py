"""Registry errors in an operator's words: the key path, what it must be, and what the file says.

pydantic's own texts name internal classes ("instance of FamilySpec") and link to its docs; these
keep its meaning and drop both."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

_MESSAGES = {
    "missing": "required key",
    "extra_forbidden": "unknown key",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "typed_dict_type": "must be a table",
    "list_type": "must be an array",
    "tuple_type": "must be an array",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_too_short": "must not be empty",
    "too_short": "must not be empty",
}
_BOUNDS = {
    "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be less than {lt}",
    "less_than_equal": "must be at most {le}",
}
_QUIET = {"missing", "extra_forbidden", "string_too_short", "too_short"}  # the value adds nothing
_SHOW_INPUT = {*_MESSAGES, *_BOUNDS, "literal_error", "enum"} - _QUIET


def key_error(key: str, message: str) -> PydanticCustomError:
    """A check across fields, reported at ``key`` below the table whose validator raised it."""
    return PydanticCustomError("registry_key", "{message}", {"key": key, "message": message})


def rule_error(message: str, **values: Any) -> PydanticCustomError:
    """A value that breaks a rule of ours; ``message`` may name ``values`` as ``{name}``."""
    return PydanticCustomError("registry_rule", message, values)


def describe(exc: ValidationError) -> list[str]:
    """One line per problem: ``families.sd15.models[0].dtype: must be one of ... (got 'int8')``."""
    lines = []
    for err in exc.errors(include_url=False):
        loc: list[Any] = list(err["loc"])
        kind, ctx = err["type"], err.get("ctx") or {}
        if loc and loc[-1] == "[key]":  # a table's key (a family name) broke its rule
            loc.pop()
        if kind == "registry_key":
            loc.append(ctx["key"])
        if kind in ("literal_error", "enum"):
            message = f"must be one of {ctx['expected']}"
        elif kind in _BOUNDS:
            message = _BOUNDS[kind].format(**ctx)
        else:
            message = _MESSAGES.get(kind, err["msg"])
        value = err.get("input")
        if kind in _SHOW_INPUT and isinstance(value, str | int | float):
            message += f" (got {value!r})"
        lines.append(f"{_path(loc)}: {message}" if loc else message)
    return lines


def _path(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        text = str(part)
        if isinstance(part, int):
            out += f"[{part}]"
        elif text.startswith("[") or not out:
            out += text
        else:
            out += f".{text}"
    return out
