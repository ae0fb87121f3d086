"""The package's layers: data flows one way, from the public API down to the wire and back.

Each module may import only from its own layer or the layers below it (docs/design.md draws the
map). The tools the CLI runs are not imported by ``import tamma_events``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tamma_events

pytestmark = pytest.mark.codec_neutral

PACKAGE = Path(tamma_events.__file__).parent

#: From the top down; a module belongs to the first layer one of whose prefixes names it.
LAYERS: list[tuple[str, ...]] = [
    ("tamma_events.cli", "tamma_events.__main__", "tamma_events.tools"),
    ("tamma_events.streaming.web",),
    ("tamma_events.stores",),
    ("tamma_events.streaming",),
    ("tamma_events.embedded",),
    ("tamma_events.ops",),
    ("tamma_events.sql",),
    ("tamma_events.filters",),
    ("tamma_events.codec",),
    ("tamma_events.model", "tamma_events.errors", "tamma_events.checks", "tamma_events._native"),
]


def _layer(module: str) -> int | None:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path) -> list[tuple[int, str]]:
    """The tamma_events modules ``path`` imports (a name imported from a package counts as
    its submodule when there is one)."""
    modules = _modules()
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("tamma_events")]
            found += [(node.lineno, name) for name in names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("tamma_events"):
                continue
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.append((node.lineno, child if child in modules else node.module))
    return found


def test_every_module_has_a_layer() -> None:
    assert len(_modules()) > 40
    missing = [m for m in _modules() if m != "tamma_events" and _layer(m) is None]
    assert missing == []


def test_imports_only_go_down() -> None:
    upward = []
    for module, path in _modules().items():
        if module == "tamma_events":
            continue  # the public API re-exports from every layer
        own = _layer(module)
        assert own is not None
        for line, imported in _imports(path):
            theirs = _layer(imported)
            if imported == "tamma_events":
                theirs = 0 if own == 0 else None  # only the CLI reads the package's own names
            if theirs is None or theirs < own:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}")
    assert upward == []


def test_no_relative_imports() -> None:
    relative = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
        for path in _modules().values()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert relative == []


def test_importing_the_package_leaves_the_tools_alone() -> None:
    code = (
        "import sys, tamma_events; "
        "print(sorted(m for m in sys.modules if m.startswith('tamma_events.tools')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
