"""Limits that hold before any route runs: body size, body and header timeouts, content type, strict JSON.

`RequestGuard` is a pure ASGI middleware. It answers 413 from `Content-Length` alone, then reads the whole body
itself, counting bytes as they stream in (chunked bodies have no length) and stopping at a deadline, so a client
can neither send more than `max_body_bytes` nor trickle its body forever. A JSON body is then parsed strictly:
NaN/Infinity (which Python's `json` accepts), numbers that overflow, invalid UTF-8 and lone surrogates are refused
with 400 naming the field, instead of reaching the pipeline as a black image or a 500 when the reply is encoded.
Only then does the app see the body (replayed through `receive`); after it, `receive` is the server's own, so a
route can still wait for `http.disconnect`.

Bodies that are neither JSON nor multipart/form-data are refused with 415 before they are read. Besides telling
`curl -d` users what to send, this keeps browsers on other sites from posting work here without a CORS preflight
(a `text/plain` or urlencoded form is a "simple" cross-site request; `application/json` is not).

`header_timeout_protocol` closes connections that do not finish a request's headers in time: uvicorn times out
only idle keep-alive connections, so without it one that sends a header byte at a time ("slowloris") is held open
for ever.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPENAI_ERROR_TYPES = {401: "invalid_request_error", 503: "server_error", 500: "server_error"}
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_INT_DIGITS = 40  # no field takes an integer anywhere near 10**40; Python's own limit is 4300 digits
_SURROGATE = re.compile("[\ud800-\udfff]")


def error_response(
    path: str,
    status: int,
    message: Any,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    """An error in the shape each dialect's clients parse: OpenAI's `{"error": {...}}` under `/v1/`,
    FastAPI's (and AUTOMATIC1111's) `{"detail": ...}` elsewhere."""
    if path.startswith("/v1/"):
        kind = OPENAI_ERROR_TYPES.get(status, "invalid_request_error")
        code = "invalid_api_key" if status == 401 else None
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyError(ValueError):
    """A request body refused before any route sees it; `param` names the field (None: the body as a whole)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


# ----------------------------------------------------------------------------------------------------------------------
# Strict JSON


class _Refused:
    """Stands in for a JSON value that was parsed but is not allowed, so the walk can name where it was."""

    def __init__(self, why: str) -> None:
        self.why = why


_NON_FINITE = _Refused("is not a finite number (NaN and Infinity are not JSON; send a number)")
_HUGE_INT = _Refused(f"is an integer of more than {MAX_INT_DIGITS} digits")


def _parse_float(text: str) -> float | _Refused:
    value = float(text)
    return value if math.isfinite(value) else _NON_FINITE  # 1e400 parses to inf


def _parse_int(text: str) -> int | _Refused:
    return int(text) if len(text.lstrip("-")) <= MAX_INT_DIGITS else _HUGE_INT


def _path(parts: tuple[Any, ...]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def parse_json(raw: bytes) -> Any:
    """Parse a request body as JSON (RFC 8259: UTF-8, finite numbers), raising `BodyError` naming the field."""
    try:
        text, bad_utf8 = raw.decode("utf-8"), False
    except UnicodeDecodeError:  # keep going so that the field can be named: bad bytes become lone surrogates
        text, bad_utf8 = raw.decode("utf-8", "surrogateescape"), True
    text = text.removeprefix("\ufeff")
    try:
        value = json.loads(
            text, parse_constant=lambda _: _NON_FINITE, parse_float=_parse_float, parse_int=_parse_int
        )
    except json.JSONDecodeError as e:
        what = "not valid UTF-8" if bad_utf8 else "not valid JSON"
        raise BodyError(
            400, f"the request body is {what}: {e.msg} (line {e.lineno} column {e.colno})"
        ) from None
    except RecursionError:
        raise BodyError(400, "the request body is JSON nested too deeply") from None
    # walk without recursion: the parsed value can be as deep as json.loads allows
    stack: list[tuple[tuple[Any, ...], Any]] = [((), value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, _Refused):
            raise BodyError(400, f"{_path(where) or 'the request body'} {item.why}", _path(where) or None)
        if isinstance(item, str):
            if _SURROGATE.search(item):
                why = "is not valid UTF-8" if bad_utf8 else "contains a lone surrogate (\\ud800-\\udfff)"
                raise BodyError(
                    400, f"{_path(where) or 'the request body'} {why}; send UTF-8 text", _path(where)
                )
        elif isinstance(item, dict):
            for key, sub in item.items():
                if _SURROGATE.search(key):
                    raise BodyError(400, f"a key in {_path(where) or 'the request body'} is not valid UTF-8")
                stack.append(((*where, key), sub))
        elif isinstance(item, list):
            stack.extend(((*where, i), sub) for i, sub in enumerate(item))
    return value


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _is_multipart(content_type: str | None) -> bool:
    return (content_type or "").partition(";")[0].strip().lower() == "multipart/form-data"


# ----------------------------------------------------------------------------------------------------------------------
# The middleware


class RequestGuard:
    """Pure ASGI middleware: size, time and type limits on request bodies, then strict JSON (see the module doc).

    `settings` needs `max_body_bytes` and `body_timeout_s` (a `lcmkit.server.jobs.Settings`).
    """

    def __init__(self, app: ASGIApp, settings: Any) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read(scope, receive)
        except BodyError as e:
            # the rest of the body was not read: close rather than read (and drop) what may never end
            headers = {"Connection": "close"} if e.status in (408, 413, 415) else None
            await error_response(scope["path"], e.status, e.message, headers, e.param)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # http.disconnect when the client goes: routes watch for it
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body, within the size and time limits; 415/413/408/400 as `BodyError`."""
        limit, headers = self.settings.max_body_bytes, Headers(scope=scope)
        content_type = headers.get("content-type")
        length = headers.get("content-length")
        if length is not None and not length.strip().isdigit():
            raise BodyError(400, f"Content-Length must be a number of bytes, got {length!r}")
        declared = int(length) if length is not None else None
        has_body = bool(declared) or "chunked" in headers.get("transfer-encoding", "").lower()
        if declared is not None and declared > limit:
            raise BodyError(413, _too_large(declared, limit))
        if (
            has_body
            and scope["method"] in BODY_METHODS
            and not (is_json(content_type) or _is_multipart(content_type))
        ):
            raise BodyError(
                415,
                f"the request body must be JSON (send 'Content-Type: application/json'; multipart/form-data "
                f"for file uploads), got Content-Type {content_type!r}",
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.body_timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
                raise BodyError(
                    408,
                    f"the request body took longer than {self.settings.body_timeout_s} s to arrive "
                    "(body_timeout_s)",
                ) from None
            if message["type"] == "http.disconnect":
                raise BodyError(400, "the client disconnected while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyError(413, _too_large(None, limit))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and is_json(content_type):
            if len(body) > 2**16:  # a big body (an init image) parses off the event loop
                await run_in_threadpool(parse_json, body)
            else:
                parse_json(body)
        return body


def _too_large(declared: int | None, limit: int) -> str:
    size = f"of {declared} bytes " if declared is not None else ""
    return f"the request body {size}is larger than the limit of {limit} bytes (max_body_bytes)"


# ----------------------------------------------------------------------------------------------------------------------
# uvicorn's h11 protocol with a header timeout


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol class, closing a connection that has not sent a complete request line and headers
    within `seconds` of connecting (or of its first byte after a previous response).

    uvicorn arms a timer only between requests (`timeout_keep_alive`), not while it waits for a request's headers.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # still no complete request line and headers

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:
                self._arm()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol


# ----------------------------------------------------------------------------------------------------------------------
# Text lengths

PROMPT_FIELDS = frozenset(
    {"prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt", "infotext", "comments"}
)
# images (bounded by max_upload_bytes) and opaque script payloads (refused or ignored by the compatibility rules)
UNBOUNDED_TEXT_FIELDS = frozenset(
    {"init_images", "mask", "latent_mask", "firstpass_image", "image", "alwayson_scripts", "script_args"}
)


def check_text_lengths(body: Any, settings: Any) -> None:
    """Raise `LimitError` naming the first string in a request body (a pydantic model) that is too long.

    Prompt-like fields (`PROMPT_FIELDS`, an infotext holds two prompts) may have `max_prompt_chars` characters
    (twice that for `infotext`); every other string, at any depth (list items, dict keys and values), has
    `max_text_chars`, except images and script payloads (`UNBOUNDED_TEXT_FIELDS`).
    """
    from lcmkit.server.jobs import LimitError

    values = {name: getattr(body, name, None) for name in type(body).model_fields}
    values.update(body.model_extra or {})
    for name, value in values.items():
        if name in UNBOUNDED_TEXT_FIELDS or value is None:
            continue
        if name in PROMPT_FIELDS:
            limit, setting = settings.max_prompt_chars * (2 if name == "infotext" else 1), "max_prompt_chars"
        else:
            limit, setting = settings.max_text_chars, "max_text_chars"
        stack: list[tuple[tuple[Any, ...], Any]] = [((name,), value)]
        while stack:
            where, item = stack.pop()
            if isinstance(item, dict):
                stack.extend(((*where, k), k) for k in item)  # keys are text too
                stack.extend(((*where, k), v) for k, v in item.items())
            elif isinstance(item, list | tuple):
                stack.extend(((*where, i), v) for i, v in enumerate(item))
            elif isinstance(item, str) and len(item) > limit:
                raise LimitError(
                    f"{_path(where)} is {len(item)} characters long; the limit is {limit} ({setting})",
                    _path(where),
                )


# ----------------------------------------------------------------------------------------------------------------------
# Request models


def _json_kind(annotation: Any) -> str | None:
    """ "integer", "number" or "boolean" for a field of int, float (or int | float), bool, each optionally None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = set(typing.get_args(annotation)) - {type(None)}
    else:
        members = {annotation}
    if members == {int}:
        return "integer"
    if members and members <= {int, float}:
        return "number"
    return "boolean" if members == {bool} else None


# pydantic's own error type and wording for each kind, so that clients see one vocabulary
_TYPE_ERRORS = {
    "integer": ("int_type", "Input should be a valid integer"),
    "number": ("float_type", "Input should be a valid number"),
    "boolean": ("bool_type", "Input should be a valid boolean"),
}


class RequestBody(BaseModel):
    """Base of the JSON request bodies: numbers must be finite JSON numbers and booleans JSON booleans.

    Python's `json` and pydantic's lax mode accept NaN and Infinity (also "1e400" and "nan" in strings), `true` as
    the integer 1, `0` or "yes" as false/true and "4" as a number. A NaN guidance scale makes a black image and
    `steps: true` one step, and none of these is what the published schema (or OpenAI) accepts, so each is refused
    naming the field (422 on A1111 routes, 400 on OpenAI's).
    """

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _json_types(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if value is None or field is None:
            return value
        kind = _json_kind(field.annotation)
        if kind is None:
            return value
        ok = isinstance(value, bool) if kind == "boolean" else isinstance(value, int | float)
        if not ok or (kind != "boolean" and isinstance(value, bool)):
            error_type, message = _TYPE_ERRORS[kind]
            got = f"{type(value).__name__} {_short(value)}"
            raise PydanticCustomError(error_type, message + ", got {got}", {"got": got})
        return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
