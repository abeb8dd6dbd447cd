"""Object keys and the manifest format."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drbot.engines.base import Fingerprint, TableFingerprint, compare_fingerprints
from drbot.errors import IntegrityFailure
from drbot.manifest import ArtifactRecord, Manifest, authenticate_manifest, encode_manifest
from drbot.pipeline.keys import WrappedKey
from drbot.storage import layout

pytestmark = pytest.mark.unit

KEY = bytes(range(32))


def _manifest() -> Manifest:
    return Manifest(
        policy="shop",
        backup_id="20261123T020000Z-abc123",
        type="full",
        mode="logical",
        engine="postgresql",
        source_version="15.4",
        started_at=datetime(2026, 11, 23, 2, tzinfo=UTC),
        completed_at=datetime(2026, 11, 23, 2, 5, tzinfo=UTC),
        destination="primary",
        wrapped_key=WrappedKey("file:0011223344556677", b"\x01" * 60),
        compression={"algorithm": "zstd", "level": 3},
        encryption={"algorithm": "AES-256-GCM", "frame_size": 1 << 20},
        artifacts=(ArtifactRecord("db/shop.pgdump", "pg_dump", "k", 10, "ab" * 32, 20, "shop"),),
        fingerprints={"shop": Fingerprint({"public.t": TableFingerprint(3, "0" * 32, "a, b")})},
        databases=("shop",),
    )


def test_manifest_round_trips_and_authenticates() -> None:
    """An encoded manifest decodes to the same value under the data key that made it."""
    m = _manifest()
    decoded, key = authenticate_manifest(encode_manifest(m, KEY), lambda w: KEY, where="x")
    assert decoded == m and key == KEY


@pytest.mark.parametrize(
    "edit",
    [
        (b'"nonce": "', b'"nonce": "A'),  # the sealed fingerprints
        (b'"level": 3', b'"level": 9'),
        (b"db/shop.pgdump", b"db/shop.pgdumq"),
    ],
)
def test_an_edited_manifest_fails_authentication(edit: tuple[bytes, bytes]) -> None:
    """Changing any recorded value makes the manifest fail authentication, naming where it is."""
    raw = encode_manifest(_manifest(), KEY).replace(*edit)
    with pytest.raises(IntegrityFailure, match=r"primary:m\.json"):
        authenticate_manifest(raw, lambda w: KEY, where="primary:m.json")


def test_fingerprints_are_sealed_in_the_stored_manifest() -> None:
    """Table and column names are schema; they are stored encrypted, and open again."""
    m = _manifest()
    raw = encode_manifest(m, KEY)
    for name in m.fingerprints["shop"].tables:
        assert name.encode() not in raw
    decoded, _ = authenticate_manifest(raw, lambda w: KEY, where="x")
    assert decoded.fingerprints == m.fingerprints


def test_a_manifest_under_another_data_key_fails() -> None:
    """A manifest authenticated with another data key is rejected."""
    raw = encode_manifest(_manifest(), KEY)
    with pytest.raises(IntegrityFailure):
        authenticate_manifest(raw, lambda w: bytes(32), where="x")


def test_garbage_is_not_a_manifest() -> None:
    """Bytes that are not a drbot manifest raise IntegrityFailure, not a parsing exception."""
    for raw in (b"", b"{}", b"[1]", b'{"format": "drbot-manifest", "version": 1}', b"\xff"):
        with pytest.raises(IntegrityFailure):
            authenticate_manifest(raw, lambda w: KEY, where="x")


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2999, 1, 1)))
def test_backup_ids_sort_by_time_and_parse_back(at: datetime) -> None:
    """A backup id encodes its start second and parses back to it."""
    at = at.replace(tzinfo=UTC, microsecond=0)
    bid = layout.new_backup_id(at)
    assert layout.backup_id_time(bid) == at and layout.is_backup_id(bid)


def test_keys_are_built_and_parsed_in_one_place() -> None:
    """Artifact and manifest keys parse back to their parts; foreign keys are ignored."""
    bid = "20261123T020000Z-abc123"
    k = layout.artifact_key("shop", bid, "db/shop.pgdump")
    assert k == f"shop/backups/{bid}/db/shop.pgdump.zst.enc"
    assert layout.parse_key("shop", k) == layout.ParsedKey(bid, False, "db/shop.pgdump")
    assert layout.parse_key("shop", layout.manifest_key("shop", bid)) == layout.ParsedKey(
        bid, True, None
    )
    assert layout.parse_key("shop", "shop/backups/notanid/x") is None
    assert layout.parse_key("crm", k) is None
    with pytest.raises(ValueError, match="bad artifact name"):
        layout.artifact_key("shop", bid, "db//x")
    # Path tricks cannot escape the backup's prefix: dots that lead a part are encoded.
    assert layout.artifact_key("shop", bid, "../escape").startswith(f"shop/backups/{bid}/%2E.")


@given(st.text(min_size=1).filter(lambda t: "/" not in t))
def test_any_database_name_gets_a_safe_key_that_parses_back(database: str) -> None:
    """Database names may hold anything PostgreSQL allows; keys stay ASCII-safe and invertible."""
    bid = "20261123T020000Z-abc123"
    name = f"db/{database}.pgdump"
    key = layout.artifact_key("shop", bid, name)
    rest = key[len(f"shop/backups/{bid}/") :]
    assert all(c.isascii() and (c.isalnum() or c in "_-.%/") for c in rest)
    assert not any(part.startswith(".") or part in ("", "..") for part in rest.split("/"))
    assert layout.parse_key("shop", key) == layout.ParsedKey(bid, False, name)


def test_fingerprint_comparison_names_every_difference() -> None:
    """Missing, unexpected, row-count and checksum differences are each reported by table."""
    exp = Fingerprint(
        {
            "a": TableFingerprint(1, "x"),
            "b": TableFingerprint(2, "y"),
            "c": TableFingerprint(3, "z"),
        }
    )
    act = Fingerprint(
        {
            "b": TableFingerprint(3, "y"),
            "c": TableFingerprint(3, "w"),
            "d": TableFingerprint(0, "q"),
        }
    )
    assert [(m.table, m.problem) for m in compare_fingerprints(exp, act)] == [
        ("a", "missing"),
        ("b", "rows"),
        ("c", "checksum"),
        ("d", "unexpected"),
    ]
    assert compare_fingerprints(exp, exp) == []
