"""The embedded server's tuning, on a throwaway embedded server of its own (never on the server
named by TAMMA_EVENTS_TEST_DSN). Nothing here encodes events: codec_neutral."""

from __future__ import annotations

import re
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
