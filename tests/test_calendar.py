"""Business calendar behind the `follow-up-within-24-business-hours` deadline (billing-rules.md §3, §6).

Hand-computed examples pin the rules (weekends, US federal/state and practice holidays, DST days of 23 h and
25 h, working-hours mode, the end-of-interval boundary convention); property-based tests check the arithmetic
invariants over both modes and several time zones, against a brute-force oracle where one is cheap.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.rules.calendar import BusinessCalendar, CalendarConfigError, WorkingHours

NY = ZoneInfo("America/New_York")
LONDON = ZoneInfo("Europe/London")
SANTIAGO = ZoneInfo("America/Santiago")  # DST switches at local midnight
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")  # 30-minute DST shift
KOLKATA = ZoneInfo("Asia/Kolkata")  # +05:30, no DST
ALL_DAYS = range(7)


def ny(*args: int) -> datetime:
    return datetime(*args, tzinfo=NY)


def london(*args: int) -> datetime:
    return datetime(*args, tzinfo=LONDON)


@pytest.fixture(scope="module")
def us() -> BusinessCalendar:
    return BusinessCalendar()


@pytest.fixture(scope="module")
def us_hours() -> BusinessCalendar:
    return BusinessCalendar(mode="working-hours")


# ---------------------------------------------------------------------------------------------- business days


@pytest.mark.parametrize(
    ("receipt", "deadline"),
    [
        # Friday afternoon: 9 h left on Friday, the weekend is skipped, 15 h on Monday.
        (ny(2026, 11, 27, 15), ny(2026, 11, 30, 15)),
        # Thanksgiving (Thu 26 Nov) does not count.
        (ny(2026, 11, 25, 15), ny(2026, 11, 27, 15)),
        # §6: a Saturday receipt starts counting at Monday 00:00; 24 h end at Monday 24:00 == Tuesday 00:00.
        (ny(2026, 11, 28, 10), ny(2026, 12, 1, 0)),
        # A Sunday receipt, likewise.
        (ny(2026, 11, 29, 23, 59), ny(2026, 12, 1, 0)),
        # Mid-week, nothing skipped.
        (ny(2026, 12, 1, 9, 30), ny(2026, 12, 2, 9, 30)),
        # Christmas Friday 2026-12-25 and the weekend are skipped.
        (ny(2026, 12, 24, 10), ny(2026, 12, 28, 10)),
        # Across the year end: New Year's Day Friday 2027-01-01 is skipped.
        (ny(2026, 12, 31, 15), ny(2027, 1, 4, 15)),
        # Independence Day is a Saturday in 2026: observed Friday 2026-07-03 is skipped.
        (ny(2026, 7, 2, 12), ny(2026, 7, 6, 12)),
        # Receipt on the holiday itself starts at 00:00 of the next business day (Friday).
        (ny(2026, 11, 26, 8), ny(2026, 11, 28, 0)),
        # Fall-back Sunday 2026-11-01 is a weekend day: weekday practice is unaffected.
        (ny(2026, 10, 30, 15), ny(2026, 11, 2, 15)),
        # Spring-forward Sunday 2026-03-08, likewise (Friday EST, Monday EDT, 24 business hours apart).
        (ny(2026, 3, 6, 12), ny(2026, 3, 9, 12)),
    ],
)
def test_business_days_deadlines(us: BusinessCalendar, receipt: datetime, deadline: datetime) -> None:
    got = us.follow_up_deadline(receipt)
    assert got == deadline
    assert got.tzinfo == NY
    assert got.utcoffset() == deadline.utcoffset()
    assert us.business_hours_between(receipt, got) == pytest.approx(24.0, abs=1e-9)


def test_deadline_is_in_practice_time_zone_whatever_the_input_offset(us: BusinessCalendar) -> None:
    receipt_utc = datetime(2026, 11, 27, 20, 0, tzinfo=UTC)  # == Fri 15:00 New York
    deadline = us.follow_up_deadline(receipt_utc)
    assert deadline.tzinfo == NY
    assert deadline.isoformat() == "2026-11-30T15:00:00-05:00"  # the contract's example deadline


def test_fractional_hours_and_elapsed_business_hours(us: BusinessCalendar) -> None:
    assert us.add_business_hours(ny(2026, 11, 30, 9), 6.5) == ny(2026, 11, 30, 15, 30)
    # Sent Monday 10:30 for a Friday 16:00 receipt: 8 h of Friday + 10.5 h of Monday.
    assert us.business_hours_between(ny(2026, 11, 27, 16), ny(2026, 11, 30, 10, 30)) == 18.5
    assert us.business_hours_between(ny(2026, 11, 28, 1), ny(2026, 11, 29, 23)) == 0.0
    assert us.business_hours_between(ny(2026, 11, 30, 10), ny(2026, 11, 30, 9)) == 0.0
    assert us.business_hours_between(ny(2026, 11, 30, 10), ny(2026, 11, 30, 10)) == 0.0


def test_federal_holiday_names(us: BusinessCalendar) -> None:
    assert us.holiday_name(date(2026, 11, 26)) == "Thanksgiving Day"
    assert us.holiday_name(date(2026, 12, 25)) == "Christmas Day"
    assert us.holiday_name(date(2027, 1, 1)) == "New Year's Day"
    assert us.holiday_name(date(2026, 7, 3)) == "Independence Day (observed)"
    assert us.holiday_name(date(2026, 11, 27)) is None
    assert not us.is_business_day(date(2026, 11, 26))
    assert us.is_business_day(date(2026, 11, 27))
    assert not us.is_business_day(date(2026, 11, 28))  # Saturday
    assert not us.is_business_day(date(2026, 7, 3))


def test_subdivision_holiday_patriots_day() -> None:
    federal = BusinessCalendar(country="US")
    massachusetts = BusinessCalendar(country="US", subdivision="MA")
    assert massachusetts.holiday_name(date(2026, 4, 20)) == "Patriots' Day"
    assert federal.holiday_name(date(2026, 4, 20)) is None
    receipt = ny(2026, 4, 17, 12)  # Friday before Patriots' Day (Monday 20 April)
    assert federal.follow_up_deadline(receipt) == ny(2026, 4, 20, 12)
    assert massachusetts.follow_up_deadline(receipt) == ny(2026, 4, 21, 12)


def test_extra_holidays_are_skipped() -> None:
    cal = BusinessCalendar(extra_holidays=[date(2026, 12, 24)])
    assert cal.holiday_name(date(2026, 12, 24)) == "Practice holiday"
    assert cal.holiday_name(date(2026, 12, 25)) == "Christmas Day"  # the public name wins
    # Wed noon: 12 h Wednesday, Thu (practice) and Fri (Christmas) off, weekend, 12 h Monday.
    assert cal.follow_up_deadline(ny(2026, 12, 23, 12)) == ny(2026, 12, 28, 12)
    assert BusinessCalendar().follow_up_deadline(ny(2026, 12, 23, 12)) == ny(2026, 12, 24, 12)


def test_no_public_holidays() -> None:
    cal = BusinessCalendar(country=None)
    assert cal.holiday_name(date(2026, 11, 26)) is None
    assert cal.follow_up_deadline(ny(2026, 11, 25, 15)) == ny(2026, 11, 26, 15)


def test_uk_bank_holidays_in_london() -> None:
    cal = BusinessCalendar("Europe/London", country="GB", subdivision="ENG")
    # Good Friday 2026-04-03 and Easter Monday 2026-04-06.
    assert cal.follow_up_deadline(london(2026, 4, 2, 12)) == london(2026, 4, 7, 12)


# ---------------------------------------------------------------------------------------------- DST days


@pytest.fixture(scope="module")
def ny_every_day() -> BusinessCalendar:
    return BusinessCalendar(country=None, working_days=ALL_DAYS)


def test_fall_back_day_has_25_hours(ny_every_day: BusinessCalendar) -> None:
    # Sat 12:00 EDT: 12 h left on Saturday; Sunday 1 Nov is 25 h long, so 12 h into it is 11:00 EST.
    assert ny_every_day.follow_up_deadline(ny(2026, 10, 31, 12)) == ny(2026, 11, 1, 11)
    assert ny_every_day.business_hours_between(ny(2026, 11, 1, 0), ny(2026, 11, 2, 0)) == 25.0


def test_spring_forward_day_has_23_hours(ny_every_day: BusinessCalendar) -> None:
    # Sat 12:00 EST: 12 h left on Saturday; Sunday 8 Mar is 23 h long: 12 h after 00:00 EST is 13:00 EDT.
    assert ny_every_day.follow_up_deadline(ny(2026, 3, 7, 12)) == ny(2026, 3, 8, 13)
    assert ny_every_day.business_hours_between(ny(2026, 3, 8, 0), ny(2026, 3, 9, 0)) == 23.0
    # A whole day's count starting at midnight ends at the next midnight only on 24 h days.
    assert ny_every_day.add_business_hours(ny(2026, 3, 8, 0), 24) == ny(2026, 3, 9, 1)


def test_london_dst_days() -> None:
    cal = BusinessCalendar("Europe/London", country=None, working_days=ALL_DAYS)
    # Sunday 2026-03-29 is 23 h (01:00 GMT -> 02:00 BST): 12 h after 00:00 GMT is 13:00 BST.
    assert cal.follow_up_deadline(london(2026, 3, 28, 12)) == london(2026, 3, 29, 13)
    # Sunday 2026-10-25 is 25 h (02:00 BST -> 01:00 GMT): 12 h after 00:00 BST is 11:00 GMT.
    assert cal.follow_up_deadline(london(2026, 10, 24, 12)) == london(2026, 10, 25, 11)
    assert cal.business_hours_between(london(2026, 3, 29), london(2026, 3, 30)) == 23.0
    assert cal.business_hours_between(london(2026, 10, 25), london(2026, 10, 26)) == 25.0


def test_midnight_dst_switch_in_santiago() -> None:
    # Chile springs forward at local midnight: Sunday 2026-09-06 starts at 01:00 -03 and lasts 23 h.
    cal = BusinessCalendar("America/Santiago", country=None, working_days=ALL_DAYS)
    sat_noon = datetime(2026, 9, 5, 12, tzinfo=SANTIAGO)
    assert cal.add_business_hours(sat_noon, 12) == datetime(2026, 9, 6, 1, tzinfo=SANTIAGO)
    assert cal.follow_up_deadline(sat_noon) == datetime(2026, 9, 6, 13, tzinfo=SANTIAGO)
    sunday = datetime(2026, 9, 6, 1, tzinfo=SANTIAGO)
    assert cal.business_hours_between(sunday, datetime(2026, 9, 7, tzinfo=SANTIAGO)) == 23.0


# ---------------------------------------------------------------------------------------------- working hours


@pytest.mark.parametrize(
    ("receipt", "hours", "deadline"),
    [
        # 9 h per day (08:00-17:00): Mon 9 + Tue 9 + Wed 6 -> Wed 14:00.
        (ny(2026, 11, 30, 8), 24, ny(2026, 12, 2, 14)),
        # Exactly three days: ends at Wednesday's closing time, not Thursday's opening.
        (ny(2026, 11, 30, 8), 27, ny(2026, 12, 2, 17)),
        # Friday 16:00: 1 h Friday, 9 Monday, 9 Tuesday, 5 Wednesday.
        (ny(2026, 11, 27, 16), 24, ny(2026, 12, 2, 13)),
        # §6: a weekend receipt starts at the next opening time (Monday 08:00).
        (ny(2026, 11, 28, 10), 24, ny(2026, 12, 2, 14)),
        # Before opening: starts at 08:00 the same day.
        (ny(2026, 11, 30, 6), 24, ny(2026, 12, 2, 14)),
        # After closing: starts at Tuesday 08:00.
        (ny(2026, 11, 30, 18), 24, ny(2026, 12, 3, 14)),
        # Thanksgiving is skipped in working-hours mode too: Wed 15:00 -> 2 h Wed, 9 Fri, 9 Mon, 4 Tue.
        (ny(2026, 11, 25, 15), 24, ny(2026, 12, 1, 12)),
        # Ends at Friday's closing: the end instant, not Monday 08:00.
        (ny(2026, 11, 27, 8), 9, ny(2026, 11, 27, 17)),
    ],
)
def test_working_hours_deadlines(
    us_hours: BusinessCalendar, receipt: datetime, hours: float, deadline: datetime
) -> None:
    got = us_hours.add_business_hours(receipt, hours)
    assert got == deadline
    assert got.tzinfo == NY
    assert us_hours.business_hours_between(receipt, got) == pytest.approx(hours, abs=1e-9)


def test_working_hours_elapsed(us_hours: BusinessCalendar) -> None:
    assert us_hours.business_hours_between(ny(2026, 11, 30, 12), ny(2026, 11, 30, 14, 30)) == 2.5
    assert us_hours.business_hours_between(ny(2026, 11, 30, 17), ny(2026, 12, 1, 8)) == 0.0
    assert us_hours.business_hours_between(ny(2026, 11, 27, 16), ny(2026, 11, 30, 9)) == 2.0


def test_working_hours_until_midnight() -> None:
    late = BusinessCalendar(mode="working-hours", working_hours=WorkingHours(time(20), time(0)), country=None)
    assert late.working_hours.ends_at_midnight
    assert late.add_business_hours(ny(2026, 11, 30, 12), 4) == ny(2026, 12, 1, 0)
    assert late.add_business_hours(ny(2026, 11, 30, 12), 5) == ny(2026, 12, 1, 21)


def test_opening_time_inside_dst_gap_is_the_clock_change() -> None:
    # 02:30 does not exist on 2026-03-08 in New York: the practice opens when clocks jump to 03:00 EDT.
    cal = BusinessCalendar(
        mode="working-hours",
        working_hours=WorkingHours(time(2, 30), time(17)),
        country=None,
        working_days=ALL_DAYS,
    )
    assert cal.add_business_hours(ny(2026, 3, 8, 0), 1) == ny(2026, 3, 8, 4)
    assert cal.business_hours_between(ny(2026, 3, 8, 0), ny(2026, 3, 9, 0)) == 14.0
    assert cal.business_hours_between(ny(2026, 3, 9, 0), ny(2026, 3, 10, 0)) == 14.5


# ------------------------------------------------------------------------------------ boundary convention


def test_count_ending_at_day_end_returns_that_instant(us: BusinessCalendar) -> None:
    friday_noon = ny(2026, 11, 27, 12)
    friday_end = us.add_business_hours(friday_noon, 12)
    assert friday_end == ny(2026, 11, 28, 0)  # Friday 24:00, not Monday 00:00
    # ... and the rest of the count resumes on Monday.
    assert us.add_business_hours(friday_end, 5) == ny(2026, 11, 30, 5)
    assert us.add_business_hours(friday_noon, 17) == ny(2026, 11, 30, 5)


def test_zero_hours_is_the_start_itself(us: BusinessCalendar, us_hours: BusinessCalendar) -> None:
    saturday = ny(2026, 11, 28, 10)
    assert us.add_business_hours(saturday, 0) == saturday
    assert us_hours.add_business_hours(ny(2026, 11, 30, 20), 0) == ny(2026, 11, 30, 20)
    assert us.add_business_hours(datetime(2026, 11, 28, 15, tzinfo=UTC), 0).tzinfo == NY


# ---------------------------------------------------------------------------------------------- input errors


def test_naive_datetimes_are_rejected(us: BusinessCalendar) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        us.add_business_hours(datetime(2026, 11, 27, 15), 24)
    with pytest.raises(ValueError, match="timezone-aware"):
        us.follow_up_deadline(datetime(2026, 11, 27, 15))
    with pytest.raises(ValueError, match="timezone-aware"):
        us.business_hours_between(ny(2026, 11, 27, 15), datetime(2026, 11, 30, 15))


@pytest.mark.parametrize("hours", [-1, -1e-9, float("nan"), float("inf")])
def test_bad_hours_are_rejected(us: BusinessCalendar, hours: float) -> None:
    with pytest.raises(ValueError):
        us.add_business_hours(ny(2026, 11, 27, 15), hours)


def test_days_must_be_dates(us: BusinessCalendar) -> None:
    with pytest.raises(TypeError):
        us.is_business_day(ny(2026, 11, 27, 15))  # type: ignore[arg-type]


def test_no_business_time_for_over_a_year_raises_instead_of_spinning() -> None:
    mondays = [date(2026, 1, 5) + timedelta(weeks=i) for i in range(120)]
    cal = BusinessCalendar(country=None, working_days=[0], extra_holidays=mondays)
    with pytest.raises(CalendarConfigError, match="no business time"):
        cal.follow_up_deadline(ny(2026, 1, 1, 12))
    # A long closure that does end is fine.
    cal = BusinessCalendar(country=None, working_days=[0], extra_holidays=mondays[:50])
    assert cal.follow_up_deadline(ny(2026, 1, 1, 12)) == ny(2026, 12, 22, 0)


def test_long_counts(us: BusinessCalendar) -> None:
    days = [date(2027, 1, 1) + timedelta(days=i) for i in range(365)]
    business_days = [d for d in days if us.is_business_day(d)]
    # 261 weekdays minus 12 weekday federal holidays, incl. observed Fri 2027-12-31 for New Year 2028.
    assert len(business_days) == 261 - 12
    start, end = ny(2027, 1, 1), ny(2028, 1, 1)
    assert us.business_hours_between(start, end) == 24 * len(business_days)
    # The count ends at the end of the last business day of 2027 (boundary convention).
    last_end = datetime.combine(business_days[-1] + timedelta(days=1), time(0), tzinfo=NY)
    assert us.add_business_hours(start, 24 * len(business_days)) == last_end
    # Speed is measured in bench/, not asserted here (timed unit tests fail on shared, noisy machines).


# ---------------------------------------------------------------------------------------------- configuration


def test_from_config_contract_example() -> None:
    section = yaml.safe_load(
        """
calendar:
  timezone: America/New_York
  holidays: US              # country (and optional subdivision) for the holidays package
  extra_holidays: []        # ISO dates
  mode: business-days       # or working-hours
  working_hours: {start: "08:00", end: "17:00"}
"""
    )["calendar"]
    cal = BusinessCalendar.from_config(section)
    assert cal.tz == NY
    assert cal.mode == "business-days"
    assert cal.country == "US" and cal.subdivision is None
    assert cal.working_hours == WorkingHours(time(8), time(17))
    assert cal.working_days == frozenset(range(5))
    assert cal.follow_up_deadline(ny(2026, 11, 27, 15)) == ny(2026, 11, 30, 15)


def test_from_config_defaults() -> None:
    cal = BusinessCalendar.from_config({})
    assert cal.tz == ZoneInfo("America/New_York")
    assert cal.mode == "business-days"
    assert cal.country == "US"
    assert cal.working_hours == WorkingHours(time(8), time(17))


def test_from_config_full() -> None:
    cal = BusinessCalendar.from_config(
        {
            "timezone": "America/Los_Angeles",
            "holidays": "US-CA",
            "extra_holidays": ["2026-12-24", date(2026, 12, 31)],
            "mode": "working-hours",
            "working_hours": {"start": "09:00", "end": "17:30"},
            "working_days": ["mon", "Tuesday", 2, 3, 4, "sat"],
        }
    )
    assert cal.tz == ZoneInfo("America/Los_Angeles")
    assert (cal.country, cal.subdivision) == ("US", "CA")
    assert cal.extra_holidays == {date(2026, 12, 24), date(2026, 12, 31)}
    assert cal.holiday_name(date(2026, 11, 27)) == "Day After Thanksgiving"  # a California holiday
    assert cal.mode == "working-hours"
    assert cal.working_hours == WorkingHours(time(9), time(17, 30))
    assert cal.working_days == frozenset({0, 1, 2, 3, 4, 5})
    la = ZoneInfo("America/Los_Angeles")
    # Sat 2026-11-28 is a working day here: 8.5 h Sat + 8.5 h Mon + 7 h Tue.
    assert cal.follow_up_deadline(datetime(2026, 11, 27, 12, tzinfo=la)) == datetime(
        2026, 12, 1, 16, tzinfo=la
    )


@pytest.mark.parametrize("value", [None, ""])
def test_from_config_without_public_holidays(value: str | None) -> None:
    cal = BusinessCalendar.from_config({"holidays": value})
    assert cal.country is None
    assert cal.is_business_day(date(2026, 11, 26))


def test_from_config_end_of_day_closing() -> None:
    cal = BusinessCalendar.from_config(
        {"mode": "working-hours", "working_hours": {"start": "00:00", "end": "24:00"}}
    )
    assert cal.working_hours.ends_at_midnight
    assert cal.follow_up_deadline(ny(2026, 11, 27, 15)) == ny(2026, 11, 30, 15)  # same as business-days


@pytest.mark.parametrize(
    ("config", "key_path"),
    [
        ({"timezone": "Mars/Olympus_Mons"}, "calendar.timezone"),
        ({"timezone": ""}, "calendar.timezone"),
        ({"timezone": "../etc/passwd"}, "calendar.timezone"),
        ({"timezone": 5}, "calendar.timezone"),
        ({"holidays": "XX"}, "calendar.holidays"),
        ({"holidays": "US-ZZ"}, "calendar.holidays"),
        ({"holidays": "US-"}, "calendar.holidays"),
        ({"holidays": ["US"]}, "calendar.holidays"),
        ({"mode": "calendar-days"}, "calendar.mode"),
        ({"extra_holidays": ["2026-13-01"]}, "calendar.extra_holidays[0]"),
        ({"extra_holidays": "2026-12-24"}, "calendar.extra_holidays"),
        ({"extra_holidays": [datetime(2026, 12, 24, 9)]}, "calendar.extra_holidays[0]"),
        ({"working_hours": {"start": "17:00", "end": "08:00"}}, "calendar.working_hours.end"),
        ({"working_hours": {"start": "08:00", "end": "08:00"}}, "calendar.working_hours.end"),
        ({"working_hours": {"start": "8am", "end": "17:00"}}, "calendar.working_hours.start"),
        ({"working_hours": {"start": "08:00", "end": 1020}}, "calendar.working_hours.end"),  # YAML 17:00
        ({"working_hours": {"start": "08:00"}}, "calendar.working_hours.end"),
        ({"working_hours": {"start": "08:00", "end": "00:00"}}, "calendar.working_hours.end"),
        ({"working_hours": {"start": "08:00", "end": "17:00+01:00"}}, "calendar.working_hours.end"),
        ({"working_hours": "08:00-17:00"}, "calendar.working_hours"),
        ({"working_days": []}, "calendar.working_days"),
        ({"working_days": [7]}, "calendar.working_days"),
        ({"working_days": ["someday"]}, "calendar.working_days"),
    ],
)
def test_from_config_errors(config: dict[str, object], key_path: str) -> None:
    with pytest.raises(CalendarConfigError) as excinfo:
        BusinessCalendar.from_config(config)
    assert excinfo.value.key_path == key_path
    assert str(excinfo.value).startswith(key_path + ": ")
    assert isinstance(excinfo.value, ValueError)


def test_from_config_rejects_non_mapping() -> None:
    with pytest.raises(CalendarConfigError):
        BusinessCalendar.from_config(["timezone"])  # type: ignore[arg-type]


def test_constructor_errors() -> None:
    with pytest.raises(CalendarConfigError):
        BusinessCalendar("Not/AZone")
    with pytest.raises(CalendarConfigError):
        BusinessCalendar(country="XX")
    with pytest.raises(CalendarConfigError):
        BusinessCalendar(country="US", subdivision="ZZ")
    with pytest.raises(CalendarConfigError):
        BusinessCalendar(country=None, subdivision="CA")
    with pytest.raises(CalendarConfigError):
        BusinessCalendar(working_days=())
    with pytest.raises(CalendarConfigError):
        BusinessCalendar(mode="weekdays")  # type: ignore[arg-type]
    with pytest.raises(CalendarConfigError):
        WorkingHours(time(17), time(8))
    with pytest.raises(CalendarConfigError):
        WorkingHours(time(8), time(8))
    with pytest.raises(CalendarConfigError):
        WorkingHours(time(8, tzinfo=UTC), time(17))


# ---------------------------------------------------------------------------------------------- properties

CALENDARS = [
    BusinessCalendar("America/New_York"),
    BusinessCalendar("America/New_York", mode="working-hours"),
    BusinessCalendar("America/New_York", country="US", subdivision="MA", extra_holidays=[date(2026, 12, 24)]),
    BusinessCalendar("Europe/London", country="GB", subdivision="ENG", working_days=ALL_DAYS),
    BusinessCalendar(
        "Europe/London", mode="working-hours", country="GB", working_hours=WorkingHours(time(9), time(17, 30))
    ),
    BusinessCalendar("America/Santiago", country="CL"),
    BusinessCalendar("Australia/Lord_Howe", country=None, working_days=ALL_DAYS),
    BusinessCalendar(
        "Asia/Kolkata",
        mode="working-hours",
        country=None,
        working_days=(0, 1, 2, 3, 4, 5),
        working_hours=WorkingHours(time(9, 45), time(18, 15)),
    ),
    BusinessCalendar("America/New_York", country=None, working_days=[2], extra_holidays=[date(2026, 12, 23)]),
    BusinessCalendar(
        "America/New_York",
        mode="working-hours",
        country=None,
        working_days=ALL_DAYS,
        working_hours=WorkingHours(time(2, 30), time(0)),
    ),
]
# Calendars whose days start at a local 00:00 that exists and whose opening hours avoid DST transitions, so
# that simple wall-clock oracles apply.
WALL_CLOCK_CALENDARS = [c for c in CALENDARS if c.tz != SANTIAGO and c.working_hours.start >= time(4)]

PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

instants = st.datetimes(
    min_value=datetime(2025, 12, 1),
    max_value=datetime(2027, 12, 31),
    timezones=st.sampled_from([UTC, NY, LONDON, SANTIAGO, LORD_HOWE, KOLKATA]),
)
# Whole seconds, so sums of hours are exact in the calendar's integer-microsecond arithmetic.
durations = st.integers(min_value=0, max_value=200 * 3600).map(lambda s: s / 3600)
positive_durations = st.integers(min_value=1, max_value=200 * 3600).map(lambda s: s / 3600)
calendars = st.sampled_from(CALENDARS)


@PROPERTY_SETTINGS
@given(calendars, instants, durations)
def test_result_is_after_start_and_inverts_elapsed_hours(
    cal: BusinessCalendar, start: datetime, h: float
) -> None:
    end = cal.add_business_hours(start, h)
    assert end >= start
    assert end.tzinfo == cal.tz
    assert cal.business_hours_between(start, end) == pytest.approx(h, abs=1e-6)


@PROPERTY_SETTINGS
@given(calendars, instants, durations, durations)
def test_monotonic_in_hours(cal: BusinessCalendar, start: datetime, a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    assert cal.add_business_hours(start, lo) <= cal.add_business_hours(start, hi)


@PROPERTY_SETTINGS
@given(calendars, instants, instants, durations)
def test_monotonic_in_start(cal: BusinessCalendar, s1: datetime, s2: datetime, h: float) -> None:
    early, late = sorted((s1, s2))
    assert cal.add_business_hours(early, h) <= cal.add_business_hours(late, h)


@PROPERTY_SETTINGS
@given(calendars, instants, durations, durations)
def test_additive(cal: BusinessCalendar, start: datetime, a: float, b: float) -> None:
    # Exact, including when the first leg ends at a day end (boundary convention) and when a or b is 0.
    assert cal.add_business_hours(cal.add_business_hours(start, a), b) == cal.add_business_hours(start, a + b)


@PROPERTY_SETTINGS
@given(calendars, instants, positive_durations)
def test_result_is_never_inside_non_business_time(cal: BusinessCalendar, start: datetime, h: float) -> None:
    end = cal.add_business_hours(start, h)
    # The last microsecond before the deadline is business time: the count never ends inside a weekend,
    # holiday or closed period (at most exactly at its beginning, the boundary convention).
    assert cal.business_hours_between(end - timedelta(microseconds=1), end) > 0


@PROPERTY_SETTINGS
@given(st.sampled_from(WALL_CLOCK_CALENDARS), instants, positive_durations)
def test_result_local_date_is_a_business_day_or_the_midnight_after_one(
    cal: BusinessCalendar, start: datetime, h: float
) -> None:
    end = cal.add_business_hours(start, h)
    local_day, local_time = end.date(), end.timetz().replace(tzinfo=None)
    if cal.mode == "business-days":
        if local_time == time(0):
            assert cal.is_business_day(local_day - timedelta(days=1))
        else:
            assert cal.is_business_day(local_day)
    else:
        wh = cal.working_hours
        if wh.ends_at_midnight and local_time == time(0):
            assert cal.is_business_day(local_day - timedelta(days=1))
        else:
            assert cal.is_business_day(local_day)
            assert wh.start < local_time <= wh.end


def _next_opening(cal: BusinessCalendar, moment: datetime) -> datetime:
    """§6 by hand: 00:00 of the next business day, or the next opening time, in the practice zone."""
    local = moment.astimezone(cal.tz)
    day = local.date()
    if cal.mode == "business-days":
        if cal.is_business_day(day):
            return moment
        opening = time(0)
    else:
        opening = cal.working_hours.start
        closing_passed = not cal.working_hours.ends_at_midnight and local.time() >= cal.working_hours.end
        if cal.is_business_day(day) and not closing_passed:
            return max(moment, datetime.combine(day, opening, tzinfo=cal.tz))
    day += timedelta(days=1)
    while not cal.is_business_day(day):
        day += timedelta(days=1)
    return datetime.combine(day, opening, tzinfo=cal.tz)


@PROPERTY_SETTINGS
@given(st.sampled_from(WALL_CLOCK_CALENDARS), instants, positive_durations)
def test_non_business_receipt_counts_from_next_opening(
    cal: BusinessCalendar, start: datetime, h: float
) -> None:
    opening = _next_opening(cal, start)
    assert cal.business_hours_between(start, opening) == 0.0
    assert cal.add_business_hours(start, h) == cal.add_business_hours(opening, h)


@PROPERTY_SETTINGS
@given(calendars, instants, instants, instants)
def test_elapsed_hours_add_up_over_consecutive_spans(
    cal: BusinessCalendar, a: datetime, b: datetime, c: datetime
) -> None:
    a, b, c = sorted((a, b, c))
    total = cal.business_hours_between(a, b) + cal.business_hours_between(b, c)
    assert total == pytest.approx(cal.business_hours_between(a, c), abs=1e-6)
    assert cal.business_hours_between(c, a) == 0.0


QUARTER = timedelta(minutes=15)
grid_instants = st.integers(min_value=0, max_value=2 * 366 * 96).map(
    lambda n: datetime(2025, 12, 1, tzinfo=UTC) + n * QUARTER
)


@PROPERTY_SETTINGS
@given(st.sampled_from(WALL_CLOCK_CALENDARS), grid_instants, st.integers(min_value=0, max_value=5 * 96))
def test_elapsed_hours_match_a_quarter_hour_wall_clock_oracle(
    cal: BusinessCalendar, start: datetime, quarters: int
) -> None:
    # Every zone and opening time used here changes on quarter hours, so sampling the wall clock every
    # 15 minutes counts business time exactly, independently of the interval arithmetic.
    counted = 0
    for i in range(quarters):
        local = (start + i * QUARTER).astimezone(cal.tz)
        if not cal.is_business_day(local.date()):
            continue
        if cal.mode == "working-hours":
            wh = cal.working_hours
            if local.time() < wh.start or (not wh.ends_at_midnight and local.time() >= wh.end):
                continue
        counted += 1
    assert cal.business_hours_between(start, start + quarters * QUARTER) == counted / 4
