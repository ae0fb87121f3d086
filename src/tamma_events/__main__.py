"""``python -m tamma_events``: the ``tamma-events`` command."""

from tamma_events.cli import main

main(prog_name="tamma-events")
