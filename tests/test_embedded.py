"""The embedded server's tuning, on a throwaway embedded server of its own (never on the server
named by TAMMA_EVENTS_TEST_DSN). Nothing here encodes events: codec_neutral."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

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
