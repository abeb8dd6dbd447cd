"""Settings from the environment, read once at the edge (CLI or daemon) into a frozen object."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "drbot"


class Settings(BaseSettings):
    """drbot's process-wide settings; every field can be set as DRBOT_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="DRBOT_", frozen=True, extra="ignore")

    policies: Path = Field(default=Path("policies"), description="directory of policy YAML files")
    state_dir: Path = Field(
        default_factory=_default_state_dir,
        description="local state: locks, caches (never the only copy of anything)",
    )
    audit_dir: Path | None = Field(
        default=None,
        description="the local audit trail and its public key (default: <state_dir>/audit)",
    )
    audit_key: Path | None = Field(
        default=None,
        description="Ed25519 audit signing key, 0600, made if absent (<audit_dir>/audit.key)",
    )
    http: str = Field(
        default="127.0.0.1:9187",
        description="the daemon's HTTP address (host:port) for /healthz, /readyz and /metrics",
    )
    grace_period: float = Field(
        default=60.0, gt=0, description="seconds running jobs get to finish after SIGTERM"
    )
    lease_ttl: float = Field(
        default=60.0,
        ge=3,
        description="seconds a daemon's lease on a policy lasts unless renewed (renewed every "
        "quarter of it); another daemon takes over this long after the holder stops renewing",
    )
    check_interval: float = Field(
        default=60.0,
        gt=0,
        description="seconds between the daemon's checks of each policy's RPO and destinations",
    )
    audit_ship_interval: float = Field(
        default=900.0,
        gt=0,
        description="seconds between the daemon's runs of `drbot audit ship`, which copies the "
        "audit trail to every destination and anchors its head there (a cut of the trail's tail "
        "is detectable from storage for everything shipped); the daemon also ships when it stops",
    )
    alert_webhook: str | None = Field(
        default=None, description="webhook for every policy's alerts (Slack-compatible JSON)"
    )
    alert_email: str | None = Field(
        default=None, description="comma-separated addresses for every policy's alerts"
    )
    smtp_host: str | None = Field(default=None, description="SMTP server for e-mail alerts")
    smtp_port: int = Field(default=25, description="SMTP port (587 with STARTTLS, 465 TLS)")
    smtp_tls: Literal["none", "starttls", "tls"] = "none"
    smtp_user: str | None = None
    smtp_password: str | None = Field(default=None, repr=False)
    smtp_from: str = Field(default="drbot@localhost", description="From: of alert e-mail")
    log_level: Literal["debug", "info", "warning", "error"] = "warning"
    log_format: Literal["auto", "console", "json"] = "auto"

    @property
    def audit_directory(self) -> Path:
        return self.audit_dir or self.state_dir / "audit"
