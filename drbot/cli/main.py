"""Entry point: the `drbot` group, and the one place exceptions become exit codes."""

from __future__ import annotations

import importlib
import os
import signal
import sys
from types import FrameType

import click
import structlog

from drbot import __version__
from drbot.errors import DrbotError
from drbot.log import redact_text
from drbot.memory import tune_malloc
from drbot.procs import DIE_WITH_ENV, die_with

log = structlog.get_logger(__name__)

EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_STOP_RECOVERY = 255  # wal fetch: anything but "not archived" must stop PostgreSQL's recovery


# Command name -> the module under drbot.cli whose `command` it is. A command's module (and what
# it imports: pydantic models, boto3, pymongo...) is imported only when that command runs or help
# lists it, which took a quarter of a second off every start (`wal fetch` runs once per segment
# as PostgreSQL's restore_command).
COMMANDS = {
    "audit": "audit",
    "backup": "backup",
    "changes": "changes",
    "daemon": "daemon",
    "demo": "demo",
    "drill": "drill",
    "keys": "keys",
    "list": "list_cmd",
    "policy": "policy",
    "prune": "prune",
    "restore": "restore",
    "verify": "verify",
    "wal": "wal",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return None
        command = importlib.import_module(f"drbot.cli.{module}").command
        assert isinstance(command, click.Command)
        return command


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Exit codes: 0 ok, 1 unexpected, 2 usage, 3 partial, 10 no restore point, "
    "11 lock held, 12 key problem, 13 integrity failure, 14 database unreachable, "
    "15 storage unreachable, 16 invalid policy, 17 no sandbox, 18 key still in use, "
    "20 drill failed, 130 interrupted.",
)
@click.version_option(__version__, prog_name="drbot")
def cli() -> None:
    """drbot: encrypted, multi-region backups of PostgreSQL and MongoDB that prove they restore.

    \b
    Start here:
      drbot demo                            see a whole backup/verify/restore cycle locally
      drbot daemon                          run every policy: schedules, WAL, drills, /metrics
      drbot policy validate                 check the policies in ./policies
      drbot backup --policy shop            take a full backup now
      drbot wal stream --policy shop        archive WAL continuously (physical policies)
      drbot changes stream --policy orders  ship MongoDB change-stream slices continuously
      drbot list --policy shop              what can be restored, and to when
      drbot drill --policy shop             prove it: restore into a no-network container, check
      drbot restore --policy shop --to-dir /srv/pg/restored --at 2026-11-23T14:05:00Z --dry-run
    """


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (how containers are stopped) unwinds like Ctrl-C, so every cleanup runs:
    # uploads aborted, a restore target drbot created dropped, the lock released.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Run the CLI and exit with drbot's documented exit codes."""
    tune_malloc()
    signal.signal(signal.SIGTERM, _terminate)
    # SIGINT interrupts and cleans up even when drbot was started with it ignored (a script's
    # background job inherits SIGINT ignored, and Python then keeps it so): the daemon and
    # people stop drbot with it, and an ignored interrupt would let a job run on.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parent = os.environ.pop(DIE_WITH_ENV, None)  # popped: not for grandchildren (postgres)
    if parent is not None and parent.isdigit() and not die_with(int(parent)):
        sys.exit(EXIT_INTERRUPTED)
    try:
        rc = cli.main(args=argv, prog_name="drbot", standalone_mode=False)
    except DrbotError as exc:
        click.echo(f"Error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"Try: {exc.hint}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        args = sys.argv[1:] if argv is None else argv
        if args[:2] == ["wal", "fetch"]:
            # As restore_command, exit 2 would read as "not archived" and end recovery early.
            sys.exit(EXIT_STOP_RECOVERY)
        sys.exit(EXIT_USAGE if isinstance(exc, click.UsageError) else exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted; nothing incomplete was left looking complete.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        log.exception("drbot.unexpected_error")
        click.echo(f"Error: unexpected {exc.__class__.__name__}: {redact_text(str(exc))}", err=True)
        click.echo("Try: rerun with DRBOT_LOG_LEVEL=debug and report the output", err=True)
        sys.exit(EXIT_UNEXPECTED)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
