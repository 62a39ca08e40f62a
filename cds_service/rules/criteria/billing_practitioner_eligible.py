"""billing-practitioner-eligible — billing-rules.md §1, §3 and §4 (taxonomy map kept as data).

G2250 is for practitioners who cannot report E/M (PT +GP, OT +GO, SLP +GN, clinical psychologists, clinical social
workers); G2010 for those who can (physicians, NPs, PAs, CNSs, CNMs, podiatrists, optometrists). Audiologists are
excluded (not billable); therapy assistants cannot bill in their own name (review); anything else: verify.
"""

from __future__ import annotations

from ..context import AssessmentContext
from ..facts import key_of
from ..model import CriterionResult

ID = "billing-practitioner-eligible"


def evaluate(ctx: AssessmentContext) -> CriterionResult:
    if ctx.practitioner is None:
        return CriterionResult(ID, "unknown", "The billing practitioner is not identified; verify who reviewed.")
    match = ctx.taxonomy
    rule = match.rule
    evidence = (ctx.practitioner, *(key_of(r) for r in ctx.practitioner_roles))
    if match.code is None:
        return CriterionResult(ID, "unknown", "The practitioner's provider type (NUCC taxonomy) is not recorded; "
                               "verify eligibility.", evidence)
    modifiers = f" with {', '.join(rule.modifiers)}" if rule.modifiers else ""
    if rule.outcome in ("G2250", "G2010"):
        other = "G2010" if rule.outcome == "G2250" else "G2250"
        detail = f"{rule.label} bills {rule.outcome}{modifiers}, not {other}."
        return CriterionResult(ID, "met", detail, evidence)
    if rule.outcome == "not-billable":
        return CriterionResult(ID, "not-met", f"{rule.label} ({match.code}): {rule.note}", evidence)
    if rule.outcome == "review":
        return CriterionResult(ID, "unknown", f"{rule.label} ({match.code}): {rule.note}", evidence)
    return CriterionResult(ID, "unknown", f"{rule.label} ({match.code}): eligibility is unsettled; verify with "
                           "the payer before billing.", evidence)
