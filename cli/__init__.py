"""The `stylestream` command (cli/main.py)."""

import sys


def main() -> None:
    """The console script. Ctrl-C while the command's libraries load, or before its own handling starts,
    ends it quietly with exit 130, as it does once it runs (no traceback)."""
    try:
        from stylestream.cli.main import main as run

        run()
    except KeyboardInterrupt:
        sys.exit(130)
