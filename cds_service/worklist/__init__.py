"""The billing worklist (issue 15): a server-rendered Flask blueprint under ``/worklist`` for coders and revenue
staff — queues, filters, per-row detail, actions with an audit trail, CSV export and analytics plots — reading
the worklist tables through :class:`~cds_service.worklist.store.WorklistStore`, never the EHR.

``init_app(app, runtime)`` registers it (``create_app`` calls it); ``auth.issue_login_token`` and
``auth.login_url`` give ``g2250-cds serve`` the one-time sign-in address it prints in ``login: token`` mode.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Request

from . import auth
from .auth import issue_login_token, login_url

__all__ = ["handles", "init_app", "issue_login_token", "login_url"]


def init_app(app: Flask, runtime: Any, *, store: Any = None) -> None:
    """Register the worklist on ``app`` when ``worklist.enabled`` (the default): the blueprint, its session
    cookie, the security headers, and (``login: oidc``) the OpenID Connect client.

    ``runtime`` supplies the config, the clock (``create_app(clock=...)``), the database engine and the practice
    calendar; ``store`` replaces the :class:`WorklistStore` built on that engine (tests)."""
    from . import views

    config = runtime.config
    settings = config.worklist
    if not settings.get("enabled", True):
        return
    auth.configure_sessions(app, config)

    def build_store() -> Any:
        from .store import WorklistStore

        return WorklistStore(runtime.store.engine, tz=runtime.env.calendar.tz)

    state = views.WorklistState(config=config, settings=settings, runtime=runtime, calendar=runtime.env.calendar,
                                store_factory=build_store, reasons=_override_reasons())
    if store is not None:
        state.store = store
    if settings["login"] == "oidc":
        state.oidc = auth.register_oidc(app, config)
    app.extensions[views.STATE_KEY] = state
    app.register_blueprint(views.bp)
    views.register_security_headers(app)


def handles(app: Flask, request: Request) -> bool:
    """Whether this request is the worklist's (so errors are HTML pages, not the API's OperationOutcomes)."""
    from .views import STATE_KEY

    path = request.path
    return STATE_KEY in app.extensions and (path == auth.PREFIX or path.startswith(auth.PREFIX + "/"))


def error_page(error: Exception) -> Any:
    """The HTML page for an error under /worklist: an HTTP error's own status, anything else a 500."""
    from werkzeug.exceptions import HTTPException

    from .views import error_response, http_error_page

    if isinstance(error, HTTPException):
        return http_error_page(error)
    return error_response(500, "Something went wrong on our side. The request id is in the X-Request-Id header.")


def _override_reasons() -> dict[str, str]:
    """The cards' override reasons (hooks/card_texts.json): the reasons a coder may give for "mark reviewed"."""
    from hooks.cards import texts

    return dict(texts()["override_reasons"])
