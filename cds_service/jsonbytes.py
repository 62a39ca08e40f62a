"""Whether orjson may decode a JSON text: the one test shared by the fast paths (request bodies, journal records).

orjson decodes several times faster than the stdlib and refuses at least as much. The one thing it reads
differently is an integer beyond 64 bits: a float, where the stdlib keeps an int. A text with a run of 19 or more
digits anywhere therefore goes to the stdlib.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# Digits as b"0", every other byte as b" ": a run of 19 digits is then a plain substring search (C speed; a
# regular expression for it took 0.5 ms on a 56 KB body).
_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_NINETEEN_DIGITS = b"0" * 19


def orjson_reads_exactly(raw: bytes) -> bool:
    """Whether orjson reads ``raw`` as the stdlib would (when it reads it at all): no run of 19 or more digits."""
    return _NINETEEN_DIGITS not in raw.translate(_DIGITS_AS_ZERO)


def compact_json(value: Any) -> str:
    """Compact JSON text (no spaces, UTF-8 characters as themselves) of a value the service built: orjson, several
    times faster than the stdlib; the stdlib for what orjson refuses (an integer beyond 64 bits, a lone surrogate,
    a key that is no string). Both read back alike by ``json.loads``.

    Only for values without NaN or infinite floats: orjson writes those as ``null`` (the stdlib as ``NaN``)."""
    try:
        return orjson.dumps(value).decode("utf-8")
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
