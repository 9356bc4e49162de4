"""A local Amazon Bedrock Runtime that speaks the Converse wire protocol.

A real HTTP server on 127.0.0.1 for tests, fault injection, the demo and benchmarks.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import random
import re
import socket
import string
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, cast
from urllib.parse import unquote, urlsplit

logger = logging.getLogger(__name__)

_CONVERSE_PATH = re.compile(r"^/model/(?P<model_id>[^/]+)/converse$")
_ATTEMPT = re.compile(r"attempt=(\d+)")
_THROTTLE_MESSAGE = "Too many requests, please wait before trying again."
# What Bedrock says when a request does not fit the tokens-per-minute quota.
_TOKENS_MESSAGE = "Too many tokens, please wait before trying again."
# A schema nested deeper than this gets only its required properties and the
# fewest array items it allows, so recursive schemas still end.
_SHALLOW_DEPTH = 12
_MAX_DEPTH = 48
# What _chosen answers when no keyword fixes the value (None is a value).
_UNCHOSEN = object()
_DEFAULT_ITEMS = 3
_FULL_LIST_DEPTH = 4


# --------------------------------------------------------------------------- statistics


@dataclass
class BedrockStats:
    """What the server has seen since it started or since ``reset_stats()``.

    The server counts into one of these under its lock and hands out copies.
    """

    requests: int = 0
    """Converse requests received, whatever became of them."""
    answered: int = 0
    """Requests answered with HTTP 200 (malformed answers included)."""
    throttled: int = 0
    """Requests refused with 429 ThrottlingException: by the random draw or by the quota."""
    rejected: int = 0
    """Requests refused with 400 ValidationException."""
    malformed: int = 0
    """Answers that deliberately break the schema or hold no JSON."""
    retries: int = 0
    """Requests botocore marked as a retry (``amz-sdk-request: attempt=N``, N > 1)."""
    unknown_operations: int = 0
    """Requests to any other path or method (answered 404)."""
    tool_uses: dict[str, int] = field(default_factory=dict)
    """Tool-use answers per tool name."""
    text_answers: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    max_in_flight: int = 0
    """The most Converse requests being handled at the same time."""
    quota_throttled: int = 0
    """Requests the quota refused (429 ThrottlingException; counted in ``throttled`` too)."""
    quota_throttled_requests: int = 0
    """Of ``quota_throttled``, those refused by requests per minute (checked before
    tokens); the others did not fit the tokens per minute left."""
    reserved_tokens: int = 0
    """Tokens the requests let through reserved when they started: input tokens plus
    ``maxTokens`` (``DEFAULT_MAX_TOKENS`` when absent). Counted with or without a quota."""
    released_tokens: int = 0
    """The unused part of those reservations given back when the answers were done
    (``maxTokens`` minus output tokens). An answer longer than ``maxTokens`` releases
    nothing and takes its excess from the quota, so what the quota is charged in the
    end is ``total_tokens``."""

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens, as Bedrock's ``usage.totalTokens``."""
        return self.input_tokens + self.output_tokens


# --------------------------------------------------------------------------- JSON instances


_ASPECTS = (
    "the core idea",
    "a common use",
    "a typical pitfall",
    "the main trade-off",
    "a good first step",
    "how to measure the result",
)
_TITLE_PHRASES = (
    "a practical introduction",
    "a hands-on guide",
    "common pitfalls and how to avoid them",
    "worked examples",
    "reference notes",
    "going further",
)
_VOCABULARY = {
    "kind": ("article", "video", "course", "docs", "book", "code"),
    "level": ("beginner", "intermediate", "advanced"),
    "language": ("en",),
}
_VOCABULARY["type"] = _VOCABULARY["category"] = _VOCABULARY["kind"]
_VOCABULARY["difficulty"] = _VOCABULARY["level"]


def _words(name: str) -> set[str]:
    """The words of a property name: ``content_markdown``, ``contentMarkdown`` -> both words."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return {word for word in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if word}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "topic"


def _fit(text: str, schema: Mapping[str, Any], filler: str) -> str:
    """``text`` stretched or cut to the schema's minLength/maxLength."""
    low = schema.get("minLength")
    high = schema.get("maxLength")
    if isinstance(low, int) and len(text) < low:
        while len(text) < low:
            text = f"{text} {filler}"
    if isinstance(high, int) and len(text) > high:
        cut = text[:high]
        # Trailing blanks are cut for readability, unless that breaks minLength.
        text = cut.rstrip() if not isinstance(low, int) or len(cut.rstrip()) >= low else cut
    return text


class _InstanceWriter:
    """Writes one JSON instance valid against a JSON Schema, with readable strings.

    Covers what pydantic v2 emits and a little more: ``$ref`` (local JSON
    pointers, ``$defs``/``definitions``), ``allOf``, ``anyOf``/``oneOf`` (the
    first branch that is not null), ``enum``/``const``, objects, arrays,
    strings (lengths, common formats), integers and numbers (bounds,
    ``multipleOf``), booleans and null. ``pattern`` is not honoured.
    """

    def __init__(self, root: Mapping[str, Any], subject: str, rng: random.Random) -> None:
        self._root = root
        self._subject = subject
        self._rng = rng

    def write(self) -> Any:
        return self._value(self._root, "value", (), 0)

    def malformed(self, valid: Any) -> Any:
        """``valid`` broken so that the schema rejects it (when the schema constrains anything)."""
        schema = self._resolve(self._root)
        if isinstance(valid, dict):
            required = [key for key in schema.get("required", []) if key in valid]
            if required:
                missing = self._rng.choice(sorted(required))
                return {key: value for key, value in valid.items() if key != missing}
            properties = schema.get("properties") or {}
            for key, sub in properties.items():
                if isinstance(valid.get(key), list) and self._resolve(sub).get("minItems", 0) > 0:
                    return {**valid, key: []}
            for key in properties:
                if key in valid:
                    wrong: Any = 12345 if isinstance(valid[key], str) else "not the right type"
                    return {**valid, key: wrong}
        if isinstance(valid, list) and schema.get("minItems", 0) > 0:
            return []
        return "this answer does not follow the schema"

    # -- schema plumbing

    def _pointer(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}  # remote references are out of scope: anything goes
        node: Any = self._root
        for raw in ref[1:].lstrip("/").split("/") if ref != "#" else []:
            part = unquote(raw).replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return {}
        return node

    def _resolve(self, schema: Any) -> dict[str, Any]:
        """The schema with ``$ref`` followed and ``allOf`` merged into one mapping."""
        if not isinstance(schema, Mapping):
            return {}  # boolean schemas: true (and false, which nothing satisfies)
        resolved = dict(schema)
        for _ in range(_MAX_DEPTH):
            ref = resolved.pop("$ref", None)
            if not isinstance(ref, str):
                break
            target = self._pointer(ref)
            # Keywords beside a $ref (pydantic puts description/default there) win.
            resolved = {**(target if isinstance(target, Mapping) else {}), **resolved}
        parts = resolved.pop("allOf", None)
        if isinstance(parts, list):
            for part in parts:
                sub = self._resolve(part)
                properties = {**sub.get("properties", {}), **resolved.get("properties", {})}
                required = [*resolved.get("required", []), *sub.get("required", [])]
                resolved = {**sub, **resolved}
                if properties:
                    resolved["properties"] = properties
                if required:
                    resolved["required"] = list(dict.fromkeys(required))
        return resolved

    @staticmethod
    def _type_of(schema: Mapping[str, Any]) -> str:
        declared = schema.get("type")
        if isinstance(declared, list):
            others = [kind for kind in declared if kind != "null"]
            return str(others[0]) if others else "null"
        if isinstance(declared, str):
            return declared
        if {"properties", "additionalProperties", "required"} & schema.keys():
            return "object"
        if {"items", "prefixItems", "minItems", "maxItems"} & schema.keys():
            return "array"
        if {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & schema.keys():
            return "number"
        return "string"

    # -- values

    def _value(self, raw: Any, name: str, path: tuple[int, ...], depth: int) -> Any:
        if depth > _MAX_DEPTH:
            return None
        schema = self._resolve(raw)
        chosen = self._chosen(schema, name, path, depth)
        if chosen is not _UNCHOSEN:
            return chosen
        kind = self._type_of(schema)
        if kind == "object":
            return self._object(schema, path, depth)
        if kind == "array":
            return self._array(schema, name, path, depth)
        return self._scalar(kind, schema, name, path)

    def _chosen(
        self, schema: Mapping[str, Any], name: str, path: tuple[int, ...], depth: int
    ) -> Any:
        """A value fixed by ``const``, ``enum`` or a branch of ``anyOf``/``oneOf``."""
        if "const" in schema:
            return schema["const"]
        choices = schema.get("enum")
        if isinstance(choices, list) and choices:
            return choices[(path[-1] if path else self._rng.randrange(len(choices))) % len(choices)]
        for keyword in ("anyOf", "oneOf"):
            branches = schema.get(keyword)
            if isinstance(branches, list) and branches:
                useful = [b for b in branches if self._type_of(self._resolve(b)) != "null"]
                return self._value((useful or branches)[0], name, path, depth + 1)
        return _UNCHOSEN

    def _scalar(
        self, kind: str, schema: Mapping[str, Any], name: str, path: tuple[int, ...]
    ) -> Any:
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._number(schema)
        if kind == "boolean":
            return self._rng.random() < 0.5
        if kind == "null":
            return None
        return self._string(schema, name, path)

    def _object(self, schema: Mapping[str, Any], path: tuple[int, ...], depth: int) -> Any:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, Mapping) else {}
        required = [key for key in schema.get("required", []) if isinstance(key, str)]
        instance: dict[str, Any] = {}
        for key, sub in properties.items():
            if key in required or depth <= _SHALLOW_DEPTH:
                instance[key] = self._value(sub, key, path, depth + 1)
        for key in required:
            if key not in instance:
                instance[key] = self._value({}, key, path, depth + 1)
        extra = schema.get("additionalProperties")
        if not properties and isinstance(extra, Mapping):
            # A dict[str, X] field: one readable key is enough.
            instance[_slug(self._subject)] = self._value(extra, "value", path, depth + 1)
        return instance

    def _array(
        self, schema: Mapping[str, Any], name: str, path: tuple[int, ...], depth: int
    ) -> list[Any]:
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list) and prefix:
            return [self._value(sub, name, (*path, i), depth + 1) for i, sub in enumerate(prefix)]
        low = schema.get("minItems", 0)
        low = low if isinstance(low, int) else 0
        high = schema.get("maxItems")
        # Full lists near the top, where readers look; single items deeper down,
        # so a recursive schema (a tree of children) stays small.
        if depth <= _FULL_LIST_DEPTH:
            count = max(low, _DEFAULT_ITEMS)
        else:
            count = max(low, 1) if depth <= _SHALLOW_DEPTH else low
        if isinstance(high, int):
            count = min(count, high)
        items = schema.get("items", {})
        return [self._value(items, name, (*path, i), depth + 1) for i in range(count)]

    def _integer(self, schema: Mapping[str, Any]) -> int:
        low, high = self._bounds(schema, integral=True)
        step = schema.get("multipleOf")
        if isinstance(step, int) and step > 0:
            first, last = math.ceil(low / step), math.floor(high / step)
            if first <= last:
                return self._rng.randint(first, last) * step
        return self._rng.randint(int(low), int(high))

    def _number(self, schema: Mapping[str, Any]) -> float:
        low, high = self._bounds(schema, integral=False)
        value = round(self._rng.uniform(low, high), 2)
        return min(max(value, low), high)

    @staticmethod
    def _bounds(schema: Mapping[str, Any], *, integral: bool) -> tuple[float, float]:
        """The closed range a number may take; exclusive bounds are stepped inside."""
        gap = 1 if integral else 0.01
        low: float | None = schema.get("minimum")
        high: float | None = schema.get("maximum")
        if isinstance(schema.get("exclusiveMinimum"), int | float):
            low = schema["exclusiveMinimum"] + gap
        if isinstance(schema.get("exclusiveMaximum"), int | float):
            high = schema["exclusiveMaximum"] - gap
        if integral:
            low = None if low is None else math.ceil(low)
            high = None if high is None else math.floor(high)
        if low is None and high is None:
            low, high = 1, 10
        elif low is None:
            low = cast(float, high) - 10
        elif high is None:
            high = low + 10
        return low, max(low, cast(float, high))

    def _string(self, schema: Mapping[str, Any], name: str, path: tuple[int, ...]) -> str:
        subject = self._subject
        suffix = "-".join(str(i + 1) for i in path)
        fmt = schema.get("format")
        if fmt in {"uri", "url", "iri", "uri-reference", "iri-reference"}:
            text = f"https://example.com/learn/{_slug(subject)}"
            text += f"/{_slug(name)}-{suffix}" if suffix else ""
        elif fmt in {"email", "idn-email"}:
            text = f"{_slug(name)}{suffix}@example.com"
        elif fmt == "date-time":
            text = "2024-01-15T09:30:00Z"
        elif fmt == "date":
            text = "2024-01-15"
        elif fmt == "time":
            text = "09:30:00Z"
        elif fmt == "uuid":
            text = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        else:
            text = self._prose(name, path)
        return _fit(text, schema, f"More about {subject}.")

    def _prose(self, name: str, path: tuple[int, ...]) -> str:
        """A sentence about the subject that fits what the property's name says it holds."""
        words = _words(name)
        subject = self._subject
        n = path[-1] if path else 0
        # Items of nested lists (a question's options) shift with their parent's
        # index, so question 2's options do not repeat question 1's.
        aspect = _ASPECTS[(n + (path[0] if len(path) > 1 else 0)) % len(_ASPECTS)]
        if words & {"markdown", "content", "body", "article", "lesson", "text"}:
            return self._markdown()
        if words & {"question", "prompt", "quiz"}:
            return f"Question {n + 1}: which statement best describes {aspect} of {subject}?"
        if words & {"option", "options", "choice", "choices", "alternatives", "answers"}:
            return f"{string.ascii_uppercase[n % 26]}) A statement about {aspect} of {subject}"
        if words & {"explanation", "why", "reason", "rationale", "justification", "feedback"}:
            return (
                f"Knowing {aspect} of {subject} helps in everyday work "
                "and avoids the most common mistakes."
            )
        if words & {"summary", "description", "overview", "abstract", "intro", "introduction"}:
            return (
                f"A short, practical overview of {subject}: what it is, "
                "why it matters and how to get started."
            )
        if words & {"title", "name", "heading", "headline", "label", "topic", "subject"}:
            phrase = _TITLE_PHRASES[n % len(_TITLE_PHRASES)] if path else _TITLE_PHRASES[0]
            return f"{subject}: {phrase}"
        for word, vocabulary in _VOCABULARY.items():
            if word in words:
                return vocabulary[n % len(vocabulary)]
        label = " ".join(sorted(words, key=name.lower().find)).capitalize() or "Value"
        return f"{label} for {subject}" + (f" ({n + 1})" if path else "")

    def _markdown(self) -> str:
        subject = self._subject
        ideas = "\n".join(f"- {aspect.capitalize()} of {subject}" for aspect in _ASPECTS[:4])
        return (
            f"# {subject}\n\n## Overview\n\nThis tutorial introduces {subject}: what it is, "
            f"why it matters and how to apply it.\n\n## Key ideas\n\n{ideas}\n\n"
            f"## Example\n\nStart small: apply {subject} to one part of a project, measure "
            "the result, then widen it.\n\n## Next steps\n\nPractise on a real example and "
            f"read the recommended resources on {subject}."
        )


def generate_instance(schema: Mapping[str, Any], subject: str, seed: int = 0) -> Any:
    """One JSON instance valid against ``schema``, its strings written about ``subject``.

    Deterministic for a given schema, subject and seed.
    """
    return _InstanceWriter(schema, subject, _rng(seed, "instance", subject)).write()


# --------------------------------------------------------------------------- prompts


def _looks_like_schema(value: Any) -> bool:
    if not isinstance(value, Mapping):
        return False
    if "$schema" in value or "$defs" in value:
        return True
    return isinstance(value.get("properties"), Mapping) or value.get("type") in {
        "object",
        "array",
    }


def _json_objects(text: str) -> list[tuple[int, int, Any]]:
    """Every JSON object embedded in ``text``: (start, end, value)."""
    decoder = json.JSONDecoder()
    found: list[tuple[int, int, Any]] = []
    position = text.find("{")
    while position >= 0:
        try:
            value, end = decoder.raw_decode(text, position)
        except ValueError:
            position = text.find("{", position + 1)
            continue
        found.append((position, end, value))
        position = text.find("{", end)
    return found


def schema_in_prompt(prompt: str) -> dict[str, Any] | None:
    """The JSON Schema a prompt embeds (the text answers' fallback), or None."""
    for _, _, value in _json_objects(prompt):
        if _looks_like_schema(value):
            return dict(value)
    return None


_SUBJECT_KEYS = ("concept", "concept_name", "topic", "subject", "name", "title")
_SUBJECT_LINE = re.compile(
    r"^\s*(?:concept|topic|subject)(?:\s+name)?\s*[:=]\s*[\"'“]?(?P<subject>[^\"'”\n]+?)[\"'”]?\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_SUBJECT_QUOTED = re.compile(r"\b(?:concept|topic)\s+[\"'“](?P<subject>[^\"'”\n]+)[\"'”]", re.I)


def subject_of(prompt: str) -> str:
    """What a prompt is about, to write readable strings: the concept's name when it has one.

    Looked for in an embedded JSON object (``"concept": "..."`` or
    ``"concept": {"name": "..."}``, ``"topic"``, ``"name"``...), then in a
    ``Concept: ...`` line, then in ``concept "..."``; else ``"this topic"``.
    """
    for _, _, value in _json_objects(prompt):
        if not isinstance(value, Mapping):
            continue
        for key in _SUBJECT_KEYS:
            found = value.get(key)
            if isinstance(found, Mapping):
                found = found.get("name")
            if isinstance(found, str) and found.strip():
                return found.strip()[:120]
    for pattern in (_SUBJECT_LINE, _SUBJECT_QUOTED):
        match = pattern.search(prompt)
        if match:
            return match["subject"].strip()[:120]
    return "this topic"


# --------------------------------------------------------------------------- requests


class _Invalid(ValueError):
    """The request breaks the Converse contract: answered 400 ValidationException."""


@dataclass(frozen=True)
class _Conversation:
    prompt: str
    """The user messages' text, the last one first (it is the one asking)."""
    input_chars: int
    tool_name: str | None
    tool_schema: Mapping[str, Any]
    max_tokens: int | None


def _texts(blocks: Any) -> list[str]:
    """The text of a list of content blocks, tool results' text included."""
    found: list[str] = []
    for block in blocks if isinstance(blocks, list) else []:
        if not isinstance(block, Mapping):
            continue
        if isinstance(block.get("text"), str):
            found.append(block["text"])
        result = block.get("toolResult")
        if isinstance(result, Mapping):
            found.extend(_texts(result.get("content")))
    return found


def _read_conversation(request: Any) -> _Conversation:
    if not isinstance(request, Mapping):
        raise _Invalid("The request body must be a JSON object.")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Invalid("A conversation must contain at least one message.")
    user_texts: list[str] = []
    all_texts = _texts(request.get("system"))
    for message in messages:
        if not isinstance(message, Mapping) or message.get("role") not in {"user", "assistant"}:
            raise _Invalid("Each message needs a role of user or assistant and content.")
        texts = _texts(message.get("content"))
        all_texts.extend(texts)
        if message["role"] == "user":
            user_texts = texts + user_texts
    tool_name: str | None = None
    tool_schema: Mapping[str, Any] = {}
    tool_config = request.get("toolConfig")
    if tool_config is not None:
        tool_name, tool_schema = _chosen_tool(tool_config)
        # The tool specs are part of what the model reads, so they count as input.
        all_texts.append(json.dumps(tool_config))
    inference = request.get("inferenceConfig")
    max_tokens = inference.get("maxTokens") if isinstance(inference, Mapping) else None
    return _Conversation(
        prompt="\n".join(user_texts),
        input_chars=sum(len(text) for text in all_texts),
        tool_name=tool_name,
        tool_schema=tool_schema,
        max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None,
    )


def _chosen_tool(tool_config: Any) -> tuple[str | None, Mapping[str, Any]]:
    """The tool the model is to use: the one ``toolChoice.tool`` names, else the first.

    With ``auto`` a real model may answer in text instead; this one always
    uses a tool, which is what a caller offering tools is testing.
    """
    tools = tool_config.get("tools") if isinstance(tool_config, Mapping) else None
    if not isinstance(tools, list) or not tools:
        raise _Invalid("toolConfig.tools must list at least one tool.")
    specs: dict[str, Mapping[str, Any]] = {}
    for tool in tools:
        spec = tool.get("toolSpec") if isinstance(tool, Mapping) else None
        if spec is None:
            continue  # cachePoint / systemTool entries
        name = spec.get("name") if isinstance(spec, Mapping) else None
        schema = spec.get("inputSchema", {}).get("json") if isinstance(spec, Mapping) else None
        if not isinstance(name, str) or not name or not isinstance(schema, Mapping):
            raise _Invalid("Each toolSpec needs a name and an inputSchema.json object.")
        specs[name] = schema
    if not specs:
        return None, {}
    choice = tool_config.get("toolChoice")
    if isinstance(choice, Mapping) and isinstance(choice.get("tool"), Mapping):
        name = choice["tool"].get("name")
        if name not in specs:
            raise _Invalid(f"The tool {name!r} named in toolChoice is not in toolConfig.tools.")
        return name, specs[name]
    first = next(iter(specs))
    return first, specs[first]


def _tokens(chars: int) -> int:
    """Bedrock-like token count: about four characters a token."""
    return max(1, math.ceil(chars / 4))


def _draw(*parts: object) -> int:
    """A 64-bit number fixed by ``parts``: the server's only source of chance."""
    key = "\x1f".join(str(part) for part in parts).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


def _unit(*parts: object) -> float:
    return _draw(*parts) / 2**64


def _rng(*parts: object) -> random.Random:
    # Test data, not secrets: reproducibility is the point.
    return random.Random(_draw(*parts))  # noqa: S311


@dataclass(frozen=True)
class _Reply:
    status: int
    body: Any
    error_type: str | None = None


def _error(status: int, error_type: str, message: str) -> _Reply:
    # restJson1 errors: botocore reads the code from x-amzn-ErrorType (before the
    # body's "code"/"__type") and the message from the body's "message".
    return _Reply(status, {"message": message}, error_type)


# --------------------------------------------------------------------------- quota


DEFAULT_MAX_TOKENS = 4096
"""What a request without ``inferenceConfig.maxTokens`` reserves for its answer
(Bedrock reserves the model's own maximum, often far more)."""


def quota_limited_seconds(
    tokens: int,
    requests: int,
    /,
    *,
    tokens_per_minute: int | None,
    requests_per_minute: int | None,
    burst: bool = False,
) -> float:
    """The least time a quota lets ``requests`` calls taking ``tokens`` in all go through.

    ``max(tokens / tokens_per_minute, requests / requests_per_minute) * 60``, a
    limit of None counting for nothing: the drain time of a caller pacing itself
    perfectly at the quota's rate. Pass the tokens the calls take for good
    (``BedrockStats.total_tokens``: input plus output) for that ideal; their
    reservations (``reserved_tokens``) give the time of a caller that never
    counts on a refund. With ``burst``, the buckets are taken to be full at the
    start, as a fresh quota is: a minute's worth goes at once, and only the rest
    is paced.
    """
    if tokens < 0 or requests < 0:
        raise ValueError("tokens and requests are counts, zero or more")
    minutes = 0.0
    for used, limit in ((tokens, tokens_per_minute), (requests, requests_per_minute)):
        if limit is not None:
            _check_limit("a per-minute limit", limit)
            minutes = max(minutes, ((used - limit) if burst else used) / limit)
    return minutes * 60


def _check_limit(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number above 0, or None for no limit: {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be above 0 (None for no limit), not {value}")


class _Bucket:
    """A token bucket refilled continuously: ``capacity`` a minute, full at the start.

    Not locked itself: the server calls it under its lock.
    """

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / 60.0
        self.level = float(capacity)
        self.updated = now

    def refill(self, now: float) -> float:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now
        return self.level

    def give(self, amount: float) -> None:
        """Give back (or, negative, take more than was reserved: the level may go below 0)."""
        self.level = min(self.capacity, self.level + amount)


@dataclass
class _ModelQuota:
    """One model's buckets (Bedrock's on-demand quota is per account and model)."""

    tokens: _Bucket | None
    requests: _Bucket | None


# --------------------------------------------------------------------------- the server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The default listen backlog (5) resets connections when a benchmark opens
    # dozens at once; botocore would then retry them and blur the measurement.
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], bedrock: LocalBedrock) -> None:
        self.bedrock = bedrock
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up, or a connection closed by stop(): not worth a traceback.
        logger.debug("local bedrock: connection from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive, as botocore's connection pool expects from AWS.
    protocol_version = "HTTP/1.1"
    server_version = "LocalBedrock/1.0"

    def setup(self) -> None:
        super().setup()
        server = cast(_Server, self.server)
        with server.connections_lock:
            server.connections.add(self.connection)

    def finish(self) -> None:
        server = cast(_Server, self.server)
        with server.connections_lock:
            server.connections.discard(self.connection)
        super().finish()

    def do_POST(self) -> None:
        self._dispatch()

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_POST

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        # Read the whole body even for a request refused, so the kept-alive
        # connection stays in step with the client.
        body = self.rfile.read(length) if length > 0 else b""
        bedrock = cast(_Server, self.server).bedrock
        path = urlsplit(self.path).path
        match = _CONVERSE_PATH.match(path)
        if self.command != "POST" or match is None:
            reply = bedrock._unknown_operation(self.command, path)
        else:
            attempt = _ATTEMPT.search(self.headers.get("amz-sdk-request", ""))
            reply = bedrock._converse(
                unquote(match["model_id"]), body, int(attempt[1]) if attempt else 1
            )
        payload = json.dumps(reply.body, ensure_ascii=False).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        if reply.error_type:
            self.send_header("x-amzn-ErrorType", reply.error_type)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("local bedrock: " + format, *args)


class LocalBedrock:
    """Amazon Bedrock Runtime's Converse operation on 127.0.0.1, in background threads.

    ``latency``, ``throttle_rate``, ``malformed_rate``, ``throttle_latency`` and
    ``seed`` are plain attributes, read at each request, so a test or a
    benchmark may change them while the server runs. Each request sleeps
    ``latency`` seconds in its own thread, so concurrent calls overlap as they
    do on the real service.

    ``tokens_per_minute`` and ``requests_per_minute`` (None: no limit) are the
    account's on-demand quota for each model id (see docs/LOCAL_TOOLING.md);
    ``set_quota()`` changes it while the server runs.

    Raises:
        ValueError: a latency below 0, a rate outside 0..1, or a per-minute
            limit that is not a whole number above 0.
    """

    # The servers running in this process, by endpoint (see serving()).
    _running: ClassVar[dict[str, LocalBedrock]] = {}
    _running_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        latency: float = 0.0,
        throttle_rate: float = 0.0,
        malformed_rate: float = 0.0,
        seed: int = 0,
        *,
        throttle_latency: float = 0.0,
        tokens_per_minute: int | None = None,
        requests_per_minute: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if latency < 0 or throttle_latency < 0:
            raise ValueError("latencies are seconds, zero or more")
        if not (0.0 <= throttle_rate <= 1.0 and 0.0 <= malformed_rate <= 1.0):
            raise ValueError("rates are shares between 0 and 1")
        self.latency = latency
        self.throttle_rate = throttle_rate
        self.malformed_rate = malformed_rate
        self.throttle_latency = throttle_latency
        self.seed = seed
        self._address = (host, port)
        self._lock = threading.Lock()
        self._counters = BedrockStats()
        self._in_flight = 0
        self._seen: dict[str, int] = {}
        self._tokens_per_minute: int | None = None
        self._requests_per_minute: int | None = None
        self._quotas: dict[str, _ModelQuota] = {}
        self.set_quota(tokens_per_minute, requests_per_minute)
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> LocalBedrock:
        """Listen and serve in a daemon thread; returns self. Starting twice is an error."""
        if self._server is not None:
            raise RuntimeError("this LocalBedrock is already running")
        self._stopping.clear()
        self._server = _Server(self._address, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"local-bedrock-{self.port}",
            daemon=True,
        )
        self._thread.start()
        with LocalBedrock._running_lock:
            LocalBedrock._running[self.endpoint] = self
        return self

    def stop(self) -> None:
        """Stop serving and close every connection, kept-alive ones included; idempotent."""
        if self._server is None:
            return
        endpoint = self.endpoint
        with LocalBedrock._running_lock:
            if LocalBedrock._running.get(endpoint) is self:
                del LocalBedrock._running[endpoint]
        server, self._server = self._server, None
        self._stopping.set()  # wakes requests sleeping their latency
        server.shutdown()
        with server.connections_lock:
            open_connections = list(server.connections)
        # Kept-alive connections have their own threads, which shutdown() leaves
        # serving: without this, a pooled client would still be answered.
        for connection in open_connections:
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LocalBedrock:
        return self.start() if self._server is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port it listens on (chosen by the system when 0 was given)."""
        if self._server is None:
            raise RuntimeError("LocalBedrock is not running")
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """The endpoint URL, for ``endpoint_url`` or ``AWS_ENDPOINT_URL_BEDROCK_RUNTIME``."""
        return f"http://{self._address[0]}:{self.port}"

    @classmethod
    def serving(cls, endpoint: str) -> LocalBedrock | None:
        """The LocalBedrock of this process serving ``endpoint``, if one is.

        For code that was handed only the endpoint (``AWS_ENDPOINT_URL_BEDROCK_RUNTIME``)
        of a server this process started, to set its quota or read its stats.
        """
        with cls._running_lock:
            return cls._running.get(endpoint.rstrip("/"))

    def environ(self) -> dict[str, str]:
        """Environment variables pointing boto3's bedrock-runtime clients here."""
        return {"AWS_ENDPOINT_URL_BEDROCK_RUNTIME": self.endpoint}

    def client(
        self,
        *,
        max_attempts: int = 3,
        retry_mode: str = "standard",
        read_timeout: float = 60.0,
        max_pool_connections: int = 50,
    ) -> Any:
        """A boto3 ``bedrock-runtime`` client for this server, with dummy credentials.

        ``max_attempts`` counts every attempt, the first included. It is passed
        to botocore as ``total_max_attempts``: in ``Config(retries=...)``,
        botocore's own ``max_attempts`` key counts retries only (it makes
        ``max_attempts + 1`` attempts), unlike ``AWS_MAX_ATTEMPTS``.
        """
        import boto3
        from botocore.config import Config

        return boto3.client(
            "bedrock-runtime",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local",  # noqa: S106 - not a secret, the server checks none
            config=Config(
                retries={"total_max_attempts": max_attempts, "mode": retry_mode},
                read_timeout=read_timeout,
                max_pool_connections=max_pool_connections,
            ),
        )

    # -- quota

    @property
    def tokens_per_minute(self) -> int | None:
        """The tokens-per-minute quota of each model id, or None."""
        return self._tokens_per_minute

    @property
    def requests_per_minute(self) -> int | None:
        """The requests-per-minute quota of each model id, or None."""
        return self._requests_per_minute

    def set_quota(
        self, tokens_per_minute: int | None = None, requests_per_minute: int | None = None
    ) -> None:
        """Enforce this quota from now on (None lifts a limit), every model's buckets full.

        Requests in flight give their unused reservation back to the new buckets.

        Raises:
            ValueError: a limit that is not a whole number above 0.
        """
        _check_limit("tokens_per_minute", tokens_per_minute)
        _check_limit("requests_per_minute", requests_per_minute)
        with self._lock:
            self._tokens_per_minute = tokens_per_minute
            self._requests_per_minute = requests_per_minute
            self._quotas.clear()

    def reset_quota(self) -> None:
        """Every model's buckets full again, as after a quiet minute."""
        with self._lock:
            self._quotas.clear()

    def quota_limited_seconds(self, tokens: int, requests: int, /, *, burst: bool = False) -> float:
        """``quota_limited_seconds`` at this server's quota (0.0 without one)."""
        return quota_limited_seconds(
            tokens,
            requests,
            tokens_per_minute=self._tokens_per_minute,
            requests_per_minute=self._requests_per_minute,
            burst=burst,
        )

    def _model_quota(self, model_id: str, now: float) -> _ModelQuota:
        """The model's buckets, refilled to ``now`` (created full); call under the lock."""
        quota = self._quotas.get(model_id)
        if quota is None:
            tpm, rpm = self._tokens_per_minute, self._requests_per_minute
            quota = _ModelQuota(
                tokens=None if tpm is None else _Bucket(tpm, now),
                requests=None if rpm is None else _Bucket(rpm, now),
            )
            self._quotas[model_id] = quota
        for bucket in (quota.tokens, quota.requests):
            if bucket is not None:
                bucket.refill(now)
        return quota

    def _reserve(self, model_id: str, tokens: int) -> str | None:
        """Take one request and ``tokens`` from the model's quota, both or neither.

        Returns None when they were taken, else the ThrottlingException's message.
        """
        with self._lock:
            quota = self._model_quota(model_id, time.monotonic())
            counters = self._counters
            refusal = None
            if quota.requests is not None and quota.requests.level < 1:
                refusal = _THROTTLE_MESSAGE
                counters.quota_throttled_requests += 1
            elif quota.tokens is not None and quota.tokens.level < tokens:
                refusal = _TOKENS_MESSAGE
            if refusal is not None:
                counters.quota_throttled += 1
                counters.throttled += 1
                return refusal
            if quota.requests is not None:
                quota.requests.level -= 1
            if quota.tokens is not None:
                quota.tokens.level -= tokens
            counters.reserved_tokens += tokens
            return None

    def _settle(self, model_id: str, reserved: int, used: int) -> None:
        """The answer is done: give back what it reserved and did not use (or take the excess)."""
        with self._lock:
            self._counters.released_tokens += max(0, reserved - used)
            quota = self._model_quota(model_id, time.monotonic())
            if quota.tokens is not None:
                quota.tokens.give(reserved - used)

    # -- counters

    def stats(self) -> BedrockStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return replace(self._counters, tool_uses=dict(self._counters.tool_uses))

    def reset_stats(self) -> None:
        """Zero the counters and forget the requests seen, so draws repeat from the start."""
        with self._lock:
            self._counters = BedrockStats(max_in_flight=self._in_flight)
            self._seen.clear()

    # -- requests (called by the handler threads)

    def _unknown_operation(self, method: str, path: str) -> _Reply:
        with self._lock:
            self._counters.unknown_operations += 1
        return _error(404, "UnknownOperationException", f"No operation for {method} {path}.")

    def _converse(self, model_id: str, raw: bytes, attempt: int) -> _Reply:
        started = time.monotonic()
        with self._lock:
            counters = self._counters
            counters.requests += 1
            counters.retries += attempt > 1
            self._in_flight += 1
            counters.max_in_flight = max(counters.max_in_flight, self._in_flight)
        try:
            return self._answer(model_id, raw, started)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _answer(self, model_id: str, raw: bytes, started: float) -> _Reply:
        try:
            request = json.loads(raw or b"null")
            conversation = _read_conversation(request)
        except ValueError as exc:  # _Invalid and JSONDecodeError alike
            with self._lock:
                self._counters.rejected += 1
            message = str(exc) if isinstance(exc, _Invalid) else "The request body is not JSON."
            return _error(400, "ValidationException", message)

        digest = hashlib.sha256(
            json.dumps([model_id, request], sort_keys=True).encode()
        ).hexdigest()
        seed = self.seed
        with self._lock:
            seen = self._seen.get(digest, 0)
            self._seen[digest] = seen + 1
        if _unit(seed, "throttle", digest, seen) < self.throttle_rate:
            self._stopping.wait(self.throttle_latency)
            with self._lock:
                self._counters.throttled += 1
            return _error(429, "ThrottlingException", _THROTTLE_MESSAGE)

        # The quota: input tokens plus maxTokens reserved now, the unused part
        # given back once the answer is done.
        input_tokens = _tokens(conversation.input_chars)
        reserved = input_tokens + (conversation.max_tokens or DEFAULT_MAX_TOKENS)
        refusal = self._reserve(model_id, reserved)
        if refusal is not None:
            return _error(429, "ThrottlingException", refusal)
        output_tokens = 0
        try:
            malformed = _unit(seed, "malformed", digest, seen) < self.malformed_rate
            reply, output_tokens = self._answered(
                conversation, _rng(seed, "content", digest), started, malformed=malformed
            )
        finally:
            self._settle(model_id, reserved, input_tokens + output_tokens)
        return reply

    def _answered(
        self, conversation: _Conversation, rng: random.Random, started: float, *, malformed: bool
    ) -> tuple[_Reply, int]:
        """The answer to a request let through, after its latency; and its output tokens."""
        latency = self.latency
        subject = subject_of(conversation.prompt)
        stop_reason = "end_turn"
        block: dict[str, Any]
        if conversation.tool_name is not None:
            writer = _InstanceWriter(conversation.tool_schema, subject, rng)
            tool_input = writer.write()
            if malformed:
                tool_input = writer.malformed(tool_input)
            tool_use_id = "tooluse_" + "".join(
                rng.choice(string.ascii_letters + string.digits) for _ in range(22)
            )
            block = {
                "toolUse": {
                    "toolUseId": tool_use_id,
                    "name": conversation.tool_name,
                    "input": tool_input,
                }
            }
            output_chars = len(json.dumps(tool_input, ensure_ascii=False))
            stop_reason = "tool_use"
        else:
            text = self._text_answer(conversation.prompt, subject, rng, malformed=malformed)
            limit = conversation.max_tokens
            if limit is not None and _tokens(len(text)) > limit:
                text, stop_reason = text[: limit * 4], "max_tokens"
            block = {"text": text}
            output_chars = len(text)

        input_tokens = _tokens(conversation.input_chars)
        output_tokens = _tokens(output_chars)
        self._stopping.wait(latency)
        with self._lock:
            counters = self._counters
            counters.answered += 1
            counters.malformed += malformed
            counters.input_tokens += input_tokens
            counters.output_tokens += output_tokens
            if conversation.tool_name is not None:
                name = conversation.tool_name
                counters.tool_uses[name] = counters.tool_uses.get(name, 0) + 1
            else:
                counters.text_answers += 1
        reply = _Reply(
            200,
            {
                "output": {"message": {"role": "assistant", "content": [block]}},
                "stopReason": stop_reason,
                "usage": {
                    "inputTokens": input_tokens,
                    "outputTokens": output_tokens,
                    "totalTokens": input_tokens + output_tokens,
                },
                "metrics": {"latencyMs": int((time.monotonic() - started) * 1000)},
            },
        )
        return reply, output_tokens

    @staticmethod
    def _text_answer(prompt: str, subject: str, rng: random.Random, *, malformed: bool) -> str:
        if malformed:
            return f"Sorry, I cannot write about {subject} in the requested format right now."
        schema = schema_in_prompt(prompt)
        if schema is None:
            answer: Any = {"answer": f"A short, practical answer about {subject}."}
        else:
            answer = _InstanceWriter(schema, subject, rng).write()
        return json.dumps(answer, ensure_ascii=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a LocalBedrock in the foreground until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    parser.add_argument("--throttle-rate", type=float, default=0.0)
    parser.add_argument("--malformed-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokens-per-minute", type=int, default=None, help="quota per model id (default: none)"
    )
    parser.add_argument(
        "--requests-per-minute", type=int, default=None, help="quota per model id (default: none)"
    )
    options = parser.parse_args(argv)
    try:
        bedrock = LocalBedrock(
            latency=options.latency,
            throttle_rate=options.throttle_rate,
            malformed_rate=options.malformed_rate,
            seed=options.seed,
            tokens_per_minute=options.tokens_per_minute,
            requests_per_minute=options.requests_per_minute,
            host=options.host,
            port=options.port,
        ).start()
    except ValueError as exc:
        parser.error(str(exc))
    print(f"AWS_ENDPOINT_URL_BEDROCK_RUNTIME={bedrock.endpoint}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        bedrock.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
