"""Evidence documents as CSV (one row per event) and as one self-contained HTML report."""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Sequence
from datetime import datetime
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


def _status(status: str) -> str:
    cls = {"met": "met", "not met": "not"}.get(status, "na")
    return f'<span class="{cls}">{html.escape(status)}</span>'


def _timeline(backups: Sequence[dict[str, Any]], failures: Sequence[dict[str, Any]]) -> str:
    """One mark per backup (green) and per failure (red) along the period."""
    points = [(b.get("completed_at") or "", "#0a7d32") for b in backups]
    points += [(f.get("time") or "", "#b3261e") for f in failures]
    times = []
    for text, color in points:
        try:
            times.append((datetime.fromisoformat(text), color))
        except ValueError:
            continue
    if not times:
        return "<p>No backups or failures in the period.</p>"
    lo = min(t for t, _ in times)
    hi = max(t for t, _ in times)
    span = max((hi - lo).total_seconds(), 1.0)
    marks = "".join(
        f'<circle cx="{20 + 660 * (t - lo).total_seconds() / span:.1f}" cy="30" r="6" '
        f'fill="{color}"><title>{html.escape(t.isoformat())}</title></circle>'
        for t, color in times
    )
    return (
        f'<svg width="700" height="60" role="img" aria-label="timeline">'
        f'<line x1="20" y1="30" x2="680" y2="30" stroke="#99a"/>{marks}'
        f'<text x="20" y="55" font-size="11">{html.escape(lo.isoformat()[:16])}</text>'
        f'<text x="680" y="55" font-size="11" text-anchor="end">'
        f"{html.escape(hi.isoformat()[:16])}</text></svg>"
    )


def _rto_chart(restores: Sequence[dict[str, Any]], rto_s: float | None) -> str:
    durations = [
        (
            r["seq"],
            float(r["details"].get("duration_s", r["details"].get("rto_s")) or 0.0),
            r["outcome"],
        )
        for r in restores
    ]
    if not durations:
        return "<p>No restores in the period.</p>"
    top = max([d for _, d, _ in durations] + [rto_s or 0.0, 1.0])
    bars = []
    for i, (seq, seconds, outcome) in enumerate(durations):
        width = 560 * seconds / top
        color = "#0a7d32" if outcome == "ok" and (rto_s is None or seconds <= rto_s) else "#b3261e"
        y = 10 + 24 * i
        bars.append(
            f'<text x="5" y="{y + 13}" font-size="11">#{seq}</text>'
            f'<rect x="60" y="{y}" width="{width:.1f}" height="16" fill="{color}"/>'
            f'<text x="{66 + width:.1f}" y="{y + 13}" font-size="11">{seconds:.1f}s</text>'
        )
    height = 20 + 24 * len(durations)
    target = ""
    if rto_s is not None:
        x = 60 + 560 * rto_s / top
        target = (
            f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height}" stroke="#333" '
            f'stroke-dasharray="4"/><text x="{x + 4:.1f}" y="{height - 4}" font-size="11">'
            f"RTO {rto_s:g}s</text>"
        )
    return (
        f'<svg width="700" height="{height}" role="img" aria-label="restore times">'
        f"{''.join(bars)}{target}</svg>"
    )


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
        parts.append(_rto_chart(pol["restores"], rto_by_policy.get(name)))
        parts.append("<h3>Backups</h3><table><tr><th>id</th><th>completed</th><th>bytes</th>")
        parts.append("<th>copies (region, lock)</th><th>outcome</th></tr>")
        for b in pol["backups"]:
            copies = "; ".join(
                f"{d} ({v.get('region') or 'local'}, "
                f"{(v.get('object_lock') or {}).get('mode', 'no lock')})"
                for d, v in b["destinations"].items()
            )
            parts.append(
                f"<tr><td class=mono>{html.escape(str(b['id']))}</td>"
                f"<td>{html.escape(str(b['completed_at']))}</td>"
                f"<td>{html.escape(str(b['plaintext_bytes']))}</td>"
                f"<td>{html.escape(copies)}</td><td>{html.escape(b['outcome'])}</td></tr>"
            )
        parts.append("</table><h3>Drills</h3><table><tr><th>drill</th><th>from</th>")
        parts.append("<th>restore point</th><th>RTO / RPO (s)</th><th>checks</th><th>result</th>")
        parts.append("</tr>")
        for d in pol.get("drills", []):
            failed = [c["name"] for c in d["checks"] if not c.get("passed")]
            checks = f"{len(d['checks'])} run" + (
                f", failed: {', '.join(failed)}" if failed else ""
            )
            parts.append(
                f"<tr><td class=mono>{html.escape(str(d['drill_id']))}</td>"
                f"<td>{html.escape(str(d['destination']))}</td>"
                f"<td>{html.escape(str(d['restore_point']))}</td>"
                f"<td>{d['rto_s']} / {d['rpo_s']}</td><td>{html.escape(checks)}</td>"
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
                f"<td>{html.escape(str(f['details'].get('error', '')))}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)
