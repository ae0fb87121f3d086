"""A real uvicorn server for the HTTP tests, on 127.0.0.1 in a background thread."""

from __future__ import annotations

import threading
import time

import uvicorn
from starlette.applications import Starlette

#: How long a server may take to start, and to stop: bounds for a hang.
START_TIMEOUT = 120.0


class LiveServer:
    """An app on a real uvicorn server on 127.0.0.1 (a free port), in a background thread."""

    def __init__(self, app: Starlette) -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            log_config=None,
            access_log=False,
            # A stream still open at shutdown (a failing test) is cancelled after this long.
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(60)
        assert not self.thread.is_alive(), "uvicorn did not shut down"
