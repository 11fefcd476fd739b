"""``python -m blipserve.cli``: the ``blipserve`` command."""

from blipserve.cli import main

raise SystemExit(main())
