"""Policies: the YAML files in `policies/` that say what to back up, where, and how often.

`schema` holds the frozen pydantic models, `load` reads files into them with one message per
problem, `durations` reads "1h30m"-style durations.
"""

from __future__ import annotations

from drbot.policy.load import InvalidPolicies, load_policies, load_policy, policy_text_sha256
from drbot.policy.schema import Policy, policy_json_schema

__all__ = [
    "InvalidPolicies",
    "Policy",
    "load_policies",
    "load_policy",
    "policy_json_schema",
    "policy_text_sha256",
]
