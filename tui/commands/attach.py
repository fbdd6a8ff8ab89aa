"""``xray-tui attach``: watch a live run, in the app or ``--headless``.

A run is reached by name (its sockets in the run directory), by
``--socket PATH`` or over ``--tcp``; ``--pid`` first loads the probe into a
process started without it (:mod:`tui.commands.inject`).
"""

from __future__ import annotations

import os

from tui import feed
from tui.commands import inject, viewer
from tui.commands.checks import check_sockets, check_writable
from tui.commands.errors import CliError
from tui.commands.watch import headless


def cmd_attach(args) -> int:
    """Watch a live run: the app, or alerts on stdout with --headless.

    The app follows the run by name: it keeps the last data when the run ends
    or disconnects and re-attaches when a run of that name is live again;
    with no name and several live runs it asks which (tui.reattach, tui.chooser).
    ``--pid`` first loads the probe into a process started without it (tui.injector).
    """
    check_writable(args.log)
    if args.pid is not None:
        return inject.cmd_attach_pid(args, cmd_attach)
    inject.check_pid_options(args)
    if args.socket:
        check_sockets(args.socket)
    if args.headless or args.socket:
        source = _live_source(args)
        if args.headless:
            return headless(source, args, live=True)
        return viewer.run_app(source, args)
    from tui.reattach import ReattachSource, live_runs

    if args.run is not None:
        feed.resolve_run(args.run)  # an unknown name is a one-line error, as in headless mode
    elif not live_runs():
        feed.resolve_run(None)  # "no live runs (start one with ...)"
    return viewer.run_app(ReattachSource(args.run, record=args.log), args)


def _live_source(args):
    """The source of ``--tcp``, ``--socket`` or the named run, recorded to ``--log`` when given."""
    if args.tcp:
        source = _tcp_source(args)
    else:
        source = feed.SocketSource(args.socket) if args.socket else feed.SocketSource.for_run(args.run)
    return feed.RecordingSource(source, args.log) if args.log else source


def _tcp_source(args):
    """``--tcp``: the run's own TCP listeners, or HOST:PORT with a token from a file or the environment.

    The token is never taken on the command line, where other users could
    read it in the process list.
    """
    if args.tcp is True:
        return feed.SocketSource.for_run(args.run, tcp=True)
    if args.token_file:
        token = feed.read_token(args.token_file)
    elif os.environ.get("XRAY_TUI_TOKEN"):
        token = os.environ["XRAY_TUI_TOKEN"].strip()
    else:
        raise CliError("--tcp HOST:PORT needs the run's token: --token-file FILE or $XRAY_TUI_TOKEN")
    return feed.SocketSource([f"tcp:{args.tcp}"], label=args.run or args.tcp, token=token)
