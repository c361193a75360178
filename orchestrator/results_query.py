"""The results catalogue's query language, and its translation into SQL for both dialects.

    surface = "branin" and value < 0.5
    (result.loss <= 1e-3 or parameters.x > 2) and not flag = true

A field is a dotted name: `parameters.x` (or `params.x`) is a parameter, `result.x` a result
field, and a bare `x` is the result's field when the result has one, else the parameter. Values
are numbers, strings in double or single quotes, true, false and null; operators
= != < <= > >=; `and` binds tighter than `or`; `not` and parentheses as usual.

A small recursive-descent parser, never eval: a mistake is an InvalidInput that names the
position (1-based column) and what was expected there. The tree compiles into a WHERE fragment
with every value and JSON path bound as a parameter (`?`), in the JSON functions of the dialect
(SQLite json_extract/json_type, PostgreSQL jsonb #> / jsonb_typeof). A comparison only holds
between values of the same JSON type, the same on both: `"abc" < 0.5` is false, not an error,
and an absent field matches nothing (not even `!=`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from ground.errors import InvalidInput

MAX_QUERY = 4000
MAX_DEPTH = 32
OPS = ("=", "!=", "<", "<=", ">", ">=")
Column = Literal["parameters", "result"]
_PREFIXES: dict[str, Column] = {
    "parameters": "parameters",
    "params": "parameters",
    "result": "result",
}
_KEYWORDS = ("and", "or", "not", "true", "false", "null")
_TOKEN = re.compile(
    r"""\s*(?:
    (?P<num>-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    |(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    |(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
    |(?P<op><=|>=|!=|==|<>|=|<|>)
    |(?P<paren>[()])
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Field:
    column: Column | None  # None: the result's field if it has one, else the parameter
    path: tuple[str, ...]

    @property
    def text(self) -> str:
        return ".".join(((self.column,) if self.column else ()) + self.path)


@dataclass(frozen=True)
class Compare:
    field: Field
    op: str
    value: Any


@dataclass(frozen=True)
class Not:
    inner: Node


@dataclass(frozen=True)
class BoolOp:
    op: Literal["and", "or"]
    items: tuple[Node, ...]


Node = Compare | Not | BoolOp


@dataclass(frozen=True)
class _Tok:
    kind: str  # num str name op paren end
    text: str
    pos: int  # 1-based column


def _error(pos: int, expected: str, got: _Tok | None, field: str) -> InvalidInput:
    found = "the end of the query" if got is None or got.kind == "end" else repr(got.text)
    return InvalidInput(
        f"{field}: at column {pos}: expected {expected}, found {found}", field=field
    )


def _tokens(text: str, field: str) -> list[_Tok]:
    out: list[_Tok] = []
    i = 0
    while i < len(text):
        if text[i:].strip() == "":
            break
        m = _TOKEN.match(text, i)
        if m is None or m.lastgroup is None:
            start = i + len(text[i:]) - len(text[i:].lstrip())
            raise InvalidInput(
                f"{field}: at column {start + 1}: expected a field, value, operator or "
                f"parenthesis, found {text[start]!r}",
                field=field,
            )
        kind = m.lastgroup
        out.append(_Tok(kind, m.group(kind), m.start(kind) + 1))
        i = m.end()
    out.append(_Tok("end", "", len(text) + 1))
    return out


class _Parser:
    def __init__(self, text: str, field: str) -> None:
        self.field = field
        self.toks = _tokens(text, field)
        self.i = 0
        self.depth = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def word(self, w: str) -> bool:
        tok = self.peek()
        if tok.kind == "name" and tok.text.lower() == w:
            self.i += 1
            return True
        return False

    def parse(self) -> Node:
        node = self.or_()
        tok = self.peek()
        if tok.kind != "end":
            raise _error(tok.pos, "'and', 'or' or the end of the query", tok, self.field)
        return node

    def or_(self) -> Node:
        items = [self.and_()]
        while self.word("or"):
            items.append(self.and_())
        return items[0] if len(items) == 1 else BoolOp("or", tuple(items))

    def and_(self) -> Node:
        items = [self.not_()]
        while self.word("and"):
            items.append(self.not_())
        return items[0] if len(items) == 1 else BoolOp("and", tuple(items))

    def not_(self) -> Node:
        if self.word("not"):
            return Not(self.not_())
        return self.atom()

    def atom(self) -> Node:
        tok = self.peek()
        if tok.kind == "paren" and tok.text == "(":
            self.take()
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise InvalidInput(
                    f"{self.field}: at column {tok.pos}: more than {MAX_DEPTH} nested parentheses",
                    field=self.field,
                )
            node = self.or_()
            close = self.take()
            if close.kind != "paren" or close.text != ")":
                raise _error(close.pos, "')'", close, self.field)
            self.depth -= 1
            return node
        return self.comparison()

    def comparison(self) -> Compare:
        tok = self.take()
        if tok.kind != "name" or tok.text.lower() in _KEYWORDS:
            raise _error(
                tok.pos, "a field name (e.g. value or parameters.x) or '('", tok, self.field
            )
        parts = tok.text.split(".")
        column = _PREFIXES.get(parts[0])
        if column is not None:
            parts = parts[1:]
            if not parts:
                nxt = self.peek()
                what = f"'.' and a field of {tok.text} (e.g. {tok.text}.value)"
                raise _error(nxt.pos, what, nxt, self.field)
        field = Field(column, tuple(parts))
        op_tok = self.take()
        if op_tok.kind != "op":
            raise _error(op_tok.pos, f"a comparison ({' '.join(OPS)})", op_tok, self.field)
        op = {"==": "=", "<>": "!="}.get(op_tok.text, op_tok.text)
        val_tok = self.take()
        value = self.value(val_tok)
        if op not in ("=", "!=") and (value is None or isinstance(value, bool)):
            raise _error(val_tok.pos, f"a number or a string after {op}", val_tok, self.field)
        return Compare(field, op, value)

    def value(self, tok: _Tok) -> Any:
        if tok.kind == "num":
            num = float(tok.text)
            return int(num) if num.is_integer() and re.fullmatch(r"-?\d+", tok.text) else num
        if tok.kind == "str":
            body = tok.text[1:-1]
            return re.sub(r"\\(.)", r"\1", body)
        if tok.kind == "name" and tok.text.lower() in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[tok.text.lower()]
        raise _error(
            tok.pos, "a value (a number, a quoted string, true, false or null)", tok, self.field
        )


def parse_query(text: str, field: str = "query") -> Node | None:
    """The tree of `text`, or None for an empty query (everything)."""
    if len(text) > MAX_QUERY:
        raise InvalidInput(f"{field}: at most {MAX_QUERY} characters", field=field)
    if not text.strip():
        return None
    return _Parser(text, field).parse()


# ------------------------------------------------------------------------------ SQL


def json_kind(value: Any) -> str:
    """The JSON type a value compares as."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string"


class Sql:
    """Builds WHERE fragments for one dialect; `args` collects the bound values in order."""

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        self.args: list[Any] = []

    def bind(self, value: Any) -> str:
        self.args.append(value)
        return "?"

    def path(self, path: tuple[str, ...]) -> str:
        # Written into the SQL, not bound: each part is an identifier (the tokenizer allows
        # nothing else), and a literal path lets SQLite use an index on that expression.
        assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in path)
        if self.dialect == "sqlite":
            return "'$." + ".".join(path) + "'"
        return "'{" + ",".join(path) + "}'::text[]"

    def compare(self, column: str, path: tuple[str, ...], op: str, value: Any) -> str:
        kind = json_kind(value)
        sql_op = "<>" if op == "!=" else op
        if self.dialect == "sqlite":
            t = f"json_type({column}, {self.path(path)})"
            if kind == "null":
                return f"({t} {sql_op} 'null')"
            if kind == "boolean":  # json_type says 'true' or 'false'
                word = "'true'" if value else "'false'"
                return f"({t} IN ('true','false') AND {t} {sql_op} {word})"
            e = f"json_extract({column}, {self.path(path)})"
            if kind == "string" and op == "=":
                # Only a JSON string extracts as TEXT, and TEXT equals no number: no guard
                # needed, one JSON call less per row on the commonest comparison.
                return f"({e} = {self.bind(value)})"
            types = "('integer','real')" if kind == "number" else "('text')"
            return f"({t} IN {types} AND {e} {sql_op} {self.bind(value)})"
        e = f"({column} #> {self.path(path)})"
        if kind == "null":
            return f"(jsonb_typeof{e} {sql_op} 'null')"
        # jsonb compares jsonb of one type by value (numbers numerically): no casts to fail.
        return (
            f"(jsonb_typeof{e} = '{kind}' AND {e} {sql_op} {self.bind(json.dumps(value))}::jsonb)"
        )

    def present(self, column: str, path: tuple[str, ...]) -> str:
        if self.dialect == "sqlite":
            return f"json_type({column}, {self.path(path)}) IS NOT NULL"
        return f"({column} #> {self.path(path)}) IS NOT NULL"

    def where(self, node: Node) -> str:
        if isinstance(node, BoolOp):
            return "(" + f" {node.op.upper()} ".join(self.where(i) for i in node.items) + ")"
        if isinstance(node, Not):
            # An absent field makes a comparison false, so NOT of it is true: absent fields
            # fall out of comparisons, not out of their negation.
            return f"(NOT COALESCE({self.where(node.inner)}, FALSE))"
        f = node.field
        if f.column is not None:
            return self.compare(f.column, f.path, node.op, node.value)
        # The result's field where the result has one, else the parameter (binds in order).
        has = self.present("result", f.path)
        on_result = self.compare("result", f.path, node.op, node.value)
        on_params = self.compare("parameters", f.path, node.op, node.value)
        return f"(CASE WHEN {has} THEN {on_result} ELSE {on_params} END)"

    def number(self, field: Field) -> str:
        """The field as a number for sorting, NULL where it is not one."""
        if field.column is None:
            on_result = self.number(Field("result", field.path))
            return f"COALESCE({on_result}, {self.number(Field('parameters', field.path))})"
        col, path = field.column, field.path
        if self.dialect == "sqlite":
            t = f"json_type({col}, {self.path(path)})"
            e = f"json_extract({col}, {self.path(path)})"
            return f"(CASE WHEN {t} IN ('integer','real') THEN {e} END)"
        e = f"({col} #> {self.path(path)})"
        return f"(CASE WHEN jsonb_typeof{e} = 'number' THEN ({e} #>> '{{}}')::float8 END)"


def parse_field(text: str, field: str = "sort") -> Field:
    """A dotted field name alone (a sort key)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", text):
        raise InvalidInput(
            f"{field}: expected a dotted field name such as value or result.loss, got {text!r}",
            field=field,
        )
    parts = text.split(".")
    column = _PREFIXES.get(parts[0])
    if column is not None and len(parts) > 1:
        return Field(column, tuple(parts[1:]))
    return Field(None, tuple(parts))
