"""The evidence of a real period, read as an auditor would: a backup, a failed backup, a passing
and a failing drill; the controls follow the events, and the HTML report opens in headless
Chromium with no errors, no request beyond itself, and the charts and tables in view."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import Env

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = pytest.mark.e2e

PERIOD = ("--since", "2000-01-01", "--until", "2100-01-01")


def _set_check(e2e: Env, sql: str) -> None:
    path = Path(e2e.env["DRBOT_POLICIES"]) / "shop.yaml"
    text = path.read_text().split("drill:\n")[0]
    path.write_text(text + f"drill:\n  checks:\n    - name: orders\n      sql: {sql}\n")


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def test_export_of_drills_and_failures_reads_right_in_a_browser(
    e2e: Env, docker_image: str, browser: Browser
) -> None:
    _set_check(e2e, "SELECT count(*) = 5000 FROM orders")
    backup = e2e.run("backup", "--policy", "shop", "--json")
    assert backup.returncode == 0, backup.stderr
    backup_id = json.loads(backup.stdout)["id"]
    failed = e2e.run(
        "backup", "--policy", "shop", SHOP_DB_URI="postgresql://postgres@127.0.0.1:1/x"
    )
    assert failed.returncode == 14, failed.stderr
    passing = e2e.run("drill", "--policy", "shop", "--json", timeout=300)
    assert passing.returncode == 0, passing.stderr
    _set_check(e2e, "SELECT count(*) = 0 FROM orders")
    failing = e2e.run("drill", "--policy", "shop", "--json", timeout=300)
    assert failing.returncode == 20, failing.stderr

    out = e2e.tmp / "evidence.json"
    res = e2e.run("audit", "export", *PERIOD, "--out", str(out))
    assert res.returncode == 0, res.stderr
    shop = json.loads(out.read_text())["policies"]["shop"]
    assert [d["passed"] for d in shop["drills"]] == [True, False]
    assert [d["backup_id"] for d in shop["drills"]] == [backup_id, backup_id]
    assert [d["destination"] for d in shop["drills"]] == ["primary", "replica"]
    failed_checks = [c["name"] for c in shop["drills"][1]["checks"] if not c["passed"]]
    assert failed_checks == ["orders"]
    assert all(d["targets"] == {"rto_s": 1800.0, "rpo_s": 300.0} for d in shop["drills"])
    assert [f["action"] for f in shop["failures"]] == ["backup.failed", "drill.failed"]
    status = {name: c["status"] for name, c in shop["controls"].items()}
    assert status["restore_tested"] == "met"  # the passing drill, within the 30m RTO
    assert status["encryption_in_force"] == "met"
    assert status["copies_in_two_regions"] == "met"
    assert status["immutability"] == "not met"  # no object lock on these buckets
    assert e2e.run("audit", "verify", "--trail", str(out)).returncode == 0

    report = e2e.tmp / "evidence.html"
    res = e2e.run("audit", "export", *PERIOD, "--format", "html", "--out", str(report))
    assert res.returncode == 0, res.stderr

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda r: requests.append(r.url))
    try:
        page.goto(report.as_uri(), wait_until="load")
        shot = page.screenshot(full_page=True, path=str(e2e.tmp / "evidence.png"))

        assert errors == []
        assert requests == [report.as_uri()], "the report must need nothing but itself"
        assert page.title() == "drbot evidence"
        for label in (
            "timeline",
            "restore times against the RTO",
            "drill RTO against the target",
            "drill RPO against the target",
        ):
            chart = page.locator(f'svg[aria-label="{label}"]')
            assert chart.count() == 1, label
            box = chart.bounding_box()
            assert box is not None and box["width"] >= 600 and box["height"] > 40, label
        # One bar per drill on each drill chart, each with its own target tick.
        rto_chart = page.locator('svg[aria-label="drill RTO against the target"]')
        assert rto_chart.locator("rect").count() == 2
        assert rto_chart.locator("line").count() == 2
        # A failure on the timeline is red, a backup green.
        fills = page.locator('svg[aria-label="timeline"] circle').evaluate_all(
            "cs => cs.map(c => c.getAttribute('fill'))"
        )
        assert sorted(fills) == ["#0a7d32", "#b3261e", "#b3261e"]
        controls = page.locator("table").first.inner_text()
        assert "restore tested\tmet" in controls and "immutability\tnot met" in controls
        drills = page.locator("table", has_text="restore point").inner_text()
        assert "passed" in drills and "failed: orders" in drills
        failures = page.locator("table", has_text="backup.failed").inner_text()
        assert "cannot connect to PostgreSQL" in failures
        assert "check(s) failed: orders" in failures
        width, height = _png_size(shot)
        assert width == 1280 and height > 900, "the whole report, taller than one screen"
    finally:
        page.close()
