"""An unpacked base backup against PostgreSQL's backup_manifest, from the checksums taken while
unpacking: pg_verifybackup's rules, and a refusal to guess for checksums it does not compute."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import crc32c
import pytest

from drbot.engines.postgres.backupmanifest import check_files
from drbot.errors import IntegrityFailure

pytestmark = pytest.mark.unit

FILES = {
    "PG_VERSION": b"15\n",
    "global/pg_control": bytes(8192),
    "base/1/1259": b"\x01" * 16384,
    "tablespace_map": b"",
}


def _entry(name: str, data: bytes, alg: str = "CRC32C") -> dict[str, object]:
    entry: dict[str, object] = {"Path": name, "Size": len(data), "Checksum-Algorithm": alg}
    if alg == "CRC32C":
        entry["Checksum"] = crc32c.crc32c(data).to_bytes(4, "little").hex()
    return entry


def _manifest(entries: list[dict[str, object]]) -> bytes:
    """Laid out as PostgreSQL writes it: one line per entry, the checksum line last."""
    lines = ",\n".join(json.dumps(e) for e in entries)
    body = (
        f'{{ "PostgreSQL-Backup-Manifest-Version": 1,\n"Files": [\n{lines} ],\n'
        '"WAL-Ranges": [\n{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }\n'
        "],\n"
    ).encode()
    return _signed(body)


def _signed(body: bytes) -> bytes:
    return body + f'"Manifest-Checksum": "{hashlib.sha256(body).hexdigest()}"}}\n'.encode()


def _written(files: dict[str, bytes]) -> dict[str, tuple[int, int]]:
    return {name: (len(data), crc32c.crc32c(data)) for name, data in files.items()}


def test_crc32c_is_recorded_little_endian_as_postgresql_writes_it() -> None:
    # From a real PostgreSQL 15 manifest: PG_VERSION "15\n" has Checksum "8a744722".
    assert _entry("PG_VERSION", b"15\n")["Checksum"] == "8a744722"


def test_a_backup_that_matches_passes() -> None:
    written = _written(FILES) | {"pg_wal/000000010000000000000002": (16 << 20, 7)}
    manifest = _manifest([_entry(n, d) for n, d in FILES.items()])
    assert check_files(manifest, written, "d:base.tar") is True


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w.pop("base/1/1259"), "base/1/1259 is missing"),
        (lambda w: w.update({"base/1/extra": (1, 0)}), "base/1/extra is not in the manifest"),
        (lambda w: w.update({"PG_VERSION": (4, 0)}), "PG_VERSION has 4 bytes, the manifest 3"),
        (
            lambda w: w.update({"global/pg_control": (8192, 1)}),
            "global/pg_control has CRC-32C 01000000, the manifest",
        ),
    ],
)
def test_missing_extra_and_different_files_are_named(
    change: Callable[[dict[str, tuple[int, int]]], object], message: str
) -> None:
    written = _written(FILES)
    change(written)
    manifest = _manifest([_entry(n, d) for n, d in FILES.items()])
    with pytest.raises(IntegrityFailure, match=f"d:base.tar: .*{message}"):
        check_files(manifest, written, "d:base.tar")


def test_files_a_restore_adds_or_the_manifest_leaves_out_are_ignored() -> None:
    extra = ["backup_manifest", "postgresql.auto.conf", "recovery.signal", "standby.signal"]
    written = _written(FILES) | dict.fromkeys(extra, (1, 0))
    manifest = _manifest([_entry(n, d) for n, d in FILES.items()] + [_entry("standby.signal", b"")])
    assert check_files(manifest, written, "d") is True


def test_many_problems_are_counted_not_all_listed() -> None:
    written = _written(FILES) | {f"base/1/x{i}": (1, 0) for i in range(8)}
    manifest = _manifest([_entry(n, d) for n, d in FILES.items()])
    with pytest.raises(IntegrityFailure, match=r"\(and 3 more\)"):
        check_files(manifest, written, "d")


def test_an_encoded_path_is_a_name_that_is_not_utf8() -> None:
    raw = b"base/1/caf\xe9"
    name = raw.decode("utf-8", "surrogateescape")
    entry = _entry("x", b"abc")
    del entry["Path"]
    entry["Encoded-Path"] = raw.hex()
    assert check_files(_manifest([entry]), {name: (3, crc32c.crc32c(b"abc"))}, "d") is True


def test_no_checksum_checks_sizes_and_another_algorithm_is_left_to_pg_verifybackup() -> None:
    written = _written(FILES)
    sizes_only = _manifest([_entry(n, d, alg="NONE") for n, d in FILES.items()])
    assert check_files(sizes_only, written, "d") is True
    written["PG_VERSION"] = (9, 0)
    with pytest.raises(IntegrityFailure, match="PG_VERSION has 9 bytes"):
        check_files(sizes_only, written, "d")
    sha = [_entry(n, d) for n, d in FILES.items()]
    sha[0] = {"Path": "PG_VERSION", "Size": 3, "Checksum-Algorithm": "SHA256", "Checksum": "00"}
    assert check_files(_manifest(sha), written, "d") is False


@pytest.mark.parametrize(
    "body",
    [
        b"not json,\n",
        b"{\n",
        b'{"Files": [{"Size": 1}],\n',
        b'{"Files": [1],\n',
        b'{"Files": [{"Path": "a", "Size": 1}, {"Path": "a", "Size": 1}],\n',
        b'{"Files": [{"Path": "a", "Encoded-Path": "61", "Size": 1}],\n',
    ],
    ids=["not json", "no files", "no path", "not an entry", "listed twice", "two paths"],
)
def test_a_manifest_that_is_not_one_is_an_integrity_failure(body: bytes) -> None:
    with pytest.raises(IntegrityFailure, match="not a PostgreSQL backup manifest"):
        check_files(_signed(body), {"a": (1, 0)}, "d")


def test_the_manifests_own_checksum_must_match() -> None:
    manifest = _manifest([_entry(n, d) for n, d in FILES.items()])
    assert check_files(manifest, _written(FILES), "d") is True
    changed = manifest.replace(b'"Size": 3', b'"Size": 4')  # PG_VERSION's entry
    with pytest.raises(IntegrityFailure, match="does not match its Manifest-Checksum"):
        check_files(changed, _written(FILES), "d")
    unsigned = manifest[: manifest.rindex(b'"Manifest-Checksum"')]
    with pytest.raises(IntegrityFailure, match="no Manifest-Checksum line"):
        check_files(unsigned + b"}\n", _written(FILES), "d")


def test_pg_wal_is_left_out_but_a_name_that_only_starts_like_it_is_not() -> None:
    entries = [_entry(n, d) for n, d in FILES.items()]
    listed_wal = _manifest([*entries, _entry("pg_wal/000000010000000000000002", b"x")])
    assert check_files(listed_wal, _written(FILES), "d") is True
    written = _written(FILES) | {"pg_wal_x": (1, 0)}
    with pytest.raises(IntegrityFailure, match="pg_wal_x is not in the manifest"):
        check_files(_manifest(entries), written, "d")


def test_checksum_hex_is_compared_without_regard_to_case() -> None:
    entries = [_entry(n, d) for n, d in FILES.items()]
    for e in entries:
        e["Checksum"] = str(e["Checksum"]).upper()
    assert check_files(_manifest(entries), _written(FILES), "d") is True
