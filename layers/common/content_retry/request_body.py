"""A request body read safely, before any JSON parser sees it: every body API Gateway
can hand over (bad base64 or UTF-8, deep nesting, huge numbers, oversize) gets an answer."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

# API Gateway accepts up to 10 MB; a retry request is a few hundred bytes.
MAX_BODY_BYTES = 16 * 1024
MAX_NESTING = 32
MAX_NUMBER_DIGITS = 100


class BodyError(ValueError):
    """The body cannot be read; ``status`` is the HTTP answer (400 or 413)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def read_body(body: str | None, *, is_base64: bool) -> str | None:
    """The body as UTF-8 text for the JSON parser (None when there is none).

    A body that is not JSON at all is returned as it is: the resolver answers
    that one (400, "not valid JSON").

    Raises:
        BodyError: what is wrong with the body, and the status to answer with.
    """
    if not body:
        return None
    raw = _decode_base64(body) if is_base64 else _encode(body)
    if len(raw) > MAX_BODY_BYTES:
        raise BodyError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(400, f"the request body is not UTF-8 text (byte {exc.start})") from exc
    _check_json(text)
    return text


def _decode_base64(body: str) -> bytes:
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BodyError(
            400, "the request body is marked base64-encoded but is not valid base64"
        ) from exc


def _encode(body: str) -> bytes:
    try:
        return body.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BodyError(400, _SURROGATE) from exc


_SURROGATE = "the request body holds an unpaired surrogate: it is not valid Unicode text"


def _check_json(text: str) -> None:
    if _nesting(text) > MAX_NESTING:
        raise BodyError(
            400, f"the request body nests arrays or objects more than {MAX_NESTING} levels deep"
        )
    try:
        document = json.loads(text, parse_int=_integer, parse_constant=_not_a_json_number)
    except _RefusedError as exc:
        raise BodyError(400, str(exc)) from exc
    except ValueError:
        return  # not JSON: the resolver's answer
    if _has_surrogate(document):
        raise BodyError(400, _SURROGATE)


class _RefusedError(ValueError):
    pass


def _not_a_json_number(constant: str) -> float:
    # Python's reader takes NaN and Infinity; JSON has no such numbers.
    raise _RefusedError(f"the request body is not valid JSON: {constant} is not a JSON number")


def _integer(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise _RefusedError(
            f"the request body holds a number longer than {MAX_NUMBER_DIGITS} digits"
        )
    return int(digits)


def _nesting(text: str) -> int:
    """How deep arrays and objects nest in a JSON text (brackets inside strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _has_surrogate(value: Any) -> bool:
    """Whether any string in a parsed document holds an unpaired surrogate
    (JSON's ``\\ud800`` escape parses into one)."""
    if isinstance(value, str):
        return any("\ud800" <= char <= "\udfff" for char in value)
    if isinstance(value, dict):
        return any(_has_surrogate(key) or _has_surrogate(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(item) for item in value)
    return False
