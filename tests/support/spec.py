"""Facts of the spec the tests check the code against, written out from billing-rules.md (never taken from the
code under test, so a wrong list in the code cannot make its own tests pass)."""

# billing-rules.md §3, in table order.
SPEC_CRITERION_IDS = (
    "established-patient",
    "patient-submitted-media",
    "practitioner-interpretation",
    "follow-up-within-24-business-hours",
    "no-related-service-prior-7-days",
    "no-resulting-service",
    "consent-documented",
    "billing-practitioner-eligible",
    "payer-covers-code",
    "not-already-billed",
)
