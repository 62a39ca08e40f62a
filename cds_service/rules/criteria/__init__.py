"""One module per criterion of billing-rules.md §3, named after its id; each exposes ``ID`` and ``evaluate``."""

from . import (
    billing_practitioner_eligible,
    consent_documented,
    established_patient,
    follow_up_within_24_business_hours,
    no_related_service_prior_7_days,
    no_resulting_service,
    not_already_billed,
    patient_submitted_media,
    payer_covers_code,
    practitioner_interpretation,
)

# In the order of billing-rules.md §3.
ALL = (
    established_patient,
    patient_submitted_media,
    practitioner_interpretation,
    follow_up_within_24_business_hours,
    no_related_service_prior_7_days,
    no_resulting_service,
    consent_documented,
    billing_practitioner_eligible,
    payer_covers_code,
    not_already_billed,
)
