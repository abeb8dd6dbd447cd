"""drbot keys: create key files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from drbot.cli import build
from drbot.cli.common import (
    audit_trail,
    find_policy,
    json_option,
    load_policies,
    load_settings,
    policies_option,
    print_json,
    recording_failure,
    stderr,
)
from drbot.errors import KeyInUse, PartialFailure, UsageError
from drbot.ops.rotate import (
    KeyInventory,
    RotationPlan,
    check_new_key,
    execute_rotation,
    inventory,
    key_ids,
    plan_rotation,
    still_under,
)
from drbot.ops.shred import same_key, shred
from drbot.pipeline.filekey import generate_key_file
from drbot.pipeline.keyref import key_provider_from_ref, key_ref_needs_region


@click.group("keys")
def command() -> None:
    """Manage encryption keys: create, rotate, check before retiring, shred."""


@command.command("generate")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where to write the key (must not exist).",
)
@policies_option
def generate(out: Path, policies_dir: Path | None) -> None:
    """Write a new random 256-bit key (base64) to FILE with mode 0600.

    Keep a copy somewhere other than the backups: without it they cannot be decrypted.

    \b
    Example:
      drbot keys generate --out /etc/drbot/keys/shop.key
    """
    settings = load_settings(policies_dir)  # keys do not depend on policies
    key_id = generate_key_file(out)
    audit_trail(settings).record(
        "key.generated", subject={"key_id": key_id}, details={"path": str(out.absolute())}
    )
    click.echo(f"Wrote key {key_id} to {out} (mode 0600).")
    click.echo("Store a copy of this key away from the backups: without it they cannot be read.")


def _summary(inv: KeyInventory) -> dict[str, Any]:
    return {
        "manifests": [
            {"destination": m.destination, "backup_id": m.backup_id, "key_id": m.key_id}
            for m in inv.manifests
        ],
        "wal": [
            {
                "destination": g.destination,
                "key_id": g.effective_key_id,
                "objects": g.objects,
                "example": g.example,
            }
            for g in inv.wal
        ],
        "problems": inv.problems,
    }


@command.command("rotate")
@click.option("--policy", "policy_name", required=True, help="Policy whose backups to re-wrap.")
@click.option("--to", "to_ref", required=True, help="The new key: file:PATH or kms:REF.")
@click.option("--dry-run", is_flag=True, help="Show what would be re-wrapped; write nothing.")
@policies_option
@json_option
def rotate(
    policy_name: str, to_ref: str, dry_run: bool, policies_dir: Path | None, as_json: bool
) -> None:
    """Re-wrap every data key of a policy under a new key, without touching any data.

    Every manifest in every destination gets its data key wrapped by the new key (checked by
    reading it back and opening it with the new key alone); every WAL object's data key gets a
    re-wrapped entry beside it. Data objects are never read or written: their bytes, ETags and
    object lock are unchanged. Safe to interrupt and to run again: what is done is skipped,
    and until the end every backup opens with one of the two keys.

    Afterwards, name the new key in the policy (encryption.key) and the old one under
    encryption.previous_keys until `drbot keys check` says nothing needs it. Exit 12: the new
    key is unusable in some region (nothing written); 15: a destination is unreachable;
    3: some objects could not be re-wrapped (listed; run again).

    \b
    Examples:
      drbot keys rotate --policy shop --to file:/etc/drbot/keys/shop-2027.key --dry-run
      drbot keys rotate --policy shop --to kms:alias/drbot-shop-2027
    """
    settings = load_settings(policies_dir)
    policy = find_policy(settings, policy_name)
    storages = build.build_storages(policy)
    old = build.build_keys(policy)
    new = key_provider_from_ref(to_ref)
    trail = audit_trail(settings)
    subject = {"from": old.describe(), "to": new.describe()}
    with recording_failure(trail, "key.rotation_failed", policy=policy.name, subject=subject):
        if key_ref_needs_region(to_ref) and any(s.region is None for s in storages):
            raise UsageError(
                f"{to_ref} is a KMS key, resolved per region; every destination needs a region"
            )
        to_ids = check_new_key(new, storages)
        plan = plan_rotation(inventory(policy.name, storages), to_ids)
        out: dict[str, Any] = {
            "to_key": to_ids,
            "manifests_to_rewrap": len(plan.manifests),
            "wal_keys_to_rewrap": len(plan.wal),
            "already_done": {"manifests": plan.done_manifests, "wal_keys": plan.done_wal},
        }
        if dry_run:
            if as_json:
                print_json({**out, "dry_run": True})
            else:
                _print_plan(plan)
                click.echo("Dry run: nothing was written.")
            return
        trail.record("key.rotation_started", policy=policy.name, subject=subject, details=out)
        done = execute_rotation(
            policy.name,
            plan,
            storages,
            old,
            new,
            progress=None if as_json else (lambda what: stderr.print(f"[dim]re-wrapped {what}")),
        )
        details = {
            **out,
            "manifests_rewrapped": done.manifests,
            "wal_keys_rewrapped": done.wal_groups,
            "failed": done.failed,
        }
        if done.failed:
            trail.record(
                "key.rotation_failed",
                policy=policy.name,
                subject=subject,
                outcome="failed",
                details=details,
            )
            raise PartialFailure(
                f"{len(done.failed)} object(s) could not be re-wrapped: "
                + "; ".join(f"{k}: {v}" for k, v in list(done.failed.items())[:5]),
                hint="fix the cause and run the same command again: done objects are skipped",
            )
        trail.record("key.rotated", policy=policy.name, subject=subject, details=details)
    if as_json:
        print_json(details)
        return
    click.echo(
        f"Re-wrapped {done.manifests} manifest(s) and {done.wal_groups} WAL data key(s) under "
        f"{new.describe()}; no data object was touched."
    )
    click.echo(
        f"Next: set encryption.key: {to_ref} in the policy, move {old.describe()} to "
        f"encryption.previous_keys, and retire it once `drbot keys check --policy {policy.name} "
        f"--key {old.describe()}` reports nothing."
    )


def _print_plan(plan: RotationPlan) -> None:
    click.echo(
        f"To re-wrap: {len(plan.manifests)} manifest(s), {len(plan.wal)} WAL data key(s) "
        f"(already done: {plan.done_manifests} manifest(s), {plan.done_wal} WAL key(s))."
    )
    for m in plan.manifests[:20]:
        click.echo(f"  manifest  {m.destination}  {m.backup_id}  (now {m.key_id})")
    for g in plan.wal[:20]:
        click.echo(f"  WAL key   {g.destination}  {g.objects} object(s), e.g. {g.example}")


@command.command("check")
@click.option("--policy", "policy_name", required=True, help="Policy whose objects to check.")
@click.option("--key", "key_ref", required=True, help="The key to retire: file:PATH or kms:REF.")
@policies_option
@json_option
def check(policy_name: str, key_ref: str, policies_dir: Path | None, as_json: bool) -> None:
    """List every backup and WAL object of a policy still wrapped only by KEY.

    Exit 0 only when nothing needs KEY any more, so it can be destroyed; exit 18 (listing what
    remains) otherwise. Audit segments and drill records are signed, not encrypted: no key
    wraps them. The key itself need not be readable: its id is computed, or asked of KMS.

    \b
    Example:
      drbot keys check --policy shop --key file:/etc/drbot/keys/shop-2026.key
    """
    settings = load_settings(policies_dir)
    policy = find_policy(settings, policy_name)
    storages = build.build_storages(policy)
    provider = key_provider_from_ref(key_ref)
    ids = key_ids(provider, storages)
    left = still_under(inventory(policy.name, storages), ids)
    n = len(left.manifests) + sum(g.objects for g in left.wal)
    audit_trail(settings).record(
        "key.checked",
        policy=policy.name,
        subject={"key": provider.describe(), "key_ids": ids},
        outcome="ok" if n == 0 else "info",
        details={"manifests": len(left.manifests), "wal_objects": n - len(left.manifests)},
    )
    if as_json:
        print_json({"key": provider.describe(), "key_ids": ids, "remaining": n, **_summary(left)})
    elif n == 0:
        click.echo(f"Nothing of policy {policy.name} needs {provider.describe()} any more.")
    else:
        click.echo(f"Still wrapped only by {provider.describe()}:")
        for m in left.manifests:
            click.echo(f"  backup    {m.destination}  {m.backup_id}")
        for g in left.wal:
            click.echo(f"  WAL       {g.destination}  {g.objects} object(s), e.g. {g.example}")
    for problem in left.problems:
        stderr.print(f"Warning: {problem}")
    if n:
        raise KeyInUse(
            f"{n} object(s) of policy {policy.name} still need {provider.describe()}",
            hint=f"drbot keys rotate --policy {policy.name} --to NEW-KEY",
        )


@command.command("shred")
@click.option("--policy", "policy_name", required=True, help="Policy whose keys to destroy.")
@click.option(
    "--confirm",
    "confirm_name",
    required=True,
    help="The policy's name again: a typed confirmation that every backup of it is lost.",
)
@click.option(
    "--kms-days", default=7, show_default=True, type=click.IntRange(7, 30), help="KMS wait."
)
@policies_option
def shred_command(
    policy_name: str, confirm_name: str, kms_days: int, policies_dir: Path | None
) -> None:
    """Destroy a policy's keys: every backup of it becomes unreadable, forever.

    For an erasure request (GDPR) on backups that object lock keeps: the bytes stay, nothing
    can decrypt them. Key files (encryption.key and previous_keys) are overwritten and
    removed; KMS keys are scheduled for deletion in every destination's region (after
    --kms-days; until then AWS can still cancel it). A key that another policy also uses is
    refused. The audit trail records what was destroyed. There is no undo.

    \b
    Example:
      drbot keys shred --policy old-crm --confirm old-crm
    """
    settings = load_settings(policies_dir)
    policy = find_policy(settings, policy_name)
    if confirm_name != policy.name:
        raise UsageError(
            f"--confirm must repeat the policy's name ({policy.name!r}) exactly",
            hint=f"drbot keys shred --policy {policy.name} --confirm {policy.name}",
        )
    refs = [policy.encryption.key_ref, *policy.encryption.previous_refs]
    for other in load_policies(settings):
        if other.name == policy.name:
            continue
        for ref in refs:
            if any(
                same_key(ref, r)
                for r in (other.encryption.key_ref, *other.encryption.previous_refs)
            ):
                raise UsageError(
                    f"policy {other.name} also uses {ref}; shredding it would destroy that "
                    "policy's backups too",
                    hint="give each policy its own key before shredding",
                )
    regions = sorted({d.region for d in policy.destinations}, key=str)
    trail = audit_trail(settings)
    destroyed = []
    with recording_failure(trail, "key.shred_failed", policy=policy.name, subject={"keys": refs}):
        for ref in refs:
            done = shred(key_provider_from_ref(ref), regions, kms_days=kms_days)
            destroyed.append({"key": done.ref, "key_ids": list(done.key_ids), "how": done.how})
            click.echo(f"Destroyed {done.ref} ({', '.join(done.key_ids)}): {done.how}.")
    trail.record(
        "key.shredded", policy=policy.name, subject={"keys": refs}, details={"destroyed": destroyed}
    )
    click.echo(
        f"Every backup of policy {policy.name} is now unreadable. Remove the policy file, and "
        "its objects once object lock allows."
    )
