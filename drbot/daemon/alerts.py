"""Alerts: tell people when something is wrong, remind them while it lasts, say when it recovers.

Three parts, each usable alone:

- `AlertBook` decides *whether* to alert. It is a clock-injected state machine over conditions
  (a policy plus what is wrong with it, e.g. ``job_failed:backup``, ``rpo``, ``drill_failed``,
  ``streamer_down``): the first failing observation fires, a still-failing condition stays quiet
  until its interval has passed since the last alert for it and then fires one reminder, and the
  first good observation after a delivered alert resolves it. The book remembers only what was
  *delivered* (see `AlertBook.sent`), in a JSON state file when given one, so a restarted daemon
  neither repeats itself early nor forgets a recovery.
- Senders deliver one alert to one destination: `WebhookSender` (Slack-compatible JSON) and
  `SmtpSender` (plain-text mail). They never raise and never log a webhook URL or a password.
- `Notifier` joins the two for one policy: it sends to the union of the policy's and the
  daemon-wide destinations and marks an alert delivered only when at least one sender succeeded,
  so an alert that reached nobody is due again at the next observation.

The interplay, for a caller that does not use `Notifier.report`::

    alert = book.observe(condition, failing, summary=..., details=..., interval=...)
    if alert is not None and notifier.send(alert):
        book.sent(alert)
"""

from __future__ import annotations

import http.client
import json
import os
import smtplib
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import structlog

from drbot.clock import Clock
from drbot.errors import PolicyInvalid
from drbot.policy.schema import Alerts
from drbot.settings import Settings

log = structlog.get_logger(__name__)

STATE_FILE_NAME = "alerts.json"
"""Suggested name of the book's state file inside the daemon's state directory."""

_STATE_VERSION = 1
_TIMEOUT_S = 10.0


@dataclass(frozen=True, order=True)
class Condition:
    """Something that can be wrong with a policy: ``kind`` is e.g. ``job_failed:backup``,
    ``job_failed:verify``, ``rpo``, ``drill_failed``, ``streamer_down``."""

    policy: str
    kind: str


@dataclass(frozen=True)
class Alert:
    """One message about a condition.

    `summary` is one line a person understands ("shop: full backup failed (exit 15): storage
    unreachable: replica"). `since` is when the condition started firing (equal to `at` for
    the first alert, earlier for reminders and resolutions); `was` is, for a resolved alert,
    the summary of the last firing alert delivered for it.
    """

    condition: Condition
    state: Literal["firing", "resolved"]
    summary: str
    details: Mapping[str, Any]
    at: datetime
    since: datetime | None = None
    was: str | None = None

    @property
    def reminder(self) -> bool:
        """Whether this is a repeat of a firing alert already delivered."""
        return self.state == "firing" and self.since is not None and self.since < self.at


@dataclass(frozen=True)
class _Firing:
    since: datetime
    last_sent_at: datetime
    summary: str


class AlertBook:
    """Which conditions are firing and when each was last alerted; decides what is due.

    Thread-safe. Nothing changes on `observe`; only `sent` records a delivery (and saves the
    state file), so an alert that could not be delivered is returned again by the next
    `observe`. A condition whose firing alert was never delivered has nothing to resolve.
    """

    def __init__(self, clock: Clock, *, state_file: Path | None = None) -> None:
        self._clock = clock
        self._state_file = state_file
        self._lock = threading.Lock()
        self._firing: dict[Condition, _Firing] = _load(state_file) if state_file else {}

    def observe(
        self,
        condition: Condition,
        failing: bool,
        *,
        summary: str,
        details: Mapping[str, Any],
        interval: timedelta,
    ) -> Alert | None:
        """The alert now due for `condition` given whether it is `failing`, or None.

        Failing and not firing: a firing alert. Failing and firing: None until `interval` has
        passed since the last delivered alert for it (or the clock went back past it), then a
        reminder. Not failing and firing: one resolved alert. Not failing, not firing: None.
        """
        now = self._clock.now()
        with self._lock:
            entry = self._firing.get(condition)
        if failing:
            if entry is None:
                return Alert(condition, "firing", summary, dict(details), now, since=now)
            if now - entry.last_sent_at >= interval or now < entry.last_sent_at:
                return Alert(condition, "firing", summary, dict(details), now, since=entry.since)
            log.debug(
                "alert.suppressed",
                policy=condition.policy,
                kind=condition.kind,
                state="firing",
                next_at=(entry.last_sent_at + interval).isoformat(),
            )
            return None
        if entry is None:
            return None
        return Alert(
            condition,
            "resolved",
            summary,
            dict(details),
            now,
            since=entry.since,
            was=entry.summary,
        )

    def sent(self, alert: Alert) -> None:
        """Record that `alert` reached someone; saves the state file (never raises for it)."""
        with self._lock:
            if alert.state == "firing":
                since = alert.since or alert.at
                self._firing[alert.condition] = _Firing(since, alert.at, alert.summary)
            else:
                self._firing.pop(alert.condition, None)
            if self._state_file is not None:
                _save(self._state_file, self._firing)

    def firing(self) -> list[Condition]:
        """Conditions currently firing (alerted and not yet resolved), sorted."""
        with self._lock:
            return sorted(self._firing)


def _load(path: Path) -> dict[Condition, _Firing]:
    """The book saved at `path`; empty (with a warning) if it is missing or unreadable."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("alert.state_unreadable", path=str(path), error=str(exc))
        return {}
    try:
        if raw.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown version {raw.get('version')!r}")
        book: dict[Condition, _Firing] = {}
        for item in raw["firing"]:
            since = datetime.fromisoformat(item["since"])
            last = datetime.fromisoformat(item["last_sent_at"])
            if since.tzinfo is None or last.tzinfo is None:
                raise ValueError("timestamps must carry a timezone")
            condition = Condition(str(item["policy"]), str(item["kind"]))
            book[condition] = _Firing(since, last, str(item["summary"]))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        log.warning("alert.state_unreadable", path=str(path), error=f"malformed: {exc}")
        return {}
    return book


def _save(path: Path, book: Mapping[Condition, _Firing]) -> None:
    """Write `book` to `path` atomically (temp file, fsync, rename); warn on failure."""
    state = {
        "version": _STATE_VERSION,
        "firing": [
            {
                "policy": c.policy,
                "kind": c.kind,
                "since": e.since.isoformat(),
                "last_sent_at": e.last_sent_at.isoformat(),
                "summary": e.summary,
            }
            for c, e in sorted(book.items())
        ],
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:
        log.warning("alert.state_write_failed", path=str(path), error=str(exc))
        tmp.unlink(missing_ok=True)


# --- rendering -------------------------------------------------------------------------------


def _duration(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    return " ".join(parts) if parts else f"{seconds}s"


def _with_policy(policy: str, summary: str) -> str:
    return summary if summary.startswith(f"{policy}:") else f"{policy}: {summary}"


def render_headline(alert: Alert) -> str:
    """One line: state tag then the summary, prefixed with the policy if it does not name it."""
    summary = _with_policy(alert.condition.policy, alert.summary)
    if alert.state == "resolved":
        lasted = f" after {_duration(alert.at - alert.since)}" if alert.since else ""
        was = f" (was: {alert.was})" if alert.was else ""
        return f"[RESOLVED{lasted}] {summary}{was}"
    if alert.reminder and alert.since is not None:
        return f"[STILL FIRING for {_duration(alert.at - alert.since)}] {summary}"
    return f"[FIRING] {summary}"


def render_text(alert: Alert) -> str:
    """The whole message as plain text: headline, condition, time, then one line per detail."""
    lines = [
        render_headline(alert),
        f"policy: {alert.condition.policy}",
        f"condition: {alert.condition.kind}",
        f"at: {alert.at.astimezone(UTC).isoformat()}",
    ]
    if alert.since is not None and alert.since != alert.at:
        lines.append(f"since: {alert.since.astimezone(UTC).isoformat()}")
    lines.extend(f"{key}: {_plain(value)}" for key, value in alert.details.items())
    return "\n".join(lines)


def render_subject(alert: Alert) -> str:
    """E-mail subject naming the state, the policy and the condition."""
    tag = "RESOLVED" if alert.state == "resolved" else "FIRING"
    return f"[drbot] {tag} {alert.condition.policy}: {alert.condition.kind}"


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)


def webhook_payload(alert: Alert) -> dict[str, Any]:
    """Slack-compatible body: `text` carries the whole message; `drbot` is for machines."""
    return {
        "text": render_text(alert),
        "drbot": {
            "policy": alert.condition.policy,
            "kind": alert.condition.kind,
            "state": alert.state,
            "summary": alert.summary,
            "details": dict(alert.details),
            "at": alert.at.astimezone(UTC).isoformat(),
            "since": alert.since.astimezone(UTC).isoformat() if alert.since else None,
        },
    }


# --- senders ---------------------------------------------------------------------------------


class AlertSender(Protocol):
    """Delivers one alert to one destination.

    `send` returns True when the destination accepted the alert and False otherwise; it never
    raises, and logs `alert.sent` / `alert.send_failed` without any secret (URL, password).
    `destination` names the kind of destination ("webhook", "email") for logs.
    """

    destination: str

    def send(self, alert: Alert) -> bool: ...


def _fields(alert: Alert) -> dict[str, str]:
    c = alert.condition
    return {"policy": c.policy, "kind": c.kind, "state": alert.state}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is a failure: following it would drop the body or send it elsewhere."""

    def redirect_request(self, *_: Any, **__: Any) -> None:
        return None


class WebhookSender:
    """POSTs `webhook_payload(alert)` as JSON to a URL; 2xx is success, anything else failure."""

    destination = "webhook"

    def __init__(self, url: str, *, timeout_s: float = _TIMEOUT_S) -> None:
        self._url = url
        self._timeout_s = timeout_s
        self._opener = urllib.request.build_opener(_NoRedirect())

    def __repr__(self) -> str:
        return "WebhookSender(<url hidden>)"

    def send(self, alert: Alert) -> bool:
        body = json.dumps(webhook_payload(alert), default=str).encode()
        try:
            request = urllib.request.Request(  # noqa: S310 - the scheme is checked just below
                self._url,
                data=body,
                method="POST",
                headers={"Content-Type": "application/json", "User-Agent": "drbot"},
            )
            if request.type not in ("http", "https"):
                raise ValueError("not an http:// or https:// URL")
            with self._opener.open(request, timeout=self._timeout_s) as response:
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            status = exc.code
            exc.close()
        except (ValueError, http.client.InvalidURL) as exc:
            # Their messages quote the URL or parts of it: say only what kind of problem it was.
            self._failed(alert, f"{type(exc).__name__}: malformed webhook URL")
            return False
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, refused, ...
            self._failed(alert, f"{type(exc).__name__}: {self._scrub(str(exc))}")
            return False
        if not 200 <= status < 300:
            self._failed(alert, f"HTTP {status}")
            return False
        log.info("alert.sent", destination=self.destination, host=self._host(), **_fields(alert))
        return True

    def _failed(self, alert: Alert, error: str) -> None:
        log.warning(
            "alert.send_failed",
            destination=self.destination,
            host=self._host(),
            error=error,
            **_fields(alert),
        )

    def _host(self) -> str | None:
        try:
            return urlsplit(self._url).hostname
        except ValueError:
            return None

    def _scrub(self, text: str) -> str:
        """`text` without the URL or its path/query, which may embed the webhook's token."""
        try:
            parts = urlsplit(self._url)
        except ValueError:
            return "(message withheld: it may quote the webhook URL)"
        port_text = parts.netloc.rpartition("@")[2].rpartition("]")[2].rpartition(":")[2]
        secrets = [self._url, parts.netloc, parts.path, parts.query, parts.fragment, port_text]
        secrets += [parts.username or "", parts.password or ""]
        for secret in sorted(secrets, key=len, reverse=True):
            if len(secret) >= 4:
                text = text.replace(secret, "***")
        return text


class SmtpSender:
    """Mails a plain-text alert to `recipients` through the SMTP server in `settings`.

    `settings.smtp_tls`: "tls" connects with TLS, "starttls" upgrades, "none" does neither;
    logs in when `settings.smtp_user` is set. Certificates are checked against the system store.
    """

    destination = "email"

    def __init__(
        self,
        settings: Settings,
        recipients: Sequence[str],
        *,
        timeout_s: float = _TIMEOUT_S,
        local_hostname: str | None = None,
    ) -> None:
        if not settings.smtp_host:
            raise PolicyInvalid(
                "e-mail alerts need an SMTP server", hint="set DRBOT_SMTP_HOST (and DRBOT_SMTP_*)"
            )
        self._host = settings.smtp_host
        self._port = settings.smtp_port
        self._tls = settings.smtp_tls
        self._user = settings.smtp_user
        self._password = settings.smtp_password
        self._from = settings.smtp_from
        self._recipients = list(recipients)
        self._timeout_s = timeout_s
        self._local_hostname = local_hostname

    def __repr__(self) -> str:
        return f"SmtpSender({self._host}:{self._port}, {len(self._recipients)} recipient(s))"

    def message(self, alert: Alert) -> EmailMessage:
        """The mail `send` delivers."""
        msg = EmailMessage()
        msg["Subject"] = render_subject(alert)
        msg["From"] = self._from
        msg["To"] = ", ".join(self._recipients)
        msg["Date"] = format_datetime(alert.at.astimezone(UTC))
        # A domain is given so that make_msgid does not look up this machine's name.
        msg["Message-ID"] = make_msgid(domain=self._from.rpartition("@")[2] or "drbot")
        msg.set_content(render_text(alert) + "\n")
        return msg

    def send(self, alert: Alert) -> bool:
        try:
            refused = self._deliver(self.message(alert))
        except (smtplib.SMTPException, OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.warning(
                "alert.send_failed",
                destination=self.destination,
                host=self._host,
                error=f"{type(exc).__name__}: {self._scrub(str(exc))}",
                **_fields(alert),
            )
            return False
        log.info(
            "alert.sent",
            destination=self.destination,
            host=self._host,
            recipients=len(self._recipients),
            refused=len(refused),
            **_fields(alert),
        )
        return True

    def _deliver(self, msg: EmailMessage) -> dict[str, tuple[int, bytes]]:
        context = ssl.create_default_context()
        client: smtplib.SMTP
        if self._tls == "tls":
            client = smtplib.SMTP_SSL(
                self._host,
                self._port,
                local_hostname=self._local_hostname,
                timeout=self._timeout_s,
                context=context,
            )
        else:
            client = smtplib.SMTP(
                self._host, self._port, local_hostname=self._local_hostname, timeout=self._timeout_s
            )
        with client:
            if self._tls == "starttls":
                client.starttls(context=context)
            if self._user:
                client.login(self._user, self._password or "")
            return client.send_message(msg, to_addrs=self._recipients)

    def _scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text


# --- notifier --------------------------------------------------------------------------------


def _split_addresses(text: str | None) -> list[str]:
    return [a.strip() for a in (text or "").split(",") if a.strip()]


class _NoSmtpServer:
    """Stands in for e-mail when addresses are configured but DRBOT_SMTP_HOST is not."""

    destination = "email"

    def send(self, alert: Alert) -> bool:
        log.warning(
            "alert.send_failed",
            destination=self.destination,
            error="no SMTP server configured; set DRBOT_SMTP_HOST",
            **_fields(alert),
        )
        return False


def build_senders(
    alerts: Alerts, settings: Settings, *, timeout_s: float = _TIMEOUT_S
) -> list[AlertSender]:
    """One sender per destination in the union of `alerts` and the daemon-wide settings.

    Webhooks are deduplicated by URL; addresses case-insensitively, all in one mail. Addresses
    without an SMTP server give a sender that always fails (and says why), never an exception.
    """
    webhooks = list(dict.fromkeys(u for u in (alerts.webhook, settings.alert_webhook) if u))
    emails: dict[str, str] = {}
    for address in [*alerts.email, *_split_addresses(settings.alert_email)]:
        emails.setdefault(address.lower(), address)
    senders: list[AlertSender] = [WebhookSender(u, timeout_s=timeout_s) for u in webhooks]
    if emails and settings.smtp_host:
        senders.append(SmtpSender(settings, list(emails.values()), timeout_s=timeout_s))
    elif emails:
        senders.append(_NoSmtpServer())
    return senders


class Notifier:
    """Delivers one policy's alerts to every destination and keeps the book honest.

    An alert counts as delivered when at least one sender accepted it (the others log
    `alert.send_failed`); when every sender failed, `send` returns False and the caller must
    not call `AlertBook.sent`, so the same alert is due again at the next observation. With no
    destination at all the alert is logged (`alert.unrouted`) and counts as delivered, so
    reminders and recoveries keep their rhythm. Cheap to build; never raises when sending.
    """

    def __init__(
        self,
        alerts: Alerts,
        settings: Settings,
        *,
        senders: Sequence[AlertSender] | None = None,
        timeout_s: float = _TIMEOUT_S,
    ) -> None:
        """Senders from `build_senders(alerts, settings)` unless given (tests, custom routes)."""
        self.interval: timedelta = alerts.interval
        self.senders: list[AlertSender] = (
            list(senders)
            if senders is not None
            else build_senders(alerts, settings, timeout_s=timeout_s)
        )

    def __repr__(self) -> str:
        return f"Notifier({self.senders!r}, interval={self.interval})"

    def send(self, alert: Alert) -> bool:
        """Send `alert` to every destination; True if at least one accepted it (or none exist)."""
        if not self.senders:
            log.info("alert.unrouted", summary=alert.summary, **_fields(alert))
            return True
        results = [sender.send(alert) for sender in self.senders]
        return any(results)

    def report(
        self,
        book: AlertBook,
        condition: Condition,
        failing: bool,
        *,
        summary: str,
        details: Mapping[str, Any] | None = None,
    ) -> Alert | None:
        """Observe `condition` in `book` with this policy's interval, send what is due, and
        record it if delivered. Returns the alert delivered, or None (nothing due or delivered).
        """
        alert = book.observe(
            condition, failing, summary=summary, details=details or {}, interval=self.interval
        )
        if alert is None or not self.send(alert):
            return None
        book.sent(alert)
        return alert
