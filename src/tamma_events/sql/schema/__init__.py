"""The store's schema: the baseline, the migrations on top of it, and the legacy steps.

The migrator that applies them is `tamma_events.ops.migrating`.

``0010_baseline.sql`` is the whole schema as of version 10, written top to bottom; later changes
are small migrations on top of it, ``0011_name.sql`` and so on, beside it. A schema is brought up
to date inside one READ COMMITTED transaction per run, under an advisory lock, with
``search_path`` set to it; the versions applied are recorded in ``schema_migrations``. Running
`migrate` again is a no-op, and a schema already up to date is not locked or written at all.

Two kinds of store reach version 10:

* A new one (no ``schema_migrations``, or an empty one) gets the baseline alone, recorded as
  version 10, ``baseline``.
* One created before the baseline existed, at a version from 1 to 9, gets the steps it lacks
  from ``legacy/`` (the ten migrations the baseline folds together, kept unchanged; each is
  recorded under its own version and name, as before), then ``legacy/converge.sql``, which
  records no version.

The two end with the same catalog. The legacy steps leave the baseline's tables, indexes,
views, triggers and functions, text for text: the baseline was written to create exactly what
they leave, function bodies included, rather than cleaner bodies that the upgrade would then
have to re-create. It has to be: a store the legacy steps brought to version 10 before the
baseline existed is already current, and is left alone like any other. What the legacy steps
miss is in the converge script, run once on the way through version 10: the one grant they
never passed on (``chain``, to a role set up at version 1). ``tests/test_schema_catalog.py``
checks that a store migrated from every earlier version, with an application role granted
before, ends with the catalog of a new one.

Both kinds then get the migrations after the baseline, the same way.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from importlib.abc import Traversable

__all__ = ["Migration", "converge_script", "legacy_migrations", "migrations", "plan"]

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class Migration(NamedTuple):
    version: int
    name: str
    text: str


def _read(directory: Traversable) -> list[Migration]:
    found = []
    for entry in directory.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort()
    return found


def migrations() -> list[Migration]:
    """The migrations a store is built with now, in version order: the baseline (version 10,
    the whole schema), then each later one. The last one's version is the version this package
    needs."""
    return _read(resources.files(__name__))


def legacy_migrations() -> list[Migration]:
    """The migrations the baseline folds together (versions 1 to 10), in version order: what
    brings a store created before the baseline up to it, and what built such stores."""
    return _read(resources.files(__name__) / "legacy")


def converge_script() -> str:
    """What makes a store the legacy steps brought to the baseline's version equal to one the
    baseline created (see ``legacy/converge.sql``)."""
    return (resources.files(__name__) / "legacy" / "converge.sql").read_text(encoding="utf-8")


def plan(done: set[int]) -> list[tuple[Migration, bool]]:
    """The scripts that bring a schema whose applied versions are ``done`` up to date, in order,
    each with whether its version is recorded in ``schema_migrations``."""
    current = migrations()
    baseline = current[0].version
    done = set(done)
    steps: list[tuple[Migration, bool]] = []
    if done and baseline not in done:
        # Created before the baseline: its remaining legacy steps reach the baseline's version.
        for migration in legacy_migrations():
            if migration.version <= baseline and migration.version not in done:
                steps.append((migration, True))
                done.add(migration.version)
        steps.append((Migration(baseline, "converge", converge_script()), False))
    for migration in current:
        if migration.version not in done:
            steps.append((migration, True))
    return steps
