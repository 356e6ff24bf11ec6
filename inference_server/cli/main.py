"""`inference-server`: one entry point for every role. Heavy imports happen inside commands, so
`inference-server api` never loads torch and `--help` is instant."""

from __future__ import annotations

import json
from typing import Any

import click
from pydantic import ValidationError

from inference_server.cli.tenants_cmd import max_concurrent_option, max_priority_option
from inference_server.errors import ConfigurationError, InferenceError
from inference_server.logs import configure_logging
from inference_server.settings import Settings, get_settings


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:  # one line, each setting named as the environment spells it
        raise ConfigurationError("; ".join(map(_problem, exc.errors())), code="invalid_settings") from exc


def _problem(err: Any) -> str:
    name = "_".join(str(p) for p in err["loc"]).upper()
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{name}: {msg}" if name else msg


class Group(click.Group):
    """Turns domain errors into one clear line and exit code 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except InferenceError as exc:
            raise click.ClickException(f"{exc.code}: {' '.join(exc.message.split())}") from exc


@click.group(cls=Group)
@click.option("--log-level", default=None, help="Default: LOG_LEVEL (INFO).")
@click.option(
    "--log-format",
    default=None,
    type=click.Choice(["text", "json", "auto"]),
    help="Default: LOG_FORMAT (auto).",
)
@click.pass_context
def cli(ctx: click.Context, log_level: str | None, log_format: str | None) -> None:
    """A distributed diffusion job system: API, GPU workers, webhook dispatcher."""
    try:
        settings = get_settings()
        fmt, level = settings.log_format, settings.log_level
    except ValidationError:  # the command itself reports the invalid settings, in one line
        fmt, level = "auto", "INFO"
    role = ctx.invoked_subcommand or "cli"
    configure_logging(log_format or fmt, log_level or level, role=role)


@cli.command()
def migrate() -> None:
    """Create or upgrade the database schema (alembic upgrade head)."""
    from inference_server.migrate import upgrade

    settings = _settings()
    upgrade(settings.database_url)
    click.echo(f"database at head: {settings.database_url.split('@')[-1]}")


@cli.command()
@click.option("--host", default=None, help="Default: API_HOST.")
@click.option("--port", type=int, default=None, help="Default: API_PORT.")
@click.option("--workers", "processes", type=int, default=1, show_default=True, help="Uvicorn processes.")
def api(host: str | None, port: int | None, processes: int) -> None:
    """Run the HTTP API (and the outbox relay inside it)."""
    import uvicorn

    settings = _settings()
    uvicorn.run(
        "api.main:app",
        factory=False,
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=processes,
        log_level="warning",
        log_config=None,  # our handler and format (inference_server.logs), not uvicorn's own
        access_log=False,  # api.access_log writes one line per request, with its id
        # Event streams stay open until their job ends: without a bound a stop would wait for them.
        timeout_graceful_shutdown=int(settings.api_shutdown_grace) or None,
    )


@cli.command()
@click.option("--families", required=True, help="Comma-separated families whose queues this worker consumes.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda:N (pins GPU N), cuda or mps.")
@click.option("--pool", default="prefork", show_default=True, type=click.Choice(["prefork", "solo"]))
def worker(families: str, device: str, pool: str) -> None:
    """Run one Celery worker (one per GPU) for the given families."""
    from workers.launcher import run_worker

    run_worker(_settings(), [f.strip() for f in families.split(",") if f.strip()], device, pool=pool)


@cli.command()
@click.option("--gpus", default="all", show_default=True, help="'all' or comma-separated GPU indexes.")
@click.option("--families", default=None, help="Limit to these families (default: every family that fits).")
def workers(gpus: str, families: str | None) -> None:
    """Start one worker per GPU, each on the families whose models fit its memory."""
    from workers.gpus import run_gpu_workers

    run_gpu_workers(_settings(), gpus, families.split(",") if families else None)


@cli.command()
def dispatcher() -> None:
    """Deliver webhooks (and relay the outbox) until stopped."""
    from inference_server.roles.dispatcher import run_dispatcher

    run_dispatcher(_settings())


@cli.command()
def ingress() -> None:
    """Consume job requests from RabbitMQ (INGRESS_QUEUE) and create their jobs."""
    from inference_server.roles.ingress import run_ingress

    run_ingress(_settings())


@cli.group()
def keys() -> None:
    """API keys and webhook secrets."""


@keys.command("create")
@click.option("--tenant", required=True)
@click.option("--admin", is_flag=True, help="The key may manage shared models and LoRAs (operator scope).")
@max_priority_option
@max_concurrent_option
def keys_create(tenant: str, admin: bool, max_priority: str | None, max_concurrent: int | None) -> None:
    """Create a tenant (if new) and an API key; prints JSON {"api_key", "webhook_secret"}. The
    limits, when given, are set on the tenant (as `tenants set` does)."""
    from api.auth import create_tenant_key
    from inference_server.cli.tenants_cmd import apply_limits
    from inference_server.db import DatabaseTimeouts, make_database, make_session_factory

    settings = _settings()
    engine = make_database(settings.database_url, timeouts=DatabaseTimeouts.from_settings(settings))
    with make_session_factory(engine)() as session:
        row, key = create_tenant_key(session, tenant, admin=admin)
        if max_priority is not None or max_concurrent is not None:
            apply_limits(row, max_priority=max_priority, max_concurrent=max_concurrent)
            session.commit()
        click.echo(
            json.dumps(
                {"tenant": row.name, "api_key": key, "webhook_secret": row.webhook_secret, "admin": admin}
            )
        )
    engine.dispose()


@keys.command("rotate-webhook-secret")
@click.option("--tenant", required=True)
def keys_rotate(tenant: str) -> None:
    """Issue a new webhook secret; both sign deliveries during WEBHOOK_SECRET_GRACE_HOURS."""
    from inference_server.db import DatabaseTimeouts, make_database, make_session_factory
    from webhooks.secrets import rotate_webhook_secret

    settings = _settings()
    engine = make_database(settings.database_url, timeouts=DatabaseTimeouts.from_settings(settings))
    with make_session_factory(engine)() as session:
        secret = rotate_webhook_secret(session, tenant, settings.webhook_secret_grace_hours)
        click.echo(json.dumps({"tenant": tenant, "webhook_secret": secret}))
    engine.dispose()


def _register_commands() -> None:
    from inference_server.cli.generate import generate
    from inference_server.cli.keys_cmd import keys_list, keys_revoke
    from inference_server.cli.models_cmd import models
    from inference_server.cli.tenants_cmd import tenants
    from inference_server.cli.up import up

    keys.add_command(keys_list)
    keys.add_command(keys_revoke)
    cli.add_command(models)
    cli.add_command(tenants)
    cli.add_command(generate)
    cli.add_command(up)


_register_commands()


def main() -> None:
    cli(prog_name="inference-server")


if __name__ == "__main__":
    main()
