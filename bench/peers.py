"""Peers for the benchmark: pgBackRest against a local directory or S3 (moto through TLS).

Install the tools first with scripts/bench-peers.sh (Debian's pgbackrest, stunnel4, zstd).

pgBackRest only speaks HTTPS to S3 and moto's server only plain HTTP, so `TlsProxy` puts a
throwaway stunnel in front of moto; pgBackRest is told not to verify the certificate.

What the PostgreSQL server needs (the simplest setup that restores, measured by hand):
  - WAL archiving to the same stanza, set before the first backup: archive_mode=on (needs a
    restart) and `archive_command()`, i.e. `pgbackrest ... archive-push %p`.
    Without archiving a physical backup cannot be made consistent, and pgBackRest's backup
    waits for (archive-check) and copies (archive-copy) the WAL written during the backup.
  - wal_level=replica (PostgreSQL's default; LocalPostgres sets it too).
  - pgBackRest runs as the OS user that runs the server (`postgres` when we are root): the
    server's archive-push shares the lock/log/spool paths and the repository with the backup.
The config sets archive-copy=y, so each backup also holds the WAL it needs, as drbot's
backups are self-contained. Restore uses --type=immediate --target-action=promote (recover
only to the backup's consistency point, then promote to a new timeline) and
--archive-mode=off (the restored copy must not push WAL into the repository it came from).
--type=none does NOT work on PostgreSQL 15: pgBackRest still writes recovery.signal but no
restore_command, and the server refuses to start ("must specify restore_command").
The restored postgresql.auto.conf holds restore_command = `pgbackrest --config=<file> ...
archive-get`: the config file and the repository (and, for S3, moto and the proxy) must still
be there when the restored server starts. pg_ctl -w returns while it is still in recovery:
wait for `SELECT pg_is_in_recovery()` to be false (well under a second here).
Restore into a new, empty directory owned by that user, mode 0700 (`data_dir()`), then start a
server on it with its own port. Stop the source server before the proxy/moto: with
archive_mode=on its shutdown waits for archive-push, which hangs while the repo is unreachable.
Repositories are switched by rewriting the config file archive_command names (or by pushing to
each config in turn); pgBackRest reads it on every archive-push.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from drbot.engines.postgres.localserver import free_port

LOOPBACK = "127.0.0.1"


def _write_self_signed(cert: Path, key: Path) -> None:
    """A throwaway EC P-256 certificate for 127.0.0.1, valid for a day."""
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
            critical=False,
        )
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key.chmod(0o600)


def _stunnel() -> str:
    for name in ("stunnel4", "stunnel"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("stunnel not found: run scripts/bench-peers.sh")


class TlsProxy:
    """stunnel accepting TLS on 127.0.0.1:`port`, forwarding plain TCP to 127.0.0.1:target."""

    def __init__(self, target_port: int, *, timeout: float = 10.0) -> None:
        self.target_port = target_port
        self.timeout = timeout
        self.port = 0
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TlsProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Write a certificate and config in a temp dir, start stunnel, wait for the port."""
        self._dir = Path(tempfile.mkdtemp(prefix="drbot-bench-tls-"))
        cert, key = self._dir / "cert.pem", self._dir / "key.pem"
        _write_self_signed(cert, key)
        self.port = free_port()
        log = self._dir / "stunnel.log"
        conf = self._dir / "stunnel.conf"
        conf.write_text(
            "foreground = yes\n"
            "pid =\n"
            f"output = {log}\n"
            "debug = warning\n"
            "[s3]\n"
            f"accept = {LOOPBACK}:{self.port}\n"
            f"connect = {LOOPBACK}:{self.target_port}\n"
            f"cert = {cert}\n"
            f"key = {key}\n"
        )
        self._proc = subprocess.Popen(
            [_stunnel(), str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + self.timeout
        while True:
            if self._proc.poll() is not None:
                text = log.read_text(errors="replace") if log.exists() else ""
                self.stop()
                raise RuntimeError(f"stunnel exited at start: {text[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), 1):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"stunnel did not listen on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the stunnel this object started (by its pid) and delete its temp dir."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


@dataclass(frozen=True)
class S3Repo:
    """A pgBackRest repository in an S3 bucket reached through `TlsProxy` on `port`."""

    bucket: str
    port: int
    region: str = "us-east-1"
    key: str = "testing"
    secret: str = "testing"  # noqa: S105 - moto accepts any secret
    path: str = "/pgbackrest"


def pg_os_user() -> str | None:
    """The OS user to run PostgreSQL and pgBackRest as: `postgres` when root, else ourselves."""
    return "postgres" if os.geteuid() == 0 else None


def data_dir(path: Path, owner: str | None = None, mode: int = 0o700) -> Path:
    """Create `path` (and parents) owned by `owner` (None: ourselves); returns it."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    if owner is not None:
        user = pwd.getpwnam(owner)
        os.chown(path, user.pw_uid, user.pw_gid)
    return path


def pgbackrest_config(
    config: Path,
    *,
    stanza: str,
    pg_data: Path,
    socket_dir: Path,
    pg_port: int,
    repo: Path | S3Repo,
    work_dir: Path,
    cipher_pass: str,
    process_max: int = 1,
    bundle: bool = True,
    owner: str | None = None,
    pg_user: str = "postgres",
) -> Path:
    """Write `config` for `stanza`: zstd level 3, AES-256-CBC, archive-copy; returns it.

    `repo` is a local directory (posix repo, created) or an S3 bucket behind a TlsProxy.
    Lock, log and spool paths go under `work_dir` (created), never /var. `owner` is the OS user
    that runs pgBackRest and the server (see pg_os_user()): it gets the directories and file.
    `bundle` packs small files into few repository objects (pgBackRest's advice for object
    stores; without it a ~1,000-file cluster is ~1,000 PUTs).
    """
    work = data_dir(work_dir, owner, 0o750)
    lines = [
        "[global]",
        f"lock-path={data_dir(work / 'lock', owner, 0o750)}",
        f"log-path={data_dir(work / 'log', owner, 0o750)}",
        f"spool-path={data_dir(work / 'spool', owner, 0o750)}",
        "log-level-console=warn",
        "log-level-file=info",
        "compress-type=zst",
        "compress-level=3",
        f"process-max={process_max}",
        "start-fast=y",
        "archive-copy=y",
        f"repo1-bundle={'y' if bundle else 'n'}",
        "repo1-cipher-type=aes-256-cbc",
        f"repo1-cipher-pass={cipher_pass}",
    ]
    if isinstance(repo, S3Repo):
        lines += [
            "repo1-type=s3",
            f"repo1-path={repo.path}",
            f"repo1-s3-endpoint={LOOPBACK}",
            f"repo1-storage-port={repo.port}",
            "repo1-storage-verify-tls=n",
            "repo1-s3-uri-style=path",
            f"repo1-s3-bucket={repo.bucket}",
            f"repo1-s3-region={repo.region}",
            f"repo1-s3-key={repo.key}",
            f"repo1-s3-key-secret={repo.secret}",
        ]
    else:
        lines += ["repo1-type=posix", f"repo1-path={data_dir(repo, owner, 0o750)}"]
    lines += [
        "",
        f"[{stanza}]",
        f"pg1-path={pg_data}",
        f"pg1-socket-path={socket_dir}",
        f"pg1-port={pg_port}",
        f"pg1-user={pg_user}",
        "",
    ]
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("\n".join(lines))
    config.chmod(0o640)
    if owner is not None:
        user = pwd.getpwnam(owner)
        os.chown(config, user.pw_uid, user.pw_gid)
    return config


def _binary() -> str:
    return shutil.which("pgbackrest") or "pgbackrest"


def _pgbackrest(config: Path, stanza: str, run_as: str | None) -> list[str]:
    prefix = [] if run_as is None else ["runuser", "-u", run_as, "--"]
    return [*prefix, _binary(), f"--config={config}", f"--stanza={stanza}"]


def archive_command(config: Path, stanza: str) -> str:
    """The source server's archive_command for this repository (with archive_mode=on, which
    needs a restart)."""
    return f"{_binary()} --config={config} --stanza={stanza} archive-push %p"


def info_argv(config: Path, stanza: str, *, run_as: str | None = None) -> list[str]:
    """The repository's backups as JSON (`[{"backup": [...]}]`, oldest first)."""
    return [*_pgbackrest(config, stanza, run_as), "--output=json", "info"]


def stanza_create_argv(config: Path, stanza: str, *, run_as: str | None = None) -> list[str]:
    """Create the stanza in the repository (once per repository, server running)."""
    return [*_pgbackrest(config, stanza, run_as), "stanza-create"]


def backup_argv(
    config: Path, stanza: str, *, process_max: int | None = None, run_as: str | None = None
) -> list[str]:
    """A full backup of the running server (process_max overrides the config's)."""
    argv = [*_pgbackrest(config, stanza, run_as), "--type=full"]
    if process_max is not None:
        argv.append(f"--process-max={process_max}")
    return [*argv, "backup"]


def restore_argv(
    config: Path,
    stanza: str,
    target: Path,
    *,
    process_max: int | None = None,
    run_as: str | None = None,
) -> list[str]:
    """Restore the latest backup into `target` (existing, empty, 0700, owned by run_as)."""
    argv = [
        *_pgbackrest(config, stanza, run_as),
        f"--pg1-path={target}",
        "--type=immediate",
        "--target-action=promote",
        "--archive-mode=off",
    ]
    if process_max is not None:
        argv.append(f"--process-max={process_max}")
    return [*argv, "restore"]
