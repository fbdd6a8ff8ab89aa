"""Opening the Textual app on a source: the one place the CLI imports Textual.

Commands call :func:`run_app` through this module (``viewer.run_app``), so
tests can replace it to see what a command would show without a screen.
"""

from __future__ import annotations

from tui.commands.errors import EXIT_OK, CliError


def run_app(source, args, title: str | None = None, replay: bool = False, **compare) -> int:
    """Run the app on ``source`` until it quits; its return code (0 when it set none).

    ``compare``: ``other`` and ``other_label`` for a second recording beside the first.
    """
    from tui.app import XRayApp  # Textual is imported only for the app, never for headless commands
    from tui.commands.notify import app_options

    notify = app_options(args)  # a bad --notify-interval is a one-line error before the screen opens
    try:
        app = XRayApp(source, theme=args.theme, title=title, replay=replay, **notify, **compare)
    except ValueError as exc:  # an unknown theme
        raise CliError(str(exc)) from None
    app.run()
    return app.return_code or EXIT_OK
