"""billing-practitioner-eligible — billing-rules.md §1, §3, §4 (taxonomy map kept as data) and §7.

G2250 is for practitioners who cannot report E/M (PT +GP, OT +GO, SLP +GN, clinical psychologists, clinical social
workers); G2010 for those who can (physicians, NPs, PAs, CNSs, CNMs, podiatrists, optometrists). Audiologists are
excluded (not billable); therapy assistants cannot bill in their own name (review); anything else: verify.

§7 additions:
- "Therapy assistants": a therapist billing a review a PTA/OTA took part in adds CQ/CO (``determine()``) and the
  criterion is unknown — paid at 85 % with the modifier, which may be dropped only when the assistant's part was
  10 % or less (de minimis), which the record cannot show.
- "RHC/FQHC": a billing organization typed as a rural health clinic / federally qualified health center (or listed
  in the settings) bills under its own rules (historically G0071): unknown, never billable.

Cases (``facts["case"]``): not-met ``not-eligible``; unknown ``verify``, ``assistant-own-name``,
``assistant-participation``, ``rhc-fqhc``, ``no-practitioner``.
"""

from __future__ import annotations

from ..context import AssessmentContext
from ..facts import key_of
from ..model import CriterionResult

ID = "billing-practitioner-eligible"


def _kind(label: str) -> str:
    return label.split(" (")[0].lower()


def _assistant_detail(ctx: AssessmentContext) -> str:
    names = ", ".join(f"{who} ({_kind(match.rule.label)})" for who, match in sorted(ctx.assistants.items()))
    modifiers = ", ".join(ctx.assistant_modifiers)
    return (f"A therapy assistant took part in this review: {names}. The claim carries {modifiers}, and the service "
            f"is paid at 85 % with that modifier; {modifiers} may be dropped only when the assistant's part was 10 % "
            "or less of the service (de minimis), which the record cannot show. Confirm.")


def evaluate(ctx: AssessmentContext) -> CriterionResult:
    if ctx.practitioner is None:
        return CriterionResult(ID, "unknown", "The billing practitioner is not identified; verify who reviewed.",
                               facts={"case": "no-practitioner"})
    match = ctx.taxonomy
    rule = match.rule
    evidence = (ctx.practitioner, *(key_of(r) for r in ctx.practitioner_roles))
    if match.code is None:
        return CriterionResult(ID, "unknown", "The practitioner's provider type (NUCC taxonomy) is not recorded; "
                               "verify eligibility.", evidence, {"case": "verify"})
    if rule.outcome == "not-billable":
        return CriterionResult(ID, "not-met", f"{rule.label} ({match.code}): {rule.note}", evidence,
                               {"case": "not-eligible"})
    rhc = ctx.rhc_fqhc
    if rhc is not None:
        organization, why = rhc
        detail = (f"The billing organization {organization} is {why}. Rural health clinics and federally qualified "
                  "health centers bill under their own payment rules (historically G0071 instead of G2250/G2010); "
                  "this service has no verified rule for them, so it cannot say this review is billable.")
        if rule.outcome in ("G2250", "G2010"):
            detail += f" Outside an RHC/FQHC this {_kind(rule.label)} would bill {rule.outcome}."
        return CriterionResult(ID, "unknown", detail, (*evidence, organization), {"case": "rhc-fqhc"})
    if rule.is_assistant:
        return CriterionResult(ID, "unknown", f"{rule.label} ({match.code}): {rule.note}", evidence,
                               {"case": "assistant-own-name"})
    modifiers = f" with {', '.join(rule.modifiers)}" if rule.modifiers else ""
    if rule.outcome in ("G2250", "G2010"):
        other = "G2010" if rule.outcome == "G2250" else "G2250"
        detail = f"{rule.label} bills {rule.outcome}{modifiers}, not {other}."
        if ctx.supervises_assistant:
            assistants = tuple(k for who in sorted(ctx.assistants) for k in (who, *ctx.review_people[who]))
            return CriterionResult(ID, "unknown", f"{detail} {_assistant_detail(ctx)}", (*evidence, *assistants),
                                   {"case": "assistant-participation"})
        return CriterionResult(ID, "met", detail, evidence)
    if rule.outcome == "review":
        return CriterionResult(ID, "unknown", f"{rule.label} ({match.code}): {rule.note}", evidence,
                               {"case": "verify"})
    return CriterionResult(ID, "unknown", f"{rule.label} ({match.code}): eligibility is unsettled; verify with "
                           "the payer before billing.", evidence, {"case": "verify"})
