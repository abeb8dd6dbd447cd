"""The policy model: what one policy file may say, validated into frozen objects.

Every model forbids unknown fields, so a typo is an error rather than a silently ignored
setting. Validators raise `SubfieldError` (a ValueError) when the problem belongs to a field
below the one being validated, so messages can name the exact field path. Values here are
already environment-expanded; `drbot.policy.load` does the expansion and the literal-password
check on the raw text, and turns validation errors into `drbot.errors.PolicyInvalid`.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from drbot.policy.cron import schedule_trigger
from drbot.policy.durations import Duration

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
NAME_RULE = (
    "1-63 characters: lowercase letters, digits, '_' or '-', starting with a letter or digit"
)
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_KEY_PATTERN = r"^(file|kms):.+$"
_PG_SCHEMES = ("postgresql://", "postgres://")
_MONGO_SCHEMES = ("mongodb://", "mongodb+srv://")

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]


class SubfieldError(ValueError):
    """A validation problem located `subpath` below the field whose validator raised it."""

    def __init__(self, message: str, subpath: tuple[str | int, ...]) -> None:
        super().__init__(message)
        self.subpath = subpath


def check_cron(expr: str) -> str:
    """`expr` itself if it is a 5-field crontab expression (UTC) or `@every DURATION`;
    ValueError otherwise."""
    try:
        schedule_trigger(expr)
    except ValueError as exc:
        raise ValueError(
            f"invalid schedule {expr!r}: {exc} "
            "(cron: 5 fields, UTC: minute hour day-of-month month day-of-week; "
            "or '@every 30m')"
        ) from None
    return expr


def _check_incremental(value: str) -> str:
    return value if value == "continuous" else check_cron(value)


Cron = Annotated[str, AfterValidator(check_cron)]
Incremental = Annotated[str, AfterValidator(_check_incremental)]


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", serialize_by_alias=True, validate_by_name=False
    )


class Source(_Model):
    """The database this policy protects."""

    kind: Literal["postgresql", "mongodb"] = Field(description="postgresql | mongodb")
    uri: str = Field(
        repr=False,  # holds the password once expanded; keep it out of reprs and tracebacks
        description="connection URI or key=value DSN; use ${VAR}, literal passwords are rejected",
    )
    databases: list[Annotated[str, StringConstraints(min_length=1)]] | None = Field(
        default=None,
        min_length=1,
        description="databases to back up; omit for all except templates",
    )
    mode: Literal["physical", "logical"] | None = Field(
        default=None,
        description="postgresql: physical (base backup + WAL, the default; the whole cluster, "
        "point-in-time restore) or logical (pg_dump of the listed databases); mongodb: logical",
    )
    slot: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,63}$")] | None = Field(
        default=None,
        description="physical: the replication slot drbot owns and streams WAL through "
        "(default drbot_<policy name, '-' as '_'>)",
    )
    partial_interval: Duration = Field(
        default=timedelta(seconds=10),
        description="continuous incrementals: how often the unfinished WAL segment "
        "(or change-stream slice) is shipped; bounds the RPO",
    )
    bin_dir: Path | None = Field(
        default=None, description="absolute directory of the client tools (pg_dump, ...)"
    )

    @field_validator("bin_dir")
    @classmethod
    def _absolute_bin_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("must be an absolute directory path")
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_mode(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mode") is None:
            return {**data, "mode": "logical" if data.get("kind") == "mongodb" else "physical"}
        return data

    @model_validator(mode="after")
    def _mode_fits(self) -> Self:
        if self.kind == "mongodb" and self.mode == "physical":
            raise SubfieldError("mongodb sources are backed up logically only", ("mode",))
        if self.kind == "postgresql" and self.mode == "physical" and self.databases is not None:
            raise SubfieldError(
                "a physical backup copies the whole cluster, so source.databases does not "
                "apply; remove it, or set source.mode: logical",
                ("databases",),
            )
        return self

    @model_validator(mode="after")
    def _uri_matches_kind(self) -> Self:
        # The message never quotes the URI: after expansion it may hold a password.
        if self.kind == "postgresql":
            if not self.uri.startswith(_PG_SCHEMES) and "=" not in self.uri:
                raise SubfieldError(
                    "must be a postgresql:// URI or a key=value connection string", ("uri",)
                )
        elif not self.uri.startswith(_MONGO_SCHEMES):
            raise SubfieldError("must be a mongodb:// or mongodb+srv:// URI", ("uri",))
        return self


class Schedule(_Model):
    """When jobs run: 5-field cron expressions read in UTC, or `@every DURATION`. An omitted
    job is not scheduled (verify runs daily unless set to null)."""

    full: Cron | None = Field(default=None, description="full backups (cron, UTC)")
    incremental: Incremental | None = Field(
        default=None, description="'continuous' (WAL / change-stream streaming) or cron, UTC"
    )
    drill: Cron | None = Field(default=None, description="restore drills (cron, UTC)")
    verify: Cron | None = Field(
        default="0 4 * * *",
        description="the daemon's check of a sample of stored backups (cron, UTC; null: never)",
    )
    verify_sample: int = Field(
        default=2, ge=1, description="backups each scheduled verify reads back (newest + random)"
    )


_KEEP_FIELDS = ("keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")


class Retention(_Model):
    """How many complete backups to keep; a backup kept by any rule is kept.

    With no rule given at all, `keep_last` is 1. Rules that together keep nothing are an error.
    """

    keep_last: int | None = Field(default=None, ge=0, description="the newest N backups")
    keep_daily: int | None = Field(default=None, ge=0, description="the last backup of N days")
    keep_weekly: int | None = Field(default=None, ge=0, description="... of N ISO weeks")
    keep_monthly: int | None = Field(default=None, ge=0, description="... of N months")
    keep_yearly: int | None = Field(default=None, ge=0, description="... of N years")

    @model_validator(mode="before")
    @classmethod
    def _default_keep_last(cls, data: Any) -> Any:
        if isinstance(data, dict) and all(data.get(k) is None for k in _KEEP_FIELDS):
            return {**data, "keep_last": 1}
        return data

    @model_validator(mode="after")
    def _keeps_something(self) -> Self:
        if not any(getattr(self, k) for k in _KEEP_FIELDS):
            raise ValueError(
                "every keep_* rule is 0, so retention would delete every backup; "
                "set at least one above 0"
            )
        return self


class KeyRef(_Model):
    """A policy key reference: `file:/abs/path` (a key file) or `kms:<alias|key id|ARN>`."""

    kind: Literal["file", "kms"]
    ref: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.ref}"


def parse_key_ref(value: Any) -> Any:
    """A KeyRef from "file:PATH" / "kms:KEYID" text (other inputs pass through unchanged).

    Raises ValueError for text of another form or a relative key file path.
    """
    if isinstance(value, KeyRef) or not isinstance(value, str):
        return value
    kind, sep, ref = value.partition(":")
    if not sep or kind not in ("file", "kms") or not ref:
        raise ValueError(
            "must be 'file:/path/to/key' or 'kms:<alias/name | key id | ARN>' "
            "(e.g. kms:alias/drbot-shop)"
        )
    if kind == "file" and not Path(ref).is_absolute():
        raise ValueError("a key file path must be absolute, e.g. file:${DRBOT_KEY_DIR}/shop.key")
    return KeyRef(kind=kind, ref=ref)


KeyRefText = Annotated[
    KeyRef,
    BeforeValidator(parse_key_ref),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": _KEY_PATTERN,
            "description": "file:/abs/path/to/key or kms:alias/NAME (resolved per region)",
        }
    ),
]


class Encryption(_Model):
    """Which key wraps each backup's data key."""

    key: KeyRefText
    previous_keys: list[KeyRefText] = Field(
        default_factory=list,
        description="keys rotated away from: still used to open what they wrap, never to wrap "
        "(drbot keys rotate, docs/keys.md)",
    )

    @property
    def key_ref(self) -> str:
        """The key reference as text ("file:/keys/shop.key", "kms:alias/drbot-shop")."""
        return str(self.key)

    @property
    def previous_refs(self) -> list[str]:
        return [str(k) for k in self.previous_keys]


class Compression(_Model):
    """zstd settings applied before encryption."""

    level: int = Field(default=3, ge=1, le=22, description="zstd level 1..22")
    threads: int = Field(
        default=-1, ge=-1, description="zstd worker threads; -1 = all cores, 0 = single-threaded"
    )


class ObjectLock(_Model):
    """S3 Object Lock retention applied to every object written."""

    mode: Literal["governance", "compliance"]
    days: int = Field(ge=1)


class Destination(_Model):
    """One place backups go: `s3://bucket[/prefix]` (needs region) or `file:///abs/path`."""

    name: Name = Field(description=NAME_RULE)
    url: str = Field(description="s3://bucket[/prefix] or file:///absolute/path")
    region: str | None = Field(default=None, description="AWS region; required for s3")
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (http(s)://host:port); s3 only"
    )
    object_lock: ObjectLock | None = Field(default=None, description="s3 only")

    @field_validator("url")
    @classmethod
    def _valid_url(cls, url: str) -> str:
        if url.startswith("s3://"):
            return _check_s3_url(url)
        if url.startswith("file://"):
            return _check_file_url(url)
        raise ValueError("must be s3://bucket[/prefix] or file:///absolute/path")

    @field_validator("region")
    @classmethod
    def _valid_region(cls, region: str | None) -> str | None:
        if region is not None and not _REGION_RE.match(region):
            raise ValueError("must be a region name such as us-east-1")
        return region

    @field_validator("endpoint_url")
    @classmethod
    def _valid_endpoint(cls, endpoint: str | None) -> str | None:
        if endpoint is not None:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("must be an http:// or https:// URL with a host")
        return endpoint

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> Self:
        if self.kind == "s3":
            if self.region is None:
                raise SubfieldError(
                    "required for an s3 destination (e.g. region: us-east-1)", ("region",)
                )
            return self
        for field in ("region", "endpoint_url", "object_lock"):
            if getattr(self, field) is not None:
                raise SubfieldError("only s3 destinations take this field", (field,))
        return self

    @property
    def kind(self) -> Literal["s3", "file"]:
        """'s3' or 'file', from the URL scheme."""
        return "s3" if self.url.startswith("s3://") else "file"


def _check_s3_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError("an s3 URL is s3://bucket[/prefix], without user, query or fragment")
    if not _BUCKET_RE.match(parts.netloc) or ".." in parts.netloc:
        raise ValueError(
            f"bucket {parts.netloc!r} is not a valid S3 bucket name "
            "(3-63 lowercase letters, digits, '.' or '-')"
        )
    prefix = parts.path.removeprefix("/").removesuffix("/")
    if prefix and any(seg in ("", ".", "..") for seg in prefix.split("/")):
        raise ValueError("the prefix must not contain empty, '.' or '..' segments")
    # A trailing slash is normalised away so object keys never get a double '/'.
    return f"s3://{parts.netloc}/{prefix}" if prefix else f"s3://{parts.netloc}"


def _check_file_url(url: str) -> str:
    path = url[len("file://") :]
    if not path.startswith("/"):
        raise ValueError("a local destination is file:///absolute/path (three slashes)")
    if any(seg in (".", "..") for seg in path.split("/")):
        raise ValueError("the path must not contain '.' or '..' segments")
    return url.rstrip("/") or "file:///"


class Alerts(_Model):
    """Where this policy's alerts go (in addition to the daemon-wide DRBOT_ALERT_* settings)."""

    webhook: str | None = Field(
        default=None,
        description='http(s) URL receiving Slack-compatible JSON ({"text": ...}); '
        "write ${VAR} if it holds a token",
    )
    email: list[Annotated[str, StringConstraints(pattern=r"^[^@\s]+@[^@\s]+$")]] = Field(
        default_factory=list, description="addresses mailed through DRBOT_SMTP_HOST"
    )
    interval: Duration = Field(
        default=timedelta(hours=1),
        description="at most one alert per condition per interval while it lasts",
    )

    @field_validator("webhook")
    @classmethod
    def _valid_webhook(cls, url: str | None) -> str | None:
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                # Never quote the URL: webhook URLs embed their secret.
                raise ValueError("must be an http:// or https:// URL")
        return url


class Targets(_Model):
    """Recovery objectives that drills measure against. Omitted = not checked."""

    rpo: Duration | None = Field(default=None, description="most data a restore may lose")
    rto: Duration | None = Field(default=None, description="longest a restore may take")


class Check(_Model):
    """One check run against the restored database; it passes if it returns true."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = Field(
        default=None, description="how drill reports name it (default: check-1, check-2, ...)"
    )
    sql: Annotated[str, StringConstraints(min_length=1)] = Field(
        description="a query whose first column of its first row is true (PostgreSQL sources)"
    )
    database: Annotated[str, StringConstraints(min_length=1)] | None = Field(
        default=None, description="database to run it in (default: the source URI's database)"
    )


class RandomWithin(_Model):
    """Drill a random restore point from the recent past, as AWS Backup restore testing does."""

    random_within: Duration = Field(description="how far back the random point may lie")


_MEMORY_RE = r"^[1-9][0-9]*[kmg]$"


class Drill(_Model):
    """How restore drills run."""

    sandbox: Literal["docker", "process"] = Field(
        default="docker", description="docker (no network) or process (local server)"
    )
    from_: str = Field(
        default="rotate",
        alias="from",
        description="destination drills restore from: 'rotate' (each in turn) or a name",
    )
    pick: Literal["latest"] | RandomWithin = Field(
        default="latest",
        description="restore point: 'latest', or {random_within: 7d} for a random recent one",
    )
    checks: list[Check] = Field(default_factory=list)
    image: str | None = Field(
        default=None,
        description="sandbox image (docker); default: postgres:<major> of the source's version",
    )
    pull: bool = Field(
        default=False, description="pull the image if it is missing (never, by default)"
    )
    cpus: float | None = Field(default=None, gt=0, le=256, description="CPU limit (docker)")
    memory: Annotated[str, StringConstraints(pattern=_MEMORY_RE)] | None = Field(
        default=None, description="memory limit (docker), e.g. 512m or 2g"
    )
    timeout: Duration = Field(
        default=timedelta(hours=2), description="a drill still restoring after this fails"
    )

    @field_validator("checks")
    @classmethod
    def _check_names(cls, checks: list[Check]) -> list[Check]:
        named = [
            c if c.name else c.model_copy(update={"name": f"check-{i + 1}"})
            for i, c in enumerate(checks)
        ]
        seen: set[str] = set()
        for index, check in enumerate(named):
            if check.name in seen:
                raise SubfieldError(
                    f"check name {check.name!r} is used more than once", (index, "name")
                )
            seen.add(str(check.name))
        return named


class Policy(_Model):
    """One policy file. `source_file` / `source_sha256` are set when loaded from a file."""

    version: Literal[1] = Field(description="policy format version; 1")
    name: Name = Field(description=f"unique; used in object keys, logs and metrics ({NAME_RULE})")
    source: Source
    schedule: Schedule = Field(default_factory=Schedule)
    retention: Retention = Field(default_factory=Retention)
    encryption: Encryption
    compression: Compression = Field(default_factory=Compression)
    destinations: list[Destination] = Field(min_length=1)
    targets: Targets = Field(default_factory=Targets)
    drill: Drill = Field(default_factory=Drill)
    alerts: Alerts = Field(default_factory=Alerts)

    _source_file: Path | None = PrivateAttr(default=None)
    _source_sha256: str | None = PrivateAttr(default=None)

    @property
    def source_file(self) -> Path | None:
        """The file this policy was loaded from (None if built in code)."""
        return self._source_file

    @property
    def source_sha256(self) -> str | None:
        """SHA-256 (hex) of the file's bytes as read, for the audit trail."""
        return self._source_sha256

    @property
    def wal_slot(self) -> str:
        """The physical replication slot drbot owns for this policy's WAL."""
        return self.source.slot or "drbot_" + self.name.replace("-", "_")[:57]

    def destination(self, name: str) -> Destination:
        """The destination called `name`; KeyError if there is none."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, destinations: list[Destination]) -> list[Destination]:
        seen: set[str] = set()
        for index, dest in enumerate(destinations):
            if dest.name in seen:
                raise SubfieldError(
                    f"destination name {dest.name!r} is used more than once", (index, "name")
                )
            seen.add(dest.name)
        return destinations

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Self:
        names = [d.name for d in self.destinations]
        if self.drill.from_ != "rotate" and self.drill.from_ not in names:
            raise SubfieldError(
                f"unknown destination {self.drill.from_!r}; use 'rotate' or one of: "
                + ", ".join(names),
                ("drill", "from"),
            )
        if (
            self.source.kind == "postgresql"
            and self.source.mode == "logical"
            and self.schedule.incremental is not None
        ):
            raise SubfieldError(
                "PostgreSQL incrementals are WAL, which only a physical backup can replay; "
                "remove schedule.incremental or set source.mode: physical",
                ("schedule", "incremental"),
            )
        if self.source.kind != "postgresql" and self.drill.checks:
            raise SubfieldError(
                f"sql checks need a postgresql source, not {self.source.kind}",
                ("drill", "checks", 0, "sql"),
            )
        if self.encryption.key.kind == "kms" or any(
            k.kind == "kms" for k in self.encryption.previous_keys
        ):
            for index, dest in enumerate(self.destinations):
                if dest.region is None:
                    raise SubfieldError(
                        f"a kms key is resolved in each destination's region, but destination "
                        f"{dest.name!r} (destinations[{index}]) has none",
                        ("encryption", "key"),
                    )
        context = info.context if isinstance(info.context, dict) else {}
        self._source_file = context.get("source_file")
        self._source_sha256 = context.get("source_sha256")
        return self


def policy_json_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of policy files as people write them, for editors and linters.

    Environment references (`${VAR}`) are plain strings to the schema, so fields with a
    pattern (name, durations, key) should not be written as a bare `${VAR}`.
    """
    schema = Policy.model_json_schema(by_alias=True, mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "title": "drbot policy",
    }
