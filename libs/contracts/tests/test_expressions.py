"""CEL macros, and the cost bound that keeps them from running away."""

from __future__ import annotations

import time
from typing import Any

import pytest

from flowmesh.contracts.expression_cost import COST_LIMIT, MAX_MACRO_NESTING, parse, shape_of
from flowmesh.contracts.expressions import (
    FOREACH_NAMES,
    MAX_SOURCE,
    ExpressionError,
    ExpressionTooCostly,
    check_expression,
    evaluate,
    render,
)

CONTEXT: dict[str, Any] = {
    "input": {"xs": [1, 2, 3, 4], "users": [{"name": "ada", "tags": ["a", "b"]}, {"name": "bob", "tags": []}]},
    "steps": {"fetch": {"output": {"items": [{"id": 1, "ok": True}, {"id": 2, "ok": False}]}}},
    "run": {"id": "r1"},
}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("input.xs.map(x, x * 2)", [2, 4, 6, 8]),
        ("input.xs.map(x, x > 2, x * 10)", [30, 40]),
        ("input.xs.filter(x, x % 2 == 0)", [2, 4]),
        ("input.xs.exists(x, x == 3)", True),
        ("input.xs.exists(x, x == 9)", False),
        ("input.xs.all(x, x > 0)", True),
        ("input.xs.all(x, x > 1)", False),
        ("input.xs.exists_one(x, x > 3)", True),
        ("input.xs.exists_one(x, x > 2)", False),
        ("input.users.filter(u, size(u.tags) > 0).map(u, u.name)", ["ada"]),
        ("input.users.map(u, u.tags.map(t, u.name + ':' + t))", [["ada:a", "ada:b"], []]),
        ("steps.fetch.output.items.filter(i, i.ok).map(i, i.id)", [1]),
        ("{'a': 1, 'b': 2}.filter(k, k != 'a')", ["b"]),
    ],
)
def test_each_macro_gives_its_result(source: str, expected: Any) -> None:
    assert check_expression(source) is None
    assert evaluate(source, CONTEXT) == expected


def test_a_template_with_macros_renders_their_values() -> None:
    rendered = render({"ids": "{{ input.xs.filter(x, x > 2) }}", "text": "n={{ input.xs.map(x, x).size() }}"}, CONTEXT)
    assert rendered == {"ids": [3, 4], "text": "n=4"}


def test_a_macro_variable_is_not_an_unknown_name_but_one_used_outside_is() -> None:
    assert check_expression("input.xs.map(item, item + index)", frozenset({"input"})) == (
        "unknown name 'index' (available: input)"
    )
    assert check_expression("input.xs.map(x, x) + [x]") == "unknown name 'x' (available: input, run, steps)"
    assert check_expression("input.xs.map(item, item + index)", frozenset({"input"}) | FOREACH_NAMES) is None


def test_macros_nested_too_deep_are_refused_statically() -> None:
    nested = "input.a.map(x, x.b.map(y, y.c.map(z, z.d.exists(w, w == 1))))"
    problem = check_expression(nested)
    assert problem == f"too costly: nests macros more than {MAX_MACRO_NESTING} deep"
    assert check_expression("input.a.map(x, x.b.map(y, y.c.exists(z, z == 1)))") is None


def test_a_blow_up_from_literals_alone_is_refused_statically() -> None:
    text = "'" + "x" * 1000 + "'"
    source = f"[{','.join(['1'] * 200)}].map(a, [{','.join(['1'] * 200)}].map(b, {text}))"
    problem = check_expression(source)
    assert problem is not None
    assert problem.startswith("too costly: costs ")
    assert "whatever its input" in problem


def test_deep_nesting_is_refused_before_the_evaluator_sees_it() -> None:
    # a chain of 15,000 additions overflows the evaluator's stack and ends the process
    assert check_expression("1" + " + 1" * 200) == "too costly: nests more than 128 deep"
    assert check_expression("(" * 70 + "1" + ")" * 70) == "too costly: nests brackets more than 64 deep"
    assert check_expression("-" * 300 + "1") == "too costly: nests more than 128 deep"
    too_long = "1" + "+1" * MAX_SOURCE
    assert check_expression(too_long) == f"too costly: is {len(too_long):,} characters long (at most {MAX_SOURCE:,})"
    with pytest.raises(ExpressionTooCostly):
        evaluate(too_long, {})


def test_a_map_in_a_map_over_ten_thousand_items_is_refused_quickly() -> None:
    context = {"input": {"xs": list(range(10_000))}}
    for source in (
        "input.xs.map(x, input.xs.map(y, x * y))",
        "input.xs.all(x, input.xs.exists(y, y == x))",
        "input.xs.map(x, x * 2)",  # map copies its result at every element: 10,000² copies
    ):
        assert check_expression(source) is None  # nothing known until the input is
        started = time.monotonic()
        with pytest.raises(ExpressionTooCostly) as caught:
            evaluate(source, context)
        assert time.monotonic() - started < 2  # ~20 ms measured; evaluated, the first takes minutes
        assert caught.value.error_type == "expression-too-costly"
        assert "too costly: it could cost" in caught.value.message
        assert f"(at most {COST_LIMIT:,})" in caught.value.message


def test_macros_over_modest_lists_run() -> None:
    context = {"input": {"xs": list(range(1000)), "ys": list(range(100))}}
    assert evaluate("input.xs.exists(x, x == 999)", context) is True
    assert evaluate("input.xs.filter(x, x % 100 == 0).size()", context) == 10
    assert evaluate("input.ys.map(y, input.ys.exists(z, z == y)).all(b, b)", context) is True


def test_string_and_list_growth_in_macros_is_bounded() -> None:
    big = "x" * 1_000_000
    with pytest.raises(ExpressionTooCostly):
        evaluate("input.xs.map(x, input.s + input.s)", {"input": {"xs": list(range(100)), "s": big}})
    with pytest.raises(ExpressionTooCostly):
        evaluate("input.xs.map(x, input.xs + input.xs)", {"input": {"xs": list(range(2000))}})
    # without a macro, a long chain of copies of a large input is bounded too
    chain = "+".join(["input.s"] * 100)
    with pytest.raises(ExpressionTooCostly):
        evaluate(chain, {"input": {"s": big}})
    assert evaluate("input.s + input.s", {"input": {"s": "ab"}}) == "abab"


def test_a_failing_macro_is_an_ordinary_expression_error() -> None:
    with pytest.raises(ExpressionError) as caught:
        evaluate("input.xs.map(x, x.name)", CONTEXT)
    assert caught.value.error_type == "expression"


def test_the_shape_of_a_value_bounds_its_parts() -> None:
    shape = shape_of({"items": [{"tags": ["a", "bb"]}, {"tags": []}], "name": "n"})
    assert shape.fields is not None
    items = shape.fields["items"]
    assert items.size == 2
    assert items.item is not None
    assert items.item.fields is not None
    assert items.item.fields["tags"].size == 2


def test_the_parser_follows_the_grammar() -> None:
    for source in (
        "a.b[0].c(1, 'x') ? [1, 2u, 3.5e2, 0x1F] : {'k': b'v', \"q\": r'\\d'}",
        "!(a in [1, 2]) && -b <= 3 || c != null",
        "has(a.b) && a.b.exists(x, x.startsWith('p')) && timestamp(a.t).getFullYear() > 2000",
        "'''triple ' quoted''' + \"\"\"and \"\"\" + `esc`",
        "google.protobuf.Int64Value{value: 5}",
    ):
        parse(source)
