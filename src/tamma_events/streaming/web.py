"""The store over HTTP: an ASGI app (Starlette) with a Server-Sent Events stream.

Routes:

- ``GET /events/stream`` follows the log as Server-Sent Events. The first frame is ``id: <the
  position it starts after>`` alone (it sets the client's last event id and dispatches nothing,
  so a client that drops before any event reconnects from there). Each event is one frame,
  ``id: <position>``, ``event: <event type>`` and ``data: <the event as JSON>``. It starts after
  the position in the ``Last-Event-ID`` header (what a browser's ``EventSource`` sends when it
  reconnects), else after ``?after=N``, else at the current head (new events only; ``after=0``
  replays the log). A comment line is sent every ``heartbeat`` seconds, so proxies keep an idle
  connection open, and a client that disconnects (or stops reading for ``send_timeout``
  seconds) has its subscription closed.
- ``GET /events`` returns one page of events as JSON, ``{"events": [...], "next_token": ...}``;
  pass ``next_token`` as ``?token=`` for the next page, and ``?page_size=`` (default 100).
- ``GET /metrics`` is the store's metrics in Prometheus' text format (`EventStore.metrics`,
  through `EventStore.prometheus_registry`).
- ``GET /health`` returns ``{"status": "ok", "head": ..., "subscriptions": ..., "consumers":
  [...]}`` (each durable consumer's name, partitions, workers alive, largest lag in positions
  and seconds, and parked events), or 503 with
  ``"status": "unavailable"`` when PostgreSQL cannot be reached.

Both event routes take the filter parameters of `tamma_events.filters.filter_from_params`
(``type``, ``tag=key:value``, ``issue_id``, ``start_time``, ...); ``/events`` also takes
``order_by`` and ``order_direction``. A malformed request gets 400 with the store's error,
``{"error": {"code": ..., "message": ..., "context": {"field": ...}}}``; a storage failure gets
503.

With a ``token``, every route except ``/health`` requires ``Authorization: Bearer <token>`` and
answers 401 otherwise. (A browser's ``EventSource`` cannot send that header: put the app behind
a proxy that adds it, or run it without a token on a trusted network.)

Needs the ``web`` extra: ``pip install "tamma-events[web]"``.
"""

from __future__ import annotations

import hmac
import logging
import re
import sys
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote_plus

import msgspec
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from tamma_events.checks import MAX_BIGINT, seconds, whole
from tamma_events.errors import STORAGE_ERROR, EventStoreError, QueryError, short_repr
from tamma_events.filters import filter_from_params
from tamma_events.stores.store import EventStore
from tamma_events.streaming.subscriptions import Subscription

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_DIGITS = re.compile(r"[0-9]{1,19}")
_encode = msgspec.json.Encoder().encode


def create_app(
    store: EventStore,
    *,
    token: str | None = None,
    heartbeat: float = 15.0,
    send_timeout: float = 60.0,
    buffer: int = 1_000,
    page_size: int = 100,
) -> Starlette:
    """An ASGI app serving ``store`` (see the module's documentation for the routes). The
    caller keeps ownership of the store and closes it after the server stops."""
    if token is not None and (not isinstance(token, str) or not token):
        raise ValueError("token must be a non-empty string or None")
    for name, value in (("heartbeat", heartbeat), ("send_timeout", send_timeout)):
        seconds(value, name, "a positive number of seconds", finite=False, error=_value_error)
    for name, value in (("buffer", buffer), ("page_size", page_size)):
        whole(value, name, "a positive int", low=1, high=sys.maxsize, error=_value_error)

    async def health(request: Request) -> Response:
        try:
            head = await run_in_threadpool(store.head)
            consumers = await run_in_threadpool(store.consumers)
        except EventStoreError as exc:
            return JSONResponse({"status": "unavailable", "error": exc.to_dict()}, 503)
        return JSONResponse(
            {
                "status": "ok",
                "head": head,
                "subscriptions": store.subscriptions,
                "consumers": [
                    {
                        "name": state.name,
                        "partitions": len(state.partitions),
                        "workers": len(state.workers),
                        "lag_positions": state.lag_positions,
                        "lag_seconds": state.lag_seconds,
                        "parked": state.parked,
                    }
                    for state in consumers
                ],
            }
        )

    async def events(request: Request) -> Response:
        try:
            params = _params(request)
            size = _integer(params.pop("page_size", None), "page_size", page_size)
            assert size is not None
            token_ = _single(params.pop("token", None), "token")
            event_filter = filter_from_params(params, others=("page_size", "token"))
            page = await run_in_threadpool(
                lambda: store.get_page(event_filter, page_size=size, token=token_)
            )
        except EventStoreError as exc:
            return _error_response(exc)
        return Response(_encode(page), media_type="application/json")

    async def stream(request: Request) -> Response:
        try:
            params = _params(request)
            after = _integer(params.pop("after", None), "after", None)
            last_event_id = request.headers.get("last-event-id")
            if last_event_id:
                after = _integer([last_event_id], "Last-Event-ID", None)
            event_filter = filter_from_params(params, ordered=False, others=("after",))
            if after is None:
                after = await run_in_threadpool(store.head)
            subscription = store.subscribe(event_filter, after=after, buffer=buffer)
        except EventStoreError as exc:
            return _error_response(exc)
        return _EventStream(
            _frames(subscription),
            ping=heartbeat,
            send_timeout=send_timeout,
            background=BackgroundTask(subscription.stop),
        )

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        # The collector reads the pool and the replicas: off the event loop.
        body = await run_in_threadpool(generate_latest, store.prometheus_registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/events", events, methods=["GET"]),
            Route("/events/stream", stream, methods=["GET"]),
        ]
    )
    if token is not None:
        app.add_middleware(_BearerAuth, token=token)
    return app


class _EventStream(EventSourceResponse):
    """An event stream that drops a client which stopped reading without logging it as an
    error: that client reconnects with its ``Last-Event-ID`` and loses nothing."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            logger.info("tamma-events: dropped a stream client that stopped reading")
            if self.background is not None:
                await self.background()


async def _frames(subscription: Subscription) -> AsyncIterator[ServerSentEvent]:
    try:
        # An id without data sets the client's last event id without dispatching an event, so
        # a client that reconnects before any event matched resumes from where it started.
        yield ServerSentEvent(id=str(subscription.position))
        async for event in subscription:
            yield ServerSentEvent(
                _encode(event).decode(), event=event.event_type, id=str(event.position)
            )
    finally:
        subscription.stop()


def _params(request: Request) -> dict[str, list[str]]:
    """The query's parameters, each with all its values. Decoded strictly: percent-encoded
    bytes that are not UTF-8 (which Starlette would turn into U+FFFD, and so match the wrong
    events) are a QUERY_ERROR naming the parameter."""
    params: dict[str, list[str]] = {}
    raw = request.scope.get("query_string", b"").decode("latin-1")
    for pair in raw.split("&"):
        if not pair:
            continue
        name, _, value = pair.partition("=")
        try:
            name = unquote_plus(name, errors="strict")
        except UnicodeDecodeError:
            raise QueryError(
                "a parameter's name is not UTF-8", {"field": short_repr(name)}
            ) from None
        try:
            text = unquote_plus(value, errors="strict")
        except UnicodeDecodeError:
            raise QueryError(f"parameter {name} is not UTF-8 text", {"field": name}) from None
        params.setdefault(name, []).append(text)
    return params


def _single(values: list[str] | None, name: str) -> str | None:
    if not values:
        return None
    if len(values) > 1:
        raise QueryError(f"{name} may be given once, got {len(values)} values", {"field": name})
    return values[0]


def _integer(values: list[str] | None, name: str, default: int | None) -> int | None:
    value = _single(values, name)
    if value is None:
        return default
    if not _DIGITS.fullmatch(value) or int(value) > MAX_BIGINT:
        raise QueryError(
            f"{name} must be an integer from 0 to 2**63-1, got {value!r}",
            {"field": name},
        )
    return int(value)


def _error_response(exc: EventStoreError) -> Response:
    status = 503 if exc.code == STORAGE_ERROR else 400
    return JSONResponse({"error": exc.to_dict()}, status)


class _BearerAuth:
    """Answers 401 to any request but ``/health`` without ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            if not self._authorized(scope):
                response = JSONResponse(
                    {
                        "error": {
                            "code": "UNAUTHORIZED",
                            "message": "this route needs an Authorization: Bearer token",
                            "context": {},
                        }
                    },
                    401,
                    headers={"WWW-Authenticate": 'Bearer realm="tamma-events"'},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header: Any = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        scheme, _, credentials = bytes(header).partition(b" ")
        # Compared in constant time, so a response's timing says nothing about the token.
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials, self.expected)


def _value_error(message: str, context: dict[str, Any]) -> ValueError:
    return ValueError(message)
