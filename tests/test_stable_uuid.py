"""Card and suggestion uuids: RFC 4122 version-5 uuids of their parts, the same on every call and release."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from hooks.cards import _UUID_NAMESPACE, stable_uuid


@given(st.lists(st.one_of(st.none(), st.text(max_size=30)), max_size=6))
def test_stable_uuid_is_rfc4122_uuid5(parts: list[str | None]) -> None:
    assert stable_uuid(*parts) == str(uuid.uuid5(_UUID_NAMESPACE, "|".join(p or "" for p in parts)))


def test_a_known_value_never_changes() -> None:
    # Fixed here so a change of algorithm cannot pass unnoticed: EHRs match feedback to cards by these uuids.
    assert stable_uuid("card", "encounter-discharge", "Encounter/s01-enc-vr") == "9c68f950-8446-5281-9802-28eb27544e84"
