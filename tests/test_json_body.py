"""The request body's decoder (issue 13): orjson as the fast path, the stdlib as the strict one.

``decode_json_body`` must give exactly what the stdlib path gives — the same document, with ints staying ints —
or the same 400 with the same message, for any bytes. Properties over generated JSON (with and without ``\\u``
escapes, unpaired surrogates, big integers, byte order marks) and over mutated bytes; then through the hook
endpoint, a body nested around both decoders' depth limits is an answer or a 400, never a 500.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.app import create_app, decode_json_body, runtime_of, strict_json_body
from cds_service.config import Config
from cds_service.web.errors import ApiError

BOM = b"\xef\xbb\xbf"

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(codec="utf-8"), max_size=12),
    st.text(max_size=6),  # may hold unpaired surrogates: escaped on the way out, refused on the way in
)
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)), max_leaves=25)


def _typed(value: Any) -> Any:
    """A structure equal only to one with the same values *and* the same scalar types (1 != 1.0 != True)."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return type(value).__name__, value


def _outcome(decode: Callable[[bytes], Any], raw: bytes) -> tuple[str, Any]:
    try:
        return "ok", _typed(decode(raw))
    except ApiError as exc:
        return "error", (exc.status, str(exc))


def _strict(raw: bytes) -> Any:
    return strict_json_body(raw[len(BOM):] if raw.startswith(BOM) else raw)


def _encodings(document: Any) -> Iterator[bytes]:
    yield json.dumps(document, ensure_ascii=True).encode("ascii")
    with contextlib.suppress(UnicodeEncodeError):  # a lone surrogate cannot be written as UTF-8 at all
        yield json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents, st.booleans())
def test_both_decoders_agree_on_generated_documents(document: Any, bom: bool) -> None:
    for raw in _encodings(document):
        raw = BOM + raw if bom else raw
        assert _outcome(decode_json_body, raw) == _outcome(_strict, raw)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents, st.data())
def test_both_decoders_agree_on_mutated_bytes(document: Any, data: st.DataObject) -> None:
    raw = bytearray(json.dumps(document).encode("ascii"))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw)))
        raw[at:at + data.draw(st.integers(0, 2))] = data.draw(st.sampled_from(
            [b"", b"NaN", b"-Infinity", b"1e999", b"\\ud800", b"\xed\xa0\x80", b"\xff", b"12345678901234567890",
             b'"', b",", b"]", b"}", b"{", b"[", b"\x00", b"\t", b"0.5e-400", b"-0"]))
    assert _outcome(decode_json_body, bytes(raw)) == _outcome(_strict, bytes(raw))


@pytest.mark.parametrize(("raw", "problem"), [
    (b'{"a": NaN}', "not valid JSON"),
    (b'{"a": 1e999}', "not valid JSON"),
    (b'{"a": "\\ud800"}', "unpaired UTF-16 surrogate"),
    (b'{"a": "\xed\xa0\x80"}', "not valid UTF-8"),
    (BOM + BOM + b"{}", "not valid JSON"),
    (b"{} {}", "not valid JSON"),
])
def test_each_refusal_keeps_its_message(raw: bytes, problem: str) -> None:
    with pytest.raises(ApiError, match=problem) as caught:
        decode_json_body(raw)
    assert caught.value.status == 400


def test_integers_beyond_64_bits_stay_integers() -> None:
    """orjson reads them as floats; the stdlib path keeps them exact."""
    assert decode_json_body(b'{"n": 123456789012345678901234567890}') == {"n": 123456789012345678901234567890}
    assert type(decode_json_body(b'{"n": 18446744073709551616}')["n"]) is int


@pytest.fixture
def app(make_config: Callable[..., Config]) -> Iterator[Flask]:
    application = create_app(make_config())
    yield application
    runtime_of(application).close()  # its log writer thread would outlive the test (and set the process's gauges)


def test_a_request_nested_around_the_decoders_limits_is_an_answer_or_400(app: Flask) -> None:
    """orjson reads up to 1024 levels, the stdlib about 1000 less the stack in use: between the two a body now
    decodes where it used to be refused, and what reads it next must cope."""
    request = json.loads(resources.files("fhir_fixtures").joinpath("requests/encounter-discharge.json")
                         .read_text("utf-8"))
    client = app.test_client()
    marker = '"__deep__"'
    texts = {
        "context": json.dumps(request).replace('"context": {', f'"context": {{"xDeep": {marker}, ', 1),
        "prefetch": json.dumps(request).replace('"prefetch": {', f'"prefetch": {{"deep": {marker}, ', 1),
        "top level": json.dumps(request)[:-1] + f', "extension": {marker}}}',
    }
    for depth in (900, 995, 1010, 1023, 1030):
        for where, text in texts.items():
            assert marker in text
            raw = text.replace(marker, "[" * depth + "]" * depth).encode()
            response = client.post("/cds-services/g2250-encounter-discharge", data=raw,
                                   headers={"Content-Type": "application/json"})
            assert response.status_code in (200, 400, 412), (depth, where, response.status_code)


def test_feedback_nested_around_the_decoders_limits_is_400(app: Flask) -> None:
    client = app.test_client()
    for depth in (995, 1010, 1023, 1030):
        raw = b'{"feedback": ' + b"[" * depth + b"]" * depth + b"}"
        response = client.post("/cds-services/g2250-encounter-discharge/feedback", data=raw,
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (depth, response.status_code)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=5), documents, max_size=4))
def test_answers_are_written_as_the_stdlib_would_read_them(document: dict[str, Any]) -> None:
    """orjson writes the answer; whatever it cannot write (integers beyond 64 bits) the stdlib does."""
    from cds_service.app import _json_response

    app = Flask("answers")
    with app.app_context():
        response = _json_response(document)
    body = response.get_data()
    assert response.mimetype == "application/json"
    try:
        expected = json.loads(json.dumps(document, ensure_ascii=False))
    except UnicodeEncodeError:
        return
    assert _typed(json.loads(body)) == _typed(expected)
