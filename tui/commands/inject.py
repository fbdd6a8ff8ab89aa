"""``xray-tui attach --pid PID`` and ``xray-tui detach PID``: the probe loaded into, or removed from,
a process started without it. How it gets there is :mod:`tui.injector`."""

from __future__ import annotations

import os
import sys

from tui.injector import InjectFailed
from tui.injector.exchange import request

#: attach's options that only mean something with --pid (flag, dest)
PID_OPTIONS = (("--model", "model"), ("--optimizer", "optimizer"), ("--every", "every"), ("--name", "name"),
               ("--probe-log", "probe_log"), ("--load-only", "load_only"))


def _say(line: str) -> None:
    print(f"xray-tui: {line}", file=sys.stderr, flush=True)


def check_pid_options(args) -> None:
    """Without --pid, the options that load a probe are a mistake: say so."""
    given = [flag for flag, dest in PID_OPTIONS if getattr(args, dest, None)]
    if given:
        raise InjectFailed(f"{', '.join(given)} work{'s' if len(given) == 1 else ''} with --pid "
                           "(loading the probe into a process)")


def cmd_attach_pid(args, watch) -> int:
    """``attach --pid``: load the probe into the process, then watch the run with ``watch(args)``."""
    if args.run is not None:
        raise InjectFailed("give a run name or --pid, not both (--name names the run --pid starts)")
    if args.socket or args.tcp:
        raise InjectFailed("--pid watches the run it loads; --socket and --tcp do not go with it")
    log = None
    if args.probe_log:
        log = os.path.abspath(args.probe_log)
        if not os.path.isdir(os.path.dirname(log)):
            raise InjectFailed(f"--probe-log {args.probe_log}: no such directory {os.path.dirname(log)}")
    opts = {"every": args.every, "name": args.name, "log": log, "model": args.model, "optimizer": args.optimizer}
    status = request(args.pid, "attach", opts, args.timeout, say=_say)
    run = status["run"]
    if status.get("already"):
        _say(f"pid {args.pid} already has a probe ({status['already']}): run {run}")
    else:
        _say(f"loaded the probe into pid {args.pid}: run {run}, watching {status.get('model')} "
             f"trained by {status.get('optimizer')}")
    if args.load_only:
        _say(f"watch it with `xray-tui attach {run}`; remove it with `xray-tui detach {args.pid}`")
        return 0
    args.run, args.pid = run, None
    for _, dest in PID_OPTIONS:  # done with: the watch that follows is a plain `attach RUN`
        setattr(args, dest, None)
    return watch(args)


def cmd_detach(args) -> int:
    """``detach PID``: remove the probe ``attach --pid`` loaded."""
    status = request(args.pid, "detach", {}, args.timeout, say=_say)
    _say(f"removed the probe from pid {args.pid} (run {status.get('run')}): its hooks and thread are gone")
    return 0
