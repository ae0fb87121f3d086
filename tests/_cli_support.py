"""What the tests that run the installed ``tamma-events`` console script share: where it is,
running it, and a loopback port for ``serve`` or a server that is not there."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

#: The console script of this environment (not ``python -m``: the entry point itself).
SCRIPT = Path(sys.executable).with_name("tamma-events")


def cli(
    *args: str, env: dict[str, str], stdin: bytes | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the console script with ``args``; ``timeout`` bounds a hang, generous for a busy
    machine, never a measure of speed."""
    assert SCRIPT.exists(), f"the tamma-events console script is not installed at {SCRIPT}"
    done = subprocess.run(
        [str(SCRIPT), *args], input=stdin, capture_output=True, env=env, timeout=timeout
    )
    return subprocess.CompletedProcess(
        done.args,
        done.returncode,
        done.stdout.decode(errors="replace"),
        done.stderr.decode(errors="replace"),
    )


def free_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
