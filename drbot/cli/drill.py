"""drbot drill: restore into a throwaway sandbox, check the data, measure RTO and RPO."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from drbot.audit.trail import PUBLIC_NAME, load_public_key
from drbot.cli import build
from drbot.cli.common import (
    audit_trail,
    find_policy,
    json_option,
    load_settings,
    policies_option,
    print_json,
    recording_failure,
    stderr,
)
from drbot.cli.restore_dir import parse_at
from drbot.drills.evidence import keep_evidence
from drbot.drills.record import read_history
from drbot.drills.runner import DrillContext, DrillReport, run_drill
from drbot.drills.sandbox import Sandbox
from drbot.errors import UsageError
from drbot.settings import Settings


def build_sandbox(policy: Any, kind: str | None) -> Sandbox:
    from drbot.engines.postgres.localserver import find_bin_dir

    kind = kind or policy.drill.sandbox
    if policy.source.kind == "mongodb":
        if kind == "process":
            from drbot.drills.process_sandbox import MongoProcessSandbox

            return MongoProcessSandbox(policy.source.bin_dir)
        from drbot.drills.docker_sandbox import DockerSandbox

        d = policy.drill
        return DockerSandbox(
            image=d.image, pull=d.pull, cpus=d.cpus, memory=d.memory, engine="mongodb"
        )
    if kind == "process":
        from drbot.drills.process_sandbox import ProcessSandbox

        return ProcessSandbox(find_bin_dir(policy.source.bin_dir, "postgres"))
    from drbot.drills.docker_sandbox import DockerSandbox

    d = policy.drill
    return DockerSandbox(image=d.image, pull=d.pull, cpus=d.cpus, memory=d.memory)


@click.group("drill", invoke_without_command=True)
@click.option("--policy", "policy_name", default=None, help="Policy to drill (required).")
@click.option(
    "--from",
    "from_destination",
    default=None,
    help="Destination to restore from [default: the policy's drill.from; 'rotate' takes each "
    "in turn].",
)
@click.option(
    "--at",
    default=None,
    help="Restore point, ISO 8601 with zone [default: the policy's drill.pick, i.e. latest].",
)
@click.option(
    "--sandbox",
    "sandbox_kind",
    type=click.Choice(["docker", "process"]),
    default=None,
    help="Override the policy's drill.sandbox.",
)
@policies_option
@json_option
@click.pass_context
def command(
    ctx: click.Context,
    policy_name: str | None,
    from_destination: str | None,
    at: str | None,
    sandbox_kind: str | None,
    policies_dir: Path | None,
    as_json: bool,
) -> None:
    """Prove a backup restores: restore it into a throwaway sandbox and check it.

    The sandbox is a container with no network (docker, the default) or a server from this
    host's PostgreSQL binaries on a private socket (process). A physical policy restores its
    base backup and replays WAL; a logical one loads its dumps. Then drbot compares the data
    with the backup's fingerprint, runs amcheck on every btree index and the policy's own
    drill.checks, and measures RTO (drill start to checks passed) and RPO (age of the newest
    restorable point at drill start) against the policy's targets. The sandbox is removed
    afterwards, whatever happened. Every drill leaves a signed record in every destination and
    in the state directory (see `drbot drill history`) and an audit event.

    Exit 0: passed. 20: a check failed or a target was missed. 13: the backup is unusable.
    10: nothing to restore. 15: destination unreachable. 17: no sandbox (Docker or image
    missing). 130: interrupted (the sandbox is still removed).

    \b
    Examples:
      drbot drill --policy shop
      drbot drill --policy shop --from replica --json
      drbot drill --policy shop --at 2026-11-23T14:05:00Z --sandbox process
      drbot drill history --policy shop
    """
    if ctx.invoked_subcommand is not None:
        return
    if policy_name is None:
        raise UsageError("--policy is required", hint="drbot drill --policy NAME")
    settings = load_settings(policies_dir)
    policy = find_policy(settings, policy_name)
    when = parse_at(at) if at is not None else None
    storages = build.build_storages(policy)
    trail = audit_trail(settings)
    sandbox = build_sandbox(policy, sandbox_kind)
    subject: dict[str, Any] = {"from": from_destination, "at": at, "sandbox": sandbox.kind}
    from drbot.engines.postgres.localserver import find_bin_dir

    with recording_failure(trail, "drill.refused", policy=policy.name, subject=subject):
        swept = sandbox.sweep()
        if swept:
            stderr.print(f"Removed {swept} sandbox(es) left behind by an earlier drill.")
        history, _ = read_history(policy.name, settings.state_dir, [])
        last = next(
            (h.record.get("destination") for h in reversed(history) if h.signature != "bad"), None
        )
        say = (lambda _m: None) if as_json else (lambda m: stderr.print(f"[dim]{m}…[/dim]"))
        report = run_drill(
            DrillContext(
                policy=policy,
                storages=storages,
                keys=build.build_keys(policy),
                sandbox=sandbox,
                bin_dir=(
                    find_bin_dir(policy.source.bin_dir, "pg_restore")
                    if policy.source.kind == "postgresql"
                    else None  # MongoDB drills use no client tools
                ),
            ),
            at=when,
            from_destination=from_destination,
            last_destination=last,
            progress=say,
        )
    _publish(settings, trail, storages, report, as_json)


def _publish(
    settings: Settings, trail: Any, storages: Any, report: DrillReport, as_json: bool
) -> None:
    envelope, stored = keep_evidence(
        report, trail.signing_key(), trail, settings.state_dir, storages
    )
    record = envelope["record"]
    failure = report.failure()
    if as_json:
        print_json(
            {**record, "stored_in": list(stored.destinations), "exit_code": report.exit_code}
        )
    else:
        _print(report, stored.destinations)
    for dest, why in stored.failed.items():
        stderr.print(f"Warning: the drill record could not be stored in {dest}: {why}")
    if failure is not None:
        raise failure


def _print(report: DrillReport, stored_in: tuple[str, ...]) -> None:
    verdict = "PASSED" if report.passed else "FAILED"
    click.echo(f"Drill {report.drill_id} of policy {report.policy}: {verdict}")
    click.echo(f"  from        {report.destination} ({report.sandbox} sandbox, {report.image})")
    click.echo(f"  backup      {report.backup_id} (target: {report.target})")
    point = report.restore_point.isoformat() if report.restore_point else "unknown"
    click.echo(f"  reached     {point}")
    rto = f"{report.rto_s:.1f}s" if report.rto_s is not None else "not reached"
    rpo = f"{report.rpo_s:.1f}s" if report.rpo_s is not None else "unknown"
    click.echo(f"  RTO {rto}   RPO {rpo}")
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in report.phases.items())
    click.echo(f"  phases      {phases}")
    for check in report.checks:
        mark = "ok  " if check.passed else "FAIL"
        click.echo(f"  [{mark}] {check.name}: {check.detail}")
    if stored_in:
        click.echo(f"  record      stored in {', '.join(stored_in)} and the state directory")


@command.command("history")
@click.option("--policy", "policy_name", required=True, help="Policy whose drills to list.")
@policies_option
@json_option
def history_command(policy_name: str, policies_dir: Path | None, as_json: bool) -> None:
    """List past drills of a policy, from the state directory and every destination.

    Each record's signature is checked against this host's audit public key (audit.pub in the
    audit directory): `ok`, `other-key` (intact, but signed by another host's key, or no key
    here to check against) or `bad` (the record was altered or damaged).
    """
    settings = load_settings(policies_dir)
    policy = find_policy(settings, policy_name)
    public = settings.audit_directory / PUBLIC_NAME
    trusted = load_public_key(public) if public.exists() else None
    entries, unreachable = read_history(
        policy.name, settings.state_dir, build.build_storages(policy), trusted
    )
    for dest, why in unreachable.items():
        stderr.print(f"Warning: destination {dest} unreachable: {why}")
    if as_json:
        print_json(
            [{**e.record, "signature": e.signature, "found_in": list(e.found_in)} for e in entries]
        )
        return
    if not entries:
        click.echo(
            f"No drills of policy {policy.name} yet. Run: drbot drill --policy {policy.name}"
        )
        return
    for e in entries:
        r = e.record
        verdict = "passed" if r.get("passed") else "FAILED"
        sig = {
            "ok": "",
            "other-key": "  (signed by another key than this host's audit key)",
            "bad": "  (ALTERED OR DAMAGED: signature does not verify)",
        }[e.signature]
        click.echo(
            f"{r.get('drill_id')}  {verdict:6}  from {r.get('destination')}  "
            f"backup {r.get('backup_id')}  RTO {r.get('rto_s')}s  RPO {r.get('rpo_s')}s"
            f"  in {', '.join(e.found_in)}{sig}"
        )
