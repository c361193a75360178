"""Constraints of a campaign, written as inequalities: `x1 + x2 <= 1.5`, `value_b <= 3`.

An inequality is parsed with Python's own parser (`ast`, mode "eval") and then checked against
a whitelist: numbers, names, + - * / ** and unary minus, one comparison (<=, <, >=, >). Nothing
else is accepted (no calls, attributes, subscripts, lambdas, strings), and nothing is ever
evaluated by Python: the checked tree is compiled into a numpy function of the named arrays. An
error names the constraint (`constraints.1`) and the column of the offending part.

Which kind a constraint is follows from its names: only space parameters, a known constraint
(points violating it are never proposed); one result field compared with a constant, an
outcome constraint (modelled by its own GP; the probability it holds weighs the acquisition).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ground.errors import InvalidInput

Array = NDArray[np.float64]
Fn = Callable[[Mapping[str, Array]], Array]

MAX_LENGTH = 500
MAX_NODES = 200

_BINOPS: dict[type[ast.operator], Callable[[Array, Array], Array]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_COMPARE = {ast.LtE: "<=", ast.Lt: "<", ast.GtE: ">=", ast.Gt: ">"}


@dataclass(frozen=True)
class Inequality:
    """`lhs op rhs`, kept as slack = (rhs - lhs) for <= / <, (lhs - rhs) for >= / >: the
    constraint holds where slack >= 0."""

    text: str
    names: frozenset[str]
    op: str
    slack: Fn
    # outcome constraints: the field, and the bound it is held to (field <= bound or >=)
    field: str | None = None
    bound: float | None = None

    @property
    def upper(self) -> bool:
        return self.op in ("<=", "<")

    def holds(self, values: Mapping[str, Array]) -> NDArray[np.bool_]:
        with np.errstate(all="ignore"):
            s = np.asarray(self.slack(values), dtype=float)
        ok: NDArray[np.bool_] = np.isfinite(s) & (s >= 0)
        return ok


def _fail(where: str, text: str, node: ast.AST | None, why: str) -> InvalidInput:
    col = getattr(node, "col_offset", None)
    at = f" at column {col + 1} ({text[col : col + 20]!r})" if col is not None else ""
    return InvalidInput(f"{where}: {text!r}{at}: {why}", field=where)


def _compile(node: ast.AST, where: str, text: str, names: set[str]) -> Fn:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise _fail(where, text, node, "only numbers may appear as constants")
        value = float(node.value)
        if not math.isfinite(value):
            raise _fail(where, text, node, "numbers must be finite")
        return lambda v: np.asarray(value)
    if isinstance(node, ast.Name):
        name = node.id
        names.add(name)
        return lambda v: np.asarray(v[name], dtype=float)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        fn = _BINOPS[type(node.op)]
        left = _compile(node.left, where, text, names)
        right = _compile(node.right, where, text, names)
        return lambda v: fn(left(v), right(v))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        inner = _compile(node.operand, where, text, names)
        if isinstance(node.op, ast.USub):
            return lambda v: -inner(v)
        return inner
    kinds = {
        ast.Call: "function calls are not allowed",
        ast.Attribute: "attribute access is not allowed",
        ast.Subscript: "subscripts are not allowed",
        ast.Compare: "one comparison per constraint",
        ast.BoolOp: "and/or are not allowed: give each inequality as its own constraint",
    }
    why = next((w for k, w in kinds.items() if isinstance(node, k)), None)
    if isinstance(node, ast.BinOp | ast.UnaryOp):
        why = f"the operator {type(node.op).__name__} is not allowed; use + - * / **"
    if why is None:
        why = f"{type(node).__name__} is not allowed; use numbers, names, + - * / ** and ()"
    raise _fail(where, text, node, why)


def parse_inequality(text: str, where: str = "constraints") -> Inequality:
    """One inequality, checked against the whitelist; InvalidInput names `where` and the
    column of the first part that is not allowed."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput(f"{where}: give an inequality such as 'x1 + x2 <= 1.5'", field=where)
    if len(text) > MAX_LENGTH:
        raise InvalidInput(f"{where}: longer than {MAX_LENGTH} characters", field=where)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        col = (exc.offset or 1) - 1
        raise InvalidInput(
            f"{where}: {text!r} at column {col + 1}: not an inequality ({exc.msg})", field=where
        ) from None
    text = text.strip()
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise InvalidInput(f"{where}: too complex (more than {MAX_NODES} parts)", field=where)
    body = tree.body
    if not isinstance(body, ast.Compare):
        raise _fail(where, text, body, "not an inequality: write lhs <= rhs (or <, >=, >)")
    if len(body.ops) != 1:
        raise _fail(where, text, body, "one comparison per constraint (a <= b, not a <= b <= c)")
    op = _COMPARE.get(type(body.ops[0]))
    if op is None:
        raise _fail(where, text, body, "the comparison must be <=, <, >= or >")
    names: set[str] = set()
    lhs = _compile(body.left, where, text, names)
    rhs = _compile(body.comparators[0], where, text, names)
    if not names:
        raise _fail(where, text, body, "names no parameter or result field")
    if op in ("<=", "<"):
        slack: Fn = lambda v: rhs(v) - lhs(v)  # noqa: E731
    else:
        slack = lambda v: lhs(v) - rhs(v)  # noqa: E731
    field, bound = None, None
    if len(names) == 1:
        (name,) = names
        left_name = isinstance(body.left, ast.Name)
        right_name = isinstance(body.comparators[0], ast.Name)
        other = body.comparators[0] if left_name else body.left
        if left_name != right_name:
            const = _compile(other, where, text, set())
            field, bound = name, float(const({}))
            if right_name:  # 3 >= value_b is value_b <= 3
                op = {"<=": ">=", "<": ">", ">=": "<=", ">": "<"}[op]
    return Inequality(text, frozenset(names), op, slack, field, bound)


@dataclass(frozen=True)
class Constraints:
    known: list[Inequality]  # on parameters: never proposed where violated
    outcome: list[Inequality]  # on result fields: modelled


def split_constraints(texts: Sequence[str], parameters: Mapping[str, str]) -> Constraints:
    """Parse and sort constraints; `parameters` maps each space parameter to its type."""
    known: list[Inequality] = []
    outcome: list[Inequality] = []
    for i, text in enumerate(texts):
        where = f"constraints.{i}"
        ineq = parse_inequality(text, where)
        in_space = ineq.names & set(parameters)
        if in_space == ineq.names:
            cats = sorted(n for n in ineq.names if parameters[n] == "categorical")
            if cats:
                raise InvalidInput(
                    f"{where}: {text!r}: {cats} are categorical; constraints take numeric "
                    "parameters",
                    field=where,
                )
            known.append(ineq)
        elif in_space:
            raise InvalidInput(
                f"{where}: {text!r} mixes space parameters {sorted(in_space)} with result "
                f"fields {sorted(ineq.names - in_space)}; constrain one or the other",
                field=where,
            )
        elif ineq.field is None:
            raise InvalidInput(
                f"{where}: {text!r}: an outcome constraint compares one result field with a "
                "number, e.g. 'value_b <= 3'",
                field=where,
            )
        else:
            outcome.append(ineq)
    return Constraints(known, outcome)
