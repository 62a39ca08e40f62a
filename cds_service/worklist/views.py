"""The worklist's pages: the list, one row's detail and its actions, the CSV export, the analytics plots, sign-in.

Server-rendered HTML (Jinja templates beside this module) that works without JavaScript. Every route but sign-in
and static files needs a session; actions need the ``coder`` role, Flask-WTF's CSRF token and a one-time nonce
(the store's), so a forged form is refused (400) and a replayed one stores nothing (409). Identifiers in URLs are
item ids (the assessment id): never a patient's. A bad query parameter is a 400 page naming it.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from urllib.parse import urlencode

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    stream_with_context,
    url_for,
)
from flask_wtf.csrf import CSRFError, ValidationError, generate_csrf, validate_csrf
from markupsafe import Markup, escape
from werkzeug.exceptions import HTTPException

from ..config import Config
from ..rules.calendar import BusinessCalendar
from . import auth, charts
from .model import (
    ACTION_ASSIGN,
    ACTION_NOTE,
    ACTION_REOPEN,
    ACTION_REVIEW,
    DONE,
    DUE,
    PAGE_SIZES,
    QUEUE_LABELS,
    QUEUE_OF_CLASS,
    QUEUES,
    SORT_KEYS,
    ItemDetail,
    WorklistFilter,
    WorklistItem,
)

log = logging.getLogger("g2250_cds")

bp = Blueprint("worklist", __name__, url_prefix=auth.PREFIX, template_folder="templates",
               static_folder="static", static_url_path="/static")

STATE_KEY = "g2250_worklist"
TABS: tuple[str, ...] = (*QUEUES, DONE)
STATUSES: tuple[str, ...] = ("billable", "not-billable", "pending", "needs-review")
#: Endpoints served without a session (sign-in itself and the stylesheet the sign-in page needs).
PUBLIC_ENDPOINTS = frozenset({"worklist.login", "worklist.login_post", "worklist.callback", "worklist.static"})
LIST_PARAMETERS = ("queue", "practitioner", "organization", "payer", "status", "class", "from", "to", "assignee",
                   "reviewed", "sort", "dir", "page", "size")
_REFERENCE = {"practitioner": re.compile(r"Practitioner/[A-Za-z0-9\-.]{1,64}"),
              "organization": re.compile(r"Organization/[A-Za-z0-9\-.]{1,64}")}
_PAYER = re.compile(r"[A-Za-z0-9._\-]{1,64}")
_ITEM_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
MAX_PAGE = 1_000_000
MAX_NOTE = 2000
MAX_ASSIGNEE = 100
#: OWASP "CSV Injection": a cell a spreadsheet would read as a formula starts with one of these.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: Labels of the list's sortable columns, in the table's order.
SORT_LABELS: dict[str, str] = {"deadline": "Reply deadline", "practitioner": "Practitioner",
                               "organization": "Organization", "payer": "Payer", "status": "Status",
                               "amount": "Amount", "timely_filing": "Timely filing", "received": "Received",
                               "updated": "Updated", "queue": "Queue"}
DEFAULT_DESCENDING = {"amount": True, "updated": True}


class BadParameter(Exception):
    """A query or form field the page cannot use: answered with a 400 page naming ``name``."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


@dataclass
class WorklistState:
    """What the pages need from the application: settings, the store, the clock and the practice calendar."""

    config: Config
    settings: dict[str, Any]
    runtime: Any
    calendar: BusinessCalendar
    store_factory: Any = None
    oidc: Any = None
    _store: Any = field(default=None, repr=False)
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def store(self) -> Any:
        if self._store is None:
            self._store = self.store_factory()
        return self._store

    @store.setter
    def store(self, value: Any) -> None:
        self._store = value

    def now(self) -> datetime:
        return self.runtime.clock()

    @property
    def token_mode(self) -> bool:
        return self.settings["login"] == "token"


def state() -> WorklistState:
    return current_app.extensions[STATE_KEY]


# ---------------------------------------------------------------------------------------------------------------
# Sessions and roles
# ---------------------------------------------------------------------------------------------------------------
def current_user() -> dict[str, str] | None:
    """The signed-in user (``name``, ``role``), or None when nobody is or the sign-in is older than
    ``session_minutes`` (an absolute limit, whatever the cookie's own refreshes)."""
    if "worklist_user" in g:  # asked several times per request (guard, page): the database once
        return g.worklist_user
    g.worklist_user = None
    name, role, login_at = session.get("user"), session.get("role"), session.get("login_at")
    session_id = session.get("sid")
    if not isinstance(name, str) or role not in (auth.ROLE_CODER, auth.ROLE_VIEWER) or not isinstance(
            login_at, int | float) or not isinstance(session_id, str):
        return None
    st = state()
    age = st.now().timestamp() - login_at
    if age > int(st.settings["session_minutes"]) * 60 or age < -300:
        return None
    if not auth.session_is_live(st.runtime.store.engine, session_id, now=st.now()):
        return None  # signed out (or revoked) elsewhere: this copy of the cookie is dead too
    g.worklist_user = {"name": name, "role": role}
    return g.worklist_user


def _sign_in(name: str, role: str) -> None:
    """A fresh session (nothing carried over from before sign-in: no session fixation)."""
    st = state()
    session.clear()
    session.permanent = True
    session["sid"] = auth.open_session(st.runtime.store.engine, now=st.now(),
                                       seconds=int(st.settings["session_minutes"]) * 60)
    session["user"] = name
    session["role"] = role
    session["login_at"] = int(st.now().timestamp())
    g.pop("worklist_user", None)


@bp.before_request
def _guard() -> Response | None:
    """``login: token`` serves loopback clients only; every page but sign-in needs a session: a GET goes to the
    sign-in page (remembering where it was going, in the session, never in the URL), anything else is 401."""
    st = state()
    if st.token_mode and not auth.is_loopback(request.remote_addr):
        log.info("worklist refused", extra={"event": "worklist-not-loopback"})
        abort(403, "The worklist is served to this machine only (login: token). Ask the administrator for the "
                   "sign-in address.")
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    if current_user() is None:
        if request.method in ("GET", "HEAD"):
            session["next"] = request.full_path if request.query_string else request.path
            return redirect(url_for("worklist.login"), code=303)
        abort(401, "You are not signed in (or your sign-in expired). Sign in and try again.")
    return None


def _require_coder() -> dict[str, str]:
    user = current_user()
    if user is None:
        abort(401, "You are not signed in.")
    if user["role"] != auth.ROLE_CODER:
        log.info("worklist action refused", extra={"event": "worklist-forbidden", "reason": "viewer"})
        abort(403, "Your role may read the worklist but not change it.")
    return user


def _check_csrf() -> None:
    try:
        validate_csrf(request.form.get("csrf_token"))
    except ValidationError as exc:
        log.info("worklist form refused", extra={"event": "worklist-csrf", "reason": "csrf"})
        raise CSRFError(f"The form's security token is missing or invalid ({exc}). Reload the page and try "
                        "again.") from None


# ---------------------------------------------------------------------------------------------------------------
# Query parameters
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ListQuery:
    filter: WorklistFilter
    sort: str
    descending: bool
    page: int
    size: int

    def params(self, **changes: Any) -> dict[str, str]:
        """The query string of this view with ``changes`` (a value of None drops the key): links keep filters."""
        f = self.filter
        values: dict[str, Any] = {
            "queue": f.queue, "practitioner": f.practitioner, "organization": f.organization, "payer": f.payer,
            "status": f.status, "class": f.audit_class,
            "from": f.received_from.isoformat() if f.received_from else None,
            "to": f.received_to.isoformat() if f.received_to else None,
            "assignee": f.assignee, "reviewed": "1" if f.include_reviewed else None,
            "sort": self.sort, "dir": "desc" if self.descending else "asc", "page": self.page, "size": self.size,
        }
        values.update(changes)
        return {key: str(value) for key, value in values.items() if value not in (None, "")}

    def url(self, endpoint: str = "worklist.index", **changes: Any) -> str:
        query = urlencode(self.params(**changes))
        return url_for(endpoint) + (f"?{query}" if query else "")


def _text(args: Mapping[str, str], name: str, pattern: re.Pattern[str] | None = None,
          choices: tuple[str, ...] | None = None, limit: int = 200) -> str | None:
    value = args.get(name, "").strip()
    if not value:
        return None
    if len(value) > limit or _CONTROL.search(value):
        raise BadParameter(name, f"is longer than {limit} characters or holds control characters")
    if choices is not None and value not in choices:
        raise BadParameter(name, f"“{value[:40]}” is not one of {', '.join(choices)}")
    if pattern is not None and not pattern.fullmatch(value):
        raise BadParameter(name, f"“{value[:40]}” does not have the expected form")
    return value


FIRST_YEAR, LAST_YEAR = 1900, 2199


def _date(args: Mapping[str, str], name: str) -> date | None:
    value = args.get(name, "").strip()
    if not value:
        return None
    try:
        if len(value) != 10:
            raise ValueError
        day = date.fromisoformat(value)
    except ValueError:
        raise BadParameter(name, f"“{value[:40]}” is not a date — write YYYY-MM-DD") from None
    # The queries add a day and convert to instants: a date at the edge of the calendar (9999-12-31) would
    # overflow there. No claim, deadline or filing date of this service falls outside these years.
    if not FIRST_YEAR <= day.year <= LAST_YEAR:
        raise BadParameter(name, f"“{value}” is outside the years {FIRST_YEAR}–{LAST_YEAR}")
    return day


def _int(args: Mapping[str, str], name: str, default: int, *, low: int, high: int) -> int:
    value = args.get(name, "").strip()
    if not value:
        return default
    if not value.isascii() or not value.isdigit() or len(value) > 9:
        raise BadParameter(name, f"“{value[:40]}” is not a whole number")
    number = int(value)
    if not low <= number <= high:
        raise BadParameter(name, f"{number} is out of range ({low} to {high})")
    return number


def parse_list_query(args: Mapping[str, str], *, default_size: int, allowed: tuple[str, ...] = LIST_PARAMETERS,
                     ) -> ListQuery:
    """The list's query string → a :class:`ListQuery`; unknown parameters and bad values raise
    :class:`BadParameter` (a typo must not silently show another view)."""
    for name in args:
        if name not in allowed:
            raise BadParameter(name, f"unknown parameter (allowed: {', '.join(allowed)})")
    queue = _text(args, "queue", choices=TABS) or DUE
    reviewed = _text(args, "reviewed", choices=("0", "1"))
    start, end = _date(args, "from"), _date(args, "to")
    if start and end and end < start:
        raise BadParameter("to", f"{end.isoformat()} is before from {start.isoformat()}")
    sort = _text(args, "sort", choices=SORT_KEYS) or "deadline"
    direction = _text(args, "dir", choices=("asc", "desc"))
    descending = DEFAULT_DESCENDING.get(sort, False) if direction is None else direction == "desc"
    size_text = _text(args, "size", choices=tuple(str(s) for s in PAGE_SIZES))
    flt = WorklistFilter(
        queue=queue,
        practitioner=_text(args, "practitioner", _REFERENCE["practitioner"]),
        organization=_text(args, "organization", _REFERENCE["organization"]),
        payer=_text(args, "payer", _PAYER),
        status=_text(args, "status", choices=STATUSES),
        audit_class=_text(args, "class", choices=tuple(QUEUE_OF_CLASS)),
        received_from=start,
        received_to=end,
        assignee=_text(args, "assignee", limit=MAX_ASSIGNEE),
        include_reviewed=reviewed == "1",
    )
    return ListQuery(filter=flt, sort=sort, descending=descending,
                     page=_int(args, "page", 1, low=1, high=MAX_PAGE),
                     size=int(size_text) if size_text else default_size)


# ---------------------------------------------------------------------------------------------------------------
# What a row shows
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Countdown:
    text: str
    overdue: bool
    hours: float


def countdown(item: WorklistItem, now: datetime, calendar: BusinessCalendar) -> Countdown | None:
    """Business hours to the reply deadline, or past it (the 24 business hours of billing-rules.md §7 are counted
    on the practice's calendar, so the countdown is too). Only rows still waiting for a reply (the due queue)."""
    if item.deadline is None or item.queue != DUE:
        return None
    if now >= item.deadline:
        hours = calendar.business_hours_between(item.deadline, now)
        whole = math.ceil(hours - 1e-9)
        return Countdown(f"overdue by {whole} business hour{'' if whole == 1 else 's'}", True, hours)
    hours = calendar.business_hours_between(now, item.deadline)
    whole = math.floor(hours + 1e-9)
    return Countdown(f"{whole} business hour{'' if whole == 1 else 's'} left" if whole >= 1
                     else "less than 1 business hour left",
                     False, hours)


def filing_days_left(deadline: date | None, now: datetime, tz: Any) -> int | None:
    """Days to Medicare's timely filing limit (12 months after the date of service, 42 CFR 424.44(a)); negative
    once past it."""
    if deadline is None:
        return None
    return (deadline - now.astimezone(tz).date()).days


def filing_text(days: int | None) -> str:
    if days is None:
        return "—"
    if days < 0:
        return f"expired {-days} day{'s' if days < -1 else ''} ago"
    if days == 0:
        return "last day today"
    return f"{days} day{'s' if days > 1 else ''} left"


def money(value: float | None) -> str:
    if value is None:
        return "—"
    return f"−${abs(value):,.2f}" if value < 0 else f"${value:,.2f}"


def code_text(item: WorklistItem) -> str:
    if not item.code:
        return "—"
    return "-".join((item.code, *item.modifiers))


def local_time(value: datetime | None, tz: Any) -> str:
    if value is None:
        return "—"
    return value.astimezone(tz).strftime("%Y-%m-%d %H:%M")


_BOLD = re.compile(r"\*\*(.+?)\*\*")


def render_markdown(text: str | None) -> Markup:
    """A card's Markdown detail as safe HTML: paragraphs, ``-``/``*`` bullet lists and ``**bold**`` only. The
    text is escaped first, so card text (or anything injected into it) can never be HTML (CDS Hooks "Card
    attributes": detail is GitHub Flavored Markdown; a client may render a subset)."""
    if not text:
        return Markup("")
    blocks: list[str] = []
    paragraph: list[str] = []
    bullets: list[str] = []

    def inline(line: str) -> str:
        escaped = str(escape(_CONTROL.sub("\ufffd", line)))
        return _BOLD.sub(lambda m: f"<strong>{m.group(1)}</strong>", escaped)

    def close() -> None:
        if paragraph:
            blocks.append("<p>" + "<br>".join(inline(line) for line in paragraph) + "</p>")
            paragraph.clear()
        if bullets:
            blocks.append("<ul>" + "".join(f"<li>{inline(b)}</li>" for b in bullets) + "</ul>")
            bullets.clear()

    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if not line:
            close()
        elif line[:2] in ("- ", "* "):
            if paragraph:
                close()
            bullets.append(line[2:].strip())
        else:
            if bullets:
                close()
            paragraph.append(line)
    close()
    return Markup("".join(blocks))


# ---------------------------------------------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------------------------------------------
def _page(template: str, status: int = 200, **context: Any) -> Response:
    st = state()
    user = current_user() if session else None
    body = render_template(template, user=user, token_mode=st.token_mode, csrf_token=generate_csrf,
                           queue_labels=QUEUE_LABELS, **context)
    return Response(body, status=status, mimetype="text/html")


@bp.get("/")
def index() -> Response:
    st = state()
    query = parse_list_query(request.args, default_size=int(st.settings["page_size"]))
    now = st.now()
    page = st.store.page(query.filter, sort=query.sort, descending=query.descending, page=query.page,
                         page_size=query.size, now=now)
    tz = st.calendar.tz
    rows = []
    for item in page.items:
        days = filing_days_left(item.timely_filing_deadline, now, tz)
        rows.append({"item": item, "countdown": countdown(item, now, st.calendar), "code": code_text(item),
                     "amount": money(item.estimated_amount), "filing": filing_text(days), "filing_days": days,
                     "received": local_time(item.received, tz)})
    pages = max(1, math.ceil(page.total / query.size)) if page.total else 1
    return _page("worklist/list.html", query=query, page=page, rows=rows, pages=pages, tabs=TABS,
                 facets=st.store.facets(), statuses=STATUSES, classes=tuple(QUEUE_OF_CLASS),
                 sort_labels=SORT_LABELS, page_sizes=PAGE_SIZES, now=local_time(now, tz))


@bp.get("/item/<item_id>")
def detail(item_id: str) -> Response:
    st = state()
    found = _detail(item_id)
    now = st.now()
    tz = st.calendar.tz
    user = current_user()
    nonces = {}
    if user and user["role"] == auth.ROLE_CODER:
        nonces = {form: st.store.issue_nonce(now=now) for form in ("review", "assign", "note", "reopen")}
    item = found.item
    days = filing_days_left(item.timely_filing_deadline, now, tz)
    return _page("worklist/detail.html", detail=found, item=item, countdown=countdown(item, now, st.calendar),
                 code=code_text(item), amount=money(item.estimated_amount), filing=filing_text(days),
                 filing_days=days, card_detail=render_markdown(found.card_detail), nonces=nonces,
                 reasons=st.reasons, local_time=lambda v: local_time(v, tz),
                 facets=st.store.facets() if nonces else {})


def _detail(item_id: str) -> ItemDetail:
    if not _ITEM_ID.fullmatch(item_id):
        raise BadParameter("item id", "is not an item id (letters, digits, - and _, at most 64)")
    found = state().store.detail(item_id)
    if found is None:
        abort(404, "No worklist item has this id.")
    return found


def _form_text(name: str, *, limit: int, required: bool = False) -> str | None:
    value = request.form.get(name, "")
    value = value.replace("\r\n", "\n").strip()
    if not value:
        if required:
            raise BadParameter(name, "is required")
        return None
    if len(value) > limit:
        raise BadParameter(name, f"is longer than {limit} characters")
    if _CONTROL.sub("", value.replace("\t", " ")) != value.replace("\t", " "):
        raise BadParameter(name, "holds control characters")
    return value


def _act(item_id: str, action: str, fields: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], str],
         ) -> Response:
    """The steps every action shares: the coder role (403), the CSRF token (400), the fields (400), the one-time
    nonce (409; consumed only once the fields are valid, so a typo does not burn the form), the store, then
    POST/redirect/GET (HTTP 303, RFC 9110 §15.4.4) with a flash message."""
    user = _require_coder()
    _check_csrf()
    if not _ITEM_ID.fullmatch(item_id):
        raise BadParameter("item id", "is not an item id")
    values = fields()
    st = state()
    now = st.now()
    nonce = request.form.get("nonce", "")
    if not nonce or len(nonce) > 200 or not st.store.consume_nonce(
            nonce, max_age_seconds=int(st.settings["session_minutes"]) * 60, now=now):
        log.info("worklist form refused", extra={"event": "worklist-replay", "reason": "nonce"})
        abort(409, "This form was already submitted (or is too old). Reload the page to see the current state.")
    try:
        st.store.act(item_id, actor=user["name"], action=action, at=now, **values)
    except KeyError:
        abort(404, "No worklist item has this id.")
    except ValueError as exc:
        raise BadParameter(action, str(exc)) from None
    log.info("worklist action", extra={"event": "worklist-action", "reason": action})
    flash(done(values))
    return redirect(url_for("worklist.detail", item_id=item_id), code=303)


def _review_fields() -> dict[str, Any]:
    reason = _form_text("reason", limit=100, required=True)
    if reason not in state().reasons:
        raise BadParameter("reason", "is not one of the override reasons")
    comment = _form_text("comment", limit=MAX_NOTE)
    if reason == "other" and not comment:
        raise BadParameter("comment", 'is required with the reason "Other"')
    return {"reason": reason, "note": comment}


def _assign_fields() -> dict[str, Any]:
    assignee = _form_text("assignee", limit=MAX_ASSIGNEE)
    if assignee and "\n" in assignee:
        raise BadParameter("assignee", "is one line")
    return {"assignee": assignee}


@bp.post("/item/<item_id>/review")
def review(item_id: str) -> Response:
    return _act(item_id, ACTION_REVIEW, _review_fields, lambda v: "Marked reviewed.")


@bp.post("/item/<item_id>/assign")
def assign(item_id: str) -> Response:
    return _act(item_id, ACTION_ASSIGN, _assign_fields,
                lambda v: f"Assigned to {v['assignee']}." if v["assignee"] else "Unassigned.")


@bp.post("/item/<item_id>/note")
def note(item_id: str) -> Response:
    return _act(item_id, ACTION_NOTE, lambda: {"note": _form_text("note", limit=MAX_NOTE, required=True)},
                lambda v: "Note added.")


@bp.post("/item/<item_id>/reopen")
def reopen(item_id: str) -> Response:
    return _act(item_id, ACTION_REOPEN, dict, lambda v: "Reopened.")


def neutralise(value: Any) -> str | int | float:
    """A value as a CSV cell: text that a spreadsheet would run as a formula gets a leading apostrophe (OWASP
    "CSV Injection"); numbers stay numbers."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return value
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        value = " ".join(str(v) for v in value)
    text = str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def csv_lines(rows: Iterator[Mapping[str, Any]], columns: tuple[str, ...] = ()) -> Iterator[str]:
    """The rows as CSV text (RFC 4180: CRLF line ends, quoted where needed), header first, one line at a time;
    ``columns`` is the header of an empty view (else the first row's keys)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header: list[str] | None = None
    for row in rows:
        if header is None:
            header = list(row)
            writer.writerow([neutralise(h) for h in header])
        writer.writerow([neutralise(row.get(key)) for key in header])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if header is None:
        writer.writerow(columns)
        yield buffer.getvalue()


@bp.get("/export.csv")
def export_csv() -> Response:
    st = state()
    query = parse_list_query(request.args, default_size=int(st.settings["page_size"]))
    now = st.now()
    rows = st.store.export(query.filter, sort=query.sort, descending=query.descending, now=now)
    first = next(rows, None)  # errors of the query surface here, before the 200 is sent

    def chained() -> Iterator[Mapping[str, Any]]:
        if first is not None:
            yield first
            yield from rows

    name = f"worklist-{query.filter.queue}-{now.astimezone(st.calendar.tz).date().isoformat()}.csv"
    from .store import EXPORT_COLUMNS

    response = Response(stream_with_context(csv_lines(chained(), EXPORT_COLUMNS)), mimetype="text/csv")
    response.headers["Content-Type"] = "text/csv; charset=utf-8"
    response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


@bp.get("/analytics")
def analytics() -> Response:
    st = state()
    for name in request.args:
        if name not in ("from", "to"):
            raise BadParameter(name, "unknown parameter (allowed: from, to)")
    since, until = _date(request.args, "from"), _date(request.args, "to")
    if since and until and until < since:
        raise BadParameter("to", f"{until.isoformat()} is before from {since.isoformat()}")
    numbers = st.store.analytics(since=since, until=until)
    return _page("worklist/analytics.html", figures=charts.figures(numbers, st.reasons),
                 since=since.isoformat() if since else "", until=until.isoformat() if until else "")


# ---------------------------------------------------------------------------------------------------------------
# Sign-in
# ---------------------------------------------------------------------------------------------------------------
def _after_login() -> Response:
    target = session.pop("next", None)
    if not (isinstance(target, str) and target.startswith(auth.PREFIX + "/") and not target.startswith("//")):
        target = url_for("worklist.index")
    return redirect(target, code=303)


@bp.get("/login")
def login() -> Response:
    st = state()
    for name in request.args:
        if name != "token":
            raise BadParameter(name, "unknown parameter")
    token = request.args.get("token")
    if token is not None:
        return _token_login(token)
    if current_user() is not None:
        return redirect(url_for("worklist.index"), code=303)
    if st.token_mode:
        return _page("worklist/login.html")
    redirect_uri = st.settings["oidc"].get("redirect_uri") or url_for("worklist.callback", _external=True)
    try:
        return st.oidc.authorize_redirect(redirect_uri)
    except Exception as exc:  # discovery failed: the provider is down or misconfigured
        log.warning("oidc discovery failed", extra={"event": "worklist-oidc-error", "error_type": type(exc).__name__})
        abort(503, "The sign-in provider cannot be reached. Try again in a minute.")


@bp.post("/login")
def login_post() -> Response:
    st = state()
    if not st.token_mode:
        abort(405)
    _check_csrf()
    return _token_login(request.form.get("token", ""))


def _token_login(token: str) -> Response:
    st = state()
    if not st.token_mode:
        raise BadParameter("token", "this server signs in with OpenID Connect, not with a token")
    if not auth.consume_login_token(st.runtime.store.engine, token.strip(), now=st.now()):
        log.info("worklist sign-in refused", extra={"event": "worklist-login-failed", "reason": "token"})
        return _page("worklist/login.html", status=403,
                     error="This sign-in token is not valid: it was already used, has expired (after 15 minutes) "
                           "or was mistyped. Restart the server for a new one.")
    target = session.get("next")
    _sign_in("operator", auth.ROLE_CODER)
    if target:
        session["next"] = target
    log.info("worklist sign-in", extra={"event": "worklist-login", "reason": "token"})
    return _after_login()


@bp.get("/auth/callback")
def callback() -> Response:
    st = state()
    if st.token_mode:
        abort(404)
    try:
        token = st.oidc.authorize_access_token()
        claims = auth.claims_of(token)
    except Exception as exc:  # OAuthError, MismatchingStateError, JoseError, PermissionError, network errors
        log.info("worklist sign-in refused", extra={"event": "worklist-login-failed",
                                                    "error_type": type(exc).__name__})
        session.clear()
        abort(400, "Sign-in failed (the provider's answer could not be verified). Start again from the sign-in "
                   "page.")
    oidc = st.settings["oidc"]
    claims = auth.with_userinfo(claims, st.oidc, str(oidc.get("roles_claim") or "roles"))
    role = auth.role_for(claims, oidc)
    target = session.get("next")
    if role is None:
        session.clear()
        log.info("worklist sign-in refused", extra={"event": "worklist-login-failed", "reason": "no-role"})
        abort(403, "You are signed in at the provider, but your account has no worklist role (coder or viewer). "
                   "Ask the administrator for access.")
    _sign_in(auth.user_name(claims), role)
    if target:
        session["next"] = target
    log.info("worklist sign-in", extra={"event": "worklist-login", "reason": role})
    return _after_login()


@bp.post("/logout")
def logout() -> Response:
    _check_csrf()
    st = state()
    auth.close_session(st.runtime.store.engine, str(session.get("sid") or ""), now=st.now())
    session.clear()
    g.pop("worklist_user", None)
    # A page, not a redirect to the sign-in page: with OIDC that page redirects on to the provider, and the CSP's
    # form-action 'self' applies to every redirect a form submission follows (CSP Level 3, form-action), so the
    # browser would block the sign-out itself. A link to sign in again is a navigation, which form-action leaves alone.
    return _page("worklist/signed_out.html")


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------
ERROR_TITLES = {400: "Bad request", 401: "Not signed in", 403: "Not allowed", 404: "Not found",
                405: "Method not allowed", 409: "Already done", 413: "Too large", 500: "Internal error",
                503: "Unavailable"}


def error_response(status: int, message: str) -> Response:
    """An HTML error page for /worklist (the CDS Hooks API answers OperationOutcomes; people get pages)."""
    try:
        body = render_template("worklist/error.html", status=status, title=ERROR_TITLES.get(status, "Error"),
                               message=message, user=current_user() if session else None,
                               csrf_token=generate_csrf, queue_labels=QUEUE_LABELS)
    except Exception:  # a page about an error must not fail itself
        body = f"<!doctype html><title>{status}</title><p>{escape(message)}</p>"
    return Response(body, status=status, mimetype="text/html")


def http_error_page(error: HTTPException) -> Response:
    status = error.code or 500
    default = {404: "There is no page at this address.", 405: "This address does not take this method."}
    description = error.description if isinstance(error.description, str) else ""
    generic = description.startswith(("The requested URL", "The method is not allowed", "The server could not",
                                      "The browser (or proxy)", "The CSRF"))
    message = default.get(status, error.name) if not description or (generic and status in default) else description
    response = error_response(status, message)
    if status == 405 and getattr(error, "valid_methods", None):
        response.headers["Allow"] = ", ".join(error.valid_methods or ())
    return response


@bp.errorhandler(BadParameter)
def _bad_parameter(error: BadParameter) -> Response:
    return error_response(400, f"{error.name}: {error.message}")


@bp.errorhandler(CSRFError)
def _csrf_error(error: CSRFError) -> Response:
    return error_response(400, str(error.description))


@bp.errorhandler(HTTPException)
def _http_error(error: HTTPException) -> Response:
    return http_error_page(error)


def register_security_headers(app: Flask) -> None:
    """Headers on every /worklist response, errors included (OWASP Secure Headers Project): no inline script and
    stylesheets from this origin only (CSP Level 3), no framing, no Referer (the URL may hold filters), no
    caching of pages that show billing data."""

    @app.after_request
    def _worklist_headers(response: Response) -> Response:
        path = request.path
        if path == auth.PREFIX or path.startswith(auth.PREFIX + "/"):
            headers = response.headers
            headers["Content-Security-Policy"] = (
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
            headers["X-Frame-Options"] = "DENY"
            headers["Referrer-Policy"] = "no-referrer"
            headers["X-Content-Type-Options"] = "nosniff"
            headers["Cache-Control"] = "no-store"
        return response
