"""Every code example in the README and the docs, executed.

One test per Markdown file (``README.md`` and every ``docs/**/*.md``, found when the tests are
collected, so a new page is covered without a change here) runs the file's fenced blocks in
document order and reports each failure as ``<file>:<line>`` with the exception.

``python`` blocks run in order, in one namespace per file (a module of its own, so classes and
type hints resolve), against the test server. A block with a top-level ``await``, ``async with``
or ``async for`` is compiled with ``ast.PyCF_ALLOW_TOP_LEVEL_AWAIT`` and run with
``asyncio.run``. What a block prints is captured (pytest shows it with a failure). Every block
runs: there is no skip list, and the assertions the examples make must hold.

Before a file's first block, ``$TAMMA_EVENTS_DSN`` is the file's DSN (``dsn`` below) and
``$TAMMA_EVENTS_SCHEMA`` a fresh schema, so ``EventStore()`` and ``AsyncEventStore()`` open it.
The schema holds 200 events of `tamma_events.tools.workload` (issues ``ISSUE-0`` to ``ISSUE-49``),
as a reader's store would, and a table ``orders (id, state)`` with one order, the application's own
table that the outbox example updates. The working directory is a temporary one (an example's
``events.parquet`` lands there), and so is ``$XDG_DATA_HOME`` (the default archive directory).
Afterwards the stores the examples left open are closed, the schema is dropped, and so are the roles
that appeared meanwhile and that the examples name (``tamma_app``, say).

The names an example may use without defining them:

``store``
    An open `EventStore` on the file's schema. It is bound again before each block, so a block
    that rebinds it (``with EventStore() as store:``) leaves the next block a usable one.
``dsn``
    The file's DSN: the test server's (the ``pg_dsn`` fixture) with ``search_path`` set to the
    file's schema, so plain SQL in an example lands there.
``handle``
    ``handle(event)``, an event handler; it keeps the events it is given.
``order_id``
    The id of the order in ``orders``.
``replica_dsn``, ``replica1_dsn``, ``replica2_dsn``, ``primary_dsn``
    Real streaming replicas, and their primary. A file that names one of them runs against a
    primary of its own (an embedded server, started with its replicas the first time a file
    needs them, as ``tests/test_replicas.py`` does): ``dsn`` is then that primary's DSN, and
    ``primary_dsn`` the same; ``replica_dsn`` is ``replica1_dsn``.

A subscription loop waits for new events forever. So every subscription that a block opens
(``EventStore.subscribe``, ``AsyncEventStore.subscribe``) is watched while the block runs: once
it has delivered the newest event its query or filter matches in the store (at once when none
matches after its start), it is stopped with ``Subscription.stop()``, the documented way to end
one from another thread, and the block goes on after its loop. One that has not delivered that
event within `SUBSCRIPTION_DEADLINE` seconds fails the block.

``sql`` blocks run on the file's store (with its events), with ``search_path`` set to its schema,
in a transaction that is rolled back, so a ``CREATE ROLE`` leaves nothing behind. Where a block
spells out the default schema ``tamma_events``, the file's schema stands in for it; a role that a
block grants to (``TO role``, ``IN ROLE role``) and that does not exist is created (NOLOGIN) in
that transaction. A block that is not meant to be run is listed in `SQL_NOT_RUN` with the
reason; the test fails when an entry no longer matches a block.

``sh``, ``bash``, ``shell`` and ``console`` blocks (in ``console``, the ``$ `` lines) are
checked, not executed: installing the package, making a virtual environment, running the suite
(``scripts/test`` runs this module) or a benchmark would be recursive or take minutes. Lines are
joined across trailing backslashes, split with `shlex` at ``&&``, ``||``, ``;`` and ``|``, and
leading ``NAME=value`` assignments dropped. Then:

- ``tamma-events ...`` and ``python -m tamma_events ...`` are parsed by the real click command
  (nested groups resolved: ``tamma-events embedded start``) without being run, so an unknown
  command, an unknown option or a bad value fails. File and path arguments are the reader's
  files: they are not opened.
- ``pip install`` of this project (``-e ".[extra]"``, ``"tamma-events[extra]"``) must name extras
  that ``pyproject.toml`` declares.
- A script or test path given to ``bash``, ``sh``, ``python`` or ``pytest`` must exist in the
  repository.

Unlabelled blocks (and ``text`` ones) are not code (a synopsis, a diagram, a plan); but their
lines that start with ``tamma-events `` and are invocations (no ``[...]``, ``<...>``, ``|`` or
CAPITAL placeholders) are parsed like the shell lines. A block in any other language fails the
test, so no example goes unchecked by being labelled with a language this test does not know.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import copy
import functools
import inspect
import io
import re
import shlex
import sys
import threading
import time
import traceback
import types
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import msgspec
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tamma_events import EventFilter, EventStore, embedded
from tamma_events.cli import main
from tamma_events.ops.migrating import drop
from tamma_events.stores.aio import AsyncEventStore
from tamma_events.streaming.subscriptions import Subscription
from tamma_events.tools.workload import generate_events

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - pytest brings tomli to Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/**/*.md"))]

#: ``sql`` blocks that are not run: (file, a fragment of the block's text) -> why. None, today.
SQL_NOT_RUN: dict[tuple[str, str], str] = {}

#: How long a subscription an example opens may take to deliver what the store holds: a bound
#: for a hang, generous for a busy machine.
SUBSCRIPTION_DEADLINE = 120.0
#: The events each file's store holds before its first block.
SEED_EVENTS = 200

PYTHON = {"python", "py", "python3"}
SQL = {"sql", "postgresql", "psql"}
SHELL = {"sh", "bash", "shell", "console", "zsh"}
REPLICA_NAMES = {"replica_dsn", "replica1_dsn", "replica2_dsn", "primary_dsn"}


# -- the blocks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A fenced block: ``line`` is its opening fence's, ``text`` what is between the fences."""

    path: str
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


def fenced_blocks(path: str) -> list[Block]:
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent = len(opening["indent"])
        fence = opening["fence"]
        info = opening["info"].strip()
        lang = info.split()[0].lower() if info else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
                break
            line = lines[j]
            body.append(line[min(indent, len(line) - len(line.lstrip())) :])
            j += 1
        blocks.append(Block(path, i + 1, lang, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def _loaded_names(block: Block) -> set[str]:
    try:
        tree = ast.parse(block.text)
    except SyntaxError:
        return set()
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


# -- shell lines -------------------------------------------------------------------------------


def _pyproject_extras() -> set[str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return set(tomllib.load(f)["project"]["optional-dependencies"])


def shell_lines(block: Block) -> Iterator[tuple[int, str]]:
    """(line number, command) for each command of a shell block, continuations joined."""
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        number = block.line + 1 + i
        text = lines[i]
        i += 1
        if block.lang == "console":
            if not text.lstrip().startswith("$ "):
                continue  # output
            text = text.lstrip()[2:]
        while text.rstrip().endswith("\\") and i < len(lines):
            text = text.rstrip()[:-1] + " " + lines[i]
            i += 1
        if text.strip() and not text.lstrip().startswith("#"):
            yield number, text


_SYNOPSIS = re.compile(r"[\[\]<>{}|]|\.\.\.|\b[A-Z][A-Z_]{2,}\b")


def plain_cli_lines(block: Block) -> Iterator[tuple[int, str]]:
    """The invocations of ``tamma-events`` in an unlabelled block (not its synopses)."""
    for offset, text in enumerate(block.text.splitlines()):
        line = text.strip().removeprefix("$ ")
        if line.startswith("tamma-events ") and not _SYNOPSIS.search(line.split("#")[0]):
            yield block.line + 1 + offset, line


_OPERATORS = {"&&", "||", ";", "|", "&", "|&", ";;"}


def commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, without redirections and leading assignments."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    result: list[list[str]] = [[]]
    tokens = list(lexer)
    k = 0
    while k < len(tokens):
        token = tokens[k]
        if token in _OPERATORS:
            result.append([])
        elif token and set(token) <= set("<>&") and any(c in token for c in "<>"):
            if result[-1] and result[-1][-1].isdigit():
                result[-1].pop()  # 2>, 1>&...
            k += 1  # and its target
        else:
            result[-1].append(token)
        k += 1
    simple = []
    for words in result:
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]
        if words:
            simple.append(words)
    return simple


def _text_params(command: click.Command) -> click.Command:
    """``command`` with its file and path parameters taken as plain strings: parsing a doc's
    line must not open the reader's files."""
    if not any(isinstance(p.type, (click.File, click.Path)) for p in command.params):
        return command
    lenient = copy.copy(command)
    params = []
    for param in command.params:
        if isinstance(param.type, (click.File, click.Path)):
            param = copy.copy(param)
            param.type = click.STRING
        params.append(param)
    lenient.params = params
    return lenient


def _parse(
    command: click.Command, name: str, args: list[str], parent: click.Context | None
) -> None:
    ctx = _text_params(command).make_context(name, list(args), parent=parent)
    with ctx:
        if isinstance(command, click.Group):
            protected = getattr(ctx, "_protected_args", None)
            if protected is None:  # pragma: no cover - click before 8.2
                protected = ctx.protected_args
            rest = [*protected, *ctx.args]
            if not rest:
                if command.invoke_without_command:
                    return
                raise click.UsageError("Missing command.", ctx)
            sub_name, sub, sub_args = command.resolve_command(ctx, rest)
            assert sub is not None and sub_name is not None
            _parse(sub, sub_name, sub_args, ctx)


def check_cli(args: list[str]) -> str | None:
    """Why ``tamma-events <args>`` would not parse, or None."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            _parse(main, "tamma-events", args, None)
    except click.exceptions.Exit as exc:
        return None if exc.exit_code == 0 else f"exits {exc.exit_code}"
    except click.ClickException as exc:
        return exc.format_message()
    except click.exceptions.Abort:
        return "aborted"
    return None


def _repo_path(name: str) -> str | None:
    """Why ``name``, a path a command is given, is not in the repository, or None."""
    if name.startswith(("/", "~", "$", ".venv")):
        return None
    if not (ROOT / name.split("::")[0]).exists():
        return f"{name} does not exist in the repository"
    return None


_REQUIREMENT = re.compile(r"^(?P<target>[^\[]+)\[(?P<extras>[^\]]*)\]$")
_PYTEST_VALUED = {"-k", "-m", "-p", "-o", "-c", "-n", "--timeout", "--deselect", "-W"}


def check_command(words: list[str]) -> str | None:
    """Why one simple command of a doc is wrong, or None (commands of other tools pass)."""
    program = Path(words[0]).name
    args = words[1:]
    if program == "tamma-events":
        return check_cli(args)
    if re.fullmatch(r"python(3(\.\d+)?)?", program):
        if args[:1] == ["-m"] and len(args) > 1:
            module, rest = args[1], args[2:]
            if module == "tamma_events":
                return check_cli(rest)
            if module in ("pip", "pytest"):
                return check_command([module, *rest])
            return None
        scripts = [a for a in args if not a.startswith("-")]
        if scripts and "-c" not in args:
            return _repo_path(scripts[0])
        return None
    if program in ("pip", "pip3") and args[:1] == ["install"]:
        extras = _pyproject_extras()
        for requirement in args[1:]:
            if requirement.startswith("-"):
                continue
            match = _REQUIREMENT.match(requirement)
            target = match["target"] if match else requirement
            ours = target in (".", "./") or target.replace("_", "-") == "tamma-events"
            if target.startswith((".", "/")):
                missing = _repo_path(target)
                if missing:
                    return missing
            if ours and match:
                unknown = {e.strip() for e in match["extras"].split(",")} - extras
                if unknown:
                    return f"pyproject.toml declares no extra {sorted(unknown)}"
        return None
    if program in ("bash", "sh"):
        scripts = [a for a in args if not a.startswith("-")]
        return _repo_path(scripts[0]) if scripts and "-c" not in args else None
    if program == "pytest":
        skip = False
        for arg in args:
            if skip:
                skip = False
            elif arg in _PYTEST_VALUED:
                skip = True
            elif not arg.startswith("-"):
                missing = _repo_path(arg)
                if missing:
                    return missing
        return None
    return None


def check_shell_line(block: Block, number: int, line: str) -> list[str]:
    try:
        parts = commands(line)
    except ValueError as exc:
        return [f"{block.path}:{number}: `{line.strip()}`: cannot be split: {exc}"]
    failures = []
    for words in parts:
        problem = check_command(words)
        if problem:
            failures.append(f"{block.path}:{number}: `{shlex.join(words)}`: {problem}")
    return failures


# -- subscriptions -----------------------------------------------------------------------------


@dataclass
class _Watched:
    subscription: Subscription
    query: Any
    schema: str
    where: str
    deadline: float


class SubscriptionWatch:
    """Stops each subscription the examples open once it has delivered the newest event its
    query or filter matches (see the module's docstring)."""

    def __init__(self, reader: Callable[[str], EventStore]) -> None:
        self._reader = reader
        self._watched: list[_Watched] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.failures: list[str] = []
        self._thread = threading.Thread(target=self._run, name="docs-subscriptions", daemon=True)
        self._thread.start()

    def add(self, subscription: Subscription, query: Any, schema: str, where: str) -> None:
        deadline = time.monotonic() + SUBSCRIPTION_DEADLINE
        with self._lock:
            self._watched.append(_Watched(subscription, query, schema, where, deadline))

    def _newest(self, item: _Watched) -> int | None:
        reader = self._reader(item.schema)
        if isinstance(item.query, EventFilter):
            newest = msgspec.structs.replace(
                item.query, order_by="position", order_direction="desc", limit=1, offset=0
            )
            events = reader.get_events(newest, include_archived=True)
        else:
            events = list(reader.read(item.query, backwards=True, limit=1))
        return events[0].position if events else None

    def _run(self) -> None:
        while not self._done.wait(0.02):
            with self._lock:
                watched = list(self._watched)
            for item in watched:
                subscription = item.subscription
                finished = subscription.stopped
                if not finished:
                    try:
                        newest = self._newest(item)
                    except Exception as exc:
                        with self._lock:
                            self.failures.append(f"{item.where}: watching it: {exc!r}")
                        newest = None
                    if newest is None or subscription.position >= newest:
                        finished = True
                    elif time.monotonic() > item.deadline:
                        with self._lock:
                            self.failures.append(
                                f"{item.where}: the subscription did not deliver position"
                                f" {newest} within {SUBSCRIPTION_DEADLINE:.0f} s"
                                f" (it delivered up to {subscription.position})"
                            )
                        finished = True
                    if finished:
                        subscription.stop()
                if finished:
                    with self._lock:
                        self._watched.remove(item)

    def take_failures(self) -> list[str]:
        with self._lock:
            failures, self.failures = self.failures, []
        return failures

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=60)
        for item in self._watched:
            item.subscription.stop()


# -- a replicated server, for the files that name replicas --------------------------------------


class Replication:
    """An embedded primary and streaming replicas of it, started when a file first needs them."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.primary: embedded.EmbeddedServer | None = None
        self.replicas: list[embedded.EmbeddedReplica] = []

    def start(self, replicas: int) -> tuple[str, list[str]]:
        if self.primary is None:
            self.primary = embedded.start(self.base / "primary", cleanup="delete")
        while len(self.replicas) < replicas:
            n = len(self.replicas) + 1
            self.replicas.append(
                embedded.start_replica(self.primary, self.base / f"replica{n}", port=5440 + n)
            )
        return self.primary.dsn, [replica.dsn for replica in self.replicas[:replicas]]

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.running:
                replica.stop()
        if self.primary is not None:
            self.primary.stop()


@pytest.fixture(scope="module")
def replication(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replication]:
    cluster = Replication(tmp_path_factory.mktemp("docs-replication"))
    try:
        yield cluster
    finally:
        cluster.stop()


# -- one file's run ----------------------------------------------------------------------------


_ASYNCIO = str(Path(asyncio.__file__).parent)


def _exception_report(block: Block, exc: BaseException, output: str) -> str:
    """``<file>:<line>`` of the failing line of the block (else the block's), the exception,
    the traceback from the example's frames on, and what the block printed."""
    source = str(ROOT / block.path)
    report = traceback.TracebackException.from_exception(exc)
    frames = [
        frame
        for frame in report.stack
        if frame.filename != __file__ and not frame.filename.startswith(_ASYNCIO)
    ]
    report.stack = traceback.StackSummary.from_list(frames)
    lines = [frame.lineno for frame in frames if frame.filename == source]
    line = lines[-1] if lines else block.line
    if isinstance(exc, SyntaxError) and exc.lineno is not None:
        line = exc.lineno
    text = "".join(report.format()).rstrip()
    message = f"{block.path}:{line} (the block at line {block.line}): {type(exc).__name__}: {exc}"
    message += f"\n{text}"
    if output:
        message += f"\n--- it printed:\n{output.rstrip()}"
    return message


def _example_line(path: str) -> str:
    """``<file>:<line>`` of the example running in this thread's stack."""
    source = str(ROOT / path)
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_filename == source:
            return f"{path}:{frame.f_lineno}"
        frame = frame.f_back
    return path


@dataclass
class DocRun:
    """The database, the environment and the namespace of one Markdown file's examples."""

    path: str
    base_dsn: str
    replicas: list[str]
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    schema: str = field(default_factory=lambda: f"docs_{uuid.uuid4().hex[:12]}")
    handled: list[Any] = field(default_factory=list)
    opened: list[Any] = field(default_factory=list)
    readers: dict[str, EventStore] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dsn = make_conninfo(self.base_dsn, options=f"-c search_path={self.schema}")
        self.store: EventStore | None = None
        self.watch: SubscriptionWatch | None = None
        self.roles_before: set[str] | None = None
        self.namespace: dict[str, Any] = {}

    def open(self) -> None:
        with psycopg.connect(self.base_dsn, autocommit=True) as conn:
            rows = conn.execute("SELECT rolname FROM pg_roles").fetchall()
        self.roles_before = {row[0] for row in rows}
        (self.tmp / "cwd").mkdir(parents=True)
        self.monkeypatch.chdir(self.tmp / "cwd")
        self.monkeypatch.setenv("XDG_DATA_HOME", str(self.tmp / "data"))
        self.monkeypatch.setenv("TAMMA_EVENTS_DSN", self.dsn)
        self.monkeypatch.setenv("TAMMA_EVENTS_SCHEMA", self.schema)
        self.store = EventStore(self.dsn, schema=self.schema)
        self.store.append_batch(generate_events(SEED_EVENTS, issues=50))
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, state text NOT NULL)")
            conn.execute("INSERT INTO orders VALUES (1, 'new')")
        self.watch = SubscriptionWatch(self._reader)
        for cls in (EventStore, AsyncEventStore):
            self.monkeypatch.setattr(cls, "subscribe", self._watching(cls.subscribe))
        module = types.ModuleType(f"docs_example_{self.schema}")
        self.monkeypatch.setitem(sys.modules, module.__name__, module)
        self.namespace = module.__dict__
        self.namespace.update(dsn=self.dsn, handle=self.handled.append, order_id=1)
        if self.replicas:
            self.namespace.update(
                primary_dsn=self.dsn,
                replica_dsn=self.replicas[0],
                replica1_dsn=self.replicas[0],
                replica2_dsn=self.replicas[-1],
            )

    def _reader(self, schema: str) -> EventStore:
        """A store of the watch's own on ``schema``, so that the examples' stores count none
        of its reads."""
        if schema not in self.readers:
            self.readers[schema] = EventStore(self.dsn, schema=schema, migrate=False)
        return self.readers[schema]

    def _watching(self, subscribe: Callable[..., Subscription]) -> Callable[..., Subscription]:
        watch, path = self.watch, self.path
        assert watch is not None

        @functools.wraps(subscribe)
        def watched(store: Any, *args: Any, **kwargs: Any) -> Subscription:
            subscription = subscribe(store, *args, **kwargs)
            query = args[0] if args else kwargs.get("query_or_filter")
            watch.add(subscription, query, store.schema, _example_line(path))
            return subscription

        return watched

    def run_python(self, block: Block) -> str | None:
        self.namespace["store"] = self.store
        output = io.StringIO()
        source = str(ROOT / block.path)
        try:
            try:
                tree = ast.parse(block.text, filename=source)
            except SyntaxError as exc:
                if exc.lineno is not None:
                    exc.lineno += block.line
                raise
            ast.increment_lineno(tree, block.line)
            flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
            code = compile(tree, source, "exec", flags=flags, dont_inherit=True)
            with contextlib.redirect_stdout(output):
                if code.co_flags & inspect.CO_COROUTINE:
                    asyncio.run(eval(code, self.namespace))
                else:
                    exec(code, self.namespace)
        except Exception as exc:
            return _exception_report(block, exc, output.getvalue())
        finally:
            self._keep_opened()
            if output.getvalue():
                print(f"--- {block.where} printed:\n{output.getvalue()}")
        return None

    def _keep_opened(self) -> None:
        for value in list(self.namespace.values()):
            if (
                isinstance(value, (EventStore, AsyncEventStore))
                and value is not self.store
                and all(value is not kept for kept in self.opened)
            ):
                self.opened.append(value)

    def run_sql(self, block: Block) -> str | None:
        text = re.sub(r"\btamma_events\b", self.schema, block.text)
        grantees = re.findall(r"\bGRANT\b[^;]*?\bTO\s+([A-Za-z_]\w*)", text, re.I | re.S)
        grantees += re.findall(r"\bIN\s+ROLE\s+([A-Za-z_]\w*)", text, re.I)
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                with conn.transaction(force_rollback=True):
                    for role in sorted(set(grantees)):
                        conn.execute(
                            sql.SQL(
                                "DO $$BEGIN CREATE ROLE {} NOLOGIN;"
                                " EXCEPTION WHEN duplicate_object THEN NULL; END$$"
                            ).format(sql.Identifier(role))
                        )
                    conn.execute(text.encode())
        except psycopg.Error as exc:
            return f"{block.where}: {type(exc).__name__}: {exc}"
        return None

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        for opened in self.opened:
            with contextlib.suppress(Exception):
                if isinstance(opened, AsyncEventStore):
                    asyncio.run(asyncio.wait_for(opened.close(), 10))
                else:
                    opened.close()
        for reader in self.readers.values():
            reader.close()
        if self.store is not None:
            self.store.close()
        drop(self.base_dsn, self.schema)
        if self.roles_before is None:
            return
        # The roles that appeared meanwhile and that the examples name (not another test's).
        named = set(re.findall(r"\w+", "".join(block.text for block in fenced_blocks(self.path))))
        with psycopg.connect(self.base_dsn, autocommit=True) as conn:
            rows = conn.execute("SELECT rolname FROM pg_roles").fetchall()
            for (role,) in rows:
                if role not in self.roles_before and role in named:
                    # Left alone when it still holds rights elsewhere (another run's schema).
                    with contextlib.suppress(psycopg.Error):
                        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# -- the test ----------------------------------------------------------------------------------


@pytest.mark.codec_neutral
# A bound for a hang, generous: a file that names replicas starts a primary and its replicas.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", DOCS)
def test_examples(
    path: str,
    pg_dsn: str,
    replication: Replication,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocks = fenced_blocks(path)
    failures: list[str] = []

    sql_blocks = [block for block in blocks if block.lang in SQL]
    for (listed, fragment), reason in SQL_NOT_RUN.items():
        if listed == path and not any(fragment in block.text for block in sql_blocks):
            failures.append(
                f"{path}: SQL_NOT_RUN lists a block with {fragment!r} ({reason}),"
                " which the file no longer has"
            )

    run: DocRun | None = None
    if any(block.lang in PYTHON | SQL for block in blocks):
        names = set().union(*(_loaded_names(b) for b in blocks if b.lang in PYTHON))
        base_dsn, replicas = pg_dsn, []
        if names & REPLICA_NAMES:
            base_dsn, replicas = replication.start(2 if "replica2_dsn" in names else 1)
        run = DocRun(path, base_dsn, replicas, tmp_path, monkeypatch)
    try:
        if run is not None:
            run.open()
        for block in blocks:
            if block.lang in PYTHON:
                assert run is not None and run.watch is not None
                failure = run.run_python(block)
                failures += [failure] if failure else []
                failures += run.watch.take_failures()
            elif block.lang in SQL:
                assert run is not None
                if any(
                    listed == path and fragment in block.text for listed, fragment in SQL_NOT_RUN
                ):
                    continue
                failure = run.run_sql(block)
                failures += [failure] if failure else []
            elif block.lang in SHELL:
                for number, line in shell_lines(block):
                    failures += check_shell_line(block, number, line)
            elif block.lang in ("", "text"):
                for number, line in plain_cli_lines(block):
                    failures += check_shell_line(block, number, line)
            else:
                failures.append(
                    f"{path}:{block.line}: a ```{block.lang} block, which this test neither runs"
                    " nor checks; label it with a language it knows, or teach it this one"
                )
    finally:
        if run is not None:
            run.close()
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)


# -- the harness's own parsing -----------------------------------------------------------------


@pytest.mark.codec_neutral
def test_shell_lines_are_split_into_commands() -> None:
    line = 'A=1 tamma-events tail --after 0 | jq .data && pip install -e ".[web]" 2>/dev/null'
    assert commands(line) == [
        ["tamma-events", "tail", "--after", "0"],
        ["jq", ".data"],
        ["pip", "install", "-e", ".[web]"],
    ]
    assert check_cli(["tail", "--after", "0"]) is None
    assert check_cli(["tail", "--no-such-option"]) is not None
    assert check_cli(["no-such-command"]) is not None
    assert check_cli(["verify", "--start", "zero"]) is not None
    assert check_command(["pip", "install", "-e", ".[no-such-extra]"]) is not None
    assert check_command(["bash", "scripts/no-such-script"]) is not None
    block = Block("x.md", 1, "", "tamma-events [--dsn DSN] COMMAND\ntamma-events init\n")
    assert list(plain_cli_lines(block)) == [(3, "tamma-events init")]
