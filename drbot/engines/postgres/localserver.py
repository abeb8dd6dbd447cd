"""A throwaway PostgreSQL server in a temporary directory: for the demo, tests and sandboxes.

It listens on 127.0.0.1 only, on a free port, with trust authentication: never expose it.
PostgreSQL refuses to run as root, so when drbot runs as root the server runs as the
`postgres` OS user (installed with the server packages) in a directory owned by that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg

from drbot.errors import DatabaseError, SourceUnavailable

_INSTALL_HINT = "install the PostgreSQL server (apt-get install postgresql-15) or set DRBOT_PG_BIN"


def find_bin_dir(bin_dir: Path | None = None, tool: str = "pg_dump") -> Path:
    """The directory holding PostgreSQL's programs: argument, $DRBOT_PG_BIN, pg_config, newest.

    Raises SourceUnavailable if none holds `tool`.
    """
    candidates: list[Path] = []
    if bin_dir is not None:
        candidates.append(Path(bin_dir))
    elif os.environ.get("DRBOT_PG_BIN"):
        candidates.append(Path(os.environ["DRBOT_PG_BIN"]))
    else:
        installed = sorted(
            glob.glob("/usr/lib/postgresql/*/bin"),
            key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
            reverse=True,
        )
        candidates.extend(Path(p) for p in installed)
        pg_config = shutil.which("pg_config")
        if pg_config:
            with contextlib.suppress(OSError, subprocess.CalledProcessError):
                out = subprocess.run(
                    [pg_config, "--bindir"], capture_output=True, text=True, check=True
                ).stdout.strip()
                candidates.append(Path(out))
        on_path = shutil.which(tool)
        if on_path:
            candidates.append(Path(on_path).parent)
    for candidate in candidates:
        if (candidate / tool).is_file():
            return candidate
    raise SourceUnavailable(
        f"PostgreSQL program {tool} not found (looked in "
        f"{', '.join(str(c) for c in candidates) or 'nothing'})",
        hint=_INSTALL_HINT,
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LocalPostgres:
    """initdb + pg_ctl in a private directory; `start()`, `uri()`, `stop()`, `remove()`."""

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        bin_dir: Path | None = None,
        port: int | None = None,
        fsync: bool = False,
    ) -> None:
        self.bin_dir = find_bin_dir(bin_dir, "initdb")
        self._own_dir = base_dir is None
        # Not pytest's tmp_path: that is 0700 root, which the postgres user cannot traverse.
        self.base_dir = Path(tempfile.mkdtemp(prefix="drbot-pg-")) if base_dir is None else base_dir
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "socket"
        self.log_file = self.base_dir / "server.log"
        self.port = port or free_port()
        self.fsync = fsync
        self._run_as: str | None = "postgres" if os.geteuid() == 0 else None
        self.started = False

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.remove()

    def _cmd(self, *args: str) -> list[str]:
        if self._run_as is None:
            return list(args)
        return ["runuser", "-u", self._run_as, "--", *args]

    def _run(self, *args: str) -> None:
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise DatabaseError(
                f"{Path(args[0]).name} failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
            )

    def start(self) -> None:
        """initdb (first time) and start; waits until the server accepts connections."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if self._run_as is not None:
            try:
                user = pwd.getpwnam(self._run_as)
            except KeyError:
                raise SourceUnavailable(
                    "running as root, but there is no 'postgres' user to run the server as",
                    hint=_INSTALL_HINT,
                ) from None
            self.base_dir.chmod(0o755)
            for path in (self.base_dir, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                str(self.bin_dir / "initdb"),
                "-D", str(self.data_dir),
                "-U", "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            )  # fmt: skip
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
            f"-c fsync={'on' if self.fsync else 'off'} -c full_page_writes=on "
            "-c max_wal_senders=10 -c wal_level=replica"
        )
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D", str(self.data_dir),
            "-l", str(self.log_file),
            "-o", options,
            "-w", "-t", "60",
            "start",
        )  # fmt: skip
        self.started = True
        self._wait_ready(deadline=time.monotonic() + 30)

    def _wait_ready(self, deadline: float) -> None:
        while True:
            try:
                with psycopg.connect(self.uri(), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise SourceUnavailable(
                        f"local PostgreSQL on port {self.port} did not come up: {exc}\n"
                        f"{self.server_log()[-2000:]}"
                    ) from exc
                time.sleep(0.2)

    def server_log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Fast shutdown of the server this object started; nothing else is touched."""
        if not self.started:
            return
        with contextlib.suppress(DatabaseError):
            self._run(
                str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"
            )
        self.started = False

    def remove(self) -> None:
        """Delete the server's directory (only one this object created)."""
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def uri(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def execute(self, dbname: str, sql: str) -> None:
        """Run `sql` (one or more statements) in `dbname`, autocommit."""
        with psycopg.connect(self.uri(dbname), autocommit=True) as conn:
            conn.execute(sql.encode())

    def create_database(self, name: str) -> str:
        """Create database `name`; returns its URI."""
        with psycopg.connect(self.uri(), autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
        return self.uri(name)
