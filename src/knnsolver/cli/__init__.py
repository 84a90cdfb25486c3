"""The ``knnsolver`` command line (:mod:`knnsolver.cli.main`)."""
from __future__ import annotations

import sys


def run() -> None:
    """The ``knnsolver`` command: :func:`knnsolver.cli.main.main`, with an interrupt while its libraries load
    ending as a later one does (a message and status 130), not in a traceback."""
    try:
        from knnsolver.cli.main import main
    except KeyboardInterrupt:
        print("knnsolver: interrupted while starting; nothing was done", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
