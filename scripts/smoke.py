"""Smoke test of an installed tamma-events: the codec that loaded, one embedded server, a small
batch appended, read back and verified, and the ``tamma-events`` entry point.

    python scripts/smoke.py native|python

Run it with the interpreter of the environment under test, from a directory outside the
repository, so that the installed package is imported rather than the source tree
(scripts/package-check does). The argument is the codec expected: ``native`` when the
extension was built, ``python`` when the install fell back to the pure-Python codec.

The embedded PostgreSQL server runs in a temporary data directory (TAMMA_EVENTS_DATA_DIR),
started for this run only and stopped, and its directory removed, before exiting. Exits
non-zero on any failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def check(condition: object, message: str) -> None:
    if not condition:
        raise SystemExit(f"smoke: FAILED: {message}")


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in ("native", "python"):
        print(__doc__, file=sys.stderr)
        return 2
    expected = sys.argv[1]
    # The store under test must be the embedded one, in a directory of this run's own.
    for name in ("TAMMA_EVENTS_DSN", "TAMMA_EVENTS_IMPL", "TAMMA_EVENTS_SCHEMA"):
        os.environ.pop(name, None)
    data_root = Path(tempfile.mkdtemp(prefix="tamma-smoke-"))
    os.environ["TAMMA_EVENTS_DATA_DIR"] = str(data_root / "pg18")
    try:
        run(expected)
    finally:
        shutil.rmtree(data_root, ignore_errors=True)
    print(f"smoke: OK ({expected} codec)")
    return 0


def run(expected: str) -> None:
    import tamma_events

    location = Path(tamma_events.__file__).resolve()
    purelib = Path(sysconfig.get_paths()["purelib"]).resolve()
    platlib = Path(sysconfig.get_paths()["platlib"]).resolve()
    check(
        location.is_relative_to(purelib) or location.is_relative_to(platlib),
        f"tamma_events was imported from {location}, not from the environment's site-packages",
    )
    check(
        tamma_events.__impl__ == expected,
        f"tamma_events.__impl__ is {tamma_events.__impl__!r}, expected {expected!r}",
    )
    package = location.parent
    extensions = sorted(p.name for p in package.glob("_native*") if p.suffix in (".so", ".pyd"))
    if expected == "native":
        import tamma_events._native as native

        check(extensions, f"no compiled _native in {package}")
        print(f"smoke: native codec {Path(native.__file__).name}")
    else:
        check(not extensions, f"a compiled extension is installed: {extensions}")
    for name in ("py.typed", "_native.pyi"):
        check((package / name).is_file(), f"{name} is not installed in {package}")
    check(
        list((package / "sql" / "schema").glob("*.sql")),
        f"no sql/schema/*.sql installed in {package}",
    )

    from tamma_events import DomainEvent, EventStore, Query

    started = time.monotonic()
    store = EventStore()
    server = store.embedded
    postmaster = server.pid if server is not None else None
    try:
        check(server is not None, "EventStore() did not start the embedded server")
        assert server is not None
        check(postmaster is not None, "the embedded server has no running postmaster")
        check(
            Path(os.environ["TAMMA_EVENTS_DATA_DIR"]).resolve() == server.data_dir,
            f"the server runs in {server.data_dir}, not in TAMMA_EVENTS_DATA_DIR",
        )
        print(f"smoke: embedded PostgreSQL up in {time.monotonic() - started:.1f} s")
        events = [
            DomainEvent("IssueOpened", {"title": "smoke", "n": 1}, {"issueId": "I-1"}),
            DomainEvent("IssueCommented", {"body": "héllo ✓", "n": 2}, {"issueId": "I-1"}),
            DomainEvent("IssueOpened", {"title": "other", "n": 3}, {"issueId": "I-2"}),
        ]
        last = store.append_batch(events)
        check(last == 3, f"append_batch returned {last}, expected 3")
        result = store.read()
        check(
            [e.position for e in result] == [1, 2, 3],
            f"read back positions {[e.position for e in result]}",
        )
        for written, stored in zip(events, result, strict=True):
            check(
                (stored.event_id, stored.event_type, stored.data, stored.tags)
                == (written.event_id, written.event_type, written.data, written.tags),
                f"event {stored.position} read back differs: {stored!r}",
            )
        by_issue = store.read(Query.of(tags={"issueId": "I-1"}))
        check(
            [e.position for e in by_issue] == [1, 2],
            f"the query by tag returned {[e.position for e in by_issue]}",
        )
        report = store.verify()
        check(report.ok and report.checked == 3, f"verify() reported {report!r}")
    finally:
        store.close()
        if server is not None:
            server.stop()
    from tamma_events import embedded

    assert postmaster is not None
    deadline = time.monotonic() + 30
    while embedded.status(server.data_dir).running:
        check(time.monotonic() < deadline, f"the embedded server (pid {postmaster}) kept running")
        time.sleep(0.1)
    print("smoke: append, read, query and verify OK; embedded server stopped")

    command = shutil.which("tamma-events", path=os.path.dirname(sys.executable))
    check(command is not None, f"no tamma-events entry point beside {sys.executable}")
    assert command is not None
    done = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=120)
    check(done.returncode == 0, f"tamma-events --help exited {done.returncode}: {done.stderr}")
    check("Usage:" in done.stdout, f"tamma-events --help printed no usage: {done.stdout!r}")
    print("smoke: tamma-events --help OK")


if __name__ == "__main__":
    sys.exit(main())
