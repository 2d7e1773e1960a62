"""What a CEL expression can cost, before it runs: a parse of its shape and an upper bound.

The CEL library has no budget of its own and cannot be interrupted once it runs, so a bound is
worked out beforehand. :func:`analyse` parses an expression (the same grammar as CEL, enough to see
its operators, calls and macros) and refuses it statically when it nests too deep (the library's
evaluator recurses, and overflows the stack on very deep trees), nests macros more than
:data:`MAX_MACRO_NESTING` deep, or costs more than :data:`COST_LIMIT` whatever the input.
:meth:`Analysis.cost` bounds its cost against the values it will actually read.

The bound is an abstract evaluation over *shapes*: for each value, its size (elements, or
characters), its weight (nodes, with strings counted per :data:`CHARS_PER_UNIT` characters) and a
bound for any of its elements and for each known field. A unit is about 50 ns of the evaluator's
time. ``map`` and ``filter`` build their result by copying it once per element (the library's
accumulator is cloned, deeply, on every step), so their cost grows as the square of the list: that
is measured, not assumed, and it is what the limit has to hold.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

COST_LIMIT: Final = 4_000_000
"""Most units one evaluation may cost (~200 ms of the evaluator's time)."""
MAX_DEPTH: Final = 128
"""Deepest expression tree (operators, calls, brackets) accepted."""
MAX_MACRO_NESTING: Final = 3
"""Most macros nested inside one another (``a.map(x, x.b.map(y, y.c.exists(z, …)))`` is 3)."""
CHARS_PER_UNIT: Final = 16
"""Characters of a string (or bytes) counted as one unit of weight."""
CONVERT_PER_UNIT: Final = 10
"""Cost of handing one unit of a result back to Python (conversion, then JSON)."""
FAST_MULTIPLIER: Final = 64
"""A macro-free expression costing at most this many times its input is not checked at run time."""

MAX_PARSE_NESTING: Final = 64
"""Deepest nesting of brackets the parser follows (CEL's own parser stops near 100)."""
MACROS: Final = frozenset({"all", "exists", "exists_one", "map", "filter"})
"""The comprehension macros expressions may use."""

_BIG: Final = 10**9
_MACRO_CALL: Final = re.compile(r"\b(?:all|exists|exists_one|map|filter)\s*\(")


class CostError(ValueError):
    """An expression refused for what it could cost (statically, or against its input)."""


class _Unparsed(ValueError):
    """Not understood by this parser (CEL itself decides whether it is valid)."""


# --- shapes ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """An upper bound of a value: ``size`` elements or characters, ``weight`` units in all."""

    size: int
    weight: int
    item: Shape | None = None
    """Bound of any element (list), key or value (map); ``None``: derive it from ``weight``."""
    fields: Mapping[str, Shape] | None = None
    """Bounds of a map's known keys."""
    leaf: bool = False
    """A scalar or string: has no elements (so it adds nothing to a join's elements)."""


SCALAR: Final = Shape(1, 1, leaf=True)
_EMPTY: Final = Shape(0, 0, leaf=True)
_SCALARS: Final = frozenset({int, float, bool, type(None)})


def loose(weight: int) -> Shape:
    """Any value of at most ``weight`` units (all that is known of a part of a larger value)."""
    return Shape(weight, weight)


def element_of(shape: Shape) -> Shape:
    """A bound of any element, key or value of ``shape``."""
    return shape.item if shape.item is not None else loose(shape.weight)


def join(a: Shape, b: Shape) -> Shape:
    """A bound of both ``a`` and ``b``."""
    size, weight = max(a.size, b.size), max(a.weight, b.weight)
    if a.leaf and b.leaf:
        return Shape(size, weight, leaf=True)
    if a.leaf or b.leaf:
        other = b if a.leaf else a
        return Shape(size, weight, other.item, other.fields)
    if a.item is None or b.item is None:
        return loose(weight)
    fields: dict[str, Shape] | None = None
    if a.fields is not None or b.fields is not None:
        fields = dict(a.fields or {})
        for key, value in (b.fields or {}).items():
            fields[key] = join(fields[key], value) if key in fields else value
    return Shape(size, weight, join(a.item, b.item), fields)


def _join_all(shapes: list[Shape]) -> Shape:
    result = _EMPTY
    for shape in shapes:
        result = join(result, shape)
    return result


def _text(length: int) -> Shape:
    return Shape(length, 1 + length // CHARS_PER_UNIT, leaf=True)


def shape_of(value: Any) -> Shape:
    """The exact bound of a JSON value."""
    if isinstance(value, str | bytes):
        return _text(len(value))
    if isinstance(value, list | tuple):
        if value and all(type(v) in _SCALARS for v in value):  # the common case, without a Shape each
            return Shape(len(value), 1 + len(value), SCALAR)
        items = [shape_of(v) for v in value]
        return Shape(len(items), 1 + sum(s.weight for s in items), _join_all(items))
    if isinstance(value, Mapping):
        fields = {str(k): shape_of(v) for k, v in value.items()}
        keys = [_text(len(str(k))) for k in value]
        weight = 1 + sum(s.weight for s in fields.values()) + sum(k.weight for k in keys)
        return Shape(len(fields), weight, _join_all([*keys, *fields.values()]), fields)
    return SCALAR


@dataclass(frozen=True, slots=True)
class _Known:
    """A value read from the context, kept exact while the expression walks into it."""

    value: Any


Abstract = Shape | _Known


def _shape(value: Abstract) -> Shape:
    return shape_of(value.value) if isinstance(value, _Known) else value


# --- the tree --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Node:
    """One node of a parsed expression: ``kind`` with its ``args`` (nodes) and ``value``."""

    kind: str
    """lit, ident, select, index, call, macro, list, map, op."""
    args: tuple[Node, ...] = ()
    value: Any = None
    """The literal, name, field, function, operator, or ``(macro, variable)``."""
    depth: int = 1
    nesting: int = 0
    """Macros nested in this node (itself included)."""
    macros: bool = False


def _node(kind: str, args: tuple[Node, ...] = (), value: Any = None) -> Node:
    depth = 1 + max((a.depth for a in args), default=0)
    if depth > MAX_DEPTH:
        raise CostError(f"nests more than {MAX_DEPTH} deep")
    inner = max((a.nesting for a in args), default=0)
    nesting = inner + 1 if kind == "macro" else inner
    if nesting > MAX_MACRO_NESTING:
        raise CostError(f"nests macros more than {MAX_MACRO_NESTING} deep")
    return Node(kind, args, value, depth, nesting, kind == "macro" or any(a.macros for a in args))


_TOKEN = re.compile(
    r"""
    (?P<space>\s+|//[^\n]*)
  | (?P<string>[rRbB]{0,2}(?:\"\"\"(?:\\.|[^\\])*?\"\"\"|'''(?:\\.|[^\\])*?'''|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'))
  | (?P<number>0[xX][0-9a-fA-F]+[uU]?|(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?[uU]?)
  | (?P<ident>[_a-zA-Z][_a-zA-Z0-9]*|`[^`]*`)
  | (?P<op>==|!=|<=|>=|&&|\|\||[-+*/%!<>?:.,\[\]{}()])
    """,
    re.X | re.S,
)


def _tokens(source: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    pos = 0
    while pos < len(source):
        match = _TOKEN.match(source, pos)
        if match is None or match.lastgroup is None:
            raise _Unparsed(f"unexpected {source[pos]!r}")
        if match.lastgroup != "space":
            found.append((match.lastgroup, match.group()))
        pos = match.end()
    return found


def _string_value(text: str) -> str:
    """The text of a string literal (escapes other than quotes and backslashes are left as written)."""
    body = text.lstrip("rRbB")
    quote = 3 if body[:3] in ('"""', "'''") else 1
    inner = body[quote:-quote]
    return inner if "r" in text[: len(text) - len(body)].lower() else re.sub(r"\\(.)", r"\1", inner)


_RELATIONS: Final = ("==", "!=", "<", "<=", ">", ">=", "in")


class _Parser:
    """Recursive descent over CEL's grammar (precedence as in the CEL specification)."""

    def __init__(self, source: str) -> None:
        self.tokens = _tokens(source)
        self.pos = 0
        self.calls = 0

    def peek(self, offset: int = 0) -> str | None:
        at = self.pos + offset
        return self.tokens[at][1] if at < len(self.tokens) else None

    def take(self, expected: str | None = None) -> tuple[str, str]:
        if self.pos >= len(self.tokens) or (expected is not None and self.tokens[self.pos][1] != expected):
            raise _Unparsed(f"expected {expected or 'more'}")
        self.pos += 1
        return self.tokens[self.pos - 1]

    def parse(self) -> Node:
        node = self.expr()
        if self.pos != len(self.tokens):
            raise _Unparsed("trailing input")
        return node

    def expr(self) -> Node:
        self.calls += 1
        if self.calls > MAX_PARSE_NESTING:
            raise CostError(f"nests brackets more than {MAX_PARSE_NESTING} deep")
        try:
            node = self.binary(0)
            if self.peek() == "?":
                self.take()
                yes = self.binary(0)
                self.take(":")
                node = _node("op", (node, yes, self.expr()), "?:")
            return node
        finally:
            self.calls -= 1

    _LEVELS: Final = (("||",), ("&&",), _RELATIONS, ("+", "-"), ("*", "/", "%"))

    def binary(self, level: int) -> Node:
        if level == len(self._LEVELS):
            return self.unary()
        node = self.binary(level + 1)
        while self.peek() in self._LEVELS[level] and self.tokens[self.pos][0] in ("op", "ident"):
            op = self.take()[1]
            node = _node("op", (node, self.binary(level + 1)), op)
        return node

    def unary(self) -> Node:
        ops: list[str] = []
        while self.peek() in ("!", "-"):
            ops.append(self.take()[1])
        node = self.member()
        for op in reversed(ops):
            node = _node("op", (node,), "unary" + op)
        return node

    def member(self) -> Node:
        node = self.primary()
        while self.peek() in (".", "["):
            if self.take()[1] == "[":
                node = _node("index", (node, self.expr()))
                self.take("]")
                continue
            name = self.take()[1].strip("`")
            if self.peek() == "(":
                node = self.call(name, node)
            elif self.peek() == "{":
                node = self.struct()
            else:
                node = _node("select", (node,), name)
        return node

    def arguments(self, close: str) -> list[Node]:
        args: list[Node] = []
        while self.peek() != close:
            args.append(self.expr())
            if self.peek() != ",":
                break
            self.take(",")
        self.take(close)
        return args

    def call(self, name: str, target: Node | None) -> Node:
        self.take("(")
        args = self.arguments(")")
        if target is not None and name in MACROS and args and args[0].kind == "ident":
            return _node("macro", (target, *args[1:]), (name, args[0].value))
        return _node("call", tuple(args) if target is None else (target, *args), name)

    def struct(self) -> Node:
        self.take("{")
        values: list[Node] = []
        while self.peek() != "}":
            name = self.take()[1]
            self.take(":")
            values.extend((_node("lit", (), name), self.expr()))
            if self.peek() != ",":
                break
            self.take(",")
        self.take("}")
        return _node("map", tuple(values))

    def primary(self) -> Node:
        kind, text = self.take()
        if text == "." and self.peek() is not None:
            kind, text = self.take()
        if text == "(":
            node = self.expr()
            self.take(")")
            return node
        if text == "[":
            return _node("list", tuple(self.arguments("]")))
        if text == "{":
            return self.map_literal()
        if kind == "string":
            return _node("lit", (), _string_value(text))
        if kind == "number":
            return _node("lit", (), _number(text))
        if kind != "ident":
            raise _Unparsed(f"unexpected {text!r}")
        name = text.strip("`")
        if self.peek() == "(":
            return self.call(name, None)
        if self.peek() == "{":
            return self.struct()
        return _node("ident", (), name)

    def map_literal(self) -> Node:
        entries: list[Node] = []
        while self.peek() != "}":
            entries.append(self.expr())
            self.take(":")
            entries.append(self.expr())
            if self.peek() != ",":
                break
            self.take(",")
        self.take("}")
        return _node("map", tuple(entries))


def _number(text: str) -> Any:
    text = text.rstrip("uU")
    if text.lower().startswith("0x"):
        return int(text, 16)
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse(source: str) -> Node:
    """The tree of a CEL expression.

    Raises:
        CostError: it nests too deep, or nests macros too deep.
        ValueError: this parser does not follow it (CEL's compiler judges the syntax).
    """
    try:
        return _Parser(source).parse()
    except RecursionError:
        raise CostError("nests too deep") from None


def free_names(tree: Node, bound_here: frozenset[str] = frozenset()) -> frozenset[str]:
    """The names an expression reads from its context (not those its macros bind)."""
    if tree.kind == "ident":
        return frozenset() if tree.value in bound_here else frozenset({tree.value})
    if tree.kind == "macro":
        inner = bound_here | {tree.value[1]}
        return free_names(tree.args[0], bound_here).union(*(free_names(a, inner) for a in tree.args[1:]))
    return frozenset().union(*(free_names(a, bound_here) for a in tree.args))


# --- the bound -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Walk:
    """One abstract evaluation: the names in scope and the cost counted so far."""

    scope: dict[str, Abstract]
    cost: int = 0

    def eval(self, node: Node) -> Abstract:
        self.cost += 1
        return _RULES[node.kind](self, node)

    def shape(self, node: Node) -> Shape:
        return _shape(self.eval(node))


def _lit(walk: _Walk, node: Node) -> Abstract:
    return _Known(node.value)


def _ident(walk: _Walk, node: Node) -> Abstract:
    return walk.scope.get(node.value, SCALAR)


def _select(walk: _Walk, node: Node) -> Abstract:
    return _field(walk.eval(node.args[0]), node.value)


def _field(value: Abstract, key: Any) -> Abstract:
    if isinstance(value, _Known):
        inner = value.value
        if isinstance(inner, Mapping) and isinstance(key, str | int) and key in inner:
            return _Known(inner[key])
        if isinstance(inner, list) and type(key) is int and -len(inner) <= key < len(inner):
            return _Known(inner[key])
        return element_of(shape_of(inner))
    if value.fields is not None and isinstance(key, str) and key in value.fields:
        return value.fields[key]
    return element_of(value)


def _index(walk: _Walk, node: Node) -> Abstract:
    target = walk.eval(node.args[0])
    key = walk.eval(node.args[1])
    return _field(target, key.value) if isinstance(key, _Known) else element_of(_shape(target))


def _list(walk: _Walk, node: Node) -> Abstract:
    items = [walk.shape(a) for a in node.args]
    walk.cost += len(items)
    return Shape(len(items), 1 + sum(s.weight for s in items), _join_all(items))


def _map(walk: _Walk, node: Node) -> Abstract:
    values = [walk.eval(a) for a in node.args]
    shapes = [_shape(v) for v in values]
    fields = {
        key.value: shapes[i + 1]
        for i, key in enumerate(values)
        if i % 2 == 0 and isinstance(key, _Known) and isinstance(key.value, str)
    }
    walk.cost += len(values)
    return Shape(len(values) // 2, 1 + sum(s.weight for s in shapes), _join_all(shapes), fields)


def _concat(a: Shape, b: Shape) -> Shape:
    if a.leaf and b.leaf:
        size = a.size + b.size
        return Shape(size, a.weight + b.weight, leaf=True)
    return Shape(a.size + b.size, a.weight + b.weight, join(element_of(a), element_of(b)))


def _op(walk: _Walk, node: Node) -> Abstract:
    shapes = [walk.shape(a) for a in node.args]
    if node.value == "?:":
        return join(shapes[1], shapes[2])
    if node.value == "+":
        walk.cost += shapes[0].weight + shapes[1].weight
        return _concat(shapes[0], shapes[1])
    if node.value in _RELATIONS:
        walk.cost += sum(s.weight for s in shapes)
    return SCALAR


_TEXT_RESULTS: Final = frozenset({"string", "bytes", "dyn"})
_SCALAR_RESULTS: Final = frozenset({"size", "contains", "startsWith", "endsWith", "matches", "has", "type"})


def _call(walk: _Walk, node: Node) -> Abstract:
    shapes = [walk.shape(a) for a in node.args]
    weight = sum(s.weight for s in shapes)
    walk.cost += weight
    if node.value in _SCALAR_RESULTS or node.value.startswith("get"):
        return SCALAR
    if node.value in _TEXT_RESULTS and len(shapes) == 1:
        return shapes[0] if node.value == "dyn" else Shape(shapes[0].weight * CHARS_PER_UNIT, weight, leaf=True)
    return loose(weight) if node.value not in ("int", "uint", "double", "bool", "timestamp", "duration") else SCALAR


def _macro(walk: _Walk, node: Node) -> Abstract:
    macro, variable = node.value
    target = walk.shape(node.args[0])
    element = element_of(target)
    saved = walk.scope.get(variable)
    walk.scope[variable] = element
    before = walk.cost
    bodies = [walk.shape(a) for a in node.args[1:]]
    each = walk.cost - before + 1
    if saved is None:
        walk.scope.pop(variable)
    else:
        walk.scope[variable] = saved
    walk.cost = before + target.size * each
    if macro == "map":
        result = Shape(target.size, 1 + target.size * bodies[-1].weight, bodies[-1])
    elif macro == "filter":
        result = Shape(target.size, 1 + target.size * element.weight, element)
    else:
        return SCALAR
    walk.cost += target.size * result.weight  # the accumulator, copied whole at every element
    return result


_RULES: Final[dict[str, Callable[[_Walk, Node], Abstract]]] = {
    "lit": _lit,
    "ident": _ident,
    "select": _select,
    "index": _index,
    "list": _list,
    "map": _map,
    "op": _op,
    "call": _call,
    "macro": _macro,
}


def bound(tree: Node, scope: Mapping[str, Abstract]) -> int:
    """The cost bound of evaluating ``tree`` with ``scope``, its result handed back included."""
    walk = _Walk(dict(scope))
    result = walk.shape(tree)
    return walk.cost + CONVERT_PER_UNIT * result.weight


@dataclass(frozen=True, slots=True)
class Analysis:
    """What is known of an expression's cost before any input: whether run time must check it."""

    tree: Node | None
    """``None`` when this parser did not follow it (CEL's compiler then judges its syntax)."""
    checked: bool
    """Whether each evaluation is bounded against its input first."""

    def cost(self, context: Mapping[str, Any]) -> int:
        """The bound against the values it reads (0 when not checked)."""
        if self.tree is None or not self.checked:
            return 0
        return bound(self.tree, {name: _Known(value) for name, value in context.items()})


def analyse(source: str, names: frozenset[str]) -> Analysis:
    """Refuse what is too costly whatever the input; say whether evaluations need a bound.

    Raises:
        CostError: it nests too deep, nests macros too deep, or costs over the limit on any input.
    """
    try:
        tree = parse(source)
    except _Unparsed:
        # CEL's compiler refuses it, or this parser missed a corner of the grammar: without a
        # tree, no macro may go unbounded
        if _MACRO_CALL.search(source):
            raise CostError("uses a macro in a form the cost check does not follow") from None
        return Analysis(None, checked=False)
    smallest = bound(tree, dict.fromkeys(names, loose(1)))
    if smallest > COST_LIMIT:
        raise CostError(f"costs {smallest:,} units whatever its input (at most {COST_LIMIT:,})")
    growth = bound(tree, dict.fromkeys(names, loose(_BIG))) // _BIG
    return Analysis(tree, checked=tree.macros or growth > FAST_MULTIPLIER)
