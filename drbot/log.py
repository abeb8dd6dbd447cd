"""Structured logs: JSON when not on a terminal, readable console lines when on one.

Secrets never reach the output: a processor masks values under secret-sounding keys and
passwords inside URIs wherever they appear.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = frozenset({"password", "secret", "token", "data_key", "passphrase", "key_material"})
_URI_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@", re.I)
_DSN_PASSWORD = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.I)


def redact_text(text: str) -> str:
    """`text` with passwords in URIs and key=value DSNs replaced by ***."""
    text = _URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _DSN_PASSWORD.sub(lambda m: f"{m.group(1)}***", text)


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask secrets in every event."""
    for k, v in list(event.items()):
        if k.lower() in _SECRET_KEYS:
            event[k] = "***"
        elif isinstance(v, str):
            event[k] = redact_text(v)
    return event


def configure(level: str = "warning", fmt: str = "auto") -> None:
    """Set up structlog for this process (called once by the CLI or daemon)."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Tracebacks are rendered to text first so that redaction sees them too.
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
