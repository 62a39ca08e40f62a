"""Feedback endpoint through HTTP, persisted on SQLite (default) and PostgreSQL, idempotent for repeats."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask.testing import FlaskClient

from cds_service.app import create_app, runtime_of
from cds_service.config import Config
from cds_service.store import FeedbackStore

URL = "/cds-services/g2250-encounter-discharge/feedback"


def _item(card: str = "card-uuid-1", outcome: str = "accepted", **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"card": card, "outcome": outcome, "outcomeTimestamp": "2026-11-30T15:10:00Z"}
    if outcome == "accepted":
        item["acceptedSuggestions"] = [{"id": "suggestion-uuid-1"}]
    item.update(extra)
    return item


OVERRIDDEN = _item("card-uuid-2", "overridden", overrideReason={
    "reason": {"system": "https://g2250-cds.example.org/override-reason", "code": "unrelated-visit",
               "display": "Visit was unrelated"},
    "userComment": "booked for a different problem",
})


def _exercise(client: FlaskClient, store: FeedbackStore) -> None:
    response = client.post(URL, json={"feedback": [_item(), OVERRIDDEN]})
    assert response.status_code == 200
    assert store.count() == 2
    # The EHR retries: the same items again are not stored twice.
    assert client.post(URL, json={"feedback": [_item(), OVERRIDDEN]}).status_code == 200
    assert store.count() == 2
    rows = store.feedback_for_card("card-uuid-2")
    assert len(rows) == 1
    assert rows[0]["outcome"] == "overridden"
    assert rows[0]["override_code"] == "unrelated-visit"
    assert rows[0]["service_id"] == "g2250-encounter-discharge"
    accepted = store.feedback_for_card("card-uuid-1")[0]
    assert accepted["accepted_suggestions"] == '["suggestion-uuid-1"]'
    # A later, different outcome for the same card is new information and is kept.
    later = _item(outcomeTimestamp="2026-11-30T16:00:00Z")
    assert client.post(URL, json={"feedback": [later]}).status_code == 200
    assert len(store.feedback_for_card("card-uuid-1")) == 2


def test_feedback_on_sqlite(client: FlaskClient) -> None:
    store = runtime_of(client.application).store
    assert store.engine.url.get_backend_name() == "sqlite"
    _exercise(client, store)


@pytest.mark.postgres
def test_feedback_on_postgresql(make_config: Callable[..., Config], postgres_url: str) -> None:
    app = create_app(make_config({"database_url": postgres_url}))
    try:
        store = runtime_of(app).store
        assert store.engine.url.get_backend_name() == "postgresql"
        _exercise(app.test_client(), store)
    finally:
        runtime_of(app).close()


@pytest.mark.postgres
def test_feedback_shared_between_two_instances_on_postgresql(make_config: Callable[..., Config],
                                                             postgres_url: str) -> None:
    first = create_app(make_config({"database_url": postgres_url}))
    second = create_app(make_config({"database_url": postgres_url}))
    try:
        assert first.test_client().post(URL, json={"feedback": [_item()]}).status_code == 200
        assert second.test_client().post(URL, json={"feedback": [_item()]}).status_code == 200
        assert runtime_of(second).store.count() == 1
    finally:
        runtime_of(first).close()
        runtime_of(second).close()


@pytest.mark.parametrize(("body", "element"), [
    ({}, "feedback"),
    ({"feedback": []}, "feedback"),
    ({"feedback": [{"outcome": "accepted", "outcomeTimestamp": "2026-11-30T15:10:00Z"}]}, "feedback[0].card"),
    ({"feedback": [_item(outcome="maybe")]}, "feedback[0].outcome"),
    ({"feedback": [{"card": "c", "outcome": "accepted"}]}, "feedback[0].outcomeTimestamp"),
    ({"feedback": [_item(outcomeTimestamp="yesterday")]}, "feedback[0].outcomeTimestamp"),
])
def test_invalid_feedback_is_400(client: FlaskClient, body: dict[str, Any], element: str) -> None:
    response = client.post(URL, json=body)
    assert response.status_code == 400
    issue = response.get_json(force=True)["issue"][0]
    assert element in issue["expression"], issue
    assert runtime_of(client.application).store.count() == 0


def test_feedback_ignores_unknown_elements(client: FlaskClient) -> None:
    response = client.post(URL, json={"feedback": [_item(futureElement=1)], "other": True})
    assert response.status_code == 200


def test_concurrent_schema_creation_is_harmless(tmp_path: Any) -> None:
    """Workers starting together on a fresh database race to create the tables; none may fail to boot."""
    import threading

    url = f"sqlite:///{tmp_path / 'race.db'}"
    stores = [FeedbackStore(url) for _ in range(6)]
    errors: list[BaseException] = []

    def create(store: FeedbackStore) -> None:
        try:
            store.create_schema()
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert stores[0].count() == 0
    for store in stores:
        store.dispose()


def test_feedback_that_cannot_be_stored_answers_503_with_retry_after(make_config: Callable[..., Config],
                                                                     tmp_path: Any) -> None:
    """Never a 500: the database is down, so the EHR is told to retry — and the retry stores each item once."""
    database = tmp_path / "feedback.db"
    app = create_app(make_config({"database_url": f"sqlite:///{database}"}))
    store = runtime_of(app).store
    client = app.test_client()
    try:
        original = store.engine
        store.engine = FeedbackStore("postgresql+psycopg://postgres@127.0.0.1:1/nothing").engine  # down
        response = client.post(URL, json={"feedback": [_item(), OVERRIDDEN]})
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
        assert response.get_json()["issue"][0]["code"] == "transient"
        store.engine.dispose()
        store.engine = original  # the database is back: the EHR retries, twice
        assert client.post(URL, json={"feedback": [_item(), OVERRIDDEN]}).status_code == 200
        assert client.post(URL, json={"feedback": [_item(), OVERRIDDEN]}).status_code == 200
        assert store.count() == 2
        assert "g2250_feedback_unavailable_total" in client.get("/metrics").get_data(as_text=True)
    finally:
        runtime_of(app).close()
