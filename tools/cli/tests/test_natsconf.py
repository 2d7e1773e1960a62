"""``flowmesh nats-config``: the NATS server's users, rendered from the contracts' permissions."""

from __future__ import annotations

from typer.testing import CliRunner

from flowmesh.cli.main import app
from flowmesh.cli.natsconf import password_var, render_auth_config


def test_every_service_is_a_user_whose_password_comes_from_the_environment() -> None:
    text = render_auth_config()
    for service in ("gateway", "flows", "runner", "scheduler", "usage"):
        assert f"user: {service}\n" in text
        assert f"password: ${password_var(service)}\n" in text
    assert "integrator" not in text
    # quoted: unquoted, nats-server would read "$JS..." as a variable reference
    assert '"$JS.API.INFO"' in text and "\n            $JS" not in text


def test_integrators_get_users_of_their_own_tenant_only() -> None:
    text = render_auth_config(["acme", "has space"])
    assert "user: integrator-acme\n" in text and "$FM_NATS_PASSWORD_INTEGRATOR_ACME" in text
    assert '"fm.events.acme.>"' in text and '"fm.runs.acme.>"' in text
    # a tenant id that is not a safe subject token is hashed, never spliced into a subject
    assert "has space" not in text.replace("integrator of tenant has space", "")


def test_the_command_prints_the_configuration_and_refuses_an_empty_tenant() -> None:
    runner = CliRunner()
    done = runner.invoke(app, ["nats-config", "--integrator", "acme"])
    assert done.exit_code == 0 and done.output == render_auth_config(["acme"])
    refused = runner.invoke(app, ["nats-config", "--integrator", " "])
    assert refused.exit_code == 2 and "needs a tenant id" in refused.output
    assert "FM_NATS_PASSWORD_GATEWAY" in runner.invoke(app, ["nats-config", "--help"]).output
