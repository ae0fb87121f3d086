#!/usr/bin/env python3
"""Generate the sync modules of tamma-events from their async originals.

The store's drivers are written once, for asyncio (``src/tamma_events/stores/aio.py`` and the
modules it uses); the sync modules (``src/tamma_events/stores/store.py``, ...) are made from them
by this script, as psycopg and psycopg_pool make theirs. The conversion works on tokens, so
comments and layout survive:

- ``async def``, ``async with`` and ``async for`` lose their ``async``, and ``await`` goes;
- ``Awaitable[T]`` becomes ``T``, and ``AsyncGenerator[Y, S]`` ``Generator[Y, S, None]``;
- the names in `RENAMES` are replaced, in code and, as whole words, in strings and comments
  (``AsyncEventStore`` becomes ``EventStore``, ``aclose`` becomes ``close``, ...), but for the
  module's docstring, which speaks of both modules;
- a real difference is written as::

      if True:  # ASYNC
          ...  # the async code
      else:
          ...  # the sync code

  and only the ``else`` branch (dedented) is kept in the sync module; with no ``else``, the
  block is dropped.

The result has its imports pruned and sorted, is formatted with ruff, and starts with a
"DO NOT CHANGE" header.

    python scripts/async_to_sync.py           # write the sync modules
    python scripts/async_to_sync.py --check   # exit 1 when one is not current
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "tamma_events"

#: (async original, sync module generated from it), relative to the package.
FILES = [
    ("ops/drive_async.py", "ops/drive.py"),
    ("stores/aio.py", "stores/store.py"),
    ("stores/consumers_async.py", "stores/consumers.py"),
    ("stores/group_async.py", "stores/group.py"),
    ("streaming/listen_async.py", "streaming/listen.py"),
]

#: Names of the async API and their sync counterparts.
RENAMES = {
    "AsyncConnection": "Connection",
    "AsyncConnectionPool": "ConnectionPool",
    "AsyncConsumer": "Consumer",
    "AsyncCursor": "Cursor",
    "AsyncEventStore": "EventStore",
    "AsyncExitStack": "ExitStack",
    "AsyncGenerator": "Generator",
    "AsyncGroupCommit": "GroupCommit",
    "AsyncIterator": "Iterator",
    "AsyncListener": "Listener",
    "AsyncTransaction": "Transaction",
    "_do_async": "_do",
    "consumers_async": "consumers",
    "drive_async": "drive",
    "group_async": "group",
    "listen_async": "listen",
    "copy_rows_async": "copy_rows",
    "native_rows_async": "native_rows",
    "_copy_data_async": "_copy_data",
    "_AsyncWaiter": "_Waiter",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "__aiter__": "__iter__",
    "__anext__": "__next__",
    "aclose": "close",
    "aclosing": "closing",
    "asynccontextmanager": "contextmanager",
    "enter_async_context": "enter_context",
    "rollback_async": "rollback",
    "run_async": "run",
}

_WORD = re.compile(r"\b(" + "|".join(sorted(RENAMES, key=len, reverse=True)) + r")\b")
_IF_ASYNC = re.compile(r"^(?P<indent>[ ]*)if True:[ ]*#[ ]*ASYNC[ ]*$")

HEADER = (
    "# WARNING: generated from src/tamma_events/{source} by scripts/async_to_sync.py.\n"
    "# DO NOT CHANGE! Change the original file instead, then run the script.\n"
)


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """The index of the first line after ``start`` that is indented ``indent`` or less
    (blank lines and comments deeper inside the block belong to it)."""
    index = start
    while index < len(lines):
        line = lines[index]
        if line.strip() and len(line) - len(line.lstrip(" ")) <= indent:
            return index
        index += 1
    return index


def strip_async_blocks(text: str) -> str:
    """Keep the ``else`` branch of each ``if True:  # ASYNC`` block, dedented."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    index = 0
    while index < len(lines):
        match = _IF_ASYNC.match(lines[index].rstrip("\n"))
        if match is None:
            out.append(lines[index])
            index += 1
            continue
        indent = len(match["indent"])
        end = _block_end(lines, index + 1, indent)
        # Blank lines before the else belong to neither branch.
        if end < len(lines) and lines[end].rstrip() == " " * indent + "else:":
            body_end = _block_end(lines, end + 1, indent)
            for line in lines[end + 1 : body_end]:
                out.append(line[4:] if line.startswith(" " * (indent + 4)) else line)
            index = body_end
        else:
            index = end
    return "".join(out)


def unasync_tokens(text: str) -> str:
    """Drop ``async`` and ``await`` (with the space after them) and rename the async names,
    token by token, leaving everything else as it is."""
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def offset(position: tuple[int, int]) -> int:
        return starts[position[0] - 1] + position[1]

    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    edits: list[tuple[int, int, str]] = []
    significant = [t for t in tokens if t.type not in _NOT_CODE]
    docstring = significant[0] if significant and significant[0].type == tokenize.STRING else None
    for index, tok in enumerate(tokens):
        if tok is docstring:
            continue
        start, end = offset(tok.start), offset(tok.end)
        if tok.type == tokenize.NAME and tok.string in ("async", "await"):
            following = tokens[index + 1]
            if tok.string == "await" or following.string in ("def", "with", "for"):
                edits.append((start, offset(following.start), ""))
            continue
        if (
            tok.type == tokenize.NAME
            and tok.string == "Awaitable"
            and tokens[index + 1].string == "["
        ):
            # Awaitable[T] is T.
            closing = _closing_bracket(tokens, index + 1)
            edits.append((start, offset(tokens[index + 2].start), ""))
            edits.append((offset(closing.start), offset(closing.end), ""))
        elif tok.type == tokenize.NAME and tok.string in RENAMES:
            edits.append((start, end, RENAMES[tok.string]))
            if tok.string == "AsyncGenerator" and tokens[index + 1].string == "[":
                # AsyncGenerator[Y, S] is Generator[Y, S, None]: it returns nothing.
                closing = _closing_bracket(tokens, index + 1)
                edits.append((offset(closing.start), offset(closing.start), ", None"))
        elif tok.type in _TEXT_TOKENS:
            renamed = _WORD.sub(lambda m: RENAMES[m[1]], tok.string)
            if renamed != tok.string:
                edits.append((start, end, renamed))
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _closing_bracket(tokens: list[tokenize.TokenInfo], opening: int) -> tokenize.TokenInfo:
    depth = 0
    for tok in tokens[opening:]:
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
            if depth == 0:
                return tok
    raise ValueError(f"unbalanced brackets after line {tokens[opening].start[0]}")


_NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING}

_TEXT_TOKENS = {
    tokenize.STRING,
    tokenize.COMMENT,
    *((tokenize.FSTRING_MIDDLE,) if hasattr(tokenize, "FSTRING_MIDDLE") else ()),
}


def _ruff(*args: str, text: str) -> str:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            *args,
            "--stdin-filename",
            str(PACKAGE / "generated.py"),
            "-",
        ],
        input=text,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout


def convert(source: str, text: str) -> str:
    """The sync module made from the async original ``source`` (its text)."""
    converted = unasync_tokens(strip_async_blocks(text))
    # Imports only the async code used go; then the layout is ruff's.
    pruned = _ruff("check", "--select", "F401,I", "--fix-only", text=converted)
    return HEADER.format(source=source) + _ruff("format", text=pruned)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check they are current")
    args = parser.parse_args()
    stale = []
    for source, target in FILES:
        generated = convert(source, (PACKAGE / source).read_text(encoding="utf-8"))
        path = PACKAGE / target
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if generated == current:
            continue
        if args.check:
            stale.append(target)
        else:
            path.write_text(generated, encoding="utf-8")
            print(f"wrote src/tamma_events/{target} from {source}")
    if stale:
        print(
            "not generated from their async originals: "
            + ", ".join(f"src/tamma_events/{name}" for name in stale)
            + "; run python scripts/async_to_sync.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
