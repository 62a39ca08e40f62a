"""Synthetic billing-worklist data for benchmarks and browser tests: ``seed(store_or_url, n_open, now=...)``.

Rows are spread over the open queues, practitioners, organizations, payers and deadlines (a sixth of the due rows
overdue), with a few done and reviewed rows besides, and determination + feedback rows so the analytics have data.
Synthetic identifiers only (``Patient/syn-…``); bulk inserts, so 10,000 rows take well under a second or two.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta
from typing import Any

from cds_service.audit.findings import timely_filing_deadline
from cds_service.store import FeedbackStore, card_criteria, determination_table, feedback_table, worklist_items_table
from cds_service.worklist import model
from cds_service.worklist.store import db_time

PRACTITIONERS = tuple(f"Practitioner/syn-pr-{i}" for i in range(1, 13))
ORGANIZATIONS = tuple(f"Organization/syn-org-{i}" for i in range(1, 5))
PAYERS = ("medicare", "medicare-advantage", "medicaid", "commercial")
CRITERIA = ("established-patient", "patient-submitted-media", "follow-up-within-24-business-hours",
            "no-related-service-prior-7-days", "not-already-billed")
STATUS_OF_QUEUE = {model.DUE: "pending", model.TO_CHARGE: "billable", model.AT_RISK: "not-billable",
                   model.REVIEW: "needs-review", model.DONE: "not-billable"}
REASON_CODES = ("not-billed-patient-declined", "documented-elsewhere", "clinical-judgement")


def seed(store_or_url: FeedbackStore | str, n_open: int, *, now: datetime, seed: int = 0) -> None:
    """Write ``n_open`` open worklist rows (plus ``n_open // 10`` done and ``n_open // 20`` reviewed ones) and
    a determination row for each of the first ``n_open`` rows (one card each, as an EHR showed them) with feedback
    for about half of them, all dated up to a year before ``now``. Deterministic for a given ``seed``; item ids
    are distinct per seed (seed twice with different seeds to add rows)."""
    store = FeedbackStore(store_or_url) if isinstance(store_or_url, str) else store_or_url
    store.create_schema()
    dialect = store.engine.dialect.name
    rng = random.Random(seed)
    items: list[dict[str, Any]] = []
    total = n_open + n_open // 10 + n_open // 20
    for i in range(total):
        if i < n_open:
            queue, reviewed = model.QUEUES[i % len(model.QUEUES)], False
        elif i < n_open + n_open // 10:
            queue, reviewed = model.DONE, False
        else:
            queue, reviewed = model.QUEUES[i % len(model.QUEUES)], True
        received = now - timedelta(days=rng.uniform(0, 360) if queue != model.DUE else rng.uniform(0, 4))
        deadline = received + timedelta(hours=rng.choice((24, 48, 72)))
        code = rng.choice(("G2250", "G2010"))
        amount = {"G2250": 12.34, "G2010": 11.56}[code] if queue in (model.TO_CHARGE, model.AT_RISK) else None
        criteria = [{"id": c, "status": "met", "detail": f"{c} ok", "evidence": []} for c in CRITERIA]
        if queue in (model.AT_RISK, model.DONE):
            criteria[rng.randrange(len(criteria))]["status"] = "not-met"
        elif queue == model.REVIEW:
            criteria[3]["status"] = "unknown"
        elif queue == model.DUE:
            criteria[2]["status"] = "pending"
        evaluated = received + timedelta(minutes=5)
        filing = timely_filing_deadline(received.date())
        items.append({
            "item_id": f"{seed:04x}{i:012x}", "queue": queue, "source": model.SOURCE_HOOK if i % 3 else
            model.SOURCE_AUDIT, "evaluated_at": db_time(evaluated, dialect), "status": STATUS_OF_QUEUE[queue],
            "code": code, "modifiers": rng.choice(("GP", "GO", None)), "patient_ref": f"Patient/syn-{seed}-{i}",
            "encounter_ref": f"Encounter/syn-{seed}-{i}", "practitioner_ref": rng.choice(PRACTITIONERS),
            "organization_ref": rng.choice(ORGANIZATIONS), "payer_profile": rng.choice(PAYERS),
            "received_at": db_time(received, dialect), "deadline_at": db_time(deadline, dialect),
            "follow_up_at": None, "charges": json.dumps([f"ChargeItem/syn-{seed}-{i}"] if queue == model.AT_RISK
                                                          else []),
            "billed_code": code if queue == model.AT_RISK else None,
            "audit_class": None, "reason": f"synthetic {model.QUEUE_LABELS[queue].lower()} row",
            "question": "Was the visit in the prior 7 days for another problem?" if queue == model.REVIEW else None,
            "estimated_amount": amount, "timely_filing_deadline": filing, "criteria": json.dumps(criteria),
            "card_summary": f"Synthetic card {i}", "card_detail": f"**Synthetic** detail {i}",
            "card_indicator": "info" if queue in (model.DUE, model.TO_CHARGE) else "warning",
            "extra": json.dumps({"synthetic": True}), "reviewed": reviewed,
            "review_reason": REASON_CODES[0] if reviewed else None,
            "assignee": rng.choice((None, None, "coder-a", "coder-b")), "updated_at": db_time(evaluated, dialect),
        })
    determinations: list[dict[str, Any]] = []
    feedback: list[dict[str, Any]] = []
    for i, item in enumerate(items[:n_open]):
        recorded = now - timedelta(days=rng.uniform(0, 360))
        uuid = f"syn-card-{seed}-{i}"
        determinations.append({
            "row_key": f"syn-{seed}-{i}.0", "recorded_at": db_time(recorded, dialect), "service_id": "synthetic",
            "hook_instance": f"syn-{seed}-{i}", "card_uuid": uuid, "status": item["status"], "code": item["code"],
            "modifiers": item["modifiers"], "patient_ref": item["patient_ref"], "encounter_ref": item["encounter_ref"],
            "practitioner_ref": item["practitioner_ref"], "criteria": item["criteria"],
            "card_summary": item["card_summary"], "card_indicator": item["card_indicator"],
            "card_criteria": ",".join(card_criteria(item["status"], (
                (c["id"], c["status"]) for c in json.loads(item["criteria"])))),
        })
        if i % 2 == 0:
            overridden = rng.random() < 0.4
            code = rng.choice(REASON_CODES) if overridden else None
            feedback.append({
                "fingerprint": f"syn-{seed}-{i}", "service_id": "synthetic", "card_uuid": uuid,
                "outcome": "overridden" if overridden else "accepted", "override_code": code,
                "override_system": "https://g2250-cds.example/override-reasons" if overridden else None,
                "override_display": code.replace("-", " ") if code else None,
                "outcome_timestamp": (recorded + timedelta(minutes=1)).isoformat(),
                "received_at": db_time(recorded + timedelta(minutes=1), dialect),
            })
    with store.engine.begin() as conn:
        for start in range(0, len(items), 2000):
            conn.execute(worklist_items_table.insert(), items[start:start + 2000])
        if determinations:
            conn.execute(determination_table.insert(), determinations)
        if feedback:
            conn.execute(feedback_table.insert(), feedback)
    if isinstance(store_or_url, str):
        store.dispose()
