"""Practice business calendar: the clock behind the 24-business-hour follow-up deadline.

Encodes ``billing-rules.md`` §3, criterion ``follow-up-within-24-business-hours``: the follow-up is due
"receipt + 24 hours counted only on business days (weekends and configured holidays skipped) in the practice
time zone", with the alternative ``working-hours`` mode that "counts only configured opening hours"; and §6:
"Business-days mode, receipt on a weekend or holiday: counting starts at 00:00 of the next business day in the
practice time zone. Working-hours mode: counting starts at the next opening time."

Model
-----
Business time is a union of half-open *business intervals* ``[a, b)`` on the real time line, one per business
day (a configured working weekday that is not a holiday):

* ``business-days`` mode: ``[local 00:00, next local 00:00)`` -- the whole civil day, so a 23 h or 25 h DST
  day contributes 23 or 25 hours (the deadline counts elapsed hours, not wall-clock readings);
* ``working-hours`` mode: ``[local opening time, local closing time)`` of that day.

All arithmetic inside the intervals is done on UTC instants with integer microseconds (``timedelta``), so DST
transitions never add or lose time and sums of durations are exact.

Boundary convention
-------------------
``add_business_hours(s, h)`` is *the earliest instant t >= s at which h business hours have elapsed since s*.
Consequences, relied on by the tests:

* when the count is used up exactly at the end of a business interval, the result is that end instant
  (e.g. Friday 24:00 == Saturday 00:00 local), not the start of the next interval (Monday 00:00 / 08:00):
  a follow-up sent at that instant is on time, and nothing later is;
* ``add_business_hours(s, 0) == s`` (nothing has to elapse), even when ``s`` is outside business time; for
  ``h > 0`` the result always lies in ``(a, b]`` of some business interval, and a start outside business time
  behaves exactly like a start at the next interval's opening (§6);
* ``business_hours_between(s, add_business_hours(s, h)) == h`` and, for hours that are whole microseconds,
  ``add(add(s, a), b) == add(s, a + b)`` exactly, for every ``a, b >= 0`` (including 0).

No I/O and no ``datetime.now()``: the clock is always a parameter (house style, "rules" room).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from numbers import Real
from typing import Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays

from cds_service.memo import BoundedMemo

__all__ = [
    "BusinessCalendar",
    "BusinessCalendarMode",
    "CalendarConfigError",
    "WorkingHours",
]

BusinessCalendarMode = Literal["business-days", "working-hours"]
_MODES: tuple[str, ...] = get_args(BusinessCalendarMode)

# A practice with no business time for more than a year is misconfigured (e.g. every day an extra holiday);
# the deadline search must stop and say so instead of walking the calendar to year 9999.
_MAX_IDLE_DAYS = 366
_MAX_CACHED_DAYS = 8192  # about 22 years of days; past that the per-day caches start over

_ONE_DAY = timedelta(days=1)
_ONE_HOUR = timedelta(hours=1)
_ONE_MICROSECOND = timedelta(microseconds=1)
_MIDNIGHT = time(0)
_EXTRA_HOLIDAY_NAME = "Practice holiday"
_WEEKDAY_NAMES = {
    name: i
    for i, names in enumerate(
        [
            ("mon", "monday"),
            ("tue", "tuesday"),
            ("wed", "wednesday"),
            ("thu", "thursday"),
            ("fri", "friday"),
            ("sat", "saturday"),
            ("sun", "sunday"),
        ]
    )
    for name in names
}


class CalendarConfigError(ValueError):
    """The ``calendar:`` configuration cannot describe a usable practice calendar.

    ``key_path`` names the offending config key (e.g. ``calendar.working_hours.end``) so that
    ``g2250-cds check-config`` can point at it, as the contract requires.
    """

    def __init__(self, message: str, key_path: str | None = None) -> None:
        super().__init__(f"{key_path}: {message}" if key_path else message)
        self.key_path = key_path


@dataclass(frozen=True)
class WorkingHours:
    """Daily opening hours ``[start, end)`` in practice-local wall-clock time (``working-hours`` mode, §3).

    ``end == time(0)`` means midnight at the *end* of the day (config ``"24:00"``, which the config schema
    allows); otherwise ``end`` must be later than ``start``, because opening hours spanning midnight are not a
    practice schedule the billing rules describe.
    """

    start: time
    end: time

    def __post_init__(self) -> None:
        for field_name in ("start", "end"):
            value = getattr(self, field_name)
            if not isinstance(value, time):
                raise CalendarConfigError(
                    f"must be a datetime.time, got {type(value).__name__}",
                    f"calendar.working_hours.{field_name}",
                )
            if value.tzinfo is not None:
                raise CalendarConfigError(
                    "must be a local wall-clock time without a time zone (the calendar's time zone applies)",
                    f"calendar.working_hours.{field_name}",
                )
        if not self.ends_at_midnight and self.end <= self.start:
            raise CalendarConfigError(
                f"must be later than working_hours.start ({self.start:%H:%M} - {self.end:%H:%M})",
                "calendar.working_hours.end",
            )

    @property
    def ends_at_midnight(self) -> bool:
        """True when the day's opening lasts until the next local midnight (``end`` written as 24:00)."""
        return self.end == _MIDNIGHT


class BusinessCalendar:
    """Time-zone-aware practice calendar that counts business hours for the G2250/G2010 follow-up deadline.

    See the module docstring for the interval model and the boundary convention. Instances are immutable after
    construction apart from a lazily filled per-year holiday cache (safe to share between threads: a race only
    builds the same year twice).
    """

    def __init__(
        self,
        timezone: str = "America/New_York",
        *,
        mode: BusinessCalendarMode = "business-days",
        country: str | None = "US",
        subdivision: str | None = None,
        extra_holidays: Iterable[date] = (),
        working_hours: WorkingHours = WorkingHours(time(8), time(17)),
        working_days: Iterable[int] = (0, 1, 2, 3, 4),
    ) -> None:
        self._tz = _zone(timezone)
        self._timezone_name = timezone
        if mode not in _MODES:
            raise CalendarConfigError(f"must be one of {', '.join(_MODES)}, got {mode!r}", "calendar.mode")
        self._mode: BusinessCalendarMode = mode
        if not isinstance(working_hours, WorkingHours):
            raise CalendarConfigError("must be a WorkingHours", "calendar.working_hours")
        self._working_hours = working_hours
        self._working_days = _working_days(working_days)
        self._extra_holidays = frozenset(_parse_date(d, "calendar.extra_holidays") for d in extra_holidays)

        if country is not None and not isinstance(country, str):
            raise CalendarConfigError(
                f"country must be a string, got {type(country).__name__}", "calendar.holidays"
            )
        if subdivision is not None and not isinstance(subdivision, str):
            raise CalendarConfigError(
                f"subdivision must be a string, got {type(subdivision).__name__}", "calendar.holidays"
            )
        self._country = country.strip().upper() if country and country.strip() else None
        self._subdivision = subdivision.strip() if subdivision and subdivision.strip() else None
        if self._subdivision is not None and self._country is None:
            raise CalendarConfigError("a subdivision needs a country", "calendar.holidays")
        # Validate country and subdivision now (the holidays package raises on unknown codes), so that a typo
        # fails at start-up rather than on the first deadline computed.
        self._holiday_source = self._build_holiday_source(years=())
        self._holidays_by_year: dict[int, dict[date, str]] = {}
        # Each day's business interval depends only on the configuration: computed once per day. Bounded; a race
        # between threads only computes the same value twice.
        self._intervals: BoundedMemo[tuple[datetime, datetime] | None] = BoundedMemo(_MAX_CACHED_DAYS)
        self._day_starts: BoundedMemo[datetime] = BoundedMemo(_MAX_CACHED_DAYS)
        # add_business_hours is pure and every call of a hook asks again for the same receipt's deadline. A naive
        # start raises in the computation, so it is never kept.
        self._deadlines: BoundedMemo[datetime] = BoundedMemo(_MAX_CACHED_DAYS)

    # ------------------------------------------------------------------ construction from config

    @classmethod
    def from_config(cls, calendar_config: Mapping[str, Any]) -> BusinessCalendar:
        """Build the calendar from the contract's ``calendar:`` section (``contract.md``, "Config file").

        Keys: ``timezone`` (IANA name), ``holidays`` (``"US"`` or ``"US-CA"``: country and optional
        subdivision for the ``holidays`` package; null or ``""`` for none), ``extra_holidays`` (ISO dates or
        ``date`` objects), ``mode``, ``working_hours: {start: "08:00", end: "17:00"}`` (``"24:00"`` allowed
        as end) and, beyond the contract, ``working_days`` (0 = Monday ... 6 = Sunday, or day names).
        Missing keys take the embedded defaults; unknown keys are left to the config schema.
        """
        if not isinstance(calendar_config, Mapping):
            raise CalendarConfigError(f"must be a mapping, got {type(calendar_config).__name__}", "calendar")
        cfg = calendar_config

        timezone = cfg.get("timezone", "America/New_York")
        if not isinstance(timezone, str):
            raise CalendarConfigError(f"must be a string, got {type(timezone).__name__}", "calendar.timezone")

        mode = cfg.get("mode", "business-days")
        if mode not in _MODES:
            raise CalendarConfigError(f"must be one of {', '.join(_MODES)}, got {mode!r}", "calendar.mode")

        country, subdivision = _parse_holidays_key(cfg.get("holidays", "US"))

        extra = cfg.get("extra_holidays")
        if extra is None:
            extra = []
        if isinstance(extra, (str, bytes)) or not isinstance(extra, Iterable):
            raise CalendarConfigError("must be a list of ISO dates", "calendar.extra_holidays")
        extra_days = [_parse_date(item, f"calendar.extra_holidays[{i}]") for i, item in enumerate(extra)]

        working_hours = _parse_working_hours(cfg.get("working_hours"))

        working_days_raw = cfg.get("working_days", (0, 1, 2, 3, 4))
        if isinstance(working_days_raw, (str, bytes)) or not isinstance(working_days_raw, Iterable):
            raise CalendarConfigError("must be a list of weekdays", "calendar.working_days")
        working_days = [_parse_weekday(v) for v in working_days_raw]

        return cls(
            timezone,
            mode=mode,
            country=country,
            subdivision=subdivision,
            extra_holidays=extra_days,
            working_hours=working_hours,
            working_days=working_days,
        )

    # ------------------------------------------------------------------ read-only configuration

    @property
    def tz(self) -> ZoneInfo:
        """The practice time zone in which business days are counted (§3 "in the practice time zone")."""
        return self._tz

    @property
    def mode(self) -> BusinessCalendarMode:
        return self._mode

    @property
    def working_hours(self) -> WorkingHours:
        return self._working_hours

    @property
    def working_days(self) -> frozenset[int]:
        return self._working_days

    @property
    def country(self) -> str | None:
        return self._country

    @property
    def subdivision(self) -> str | None:
        return self._subdivision

    @property
    def extra_holidays(self) -> frozenset[date]:
        return self._extra_holidays

    def __repr__(self) -> str:
        holidays_key = "-".join(p for p in (self._country, self._subdivision) if p) or None
        wh = self._working_hours
        end = "24:00" if wh.ends_at_midnight else f"{wh.end:%H:%M}"
        return (
            f"BusinessCalendar({self._timezone_name!r}, mode={self._mode!r}, holidays={holidays_key!r}, "
            f"working_days={sorted(self._working_days)}, working_hours={wh.start:%H:%M}-{end}, "
            f"extra_holidays={len(self._extra_holidays)})"
        )

    # ------------------------------------------------------------------ days

    def holiday_name(self, day: date) -> str | None:
        """Name of the holiday on ``day`` (country/subdivision or practice extra), else None.

        §3 skips "configured holidays": the observed date counts (e.g. Independence Day observed on
        Fri 2026-07-03 when 4 July is a Saturday), as the ``holidays`` package reports it.
        """
        day = _require_date(day)
        name = self._holidays_for_year(day.year).get(day)
        if name is None and day in self._extra_holidays:
            return _EXTRA_HOLIDAY_NAME
        return name

    def is_business_day(self, day: date) -> bool:
        """A configured working weekday that is not a holiday (§3: "weekends and configured holidays
        skipped")."""
        day = _require_date(day)
        return day.weekday() in self._working_days and self.holiday_name(day) is None

    # ------------------------------------------------------------------ business time arithmetic

    def add_business_hours(self, start: datetime, hours: float) -> datetime:
        """Earliest instant at which ``hours`` business hours have elapsed since ``start`` (§3, §6).

        A start outside business time begins counting at the next business interval's opening: 00:00 of
        the next business day, or the next opening time in ``working-hours`` mode (§6). When the count ends
        exactly at the end of an interval the end instant is returned (module docstring, "Boundary
        convention"); ``hours == 0`` returns ``start`` itself.
        The result is in the calendar's time zone.
        """
        return self._deadlines.get((start, hours), lambda: self._add_business_hours(start, hours))

    def _add_business_hours(self, start: datetime, hours: float) -> datetime:
        origin = _to_utc(start, "start")
        remaining = _hours_to_timedelta(hours)
        if not remaining:
            return origin.astimezone(self._tz)
        day = self._day_containing(origin)
        idle_days = 0
        try:
            while True:
                interval = self._business_interval(day)
                if interval is None:
                    idle_days += 1
                    if idle_days > _MAX_IDLE_DAYS:
                        raise CalendarConfigError(
                            f"no business time in the {_MAX_IDLE_DAYS} days before {day.isoformat()}: "
                            "check working_days, working_hours and holidays",
                            "calendar",
                        )
                else:
                    idle_days = 0
                    opens, closes = interval
                    opens = max(opens, origin)
                    if closes > opens:
                        available = closes - opens
                        if remaining <= available:
                            return (opens + remaining).astimezone(self._tz)
                        remaining -= available
                day += _ONE_DAY
        except OverflowError as exc:  # past date.max: only reachable with absurd hour counts
            raise ValueError(f"{hours} business hours after {start.isoformat()} is beyond year 9999") from exc

    def follow_up_deadline(self, receipt_time: datetime, hours: float = 24.0) -> datetime:
        """Due time of the practitioner's follow-up: receipt + ``hours`` (default 24) business hours.

        Criterion ``follow-up-within-24-business-hours`` (§3): the follow-up is on time when sent after
        receipt and no later than this instant, which is why a count exhausted at a day's end yields that
        end instant rather than the next business day's opening.
        """
        return self.add_business_hours(receipt_time, hours)

    def business_hours_between(self, start: datetime, end: datetime) -> float:
        """Business hours elapsed in ``[start, end)``; 0.0 when ``end <= start``.

        Used for the §3 evidence "elapsed business hours" (e.g. "sent 6.5 business hours after receipt")
        and for the hours left on a pending deadline. Inverse of :meth:`add_business_hours`.
        """
        # Not remembered: one end is often "now", which never recurs (the day intervals it walks are cached).
        return self._business_hours_between(start, end)

    def _business_hours_between(self, start: datetime, end: datetime) -> float:
        lo = _to_utc(start, "start")
        hi = _to_utc(end, "end")
        if hi <= lo:
            return 0.0
        total = timedelta(0)
        day = self._day_containing(lo)
        last = self._day_containing(hi)
        while day <= last:
            interval = self._business_interval(day)
            if interval is not None:
                opens, closes = max(interval[0], lo), min(interval[1], hi)
                if closes > opens:
                    total += closes - opens
            day += _ONE_DAY
        return total / _ONE_HOUR

    # ------------------------------------------------------------------ internals

    def _day_start(self, day: date) -> datetime:
        """UTC instant at which ``day`` begins in the practice time zone (local 00:00).

        A midnight that falls in a DST gap (e.g. America/Santiago) is the transition instant itself, so
        consecutive day starts never decrease and the day intervals tile the time line without overlap.
        """
        return self._day_starts.get(day, lambda: self._local_instant(day, _MIDNIGHT))

    def _local_instant(self, day: date, wall: time) -> datetime:
        """UTC instant at which the practice clock first reads ``wall`` or later on ``day``.

        Opening hours are wall-clock times: on a DST gap day an opening at 02:30 (which does not exist) is the
        moment the clocks jump (03:00 new time), and on a fall-back day a repeated 01:30 is its first
        occurrence. Either way a missing or repeated hour never adds or removes working time silently.
        """
        target = datetime.combine(day, wall)
        first = datetime.combine(day, wall, tzinfo=self._tz)  # fold=0: first occurrence, or pre-gap offset
        instant = first.astimezone(UTC)
        if instant.astimezone(self._tz).replace(tzinfo=None) == target:
            return instant
        # ``wall`` falls in a gap: the answer is the transition instant, between the readings with the
        # post-gap offset (too early) and the pre-gap offset (too late). tzdata transitions are whole seconds,
        # but bisect to the microsecond so arbitrary zone rules stay exact.
        lo = first.replace(fold=1).astimezone(UTC)
        hi = instant
        while hi - lo > _ONE_MICROSECOND:
            mid = lo + (hi - lo) // 2
            if mid.astimezone(self._tz).replace(tzinfo=None) >= target:
                hi = mid
            else:
                lo = mid
        return hi

    def _day_containing(self, instant: datetime) -> date:
        """The local day whose ``[00:00, next 00:00)`` interval contains the UTC ``instant``."""
        day = instant.astimezone(self._tz).date()
        # Only differs from the wall-clock date in zones whose clocks jump back across midnight.
        while day > date.min and self._day_start(day) > instant:
            day -= _ONE_DAY
        while day < date.max and self._day_start(day + _ONE_DAY) <= instant:
            day += _ONE_DAY
        return day

    def _business_interval(self, day: date) -> tuple[datetime, datetime] | None:
        """The UTC ``[opens, closes)`` interval that counts on ``day``, or None when ``day`` is not a business
        day or (DST oddities only) the interval is empty."""
        return self._intervals.get(day, lambda: self._compute_interval(day))

    def _compute_interval(self, day: date) -> tuple[datetime, datetime] | None:
        if not self.is_business_day(day):
            return None
        if self._mode == "business-days":
            opens = self._day_start(day)
            closes = self._day_start(day + _ONE_DAY)
        else:
            wh = self._working_hours
            opens = self._local_instant(day, wh.start)
            closes = (
                self._day_start(day + _ONE_DAY) if wh.ends_at_midnight else self._local_instant(day, wh.end)
            )
        if closes <= opens:
            return None
        return opens, closes

    def _build_holiday_source(self, years: Iterable[int]) -> holidays.HolidayBase | None:
        if self._country is None:
            return None
        try:
            return holidays.country_holidays(self._country, subdiv=self._subdivision, years=years)
        except NotImplementedError as exc:
            # The package signals both an unknown country and an unknown subdivision this way.
            raise CalendarConfigError(str(exc), "calendar.holidays") from exc

    def _holidays_for_year(self, year: int) -> dict[date, str]:
        """Holidays of one year, built on first use: deadlines cross year ends (receipt on 31 December), so no
        fixed year range is assumed. The package files an observed day under the year it falls in
        (New Year 2022 observed on Fri 2021-12-31 is in 2021), so keying by ``day.year`` is enough."""
        cached = self._holidays_by_year.get(year)
        if cached is None:
            cached = {}
            if self._holiday_source is not None:
                source = self._build_holiday_source(years=year)
                cached = {d: str(source.get(d)) for d in source if d.year == year}
            self._holidays_by_year[year] = cached
        return cached


# ---------------------------------------------------------------------- parsing helpers


def _zone(name: str) -> ZoneInfo:
    if not isinstance(name, str) or not name.strip():
        raise CalendarConfigError(f"must be an IANA time zone name, got {name!r}", "calendar.timezone")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise CalendarConfigError(f"unknown IANA time zone {name!r}", "calendar.timezone") from exc


def _working_days(days: Iterable[int]) -> frozenset[int]:
    try:
        parsed = frozenset(days)
    except TypeError as exc:
        raise CalendarConfigError("must be a list of weekdays 0-6", "calendar.working_days") from exc
    for d in parsed:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 6:
            raise CalendarConfigError(
                f"weekdays are 0 (Monday) to 6 (Sunday), got {d!r}", "calendar.working_days"
            )
    if not parsed:
        # Without a single working weekday no deadline could ever be reached.
        raise CalendarConfigError("at least one working weekday is needed", "calendar.working_days")
    return parsed


def _parse_weekday(value: Any) -> int:
    if isinstance(value, str):
        key = value.strip().lower()
        if key in _WEEKDAY_NAMES:
            return _WEEKDAY_NAMES[key]
        raise CalendarConfigError(f"unknown weekday {value!r}", "calendar.working_days")
    return value  # integers are range-checked by _working_days


def _parse_holidays_key(value: Any) -> tuple[str | None, str | None]:
    """``"US"`` -> ("US", None); ``"US-CA"`` -> ("US", "CA"); None or ``""`` -> no public holidays."""
    if value is None:
        return None, None
    if not isinstance(value, str):
        raise CalendarConfigError(
            f"must be a country code such as 'US' or 'US-CA', got {type(value).__name__}", "calendar.holidays"
        )
    text = value.strip()
    if not text:
        return None, None
    country, separator, subdivision = text.partition("-")
    if not country or (separator and not subdivision):
        raise CalendarConfigError(f"must look like 'US' or 'US-CA', got {value!r}", "calendar.holidays")
    return country.upper(), subdivision.upper() or None


def _parse_date(value: Any, key_path: str) -> date:
    if isinstance(value, datetime):
        raise CalendarConfigError(f"must be a date, not a date-time ({value.isoformat()})", key_path)
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError as exc:
            raise CalendarConfigError(f"not an ISO date (YYYY-MM-DD): {value!r}", key_path) from exc
    raise CalendarConfigError(f"must be an ISO date string, got {type(value).__name__}", key_path)


def _parse_time(value: Any, key_path: str, *, allow_24: bool) -> time:
    if isinstance(value, time):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 (PyYAML) reads an unquoted 17:00 as the base-60 integer 1020.
        raise CalendarConfigError(
            f'quote the time, e.g. "17:00" (YAML read it as the number {value})', key_path
        )
    if not isinstance(value, str):
        raise CalendarConfigError(f'must be a time "HH:MM", got {type(value).__name__}', key_path)
    text = value.strip()
    if allow_24 and text in ("24:00", "24:00:00"):
        return _MIDNIGHT  # WorkingHours reads an end of 00:00 as the end of the day
    try:
        parsed = time.fromisoformat(text)
    except ValueError as exc:
        raise CalendarConfigError(f'not a time "HH:MM": {value!r}', key_path) from exc
    if parsed.tzinfo is not None:
        raise CalendarConfigError("must not carry a UTC offset (the calendar's time zone applies)", key_path)
    if allow_24 and parsed == _MIDNIGHT:
        raise CalendarConfigError('write midnight at the end of the day as "24:00"', key_path)
    return parsed


def _parse_working_hours(value: Any) -> WorkingHours:
    if value is None:
        return WorkingHours(time(8), time(17))
    if not isinstance(value, Mapping):
        raise CalendarConfigError(
            'must be a mapping {start: "08:00", end: "17:00"}', "calendar.working_hours"
        )
    for key in ("start", "end"):
        if key not in value:
            raise CalendarConfigError("is required", f"calendar.working_hours.{key}")
    start = _parse_time(value["start"], "calendar.working_hours.start", allow_24=False)
    end = _parse_time(value["end"], "calendar.working_hours.end", allow_24=True)
    return WorkingHours(start, end)


def _require_date(day: date) -> date:
    # A datetime is a date subclass; its calendar day depends on a time zone the caller must choose.
    if isinstance(day, datetime):
        raise TypeError("pass a date: convert the datetime with .astimezone(calendar.tz).date() first")
    if not isinstance(day, date):
        raise TypeError(f"expected a date, got {type(day).__name__}")
    return day


def _to_utc(moment: datetime, name: str) -> datetime:
    if not isinstance(moment, datetime):
        raise TypeError(f"{name} must be a datetime, got {type(moment).__name__}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        # Receipt and follow-up times come from FHIR instants, which always carry an offset; a naive value
        # would silently be read in the server's zone instead of the practice's.
        raise ValueError(f"{name} must be timezone-aware, got naive {moment.isoformat()}")
    return moment.astimezone(UTC)


def _hours_to_timedelta(hours: float) -> timedelta:
    """Whole microseconds, so that durations add up exactly (additivity of the deadline arithmetic)."""
    if isinstance(hours, bool) or not isinstance(hours, Real):
        raise TypeError(f"hours must be a number, got {type(hours).__name__}")
    value = float(hours)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"hours must be a finite number >= 0, got {hours!r}")
    try:
        return timedelta(microseconds=round(value * 3_600_000_000))
    except OverflowError as exc:
        raise ValueError(f"hours too large: {hours!r}") from exc
