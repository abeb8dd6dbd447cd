"""Read policy files: YAML, environment references, literal-password check, validation.

Every problem in every file is collected and raised once, as `InvalidPolicies` (a
`drbot.errors.PolicyInvalid`) whose message has one line per problem:
`<file>: <field.path[0].sub>: <problem>`. Messages never quote a value that may hold a secret.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import structlog
import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from drbot.errors import PolicyInvalid
from drbot.policy.schema import NAME_PATTERN, NAME_RULE, Policy, SubfieldError

log = structlog.get_logger(__name__)

Loc = tuple[str | int, ...]

_VAR = r"[A-Za-z_][A-Za-z0-9_]*"
_REFERENCE = re.compile(r"\$\$|\$\{(" + _VAR + r")(?::-([^}]*))?\}|\$\{")
_ENV_ONLY = re.compile(r"^\$\{" + _VAR + r"\}$")
_WHOLE_WITH_DEFAULT = re.compile(r"^\$\{" + _VAR + r":-(.*)\}$", re.DOTALL)
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DSN_PASSWORD = re.compile(r"(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'|\S*)", re.IGNORECASE)
_SCHEMA_HINT = "`drbot policy schema` prints every field; docs/policy.md explains them"


class InvalidPolicies(PolicyInvalid):
    """One or more policy files are invalid; `problems` holds one line per problem."""

    def __init__(self, problems: Sequence[str], *, hint: str | None = _SCHEMA_HINT) -> None:
        super().__init__("\n".join(problems), hint=hint)
        self.problems: tuple[str, ...] = tuple(problems)


def format_loc(loc: Iterable[str | int]) -> str:
    """('destinations', 1, 'region') -> 'destinations[1].region'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def expand_env(text_value: str, env: Mapping[str, str], *, field: str = "") -> str:
    """`text_value` with `${VAR}` / `${VAR:-default}` replaced from `env` and `$$` made `$`.

    `${VAR:-default}` uses the default when VAR is unset or empty; a lone `$` stays as is.
    Raises InvalidPolicies naming each unset variable (and `field`, if given) or malformed
    reference.
    """
    expanded, problems = _expand(text_value, env)
    if problems:
        raise InvalidPolicies([f"{field}: {p}" if field else p for p in problems])
    return expanded


def _expand(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    problems: list[str] = []

    def replace(match: re.Match[str]) -> str:
        text, name, default = match.group(0), match.group(1), match.group(2)
        if text == "$$":
            return "$"
        if name is None:
            problems.append(
                "malformed ${...} reference; write ${NAME} or ${NAME:-default}, "
                "or $$ for a literal $"
            )
            return text
        value = env.get(name)
        if default is not None and not value:
            return default
        if value is None:
            problems.append(f"environment variable {name} is not set")
            return text
        return value

    return _REFERENCE.sub(replace, text), problems


def has_literal_password(raw: str) -> bool:
    """Whether a raw (unexpanded) URI or key=value DSN carries a password not from `${VAR}`.

    Checked: the userinfo password of a URI, a `password=` URI query parameter, a `password=`
    DSN keyword, and the default of a `${VAR:-default}` that makes up the whole value.
    """
    whole = _WHOLE_WITH_DEFAULT.match(raw)
    if whole:
        return has_literal_password(whole.group(1))
    if _ENV_ONLY.match(raw):
        return False
    if _URI_SCHEME.match(raw):
        rest = raw.split("://", 1)[1]
        # Up to the last '@': an unencoded '/' or '?' in a password must not hide it.
        userinfo = rest.rpartition("@")[0]
        if ":" in userinfo and not _is_env_or_empty(userinfo.split(":", 1)[1]):
            return True
        query = rest.partition("?")[2].partition("#")[0]
        return any(
            key.strip().lower() == "password" and not _is_env_or_empty(value)
            for key, _, value in (pair.partition("=") for pair in query.split("&"))
        )
    return any(not _is_env_or_empty(m.group(1).strip("'")) for m in _DSN_PASSWORD.finditer(raw))


def _is_env_or_empty(value: str) -> bool:
    return value == "" or _ENV_ONLY.match(value) is not None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of keeping the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                key_node, yaml.ScalarNode
            ):
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = exc.problem or exc.context or "unreadable YAML"
        if exc.problem and exc.context and exc.context_mark and exc.context_mark is not mark:
            # The context ("while parsing a flow sequence") often points at the real mistake.
            what += f" ({exc.context} started at line {exc.context_mark.line + 1})"
        return f"{where}YAML syntax error: {what}"
    return f"YAML syntax error: {exc}"


_YAML_KINDS: tuple[tuple[type | None, str], ...] = (
    (None, "nothing (null)"),
    (bool, "true/false"),  # before int: bool is an int subclass
    (int, "a number"),
    (float, "a number"),
    (str, "text"),
    (list, "a list"),
    (dict, "a mapping"),
)


def _kind_of(value: Any) -> str:
    for kind, word in _YAML_KINDS:
        if (value is None) if kind is None else isinstance(value, kind):
            return word
    return type(value).__name__


def _model_at(loc: Loc) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Policy
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        fields = {info.alias or name: info for name, info in model.model_fields.items()}
        info = fields.get(part)
        model = _find_model(info.annotation) if info else None
    return model


def _find_model(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in get_args(tp):
        found = _find_model(arg)
        if found is not None:
            return found
    return None


def _unknown_field(loc: Loc) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return "unknown field"
    known = [info.alias or name for name, info in model.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"unknown field (did you mean {close[0]!r}?)"
    return "unknown field; known fields: " + ", ".join(known)


_PLAIN = {
    "missing": "required field is missing",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "string_too_short": "must not be empty",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "too_short": "must have at least {min_length} item(s)",
    "string_type": "must be text, got {got}",
    "list_type": "must be a list, got {got}",
    "model_type": "must be a mapping (key: value), got {got}",
    "model_attributes_type": "must be a mapping (key: value), got {got}",
    "dict_type": "must be a mapping (key: value), got {got}",
}


def _describe(error: ErrorDetails) -> tuple[Loc, str]:
    """The field location and plain-words problem for one pydantic error."""
    loc: Loc = tuple(error["loc"])
    ctx = error.get("ctx", {})
    if error["type"] in ("value_error", "assertion_error"):
        cause = ctx.get("error")
        if isinstance(cause, SubfieldError):
            return loc + cause.subpath, str(cause)
        return loc, str(cause) if cause is not None else error["msg"]
    return loc, _plain_words(error, loc, ctx)


def _plain_words(error: ErrorDetails, loc: Loc, ctx: dict[str, Any]) -> str:
    kind, given = error["type"], error.get("input")
    if kind in _PLAIN:
        return _PLAIN[kind].format(**ctx, got=_kind_of(given))
    if kind == "extra_forbidden":
        return _unknown_field(loc)
    if kind == "literal_error":
        shown = f" {given!r}" if isinstance(given, str | int) else ""
        return f"must be {ctx['expected']}, got {_kind_of(given)}{shown}"
    if kind == "string_pattern_mismatch":
        rule = NAME_RULE if ctx.get("pattern") == NAME_PATTERN else f"match {ctx.get('pattern')}"
        return f"must be {rule}"
    return error["msg"]


class _FileCheck:
    """Problems found in one file, each tagged with its field location."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.problems: list[str] = []
        self.flagged: set[Loc] = set()

    def add(self, loc: Loc, problem: str) -> None:
        where = format_loc(loc)
        line = f"{self.label}: {where}: {problem}" if where else f"{self.label}: {problem}"
        if line not in self.problems:
            self.problems.append(line)

    def flag(self, loc: Loc, problem: str) -> None:
        """Record a problem and hide validation errors at or below `loc` (they would repeat it)."""
        self.flagged.add(loc)
        self.add(loc, problem)

    def hidden(self, loc: Loc) -> bool:
        return any(loc[: len(f)] == f for f in self.flagged)


def _expand_tree(data: Any, env: Mapping[str, str], loc: Loc, check: _FileCheck) -> Any:
    if isinstance(data, str):
        expanded, problems = _expand(data, env)
        for problem in problems:
            check.flag(loc, problem)
        return expanded
    if isinstance(data, dict):
        return {k: _expand_tree(v, env, (*loc, str(k)), check) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand_tree(v, env, (*loc, i), check) for i, v in enumerate(data)]
    return data


def _check_passwords(data: dict[str, Any], check: _FileCheck) -> None:
    name = data.get("name")
    prefix = name.upper().replace("-", "_") + "_" if isinstance(name, str) and name else ""
    source = data.get("source")
    if isinstance(source, dict):
        uri = source.get("uri")
        if isinstance(uri, str) and has_literal_password(uri):
            check.flag(
                ("source", "uri"),
                "literal password in source.uri; put the URI in an environment variable: "
                f"uri: ${{{prefix}DB_URI}}",
            )
    destinations = data.get("destinations")
    for index, dest in enumerate(destinations if isinstance(destinations, list) else []):
        endpoint = dest.get("endpoint_url") if isinstance(dest, dict) else None
        if isinstance(endpoint, str) and has_literal_password(endpoint):
            where = f"destinations[{index}].endpoint_url"
            check.flag(
                ("destinations", index, "endpoint_url"),
                f"literal password in {where}; put the URL in an environment variable: "
                f"endpoint_url: ${{{prefix}S3_ENDPOINT_URL}}",
            )


def _check_file(path: Path, env: Mapping[str, str]) -> tuple[Policy | None, list[str]]:
    check = _FileCheck(str(path))
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as exc:
        check.add((), f"cannot read the file: {exc.strerror or exc}")
        return None, check.problems
    except UnicodeDecodeError as exc:
        check.add((), f"not UTF-8 text (byte {exc.start})")
        return None, check.problems
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        check.add((), _yaml_problem(exc))
        return None, check.problems
    if not isinstance(data, dict):
        got = "empty" if data is None else f"{_kind_of(data)}, not a mapping"
        check.add((), f"the file is {got}; a policy is a mapping (version: 1, name: ..., ...)")
        return None, check.problems

    _check_passwords(data, check)
    expanded = _expand_tree(data, env, (), check)
    context = {"source_file": path, "source_sha256": hashlib.sha256(raw).hexdigest()}
    try:
        policy = Policy.model_validate(expanded, context=context)
    except ValidationError as exc:
        for error in exc.errors():
            loc, problem = _describe(error)
            if not check.hidden(loc):
                check.add(loc, problem)
        return None, check.problems
    return (None if check.problems else policy), check.problems


def load_policy(path: Path, env: Mapping[str, str]) -> Policy:
    """The policy in `path`, with `${VAR}` references taken from `env`.

    Raises InvalidPolicies listing every problem in the file (unreadable file, YAML syntax with
    its line, literal password, unset variable, unknown or invalid field).
    """
    policy, problems = _check_file(path, env)
    if policy is None:
        raise InvalidPolicies(problems)
    return policy


def load_policies(directory: Path, env: Mapping[str, str]) -> list[Policy]:
    """Every policy in `directory` (*.yaml and *.yml, not hidden, not recursive), by file name.

    Raises InvalidPolicies, once, listing every problem in every file, plus policy names used by
    more than one file; also when `directory` is missing, not a directory or has no policy files.
    """
    if not directory.is_dir():
        what = "does not exist" if not directory.exists() else "is not a directory"
        raise InvalidPolicies(
            [f"{directory}: policy directory {what}"],
            hint="point --policies or DRBOT_POLICIES at the directory holding policy files",
        )
    files = sorted(
        p
        for p in directory.iterdir()
        if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and not p.is_dir()
    )
    if not files:
        raise InvalidPolicies(
            [f"{directory}: no policy files (*.yaml or *.yml) in this directory"],
            hint="policies/README.md in drbot's source shows how to write one",
        )
    problems: list[str] = []
    policies: list[Policy] = []
    owners: dict[str, Path] = {}
    for path in files:
        policy, found = _check_file(path, env)
        problems.extend(found)
        if policy is None:
            continue
        if policy.name in owners:
            first = owners[policy.name]
            problems.append(f"{path}: name: policy name {policy.name!r} is already used by {first}")
            continue
        owners[policy.name] = path
        policies.append(policy)
    if problems:
        raise InvalidPolicies(problems)
    log.debug("policy.loaded", directory=str(directory), policies=[p.name for p in policies])
    return policies


def policy_text_sha256(path: Path) -> str:
    """SHA-256 (hex) of the bytes of the policy file at `path`; PolicyInvalid if unreadable."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise PolicyInvalid(f"{path}: cannot read the file: {exc.strerror or exc}") from None
