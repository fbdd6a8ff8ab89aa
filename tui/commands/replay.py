"""``xray-tui replay``: a recording in the app (``--vs B``: two side by side) or ``--headless``."""

from __future__ import annotations

import os

from probes.protocol import wire
from tui import feed
from tui.commands import viewer
from tui.commands.checks import check_recording
from tui.commands.errors import CliError
from tui.commands.watch import headless


def cmd_replay(args) -> int:
    """Open a recording in the app, or print its alerts with --headless; --vs B sets a second beside it."""
    check_recording(args.file)
    source = feed.FileSource(args.file)
    if args.headless:
        if args.vs:
            raise CliError("--vs compares two recordings in the app; it does not go with --headless")
        return headless(source, args, live=False)
    # The header says it is a recording, so nobody takes it for a live run.
    if not args.vs:
        return viewer.run_app(source, args, title=f"replay: {os.path.basename(args.file)}", replay=True)
    check_recording(args.vs)
    from tui.compare import load_state

    try:
        other = load_state(args.vs)
    except wire.WireError as exc:
        raise CliError(f"{args.vs}: {exc}") from None
    a, b = os.path.basename(args.file), os.path.basename(args.vs)
    return viewer.run_app(source, args, title=f"compare: A {a} vs B {b}", replay=True, other=other,
                          other_label=b)
