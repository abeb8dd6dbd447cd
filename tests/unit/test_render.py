"""The HTML evidence report is well-formed, self-contained and escapes what it shows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

import pytest

from drbot.audit.event import AuditEvent
from drbot.audit.evidence import PolicyFacts, build_evidence
from drbot.audit.render import to_csv, to_html

pytestmark = pytest.mark.unit

_VOID = {"meta", "br", "img", "link", "input", "hr"}
_SVG_LEAVES = {"circle", "line", "rect"}


class _Checker(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.external.append(value)
        if tag == "script":
            self.problems.append("script")
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        pass  # <rect .../> is complete

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"unexpected </{tag}> (open: {self.stack[-3:]})")
            return
        self.stack.pop()


def _events() -> list[AuditEvent]:
    start = datetime(2026, 11, 2, 2, tzinfo=UTC)

    def event(seq: int, action: str, outcome: str = "ok", **details: object) -> AuditEvent:
        return AuditEvent(
            seq=seq,
            time=(start + timedelta(hours=seq)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            actor="<b>mallory</b>@host",
            host="h",
            action=action,
            policy="shop",
            subject={"backup_id": "b<1>"},
            outcome=outcome,
            details=dict(details),
        )

    return [
        event(1, "backup.started", destinations={"p": {"region": "us-east-1"}}, key="file:/k"),
        event(2, "backup.completed", destinations_ok=["p"], completed_at=start.isoformat()),
        event(3, "backup.failed", "failed", error="<script>alert(1)</script>", exit_code=14),
        event(4, "restore.completed", duration_s=12.5, fingerprint_checked=True),
        event(
            5,
            "drill.completed",
            rto_s=42.0,
            rpo_s=3.0,
            targets={"rto_s": 60.0, "rpo_s": 300.0},
            checks=[{"name": "rto", "passed": True}, {"name": "rpo", "passed": True}],
        ),
        event(
            6,
            "drill.failed",
            "failed",
            rto_s=None,
            rpo_s=None,
            targets={"rto_s": 60.0, "rpo_s": 300.0},
            checks=[],
            error="image <x> missing",
        ),
    ]


def test_report_is_well_formed_self_contained_and_escaped() -> None:
    facts = PolicyFacts("shop", full_schedule="0 2 * * *", rto=timedelta(minutes=1))
    doc = build_evidence(
        _events(),
        since=datetime(2026, 11, 1, tzinfo=UTC),
        until=datetime(2026, 11, 8, tzinfo=UTC),
        policies=[facts],
    )
    doc["chain"] = {"head": {"seq": 4, "hash": "ab" * 32}}
    page = to_html(doc, {"shop": 60.0})
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert checker.problems == []
    assert checker.stack == []
    assert checker.external == []
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # timeline, restore times, and the drills' RTO and RPO
    assert page.count("<svg") == 4
    # the restore and the passing drill among restores, both drills on the RTO chart
    assert page.count("<title>target 60s</title>") == 4
    assert page.count("not measured") == 2  # the failed drill measured neither
    assert 'aria-label="drill RPO against the target"' in page


def test_csv_has_one_row_per_event_and_a_header() -> None:
    rows = to_csv(_events()).strip().splitlines()
    assert rows[0].startswith("seq,time,policy,action")
    assert len(rows) == 1 + len(_events())
