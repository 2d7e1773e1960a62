"""The validation corpus: one test per rule, all problems at once, and graph properties."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from flowmesh.contracts.testing import definition as flow
from flowmesh.contracts.testing import edge, node
from flowmesh.flows.validation import credential_warnings, referenced_flows, validate_flow

PUBLISHED = "0190a5b4-0000-7000-8000-000000000001"


def problems(definition: Any, input_schema: Any = None, **kw: Any) -> dict[str, str]:
    return {e.path: e.message for e in validate_flow(definition, input_schema, published_flows={PUBLISHED}, **kw)}


def test_a_good_flow_has_no_problems() -> None:
    d = flow(
        node("fetch", "http", url="https://example.test/{{ input.id }}", retry={"maxAttempts": 3}),
        node("ok", "condition", expression="steps.fetch.output.status == 200"),
        node("yes"),
        node("no", "fail", message="status {{ steps.fetch.output.status }}"),
        node("kind", "switch", expression="{{ input.kind }}", cases=["a", 1, True]),
        node("each", "foreach", flowId=PUBLISHED, items="input.list", input={"x": "{{ item }}", "i": "{{ index }}"}),
        node("wait", "waitEvent", eventType="order.paid", match="event.id == input.id", timeoutMs=1000),
        node("after"),
        edges=[
            edge("start", "fetch"),
            edge("fetch", "ok"),
            edge("ok", "yes", "true"),
            edge("ok", "no", "false"),
            edge("yes", "kind"),
            edge("kind", "each", "true"),
            edge("kind", "wait", "default"),
            edge("wait", "after", "timeout"),
        ],
    )
    assert problems(d, {"type": "object", "properties": {"id": {"type": "string"}}}) == {}


def test_unknown_step_type_is_named() -> None:
    p = problems(flow(node("x", "teleport"), edges=[edge("start", "x")]))
    assert "teleport" in p["/nodes/1/type"] and "'x'" in p["/nodes/1/type"]


def test_data_is_checked_against_the_step_schema() -> None:
    p = problems(flow(node("h", "http", url=5, bogus=1), edges=[edge("start", "h")]))
    assert "/nodes/1/data/url" in p and "/nodes/1/data/bogus" in p
    assert "'h'" in p["/nodes/1/data/url"]


def test_exactly_one_trigger() -> None:
    assert "none" in problems({"nodes": [node("a")], "edges": []})["/nodes"]
    p = problems(flow(node("second", "trigger")))
    assert "'second'" in p["/nodes/1/type"] and "'start'" in p["/nodes/1/type"]


def test_dangling_edges_name_the_missing_node() -> None:
    p = problems(flow(node("a"), edges=[edge("start", "a"), edge("a", "ghost"), edge("phantom", "a")]))
    assert "'ghost'" in p["/edges/1/target"]
    assert "'phantom'" in p["/edges/2/source"]


def test_unknown_handles_on_branching_steps() -> None:
    d = flow(
        node("c", "condition", expression="true"),
        node("s", "switch", expression="input.k", cases=["a"]),
        node("ap", "approval"),
        node("t"),
        edges=[
            edge("start", "c"),
            edge("c", "s", "maybe"),
            edge("c", "ap", "true"),
            edge("ap", "t", "perhaps"),
            edge("s", "t", "b"),
        ],
    )
    p = problems(d)
    assert "'maybe'" in p["/edges/1/sourceHandle"] and "'true', 'false'" in p["/edges/1/sourceHandle"]
    assert "'perhaps'" in p["/edges/3/sourceHandle"] and "'approved'" in p["/edges/3/sourceHandle"]
    assert "'b'" in p["/edges/4/sourceHandle"]


def test_handles_that_can_never_be_taken_are_reported() -> None:
    d = flow(
        node("a"),
        node("ap", "approval"),
        node("b"),
        edges=[edge("start", "a"), edge("a", "ap"), edge("a", "b", "error"), edge("ap", "b", "timeout")],
    )
    p = problems(d)
    assert "onError: continue" in p["/edges/2/sourceHandle"]
    assert "timeoutMs" in p["/edges/3/sourceHandle"]
    assert "/edges/1/sourceHandle" not in p


def test_plain_steps_have_no_handles() -> None:
    p = problems(flow(node("a"), node("b"), edges=[edge("start", "a"), edge("a", "b", "true")]))
    assert "no handles" in p["/edges/1/sourceHandle"]


def test_cycles_name_their_nodes() -> None:
    d = flow(
        node("a"), node("b"), node("c"), edges=[edge("start", "a"), edge("a", "b"), edge("b", "c"), edge("c", "a")]
    )
    assert problems(d)["/edges/3"] == "cycle: a -> b -> c -> a"


def test_a_self_loop_is_a_cycle() -> None:
    assert problems(flow(node("a"), edges=[edge("start", "a"), edge("a", "a")]))["/edges/1"] == "cycle: a -> a"


def test_edges_into_the_trigger_are_refused() -> None:
    p = problems(flow(node("a"), edges=[edge("start", "a"), edge("a", "start")]))
    assert "trigger" in p["/edges/1/target"]


def test_unreachable_nodes_are_named() -> None:
    p = problems(flow(node("a"), node("island"), node("reef"), edges=[edge("start", "a"), edge("island", "reef")]))
    assert "'island'" in p["/nodes/2"] and "'reef'" in p["/nodes/3"]
    assert "/nodes/1" not in p


def test_expressions_that_do_not_compile_carry_the_cel_error() -> None:
    d = flow(
        node("c", "condition", expression="input.v >"),
        node("t", output={"deep": ["ok", "{{ steps.c.output.value && }}"]}),
        node("u", output={"v": "{{ nobody.knows }}"}),
        edges=[edge("start", "c"), edge("c", "t"), edge("t", "u")],
    )
    p = problems(d)
    assert "Syntax error" in p["/nodes/1/data/expression"] and "'input.v >'" in p["/nodes/1/data/expression"]
    assert "Syntax error" in p["/nodes/2/data/output/deep/1"]
    assert "unknown name 'nobody'" in p["/nodes/3/data/output/v"]


def test_item_and_event_are_only_known_where_they_exist() -> None:
    d = flow(
        node("t", output={"v": "{{ item }}"}),
        node("w", "waitEvent", eventType="x", match="event.ok"),
        edges=[edge("start", "t"), edge("t", "w")],
    )
    p = problems(d)
    assert "unknown name 'item'" in p["/nodes/1/data/output/v"]
    assert "/nodes/2/data/match" not in p


def test_subflow_and_foreach_targets_must_be_published_flows_of_the_tenant() -> None:
    d = flow(
        node("s", "subflow", flowId="not-published"),
        node("f", "foreach", flowId="self-id", items="input.xs"),
        edges=[edge("start", "s"), edge("s", "f")],
    )
    p = problems(d, flow_id="self-id")
    assert "not a published flow" in p["/nodes/1/data/flowId"]
    assert "cannot run itself" in p["/nodes/2/data/flowId"]
    assert referenced_flows(d) == {"not-published", "self-id"}


def test_input_schema_must_be_a_json_schema() -> None:
    assert "not a valid JSON Schema" in problems(flow(), {"type": "nonsense"})["/inputSchema/type"]
    assert "JSON Schema object" in problems(flow(), ["no"])["/inputSchema"]
    assert problems(flow(), {"type": "object", "required": ["a"]}) == {}


def test_subject_tokens_must_be_safe() -> None:
    d = flow(
        node("w", "waitEvent", eventType="orders.*"),
        node("p", "publish", name="a b", payload={}),
        edges=[edge("start", "w"), edge("w", "p")],
    )
    p = problems(d)
    assert "eventType" in p["/nodes/1/data/eventType"] and "name" in p["/nodes/2/data/name"]


def test_duplicate_and_overlong_ids_are_reported() -> None:
    d = flow(
        node("a"), node("a"), node("x" * 65), edges=[edge("start", "a", edge_id="e"), edge("a", "x" * 65, edge_id="e")]
    )
    p = problems(d)
    assert "duplicate node id 'a'" in p["/nodes/2/id"]
    assert "longer than 64" in p["/nodes/3/id"]
    assert "duplicate edge id 'e'" in p["/edges/1/id"]


def test_a_malformed_definition_reports_its_shape() -> None:
    assert "/nodes/0/id" in problems({"nodes": [{"type": "trigger"}]})
    assert "/nodes" in problems({"nodes": "many"})


def test_a_flow_with_many_problems_returns_all_of_them() -> None:
    d = {
        "nodes": [node("a", "mystery"), node("b", "condition", expression="(("), node("c", "delay")],
        "edges": [edge("a", "b"), edge("b", "zz"), edge("b", "c", "sideways"), edge("c", "b")],
    }
    p = problems(d, {"type": 3})
    assert set(p) >= {
        "/inputSchema/type",
        "/nodes",
        "/nodes/0/type",
        "/nodes/1/data/expression",
        "/nodes/2/data",
        "/edges/1/target",
        "/edges/2/sourceHandle",
    }
    assert any(m.startswith("cycle:") for m in p.values())


# --- properties ------------------------------------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    """A random DAG: nodes in topological order, each reached from an earlier one."""
    n = draw(st.integers(min_value=1, max_value=12))
    names = [f"n{i}" for i in range(n)]
    edges = []
    for i, name in enumerate(names):
        parents = draw(st.sets(st.integers(min_value=-1, max_value=i - 1), min_size=1, max_size=3))
        for p in parents:
            source = "start" if p < 0 else names[p]
            edges.append(edge(source, name))
    return flow(*(node(x) for x in names), edges=edges), names


@settings(max_examples=75, deadline=None)
@given(dags())
def test_random_dags_validate(case: tuple[dict[str, Any], list[str]]) -> None:
    d, _ = case
    assert problems(d) == {}


@settings(max_examples=75, deadline=None)
@given(dags(), st.data())
def test_a_back_edge_is_always_reported_as_a_cycle_naming_its_nodes(
    case: tuple[dict[str, Any], list[str]], data: st.DataObject
) -> None:
    d, _ = case
    # pick a path start -> ... -> v by walking forward edges, then close it from its end back to an earlier node
    path = ["start"]
    successors: dict[str, list[str]] = {}
    for e in d["edges"]:
        successors.setdefault(e["source"], []).append(e["target"])
    while successors.get(path[-1]):
        path.append(data.draw(st.sampled_from(successors[path[-1]])))
    if len(path) < 2:
        return
    i = data.draw(st.integers(min_value=1, max_value=len(path) - 1))
    j = data.draw(st.integers(min_value=i, max_value=len(path) - 1))
    back = edge(path[j], path[i], edge_id="back")
    d = {**d, "edges": [*d["edges"], back]}
    cycles = [m.removeprefix("cycle: ").split(" -> ") for m in problems(d).values() if m.startswith("cycle: ")]
    assert cycles
    edges = {(e["source"], e["target"]) for e in d["edges"]}
    for c in cycles:
        steps = set(pairwise(c))
        assert c[0] == c[-1] and steps <= edges  # a real cycle of this graph, named node by node
        # the graph was acyclic before, so every cycle goes through the added edge
        assert (path[j], path[i]) in steps, (c, path[j], path[i])


def test_step_data_is_read_with_strict_json_types() -> None:
    d = flow(
        node("wait", "delay", durationMs="5"),
        node("ask", "llm", provider="openai", model="m", messages=[{"role": "user", "content": "hi"}], maxTokens="9"),
        node("call", "http", url="https://example.test/", retry={"maxAttempts": "3"}),
        edges=[edge("start", "wait"), edge("wait", "ask"), edge("ask", "call")],
    )
    found = problems(d)
    assert {"/nodes/1/data/durationMs", "/nodes/2/data/maxTokens", "/nodes/3/data/retry/maxAttempts"} <= set(found), (
        found
    )


def test_secrets_are_read_in_the_fields_of_http_and_llm_steps_only() -> None:
    d = flow(
        node(
            "call",
            "http",
            url="https://example.test/{{ secrets.PATH }}?k={{ secrets.Q }}",
            headers={"Authorization": "Bearer {{ secrets.TOKEN }}"},
            query={"sig": "{{ secrets.SIG }}"},
            body={"password": "{{ secrets.PW }}"},
        ),
        node(
            "ask",
            "llm",
            provider="openai",
            model="m",
            messages=[{"role": "user", "content": "hi {{ secrets.NAME }}"}],
        ),
        node("copy", "transform", output={"leak": "{{ secrets.TOKEN }}", "text": "{{ 'no secrets here' }}"}),
        node("check", "condition", expression="secrets.TOKEN == 'x'"),
        node("say", "publish", name="said", payload={"v": "{{ secrets.TOKEN }}"}),
        node("late", "http", url="https://example.test/", label="{{ secrets.TOKEN }}"),
        edges=[
            edge("start", "call"),
            edge("call", "ask"),
            edge("ask", "copy"),
            edge("copy", "check"),
            edge("check", "say", "true"),
            edge("check", "late", "false"),
        ],
    )
    p = problems(d)
    refused = {
        "/nodes/3/data/output/leak",
        "/nodes/4/data/expression",
        "/nodes/5/data/payload/v",
        "/nodes/6/data/label",
    }
    assert set(p) == refused, p
    assert all("only the fields of http and llm steps" in p[path] for path in refused)


def test_a_secret_is_read_by_its_literal_name() -> None:
    d = flow(
        node("call", "http", url="https://example.test/", body={"a": "{{ secrets['X'] }}", "b": "{{ size(secrets) }}"}),
        edges=[edge("start", "call")],
    )
    p = problems(d)
    assert set(p) == {"/nodes/1/data/body/a", "/nodes/1/data/body/b"}
    assert all("secrets.NAME" in m for m in p.values())


def test_literal_credentials_in_an_http_step_are_warned_about_not_refused() -> None:
    d = flow(
        node(
            "call",
            "http",
            url="https://user:pw@example.test/?api_key=abc&page=1",
            headers={"Authorization": "Bearer abc", "X-Api-Key": "{{ secrets.K }}", "Accept": "text/plain"},
            query={"access_token": "abc", "q": "x"},
        ),
        node("plain", "http", url="https://example.test/?key={{ secrets.K }}", headers={"Cookie": "{{ input.c }}"}),
        edges=[edge("start", "call"), edge("call", "plain")],
    )
    assert problems(d) == {}
    warned = {w.path: w.message for w in credential_warnings(d)}
    assert set(warned) == {
        "/nodes/1/data/headers/Authorization",
        "/nodes/1/data/query/access_token",
        "/nodes/1/data/url",
    }
    assert all("secrets.NAME" in m and "literal credential" in m for m in warned.values())


def test_a_flow_using_macros_is_valid() -> None:
    d = flow(
        node("pick", "transform", output={"ids": "{{ input.items.filter(i, i.ok).map(i, i.id) }}"}),
        node("any", "condition", expression="steps.pick.output.ids.exists(id, id > 2)"),
        node("all", "condition", expression="input.items.all(i, has(i.id))"),
        edges=[edge("start", "pick"), edge("pick", "any"), edge("any", "all", "true")],
    )
    assert problems(d) == {}


def test_an_expression_too_costly_whatever_its_input_is_named() -> None:
    nested = "input.a.map(x, x.b.map(y, y.c.map(z, z.d.exists(w, w == 1))))"
    deep = "1" + " + 1" * 200
    d = flow(
        node("nested", "condition", expression=nested),
        node("deep", "transform", output={"v": "{{ " + deep + " }}"}),
        edges=[edge("start", "nested"), edge("nested", "deep", "true")],
    )
    p = problems(d)
    assert p["/nodes/1/data/expression"] == (
        f"node 'nested': expression {nested!r} is too costly: nests macros more than 3 deep"
    )
    assert p["/nodes/2/data/output/v"] == f"node 'deep': expression {deep!r} is too costly: nests more than 128 deep"
