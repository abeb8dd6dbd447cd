"""Policy files: schema, loading with one message per problem, and the shipped examples."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

from drbot.errors import PolicyInvalid
from drbot.policy.durations import format_duration, parse_duration
from drbot.policy.load import (
    InvalidPolicies,
    expand_env,
    has_literal_password,
    load_policies,
    load_policy,
    policy_text_sha256,
)
from drbot.policy.schema import Policy, policy_json_schema

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "policies"
ENV = {
    "SHOP_DB_URI": "postgresql://drbot:s3cret@db.internal:5432/shop",
    "DRBOT_KEY_DIR": "/etc/drbot/keys",
}
# Every variable the shipped examples document, as their comments describe them.
EXAMPLES_ENV = {
    **ENV,
    "DEMO_DB_URI": "postgresql:///postgres?host=/var/run/postgresql",
    "DRBOT_DATA_DIR": "/var/lib/drbot",
    "ORDERS_MONGO_URI": "mongodb://drbot:s3cret@mongo-0.internal:27017/?replicaSet=rs0",
}


def shop_data() -> dict[str, Any]:
    """The shipped shop example as parsed YAML, for tests to change one thing at a time."""
    data: dict[str, Any] = yaml.safe_load((EXAMPLES / "shop.yaml").read_text())
    return data


def write(directory: Path, name: str, data: dict[str, Any] | str) -> Path:
    path = directory / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def problems_of(path: Path, env: dict[str, str] = ENV) -> list[str]:
    with pytest.raises(InvalidPolicies) as caught:
        load_policy(path, env)
    return list(caught.value.problems)


# --- the example from the issue -------------------------------------------------------------


def test_shop_example_means_what_its_comments_say() -> None:
    """The shop example validates and every value means what its comment says."""
    policy = load_policy(EXAMPLES / "shop.yaml", ENV)

    assert policy.version == 1
    assert policy.name == "shop"
    assert policy.source.kind == "postgresql"
    assert policy.source.uri == ENV["SHOP_DB_URI"]
    assert policy.source.databases is None
    assert policy.source.mode == "physical"  # the default: base backups + WAL
    assert policy.wal_slot == "drbot_shop"
    assert policy.source.partial_interval.total_seconds() == 10
    assert policy.schedule.full == "0 2 * * *"
    assert policy.schedule.incremental == "continuous"
    assert policy.schedule.drill == "0 6 * * 1"
    assert (
        policy.retention.keep_last,
        policy.retention.keep_daily,
        policy.retention.keep_weekly,
        policy.retention.keep_monthly,
        policy.retention.keep_yearly,
    ) == (3, 7, 4, 12, None)
    assert policy.encryption.key.kind == "file"
    assert policy.encryption.key.ref == "/etc/drbot/keys/shop.key"
    assert policy.encryption.key_ref == "file:/etc/drbot/keys/shop.key"
    assert (policy.compression.level, policy.compression.threads) == (3, -1)
    primary, replica = policy.destinations
    assert (primary.name, primary.kind, primary.url, primary.region) == (
        "primary",
        "s3",
        "s3://acme-dr-use1/shop",
        "us-east-1",
    )
    assert primary.object_lock is not None
    assert (primary.object_lock.mode, primary.object_lock.days) == ("governance", 14)
    assert (replica.name, replica.region, replica.object_lock) == ("replica", "eu-west-1", None)
    assert policy.targets.rpo == timedelta(minutes=5)
    assert policy.targets.rto == timedelta(minutes=30)
    assert policy.drill.sandbox == "docker"
    assert policy.drill.from_ == "rotate"
    assert [c.sql for c in policy.drill.checks] == ["select count(*) > 0 from orders"]
    assert policy.source_file == EXAMPLES / "shop.yaml"
    assert policy.source_sha256 == policy_text_sha256(EXAMPLES / "shop.yaml")


def test_every_shipped_example_validates_with_its_documented_env() -> None:
    """Every file in policies/ validates with the environment variables its comments list."""
    policies = load_policies(EXAMPLES, EXAMPLES_ENV)

    assert [p.name for p in policies] == ["local-demo", "orders", "shop"]
    demo = policies[0]
    assert [d.url for d in demo.destinations] == [
        "file:///var/lib/drbot/primary",
        "file:///var/lib/drbot/second-disk",
    ]
    assert {d.kind for d in demo.destinations} == {"file"}
    assert demo.drill.from_ == "second-disk"


def test_policy_is_frozen_and_hides_the_uri_from_repr() -> None:
    """A loaded policy cannot be changed and its repr never shows the source URI's password."""
    policy = load_policy(EXAMPLES / "shop.yaml", ENV)

    with pytest.raises(ValueError, match="frozen"):
        policy.name = "other"  # type: ignore[misc]
    assert "s3cret" not in repr(policy)


def test_policy_serializes_back_to_the_written_form() -> None:
    """Dumping a policy gives the YAML spelling back (durations as text, key as text, 'from')."""
    policy = load_policy(EXAMPLES / "shop.yaml", ENV)
    dumped = policy.model_dump(mode="json")

    assert dumped["targets"] == {"rpo": "5m", "rto": "30m"}
    assert dumped["encryption"] == {"key": "file:/etc/drbot/keys/shop.key", "previous_keys": []}
    assert dumped["drill"]["from"] == "rotate"
    assert Policy.model_validate(dumped).model_dump(mode="json") == dumped


def test_defaults_are_those_documented() -> None:
    """A minimal policy gets the documented defaults for every optional section."""
    data = {
        "version": 1,
        "name": "min",
        "source": {"kind": "postgresql", "uri": "postgresql:///db?host=/run/pg"},
        "encryption": {"key": "kms:alias/drbot-min"},
        "destinations": [{"name": "a", "url": "s3://bucket-a", "region": "us-east-1"}],
    }
    policy = Policy.model_validate(data)

    assert policy.source.databases is None
    assert (policy.schedule.full, policy.schedule.incremental, policy.schedule.drill) == (
        None,
        None,
        None,
    )
    assert policy.retention.keep_last == 1
    assert (policy.compression.level, policy.compression.threads) == (3, -1)
    assert (policy.targets.rpo, policy.targets.rto) == (None, None)
    assert (policy.drill.sandbox, policy.drill.from_, policy.drill.checks) == (
        "docker",
        "rotate",
        [],
    )
    assert policy.source_file is None


# --- one message per problem ----------------------------------------------------------------


def test_unknown_fields_are_named_with_file_and_path(tmp_path: Path) -> None:
    """An unknown field, top-level or nested in a list item, is an error naming file and path."""
    data = shop_data()
    data["colour"] = "blue"
    data["destinations"][1]["regoin"] = "eu-west-1"
    path = write(tmp_path, "shop.yaml", data)

    problems = problems_of(path)

    assert f"{path}: colour: unknown field" in "\n".join(problems)
    assert any(
        p.startswith(f"{path}: destinations[1].regoin: unknown field") and "'region'" in p
        for p in problems
    )


def test_invalid_cron_names_field_and_expression(tmp_path: Path) -> None:
    """A cron expression APScheduler rejects is reported with its field and the expression."""
    data = shop_data()
    data["schedule"]["full"] = "0 25 * * *"
    data["schedule"]["incremental"] = "every 5 minutes"
    path = write(tmp_path, "shop.yaml", data)

    problems = problems_of(path)

    assert problems[0].startswith(f"{path}: schedule.full: invalid schedule '0 25 * * *'")
    assert problems[1].startswith(f"{path}: schedule.incremental: invalid schedule")
    assert len(problems) == 2


def test_every_schedules_are_accepted_and_checked(tmp_path: Path) -> None:
    """`@every DURATION` is a schedule; a bad duration after it is named like a bad cron."""
    data = shop_data()
    data["schedule"]["full"] = "@every 30s"
    data["schedule"]["drill"] = "@every 1h30m"
    data["schedule"]["verify"] = "@every 5 minutes"
    path = write(tmp_path, "shop.yaml", data)

    problems = problems_of(path)

    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: schedule.verify: invalid schedule '@every 5 minutes'")
    data["schedule"]["verify"] = None
    policy = load_policy(write(tmp_path, "shop.yaml", data), ENV)
    assert policy.schedule.full == "@every 30s"
    assert policy.schedule.verify is None


def test_missing_env_var_is_named_once_with_its_field(tmp_path: Path) -> None:
    """An unset ${VAR} is one problem naming the variable and the field that uses it."""
    path = write(tmp_path, "shop.yaml", shop_data())

    problems = problems_of(path, {"DRBOT_KEY_DIR": "/keys"})

    assert problems == [f"{path}: source.uri: environment variable SHOP_DB_URI is not set"]


def test_expand_env_defaults_and_dollar_escape() -> None:
    """${VAR:-default} falls back when unset or empty, $$ is a literal $, a lone $ stays."""
    env = {"SET": "x", "EMPTY": ""}

    assert expand_env("a${SET}b", env) == "axb"
    assert expand_env("${UNSET:-d}/${EMPTY:-e}/${SET:-f}", env) == "d/e/x"
    assert expand_env("cost $$5 or $6", env) == "cost $5 or $6"
    with pytest.raises(PolicyInvalid, match=r"^drill\.checks\[0\]\.sql: malformed"):
        expand_env("select ${oops", env, field="drill.checks[0].sql")


def test_literal_password_in_uri_is_rejected_without_echoing_it(tmp_path: Path) -> None:
    """A literal password in source.uri is rejected with a fix, and the password is not shown."""
    data = shop_data()
    data["source"]["uri"] = "postgresql://u:secret@h/db"
    path = write(tmp_path, "shop.yaml", data)

    problems = problems_of(path)

    assert problems == [
        f"{path}: source.uri: literal password in source.uri; put the URI in an environment "
        "variable: uri: ${SHOP_DB_URI}"
    ]
    assert "secret" not in problems[0]


def test_password_from_env_var_is_accepted(tmp_path: Path) -> None:
    """A URI whose password is a ${VAR} reference loads, with the password expanded."""
    data = shop_data()
    data["source"]["uri"] = "postgresql://u:${SHOP_DB_PASSWORD}@h/db"
    path = write(tmp_path, "shop.yaml", data)

    policy = load_policy(path, {**ENV, "SHOP_DB_PASSWORD": "pw"})

    assert policy.source.uri == "postgresql://u:pw@h/db"


@pytest.mark.parametrize(
    ("raw", "literal"),
    [
        ("postgresql://u:secret@h/db", True),
        ("postgresql://u:se/cr@t@h/db", True),
        ("postgresql://u@h/db?sslmode=require&password=secret", True),
        ("host=h dbname=d password=secret", True),
        ("host=h dbname=d password = 'se cret'", True),
        ("${URI:-postgresql://u:secret@h/db}", True),
        ("mongodb://u:secret@h1,h2/?replicaSet=rs", True),
        ("postgresql://u:${PW}@h/db", False),
        ("host=h password=${PW} dbname=d", False),
        ("postgresql://u@h/db", False),
        ("postgresql:///db?host=/run/postgresql", False),
        ("${SHOP_DB_URI}", False),
        ("http://127.0.0.1:9000", False),
    ],
)
def test_literal_password_detection(raw: str, literal: bool) -> None:
    """Only passwords that do not come entirely from one ${VAR} count as literal."""
    assert has_literal_password(raw) is literal


def test_duplicate_destination_names_are_rejected(tmp_path: Path) -> None:
    """Two destinations with one name are an error pointing at the second one's name."""
    data = shop_data()
    data["destinations"][1]["name"] = "primary"
    path = write(tmp_path, "shop.yaml", data)

    assert problems_of(path) == [
        f"{path}: destinations[1].name: destination name 'primary' is used more than once"
    ]


def test_drill_from_unknown_destination_is_rejected(tmp_path: Path) -> None:
    """drill.from naming no destination is an error listing the names that exist."""
    data = shop_data()
    data["drill"]["from"] = "tertiary"
    path = write(tmp_path, "shop.yaml", data)

    assert problems_of(path) == [
        f"{path}: drill.from: unknown destination 'tertiary'; use 'rotate' or one of: "
        "primary, replica"
    ]


def test_drill_from_known_destination_is_accepted(tmp_path: Path) -> None:
    """drill.from may name an existing destination."""
    data = shop_data()
    data["drill"]["from"] = "replica"

    assert load_policy(write(tmp_path, "shop.yaml", data), ENV).drill.from_ == "replica"


def test_s3_destination_without_region_is_rejected(tmp_path: Path) -> None:
    """An s3 destination needs a region; the error names destinations[i].region."""
    data = shop_data()
    del data["destinations"][1]["region"]
    path = write(tmp_path, "shop.yaml", data)

    assert problems_of(path) == [
        f"{path}: destinations[1].region: required for an s3 destination (e.g. region: us-east-1)"
    ]


def test_file_destinations_take_no_s3_fields(tmp_path: Path) -> None:
    """A file:// destination with a region or object lock is an error on that field."""
    data = shop_data()
    data["destinations"][1] = {"name": "local", "url": "file:///srv/dr", "region": "eu-west-1"}
    path = write(tmp_path, "shop.yaml", data)

    assert problems_of(path) == [
        f"{path}: destinations[1].region: only s3 destinations take this field"
    ]


def test_destination_urls_are_checked_and_normalised() -> None:
    """Bad destination URLs are rejected; a trailing slash is dropped from good ones."""
    data = shop_data()
    data["source"]["uri"] = "postgresql://h/db"
    data["encryption"]["key"] = "file:/k"
    data["destinations"][0]["url"] = "s3://acme-dr-use1/shop/"
    assert Policy.model_validate(data).destinations[0].url == "s3://acme-dr-use1/shop"

    for bad in ("s3://Acme_DR/x", "file://relative/path", "ftp://host/x", "s3://bucket//x"):
        data["destinations"][0]["url"] = bad
        with pytest.raises(ValueError, match=r"destinations\.0\.url"):
            Policy.model_validate(data)


def test_kms_key_needs_a_region_for_every_destination(tmp_path: Path) -> None:
    """A kms key with a file:// destination (no region to resolve it in) is rejected."""
    data = shop_data()
    data["encryption"]["key"] = "kms:alias/drbot-shop"
    data["destinations"][1] = {"name": "local", "url": "file:///srv/dr"}
    path = write(tmp_path, "shop.yaml", data)

    problems = problems_of(path)

    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: encryption.key: a kms key is resolved in each")


def test_retention_that_keeps_nothing_is_rejected(tmp_path: Path) -> None:
    """Retention rules that are all 0 would delete every backup and are an error."""
    data = shop_data()
    data["retention"] = {"keep_last": 0, "keep_daily": 0}
    path = write(tmp_path, "shop.yaml", data)

    assert problems_of(path) == [
        f"{path}: retention: every keep_* rule is 0, so retention would delete every backup; "
        "set at least one above 0"
    ]


def test_durations_parse_and_format() -> None:
    """Durations read '30s', '5m', '1h', '7d', '1h30m' and write back their shortest form."""
    assert parse_duration("30s") == timedelta(seconds=30)
    assert parse_duration("5m") == timedelta(minutes=5)
    assert parse_duration("1h") == timedelta(hours=1)
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert format_duration(timedelta(minutes=90)) == "1h30m"
    assert format_duration(parse_duration("90m")) == "1h30m"
    assert format_duration(timedelta(days=1, seconds=5)) == "1d5s"
    for bad in ("", "5", "1.5h", "5 m", "30m1h", "0s", "1w", "-5m"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_bad_durations_in_a_policy_are_explained(tmp_path: Path) -> None:
    """A target without a unit is reported on its field with how to write one."""
    data = shop_data()
    data["targets"] = {"rpo": 300, "rto": "1h30"}
    path = write(tmp_path, "shop.yaml", data)

    problems = problems_of(path)

    assert [p.split(": ")[1] for p in problems] == ["targets.rpo", "targets.rto"]
    assert all("e.g. '30s', '5m', '1h30m'" in p for p in problems)


def test_several_problems_in_two_files_are_reported_together(tmp_path: Path) -> None:
    """load_policies reports every problem of every file in one PolicyInvalid, line by line."""
    first = shop_data()
    first["compression"]["level"] = 30
    first["drill"]["sandbox"] = "vm"
    second = shop_data()
    second["name"] = "Shop Two"
    del second["destinations"]
    write(tmp_path, "a.yaml", first)
    write(tmp_path, "b.yml", second)
    write(tmp_path, "notes.txt", "not a policy")

    with pytest.raises(PolicyInvalid) as caught:
        load_policies(tmp_path, ENV)

    assert caught.value.exit_code == 16
    assert str(caught.value).splitlines() == [
        f"{tmp_path}/a.yaml: compression.level: must be at most 22",
        f"{tmp_path}/a.yaml: drill.sandbox: must be 'docker' or 'process', got text 'vm'",
        f"{tmp_path}/b.yml: name: must be 1-63 characters: lowercase letters, digits, '_' or "
        "'-', starting with a letter or digit",
        f"{tmp_path}/b.yml: destinations: required field is missing",
    ]


def test_duplicate_policy_names_across_files_are_rejected(tmp_path: Path) -> None:
    """Two files declaring one policy name are an error naming both files."""
    write(tmp_path, "a.yaml", shop_data())
    write(tmp_path, "b.yaml", shop_data())

    with pytest.raises(InvalidPolicies) as caught:
        load_policies(tmp_path, ENV)

    assert caught.value.problems == (
        f"{tmp_path}/b.yaml: name: policy name 'shop' is already used by {tmp_path}/a.yaml",
    )


def test_missing_or_empty_directory_is_an_error_naming_it(tmp_path: Path) -> None:
    """A policy directory that is missing or holds no policy files is an error naming it."""
    with pytest.raises(PolicyInvalid, match=f"^{tmp_path}/nope: policy directory does not exist"):
        load_policies(tmp_path / "nope", ENV)
    write(tmp_path, "README.md", "# no policies here")
    with pytest.raises(PolicyInvalid, match=f"^{tmp_path}: no policy files"):
        load_policies(tmp_path, ENV)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    """A YAML syntax error is reported with the file and the line it is on."""
    text = (EXAMPLES / "shop.yaml").read_text().replace("  level: 3", "  level: [3")
    path = write(tmp_path, "shop.yaml", text)
    line = text.splitlines().index("  level: [3") + 1

    problems = problems_of(path)

    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: line ")
    assert "YAML syntax error" in problems[0]
    assert f"started at line {line}" in problems[0]


def test_duplicate_yaml_keys_are_an_error(tmp_path: Path) -> None:
    """A key written twice in one mapping is an error on the second one's line, not overwritten."""
    path = write(tmp_path, "p.yaml", "version: 1\nname: a\nname: b\n")

    assert problems_of(path) == [
        f"{path}: line 3, column 1: YAML syntax error: duplicate key 'name'"
    ]


def test_a_file_that_is_not_a_mapping_is_an_error(tmp_path: Path) -> None:
    """An empty file or a top-level list is an error saying what a policy file looks like."""
    empty = write(tmp_path, "empty.yaml", "")
    listing = write(tmp_path, "list.yaml", "- version: 1\n")

    assert problems_of(empty)[0].startswith(f"{empty}: the file is empty")
    assert problems_of(listing)[0].startswith(f"{listing}: the file is a list, not a mapping")


def test_policy_text_sha256_hashes_the_file_bytes(tmp_path: Path) -> None:
    """policy_text_sha256 changes with the file text and names a missing file."""
    path = write(tmp_path, "p.yaml", "version: 1\n")
    first = policy_text_sha256(path)
    path.write_text("version: 1\n# changed\n")

    assert len(first) == 64
    assert policy_text_sha256(path) != first
    with pytest.raises(PolicyInvalid, match=r"missing\.yaml"):
        policy_text_sha256(tmp_path / "missing.yaml")


# --- JSON Schema ----------------------------------------------------------------------------


def test_json_schema_accepts_the_examples_as_written() -> None:
    """The JSON Schema is valid JSON Schema and accepts both shipped examples unexpanded."""
    schema = policy_json_schema()
    validator = jsonschema.Draft202012Validator(json.loads(json.dumps(schema)))
    jsonschema.Draft202012Validator.check_schema(schema)

    for path in sorted(EXAMPLES.glob("*.yaml")):
        validator.validate(yaml.safe_load(path.read_text()))


def test_json_schema_rejects_unknown_and_malformed_fields() -> None:
    """The JSON Schema rejects an unknown nested field, a bad duration and a bad key reference."""
    validator = jsonschema.Draft202012Validator(policy_json_schema())
    changes: list[tuple[tuple[str | int, ...], str, str]] = [
        (("destinations", 1), "regoin", "eu-west-1"),
        (("targets",), "rpo", "5 minutes"),
        (("encryption",), "key", "vault:shop"),
        ((), "name", "Shop"),
    ]
    for where, key, value in changes:
        data = shop_data()
        node: Any = data
        for part in where:
            node = node[part]
        node[key] = value
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(data)


# --- physical and logical modes -------------------------------------------------------------


def test_mode_combinations_that_cannot_work_are_refused_with_the_field(tmp_path: Path) -> None:
    """Physical copies the whole cluster; WAL needs physical; MongoDB is logical only."""
    data = shop_data()
    data["source"]["databases"] = ["shop"]  # physical by default
    problems = "\n".join(problems_of(write(tmp_path, "a.yaml", data)))
    assert "source.databases: a physical backup copies the whole cluster" in problems

    data = shop_data()
    data["source"]["mode"] = "logical"  # shop.yaml streams WAL
    problems = "\n".join(problems_of(write(tmp_path, "b.yaml", data)))
    assert "schedule.incremental: PostgreSQL incrementals are WAL" in problems

    data = shop_data()
    data["source"] = {"kind": "mongodb", "uri": "mongodb://h/db", "mode": "physical"}
    data["drill"].pop("checks", None)
    problems = "\n".join(problems_of(write(tmp_path, "c.yaml", data)))
    assert "source.mode: mongodb sources are backed up logically only" in problems

    data = shop_data()
    data["source"]["slot"] = "Drbot-Slot"
    problems = "\n".join(problems_of(write(tmp_path, "d.yaml", data)))
    assert "source.slot" in problems


def test_mongodb_defaults_to_logical_and_slot_names_are_valid_identifiers() -> None:
    data = shop_data()
    data["encryption"]["key"] = "file:/etc/drbot/keys/shop.key"
    data["source"] = {"kind": "mongodb", "uri": "mongodb://h/db"}
    data["schedule"].pop("incremental", None)
    data["drill"].pop("checks", None)
    assert Policy.model_validate(data).source.mode == "logical"
    data = shop_data()
    data["encryption"]["key"] = "file:/etc/drbot/keys/shop.key"
    data["name"] = "shop-eu"
    data["source"]["uri"] = "postgresql:///db?host=/run/pg"
    assert Policy.model_validate(data).wal_slot == "drbot_shop_eu"
