"""A base backup unpacked and checked against the backup_manifest PostgreSQL itself wrote:
drbot's own check (sizes and CRC-32C taken while writing) for the CRC-32C manifests drbot asks
for, pg_verifybackup for any other checksum, and each of them catches a changed file."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from drbot.engines.postgres.backupmanifest import check_files
from drbot.engines.postgres.localserver import LocalPostgres, find_bin_dir
from drbot.engines.postgres.untar import TarExtractor
from drbot.errors import IntegrityFailure
from drbot.ops.pitr import verify_base

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _unpacked(
    server: LocalPostgres, checksums: str, root: Path
) -> tuple[dict[str, tuple[int, int]], bytes]:
    """`root` holding a base backup of `server`, as pg_basebackup streams one to drbot: the
    sizes and CRC-32C taken while unpacking, and the backup_manifest PostgreSQL wrote."""
    archive = subprocess.run(
        [
            str(find_bin_dir(None, "pg_basebackup") / "pg_basebackup"),
            "--pgdata=-",
            "--format=tar",
            "--wal-method=fetch",
            "--checkpoint=fast",
            f"--manifest-checksums={checksums}",
            "--dbname",
            server.uri(),
        ],
        capture_output=True,
        check=True,
    ).stdout
    root.mkdir(mode=0o700)
    extractor = TarExtractor(root)
    try:
        for pos in range(0, len(archive), 1 << 20):
            extractor.feed(archive[pos : pos + (1 << 20)])
        extractor.finish()
    finally:
        extractor.release()
    return extractor.files, (root / "backup_manifest").read_bytes()


def test_a_crc32c_manifest_is_checked_from_what_was_written(
    pg_server: LocalPostgres, tmp_path: Path
) -> None:
    files, manifest = _unpacked(pg_server, "CRC32C", tmp_path / "data")
    assert check_files(manifest, files, "t") is True
    changed = dict(files)
    size, crc = changed["PG_VERSION"]
    changed["PG_VERSION"] = (size, crc ^ 1)
    with pytest.raises(IntegrityFailure, match="PG_VERSION has CRC-32C"):
        check_files(manifest, changed, "t")


def test_another_checksum_is_left_to_pg_verifybackup_which_catches_a_change(
    pg_server: LocalPostgres, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    files, manifest = _unpacked(pg_server, "SHA256", root)
    assert check_files(manifest, files, "t") is False
    bin_dir = find_bin_dir(None, "pg_verifybackup")
    verify_base(bin_dir, root)
    (root / "PG_VERSION").write_bytes(b"99\n")
    with pytest.raises(IntegrityFailure, match="does not match its backup_manifest"):
        verify_base(bin_dir, root)
