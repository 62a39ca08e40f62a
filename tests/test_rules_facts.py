"""The small pure readers the rules share, checked against independent references."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from dateutil.relativedelta import relativedelta
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cds_service.rules.facts import as_datetime, months_before, ref_key

NEW_YORK = ZoneInfo("America/New_York")


@given(st.datetimes(min_value=datetime(1901, 1, 1), max_value=datetime(2199, 12, 31)),
       st.integers(min_value=0, max_value=600))
def test_months_before_matches_relativedelta(moment: datetime, months: int) -> None:
    aware = moment.replace(tzinfo=NEW_YORK)
    assert months_before(aware, months) == aware - relativedelta(months=months)
    assert months_before(aware, months).tzinfo is NEW_YORK


def test_months_before_clamps_to_the_end_of_a_shorter_month() -> None:
    assert months_before(datetime(2024, 3, 31, 9, 30), 1) == datetime(2024, 2, 29, 9, 30)
    assert months_before(datetime(2027, 2, 28), 36) == datetime(2024, 2, 28)
    assert months_before(datetime(2028, 2, 29), 12) == datetime(2027, 2, 28)


def test_cached_readers_give_the_same_answers_twice_and_survive_odd_input() -> None:
    for _ in range(2):
        assert ref_key("https://ehr.example/fhir/Practitioner/p1/_history/3") == "Practitioner/p1"
        assert ref_key("#contained") is None and ref_key(None) is None
        assert as_datetime("2026-11-18T10:00:00Z", NEW_YORK) == datetime(2026, 11, 18, 5, tzinfo=NEW_YORK)
        assert as_datetime(date(2026, 11, 18), UTC) == datetime(2026, 11, 18, tzinfo=UTC)
    assert as_datetime(["2026-11-18"], UTC) is None  # unhashable: not cached, still no crash
    # Equal instants in different offsets share a cache entry; the answer is the same instant either way.
    a = as_datetime(datetime(2026, 11, 18, 15, tzinfo=UTC), NEW_YORK)
    b = as_datetime(datetime(2026, 11, 18, 10, tzinfo=NEW_YORK), NEW_YORK)
    assert a == b and a.tzinfo is NEW_YORK and b.tzinfo is NEW_YORK


_ZONES = [UTC, ZoneInfo("America/New_York"), ZoneInfo("Pacific/Kiritimati"), ZoneInfo("America/St_Johns")]


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                    timezones=st.none() | st.sampled_from(_ZONES) | st.timezones()),
       st.sampled_from(_ZONES[1:]))
def test_a_datetime_is_read_as_the_cached_reader_reads_it(value: datetime, tz: ZoneInfo) -> None:
    """as_datetime converts datetime values directly (cheaper than hashing them for the cache): the same answer as
    the general path, out-of-range years (None) and overflow near year 1 and 9999 included."""
    from cds_service.rules.facts import _checked_datetime

    expected = _checked_datetime(value, tz)
    got = as_datetime(value, tz)
    assert got == expected and (got is None or (got.tzinfo is tz and got.utcoffset() == expected.utcoffset()))


@given(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31),
                    timezones=st.none() | st.timezones()))
def test_a_search_date_is_the_percent_encoded_iso_instant(moment: datetime) -> None:
    from urllib.parse import quote

    from hooks.gather import fhir_instant

    assert fhir_instant(moment) == quote(moment.isoformat(timespec="seconds"), safe="")


_MOMENTS = st.datetimes(min_value=datetime(1900, 1, 2), max_value=datetime(2199, 12, 30), allow_imaginary=True,
                        timezones=st.none() | st.sampled_from(_ZONES) | st.timezones())


@given(_MOMENTS, _MOMENTS, st.booleans())
def test_instant_comparisons_agree_with_comparing_utc_instants(a: datetime, b: datetime, fold: bool) -> None:
    """before/not_after compare directly when both offsets are equal: the same answers as comparing UTC instants,
    across daylight-saving changes (folds, imaginary times), zones and naive values (taken as UTC)."""
    from cds_service.rules.facts import before, not_after, utc

    a = a.replace(fold=int(fold))
    assert before(a, b) is (utc(a) < utc(b))
    assert not_after(a, b) is (utc(a) <= utc(b))
    same_zone = b.replace(tzinfo=a.tzinfo, fold=1 - a.fold)  # the same wall clock on the other side of a fold
    assert before(a, same_zone) is (utc(a) < utc(same_zone))
    assert not_after(same_zone, a) is (utc(same_zone) <= utc(a))


def test_a_later_instant_with_an_earlier_wall_clock_in_the_repeated_hour() -> None:
    from cds_service.rules.facts import before, not_after

    ny = ZoneInfo("America/New_York")
    first = datetime(2026, 11, 1, 1, 30, tzinfo=ny)  # 05:30 UTC (EDT)
    second = datetime(2026, 11, 1, 1, 10, tzinfo=ny, fold=1)  # 06:10 UTC (EST): later, though 01:10 < 01:30
    assert before(first, second) and not before(second, first)
    assert not_after(first, second) and not not_after(second, first)


@given(_MOMENTS, _MOMENTS, _MOMENTS, st.booleans())
def test_between_agrees_with_comparing_utc_instants(moment: datetime, start: datetime, end: datetime,
                                                    inclusive: bool) -> None:
    from cds_service.rules.facts import between, utc

    instant = utc(moment)
    expected = utc(start) <= instant and (instant <= utc(end) if inclusive else instant < utc(end))
    assert between(moment, start, end, end_inclusive=inclusive) is expected


# Daylight-saving changes (UTC instants) where a wall clock and an instant disagree for up to an hour (a day in Apia,
# 30 Dec 2011): before/not_after of two moments of the zone, minutes to days around one, agree with the instants.
_CHANGES = [("America/New_York", datetime(2026, 11, 1, 6, tzinfo=UTC)),
            ("America/New_York", datetime(2026, 3, 8, 7, tzinfo=UTC)),
            ("Australia/Lord_Howe", datetime(2026, 4, 4, 15, tzinfo=UTC)),
            ("Pacific/Apia", datetime(2011, 12, 30, 10, tzinfo=UTC))]
_AROUND = st.integers(-65, 65) | st.integers(-3 * 24 * 60, 3 * 24 * 60)


@settings(max_examples=1000, deadline=None)
@example(_CHANGES[0], -20, 5)  # 01:40 EDT against 01:05 EST: the earlier instant has the later wall clock
@example(_CHANGES[2], -10, 25)  # Lord Howe's repeated half hour
@given(st.sampled_from(_CHANGES), _AROUND, _AROUND)
def test_wall_clock_comparisons_agree_with_the_instants_around_a_change(change: tuple[str, datetime], m: int,
                                                                       n: int) -> None:
    from cds_service.rules.facts import before, not_after, utc

    zone, at = change
    a = (at + timedelta(minutes=m)).astimezone(ZoneInfo(zone))
    b = (at + timedelta(minutes=n)).astimezone(ZoneInfo(zone))
    assert before(a, b) is (utc(a) < utc(b))
    assert not_after(a, b) is (utc(a) <= utc(b))
