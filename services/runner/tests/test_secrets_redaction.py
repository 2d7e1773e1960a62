"""What a step records instead of its secrets and literal credentials: pure, no I/O."""

from __future__ import annotations

import base64
from urllib.parse import quote

from flowmesh.runner.outcome import Outcome
from flowmesh.runner.secrets import REDACTED, Redactor, redact_request, redact_url, step_secrets

VALUE = "s3cr/t v@lue+ü"


def test_every_form_of_a_secret_becomes_its_placeholder_wherever_it_is() -> None:
    r = Redactor({"TOK": VALUE})
    echoed = {
        "raw": f"got {VALUE}!",
        "url": f"http://h/p?x={quote(VALUE, safe='')}",
        "json": '{"v": "' + VALUE.replace("ü", "\\u00fc") + '"}',
        "b64": base64.b64encode(VALUE.encode()).decode(),
        VALUE: [VALUE, 1, None],
    }
    scrubbed = r.scrub(echoed)
    assert VALUE not in str(scrubbed) and quote(VALUE, safe="") not in str(scrubbed)
    assert scrubbed["raw"] == "got [secret:TOK]!"
    assert scrubbed["url"] == "http://h/p?x=[secret:TOK]"
    assert scrubbed["[secret:TOK]"] == ["[secret:TOK]", 1, None]


def test_a_short_secret_never_garbles_a_placeholder_already_put_in() -> None:
    r = Redactor({"LONG": "abcabc", "A": "a"})
    assert r.text("xabcabcx a") == "x[secret:LONG]x [secret:A]"


def test_credential_headers_and_key_like_query_values_are_hidden_unless_they_hold_secrets() -> None:
    r = Redactor({"TOK": VALUE})
    request = {
        "method": "GET",
        "url": f"https://u:pw@api.example/p?api_key=literal&q=1&token={quote(VALUE, safe='')}#top",
        "headers": {
            "Authorization": f"Bearer {VALUE}",
            "X-Api-Key": "literal-key",
            "Cookie": "sid=1",
            "Proxy-Authorization": "Basic dTpw",
            "Accept": "application/json",
            "Idempotency-Key": "run:step",
        },
        "query": {"key": "literal", "page": "2", "access_token": VALUE},
    }
    found = r.outcome(Outcome(ok=True, output={"echo": VALUE}, input=request))
    assert found.output == {"echo": "[secret:TOK]"}
    assert found.input["headers"] == {
        "Authorization": "Bearer [secret:TOK]",
        "X-Api-Key": REDACTED,
        "Cookie": REDACTED,
        "Proxy-Authorization": REDACTED,
        "Accept": "application/json",
        "Idempotency-Key": "run:step",
    }
    assert found.input["query"] == {"key": REDACTED, "page": "2", "access_token": "[secret:TOK]"}
    assert found.input["url"] == "https://u:redacted@api.example/p?api_key=[redacted]&q=1&token=[secret:TOK]#top"


def test_literal_credentials_are_hidden_without_any_secret() -> None:
    found = redact_request({"url": "https://api.example/?key=AIza123", "headers": {"authorization": "Bearer x"}})
    assert found == {"url": "https://api.example/?key=[redacted]", "headers": {"authorization": REDACTED}}
    assert redact_url("https://api.example/p?q=1") == "https://api.example/p?q=1"


def test_a_failure_message_is_scrubbed_too() -> None:
    failed = Redactor({"TOK": VALUE}).outcome(Outcome.failure(f"GET http://h/{VALUE} failed", "network"))
    assert failed.message == "GET http://h/[secret:TOK] failed"


def test_the_secrets_a_step_reads_are_found_by_name_in_its_templates() -> None:
    data = {
        "url": "https://h/{{ secrets.A }}",
        "headers": {"Authorization": "Bearer {{ secrets.TOKEN }}", "X": "{{ input.secrets.NOT_ONE }}"},
        "body": {"list": ["{{ secrets.B + secrets.A }}"]},
    }
    assert step_secrets(data) == ["A", "B", "TOKEN"]
    assert step_secrets({"url": "https://h/{{ input.x }}"}) == []
