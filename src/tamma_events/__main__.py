"""``python -m tamma_events``: the ``tamma-events`` command."""

from .cli import main

main(prog_name="tamma-events")
