"""The CLI's exit statuses and its one-line error (see :mod:`tui.cli` for what each status means)."""

from __future__ import annotations

EXIT_OK, EXIT_DISCONNECTED, EXIT_USAGE, EXIT_ALERT = 0, 1, 2, 3


class CliError(Exception):
    """A one-line error for the user; exit status 2."""
