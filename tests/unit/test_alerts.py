"""The alert book fires once, reminds once per interval, resolves once, and remembers only what
was delivered; the notifier routes to every destination and keeps undelivered alerts due."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest
from structlog.testing import capture_logs

from drbot.clock import FakeClock
from drbot.daemon.alerts import (
    Alert,
    AlertBook,
    Condition,
    Notifier,
    SmtpSender,
    WebhookSender,
    render_headline,
    render_subject,
    render_text,
    webhook_payload,
)
from drbot.errors import PolicyInvalid
from drbot.policy.schema import Alerts
from drbot.settings import Settings

pytestmark = pytest.mark.unit

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
BACKUP = Condition("shop", "job_failed:backup")
RPO = Condition("shop", "rpo")

Expect = Literal["firing", "reminder", "resolved"] | None


@dataclass(frozen=True)
class Step:
    """After `after_s` seconds, observe `condition` as `failing`; expect that alert (or none);
    `delivered` says whether the caller's delivery succeeds (and so calls `book.sent`)."""

    after_s: float
    failing: bool
    expect: Expect
    condition: Condition = BACKUP
    delivered: bool = True


def _kind(alert: Alert | None) -> Expect:
    if alert is None:
        return None
    if alert.state == "resolved":
        return "resolved"
    return "reminder" if alert.reminder else "firing"


SCENARIOS: dict[str, list[Step]] = {
    "first failure fires": [Step(0, True, "firing")],
    "repeated failure within the interval is suppressed": [
        Step(0, True, "firing"),
        Step(60, True, None),
        Step(1800, True, None),
        Step(1739, True, None),
    ],
    "after the interval one reminder, then quiet again": [
        Step(0, True, "firing"),
        Step(3599, True, None),
        Step(1, True, "reminder"),
        Step(1, True, None),
        Step(3598, True, None),
        Step(1, True, "reminder"),
    ],
    "recovery sends exactly one resolved": [
        Step(0, True, "firing"),
        Step(60, False, "resolved"),
        Step(60, False, None),
        Step(7200, False, None),
    ],
    "recovery without a prior alert sends nothing": [
        Step(0, False, None),
        Step(7200, False, None),
    ],
    "failing again after recovery fires anew at once": [
        Step(0, True, "firing"),
        Step(60, False, "resolved"),
        Step(60, True, "firing"),
    ],
    "two conditions are independent": [
        Step(0, True, "firing", BACKUP),
        Step(60, True, "firing", RPO),
        Step(60, True, None, BACKUP),
        Step(0, False, "resolved", BACKUP),
        Step(0, True, None, RPO),
        Step(3540, True, "reminder", RPO),
        Step(0, False, None, BACKUP),
    ],
    "a failed send is retried at the next observation": [
        Step(0, True, "firing", delivered=False),
        Step(1, True, "firing", delivered=False),
        Step(1, True, "firing"),
        Step(1, True, None),
    ],
    "a failed reminder is retried at the next observation": [
        Step(0, True, "firing"),
        Step(3600, True, "reminder", delivered=False),
        Step(1, True, "reminder"),
        Step(1, True, None),
    ],
    "a failed recovery is retried at the next observation": [
        Step(0, True, "firing"),
        Step(60, False, "resolved", delivered=False),
        Step(60, False, "resolved"),
        Step(60, False, None),
    ],
    "a recovery of an alert never delivered sends nothing": [
        Step(0, True, "firing", delivered=False),
        Step(60, False, None),
    ],
}


@pytest.mark.parametrize("steps", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_book_scenarios(steps: list[Step]) -> None:
    """Each observation yields exactly the alert the scenario expects, at the hourly interval."""
    clock = FakeClock(START)
    book = AlertBook(clock)
    for i, step in enumerate(steps):
        clock.advance(step.after_s)
        alert = book.observe(
            step.condition, step.failing, summary=f"step {i}", details={}, interval=HOUR
        )
        assert _kind(alert) == step.expect, f"step {i}: {step}"
        if alert is not None:
            assert alert.condition == step.condition
            assert alert.at == clock.now()
            if step.delivered:
                book.sent(alert)


def test_observe_changes_nothing_until_sent() -> None:
    """Observing alone records nothing: the book lists a condition as firing only once sent."""
    book = AlertBook(FakeClock(START))
    alert = book.observe(BACKUP, True, summary="s", details={}, interval=HOUR)
    assert alert is not None
    assert book.firing() == []
    book.sent(alert)
    assert book.firing() == [BACKUP]


def test_resolved_alert_carries_what_was_wrong_and_since_when() -> None:
    """A resolved alert names the last firing summary and when the condition started."""
    clock = FakeClock(START)
    book = AlertBook(clock)
    first = book.observe(BACKUP, True, summary="shop: backup failed", details={}, interval=HOUR)
    assert first is not None
    book.sent(first)
    clock.advance(7200)
    reminder = book.observe(
        BACKUP, True, summary="shop: backup failed again", details={}, interval=HOUR
    )
    assert reminder is not None
    assert reminder.since == START
    book.sent(reminder)
    clock.advance(300)
    resolved = book.observe(BACKUP, False, summary="shop: backup ok", details={}, interval=HOUR)
    assert resolved is not None
    assert resolved.was == "shop: backup failed again"
    assert resolved.since == START
    assert render_headline(resolved) == (
        "[RESOLVED after 2h 5m] shop: backup ok (was: shop: backup failed again)"
    )


def test_clock_going_back_allows_one_reminder() -> None:
    """A clock jumping back before the last alert makes a reminder due rather than muting it."""
    clock = FakeClock(START)
    book = AlertBook(clock)
    first = book.observe(BACKUP, True, summary="s", details={}, interval=HOUR)
    assert first is not None
    book.sent(first)
    clock._now -= timedelta(days=1)
    again = book.observe(BACKUP, True, summary="s", details={}, interval=HOUR)
    assert again is not None
    book.sent(again)
    assert book.observe(BACKUP, True, summary="s", details={}, interval=HOUR) is None


def test_state_survives_a_restart(tmp_path: Path) -> None:
    """A new book on the same state file stays quiet within the interval and still resolves."""
    state = tmp_path / "state" / "alerts.json"
    clock = FakeClock(START)
    book = AlertBook(clock, state_file=state)
    first = book.observe(BACKUP, True, summary="shop: backup failed", details={}, interval=HOUR)
    assert first is not None
    book.sent(first)
    assert json.loads(state.read_text())["firing"][0]["kind"] == "job_failed:backup"
    assert [p.name for p in state.parent.iterdir()] == ["alerts.json"], "no temp file left"

    clock.advance(600)
    restarted = AlertBook(clock, state_file=state)
    assert restarted.firing() == [BACKUP]
    assert restarted.observe(BACKUP, True, summary="s", details={}, interval=HOUR) is None
    clock.advance(3000)
    reminder = restarted.observe(BACKUP, True, summary="s", details={}, interval=HOUR)
    assert reminder is not None
    assert reminder.reminder

    again = AlertBook(clock, state_file=state)
    resolved = again.observe(BACKUP, False, summary="shop: ok", details={}, interval=HOUR)
    assert resolved is not None
    assert resolved.state == "resolved"
    assert resolved.was == "shop: backup failed"
    again.sent(resolved)
    assert AlertBook(clock, state_file=state).firing() == []


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe", b"[]", b'{"version": 99, "firing": []}', b'{"version": 1}'],
    ids=["bad-json", "bad-utf8", "list", "future-version", "no-firing"],
)
def test_unreadable_state_starts_empty_with_a_warning(tmp_path: Path, content: bytes) -> None:
    """A state file that cannot be read is ignored with `alert.state_unreadable`, not fatal."""
    state = tmp_path / "alerts.json"
    state.write_bytes(content)
    with capture_logs() as logs:
        book = AlertBook(FakeClock(START), state_file=state)
    assert book.firing() == []
    assert [e["event"] for e in logs] == ["alert.state_unreadable"]
    assert logs[0]["log_level"] == "warning"


def test_suppressed_alert_is_logged_at_debug() -> None:
    """A muted repeat logs `alert.suppressed` at debug with policy, kind and state."""
    book = AlertBook(FakeClock(START))
    first = book.observe(BACKUP, True, summary="s", details={}, interval=HOUR)
    assert first is not None
    book.sent(first)
    with capture_logs() as logs:
        assert book.observe(BACKUP, True, summary="s", details={}, interval=HOUR) is None
    assert logs[0]["event"] == "alert.suppressed"
    assert logs[0]["log_level"] == "debug"
    assert (logs[0]["policy"], logs[0]["kind"], logs[0]["state"]) == ("shop", BACKUP.kind, "firing")


# --- notifier ----------------------------------------------------------------------------------


@dataclass
class RecordingSender:
    """A sender that accepts or refuses according to `answers` (then repeats the last)."""

    answers: list[bool]
    destination: str = "test"
    got: list[Alert] = field(default_factory=list)

    def send(self, alert: Alert) -> bool:
        self.got.append(alert)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def test_notifier_marks_sent_only_when_a_sender_accepted() -> None:
    """All senders failing leaves the alert due; one accepting is enough to record it."""
    clock = FakeClock(START)
    book = AlertBook(clock)
    down, flaky = RecordingSender([False]), RecordingSender([False, True])
    notifier = Notifier(Alerts(), _settings(), senders=[down, flaky])

    assert notifier.report(book, BACKUP, True, summary="shop: backup failed") is None
    assert book.firing() == []
    clock.advance(1)
    delivered = notifier.report(book, BACKUP, True, summary="shop: backup failed")
    assert delivered is not None
    assert book.firing() == [BACKUP]
    clock.advance(1)
    assert notifier.report(book, BACKUP, True, summary="shop: backup failed") is None
    assert len(down.got) == len(flaky.got) == 2


def test_notifier_without_destinations_still_keeps_the_rhythm() -> None:
    """With nowhere to send, alerts are logged as unrouted and recorded as if delivered."""
    book = AlertBook(FakeClock(START))
    with capture_logs() as logs:
        assert Notifier(Alerts(), _settings(), senders=[]).report(book, BACKUP, True, summary="s")
    assert [e["event"] for e in logs] == ["alert.unrouted"]
    assert book.firing() == [BACKUP]


def _settings(**kw: object) -> Settings:
    return Settings.model_validate(kw)


def test_notifier_routes_to_the_union_of_policy_and_global_destinations() -> None:
    """Policy and daemon-wide webhooks and addresses are merged, each destination once."""
    alerts = Alerts.model_validate(
        {
            "webhook": "https://hooks.example.invalid/T/B/secret",
            "email": ["ops@example.invalid", "dba@example.invalid"],
            "interval": "15m",
        }
    )
    settings = _settings(
        alert_webhook="https://hooks.example.invalid/T/B/secret",
        alert_email=" OPS@example.invalid , oncall@example.invalid,",
        smtp_host="127.0.0.1",
    )
    notifier = Notifier(alerts, settings)
    assert notifier.interval == timedelta(minutes=15)
    kinds = [type(s) for s in notifier.senders]
    assert kinds == [WebhookSender, SmtpSender]
    mail = notifier.senders[1]
    assert isinstance(mail, SmtpSender)
    alert = Alert(BACKUP, "firing", "shop: backup failed", {}, START, since=START)
    assert mail.message(alert)["To"] == "ops@example.invalid, dba@example.invalid, " + (
        "oncall@example.invalid"
    )
    assert "secret" not in repr(notifier)


def test_notifier_with_two_webhooks_and_no_email() -> None:
    """Different policy and global webhooks both get the alert; no mail without addresses."""
    alerts = Alerts.model_validate({"webhook": "http://127.0.0.1:1/a"})
    notifier = Notifier(alerts, _settings(alert_webhook="http://127.0.0.1:1/b"))
    assert [type(s) for s in notifier.senders] == [WebhookSender, WebhookSender]
    assert notifier.interval == HOUR


def test_email_without_smtp_server_fails_to_send_and_says_why() -> None:
    """Addresses without DRBOT_SMTP_HOST do not raise: sending fails, naming the setting."""
    alerts = Alerts.model_validate({"email": ["ops@example.invalid"]})
    notifier = Notifier(alerts, _settings())
    book = AlertBook(FakeClock(START))
    with capture_logs() as logs:
        assert notifier.report(book, BACKUP, True, summary="s") is None
    assert [e["event"] for e in logs] == ["alert.send_failed"]
    assert "DRBOT_SMTP_HOST" in logs[0]["error"]
    assert logs[0]["destination"] == "email"
    with pytest.raises(PolicyInvalid, match="SMTP server"):
        SmtpSender(_settings(), ["ops@example.invalid"])


# --- rendering ---------------------------------------------------------------------------------


def test_rendering_carries_the_whole_message() -> None:
    """Webhook text and mail subject name the state, policy, condition and every detail."""
    alert = Alert(
        BACKUP,
        "firing",
        "full backup failed (exit 15): storage unreachable: replica",
        {"exit_code": 15, "destinations": ["replica"]},
        START,
        since=START,
    )
    text = render_text(alert)
    assert text.splitlines()[0] == (
        "[FIRING] shop: full backup failed (exit 15): storage unreachable: replica"
    )
    assert "condition: job_failed:backup" in text
    assert "exit_code: 15" in text
    assert 'destinations: ["replica"]' in text
    assert render_subject(alert) == "[drbot] FIRING shop: job_failed:backup"
    body = webhook_payload(alert)
    assert body["text"] == text
    assert body["drbot"]["policy"] == "shop"
    assert body["drbot"]["kind"] == "job_failed:backup"
    assert body["drbot"]["state"] == "firing"
    assert body["drbot"]["details"] == {"exit_code": 15, "destinations": ["replica"]}
    assert body["drbot"]["at"] == "2026-03-01T12:00:00+00:00"
