"""Wire validation with our own JSON Schemas (no official CDS Hooks 2.0 schema exists).

Inbound documents are validated leniently (unknown elements are ignored by the schemas); outbound documents are
held to the strict response schema plus a recursive check for empty values, which JSON Schema cannot say once
for every element.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import jsonschema


@cache
def schema(name: str) -> dict[str, Any]:
    return json.loads(resources.files("cds_service").joinpath(f"schemas/{name}.schema.json").read_text("utf-8"))


@cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema(name))
    return cls(schema(name))


def _pointer(error: jsonschema.ValidationError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    if error.validator in ("required", "dependentRequired") and error.message.startswith("'"):
        missing = error.message.split("'")[1]
        path = f"{path}.{missing}" if path else missing
    return path or "(root)"


def _describe(error: jsonschema.ValidationError) -> str:
    # Messages built from the schema, not the instance: request values may be PHI.
    kind = error.validator
    if kind in ("required", "dependentRequired"):
        return "is required"
    if kind == "type":
        return f"must be of type {error.validator_value}"
    if kind == "enum":
        return "must be one of " + ", ".join(map(str, error.validator_value))
    if kind in ("minLength", "minItems", "minProperties"):
        return "must not be empty"
    if kind in ("maxLength", "maxItems"):
        return f"is too long (at most {error.validator_value})"
    if kind == "pattern":
        return "has an invalid format"
    return f"is invalid ({kind})"


_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
_ANNOTATIONS = frozenset({"$schema", "$id", "title", "description", "$comment"})


class _Unsupported(Exception):
    pass


def _compile(node: dict[str, Any]) -> Callable[[Any], bool]:
    """A yes/no check for a schema written with a small keyword set (type, required, properties, minLength,
    maxLength, pattern, minimum, dependentRequired); :class:`_Unsupported` for anything else."""
    unknown = set(node) - _ANNOTATIONS - {"type", "required", "properties", "minLength", "maxLength", "pattern",
                                          "minimum", "dependentRequired"}
    if unknown:
        raise _Unsupported(", ".join(sorted(unknown)))
    checks: list[Callable[[Any], bool]] = []
    if "type" in node:
        kinds = [node["type"]] if isinstance(node["type"], str) else list(node["type"])
        tests = [_TYPES[k] for k in kinds]
        checks.append(lambda v: any(t(v) for t in tests))
    required = tuple(node.get("required", ()))
    if required:
        checks.append(lambda v: not isinstance(v, dict) or all(k in v for k in required))
    properties = {k: _compile(sub) for k, sub in node.get("properties", {}).items()}
    if properties:
        checks.append(lambda v: not isinstance(v, dict) or all(c(v[k]) for k, c in properties.items() if k in v))
    dependent = {k: tuple(v) for k, v in node.get("dependentRequired", {}).items()}
    if dependent:
        checks.append(lambda v: not isinstance(v, dict) or all(
            all(r in v for r in needs) for k, needs in dependent.items() if k in v))
    if "minLength" in node or "maxLength" in node:
        lo, hi = node.get("minLength", 0), node.get("maxLength", math.inf)
        checks.append(lambda v: not isinstance(v, str) or lo <= len(v) <= hi)
    if "pattern" in node:
        pattern = re.compile(node["pattern"])
        checks.append(lambda v: not isinstance(v, str) or pattern.search(v) is not None)
    if "minimum" in node:
        minimum = node["minimum"]
        checks.append(lambda v: isinstance(v, bool) or not isinstance(v, (int, float)) or not v < minimum)
    return lambda v: all(check(v) for check in checks)


@cache
def _quick_check(name: str) -> Callable[[Any], bool] | None:
    """The schema as one compiled yes/no check when it uses only the keywords :func:`_compile` knows (the
    request schema does): a valid request, the common case, then costs a few microseconds instead of a full
    jsonschema pass. Any other answer goes through jsonschema, which names what is wrong."""
    try:
        return _compile(schema(name))
    except _Unsupported:
        return None


def problems(name: str, document: Any) -> list[tuple[str, str]]:
    """``(element path, what is wrong)`` for each violation, most specific first, PHI-free."""
    quick = _quick_check(name)
    if quick is not None and quick(document):
        return _value_problems(name, document)
    found = []
    try:
        for error in _validator(name).iter_errors(document):
            leaves = [error]
            if error.context:
                leaves = sorted(error.context, key=lambda e: -len(e.absolute_path))[:1]
            for leaf in leaves:
                found.append((_pointer(leaf), _describe(leaf)))
    except RecursionError:  # jsonschema descends recursively: a document nested ~1000 deep is refused as such
        return [("(root)", "is nested too deeply")]
    return sorted(set(found) | set(_value_problems(name, document)))


# RFC 6749 §A.12 allows an access token any VSCHAR (0x20-0x7E); it travels as the one credential of an
# "Authorization: Bearer" header (RFC 6750 §2.1), so it cannot hold a space, a control character or anything
# outside ASCII (an HTTP header is not text in another encoding).
_HEADER_TOKEN = re.compile(r"[\x21-\x7e]+")


def _value_problems(name: str, document: Any) -> list[tuple[str, str]]:
    """What JSON Schema cannot say about a request's values: ``fhirServer`` must parse as an absolute http(s) URL
    with a host (RFC 3986; CDS Hooks 2.0 "fhirServer: the base URL of the CDS Client's FHIR server"), and the
    access token must be sendable in an HTTP header. Checked before any connection; values never echoed."""
    if name != "cds-request" or not isinstance(document, dict):
        return []
    found: list[tuple[str, str]] = []
    server = document.get("fhirServer")
    if isinstance(server, str) and not _is_http_url(server):
        found.append(("fhirServer", "must be an absolute http(s) URL with a host"))
    authorization = document.get("fhirAuthorization")
    token = authorization.get("access_token") if isinstance(authorization, dict) else None
    if isinstance(token, str) and token and not _HEADER_TOKEN.fullmatch(token):
        found.append(("fhirAuthorization.access_token",
                      "must be visible ASCII characters only (sent in an Authorization header, RFC 6750 section 2.1)"))
    return found


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError:  # e.g. "http://[::1/fhir": an unclosed IPv6 literal
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def empty_values(document: Any, path: str = "") -> list[str]:
    """Paths of ``null``, ``""``, ``[]`` or ``{}`` anywhere, except the top-level ``cards: []``."""
    found: list[str] = []
    if document is None or document == "" or document == [] or document == {}:
        if path != "cards":
            found.append(path or "(root)")
        return found
    if isinstance(document, dict):
        for key, value in document.items():
            found.extend(empty_values(value, f"{path}.{key}" if path else key))
    elif isinstance(document, list):
        for i, value in enumerate(document):
            found.extend(empty_values(value, f"{path}[{i}]"))
    return found


def outbound_problems(name: str, document: Any) -> list[str]:
    """Everything wrong with a response we are about to send (strict schema + no empty values)."""
    return [f"{p}: {m}" for p, m in problems(name, document)] + [f"{p}: empty value" for p in empty_values(document)]


def card_problems(response: dict[str, Any]) -> list[str]:
    """Rules across elements that the schema cannot express (cds-hooks.md "Response rules")."""
    found: list[str] = []
    for i, card in enumerate(response.get("cards") or ()):
        suggestions = card.get("suggestions") or ()
        recommended = sum(1 for s in suggestions if s.get("isRecommended"))
        if card.get("selectionBehavior") == "at-most-one" and recommended > 1:
            found.append(f"cards[{i}]: more than one recommended suggestion under at-most-one")
        uuids = [card.get("uuid")] + [s.get("uuid") for s in suggestions]
        if len(set(uuids)) != len(uuids):
            found.append(f"cards[{i}]: card and suggestion uuids must be distinct")
    return found
