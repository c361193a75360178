"""The placeholders of a flow: `{inputs.path}`, `{steps.reduce.result.value}`, `{trigger.name}`,
`{item}`, `{steps.scan.result.files[0]}`. A reference is a dotted path of names and integer
indices into the run's context, and nothing else: no operators, no calls, no eval, so a flow
file can never run code in the server.

A string that is exactly one placeholder takes the referenced value with its type (a number
stays a number, a list a list); placeholders inside a longer string are formatted into it.
`{{` and `}}` are literal braces.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from ground.errors import InvalidInput

ROOTS = ("inputs", "steps", "trigger", "item", "index", "run")
_NAME = r"[A-Za-z_][A-Za-z0-9_-]*"
_PATH = re.compile(rf"^{_NAME}(?:\.{_NAME}|\[\d+\])*$")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_PART = re.compile(rf"\.?({_NAME})|\[(\d+)\]")


class Missing(LookupError):
    """A reference to something the context does not hold (yet)."""


def parse_path(text: str, field: str) -> list[str | int]:
    """`steps.fit.result.value` -> ["steps", "fit", "result", "value"]; InvalidInput naming
    `field` when it is not a plain reference."""
    ref = text.strip()
    if not _PATH.match(ref):
        raise InvalidInput(
            f"{{{text}}} is not a reference: expected a dotted path such as "
            "{steps.<step>.result.<field>} or {inputs.<name>} (no operators or calls)",
            field=field,
        )
    parts: list[str | int] = [
        m.group(1) if m.group(1) is not None else int(m.group(2)) for m in _PART.finditer(ref)
    ]
    if parts[0] not in ROOTS:
        raise InvalidInput(
            f"{{{text}}} starts with {parts[0]!r}; a reference starts with one of "
            + ", ".join(ROOTS),
            field=field,
        )
    return parts


def references(value: Any, field: str) -> Iterator[tuple[str, list[str | int]]]:
    """(where, reference) for every reference in a (nested) value, where naming `field` and
    the key below it."""
    if isinstance(value, str):
        for m in _PLACEHOLDER.finditer(value):
            if m.group(1) is not None:
                yield field, parse_path(m.group(1), field)
        unmatched = _PLACEHOLDER.sub("", value)
        if "{" in unmatched or "}" in unmatched:
            raise InvalidInput(
                f"unbalanced brace in {value!r} (write {{{{ or }}}} for a literal one)",
                field=field,
            )
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from references(v, f"{field}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from references(v, f"{field}[{i}]")


def lookup(context: Mapping[str, Any], path: list[str | int]) -> Any:
    here: Any = context
    for i, part in enumerate(path):
        where = _show(path[: i + 1])
        if isinstance(part, int):
            if not isinstance(here, list) or not -len(here) <= part < len(here):
                raise Missing(f"{where}: no such index")
            here = here[part]
        else:
            if not isinstance(here, Mapping) or part not in here:
                raise Missing(f"{where}: not set")
            here = here[part]
    return here


def _show(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + part
    return out


def render(value: Any, context: Mapping[str, Any]) -> Any:
    """`value` with every placeholder replaced from `context` (raises Missing)."""
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value)
        if whole is not None and whole.group(1) is not None:
            return lookup(context, parse_path(whole.group(1), "value"))

        def one(m: re.Match[str]) -> str:
            if m.group(1) is None:
                return m.group(0)[0]
            got = lookup(context, parse_path(m.group(1), "value"))
            return got if isinstance(got, str) else json.dumps(got)

        return _PLACEHOLDER.sub(one, value)
    if isinstance(value, Mapping):
        return {k: render(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, context) for v in value]
    return value
