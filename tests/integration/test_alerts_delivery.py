"""Alerts reach real receivers on 127.0.0.1: a webhook server and an SMTP server, each getting
exactly one message per condition change, retried when the receiver failed, and never leaking
the webhook's URL into the logs."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from structlog.testing import capture_logs

from drbot.clock import FakeClock
from drbot.daemon.alerts import AlertBook, Condition, Notifier, SmtpSender, WebhookSender
from drbot.policy.schema import Alerts
from drbot.settings import Settings

pytestmark = pytest.mark.integration

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FAILED = Condition("shop", "job_failed:backup")
SUMMARY = "shop: full backup failed (exit 15): storage unreachable: replica"
TOKEN = "XoXb-fake-T0KEN-9f8e7d"  # a fake token to look for in logs


# --- a webhook receiver --------------------------------------------------------------------------


@dataclass
class Webhook:
    """A real HTTP server on 127.0.0.1 recording every POST; answers `statuses` in turn."""

    url: str
    posts: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=lambda: [200])


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = hook.statuses.pop(0) if len(hook.statuses) > 1 else hook.statuses[0]
            hook.posts.append(
                {
                    "path": self.path,
                    "content_type": self.headers["Content-Type"],
                    "json": json.loads(body),
                    "status": status,
                }
            )
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hook.url = f"http://127.0.0.1:{server.server_address[1]}/services/T000/B000/{TOKEN}"
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _notifier(url: str, interval: str = "1h") -> Notifier:
    alerts = Alerts.model_validate({"webhook": url, "interval": interval})
    return Notifier(alerts, Settings.model_validate({}), timeout_s=5)


def test_one_alert_for_a_failing_job_and_one_for_its_recovery(webhook: Webhook) -> None:
    """A job failing at every run for 50 minutes yields one POST; its recovery yields one more."""
    clock = FakeClock(START)
    book = AlertBook(clock)
    notifier = _notifier(webhook.url)
    for _ in range(10):
        notifier.report(book, FAILED, True, summary=SUMMARY, details={"exit_code": 15})
        clock.advance(300)
    assert len(webhook.posts) == 1
    for _ in range(3):
        notifier.report(book, FAILED, False, summary="shop: full backup completed")
        clock.advance(300)
    assert len(webhook.posts) == 2

    firing, resolved = (p["json"] for p in webhook.posts)
    assert webhook.posts[0]["path"] == f"/services/T000/B000/{TOKEN}"
    assert webhook.posts[0]["content_type"] == "application/json"
    assert firing["text"].startswith("[FIRING] shop: full backup failed (exit 15)")
    assert "job_failed:backup" in firing["text"]
    assert "exit_code: 15" in firing["text"]
    assert firing["drbot"] == {
        "policy": "shop",
        "kind": "job_failed:backup",
        "state": "firing",
        "summary": SUMMARY,
        "details": {"exit_code": 15},
        "at": "2026-03-01T12:00:00+00:00",
        "since": "2026-03-01T12:00:00+00:00",
    }
    assert resolved["text"].startswith("[RESOLVED after 50m] shop: full backup completed (was: ")
    assert "shop" in resolved["text"]
    assert "full backup failed" in resolved["text"]
    assert resolved["drbot"]["state"] == "resolved"


def test_receiver_error_is_retried_at_the_next_observation(webhook: Webhook) -> None:
    """A 500 leaves the alert undelivered; the next observation sends it again and it lands."""
    webhook.statuses = [500, 200]
    clock = FakeClock(START)
    book = AlertBook(clock)
    notifier = _notifier(webhook.url)
    with capture_logs() as logs:
        assert notifier.report(book, FAILED, True, summary=SUMMARY) is None
    assert book.firing() == []
    failed = [e for e in logs if e["event"] == "alert.send_failed"]
    assert len(failed) == 1
    assert failed[0]["error"] == "HTTP 500"
    assert (failed[0]["policy"], failed[0]["kind"], failed[0]["state"]) == (
        "shop",
        "job_failed:backup",
        "firing",
    )

    clock.advance(60)
    with capture_logs() as logs:
        assert notifier.report(book, FAILED, True, summary=SUMMARY) is not None
    assert [e["event"] for e in logs] == ["alert.sent"]
    assert book.firing() == [FAILED]
    clock.advance(60)
    assert notifier.report(book, FAILED, True, summary=SUMMARY) is None
    assert [p["status"] for p in webhook.posts] == [500, 200]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "url",
    [
        f"http://127.0.0.1:{_closed_port()}/services/T000/B000/{TOKEN}",
        f"http://127.0.0.1:{_closed_port()}/hook?token={TOKEN}",
        f"http://user:{TOKEN}@127.0.0.1:{_closed_port()}/hook",
        f"http://127.0.0.1:port{TOKEN}/hook",
        f"http://[::1/hook/{TOKEN}",
        f"ftp://127.0.0.1/{TOKEN}",
    ],
    ids=["token-in-path", "token-in-query", "token-in-userinfo", "bad-port", "bad-ipv6", "ftp"],
)
def test_webhook_url_never_reaches_the_logs(url: str) -> None:
    """With the receiver down (or the URL broken), the failure is logged without URL or token."""
    clock = FakeClock(START)
    book = AlertBook(clock)
    sender = WebhookSender(url, timeout_s=5)
    notifier = Notifier(Alerts(), Settings.model_validate({}), senders=[sender])
    with capture_logs() as logs:
        assert notifier.report(book, FAILED, True, summary=SUMMARY) is None
    assert [e["event"] for e in logs] == ["alert.send_failed"]
    assert logs[0]["destination"] == "webhook"
    assert logs[0]["error"]
    dumped = repr(logs) + repr(sender) + repr(notifier)
    assert TOKEN not in dumped
    assert url not in dumped
    assert book.firing() == []


# --- an SMTP receiver ----------------------------------------------------------------------------


@dataclass
class Mailbox:
    """What a tiny SMTP server on 127.0.0.1 received: envelope and parsed messages."""

    port: int = 0
    mails: list[tuple[str, list[str], EmailMessage]] = field(default_factory=list)


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox()

    class Handler(socketserver.StreamRequestHandler):
        """Just enough SMTP (RFC 5321) for smtplib: EHLO/HELO, MAIL, RCPT, DATA, RSET, QUIT."""

        def reply(self, line: str) -> None:
            self.wfile.write(line.encode() + b"\r\n")

        def handle(self) -> None:
            self.reply("220 127.0.0.1 test SMTP")
            sender, recipients = "", list[str]()
            while line := self.rfile.readline():
                verb = line[:4].decode().upper()
                if verb == "EHLO":
                    self.reply("250-127.0.0.1")
                    self.reply("250 8BITMIME")
                elif verb in ("HELO", "RSET", "NOOP"):
                    self.reply("250 OK")
                elif verb == "MAIL":
                    sender, recipients = line.decode().split(":", 1)[1].strip(), []
                    self.reply("250 OK")
                elif verb == "RCPT":
                    recipients.append(line.decode().split(":", 1)[1].strip())
                    self.reply("250 OK")
                elif verb == "DATA":
                    self.reply("354 end with <CRLF>.<CRLF>")
                    data = b""
                    while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                        data += chunk[1:] if chunk.startswith(b"..") else chunk
                    msg = message_from_bytes(data, policy=policy.default)
                    assert isinstance(msg, EmailMessage)
                    box.mails.append((sender, recipients, msg))
                    self.reply("250 OK queued")
                elif verb == "QUIT":
                    self.reply("221 bye")
                    return
                else:
                    self.reply("502 not implemented")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    box.port = int(server.server_address[1])
    try:
        yield box
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_one_mail_per_condition_change(mailbox: Mailbox) -> None:
    """A failing condition mails once with a subject naming policy and state; recovery once more."""
    settings = Settings.model_validate(
        {
            "smtp_host": "127.0.0.1",
            "smtp_port": mailbox.port,
            "smtp_from": "drbot@db1.example.invalid",
            "alert_email": "oncall@example.invalid",
        }
    )
    alerts = Alerts.model_validate({"email": ["dba@example.invalid"], "interval": "30m"})
    sender = SmtpSender(
        settings,
        ["dba@example.invalid", "oncall@example.invalid"],
        timeout_s=5,
        local_hostname="localhost",
    )
    notifier = Notifier(alerts, settings, senders=[sender])
    clock = FakeClock(START)
    book = AlertBook(clock)
    for _ in range(5):
        notifier.report(book, FAILED, True, summary=SUMMARY, details={"exit_code": 15})
        clock.advance(60)
    assert len(mailbox.mails) == 1
    notifier.report(book, FAILED, False, summary="shop: full backup completed")
    notifier.report(book, FAILED, False, summary="shop: full backup completed")
    assert len(mailbox.mails) == 2

    (env_from, env_to, firing), (_, _, resolved) = mailbox.mails
    assert env_from == "<drbot@db1.example.invalid>"
    assert env_to == ["<dba@example.invalid>", "<oncall@example.invalid>"]
    assert firing["Subject"] == "[drbot] FIRING shop: job_failed:backup"
    assert firing["To"] == "dba@example.invalid, oncall@example.invalid"
    body = firing.get_body(("plain",))
    assert body is not None
    text = body.get_content().replace("\r\n", "\n")
    assert text.startswith(f"[FIRING] {SUMMARY}\n")
    assert "exit_code: 15" in text
    assert resolved["Subject"] == "[drbot] RESOLVED shop: job_failed:backup"


def test_smtp_server_down_is_a_failed_send(mailbox: Mailbox) -> None:
    """An unreachable SMTP server yields False and `alert.send_failed`, never an exception."""
    settings = Settings.model_validate(
        {"smtp_host": "127.0.0.1", "smtp_port": _closed_port(), "smtp_password": TOKEN}
    )
    sender = SmtpSender(settings, ["dba@example.invalid"], timeout_s=5, local_hostname="localhost")
    book = AlertBook(FakeClock(START))
    with capture_logs() as logs:
        notifier = Notifier(Alerts(), settings, senders=[sender])
        assert notifier.report(book, FAILED, True, summary=SUMMARY) is None
    assert [e["event"] for e in logs] == ["alert.send_failed"]
    assert logs[0]["destination"] == "email"
    assert TOKEN not in repr(logs)
    assert mailbox.mails == []
