"""`guard transfer plan | start | cutover | complete | status | report`: a branch changes hands (docs/transfer.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson

from guard.cli.main import _settings, main
from guard.errors import GuardError

if TYPE_CHECKING:
    from guard.config import Settings
    from guard.transfer.plan import Plan
    from guard.transfer.service import TransferService

PLAN = click.argument("plan_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
POLICY = click.option("--policy-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                      help="The policy directory whose entities change (default: the policy_dir setting).")


@main.group("transfer")
def transfer() -> None:
    """Transfer a branch to another organisation: plan, start, cutover, complete, status, report."""


def _plan(path: Path) -> Plan:
    from guard.transfer.plan import load_plan

    return load_plan(path)


def _dsn(settings: Settings, branch: str) -> str:
    if branch == settings.branch:
        return settings.branch_dsn
    if branch == settings.branch2 and settings.branch2_dsn:
        return settings.branch2_dsn
    raise GuardError(f"no database DSN for branch {branch} (settings branch / branch2)")


def customer_ids(settings: Settings, branch: str) -> list[int]:
    """The customer ids of the branch database (`customers` table), what the plan's default applies to."""
    from guard.workload.branch import connect

    with connect(_dsn(settings, branch)) as conn:
        return [int(row[0]) for row in conn.execute("SELECT customer_id FROM customers").fetchall()]


def _service(ctx: click.Context, plan_file: Path, policy_dir: Path | None) -> TransferService:
    from guard.transfer.service import TransferService

    settings = _settings(ctx)
    plan = _plan(plan_file)
    return TransferService(settings, plan, policy_dir=policy_dir,
                           customer_ids=lambda: customer_ids(settings, plan.branch))


def _echo(doc: Any) -> None:
    click.echo(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS).decode())


@transfer.command("plan")
@PLAN
@click.option("--no-db", is_flag=True, help="Don't read the branch database (validate the file only).")
@click.pass_context
def plan_cmd(ctx: click.Context, plan_file: Path, no_db: bool) -> None:
    """Validate a plan; print what it does to the branch database's customers (counts)."""
    from guard.transfer.plan import resolve

    try:
        plan = _plan(plan_file)
        ids = [] if no_db else customer_ids(_settings(ctx), plan.branch)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
    resolved = resolve(plan, ids)
    counts = {d: sum(1 for v in resolved.values() if v == d) for d in ("move", "destroy", "retain")}
    _echo({"valid": True, "plan": plan.as_dict(), "customers": len(resolved),
           "customers_in_database": None if no_db else len(set(ids)), **counts})


@transfer.command("start")
@PLAN
@POLICY
@click.pass_context
def start_cmd(ctx: click.Context, plan_file: Path, policy_dir: Path | None) -> None:
    """Record the plan, prepare the incoming owner's branch key, mark the branch `transferring`."""
    from guard.transfer.service import status

    try:
        _echo(status(_service(ctx, plan_file, policy_dir).start()))
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None


@transfer.command("cutover")
@PLAN
@POLICY
@click.pass_context
def cutover_cmd(ctx: click.Context, plan_file: Path, policy_dir: Path | None) -> None:
    """At or after the cut-off: hand the branch over (policy, keys, shreds, storage-only); resumable."""
    from guard.transfer.service import status

    try:
        _echo(status(_service(ctx, plan_file, policy_dir).cutover()))
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None


@transfer.command("complete")
@PLAN
@POLICY
@click.option("--reader-username", default=None,
              help="The Kafka principal that reads guard.audit and guard.deletions for the verification (the "
                   "secured stack: oncall; default: the settings' principal).")
@click.option("--reader-password-file", type=click.Path(dir_okay=False), default=None,
              help="That principal's password file.")
@click.pass_context
def complete_cmd(ctx: click.Context, plan_file: Path, policy_dir: Path | None, reader_username: str | None,
                 reader_password_file: str | None) -> None:
    """Check the cut-over's promises, verify the audit chains over the transfer's span, close it."""
    import dataclasses

    from guard.audit.note import load_verifier, public_path
    from guard.audit.writer import signing_key_path
    from guard.transfer.report import verify_span
    from guard.transfer.service import status

    try:
        service = _service(ctx, plan_file, policy_dir)
        reader = service.settings
        if reader_username:
            reader = dataclasses.replace(reader, kafka_username=reader_username,
                                         kafka_password_file=reader_password_file or reader.kafka_password_file)
        verifier = load_verifier(public_path(signing_key_path(service.settings)))
        state = service.complete(lambda st: verify_span(
            reader, st, verifier, service.store.audit_checkpoints(service.settings.audit_topic)))
        _echo({**status(state), "verification": state.get("verification")})
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
    if not (state.get("verification") or {}).get("ok"):
        sys.exit(1)


def _state(ctx: click.Context, plan_file: Path) -> dict[str, Any]:
    from guard.pipeline.runtime import build_keys
    from guard.transfer.state import StateStore, check_plan

    plan = _plan(plan_file)
    keys = build_keys(_settings(ctx), listen=False)
    state = StateStore(keys.store.client, keys.store.name).load(plan.id)
    if state is None:
        raise GuardError(f"transfer {plan.id} was not started")
    check_plan(state, plan.as_dict())
    return state


@transfer.command("status")
@PLAN
@click.pass_context
def status_cmd(ctx: click.Context, plan_file: Path) -> None:
    """The transfer's phase, steps done and left, counts."""
    from guard.transfer.service import status

    try:
        _echo(status(_state(ctx, plan_file)))
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None


@transfer.command("report")
@PLAN
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.pass_context
def report_cmd(ctx: click.Context, plan_file: Path, json_out: Path, html_out: Path) -> None:
    """Write the report (JSON and HTML); regenerating it gives the same content."""
    from guard.transfer.report import build, to_html, to_json

    try:
        state = _state(ctx, plan_file)
        report = build(_settings(ctx), state)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
    json_out.write_bytes(to_json(report))
    html_out.write_text(to_html(report), encoding="utf-8")
    c, access = report["counts"], report["access_after_cutoff"]
    # a state recorded by an older guard does not say which ids the database lacked: only the scope's size
    moved = c["moved"] if c["moved"] is not None else f"{c['move_scope']} (named by the plan or the database)"
    others = "".join(f", {o} {n}" for o, n in sorted(c["destroy_outcomes"].items()) if o != "shredded")
    click.echo(f"transfer {report['transfer']} ({report['phase']}): moved {moved}, destroyed (shredded) "
               f"{c['destroyed']} of {c['out_of_scope']} out of scope{others} ({c['confirmations_on_topic']} "
               f"confirmations on the topic), held storage-only {c['held_storage_only']} ({c['held_by_legal_hold']} "
               f"by a legal hold), {len(access['attempts'])} access attempts after the cut-off by former staff "
               f"({access['allowed']} allowed), {len(report['anomalies'])} anomalies; audit chains "
               f"{'verified' if (report.get('verification') or {}).get('ok') else 'NOT verified'}")
