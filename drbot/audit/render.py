"""Evidence documents as CSV (one row per event) and as one self-contained HTML report."""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from drbot.audit.event import AuditEvent


def to_csv(events: Sequence[AuditEvent]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        ["seq", "time", "policy", "action", "outcome", "actor", "subject", "details", "hash"]
    )
    for e in events:
        writer.writerow(
            [
                e.seq,
                e.time,
                e.policy or "",
                e.action,
                e.outcome,
                e.actor,
                json.dumps(e.subject, sort_keys=True, ensure_ascii=False),
                json.dumps(e.details, sort_keys=True, ensure_ascii=False),
                e.hash,
            ]
        )
    return out.getvalue()


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:70rem;color:#1d2330}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ccd}
table{border-collapse:collapse;width:100%;margin:.5rem 0}
td,th{border-bottom:1px solid #e3e5ea;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f5f8}.met{color:#0a7d32;font-weight:600}.not{color:#b3261e;font-weight:600}
.na{color:#777}.mono{font-family:ui-monospace,monospace;font-size:12px}
svg{background:#fafbfc;border:1px solid #e3e5ea}
"""

_GREEN = "#0a7d32"
_RED = "#b3261e"


def _cell(value: object) -> str:
    """A table cell's text: escaped, with a dash for what the events did not record."""
    return "\u2014" if value is None else html.escape(str(value))


def _seconds(value: object) -> str:
    return "\u2014" if not isinstance(value, int | float) else f"{value:.1f}"


def _failure_reason(details: dict[str, Any]) -> str | None:
    """What went wrong: the error, or for a drill that ran, the checks that failed."""
    if details.get("error"):
        return str(details["error"])
    failed = _failed_checks(details.get("checks") or [])
    return f"check(s) failed: {', '.join(failed)}" if failed else None


def _failed_checks(checks: Sequence[dict[str, Any]]) -> list[str]:
    return [str(c.get("name")) for c in checks if not c.get("passed")]


def _status(status: str) -> str:
    cls = {"met": "met", "not met": "not"}.get(status, "na")
    return f'<span class="{cls}">{html.escape(status)}</span>'


def _timeline(backups: Sequence[dict[str, Any]], failures: Sequence[dict[str, Any]]) -> str:
    """One mark per backup (green) and per failure (red) along the period."""
    points = [(b.get("completed_at") or "", _GREEN, f"backup {b.get('id')}") for b in backups]
    points += [(f.get("time") or "", _RED, str(f.get("action"))) for f in failures]
    times = []
    for text, color, what in points:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            continue
        times.append((when if when.tzinfo else when.replace(tzinfo=UTC), color, what))
    if not times:
        return "<p>No backups or failures in the period.</p>"
    lo = min(t for t, _, _ in times)
    hi = max(t for t, _, _ in times)
    span = max((hi - lo).total_seconds(), 1.0)
    marks = "".join(
        f'<circle cx="{20 + 660 * (t - lo).total_seconds() / span:.1f}" cy="30" r="6" '
        f'fill="{color}" fill-opacity="0.8"><title>{html.escape(t.isoformat())} '
        f"{html.escape(what)}</title></circle>"
        for t, color, what in times
    )
    return (
        f'<svg width="700" height="74" role="img" aria-label="timeline">'
        f'<line x1="20" y1="30" x2="680" y2="30" stroke="#99a"/>{marks}'
        f'<text x="20" y="55" font-size="11">{html.escape(lo.isoformat()[:16])}</text>'
        f'<text x="680" y="55" font-size="11" text-anchor="end">'
        f"{html.escape(hi.isoformat()[:16])}</text>"
        f'<text x="350" y="70" font-size="10" fill="#555" text-anchor="middle">'
        "green: backup completed · red: failure</text></svg>"
    )


def _bar_chart(
    rows: Sequence[tuple[str, float | None, float | None, bool]], *, label: str, unit: str = "s"
) -> str:
    """Horizontal bars: (row label, value, target, passed). A row's target is a dashed tick
    across its bar, so drills judged by different targets (a policy changed) still read right;
    a missing value is drawn as an empty row marked "not measured"."""
    top = max([v or 0.0 for _, v, _, _ in rows] + [t or 0.0 for _, _, t, _ in rows] + [1.0])
    x0, scale = 150, 480
    parts = []
    labelled: set[float] = set()
    for i, (name, value, target, passed) in enumerate(rows):
        y = 10 + 26 * i
        parts.append(f'<text x="5" y="{y + 13}" font-size="11">{html.escape(name)}</text>')
        if value is None:
            parts.append(f'<text x="{x0}" y="{y + 13}" font-size="11">not measured</text>')
        else:
            width = scale * value / top
            color = _GREEN if passed else _RED
            parts.append(
                f'<rect x="{x0}" y="{y}" width="{width:.1f}" height="18" fill="{color}">'
                f"<title>{html.escape(name)}: {value:.1f}{unit}</title></rect>"
                f'<text x="{x0 + 6 + width:.1f}" y="{y + 13}" font-size="11">'
                f"{value:.1f}{unit}</text>"
            )
        if target is not None:
            x = x0 + scale * target / top
            parts.append(
                f'<line x1="{x:.1f}" y1="{y - 3}" x2="{x:.1f}" y2="{y + 21}" stroke="#333" '
                f'stroke-dasharray="3"><title>target {target:g}{unit}</title></line>'
            )
            if target not in labelled:
                labelled.add(target)
                parts.append(
                    f'<text x="{x + 4:.1f}" y="{y + 13}" font-size="10" fill="#333">'
                    f"target {target:g}{unit}</text>"
                )
    height = 20 + 26 * len(rows)
    legend = (
        f'<text x="{x0}" y="{height - 2}" font-size="10" fill="#555">'
        "dashed: target · green: met · red: missed or failed</text>"
    )
    return (
        f'<svg width="700" height="{height + 8}" role="img" aria-label="{html.escape(label)}">'
        f"{''.join(parts)}{legend}</svg>"
    )


def _restore_chart(restores: Sequence[dict[str, Any]], rto_s: float | None) -> str:
    if not restores:
        return "<p>No restores in the period.</p>"
    rows = []
    for r in restores:
        seconds = r["details"].get("duration_s", r["details"].get("rto_s"))
        value = None if seconds is None else float(seconds)
        ok = r["outcome"] == "ok" and (rto_s is None or (value is not None and value <= rto_s))
        rows.append((f"#{r['seq']} {r['action'].split('.')[0]}", value, rto_s, ok))
    return _bar_chart(rows, label="restore times against the RTO")


def _drill_charts(drills: Sequence[dict[str, Any]]) -> str:
    """RTO and RPO of each drill against the targets it was judged by."""
    if not drills:
        return "<p>No drills in the period.</p>"
    charts = []
    for metric in ("rto", "rpo"):
        rows = []
        for d in drills:
            value = d.get(f"{metric}_s")
            target = (d.get("targets") or {}).get(f"{metric}_s")
            checks = {c["name"]: c.get("passed") for c in d.get("checks", [])}
            ok = bool(checks.get(metric, d["passed"])) if value is not None else False
            rows.append(
                (
                    f"{str(d['time'])[5:16].replace('T', ' ')} {'pass' if d['passed'] else 'FAIL'}",
                    None if value is None else float(value),
                    None if target is None else float(target),
                    ok,
                )
            )
        charts.append(f"<h4>{metric.upper()} of each drill</h4>")
        charts.append(_bar_chart(rows, label=f"drill {metric.upper()} against the target"))
    return "".join(charts)


def to_html(doc: dict[str, Any], rto_by_policy: dict[str, float | None]) -> str:
    period = doc["period"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<title>drbot evidence</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Backup and recovery evidence</h1>",
        f"<p>Period {html.escape(period['since'])} to {html.escape(period['until'])}. "
        f"Cut from audit event {doc['chain']['head']['seq']} "
        f'<span class="mono">{html.escape(doc["chain"]["head"]["hash"])}</span>; '
        "verify with <code>drbot audit verify --trail THIS.json</code> on the JSON export.</p>",
    ]
    for name, pol in doc["policies"].items():
        parts.append(f"<h2>Policy {html.escape(name)}</h2>")
        parts.append("<h3>Controls</h3><table><tr><th>control</th><th>status</th>")
        parts.append("<th>why</th><th>events</th></tr>")
        for control, verdict in pol["controls"].items():
            parts.append(
                f"<tr><td>{html.escape(control.replace('_', ' '))}</td>"
                f"<td>{_status(verdict['status'])}</td><td>{html.escape(verdict['reason'])}</td>"
                f"<td class=mono>{html.escape(', '.join(map(str, verdict['events'][:20])))}</td>"
                "</tr>"
            )
        parts.append("</table><h3>Timeline</h3>")
        parts.append(_timeline(pol["backups"], pol["failures"]))
        parts.append("<h3>Restores against the RTO</h3>")
        parts.append(_restore_chart(pol["restores"], rto_by_policy.get(name)))
        parts.append("<h3>Backups</h3><table><tr><th>id</th><th>completed</th><th>bytes</th>")
        parts.append("<th>copies (region, lock)</th><th>outcome</th></tr>")
        for b in pol["backups"]:
            copies = "; ".join(
                f"{d} ({v.get('region') or 'local'}, "
                f"{(v.get('object_lock') or {}).get('mode', 'no lock')})"
                for d, v in b["destinations"].items()
            )
            parts.append(
                f"<tr><td class=mono>{_cell(b['id'])}</td>"
                f"<td>{_cell(b['completed_at'])}</td>"
                f"<td>{_cell(b['plaintext_bytes'])}</td>"
                f"<td>{html.escape(copies)}</td><td>{html.escape(b['outcome'])}</td></tr>"
            )
        parts.append("</table><h3>Drills: RTO and RPO against the targets</h3>")
        parts.append(_drill_charts(pol.get("drills", [])))
        parts.append("<table><tr><th>drill</th><th>from</th>")
        parts.append("<th>restore point</th><th>RTO / RPO (s)</th><th>checks</th><th>result</th>")
        parts.append("</tr>")
        for d in pol.get("drills", []):
            failed = _failed_checks(d["checks"])
            checks = f"{len(d['checks'])} run" + (
                f", failed: {', '.join(failed)}" if failed else ""
            )
            if d.get("error") and not failed:
                checks += f"; {d['error']}"
            parts.append(
                f"<tr><td class=mono>{_cell(d['drill_id'])}</td>"
                f"<td>{_cell(d['destination'])}</td>"
                f"<td>{_cell(d['restore_point'])}</td>"
                f"<td>{_seconds(d['rto_s'])} / {_seconds(d['rpo_s'])}</td>"
                f"<td>{html.escape(checks)}</td>"
                + (
                    '<td><span class="met">passed</span></td>'
                    if d["passed"]
                    else '<td><span class="not">failed</span></td>'
                )
                + "</tr>"
            )
        parts.append("</table><h3>Failures</h3><table><tr><th>event</th><th>time</th>")
        parts.append("<th>action</th><th>error</th></tr>")
        for f in pol["failures"]:
            parts.append(
                f"<tr><td>{f['seq']}</td><td>{html.escape(f['time'])}</td>"
                f"<td>{html.escape(f['action'])}</td>"
                f"<td>{_cell(_failure_reason(f['details']))}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)
