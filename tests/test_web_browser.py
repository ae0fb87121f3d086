"""A real browser follows the stream: headless Chromium opens an ``EventSource`` on
``/events/stream`` of `tamma_events.streaming.web.create_app`, served by uvicorn on 127.0.0.1 over
the real test PostgreSQL, and reports what it received.

The page is served from the app's origin (an outer Starlette app adds ``/page.html``, ``/ready``
and ``/report`` in front of the store's app), so the browser needs no CORS. The browser must get
the stored events and one appended after it connected, each with its position as
``lastEventId``, its type as the event name and the event as JSON, and closing the
``EventSource`` must release the subscription.

Chromium is found on PATH (``chromium`` or ``chromium-browser``). Without it the test skips,
unless ``TAMMA_EVENTS_BROWSER_TESTS=required`` (as CI sets it), when it fails.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route

from _web_support import LiveServer
from tamma_events import DomainEvent, EventStore, SequencedEvent
from tamma_events.streaming.web import create_app

# Past the bounds below and a server's start, so that those report what hung.
pytestmark = pytest.mark.timeout(600)

BROWSER_TESTS_ENV = "TAMMA_EVENTS_BROWSER_TESTS"
#: Bounds for a hang (Chromium's first start on a cold CI machine can be slow), not timings.
BROWSER_START = 120.0
WAIT_FOR = 60.0

#: The event types the page listens for, by name.
TYPES = ("IssueCreated", "IssueAssigned", "CommentAdded")
STORED = 4
LIVE = 1


def chromium_path() -> str:
    """The Chromium to run. When there is none, the test is skipped, or failed if
    ``TAMMA_EVENTS_BROWSER_TESTS=required`` says the browser tests must run (as in CI)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is not None:
        return path
    if os.environ.get(BROWSER_TESTS_ENV) == "required":
        pytest.fail(
            f"{BROWSER_TESTS_ENV}=required but Chromium is not installed (neither chromium nor"
            " chromium-browser is on PATH): install it, e.g. apt-get install chromium",
            pytrace=False,
        )
    pytest.skip(
        "Chromium is not installed (neither chromium nor chromium-browser is on PATH): install"
        f" it to run the browser test; {BROWSER_TESTS_ENV}=required makes its absence a failure"
    )


# -- the page and its server ---------------------------------------------------------------------

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>tamma-events stream</title>
<script>
const expected = %(count)d;
const got = [];
let ready = false;
const post = (path, body) =>
  fetch(path, {method: 'POST', headers: {'Content-Type': 'application/json'},
               body: JSON.stringify(body)});
const source = new EventSource('/events/stream?after=0');
source.onopen = () => {
  if (!ready) { ready = true; post('/ready', {}); }
};
const receive = (e) => {
  got.push({id: e.lastEventId, type: e.type, event: JSON.parse(e.data)});
  if (got.length === expected) { source.close(); post('/report', {events: got}); }
};
for (const type of %(types)s) source.addEventListener(type, receive);
source.onmessage = (e) => post('/report', {error: 'an unnamed message', data: e.data, events: got});
source.onerror = () => post('/report', {error: 'EventSource error', state: source.readyState,
                                        events: got});
</script>
"""


def page_app(store: EventStore, messages: queue.Queue[tuple[str, Any]]) -> Starlette:
    """The store's app, with the page and the two routes it posts to in front of it."""

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE % {"count": STORED + LIVE, "types": json.dumps(TYPES)})

    async def ready(request: Request) -> Response:
        messages.put(("ready", await request.json()))
        return Response(status_code=204)

    async def report(request: Request) -> Response:
        messages.put(("report", await request.json()))
        return Response(status_code=204)

    return Starlette(
        routes=[
            Route("/page.html", page, methods=["GET"]),
            Route("/ready", ready, methods=["POST"]),
            Route("/report", report, methods=["POST"]),
            Mount("", app=create_app(store, heartbeat=1.0)),
        ]
    )


@pytest.fixture
def serve(store: EventStore) -> Iterator[Any]:
    """Runs an app on uvicorn on 127.0.0.1 in a background thread; returns its base URL.
    Depends on ``store`` so that the server stops before the store is closed."""
    servers: list[LiveServer] = []

    def start(app: Starlette) -> str:
        servers.append(LiveServer(app))
        return servers[-1].url

    yield start
    for server in servers:
        server.stop()


# -- the browser ---------------------------------------------------------------------------------


class Browser:
    """Headless Chromium showing one URL, in a process group of its own."""

    def __init__(self, executable: str, url: str, home: Path) -> None:
        self.process = subprocess.Popen(
            [
                executable,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                f"--user-data-dir={home / 'profile'}",
                url,
            ],
            # Chromium's crash handler and dconf write under $HOME.
            env={**os.environ, "HOME": str(home)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def close(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def expect(self, messages: queue.Queue[tuple[str, Any]], kind: str, timeout: float) -> Any:
        """The page's next message, which must be ``kind``; fails if the browser exits or says
        something else first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                got, body = messages.get(timeout=0.2)
            except queue.Empty:
                code = self.process.poll()
                assert code is None, f"Chromium exited with {code} before the page posted {kind}"
                assert time.monotonic() < deadline, f"the page did not post {kind}"
                continue
            assert got == kind and "error" not in body, f"the page posted {got}: {body}"
            return body


def wait_until_no_subscription(store: EventStore) -> bool:
    deadline = time.monotonic() + WAIT_FOR
    while store.subscriptions:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def issue_event(i: int) -> DomainEvent:
    return DomainEvent(
        TYPES[i % len(TYPES)],
        {"n": i, "title": f"Ünïcode issue ✓ #{i}", "labels": ["bug", "ui"], "points": 2.5},
        {"issueId": f"I-{i}", "provider": "github"},
        {"actor": "browser-test"},
        timestamp=datetime(2026, 3, 1, 12, i, tzinfo=timezone.utc),
    )


# -- tests ---------------------------------------------------------------------------------------


def test_a_browser_event_source_receives_stored_and_live_events(
    store: EventStore, serve: Any, tmp_path: Path
) -> None:
    executable = chromium_path()
    store.append_batch([issue_event(i) for i in range(STORED)])
    messages: queue.Queue[tuple[str, Any]] = queue.Queue()
    base = serve(page_app(store, messages))
    browser = Browser(executable, f"{base}/page.html", tmp_path)
    try:
        browser.expect(messages, "ready", BROWSER_START)
        # The EventSource is open: this one reaches it live.
        store.append(issue_event(STORED))
        report = browser.expect(messages, "report", WAIT_FOR)
        # The page closed its EventSource: the server lets the subscription go.
        assert wait_until_no_subscription(store), "the closed EventSource kept its subscription"
    finally:
        browser.close()

    stored = store.read().events
    assert len(stored) == STORED + LIVE
    received = report["events"]
    assert [r["id"] for r in received] == [str(e.position) for e in stored]
    assert [r["type"] for r in received] == [e.event_type for e in stored]
    assert {r["type"] for r in received} == set(TYPES)
    for got, event in zip(received, stored, strict=True):
        # What the browser parsed is the whole stored event, Unicode included.
        assert got["event"]["data"]["title"] == f"Ünïcode issue ✓ #{event.data['n']}"
        assert msgspec.convert(got["event"], SequencedEvent, strict=False) == event


def test_chromium_path_skips_or_fails_without_chromium(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(BROWSER_TESTS_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="install"):
        chromium_path()
    monkeypatch.setenv(BROWSER_TESTS_ENV, "yes")
    with pytest.raises(pytest.skip.Exception):
        chromium_path()
    monkeypatch.setenv(BROWSER_TESTS_ENV, "required")
    with pytest.raises(pytest.fail.Exception, match="Chromium is not installed"):
        chromium_path()

    for name in ("chromium-browser", "chromium"):
        fake = tmp_path / name
        fake.write_text("#!/bin/sh\n")
        fake.chmod(0o755)
        assert chromium_path() == str(fake)
