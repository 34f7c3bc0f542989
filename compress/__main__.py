"""``python -m compress`` and the ``compress`` command. A Ctrl-C at any moment, even while the
command line is still importing, ends with exit 130 and one line, never a traceback."""
from __future__ import annotations

import sys


def entry() -> None:
    try:
        import signal

        from .errors import on_sigint

        signal.signal(signal.SIGINT, on_sigint)
        from .cli import main
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    main()


if __name__ == "__main__":
    entry()
