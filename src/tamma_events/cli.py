"""The ``tamma-events`` command: ``init``, ``demo``, ``bench``, ``append``, ``query``,
``tail``, ``export``, ``compact``, ``verify``, ``stats``, ``serve``, ``torture`` and
``embedded start|stop|status``.

``--dsn`` (or ``TAMMA_EVENTS_DSN``) selects the server everywhere; without one, the embedded
PostgreSQL server is started. ``--schema`` (or ``TAMMA_EVENTS_SCHEMA``) selects the store.
Exit codes: 0 success, 1 failure, 2 usage error.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import click
import msgspec
import psycopg
from click.core import ParameterSource
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from tamma_events import __impl__, __version__, embedded
from tamma_events.errors import (
    APPEND_CONDITION_FAILED,
    QUERY_ERROR,
    VALIDATION_FAILED,
    ConsumerConflict,
    EventStoreError,
    StorageError,
    ValidationFailed,
    storage_error,
)
from tamma_events.model import AppendCondition, DomainEvent, Query, QueryItem
from tamma_events.ops.migrating import no_store_error
from tamma_events.sql import (
    ADVISORY_LOCK,
    ADVISORY_UNLOCK,
    SCHEMA_COMMENT,
    TRY_ADVISORY_LOCK,
    statements_of,
)
from tamma_events.stores.core import connection_kwargs, parse_before, unreachable
from tamma_events.stores.store import DEFAULT_CONNECT_TIMEOUT, DSN_ENV, SCHEMA_ENV, EventStore
from tamma_events.tools import torture

#: The environment variable of the global --connect-timeout option.
CONNECT_TIMEOUT_ENV = "TAMMA_EVENTS_CONNECT_TIMEOUT"


class _Console(Console):
    """A rich console that goes quiet when its reader went away (``| head``): the command
    carries on, and its exit status stays its own verdict. (Rich's own answer is to exit 1.)"""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        _to_devnull(sys.stderr if self.stderr else sys.stdout)


def _to_devnull(stream: IO[str]) -> None:
    """Send later writes to ``stream``, and its flush at exit, nowhere, instead of failing
    again on a pipe whose reader went away."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    except (AttributeError, ValueError, OSError):
        pass  # not a file (a test runner's capture)
    finally:
        os.close(devnull)


console = _Console(stderr=False)
err_console = _Console(stderr=True)


class _Context:
    def __init__(
        self, dsn: str | None, schema: str, data_dir: str | None, connect_timeout: float
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.data_dir = data_dir
        self.connect_timeout = connect_timeout

    def open(self, schema: str | None = None, **kwargs: Any) -> EventStore:
        return EventStore(
            self.dsn,
            schema=schema or self.schema,
            data_dir=self.data_dir,
            connect_timeout=self.connect_timeout,
            **kwargs,
        )

    def connect(self, dsn: str) -> psycopg.Connection[Any]:
        """One connection of the command's own (autocommit), under the same connect timeout
        and with the same error for a server that is not there as a store's."""
        try:
            return psycopg.connect(
                dsn, **connection_kwargs(dsn, connect_timeout=self.connect_timeout)
            )
        except psycopg.OperationalError as exc:
            raise unreachable(exc, dsn, self.connect_timeout).with_traceback(None) from None

    def open_existing(self, **kwargs: Any) -> EventStore:
        """The store, for a command that only reads: a schema that holds no event store (a
        mistyped --schema, say) is an error, not a new store."""
        store = self.open(migrate=False, **kwargs)
        try:
            if store.schema_version() == 0:
                raise no_store_error(store.schema)
        except BaseException:
            store.close()
            raise
        return store


def _print_table(table: Table) -> None:
    """Print a table whole. On a terminal it fits the terminal; piped or redirected it is
    printed at its own width, so no column is cut (rich would fold it into 80 columns)."""
    if console.is_terminal:
        console.print(table)
        return
    width = Measurement.get(console, console.options.update(width=1 << 16), table).maximum
    _Console(file=console.file, width=max(width, console.width)).print(table)


@contextmanager
def _storage(action: str, **context: Any) -> Iterator[None]:
    """A PostgreSQL error of the command's own connection as the store reports one:
    STORAGE_ERROR, "<action> failed: ...", with its SQLSTATE."""
    try:
        yield
    except psycopg.Error as exc:
        raise storage_error(exc, action, **context) from exc


@contextmanager
def _arguments(options: dict[str, str] | None = None) -> Iterator[None]:
    """Report the store's refusal of a command-line value as a usage error (exit 2, naming
    the option), not as a failure: around parsing filters and times (``options`` None: any
    field, as ``--field-name``), or around a call whose errors on ``options``' fields (field ->
    option) are about the values given."""
    try:
        yield
    except EventStoreError as exc:
        field = exc.context.get("field")
        if exc.code not in (VALIDATION_FAILED, QUERY_ERROR) or not isinstance(field, str):
            raise
        if options is None:
            option = "--" + field.replace("_", "-")
        elif field in options:
            option = options[field]
        else:
            raise
        raise click.BadParameter(exc.message, param_hint=f"'{option}'") from None


def _mentions(message: str, value: object) -> bool:
    """Whether ``message`` says ``value`` as a word of its own (the head 3 is not in
    "position 30")."""
    return re.search(rf"(?<![\w.]){re.escape(str(value))}(?![\w])", message) is not None


@contextmanager
def _failures() -> Iterator[None]:
    """Report an `EventStoreError` as one readable line and exit 1."""
    try:
        yield
    except EventStoreError as exc:
        err_console.print(f"[red]error[/red] {exc.code}: {escape(exc.message)}", soft_wrap=True)
        # The context, less what the message already says (and less the DSN: the user gave
        # it): a line only when it adds something.
        extra = {
            key: value
            for key, value in exc.context.items()
            if key != "dsn" and not _mentions(exc.message, value)
        }
        if extra:
            err_console.print(
                json.dumps(extra, default=str), soft_wrap=True, markup=False, highlight=False
            )
        sys.exit(1)


class _Commands(click.Group):
    """The command group: a reader that goes away (``| head``) ends any command quietly, with
    exit status 0. Click would report it as a failure (exit 1)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        stdout = sys.stdout
        try:
            return super().main(*args, **kwargs)
        except SystemExit as exc:
            # Click swaps standard output for a quiet wrapper, then exits 1, when writing to it
            # failed with EPIPE while parsing (--help, --version).
            if exc.code == 1 and sys.stdout is not stdout and _stdout_closed():
                raise SystemExit(0) from None
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            if not _stdout_closed():
                raise  # another pipe (a subprocess's, say): a real failure
            # What streams events to stdout (query, export, tail) stops there: done.
            _to_devnull(sys.stdout)
            ctx.exit(0)


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (poll reports an error, or a
    hang-up as BSD and macOS do, on it)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False  # not a file (a test runner's capture, say)
    if not hasattr(select, "poll"):
        return True  # no poll (Windows): a broken pipe there is stdout's
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _fd, events in poller.poll(0))


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--dsn",
    envvar=DSN_ENV,
    default=None,
    help=f"PostgreSQL DSN (default: ${DSN_ENV}, else the embedded server).",
)
@click.option(
    "--schema",
    envvar=SCHEMA_ENV,
    default="tamma_events",
    show_default=True,
    help=f"PostgreSQL schema of the store (default: ${SCHEMA_ENV}, else tamma_events).",
)
@click.option(
    "--data-dir",
    envvar=embedded.DATA_DIR_ENV,
    default=None,
    help=f"Data directory of the embedded server (default: ${embedded.DATA_DIR_ENV}, else the"
    " user data directory).",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0, min_open=True),
    envvar=CONNECT_TIMEOUT_ENV,
    default=DEFAULT_CONNECT_TIMEOUT,
    metavar="SECONDS",
    help="How long to wait for the server when connecting (libpq counts whole seconds, at"
    f" least 2; default: ${CONNECT_TIMEOUT_ENV}, else 5).",
)
@click.version_option(__version__, prog_name="tamma-events")
@click.pass_context
def main(
    ctx: click.Context,
    dsn: str | None,
    schema: str,
    data_dir: str | None,
    connect_timeout: float,
) -> None:
    """tamma-events: a DCB event store on PostgreSQL."""
    if not math.isfinite(connect_timeout):
        raise click.BadParameter(
            "must be a finite number of seconds", param_hint="'--connect-timeout'"
        )
    ctx.obj = _Context(dsn, schema, data_dir, connect_timeout)
    for out in (console, err_console):
        # Piped or redirected, a line stays one line (rich would fold it at 80 columns).
        out.soft_wrap = not out.is_terminal
    _exit_cleanly_on_signals(ctx)


def _exit_cleanly_on_signals(ctx: click.Context) -> None:
    """Make SIGTERM (what systemd, docker and kubernetes send) and SIGHUP (a closed terminal)
    end the command as Ctrl-C does: stores close and exit hooks run, so an embedded server this
    process started is stopped (unless others still use it), instead of being left running.
    Python's default for them ends the process without running any of that. Exit status
    128 + the signal's number, as a shell reports it. The previous handlers come back when the
    command ends."""
    if threading.current_thread() is not threading.main_thread():
        return
    for number in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
        if number is None or signal.getsignal(number) is not signal.SIG_DFL:
            continue  # a handler someone else installed stays theirs
        previous = signal.signal(number, _exit_on_signal)
        ctx.call_on_close(lambda number=number, previous=previous: signal.signal(number, previous))


def _exit_on_signal(number: int, _frame: Any) -> None:
    raise SystemExit(128 + number)


@main.command()
@click.pass_obj
def init(obj: _Context) -> None:
    """Create or upgrade the store's schema (idempotent)."""
    with _failures(), obj.open() as store:
        applied = store.applied_on_open
        where = escape(str(store.embedded.data_dir) if store.embedded else "the server at the DSN")
        if applied:
            console.print(
                f"schema [bold]{store.schema}[/bold] migrated to version {max(applied)} in {where}"
            )
        else:
            console.print(f"schema [bold]{store.schema}[/bold] is up to date in {where}")


@contextmanager
def _progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """``advance(done, total)`` for a long call's ``progress``: the bar (with the rate) shows
    from the first call on, so a call that fails before any work draws none."""
    bar: Progress | None = None
    task: Any = None
    started = time.perf_counter()

    def advance(done: int, total: int) -> None:
        nonlocal bar, task
        if bar is None:
            bar = _progress()
            bar.start()
            task = bar.add_task(description, total=total, rate="")
        rate = done / max(time.perf_counter() - started, 1e-9)
        bar.update(task, completed=done, total=total, rate=f"{rate:,.0f} events/s")

    try:
        yield advance
    finally:
        if bar is not None:
            bar.stop()


def _count(count: int, thing: str) -> str:
    """``count`` things, in words: "1 bad line", "2,000 bad lines"."""
    return f"{count:,} {thing}" if count == 1 else f"{count:,} {thing}s"


def _events(count: int) -> str:
    """``count`` events, in words: "1 event", "2,000 events"."""
    return _count(count, "event")


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console,
    )


#: The schema the demo uses when neither its --schema nor the global one names another.
DEMO_SCHEMA = "tamma_demo"
#: The comment the demo gives the schemas it makes: the only ones it resets.
DEMO_MARK = "tamma-events demo: reset by every run of tamma-events demo"


@main.command()
@click.option(
    "--events",
    "count",
    type=click.IntRange(min=1),
    default=200_000,
    show_default=True,
    help="How many events to append.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Events per append_batch.",
)
@click.option(
    "--schema",
    "schema",
    default=None,
    help=f"Schema for the demo, reset first [default: the global --schema (or"
    f" ${SCHEMA_ENV}) when given, else {DEMO_SCHEMA}]. A schema the demo did not make is"
    " never reset.",
)
@click.pass_context
def demo(ctx: click.Context, count: int, batch_size: int, schema: str | None) -> None:
    """Append realistic events, show a DCB conflict, read back by query.

    The demo resets its schema first, archives included. Two demos on one schema take turns:
    the second waits for the first to finish."""
    from tamma_events.tools.workload import generate_events

    obj: _Context = ctx.obj
    source = ""
    if schema is None:
        given = ctx.parent.get_parameter_source("schema") if ctx.parent else None
        explicit = given in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
        schema = obj.schema if explicit else DEMO_SCHEMA
        if given == ParameterSource.ENVIRONMENT:
            source = f" (from ${SCHEMA_ENV})"
    with _failures():
        dsn = obj.dsn or embedded.start(obj.data_dir).dsn
        with _demo_turn(obj, dsn, schema) as conn:
            _reset_demo_schema(conn, schema, source)
            store = obj.open(schema=schema)
            with store:
                where = (
                    f"embedded PostgreSQL in {store.embedded.data_dir}"
                    if store.embedded
                    else "PostgreSQL at the DSN"
                )
                console.print(
                    f"tamma-events {__version__} ({__impl__} codec) on {where},"
                    f" schema [bold]{schema}[/bold]"
                )
                events = generate_events(count)
                appended = 0
                appending = 0.0  # seconds in append_batch; generating the events is not timed
                started = time.perf_counter()
                with _progress() as progress:
                    task = progress.add_task("appending", total=count, rate="")
                    while appended < count:
                        batch = [next(events) for _ in range(min(batch_size, count - appended))]
                        before = time.perf_counter()
                        store.append_batch(batch)
                        appending += time.perf_counter() - before
                        appended += len(batch)
                        rate = appended / appending
                        progress.update(task, completed=appended, rate=f"{rate:,.0f} events/s")
                elapsed = time.perf_counter() - started
                console.print(
                    f"appended [bold]{_events(appended)}[/bold] in batches of {batch_size:,}:"
                    f" [bold green]{appended / appending:,.0f} events/s[/bold green]"
                    f" ({appending:.1f} s in append_batch, durable commits;"
                    f" {elapsed - appending:.1f} s generating the events)"
                )
                _show_conflict(store)
                _show_query(store)


@contextmanager
def _demo_turn(obj: _Context, dsn: str, schema: str) -> Iterator[psycopg.Connection[Any]]:
    """The demo's turn on ``schema``: a session advisory lock held for the whole demo, so that
    a second demo started meanwhile (in another terminal, say) waits instead of resetting the
    schema under the first one's feet. The lock goes with the session if the process dies.
    Yields that session, for the reset."""
    key = f"tamma-events demo:{schema}"
    with obj.connect(dsn) as conn:
        with _storage("taking the demo's turn", schema=schema):
            row = conn.execute(TRY_ADVISORY_LOCK, [key]).fetchone()
            if not row or not row[0]:
                console.print(
                    f"a demo is already running in schema {schema} on this server: waiting for"
                    " it to finish (Ctrl-C to stop; --schema NAME runs one beside it)",
                    markup=False,
                )
                conn.execute(ADVISORY_LOCK, [key])
        try:
            yield conn
        finally:
            try:
                conn.execute(ADVISORY_UNLOCK, [key])
            except psycopg.Error:
                pass  # a lost session took its lock with it


def _reset_demo_schema(conn: psycopg.Connection[Any], schema: str, source: str) -> None:
    """Drop the demo's schema and make it anew, marked as the demo's, then delete the archive
    files its manifest listed. A schema that exists and was not made by the demo is refused:
    whatever --schema or $TAMMA_EVENTS_SCHEMA says, the demo never drops a store it did not
    make. (``source`` says where the schema's name came from, for that error.)"""
    statements = statements_of(schema)
    files: list[Path] = []
    with _storage("resetting the demo's schema", schema=schema):
        row = conn.execute(SCHEMA_COMMENT, [schema]).fetchone()
        if row is not None and row[0] != DEMO_MARK:
            raise click.UsageError(
                f"schema {schema}{source} exists and was not made by this demo, which resets its"
                " schema first: choose another with --schema (the demo makes it), or drop this"
                " one yourself if it is an old demo's"
            )
        with conn.transaction():
            if row is not None:
                found = conn.execute(
                    statements.relation_exists, [statements.archives.as_string(conn)]
                ).fetchone()
                if found and found[0]:
                    listed = conn.execute(statements.manifest_files).fetchall()
                    files = [Path(directory) / file for directory, file in listed]
            conn.execute(statements.drop_schema)
            conn.execute(statements.create_schema)
            conn.execute(statements.comment_schema(DEMO_MARK))
    # Only once the schema that listed them is gone: a reset that failed keeps its archives.
    _remove_archives(files)


def _remove_archives(paths: list[Path]) -> None:
    """Delete archive files, and each directory they leave empty; a file that cannot be
    deleted is said, not fatal (the schema that listed it is gone already)."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            err_console.print(
                f"warning: could not delete the old archive {path}: {exc}", markup=False
            )
    for directory in {path.parent for path in paths}:
        try:
            directory.rmdir()
        except OSError:
            pass  # not empty (other files than the demo's), or gone already


def _show_conflict(store: EventStore) -> None:
    console.rule("DCB: a decision under an append condition")
    issue = {"issueId": "ISSUE-7"}
    boundary = Query((QueryItem(("IssueAssigned", "IssueClosed"), issue),))
    seen = store.read(boundary)
    console.print(f"agent A reads issue 7's assignments: {_events(len(seen))}, head {seen.head}")
    store.append(
        DomainEvent("IssueAssigned", {"assignee": "agent-b"}, {**issue, "userId": "agent-b"})
    )
    console.print("agent B assigns issue 7 to itself meanwhile")
    try:
        store.append(
            DomainEvent("IssueAssigned", {"assignee": "agent-a"}, {**issue, "userId": "agent-a"}),
            AppendCondition(boundary, after=seen.head),
        )
    except EventStoreError as exc:
        if exc.code != APPEND_CONDITION_FAILED:
            raise
        console.print(f"agent A's append is refused: [yellow]{exc.code}[/yellow] ({exc.message})")
    else:  # pragma: no cover - would be a broken invariant
        raise StorageError("the conflicting append was accepted")
    fresh = store.read(boundary)
    position = store.append(
        DomainEvent("IssueClosed", {"resolution": "fixed"}, issue),
        AppendCondition(boundary, after=fresh.head),
    )
    console.print(f"agent A re-reads and decides again: its append lands at position {position}")


def _show_query(store: EventStore) -> None:
    console.rule("Reading back by query")
    # The issue and provider of the last LLM call: a query that finds events in any run,
    # however few events it appended.
    last = store.read(Query.of(types=["LlmCallCompleted"]), limit=1, backwards=True)
    if not last:
        console.print("no LLM call among the events: nothing to read back")
        return
    issue = last[0].tags.get("issueId", "")
    provider = last[0].tags.get("provider", "")
    query = Query((QueryItem(("LlmCallCompleted",), {"provider": provider, "issueId": issue}),))
    started = time.perf_counter()
    result = store.read(query)
    elapsed_ms = (time.perf_counter() - started) * 1000
    console.print(
        f"LLM calls to {provider} for {issue}: {_events(len(result))} in {elapsed_ms:.1f} ms",
        markup=False,
    )
    table = Table("position", "timestamp", "model", "tokens", "latency ms")
    for event in result[:8]:
        table.add_row(
            str(event.position),
            event.timestamp.isoformat(timespec="seconds"),
            Text(str(event.data.get("model"))),
            str(event.data.get("prompt_tokens", 0) + event.data.get("completion_tokens", 0)),
            str(event.data.get("latency_ms")),
        )
    _print_table(table)
    latest = store.read(Query.of(tags={"issueId": issue}), limit=1, backwards=True)
    console.print(
        f"latest event of {issue}: {latest[0].event_type} at position {latest[0].position}",
        markup=False,
    )


@main.command()
@click.option(
    "--events",
    "count",
    type=click.IntRange(min=1),
    default=None,
    help="Events in the generated set. [default: 1,000,000 for full, 10,000,000 for "
    "load-curve, 100,000 otherwise]",
)
@click.option(
    "--append-events",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Events appended by each append measure of the full suite.",
)
@click.option("--batch-size", default=10_000, show_default=True)
@click.option(
    "--rounds",
    default=2,
    show_default=True,
    help="Rounds of ceiling/append_batch; the best counts.",
)
@click.option(
    "--conditional", default=2_000, show_default=True, help="Single conditional appends to time."
)
@click.option("--threads", default=16, show_default=True)
@click.option("--per-thread", default=500, show_default=True)
@click.option(
    "--tasks",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Tasks of one event loop appending at once through AsyncEventStore (full suite).",
)
@click.option(
    "--per-task",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Single appends of each task, one after another (full suite).",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Processes appending at once, each from --process-threads threads (full suite).",
)
@click.option(
    "--process-threads",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Threads of each of the --processes processes (full suite).",
)
@click.option(
    "--suite",
    type=click.Choice(["full", "append", "queries", "stream", "export", "replicas", "load-curve"]),
    default="append",
    show_default=True,
    help="full: every figure over a store of --events events (appends over --append-events), "
    "beside the lean baseline of the same design, raw COPY, psycopg executemany, "
    "eventsourcing's recorders, UmaDB, ADBC and COPY TO, with client and server CPU and WAL "
    "per measure; load-curve: append --events events and report the rate "
    "of each tenth of them against the first; append: write throughput; queries: p50/p99 of each "
    "query shape over --events "
    "events (1,000,000 is the reference run); stream: subscription latency under --rate "
    "events/s and stream_events throughput over --events events; export: export_arrow "
    "against ADBC and COPY TO, and compact_events, over --events events; replicas: read "
    "throughput of 4 threads for --seconds with one streaming replica against the primary "
    "alone (on an embedded primary and replica of its own, whatever the DSN).",
)
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Queries timed per shape (queries suite).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=1),
    default=10_000,
    show_default=True,
    help="Append load (events/s) while subscription latency is measured (stream suite).",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=1),
    default=10,
    show_default=True,
    help="How long the load runs (stream suite).",
)
@click.option(
    "--keep",
    is_flag=True,
    help="Keep the loaded schema (bench_q_<events>) for the next queries or stream run.",
)
@click.option(
    "--json",
    "json_path",
    default=None,
    help="Also write the JSON summary to this file ('-' for stdout).",
)
@click.pass_obj
def bench(
    obj: _Context,
    count: int | None,
    append_events: int,
    batch_size: int,
    rounds: int,
    conditional: int,
    threads: int,
    per_thread: int,
    tasks: int,
    per_task: int,
    processes: int,
    process_threads: int,
    suite: str,
    samples: int,
    rate: float,
    seconds: float,
    keep: bool,
    json_path: str | None,
) -> None:
    """Measure append and encode throughput, or query latencies, against baselines from the
    same run."""
    from tamma_events.tools.bench import (
        as_json,
        run_export_suite,
        run_query_suite,
        run_replica_suite,
        run_stream_suite,
        run_suite,
    )
    from tamma_events.tools.bench_full import run_full_suite, run_load_curve

    if count is None:
        count = {"full": 1_000_000, "load-curve": 10_000_000}.get(suite, 100_000)

    with _failures():
        store = obj.open(schema=f"bench_{uuid.uuid4().hex[:8]}", migrate=False)
        dsn = store.dsn
        store.close()
        with console.status("benchmarking") as status:
            if suite == "full":
                results = run_full_suite(
                    dsn,
                    events=count,
                    append_events=append_events,
                    batch_size=batch_size,
                    rounds=rounds,
                    conditional=conditional,
                    threads=threads,
                    per_thread=per_thread,
                    tasks=tasks,
                    per_task=per_task,
                    processes=processes,
                    process_threads=process_threads,
                    samples=samples,
                    rate=rate,
                    seconds=seconds,
                    keep=keep,
                    progress=lambda s: status.update(s),
                )
            elif suite == "load-curve":
                results = run_load_curve(
                    dsn,
                    events=count,
                    slice_events=max(1, count // 10),
                    batch_size=batch_size,
                    keep=keep,
                    progress=lambda s: console.log(s),
                )
            elif suite == "stream":
                results = run_stream_suite(
                    dsn,
                    events=count,
                    rate=rate,
                    seconds=seconds,
                    keep=keep,
                    progress=lambda s: status.update(s),
                )
            elif suite == "replicas":
                results = run_replica_suite(
                    events=count, threads=4, seconds=seconds, progress=lambda s: status.update(s)
                )
            elif suite == "export":
                results = run_export_suite(
                    dsn, events=count, keep=keep, progress=lambda s: status.update(s)
                )
            elif suite == "queries":
                results = run_query_suite(
                    dsn,
                    events=count,
                    samples=samples,
                    keep=keep,
                    progress=lambda s: status.update(s),
                )
            else:
                results = run_suite(
                    dsn,
                    events=count,
                    batch_size=batch_size,
                    rounds=rounds,
                    conditional=conditional,
                    threads=threads,
                    per_thread=per_thread,
                    progress=lambda s: status.update(s),
                )
    table = Table(
        "measure",
        "value",
        "unit",
        "p99",
        "baseline",
        "ratio",
        "client CPU µs",
        "server CPU µs",
        "WAL bytes",
        title=f"tamma-events bench {suite} ({__impl__} codec)",
    )

    unresolved = False

    def per_unit(r: Any, prefix: str) -> str:
        nonlocal unresolved
        value = next((v for k, v in r.detail.items() if k.startswith(prefix)), None)
        if isinstance(value, (int, float)):
            return f"{value:,.1f}"
        if prefix.split("_")[0] in r.detail.get("cpu_below_resolution", ()):
            # Measured, but too little CPU for its clock to tell from zero.
            unresolved = True
            return "?"
        return ""

    for r in results:
        value = f"{r.value:,.2f}" if r.unit == "ms" else f"{r.value:,.0f}"
        p99 = r.detail.get("p99_ms")
        table.add_row(
            r.name,
            value,
            r.unit,
            f"{p99:,.2f}" if p99 is not None else "",
            r.baseline or "",
            f"{r.ratio:.2f}" if r.ratio else "",
            per_unit(r, "client_cpu_us_per_"),
            per_unit(r, "server_cpu_us_per_"),
            per_unit(r, "wal_bytes_per_"),
        )
    _print_table(table)
    if unresolved:
        console.print(
            "?: the measure used too little CPU for the clock to resolve (more --samples or"
            " events resolve it)",
            style="dim",
        )
    if json_path:
        summary = json.dumps(
            as_json(results, impl=__impl__, version=__version__, events=count), indent=2
        )
        if json_path == "-":
            click.echo(summary)
        else:
            with open(json_path, "w", encoding="utf-8") as f:
                f.write(summary + "\n")


@main.command()
@click.option("--start", type=click.IntRange(min=1), default=None, help="First position to check.")
@click.option("--end", type=click.IntRange(min=1), default=None, help="Last position to check.")
@click.pass_obj
def verify(obj: _Context, start: int | None, end: int | None) -> None:
    """Recompute the hash chain; exit 1 at the first position where it breaks.

    A range past the head (--start after the last position) is a usage error (exit 2); an
    --end past the head stops at the head."""
    if start is not None and end is not None and start > end:
        raise click.BadParameter(f"--start {start} is after --end {end}", param_hint="'--start'")
    started = time.perf_counter()
    with (
        _failures(),
        obj.open_existing() as store,
        _arguments({"start": "--start", "end": "--end"}),
        _progress_bar("verifying") as advance,
    ):
        report = store.verify(start, end, progress=advance)
    elapsed = time.perf_counter() - started
    if report.ok:
        console.print(
            f"[bold green]ok[/bold green]: {_events(report.checked)} verified"
            f" (positions {report.start} to {report.end}) in {elapsed:.1f} s"
        )
        return
    err_console.print(
        f"[bold red]broken[/bold red] at position {report.first_bad_position}: {report.reason}"
        f" ({_events(report.checked)} verified before it)"
    )
    sys.exit(1)


def _read_lines(
    source: IO[bytes], store: EventStore, batch_size: int
) -> tuple[list[DomainEvent], list[int], list[str]]:
    """Every event of a JSON Lines input, the line number of each, and a report line for each
    bad line, in line order. Blank lines are skipped."""
    events: list[DomainEvent] = []
    numbers: list[int] = []
    errors: list[tuple[int, str]] = []
    pending: list[tuple[int, Any]] = []

    def bad(number: int, exc: EventStoreError) -> None:
        field = exc.context.get("field")
        where = f" ({field})" if field else ""
        # A line is checked as a batch of one: its "event 0: " says nothing here.
        message = re.sub(r"^event 0: ", "", exc.message)
        errors.append((number, f"line {number}{where}: {exc.code}: {message}"))

    def flush() -> None:
        try:
            batch = store.validate(obj for _number, obj in pending)
        except EventStoreError:
            # Find every bad line of the batch, not only the first.
            for number, obj in pending:
                try:
                    events.extend(store.validate([obj]))
                    numbers.append(number)
                except EventStoreError as exc:
                    bad(number, exc)
        else:
            events.extend(batch)
            numbers.extend(number for number, _obj in pending)
        pending.clear()

    for number, line in enumerate(source, start=1):
        if not line.strip():
            continue
        try:
            obj = msgspec.json.decode(line)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            # msgspec raises UnicodeDecodeError for UTF-8 that encodes a surrogate, and
            # RecursionError for nesting deeper than it decodes.
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            bad(number, ValidationFailed(f"not JSON: {reason}", {"line": number}))
            continue
        if not isinstance(obj, dict):
            bad(
                number,
                ValidationFailed(
                    f"each line must be a JSON object (an event), got {type(obj).__name__}",
                    {"line": number},
                ),
            )
            continue
        pending.append((number, obj))
        if len(pending) >= batch_size:
            flush()
    flush()
    errors.sort()
    return events, numbers, [text for _number, text in errors]


def _name_lines(exc: EventStoreError, batch: list[DomainEvent], numbers: list[int]) -> None:
    """Add the input's line numbers to an append's error: ``line`` for the event at its
    ``index``, ``lines`` for its ``event_ids`` (ids already stored)."""
    index = exc.context.get("index")
    if isinstance(index, int) and 0 <= index < len(batch):
        exc.context["line"] = numbers[index]
    ids = exc.context.get("event_ids")
    if isinstance(ids, list):
        lines = {str(event.event_id): number for event, number in zip(batch, numbers, strict=True)}
        exc.context["lines"] = [lines[str(i)] for i in ids if str(i) in lines]


@main.command()
@click.argument("source", type=click.File("rb"), default="-")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Events per append_batch (each batch is stored whole or not at all).",
)
@click.option(
    "--max-errors",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Bad lines to report before counting the rest silently.",
)
@click.pass_obj
def append(obj: _Context, source: IO[bytes], batch_size: int, max_errors: int) -> None:
    """Append the events of a JSON Lines file (SOURCE, or stdin when '-' or absent).

    Each line is one event object: event_type, and optionally data, tags, metadata, event_id
    and timestamp. Every line is checked before anything is written: with any bad line, each
    is reported by its number and nothing is stored (exit 1). Then the events are appended in
    batches of --batch-size, each stored whole or not at all."""
    with _failures(), obj.open() as store:
        events, numbers, errors = _read_lines(source, store, batch_size)
        if errors:
            for line in errors[:max_errors]:
                err_console.print(line, markup=False, highlight=False, soft_wrap=True)
            if len(errors) > max_errors:
                more = len(errors) - max_errors
                err_console.print(f"... and {_count(more, 'more bad line')}")
            err_console.print(
                f"[red]error[/red]: {_count(len(errors), 'bad line')} of"
                f" {len(errors) + len(events):,}; nothing was written"
            )
            sys.exit(1)
        started = time.perf_counter()
        done = 0
        last = store.head()
        try:
            with _progress() as progress:
                task = progress.add_task("appending", total=len(events), rate="")
                for start in range(0, len(events), batch_size):
                    batch = events[start : start + batch_size]
                    try:
                        last = store.append_batch(batch)
                    except EventStoreError as exc:
                        _name_lines(exc, batch, numbers[start : start + len(batch)])
                        raise
                    done += len(batch)
                    rate = done / max(time.perf_counter() - started, 1e-9)
                    progress.update(task, completed=done, rate=f"{rate:,.0f} events/s")
        except EventStoreError:
            if done:
                err_console.print(
                    f"lines up to {numbers[done - 1]} ({_events(done)}) are stored, up to"
                    f" position {last}; the lines after them are not",
                    soft_wrap=True,
                )
            else:
                err_console.print("nothing was written")
            raise
    elapsed = time.perf_counter() - started
    console.print(
        f"[bold green]appended[/bold green] {_events(done)} (last position {last})"
        f" in {elapsed:.1f} s"
    )


@main.command("torture")
@click.argument("scenario", type=click.Choice(torture.SCENARIOS))
@click.option("--seconds", type=click.FloatRange(min=0.1), default=30.0, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=20, show_default=True)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Processes the workers are spread over (threads within each).",
)
@click.option("--seed", type=int, default=None, help="Seed of the random queries and events.")
@click.option("--json", "json_path", default=None, help="Also write the report to this file.")
@click.pass_obj
def torture_(
    obj: _Context,
    scenario: str,
    seconds: float,
    workers: int,
    processes: int,
    seed: int | None,
    json_path: str | None,
) -> None:
    """Race workers against a fresh store (a schema of its own, dropped afterwards), then
    check the log with an oracle: consistency, monotonic or parallel. Exit 1 on a violation."""
    with _failures():
        dsn = obj.dsn or embedded.start(obj.data_dir).dsn
        obj.connect(dsn).close()  # a server that is not there: one line, not a traceback
    console.print(
        f"running {scenario} for {seconds:g} s: {workers} workers in {processes} processes"
    )
    with _failures():
        report = torture.run(
            scenario, dsn, seconds=seconds, workers=workers, processes=processes, seed=seed
        )
    table = Table("measure", "value")
    for name in ("attempted", "accepted", "rejected", "failed", "events", "false_conflicts"):
        table.add_row(name.replace("_", " "), f"{getattr(report, name):,}")
    table.add_row("violations", f"{report.violation_count:,}")
    for name, value in report.details.items():
        table.add_row(name, str(value))
    _print_table(table)
    for violation in report.violations:
        err_console.print(violation, markup=False, highlight=False)
    if json_path is not None:
        with open(json_path, "w") as out:
            json.dump(report.to_dict(), out, indent=2)
    if not report.ok:
        err_console.print(f"[bold red]{report.violation_count} violations[/bold red]")
        sys.exit(1)
    console.print("[bold green]ok[/bold green]: no violations")


#: What a time option takes (`tamma_events.filters.parse_time` reads it).
_TIME = (
    "TIME: an ISO 8601 date-time with an offset (2026-01-02T15:04:05Z,"
    " 2026-01-02T17:04:05+02:00) or a date (2026-01-02: midnight UTC)"
)


def _filter_options(command: Any) -> Any:
    """The filter options of ``tail`` (the parameters of `filter_from_params`)."""
    options = [
        click.option("--type", "type_", multiple=True, help="Event type (repeat for any of)."),
        click.option("--tag", multiple=True, help="key:value the events carry (repeatable)."),
        click.option("--issue-id", multiple=True, help="Tag issueId (repeat for any of)."),
        click.option("--pr-id", multiple=True, help="Tag prId (repeat for any of)."),
        click.option("--user-id", multiple=True, help="Tag userId (repeat for any of)."),
        click.option("--provider", multiple=True, help="Tag provider (repeat for any of)."),
        click.option("--platform", multiple=True, help="Tag platform (repeat for any of)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@_filter_options
@click.option(
    "--after",
    type=click.IntRange(min=0),
    default=None,
    help="Start after this position (0: the whole log). Default: the head, new events only.",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="Exit after this many events (default: follow until interrupted).",
)
@click.pass_obj
def tail(
    obj: _Context, /, after: int | None, count: int | None, **filters: tuple[str, ...]
) -> None:
    """Follow the log, printing each matching event as one line of JSON (JSON Lines)."""
    import msgspec

    from tamma_events.filters import filter_from_params

    params = _filter_params(filters)
    encode = msgspec.json.Encoder().encode
    out = sys.stdout.buffer
    with _arguments():  # a malformed filter is a usage error, before the server is reached
        event_filter = filter_from_params(params, ordered=False)
    with _failures(), obj.open_existing() as store:
        start = store.head() if after is None else after
        delivered = 0
        try:
            with store.subscribe(event_filter, after=start) as subscription:
                for event in subscription:
                    out.write(encode(event) + b"\n")
                    out.flush()
                    delivered += 1
                    if count is not None and delivered >= count:
                        break
        except KeyboardInterrupt:
            pass


def _filter_params(filters: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
    """The values of `_filter_options` as the parameters of `filter_from_params`."""
    return {("type" if name == "type_" else name): list(values) for name, values in filters.items()}


@main.command()
@_filter_options
@click.option("--start-time", default=None, metavar="TIME", help=f"Events at or after {_TIME}.")
@click.option("--end-time", default=None, metavar="TIME", help=f"Events before {_TIME}.")
@click.option(
    "--format",
    "format_",
    type=click.Choice(["parquet", "arrow", "jsonl"]),
    default="parquet",
    show_default=True,
    help="Parquet file, Arrow IPC file, or JSON Lines.",
)
@click.option(
    "--output",
    "-o",
    default=None,
    help="File to write (required for parquet and arrow; jsonl defaults to stdout).",
)
@click.option("--include-archived", is_flag=True, help="Export compacted (archived) events too.")
@click.option("--compression", default="zstd", show_default=True, help="Parquet compression codec.")
@click.pass_obj
def export(
    obj: _Context,
    /,
    start_time: str | None,
    end_time: str | None,
    format_: str,
    output: str | None,
    include_archived: bool,
    compression: str,
    **filters: tuple[str, ...],
) -> None:
    """Export the matching events, in log order, with a progress bar (on stderr)."""
    import msgspec

    from tamma_events.codec.arrow import write_arrow_file, write_parquet
    from tamma_events.filters import filter_from_params

    if output is None and format_ != "jsonl":
        raise click.UsageError(f"--output is required with --format {format_}")
    params = _filter_params(filters)
    params["start_time"] = [start_time] if start_time else []
    params["end_time"] = [end_time] if end_time else []
    with _arguments():  # a malformed filter is a usage error, before the server is reached
        event_filter = filter_from_params(params, ordered=False)
    with _failures(), obj.open_existing() as store:
        total = store.count_events(event_filter) if include_archived else None
        started = time.perf_counter()
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=err_console,
        )
        with progress:
            task = progress.add_task("exporting", total=total, rate="")

            def advance(done: int) -> None:
                rate = done / max(time.perf_counter() - started, 1e-9)
                progress.update(task, completed=done, rate=f"{rate:,.0f} events/s")

            written = 0
            if format_ == "jsonl":
                encode = msgspec.json.Encoder().encode
                stream = store.stream_events(event_filter, include_archived=include_archived)
                out = sys.stdout.buffer if output in (None, "-") else open(output, "wb")
                written = 0
                try:
                    for event in stream:
                        out.write(encode(event) + b"\n")
                        written += 1
                        if written % 10_000 == 0:
                            advance(written)
                finally:
                    if out is not sys.stdout.buffer:
                        out.close()
                    else:
                        out.flush()
            else:
                assert output is not None
                reader = store.export_arrow(event_filter, include_archived=include_archived)
                if format_ == "parquet":
                    written = write_parquet(
                        reader, output, compression=compression, progress=advance
                    )
                else:
                    written = write_arrow_file(reader, output, progress=advance)
            advance(written)
    where = "stdout" if output in (None, "-") else output
    err_console.print(
        f"[bold green]exported[/bold green] {_events(written)} to {where}"
        f" in {time.perf_counter() - started:.1f} s"
    )


@main.command()
@click.option(
    "--before",
    required=True,
    metavar="TIME",
    help=f"Archive the events recorded before {_TIME}.",
)
@click.option(
    "--archive-dir",
    default=None,
    help="Directory of the Parquet archives (default: <data dir>-archives/<schema>, beside the"
    " embedded server's data directory; with a DSN, archives/<schema> in the user data"
    " directory).",
)
@click.option(
    "--file-events",
    type=click.IntRange(min=1),
    default=1_000_000,
    show_default=True,
    help="Events per archive file.",
)
@click.pass_obj
def compact(obj: _Context, before: str, archive_dir: str | None, file_events: int) -> None:
    """Move old events into verified Parquet archives and delete them from PostgreSQL.

    Safe to interrupt: run it again to finish."""
    with _arguments({"before": "--before"}):  # before any work starts
        when = parse_before(before)
    started = time.perf_counter()
    with (
        _failures(),
        obj.open(archive_dir=archive_dir) as store,
        _progress_bar("compacting") as advance,
    ):
        moved = store.compact_events(when, file_events=file_events, progress=advance)
    console.print(
        f"[bold green]compacted[/bold green] {_events(moved)} into archives"
        f" in {time.perf_counter() - started:.1f} s"
    )


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--token",
    envvar="TAMMA_EVENTS_TOKEN",
    default=None,
    help="Require 'Authorization: Bearer <token>' on every route but /health"
    " (default: $TAMMA_EVENTS_TOKEN; none: open).",
)
@click.option(
    "--heartbeat",
    type=click.FloatRange(min=0.1),
    default=15.0,
    show_default=True,
    help="Seconds between the keep-alive comments a stream sends.",
)
@click.option("--log-level", default="info", show_default=True, help="uvicorn's log level.")
@click.option(
    "--replica",
    "replicas",
    multiple=True,
    help="DSN of a streaming replica to read from (repeat for several).",
)
@click.pass_obj
def serve(
    obj: _Context,
    host: str,
    port: int,
    token: str | None,
    heartbeat: float,
    log_level: str,
    replicas: tuple[str, ...],
) -> None:
    """Serve the store over HTTP: /events, /events/stream (Server-Sent Events), /health and
    /metrics (Prometheus)."""
    try:
        import uvicorn

        from tamma_events.streaming.web import create_app
    except ImportError as exc:
        raise click.ClickException(
            f'serve needs the web extra ({exc.name} is missing): pip install "tamma-events[web]"'
        ) from None
    token = token or None  # an empty $TAMMA_EVENTS_TOKEN is no token
    with _failures(), obj.open(replicas=list(replicas)) as store:
        app = create_app(store, token=token, heartbeat=heartbeat)
        if token is None and host not in ("127.0.0.1", "localhost", "::1"):
            err_console.print(
                f"[yellow]warning[/yellow]: serving on {host} without a token: anyone who can"
                " reach it can read every event"
            )
        uvicorn.run(app, host=host, port=port, log_level=log_level)


#: Rows `query --format table` shows when no --limit is given.
TABLE_ROWS = 100


@main.command()
@_filter_options
@click.option("--start-time", default=None, metavar="TIME", help=f"Events at or after {_TIME}.")
@click.option("--end-time", default=None, metavar="TIME", help=f"Events before {_TIME}.")
@click.option(
    "--order-by",
    type=click.Choice(["position", "timestamp", "type"]),
    default="position",
    show_default=True,
)
@click.option("--direction", type=click.Choice(["asc", "desc"]), default="asc", show_default=True)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help=f"At most this many events (default: all; {TABLE_ROWS} with --format table).",
)
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--include-archived", is_flag=True, help="Read compacted (archived) events too.")
@click.option(
    "--format",
    "format_",
    type=click.Choice(["jsonl", "table"]),
    default="jsonl",
    show_default=True,
    help="One JSON object per line, or a table.",
)
@click.pass_obj
def query(
    obj: _Context,
    /,
    start_time: str | None,
    end_time: str | None,
    order_by: str,
    direction: str,
    limit: int | None,
    offset: int,
    include_archived: bool,
    format_: str,
    **filters: tuple[str, ...],
) -> None:
    """Print the events matching a filter, as JSON Lines (streamed, any number) or a table."""
    from tamma_events.filters import EventFilter, filter_from_params, normalize

    params = _filter_params(filters)
    params["start_time"] = [start_time] if start_time else []
    params["end_time"] = [end_time] if end_time else []
    if format_ == "table" and limit is None:
        limit = TABLE_ROWS
    with _arguments():  # a malformed filter is a usage error, before the server is reached
        base = filter_from_params(params, ordered=False) or EventFilter()
        event_filter = msgspec.structs.replace(
            base,
            order_by=order_by,
            order_direction=direction,
            # The table reads one row more than it shows: whether a next page exists.
            limit=limit + 1 if format_ == "table" and limit is not None else limit,
            offset=offset,
        )
        normalize(event_filter)  # --limit and --offset in range, before the server is reached
    with _failures(), obj.open_existing() as store:
        events = store.stream_events(event_filter, include_archived=include_archived)
        if format_ == "jsonl":
            encode = msgspec.json.Encoder().encode
            out = sys.stdout.buffer
            for event in events:
                out.write(encode(event) + b"\n")
            out.flush()
            return
        table = Table("position", "timestamp", "type", "tags", "data", show_lines=False)
        shown = 0
        more = False
        for event in events:
            if limit is not None and shown == limit:
                more = True
                break
            data = msgspec.json.encode(event.data).decode()
            # Text, not markup: an event's strings are shown as they are.
            table.add_row(
                str(event.position),
                event.timestamp.isoformat(timespec="milliseconds"),
                Text(event.event_type),
                Text(" ".join(f"{key}={value}" for key, value in sorted(event.tags.items()))),
                Text(data if len(data) <= 60 else data[:59] + "…"),
            )
            shown += 1
        _print_table(table)
        total = store.count_events(msgspec.structs.replace(base, limit=None, offset=0))
        rows = f"rows {offset + 1:,} to {offset + shown:,}" if shown else "no rows"
        if include_archived:
            note = f"{rows} of {total:,} matching events"
        else:
            # The offset and the rows count live events; the total counts archived ones too.
            note = f"{rows} of the matching live events ({total:,} in the whole history)"
        if more:
            note += f"; --offset {offset + shown} for the next"
        console.print(note, style="dim")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@click.pass_obj
def stats(obj: _Context, as_json: bool) -> None:
    """The store at a glance: events live and archived, per type, tags, sizes, versions."""
    with _failures(), obj.open_existing() as store:
        report = store.stats()
    if as_json:
        click.echo(msgspec.json.encode(report).decode())
        return
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    rows = [
        ("schema", f"{report.schema} (version {report.schema_version})"),
        ("server", f"PostgreSQL {report.server_version}"),
        ("codec", report.codec),
        ("events", f"{report.events:,} (head {report.head:,})"),
        ("live", f"{report.live_events:,} in PostgreSQL, {_size(report.table_bytes)} on disk"),
        (
            "archived",
            f"{report.archived_events:,} in {report.archive_files:,} Parquet files,"
            f" {_size(report.archive_bytes)}",
        ),
        ("tags", f"{report.tag_keys:,} keys, {report.tag_values:,} distinct pairs"),
        (
            "recorded",
            "no events"
            if report.first_timestamp is None or report.last_timestamp is None
            else f"{report.first_timestamp.isoformat()} to {report.last_timestamp.isoformat()}",
        ),
    ]
    for name, value in rows:
        summary.add_row(name, value)
    _print_table(summary)
    if report.event_types:
        types = Table("event type", "events", "first", "last")
        for row in report.event_types:
            types.add_row(
                Text(row.event_type),
                f"{row.count:,}",
                row.first_timestamp.isoformat(timespec="seconds"),
                row.last_timestamp.isoformat(timespec="seconds"),
            )
        _print_table(types)


def _size(count: int) -> str:
    size = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@main.group("embedded")
def embedded_() -> None:
    """Manage the embedded PostgreSQL server (of --data-dir, else $TAMMA_EVENTS_DATA_DIR, else
    the user data directory)."""


@embedded_.command("start")
@click.pass_obj
def embedded_start(obj: _Context) -> None:
    """Start the embedded server and keep it running until `embedded stop`; print its DSN.

    Meanwhile every command and store using this data directory leaves it running."""
    with _failures():
        server = embedded.start(obj.data_dir, keep_running=True)
    console.print(f"running in {server.data_dir} (pid {server.pid})", markup=False)
    console.print(f"export {DSN_ENV}='{server.dsn}'", soft_wrap=True, highlight=False, markup=False)


@embedded_.command("stop")
@click.pass_obj
def embedded_stop(obj: _Context) -> None:
    """Stop the embedded server (a fast shutdown: no committed event is lost)."""
    with _failures():
        stopped = embedded.stop(obj.data_dir)
        where = embedded.status(obj.data_dir).data_dir
    console.print(
        f"stopped the server in {where}" if stopped else f"no server runs in {where}", markup=False
    )


@embedded_.command("status")
@click.pass_obj
def embedded_status(obj: _Context) -> None:
    """Say whether the embedded server runs, and its DSN; exit 1 when it does not."""
    with _failures():
        state = embedded.status(obj.data_dir)
    if state.running:
        console.print(f"running in {state.data_dir} (pid {state.pid})", markup=False)
        console.print(f"dsn: {state.dsn}", soft_wrap=True, highlight=False, markup=False)
        return
    made = "" if state.initialized else " (no database there yet: start creates one)"
    console.print(f"not running in {state.data_dir}{made}", markup=False)
    sys.exit(1)


@main.group("consumers")
def consumers_() -> None:
    """Durable consumers: their checkpoints, lag, workers and parked events (see
    docs/consumers.md)."""


def _lag_seconds(value: float | None) -> str:
    return "unknown" if value is None else f"{value:,.1f}"


@consumers_.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the consumers as JSON.")
@click.pass_obj
def consumers_list(obj: _Context, as_json: bool) -> None:
    """Every consumer: its partitions, the workers alive, its largest lag, its parked events."""
    with _failures(), obj.open_existing() as store:
        states = store.consumers()
    if as_json:
        click.echo(msgspec.json.encode(states).decode())
        return
    if not states:
        console.print("no consumers", markup=False)
        return
    table = Table("consumer", "partitions", "split by", "workers", "lag", "lag (s)", "parked")
    for state in states:
        table.add_row(
            Text(state.name),
            f"{len(state.partitions):,}",
            Text(state.partition_key or "-"),
            f"{len(state.workers):,}",
            f"{state.lag_positions:,}",
            _lag_seconds(state.lag_seconds),
            f"{state.parked:,}",
        )
    _print_table(table)


@consumers_.command("lag")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the partitions as JSON.")
@click.pass_obj
def consumers_lag(obj: _Context, name: str | None, as_json: bool) -> None:
    """Each partition of consumer NAME (or of every consumer): its checkpoint, the worker
    holding it, and how far behind the head it is, in positions and seconds."""
    with _failures(), obj.open_existing() as store:
        states = store.consumers(name)
    if name is not None and not states:
        with _failures():
            raise ConsumerConflict(f"no consumer is named {name!r}", {"name": name})
    if as_json:
        click.echo(msgspec.json.encode(states).decode())
        return
    table = Table("consumer", "partition", "checkpoint", "worker", "lag", "lag (s)")
    for state in states:
        for part in state.partitions:
            table.add_row(
                Text(state.name),
                str(part.partition),
                f"{part.position:,}",
                Text(part.owner or "-"),
                f"{part.lag_positions:,}",
                _lag_seconds(part.lag_seconds),
            )
    _print_table(table)


@consumers_.command("reset")
@click.argument("name")
@click.option(
    "--to",
    "to",
    type=click.IntRange(min=0),
    required=True,
    help="The position to restart after (0: the beginning).",
)
@click.option("--force", is_flag=True, help="Reset even while workers hold its partitions.")
@click.pass_obj
def consumers_reset(obj: _Context, name: str, to: int, force: bool) -> None:
    """Set every checkpoint of consumer NAME to --to: its next events are those after it.
    Refused while its workers hold leases, unless --force."""
    with _failures(), obj.open_existing() as store:
        count = store.reset_consumer(name, to=to, force=force)
    console.print(
        f"consumer {name}: {_count(count, 'partition')} reset to position {to:,}", markup=False
    )


@consumers_.command("drop")
@click.argument("name")
@click.option("--force", is_flag=True, help="Drop it even while workers hold its partitions.")
@click.pass_obj
def consumers_drop(obj: _Context, name: str, force: bool) -> None:
    """Remove consumer NAME with its checkpoints and parked events. Refused while its
    workers hold leases, unless --force."""
    with _failures(), obj.open_existing() as store:
        count = store.drop_consumer(name, force=force)
    console.print(f"consumer {name} dropped ({_count(count, 'partition')})", markup=False)


@consumers_.command("parked")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the parked events as JSON.")
@click.pass_obj
def consumers_parked(obj: _Context, name: str, as_json: bool) -> None:
    """The events consumer NAME parked, with their last error."""
    with _failures(), obj.open_existing() as store:
        parked = store.parked_events(name)
    if as_json:
        click.echo(msgspec.json.encode(parked).decode())
        return
    if not parked:
        console.print(f"consumer {name} has no parked events", markup=False)
        return
    table = Table("position", "partition", "attempts", "parked at", "replay asked", "error")
    for event in parked:
        table.add_row(
            f"{event.position:,}",
            str(event.partition),
            str(event.attempts),
            event.parked_at.isoformat(timespec="seconds"),
            "yes" if event.replay_requested else "no",
            Text(event.error),
        )
    _print_table(table)


@consumers_.command("replay")
@click.argument("name")
@click.option(
    "--position",
    "positions",
    type=click.IntRange(min=1),
    multiple=True,
    help="A parked event to replay (repeatable); all of them when left out.",
)
@click.pass_obj
def consumers_replay(obj: _Context, name: str, positions: tuple[int, ...]) -> None:
    """Ask consumer NAME's workers to hand its parked events to the handler again, once
    each; an event handled then leaves the parked list."""
    with _failures(), obj.open_existing() as store:
        asked = store.replay_parked(name, list(positions) or None)
    missing = sorted(set(positions) - set(asked))
    console.print(
        f"consumer {name}: replay asked for {_count(len(asked), 'parked event')}", markup=False
    )
    if missing:
        with _failures():
            raise ConsumerConflict(
                f"not parked by consumer {name!r}: {', '.join(map(str, missing))}",
                {"name": name, "positions": missing},
            )
