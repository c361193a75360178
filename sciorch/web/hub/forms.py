"""A launch form generated from a template's parameter schema (JSON Schema): one field per
top-level property, with the HTML5 attributes the schema implies (required, min, max, step,
maxlength, pattern, a select for an enum, a checkbox for a boolean) so the browser checks what
it can; the server checks everything again (the catalogue's validate_parameters, through the
launch operation), and its typed error is shown beside the field it names."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ground.errors import InvalidParameters

PREFIX = "p."  # form names of parameters, so they never collide with event_id, csrf, ...


@dataclass
class FormField:
    name: str  # the parameter
    label: str
    control: str  # input, select, checkbox, textarea
    input_type: str = "text"
    required: bool = False
    attrs: dict[str, str] = field(default_factory=dict)
    choices: list[str] = field(default_factory=list)
    value: str = ""
    description: str = ""
    error: str | None = None

    @property
    def form_name(self) -> str:
        return PREFIX + self.name

    @property
    def dom_id(self) -> str:
        return "param-" + "".join(c if c.isalnum() or c in "_-" else "-" for c in self.name)


def _types(prop: dict[str, Any]) -> tuple[list[str], bool]:
    raw = prop.get("type", "string")
    types = [raw] if isinstance(raw, str) else [str(t) for t in raw]
    nullable = "null" in types
    return [t for t in types if t != "null"] or ["string"], nullable


def shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def fields_for(schema: dict[str, Any], values: dict[str, Any] | None = None) -> list[FormField]:
    required = set(schema.get("required") or [])
    out: list[FormField] = []
    for name, prop in (schema.get("properties") or {}).items():
        if not isinstance(prop, dict):
            continue
        types, nullable = _types(prop)
        kind = types[0]
        given = (values or {}).get(name, prop.get("default"))
        f = FormField(
            name=name,
            label=str(prop.get("title") or name.replace("_", " ")),
            control="input",
            required=name in required and not nullable,
            value=shown(given),
            description=str(prop.get("description") or ""),
        )
        if "enum" in prop:
            f.control = "select"
            f.choices = [shown(c) for c in prop["enum"] if c is not None]
        elif kind == "boolean":
            f.control = "checkbox"
        elif kind in ("number", "integer"):
            f.input_type = "number"
            f.attrs["step"] = "1" if kind == "integer" else "any"
            for key, attr in (("minimum", "min"), ("maximum", "max")):
                if key in prop:
                    f.attrs[attr] = shown(prop[key])
            # exclusive bounds have no HTML5 attribute: the server says it
        elif kind in ("object", "array"):
            f.control = "textarea"
            f.description = (f.description + " (JSON)").strip()
        else:
            for key, attr in (("maxLength", "maxlength"), ("minLength", "minlength")):
                if key in prop:
                    f.attrs[attr] = shown(prop[key])
            if "pattern" in prop:
                f.attrs["pattern"] = str(prop["pattern"])
        out.append(f)
    return out


def parameters_from(schema: dict[str, Any], form: dict[str, str]) -> dict[str, Any]:
    """The submitted fields as typed parameters: numbers as numbers, an empty optional field
    left out (the template's default applies) or null when the schema allows it. A value that
    is not even of its type is an InvalidParameters naming it, as the catalogue would."""
    params: dict[str, Any] = {}
    for name, prop in (schema.get("properties") or {}).items():
        if not isinstance(prop, dict):
            continue
        types, nullable = _types(prop)
        kind = types[0]
        raw = form.get(PREFIX + name)
        if kind == "boolean" and "enum" not in prop:
            params[name] = raw is not None
            continue
        if raw is None or raw == "":
            if nullable:
                params[name] = None
            continue
        params[name] = _typed(name, kind, raw, types)
    return params


def _typed(name: str, kind: str, raw: str, types: list[str]) -> Any:
    where = f"parameters.{name}"
    try:
        if kind == "integer":
            return int(raw)
        if kind == "number":
            number = float(raw)
            return int(number) if number.is_integer() and "integer" in types else number
        if kind in ("object", "array"):
            return json.loads(raw)
    except ValueError:
        raise InvalidParameters(f"{where}: {raw!r} is not a valid {kind}", field=where) from None
    return raw


def field_of(error_field: str | None) -> str | None:
    """The parameter a typed error's field names (`parameters.greeting` -> `greeting`)."""
    if not error_field or not error_field.startswith("parameters."):
        return None
    return error_field.removeprefix("parameters.").split(".")[0]
