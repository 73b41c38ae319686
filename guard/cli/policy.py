"""`guard policy validate` and `guard policy check`: the access policy from the command line."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from guard.cli.main import _settings, dumps_json, main
from guard.cli.policy_engine import policy_directory
from guard.errors import GuardError


@main.group("policy")
def policy() -> None:
    """The Cedar access policy (docs/policy.md): validate a policy directory, explain one decision."""


@policy.command("validate")
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@click.pass_context
def validate(ctx: click.Context, directory: str | None) -> None:
    """Parse the schema, validate every policy and entity against it; non-zero exit on any error."""
    from guard.policy.engine import PolicyError, load_directory

    path = policy_directory(_settings(ctx), directory)
    try:
        loaded = load_directory(path)
    except PolicyError as exc:
        click.echo(f"INVALID {path}: {exc}", err=True)
        ctx.exit(1)
        return
    click.echo(f"OK {path}: {len(loaded.ids)} policies, {len(loaded.entity_docs)} entities, "
               f"digest {loaded.digest[:16]}")
    for name in loaded.ids.values():
        click.echo(f"  @id({name})")


@policy.command("check")
@click.option("--principal", required=True, help='Who asks, e.g. Staff::"t0101-02" (or Staff:t0101-02).')
@click.option("--action", required=True, type=click.Choice(["write", "delete", "reveal", "export", "search",
                                                             "shred"]))
@click.option("--resource", required=True, help='What, e.g. Table::"0101:public.customers", DataSubject::"0101:7".')
@click.option("--time", "when", help="When (ISO-8601; default: now). Cedar has no clock: the time is context.")
@click.option("--purpose", default="customer_service", show_default=True)
@click.option("--source", default="cli", show_default=True)
@click.option("--volume", default=1, show_default=True, type=int)
@click.option("--field-class", type=click.Choice(["C1", "C2", "C3"]), help="The class of the fields asked.")
@click.option("--dir", "directory", type=click.Path(file_okay=False), help="Policy directory (default: policy_dir).")
@click.option("--staff", type=click.Choice(["db", "file"]), help="Staff entities from the branch database or "
              "entities.json only (default: the policy_staff setting).")
@click.option("--consent", multiple=True, help="A purpose the data subject consented to (repeatable; for a "
              "DataSubject the entities don't define).")
@click.option("--legal-hold", is_flag=True, help="The data subject is under legal hold (same).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def check(ctx: click.Context, principal: str, action: str, resource: str, when: str | None, purpose: str,
          source: str, volume: int, field_class: str | None, directory: str | None, staff: str | None,
          consent: tuple[str, ...], legal_hold: bool, as_json: bool) -> None:
    """Decide one request and explain it: decision, determining policies, errors. Exit 0 allow, 3 deny.

    A data subject (`DataSubject::"<branch>:<id>"`) or table (`Table::"<branch>:<schema.table>"`) the policy's
    entities don't define is given to the engine for this request only, as the reveal service and the
    sanitizer do (the subject in its branch, with `--consent` and `--legal-hold`; the table in its branch).
    """
    from guard.cli.policy_engine import load_engine, staff_unreadable
    from guard.policy.engine import parse_uid
    from guard.policy.model import entity, ref, subject_entity

    settings = _settings(ctx)
    try:
        at = datetime.fromisoformat(when.replace("Z", "+00:00")) if when else datetime.now(UTC)
    except ValueError:
        raise click.BadParameter(f"{when!r} is not an ISO-8601 time", param_hint="--time") from None
    loaded = load_engine(settings, directory, staff)
    engine, use_db = loaded.engine, loaded.staff_from_db
    if loaded.source_error is not None:
        click.echo(f"warning: {staff_unreadable(loaded)}; staff are decided as unknown (denied)", err=True)
    try:
        ctx_values: dict[str, object] = {"time": at, "purpose": purpose, "source": source, "volume": volume}
        if field_class:
            ctx_values["field_class"] = field_class
        who, what = parse_uid(principal), parse_uid(resource)
        supplied: list[dict[str, object]] = []
        kind = what[0].rsplit("::", 1)[-1]
        branch, sep, rest = what[1].partition(":")
        if kind in ("DataSubject", "Table") and sep and not engine.knows(what):
            supplied.append(subject_entity(branch, rest, consent=consent, legal_hold=legal_hold)
                            if kind == "DataSubject" else
                            entity("Table", what[1], {"branch": ref("Branch", branch), "name": rest,
                                                      "subject_root": False}, [("Branch", branch)]))
        unknown = [] if engine.knows(who) else [principal]
        if not supplied and not engine.knows(what):
            unknown.append(resource)
        decision = engine.decide(who, action, what, ctx_values, entities=supplied or None)
    except GuardError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(dumps_json({**decision.as_dict(), "principal": principal, "action": action,
                               "resource": resource, "time": at.isoformat(), "purpose": purpose,
                               "unknown_entities": unknown, "request_entities": supplied,
                               "policy_digest": engine.digest}).decode())
    else:
        click.echo(f"decision: {decision.decision.upper()}")
        click.echo(f"  request: {principal} {action} {resource} at {at.isoformat()} purpose={purpose} "
                   f"source={source} volume={volume}" + (f" field_class={field_class}" if field_class else ""))
        click.echo(f"  why: {decision.reason}")
        click.echo("  determining policies: " + (", ".join(decision.policies) or "none (default deny)"
                                                 if not decision.allowed else ", ".join(decision.policies)))
        if supplied:
            click.echo(f"  {kind} {what[1]} is not among the policy's entities: decided as one of branch {branch}"
                       + (f", consent {sorted(consent)}, legal hold {legal_hold}" if kind == "DataSubject" else "")
                       + " (for this request only)")
        for text in unknown:
            click.echo(f"  unknown: {text} is not among the policy's entities (staff from "
                       f"{'the branch database' if use_db else 'entities.json'}): it gets no permit")
        for error in decision.errors:
            click.echo(f"  error: {error}")
        click.echo(f"  policy digest: {engine.digest[:16]}")
    ctx.exit(0 if decision.allowed else 3)
