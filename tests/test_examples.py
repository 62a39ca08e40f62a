"""The README's worked examples: `g2250-cds evaluate` on the self-contained requests of fhir_fixtures/requests/.

The requests carry every datum in `prefetch` (written by `python -m tests.support.examples`), so these run
without a FHIR server; the outputs asserted here are the ones the README shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cds_service.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text("utf-8")

EXAMPLES = [
    ("encounter-discharge", "2026-11-18T15:40:00-05:00", "info", "billable",
     "Bill G2250 with GP: this photo/video review meets every condition this service checks"),
    ("encounter-start", "2026-12-09T16:00:00-05:00", "info", "pending",
     "Reply by Thu 10 Dec 10:00 EST — 24 business hours; bills as G2250 with GP"),
    # The same assessment as encounter-discharge above, reached as the CDS Hooks sandbox calls (no encounterId):
    # the same verdict (billing-rules.md §7).
    ("patient-view-no-encounter", "2026-11-18T15:40:00-05:00", "info", "billable",
     "Bill G2250 with GP: this photo/video review meets every condition this service checks"),
    ("patient-view", "2026-12-14T15:10:00-05:00", "warning", "needs-review",
     "Confirm before billing G2250 with GO: was the visit in the prior 7 days for another problem?"),
    ("appointment-book", "2026-12-09T16:00:00-05:00", "warning", "not-billable",
     "This visit would include the photo review of 09 Dec: it cannot be billed separately"),
]


@pytest.mark.parametrize(("name", "now", "indicator", "status", "summary"), EXAMPLES)
def test_worked_example(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, now: str, indicator: str,
                        status: str, summary: str) -> None:
    request = f"fhir_fixtures/requests/{name}.json"
    config = tmp_path / "c.yaml"
    config.write_text(f"database_url: sqlite:///{tmp_path / 'e.db'}\nlogging: {{level: ERROR}}\n", "utf-8")
    assert main(["evaluate", str(ROOT / request), "--now", now, "--config", str(config)]) == 0
    (card,) = json.loads(capsys.readouterr().out)["cards"]
    assert card["indicator"] == indicator
    assert card["summary"] == summary
    assert card["extension"]["g2250-cds.determination"]["status"] == status
    # The README shows this very command and summary.
    assert f"g2250-cds evaluate {request} --now {now}" in README
    assert summary in README
