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
from drbot.errors import IntegrityFailure, KeyInUse, KeyProblem, PartialFailure, UsageError
from drbot.ops.rotate import (
    KeyInventory,
    RotationPlan,
    check_new_key,
    execute_rotation,
    inventory,
    key_ids,
    key_ids_in_use,
    plan_rotation,
    preflight,
    still_under,
)
from drbot.ops.shred import ShredRecord, same_key, shred
from drbot.pipeline.filekey import FileKeyProvider, generate_key_file
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
@click.option(
    "--to",
    "to_ref",
    default=None,
    help="The new key, file:PATH or kms:REF: the policy's encryption.key [default: that].",
)
@click.option("--dry-run", is_flag=True, help="Show what would be re-wrapped; write nothing.")
@policies_option
@json_option
def rotate(
    policy_name: str, to_ref: str | None, dry_run: bool, policies_dir: Path | None, as_json: bool
) -> None:
    """Re-wrap every data key of a policy under its new key, without touching any data.

    Best first make the policy name the new key and keep the old one for reading, so that every
    drbot process (a restore during the rotation included) opens backups under either key
    (otherwise drbot warns, rotates, and the policy must be changed right after):

    \b
      encryption:
        key: file:/etc/drbot/keys/shop-2027.key
        previous_keys: [file:/etc/drbot/keys/shop-2026.key]

    Then rotate. Every manifest in every destination gets its data key wrapped by the new key
    (verified in memory with the new key alone before it replaces the old one, and read back
    after); every WAL data key gets a re-wrapped entry in the destination. Data objects are
    never read or written: their bytes, ETags and object lock are unchanged. Safe to interrupt
    and to run again: what is done is skipped. Finally `drbot keys check --key OLD` tells when
    the old key can leave previous_keys and be destroyed (runbooks/key-rotation.md).

    Exit 12: the new key is unusable in some region, or the old keys do not open the backups
    (nothing written); 15: a destination is unreachable; 3: some objects could not be
    re-wrapped (listed; run again).

    \b
    Examples:
      drbot keys rotate --policy shop --dry-run
      drbot keys rotate --policy shop --to kms:alias/drbot-shop-2027
    """
    settings = load_settings(policies_dir)
    policy = find_policy(settings, policy_name)
    storages = build.build_storages(policy)
    old = build.build_keys(policy)
    to_ref = to_ref or policy.encryption.key_ref
    new = key_provider_from_ref(to_ref)
    trail = audit_trail(settings)
    subject = {"to": new.describe(), "previous_keys": policy.encryption.previous_refs}
    with recording_failure(trail, "key.rotation_failed", policy=policy.name, subject=subject):
        if key_ref_needs_region(to_ref) and any(s.region is None for s in storages):
            raise UsageError(
                f"{to_ref} is a KMS key, resolved per region; every destination needs a region"
            )
        to_ids = check_new_key(new, storages)
        current = key_provider_from_ref(policy.encryption.key_ref)
        named = all(to_ids[s.name] == current.key_id(s.region) for s in storages)
        if not named:
            stderr.print(
                f"Warning: policy {policy.name} does not name {to_ref} as encryption.key yet. "
                "Until it does (with the old key under encryption.previous_keys), drbot "
                "processes using the policy cannot open the backups already re-wrapped; "
                "runbooks/key-rotation.md names the key first."
            )
        plan = plan_rotation(inventory(policy.name, storages, old), to_ids)
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
        preflight(policy.name, plan, storages, old)
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
    if not named:
        click.echo(
            f"Next: set encryption.key: {to_ref} in the policy and move "
            f"{policy.encryption.key_ref} to encryption.previous_keys, then restart drbot."
        )
    for ref in policy.encryption.previous_refs if named else [policy.encryption.key_ref]:
        click.echo(
            f"Then: drbot keys check --policy {policy.name} --key {ref}; once it reports "
            "nothing, remove that key from encryption.previous_keys, then destroy it."
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
@click.option("--key", "key_ref", default=None, help="The key to retire: file:PATH or kms:REF.")
@click.option(
    "--key-id",
    "key_id_opts",
    multiple=True,
    help="Its key id instead (file:<16 hex> or a KMS key ARN; repeat for each region), when "
    "the key itself is gone or unreadable.",
)
@policies_option
@json_option
def check(
    policy_name: str,
    key_ref: str | None,
    key_id_opts: tuple[str, ...],
    policies_dir: Path | None,
    as_json: bool,
) -> None:
    """List every backup and WAL object of a policy still wrapped only by KEY.

    Exit 0 only when nothing needs KEY any more, so it can be destroyed; exit 18 (listing what
    remains) otherwise; exit 13 if some object could not be read to tell. A WAL object counts
    as moved off KEY only if its re-wrapped entry opens with the policy's keys and
    authenticates the object. Audit segments and drill records are signed, not encrypted: no
    key wraps them. With --key-id the key need not exist any more (key ids are in manifests,
    `drbot list --json`, and docs/keys.md shows how to compute a key file's).

    \b
    Examples:
      drbot keys check --policy shop --key file:/etc/drbot/keys/shop-2026.key
      drbot keys check --policy shop --key-id file:0123456789abcdef
    """
    if (key_ref is None) == (not key_id_opts):
        raise UsageError("give the key to check as --key REF or as --key-id ID (one of them)")
    settings = load_settings(policies_dir)
    policy = find_policy(settings, policy_name)
    storages = build.build_storages(policy)
    if key_ref is not None:
        provider = key_provider_from_ref(key_ref)
        shown = provider.describe()
        ids = key_ids(provider, storages)
    else:
        shown = ", ".join(key_id_opts)
        ids = {s.name: set(key_id_opts) for s in storages}
    left = still_under(inventory(policy.name, storages, build.build_keys(policy)), ids)
    n = len(left.manifests) + sum(g.objects for g in left.wal)
    audit_trail(settings).record(
        "key.checked",
        policy=policy.name,
        subject={"key": shown, "key_ids": {d: sorted(v) for d, v in ids.items()}},
        outcome="ok" if n == 0 and not left.problems else "info",
        details={
            "manifests": len(left.manifests),
            "wal_objects": n - len(left.manifests),
            "problems": left.problems[:20],
        },
    )
    if as_json:
        print_json({"key": shown, "remaining": n, **_summary(left)})
    elif n == 0:
        click.echo(f"Nothing of policy {policy.name} needs {shown} any more.")
    else:
        click.echo(f"Still wrapped only by {shown}:")
        for m in left.manifests:
            click.echo(f"  backup    {m.destination}  {m.backup_id}")
        for g in left.wal:
            click.echo(f"  WAL       {g.destination}  {g.objects} object(s), e.g. {g.example}")
    for problem in left.problems:
        stderr.print(f"Warning: {problem}")
    if n:
        raise KeyInUse(
            f"{n} object(s) of policy {policy.name} still need {shown}",
            hint=f"drbot keys rotate --policy {policy.name}",
        )
    if left.problems:
        raise IntegrityFailure(
            f"{len(left.problems)} object(s) could not be read to tell which key they need",
            hint=f"drbot verify --policy {policy.name}",
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
    "--kms-days",
    default=7,
    show_default=True,
    type=click.IntRange(7, 30),
    help="Days KMS waits before deleting a KMS key (KMS allows 7 to 30; AWS can cancel "
    "the deletion until then).",
)
@click.option(
    "--destroyed",
    "destroyed_ids",
    multiple=True,
    help="The id of a key of this policy you already destroyed yourself (repeatable): objects "
    "it wraps no longer count as readable.",
)
@policies_option
def shred_command(
    policy_name: str,
    confirm_name: str,
    kms_days: int,
    destroyed_ids: tuple[str, ...],
    policies_dir: Path | None,
) -> None:
    """Destroy a policy's keys: every backup of it becomes unreadable, forever.

    For an erasure request (GDPR) on backups that object lock keeps: the bytes stay, nothing
    can decrypt them. Key files (encryption.key and previous_keys) are overwritten and
    removed; KMS keys are scheduled for deletion in every destination's region. Before
    anything is destroyed drbot reads every manifest, WAL header, re-wrapped entry and data
    object header of the policy: each key that wraps any of them must be one of the keys being
    destroyed, and none may be used by another policy (compared by key id, so a copy of a key
    file under another path counts). An interrupted shred can be run again. Stop every drbot
    process of this policy first: a running one keeps its key in memory.

    Exit 0: destroyed; 2: wrong --confirm, a key another policy uses, or objects wrapped by a
    key the policy no longer names; 12: a key could not be destroyed; 15: a destination is
    unreachable (everything must be read first). There is no undo.

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
    storages = build.build_storages(policy)
    refs = [policy.encryption.key_ref, *policy.encryption.previous_refs]
    trail = audit_trail(settings)
    record = ShredRecord(settings.state_dir, policy.name)
    with recording_failure(trail, "key.shred_failed", policy=policy.name, subject={"keys": refs}):
        mine = {ref: _ids_or_gone(ref, storages) for ref in refs}
        ids = set().union(*mine.values()) | record.destroyed() | set(destroyed_ids)
        _refuse_shared(settings, policy, refs, ids)
        inv = inventory(policy.name, storages, build.build_keys(policy), artifacts=True)
        outside = {kid for _dest, kid in key_ids_in_use(inv)} - ids
        if outside:
            raise UsageError(
                f"objects of policy {policy.name} are also wrapped by {', '.join(sorted(outside))}"
                ", which is not among the keys it names; destroying its keys would leave them "
                "readable",
                hint="add that key to encryption.previous_keys so it is destroyed too (if no "
                "other policy uses it), or, if it is already destroyed, pass --destroyed ID",
            )
        for ref in refs:
            if not mine[ref]:
                click.echo(f"{ref}: already destroyed.")
                continue
            done = shred(
                key_provider_from_ref(ref), [s.region for s in storages], kms_days=kms_days
            )
            record.add(done.key_ids)
            trail.record(
                "key.shredded",
                policy=policy.name,
                subject={"key": done.ref, "key_ids": list(done.key_ids)},
                details={"how": done.how},
            )
            click.echo(f"Destroyed {done.ref} ({', '.join(done.key_ids)}): {done.how}.")
    click.echo(
        f"Every backup of policy {policy.name} is now unreadable. Remove the policy file, and "
        "its objects once object lock allows."
    )


def _ids_or_gone(ref: str, storages: list[Any]) -> set[str]:
    """The key's ids in the destinations' regions; empty if it is a key file already gone."""
    provider = key_provider_from_ref(ref)
    if isinstance(provider, FileKeyProvider) and not provider.path.exists():
        return set()
    return {provider.key_id(s.region) for s in storages}


def _refuse_shared(settings: Any, policy: Any, refs: list[str], ids: set[str]) -> None:
    for other in load_policies(settings):
        if other.name == policy.name:
            continue
        their_storages = build.build_storages(other)
        for theirs in (other.encryption.key_ref, *other.encryption.previous_refs):
            try:
                shared = bool(_ids_or_gone(theirs, their_storages) & ids)
            except KeyProblem:
                shared = False  # unreadable: fall back on comparing the references
            if shared or any(same_key(ref, theirs) for ref in refs):
                raise UsageError(
                    f"policy {other.name} also uses {theirs}, a key of policy {policy.name}; "
                    "shredding it would destroy that policy's backups too",
                    hint="rotate one of the policies to a key of its own first",
                )
