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
    log_level: Literal["debug", "info", "warning", "error"] = "warning"
    log_format: Literal["auto", "console", "json"] = "auto"

    @property
    def audit_directory(self) -> Path:
        return self.audit_dir or self.state_dir / "audit"
