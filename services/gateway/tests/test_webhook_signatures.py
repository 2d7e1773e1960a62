"""Webhook rules without I/O: Standard Webhooks signatures, the run input, the lookup cache."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import pytest

from flowmesh.contracts.errors import (
    BadRequest,
    Conflict,
    InvalidInput,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from flowmesh.contracts.models.flows import Trigger
from flowmesh.contracts.models.rpc import WebhookTarget
from flowmesh.gateway import webhooks
from flowmesh.gateway.body import check_fits
from flowmesh.gateway.webhooks import Hook, parse_body, safe_headers, sign, signing_key, verify

# the example of the Standard Webhooks reference libraries
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

OLD = signing_key("whsec_" + base64.b64encode(b"o" * 32).decode())
NEW = signing_key("whsec_" + base64.b64encode(b"n" * 32).decode())
NOW = 1_800_000_000.0
BODY = b'{"order": 42}'


def check(keys: list[bytes], signature: str | None, *, ts: int = int(NOW), body: bytes = BODY, **kw: Any) -> str:
    args: dict[str, Any] = {"msg_id": "msg_1", "timestamp": str(ts), "signature": signature, "body": body, "now": NOW}
    return verify(keys, **{**args, **kw})


def test_signing_matches_the_standard_webhooks_example() -> None:
    assert sign(signing_key(SPEC_SECRET), SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIGNATURE
    assert verify([signing_key(SPEC_SECRET)], msg_id=SPEC_ID, timestamp=str(SPEC_TS), signature=SPEC_SIGNATURE,
                  body=SPEC_BODY, now=SPEC_TS + 10) == SPEC_ID  # fmt: skip


def test_the_signed_content_is_id_dot_timestamp_dot_raw_body() -> None:
    mac = hmac.new(NEW, b"msg_1." + str(int(NOW)).encode() + b"." + BODY, hashlib.sha256).digest()
    assert sign(NEW, "msg_1", int(NOW), BODY) == "v1," + base64.b64encode(mac).decode()


def test_a_valid_signature_returns_the_delivery_id() -> None:
    assert check([NEW], sign(NEW, "msg_1", int(NOW), BODY)) == "msg_1"


@pytest.mark.parametrize(
    ("what", "kw"),
    [
        ("another body", {"body": b'{"order": 43}'}),
        ("another id", {"msg_id": "msg_2"}),
        ("another timestamp", {"timestamp": str(int(NOW) - 1)}),
    ],
)
def test_a_signature_over_other_content_is_refused(what: str, kw: dict[str, Any]) -> None:
    with pytest.raises(Unauthorized, match="no signature in webhook-signature matches"):
        check([NEW], sign(NEW, "msg_1", int(NOW), BODY), **kw)


def test_a_signature_with_another_key_is_refused() -> None:
    with pytest.raises(Unauthorized, match="whsec_"):
        check([NEW], sign(OLD, "msg_1", int(NOW), BODY))


def test_one_valid_signature_among_several_is_enough() -> None:
    good = sign(NEW, "msg_1", int(NOW), BODY)
    bad = sign(OLD, "msg_1", int(NOW), BODY)
    assert check([NEW], f"{bad} {good}") == "msg_1"
    assert check([NEW], f"v1a,{good[3:]}   {good}  v1,not-base64!!  garbage") == "msg_1"


def test_other_versions_and_malformed_entries_never_match() -> None:
    good = sign(NEW, "msg_1", int(NOW), BODY)
    for header in (f"v2,{good[3:]}", good[3:], "v1,", "v1,%%%", "v1,\u00e9t\u00e9", ","):
        with pytest.raises(Unauthorized):
            check([NEW], header)


def test_every_secret_of_a_rotating_trigger_is_tried() -> None:
    assert check([NEW, OLD], sign(OLD, "msg_1", int(NOW), BODY)) == "msg_1"
    assert check([NEW, OLD], sign(NEW, "msg_1", int(NOW), BODY)) == "msg_1"
    with pytest.raises(Unauthorized):
        check([], sign(NEW, "msg_1", int(NOW), BODY))


def test_signatures_are_compared_in_constant_time_without_early_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(webhooks.hmac, "compare_digest", spy)
    good = sign(NEW, "msg_1", int(NOW), BODY)
    bad = sign(OLD, "msg_1", int(NOW), BODY)
    assert check([NEW, OLD], f"{good} {bad} {bad}") == "msg_1"
    # every key against every signature, as bytes, even after the first one matched
    assert len(calls) == 6
    assert all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)


@pytest.mark.parametrize("offset", [-300, 0, 300])
def test_a_timestamp_within_five_minutes_either_way_is_accepted(offset: int) -> None:
    ts = int(NOW) + offset
    assert check([NEW], sign(NEW, "msg_1", ts, BODY), ts=ts) == "msg_1"


@pytest.mark.parametrize(("offset", "when"), [(-301, "in the past"), (301, "in the future"), (-86400, "in the past")])
def test_a_stale_or_future_timestamp_is_refused_even_when_signed(offset: int, when: str) -> None:
    ts = int(NOW) + offset
    with pytest.raises(Unauthorized, match=when):
        check([NEW], sign(NEW, "msg_1", ts, BODY), ts=ts)


@pytest.mark.parametrize("ts", ["", "1.8e9", "-1", "soon", " 1800000000", "1800000000.5", "9" * 13])
def test_a_timestamp_that_is_not_whole_unix_seconds_is_refused(ts: str) -> None:
    with pytest.raises(Unauthorized):
        check([NEW], sign(NEW, "msg_1", int(NOW), BODY), timestamp=ts)


def test_missing_headers_are_named() -> None:
    with pytest.raises(Unauthorized, match=r"missing: webhook-timestamp, webhook-signature"):
        verify([NEW], msg_id="msg_1", timestamp=None, signature=None, body=BODY, now=NOW)
    with pytest.raises(Unauthorized, match=r"missing: webhook-id$|missing: webhook-id\)"):
        verify([NEW], msg_id="", timestamp="1", signature="v1,x", body=BODY, now=NOW)


@pytest.mark.parametrize("msg_id", ["has space", "x" * 201, "caf\u00e9", "tab\there"])
def test_a_delivery_id_must_be_short_visible_ascii(msg_id: str) -> None:
    with pytest.raises(BadRequest, match="webhook-id"):
        webhooks.delivery_id(msg_id)
    assert webhooks.delivery_id(None) is None and webhooks.delivery_id("") is None
    assert webhooks.idempotency_key("t1", "msg_1") == "hook:t1:msg_1"
    assert webhooks.idempotency_key("t1", None) is None


def test_a_bad_delivery_id_is_told_only_to_an_authenticated_sender() -> None:
    long_id = "x" * 201
    with pytest.raises(Unauthorized):
        check([NEW], sign(OLD, long_id, int(NOW), BODY), msg_id=long_id)
    with pytest.raises(BadRequest, match="webhook-id"):
        check([NEW], sign(NEW, long_id, int(NOW), BODY), msg_id=long_id)


@pytest.mark.parametrize("secret", ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not base64!", "whsec_abc"])
def test_a_secret_must_be_whsec_and_standard_base64(secret: str) -> None:
    with pytest.raises(ValueError, match="signing secret"):
        signing_key(secret)


# --- the run input ---------------------------------------------------------------------------------


def test_json_bodies_are_parsed_by_content_type() -> None:
    assert parse_body(b'{"a": [1, 2.5, null]}', "application/json", None) == {"a": [1, 2.5, None]}
    assert parse_body(b'{"a": 1}', "application/cloudevents+json", None) == {"a": 1}
    assert parse_body(b"", "application/json", None) is None


@pytest.mark.parametrize("raw", [b"{", b"{'a': 1}", b"\xff\xfe{"])
def test_a_body_sent_as_json_that_is_not_json_is_a_400(raw: bytes) -> None:
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_body(raw, "application/json", None)


@pytest.mark.parametrize(
    "raw", [b'{"a": NaN}', b"[Infinity]", b"[-Infinity]", b"[1e309]", b"[-1e400]", b"[18446744073709551616]"]
)
def test_a_number_that_is_not_finite_or_beyond_64_bits_is_a_422(raw: bytes) -> None:
    with pytest.raises(InvalidInput, match="number"):
        parse_body(raw, "application/json", None)


def test_64_bit_integers_are_kept_exact() -> None:
    assert parse_body(b"[9223372036854775807, -9223372036854775808]", "application/json", None) == [2**63 - 1, -(2**63)]


def test_form_bodies_become_fields_and_repeats_become_lists() -> None:
    body = b"name=Ada+Lovelace&tag=a&tag=b&empty=&city=Z%C3%BCrich"
    assert parse_body(body, "application/x-www-form-urlencoded", None) == {
        "name": "Ada Lovelace",
        "tag": ["a", "b"],
        "empty": "",
        "city": "Z\u00fcrich",
    }
    with pytest.raises(BadRequest, match="UTF-8"):
        parse_body(b"a=%ff", "application/x-www-form-urlencoded", None)
    with pytest.raises(BadRequest, match="fields"):
        parse_body(b"&".join(b"f%d=1" % i for i in range(1001)), "application/x-www-form-urlencoded", None)


def test_other_bodies_are_text_in_their_charset() -> None:
    assert parse_body(b"hello", "text/plain", None) == "hello"
    assert parse_body(b"<a>1</a>", "application/xml", None) == "<a>1</a>"
    assert parse_body(b'{"not": "parsed"}', "application/octet-stream", None) == '{"not": "parsed"}'
    assert parse_body("caf\u00e9".encode("latin-1"), "text/plain", "latin-1") == "caf\u00e9"


def test_binary_or_unknown_charset_bodies_are_a_415() -> None:
    with pytest.raises(UnsupportedMediaType, match="binary"):
        parse_body(b"\x89PNG\r\n\x1a\n\xff", "image/png", None)
    with pytest.raises(UnsupportedMediaType, match="charset"):
        parse_body(b"x", "text/plain", "klingon-8")


def test_what_postgresql_cannot_store_is_a_422() -> None:
    with pytest.raises(InvalidInput, match="NUL"):
        parse_body(b'{"a": "x\\u0000y"}', "application/json", None)
    with pytest.raises(InvalidInput, match="NUL"):
        parse_body(b'{"x\\u0000": 1}', "application/json", None)
    with pytest.raises(InvalidInput, match="NUL"):
        parse_body(b"a\x00b", "text/plain", None)
    assert parse_body(b"[" * 64 + b"]" * 64, "application/json", None) is not None
    with pytest.raises(InvalidInput, match="nested too deeply"):
        parse_body(b"[" * 65 + b"]" * 65, "application/json", None)
    with pytest.raises(InvalidInput, match="nested too deeply"):
        parse_body(b"[" * 200_000 + b"]" * 200_000, "application/json", None)
    with pytest.raises(InvalidInput, match="query"):
        webhooks.run_input(None, {}, webhooks.query_values([("a", "x\x00")]))


def test_a_run_input_must_fit_in_one_message() -> None:
    check_fits({"body": "x" * 100}, 200)
    with pytest.raises(PayloadTooLarge, match="bytes once encoded"):
        check_fits({"body": "\u00e9" * 100}, 200)  # counted in UTF-8 bytes, not characters
    with pytest.raises(InvalidInput, match="surrogate"):
        check_fits({"body": parse_body(b'["\\ud800"]', "application/json", None)}, 10_000)


def test_only_safe_headers_reach_the_flow() -> None:
    given = [
        ("Content-Type", "application/json"),
        ("User-Agent", "Svix-Webhooks/1.0"),
        ("X-GitHub-Event", "push"),
        ("webhook-id", "msg_1"),
        ("Accept", "a"),
        ("accept", "b"),
        ("Authorization", "Bearer t"),
        ("Proxy-Authorization", "Basic x"),
        ("Cookie", "s=1"),
        ("X-Api-Key", "k"),
        ("X-Hub-Signature-256", "sha256=..."),
        ("webhook-signature", "v1,..."),
        ("webhook-timestamp", "1"),
        ("X-Gitlab-Token", "t"),
        ("X-Shopify-Hmac-Sha256", "h"),
        ("X-Client-Secret", "s"),
        ("Host", "example.test"),
        ("Content-Length", "2"),
        ("Connection", "keep-alive"),
        ("Transfer-Encoding", "chunked"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("traceparent", "00-..."),
        ("X-Request-Id", "r1"),
        ("X-Odd", "\udcff"),
    ]
    assert safe_headers(given) == {
        "content-type": "application/json",
        "user-agent": "Svix-Webhooks/1.0",
        "x-github-event": "push",
        "webhook-id": "msg_1",
        "accept": "a, b",
        "x-shopify-hmac-sha256": "h",
        "x-odd": "?",
    }


def test_the_run_input_is_body_headers_and_query() -> None:
    query = webhooks.query_values([("a", "1"), ("a", "2"), ("b", "")])
    assert webhooks.run_input({"x": 1}, {"h": "v"}, query) == {
        "body": {"x": 1},
        "headers": {"h": "v"},
        "query": {"a": ["1", "2"], "b": ""},
    }


# --- the trigger behind a token --------------------------------------------------------------------


def target(**kw: Any) -> WebhookTarget:
    trigger = Trigger(
        id="t1",
        flow_id="f1",
        type="webhook",
        name="in",
        config={"signed": kw.pop("signed", False)},
        enabled=kw.pop("enabled", True),
    )
    return WebhookTarget(
        trigger=trigger,
        tenant_id="acme",
        flow_active=kw.pop("flow_active", True),
        published=kw.pop("published", True),
        **kw,
    )


def test_a_hook_holds_the_keys_of_its_secrets_and_fails_closed() -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
    hook = Hook.of(target(signed=True, signing_secrets=[secret, "not-a-secret"]))
    assert hook.signed and hook.keys == (b"k" * 24,) and hook.tenant_id == "acme"
    assert Hook.of(target(signing_secrets=[secret])).signed  # a secret means signed, whatever the config
    broken = Hook.of(target(signed=True))
    assert broken.signed and broken.keys == ()
    assert not Hook.of(target()).signed


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"enabled": False}, "trigger is disabled"),
        ({"flow_active": False}, "deactivated"),
        ({"published": False, "flow_active": False}, "no published version"),
    ],
)
def test_a_disabled_trigger_or_an_inactive_flow_is_a_conflict(state: dict[str, bool], message: str) -> None:
    with pytest.raises(Conflict, match=message):
        Hook.of(target(**state)).check_accepting()
    Hook.of(target()).check_accepting()


def test_plausible_tokens() -> None:
    assert webhooks.plausible_token("A" * 32) and webhooks.plausible_token("abc_DEF-123456789")
    assert not webhooks.plausible_token("short")
    assert not webhooks.plausible_token("x" * 129)
    assert not webhooks.plausible_token("a" * 20 + "/..")
