"""The HTTP app (`tamma_events.streaming.web.create_app`) served by a real uvicorn on 127.0.0.1,
read with a real HTTP client (httpx), over the real test PostgreSQL.

The Server-Sent Events frames are parsed here, line by line, as a browser would: what the stream
sends must be the store's events, each once, in log order, from where the client asked (``after``,
``Last-Event-ID``, the head), live as they are appended, filtered as asked; a client that goes
away must leave no subscription behind. ``/events`` walks the same events page by page, and every
malformed request is a 400 carrying the store's error.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import msgspec
import pytest
from starlette.applications import Starlette

from _web_support import LiveServer
from tamma_events import DomainEvent, EventFilter, EventStore, Page, SequencedEvent, new_event_id
from tamma_events.ops.migrating import drop
from tamma_events.streaming.web import create_app

# A hung stream fails the test instead of holding up the run; past the bounds below (a server's
# start, a read, a wait), so that those report what hung.
pytestmark = pytest.mark.timeout(300)

#: How long a client waits for the next bytes, and a test for the server to catch up, before
#: failing: a bound for a hang, never a measurement.
READ_TIMEOUT = 60.0
WAIT_FOR = 60.0
#: Short heartbeats, so that idle streams talk and the comment frames get exercised everywhere.
HEARTBEAT = 0.2
TOKEN = "s3cret-token"
BASE = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)

decode_event = msgspec.json.Decoder(SequencedEvent).decode
decode_page = msgspec.json.Decoder(Page).decode


# One TLS context for every client: httpx builds one per client otherwise, at some 90 ms each
# (every URL here is plain http on 127.0.0.1 anyway).
TLS = ssl.create_default_context()


def http_client(base: str = "") -> httpx.Client:
    """A client with the tests' read timeout, ignoring proxy settings from the environment."""
    return httpx.Client(base_url=base, timeout=READ_TIMEOUT, verify=TLS, trust_env=False)


def request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request on a connection of its own."""
    with http_client() as client:
        return client.request(method, url, **kwargs)


# -- the server ----------------------------------------------------------------------------------


@pytest.fixture
def serve(store: EventStore) -> Iterator[Callable[[Starlette], str]]:
    """Starts apps on servers; returns each one's base URL. Depends on ``store`` so that the
    servers stop before the store is closed."""
    running: list[LiveServer] = []

    def start(app: Starlette) -> str:
        running.append(LiveServer(app))
        return running[-1].url

    yield start
    for server in running:
        server.stop()


@pytest.fixture(scope="module")
def shared(pg_dsn: str) -> Iterator[tuple[EventStore, str]]:
    """One store holding 3 events and one server, for the tests that only read: the bad
    requests, each of which must leave both as they were."""
    schema = f"web_{uuid.uuid4().hex[:12]}"
    store = EventStore(pg_dsn, schema=schema)
    try:
        append_sample(store, 3)
        server = LiveServer(create_app(store, heartbeat=HEARTBEAT))
        try:
            yield store, server.url
        finally:
            server.stop()
    finally:
        store.close()
        drop(pg_dsn, schema)


# -- a Server-Sent Events client -----------------------------------------------------------------


@dataclass
class Frame:
    """One SSE frame: its fields, and its comment lines (a heartbeat has only those)."""

    id: str | None = None
    event: str | None = None
    data: str | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def is_heartbeat(self) -> bool:
        return bool(self.comments) and (self.id, self.event, self.data) == (None, None, None)

    @property
    def is_start(self) -> bool:
        """An id without an event: it sets the client's last event id and dispatches nothing."""
        return self.id is not None and (self.event, self.data) == (None, None)


class StreamEnded(Exception):
    pass


class Stream:
    """``GET /events/stream`` on its own connection, read frame by frame."""

    def __init__(
        self,
        base: str,
        params: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.client = http_client(base)
        try:
            built = self.client.build_request(
                "GET", "/events/stream", params=params, headers=headers
            )
            self.response = self.client.send(built, stream=True)
        except BaseException:
            self.client.close()
            raise
        self._lines = self.response.iter_lines()
        if self.response.status_code != 200:
            body = self.response.read().decode()
            self.close()
            raise AssertionError(f"the stream answered {self.response.status_code}: {body}")
        assert self.response.headers["content-type"].startswith("text/event-stream")
        # The stream opens with an id-only frame: the position it starts after.
        first = self.frame()
        assert first.is_start, f"the stream did not open with its start position: {first}"
        self.start = int(first.id or "")

    def close(self) -> None:
        self.response.close()
        self.client.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def frame(self) -> Frame:
        """The next frame, heartbeats included; StreamEnded when the server ends the stream."""
        frame = Frame()
        started = False
        for line in self._lines:
            if line == "":
                if started:
                    return frame
                continue
            started = True
            if line.startswith(":"):
                frame.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                frame.data = value if frame.data is None else f"{frame.data}\n{value}"
            elif name in ("id", "event"):
                assert getattr(frame, name) is None, f"{name} twice in one frame"
                setattr(frame, name, value)
            else:
                raise AssertionError(f"unexpected SSE line {line!r}")
        raise StreamEnded(f"the stream ended (a frame was half read: {started})")

    def events(self, count: int) -> list[Frame]:
        """The next ``count`` event frames, skipping heartbeats."""
        frames: list[Frame] = []
        while len(frames) < count:
            frame = self.frame()
            if not frame.is_heartbeat:
                assert frame.comments == [], f"an event frame with comments: {frame}"
                frames.append(frame)
        return frames

    def positions(self, count: int) -> list[int]:
        return [int(frame.id or "") for frame in self.events(count)]


# -- helpers -------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout: float = WAIT_FOR) -> bool:
    """Whether ``condition()`` held within ``timeout`` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def event_at(i: int) -> DomainEvent:
    """The i-th event of the sample log: three types, two issues, some PRs, two providers, and
    timestamps out of position order, with ties (two events per second)."""
    tags = {"issueId": f"I-{i % 2 + 1}", "provider": "github" if i % 4 < 2 else "gitlab"}
    if i % 5 == 0:
        tags["prId"] = f"P-{i % 3}"
    return DomainEvent(
        "ABC"[i % 3],
        {"i": i, "text": "ünïcødé ✓", "nested": {"list": [1, 2.5, None, True]}},
        tags,
        {"source": "test_web"},
        timestamp=BASE + timedelta(seconds=(i * 7) % 15),
    )


def append_sample(store: EventStore, count: int, start: int = 0) -> None:
    store.append_batch([event_at(i) for i in range(start, start + count)])


def assert_frames_are(frames: list[Frame], expected: list[SequencedEvent]) -> None:
    """Each frame is its event: ``id`` the position, ``event`` the type, ``data`` the event."""
    assert [frame.id for frame in frames] == [str(event.position) for event in expected]
    assert [frame.event for frame in frames] == [event.event_type for event in expected]
    for frame, event in zip(frames, expected, strict=True):
        assert frame.data is not None
        assert decode_event(frame.data) == event


def walk_pages(base: str, params: list[tuple[str, str]], page_size: int) -> list[SequencedEvent]:
    """Every page of ``/events``, following ``next_token``."""
    events: list[SequencedEvent] = []
    token: str | None = None
    pages = 0
    with http_client(base) as client:
        while True:
            query = [*params, ("page_size", str(page_size))]
            if token is not None:
                query.append(("token", token))
            response = client.get("/events", params=query)
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "application/json"
            page = decode_page(response.content)
            assert len(page.events) <= page_size
            pages += 1
            events.extend(page.events)
            if page.next_token is None:
                break
            assert len(page.events) == page_size, "only the last page may be short"
            token = page.next_token
    assert pages == max(1, -(-len(events) // page_size))
    return events


def assert_query_error(response: httpx.Response, field_name: str) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"code", "message", "context"}
    assert error["code"] == "QUERY_ERROR"
    assert isinstance(error["message"], str) and error["message"]
    assert error["context"]["field"] == field_name, error
    return dict(error)


# -- 1. the frames -------------------------------------------------------------------------------


def test_frames_carry_position_type_and_the_event_as_json(
    store: EventStore, serve: Callable[[Starlette], str]
) -> None:
    append_sample(store, 12)
    stored = store.read().events
    base = serve(create_app(store, heartbeat=HEARTBEAT))
    with Stream(base, {"after": "0"}) as stream:
        frames = stream.events(len(stored))
        assert stream.response.headers["cache-control"] == "no-store"
    assert_frames_are(frames, stored)
    for frame, event in zip(frames, stored, strict=True):
        data = json.loads(frame.data or "")
        assert data["event_id"] == str(event.event_id)
        assert data["position"] == event.position == int(frame.id or "")
        assert data["event_type"] == event.event_type == frame.event
        assert data["data"] == event.data
        assert data["data"]["text"] == "ünïcødé ✓"
        assert data["tags"] == event.tags
        assert data["metadata"] == {"source": "test_web"}
        assert datetime.fromisoformat(data["timestamp"]) == event.timestamp


def test_an_idle_stream_sends_heartbeat_comments(
    store: EventStore, serve: Callable[[Starlette], str]
) -> None:
    append_sample(store, 2)
    base = serve(create_app(store, heartbeat=HEARTBEAT))
    # No ``after``: the stream starts at the head and stays idle, so all it sends is heartbeats.
    with Stream(base) as stream:
        heartbeats = [stream.frame() for _ in range(3)]
    for frame in heartbeats:
        assert frame.is_heartbeat, frame
        assert all(comment for comment in frame.comments)


# -- 2. live events ------------------------------------------------------------------------------


def test_a_connected_client_gets_new_events_and_not_the_old_ones(
    store: EventStore, serve: Callable[[Starlette], str]
) -> None:
    append_sample(store, 5)
    base = serve(create_app(store, heartbeat=HEARTBEAT))
    with Stream(base) as stream:
        # The response's headers came back: the subscription is open, at head 5.
        first = store.append(event_at(100))
        frames = stream.events(1)
        store.append_batch([event_at(101), event_at(102)])
        frames += stream.events(2)
    assert first == 6
    assert_frames_are(frames, store.read(after=5).events)


def test_two_clients_each_get_every_live_event(
    store: EventStore, serve: Callable[[Starlette], str]
) -> None:
    base = serve(create_app(store, heartbeat=HEARTBEAT))
    with Stream(base) as one, Stream(base, {"after": "0"}) as two:
        for i in range(4):
            store.append(event_at(i))
        got_one, got_two = one.events(4), two.events(4)
    stored = store.read().events
    assert_frames_are(got_one, stored)
    assert_frames_are(got_two, stored)


# -- 3. resuming ---------------------------------------------------------------------------------


def test_last_event_id_resumes_without_loss_or_repetition(
    store: EventStore, serve: Callable[[Starlette], str]
) -> None:
    append_sample(store, 6)
    base = serve(create_app(store, heartbeat=HEARTBEAT))
    with Stream(base, {"after": "0"}) as stream:
        first = stream.events(3)
    append_sample(store, 4, start=6)
    last_id = first[-1].id
    assert last_id == "3"
    # Last-Event-ID wins over ?after=1, which would repeat positions 2 and 3.
    with Stream(base, {"after": "1"}, {"Last-Event-ID": last_id}) as stream:
        second = stream.events(7)
        store.append(event_at(10))
        second += stream.events(1)
    assert_frames_are(first + second, store.read().events)
    assert [int(f.id or "") for f in first + second] == list(range(1, 12))

    # An empty Last-Event-ID (a client that saw no event with an id) leaves ?after in charge.
    with Stream(base, {"after": "9"}, {"Last-Event-ID": ""}) as stream:
        assert stream.positions(2) == [10, 11]


# -- 4. authentication ---------------------------------------------------------------------------


def test_a_token_guards_every_route_but_health(
    store: EventStore, serve: Callable[[Starlette], str]
) -> None:
    append_sample(store, 3)
    base = serve(create_app(store, token=TOKEN, heartbeat=HEARTBEAT))
    wrong: dict[str, dict[str, str]] = {
        "no header": {},
        "wrong token": {"Authorization": "Bearer not-the-token"},
        "token prefix": {"Authorization": f"Bearer {TOKEN[:-1]}"},
        "token with more": {"Authorization": f"Bearer {TOKEN}x"},
        "basic scheme": {"Authorization": "Basic dXNlcjpzM2NyZXQtdG9rZW4="},
        "token without scheme": {"Authorization": TOKEN},
        "scheme without token": {"Authorization": "Bearer"},
    }
    with http_client(base) as client:
        for path in ("/events", "/events/stream?after=0", "/events/stream", "/no/such/route"):
            for label, headers in wrong.items():
                response = client.get(path, headers=headers)
                assert response.status_code == 401, (path, label, response.text)
                assert response.headers["www-authenticate"].startswith("Bearer"), (path, label)
                assert response.json()["error"]["code"] == "UNAUTHORIZED"
        assert store.subscriptions == 0, "a refused stream opened a subscription"

        health = client.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"

        good = {"Authorization": f"Bearer {TOKEN}"}
        events = client.get("/events", headers=good)
        assert events.status_code == 200
        assert decode_page(events.content).events == store.read().events
        # The scheme is case-insensitive (RFC 9110 11.1).
        lower = client.get("/events", headers={"Authorization": f"bearer {TOKEN}"})
        assert lower.status_code == 200
        assert client.get("/no/such/route", headers=good).status_code == 404

    with Stream(base, {"after": "0"}, {"Authorization": f"Bearer {TOKEN}"}) as stream:
        assert_frames_are(stream.events(3), store.read().events)


def test_without_a_token_nothing_asks_for_one(
    store: EventStore, serve: Callable[[Starlette], str]
) -> None:
    base = serve(create_app(store))
    response = request("GET", f"{base}/events", headers={"Authorization": "Bearer whatever"})
    assert response.status_code == 200
    assert "www-authenticate" not in response.headers
    assert request("GET", f"{base}/no/such/route").status_code == 404


def test_create_app_refuses_an_empty_token(store: EventStore) -> None:
    with pytest.raises(ValueError, match="token"):
        create_app(store, token="")


# -- 5. disconnects ------------------------------------------------------------------------------


def health(base: str) -> dict[str, Any]:
    response = request("GET", f"{base}/health")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_a_client_that_disconnects_releases_its_subscription(
    store: EventStore, serve: Callable[[Starlette], str]
) -> None:
    append_sample(store, 3)
    # The default heartbeat (15 s): the server notices the disconnect without writing to it.
    base = serve(create_app(store))
    with Stream(base, {"after": "0"}) as stream:
        assert stream.positions(3) == [1, 2, 3]
        assert store.subscriptions == 1
        assert health(base)["subscriptions"] == 1
    assert wait_until(lambda: store.subscriptions == 0), "the subscription outlived its client"
    assert health(base)["subscriptions"] == 0
    # The server and the store carry on.
    with Stream(base, {"after": "2"}) as stream:
        assert stream.positions(1) == [3]


def test_many_clients_disconnecting_release_theirs(
    store: EventStore, serve: Callable[[Starlette], str]
) -> None:
    base = serve(create_app(store, heartbeat=HEARTBEAT))
    streams = [Stream(base, {"after": "0"}) for _ in range(6)]
    try:
        assert store.subscriptions == 6
        assert health(base)["subscriptions"] == 6
        store.append(event_at(0))
        for stream in streams:
            assert stream.positions(1) == [1]
        for stream in streams[:2]:
            stream.close()
        assert wait_until(lambda: store.subscriptions == 4), store.subscriptions
        # The ones still connected still get events.
        store.append(event_at(1))
        for stream in streams[2:]:
            assert stream.positions(1) == [2]
    finally:
        for stream in streams:
            stream.close()
    assert wait_until(lambda: store.subscriptions == 0), store.subscriptions
    assert health(base)["subscriptions"] == 0


def test_a_client_that_stops_reading_is_cut_off(
    store: EventStore, serve: Callable[[Starlette], str]
) -> None:
    base = serve(create_app(store, send_timeout=0.5, heartbeat=HEARTBEAT))
    port = int(base.rsplit(":", 1)[1])
    blob = "x" * 200_000
    # A raw connection with a small receive window, which reads the response's head and then
    # nothing: once the socket buffers are full, the server's sends block, and after
    # send_timeout it gives the client up.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(READ_TIMEOUT)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1024)
            assert chunk, "the server closed the connection"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200 ")
        assert store.subscriptions == 1
        # Up to 80 MB of events, far more than the buffers between the two ends hold.
        for _ in range(40):
            store.append_batch([DomainEvent("Big", {"blob": blob}) for _ in range(10)])
            if store.subscriptions == 0:
                break
        assert wait_until(lambda: store.subscriptions == 0), "a stalled client kept its stream"
    # The server still answers, and the store still streams: to a client of an app with the
    # default send_timeout, as half a second would cut off a reader that a busy machine slows.
    assert health(base)["subscriptions"] == 0
    with Stream(serve(create_app(store, heartbeat=HEARTBEAT)), {"after": "0"}) as stream:
        assert stream.positions(1) == [1]


def test_a_head_request_leaves_no_subscription(
    store: EventStore, serve: Callable[[Starlette], str]
) -> None:
    base = serve(create_app(store, heartbeat=HEARTBEAT))
    response = request("HEAD", f"{base}/events/stream?after=0")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert wait_until(lambda: store.subscriptions == 0), store.subscriptions


def test_closing_the_store_ends_open_streams(
    store: EventStore, serve: Callable[[Starlette], str]
) -> None:
    append_sample(store, 2)
    base = serve(create_app(store, heartbeat=HEARTBEAT))
    with Stream(base, {"after": "0"}) as stream:
        assert stream.positions(2) == [1, 2]
        store.close()
        with pytest.raises(StreamEnded):
            while True:
                frame = stream.frame()
                assert frame.is_heartbeat, f"an event after the store closed: {frame}"
    assert store.subscriptions == 0
    response = request("GET", f"{base}/health")
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert response.json()["error"]["code"] == "STORAGE_ERROR"
    for path in ("/events", "/events/stream", "/events/stream?after=0"):
        response = request("GET", f"{base}{path}")
        assert response.status_code == 503, (path, response.text)
        assert response.json()["error"]["code"] == "STORAGE_ERROR"


# -- 6. filters ----------------------------------------------------------------------------------


@dataclass
class FilterCase:
    params: list[tuple[str, str]]
    event_filter: EventFilter
    #: An event the filter matches, appended while the stream is open.
    match: DomainEvent


FILTER_CASES: dict[str, FilterCase] = {
    "type": FilterCase([("type", "A")], EventFilter(event_types=["A"]), DomainEvent("A")),
    "tag": FilterCase(
        [("tag", "issueId:I-1")],
        EventFilter(tags={"issueId": "I-1"}),
        DomainEvent("C", tags={"issueId": "I-1"}),
    ),
    "issue_id": FilterCase(
        [("issue_id", "I-2")],
        EventFilter(issue_ids=["I-2"]),
        DomainEvent("B", tags={"issueId": "I-2"}),
    ),
    "repeated type": FilterCase(
        [("type", "A"), ("type", "C")],
        EventFilter(event_types=["A", "C"]),
        DomainEvent("C"),
    ),
    "type and tag": FilterCase(
        [("type", "B"), ("tag", "issueId:I-1")],
        EventFilter(event_types=["B"], tags={"issueId": "I-1"}),
        DomainEvent("B", tags={"issueId": "I-1", "provider": "jira"}),
    ),
    "two tags and a provider": FilterCase(
        [("tag", "issueId:I-1"), ("tag", "prId:P-0"), ("provider", "github")],
        EventFilter(tags={"issueId": "I-1", "prId": "P-0"}, providers=["github"]),
        DomainEvent("Z", tags={"issueId": "I-1", "prId": "P-0", "provider": "github"}),
    ),
    "time window and types": FilterCase(
        [
            ("start_time", (BASE + timedelta(seconds=4)).isoformat()),
            ("end_time", "2026-03-01T13:00:10+01:00"),
            ("type", "A"),
            ("type", "B"),
        ],
        EventFilter(
            start_time=BASE + timedelta(seconds=4),
            end_time=BASE + timedelta(seconds=10),
            event_types=["A", "B"],
        ),
        DomainEvent("B", timestamp=BASE + timedelta(seconds=9)),
    ),
}


@pytest.mark.parametrize("case", FILTER_CASES.values(), ids=FILTER_CASES.keys())
def test_filters_select_the_same_events_on_the_stream_and_the_pages(
    store: EventStore, serve: Callable[[Starlette], str], case: FilterCase
) -> None:
    append_sample(store, 40)
    base = serve(create_app(store, heartbeat=HEARTBEAT))
    expected = store.get_events(case.event_filter)
    assert 0 < len(expected) < 40, "the case should select some events, not all"

    # The pages walk the matching events once each, in order, pinned to the head at their
    # first page: an event appended during the walk is not in it.
    pages: list[SequencedEvent] = []
    with http_client(base) as client:
        response = client.get("/events", params=[*case.params, ("page_size", "3")])
        assert response.status_code == 200, response.text
        first = decode_page(response.content)
        pages += first.events
        token = first.next_token
        store.append(case.match)
        while token is not None:
            response = client.get(
                "/events", params=[*case.params, ("page_size", "3"), ("token", token)]
            )
            assert response.status_code == 200, response.text
            page = decode_page(response.content)
            pages += page.events
            token = page.next_token
    assert pages == expected

    # Walked afresh, with other page sizes, the pages hold the appended event too.
    expected = store.get_events(case.event_filter)
    assert expected[-1].event_id == case.match.event_id
    for size in (1, 7, 1000):
        assert walk_pages(base, case.params, size) == expected

    # The stream replays the same events, then follows the log: a non-matching event appended
    # while it is open is skipped, the matching one after it is the next frame.
    with Stream(base, [*case.params, ("after", "0")]) as stream:
        assert_frames_are(stream.events(len(expected)), expected)
        store.append(DomainEvent("nomatch", tags={"issueId": "I-9"}))
        position = store.append(msgspec.structs.replace(case.match, event_id=new_event_id()))
        assert stream.positions(1) == [position]


def test_events_in_time_order_descending(
    store: EventStore, serve: Callable[[Starlette], str]
) -> None:
    append_sample(store, 30)
    base = serve(create_app(store))
    params = [("order_by", "timestamp"), ("order_direction", "desc")]
    walked = walk_pages(base, params, 4)
    expected = sorted(store.read().events, key=lambda e: (e.timestamp, e.position), reverse=True)
    assert walked == expected
    assert walked == store.get_events(EventFilter(order_by="timestamp", order_direction="desc"))
    assert [e.position for e in walked] != sorted((e.position for e in walked), reverse=True)

    typed = walk_pages(base, [*params, ("type", "B")], 3)
    assert typed == [event for event in expected if event.event_type == "B"]

    by_type = walk_pages(base, [("order_by", "type")], 5)
    assert by_type == sorted(store.read().events, key=lambda e: (e.event_type, e.position))


def test_events_default_page_size(store: EventStore, serve: Callable[[Starlette], str]) -> None:
    append_sample(store, 12)
    base = serve(create_app(store, page_size=5))
    body = decode_page(request("GET", f"{base}/events").content)
    assert body.events == store.read(limit=5).events
    assert body.next_token is not None
    empty = request("GET", f"{base}/events", params={"type": "nothing"})
    assert empty.json() == {"events": [], "next_token": None}


def test_an_unknown_parameter_names_the_known_ones(
    shared: tuple[EventStore, str],
) -> None:
    """`GET /events?limit=2`, what a newcomer tries first: 400, with the page parameters it
    meant and every parameter the route takes."""
    _store, base = shared
    error = assert_query_error(request("GET", f"{base}/events", params={"limit": "2"}), "limit")
    assert "page_size" in error["message"] and "?token=<next_token>" in error["message"]
    assert error["context"]["known"] == [
        "type", "event_id", "issue_id", "pr_id", "user_id", "provider", "platform", "tag",
        "start_time", "end_time", "order_by", "order_direction", "page_size", "token",
    ]  # fmt: skip
    stream = assert_query_error(request("GET", f"{base}/events/stream", params={"x": "1"}), "x")
    assert stream["context"]["known"][-3:] == ["start_time", "end_time", "after"]
    assert "page_size" not in stream["message"]


# -- 7. bad input --------------------------------------------------------------------------------

STREAM = "/events/stream"
EVENTS = "/events"

#: (route, query, headers, the field the error names)
BAD_REQUESTS: dict[str, tuple[str, list[tuple[str, str]], dict[str, str], str]] = {
    "stream unknown parameter": (STREAM, [("bogus", "1")], {}, "bogus"),
    "events unknown parameter": (EVENTS, [("bogus", "1")], {}, "bogus"),
    "events after": (EVENTS, [("after", "1")], {}, "after"),
    "stream tag without value": (STREAM, [("tag", "novalue")], {}, "tag"),
    "events tag without value": (EVENTS, [("tag", "novalue")], {}, "tag"),
    "tag without key": (EVENTS, [("tag", ":v")], {}, "tag"),
    "tag key twice": (STREAM, [("tag", "issueId:I-1"), ("tag", "issueId:I-2")], {}, "tag"),
    "after negative": (STREAM, [("after", "-1")], {}, "after"),
    "after not a number": (STREAM, [("after", "abc")], {}, "after"),
    "after empty": (STREAM, [("after", "")], {}, "after"),
    "after fractional": (STREAM, [("after", "1.5")], {}, "after"),
    "after twice": (STREAM, [("after", "1"), ("after", "2")], {}, "after"),
    "after of 20 digits": (STREAM, [("after", "1" + "0" * 19)], {}, "after"),
    "last-event-id not a number": (STREAM, [], {"Last-Event-ID": "abc"}, "Last-Event-ID"),
    "last-event-id negative": (STREAM, [("after", "0")], {"Last-Event-ID": "-3"}, "Last-Event-ID"),
    "page_size zero": (EVENTS, [("page_size", "0")], {}, "page_size"),
    "page_size not a number": (EVENTS, [("page_size", "ten")], {}, "page_size"),
    "page_size too large": (EVENTS, [("page_size", "100001")], {}, "page_size"),
    "page_size twice": (EVENTS, [("page_size", "1"), ("page_size", "2")], {}, "page_size"),
    "stream start_time": (STREAM, [("start_time", "yesterday")], {}, "start_time"),
    "events start_time": (EVENTS, [("start_time", "yesterday")], {}, "start_time"),
    "naive start_time": (EVENTS, [("start_time", "2026-03-01T12:00:00")], {}, "start_time"),
    "end before start": (
        EVENTS,
        [("start_time", "2026-03-02T00:00:00Z"), ("end_time", "2026-03-01T00:00:00Z")],
        {},
        "end_time",
    ),
    "start_time twice": (
        STREAM,
        [("start_time", "2026-03-01T00:00:00Z"), ("start_time", "2026-03-02T00:00:00Z")],
        {},
        "start_time",
    ),
    "stream order_by": (STREAM, [("order_by", "timestamp")], {}, "order_by"),
    "stream order_direction": (STREAM, [("order_direction", "desc")], {}, "order_direction"),
    "events order_by unknown": (EVENTS, [("order_by", "size")], {}, "order_by"),
    "events order_direction unknown": (EVENTS, [("order_direction", "up")], {}, "order_direction"),
    "malformed token": (EVENTS, [("token", "not-a-token!")], {}, "token"),
    "token of base64 garbage": (EVENTS, [("token", "AAAAAAAA")], {}, "token"),
    "empty token": (EVENTS, [("token", "")], {}, "token"),
    "token twice": (EVENTS, [("token", "a"), ("token", "b")], {}, "token"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_input_is_a_400_query_error(
    shared: tuple[EventStore, str],
    case: tuple[str, list[tuple[str, str]], dict[str, str], str],
) -> None:
    store, base = shared
    route, params, headers, field_name = case
    response = request("GET", f"{base}{route}", params=params, headers=headers)
    assert_query_error(response, field_name)
    # Nothing was written and no subscription was left open (the one of the previous case's
    # check below may still be closing).
    assert store.head() == 3
    assert wait_until(lambda: store.subscriptions == 0), store.subscriptions
    # The store and the server still work.
    response = request("GET", f"{base}/events")
    assert decode_page(response.content).events == store.read().events
    with Stream(base, {"after": "2"}) as stream:
        assert stream.positions(1) == [3]


def test_a_page_token_belongs_to_its_filter(
    store: EventStore, serve: Callable[[Starlette], str]
) -> None:
    append_sample(store, 10)
    base = serve(create_app(store))
    with http_client(base) as client:
        first = decode_page(client.get("/events", params={"type": "A", "page_size": "2"}).content)
        assert first.next_token is not None
        for other in (
            {"type": "B"},
            {"type": "A", "issue_id": "I-1"},
            {"type": "A", "order_direction": "desc"},
        ):
            response = client.get("/events", params={**other, "token": first.next_token})
            assert_query_error(response, "token")
        # The same filter, with another page size, goes on from the token.
        rest = client.get(
            "/events", params={"type": "A", "page_size": "100", "token": first.next_token}
        )
        assert rest.status_code == 200
        walked = first.events + decode_page(rest.content).events
    assert walked == store.get_events(EventFilter(event_types=["A"]))


# -- 8. health -----------------------------------------------------------------------------------


def test_health_reports_head_and_subscriptions(
    store: EventStore, serve: Callable[[Starlette], str]
) -> None:
    base = serve(create_app(store, token=TOKEN, heartbeat=HEARTBEAT))
    assert health(base) == {"status": "ok", "head": 0, "subscriptions": 0, "consumers": []}
    append_sample(store, 7)
    assert health(base) == {"status": "ok", "head": 7, "subscriptions": 0, "consumers": []}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with Stream(base, headers=auth), Stream(base, {"type": "A"}, auth):
        assert health(base) == {"status": "ok", "head": 7, "subscriptions": 2, "consumers": []}
        store.append(event_at(7))
        assert health(base) == {"status": "ok", "head": 8, "subscriptions": 2, "consumers": []}
    assert wait_until(lambda: health(base)["subscriptions"] == 0)


def test_health_lists_the_durable_consumers(
    store: EventStore, serve: Callable[[Starlette], str]
) -> None:
    base = serve(create_app(store, token=TOKEN, heartbeat=HEARTBEAT))
    append_sample(store, 7)

    def handler(events: list[SequencedEvent]) -> None:
        if any(e.position == 3 for e in events):
            raise ValueError("poison")

    store.consumer("board", partition_by="k", partitions=3, max_attempts=1).run(
        handler, until_idle=True
    )
    store.append(event_at(7))
    (board,) = health(base)["consumers"]
    # Its lag in seconds is a measure of this machine: only its type is the app's.
    assert isinstance(board.pop("lag_seconds"), float)
    assert board == {
        "name": "board",
        "partitions": 3,
        "workers": 0,
        "lag_positions": 1,
        "parked": 1,
    }


# -- positions out of range, and the parameter an error names -------------------------------


@pytest.mark.parametrize("where", ["after", "Last-Event-ID"])
def test_a_position_beyond_bigint_is_a_400(shared: tuple[EventStore, str], where: str) -> None:
    _, base = shared
    beyond = str(2**63)  # 19 digits
    if where == "after":
        params, headers = {"after": beyond}, {}
    else:
        params, headers = {}, {"Last-Event-ID": beyond}
    with http_client(base) as client:
        with client.stream("GET", "/events/stream", params=params, headers=headers) as response:
            status = response.status_code
            body = response.read() if status != 200 else b""
    assert status == 400, "the stream was opened at a position that cannot exist"
    assert json.loads(body)["error"]["context"]["field"] == where


@pytest.mark.parametrize(
    ("param", "value"),
    [("type", "\x00"), ("issue_id", "\x00"), ("event_id", "not-a-uuid"), ("tag", "k:\x00")],
)
def test_a_malformed_value_names_the_parameter(
    shared: tuple[EventStore, str], param: str, value: str
) -> None:
    _, base = shared
    response = request("GET", f"{base}/events", params={param: value})
    assert_query_error(response, param)


def test_a_stream_opens_with_its_start_position_so_an_early_reconnect_loses_nothing(
    store: EventStore, serve: Callable[[Starlette], str]
) -> None:
    append_sample(store, 4)
    base = serve(create_app(store, heartbeat=HEARTBEAT))
    with Stream(base, {"after": "2"}) as stream:
        assert stream.start == 2
    # No ``after``: the stream starts at the head. The client drops before any event arrives;
    # events are appended while it is away; it comes back with the id it was given.
    with Stream(base) as stream:
        assert stream.start == 4
        heartbeat = stream.frame()
        assert heartbeat.is_heartbeat
    append_sample(store, 3, start=4)
    with Stream(base, headers={"Last-Event-ID": str(stream.start)}) as resumed:
        assert resumed.start == 4
        assert resumed.positions(3) == [5, 6, 7]


@pytest.mark.parametrize(
    "options",
    [
        {"token": ""},
        {"heartbeat": 0},
        {"send_timeout": -1},
        {"buffer": 0},
        {"page_size": True},
    ],
)
def test_create_app_refuses_bad_options(store: EventStore, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as raised:
        create_app(store, **options)
    assert next(iter(options)) in str(raised.value)
