"""``xray-tui demo``: train the demo GPT-2 with the probe attached, and watch it.

In the app the trainer runs in a child process (the app keeps its own
core); ``--headless`` trains in this process and prints what
``attach --headless`` would.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from tui import feed
from tui.commands import viewer
from tui.commands.checks import check_theme, check_writable
from tui.commands.errors import CliError
from tui.commands.notify import app_options
from tui.commands.watch import rules_engine, status_every
from tui.headless import AlertPrinter, RunWatch


def cmd_demo(args) -> int:
    """Train the demo GPT-2 with the probe attached, and watch it."""
    # Every option is checked before torch is imported or a trainer started (that costs seconds):
    # a typo costs no more than --help.
    check_theme(args.theme)
    check_writable(args.log)
    app_options(args)  # --notify-interval, checked here as well as by the app (after the trainer started)
    every = status_every(args)
    rules = rules_engine(args)  # the probe itself evaluates the rules with these thresholds
    if not args.headless:
        _need_trainer_packages()  # the trainer runs in a child: find them here, not in its log
        return _demo_app(args)
    try:
        from probes.demo import training as demo
    except ImportError as exc:
        _missing(exc.name)
    return _demo_headless(demo, args, every, rules)


def _need_trainer_packages() -> None:
    """torch and transformers are installed (found, not imported: importing torch takes seconds)."""
    for name in ("torch", "transformers"):
        if importlib.util.find_spec(name) is None:
            _missing(name)


def _missing(name: str | None):
    raise CliError(f"the demo needs torch and transformers ({name} is missing): "
                   "pip install 'xray-tui[demo]' torch==2.13.0") from None


def _demo_headless(demo, args, every: float | None, rules) -> int:
    """Train in this process and print what `attach --headless` prints: alerts, a status line every
    ``every`` seconds (``--status-every``), the end line; the same exit status (3 stops the training
    at once). ``rules``: the ``--rules`` thresholds' engine, or None."""
    printer = AlertPrinter(as_json=args.json)
    printer.fail_on = args.fail_on
    watch = RunWatch(printer, live=True, label=args.name)
    watch.stops_run = True
    lock = threading.Lock()  # messages come on the probe's publisher thread, status lines on a timer

    def listen(msg) -> None:
        with lock:
            watch.handle(msg)

    done = threading.Event()

    def tick() -> None:
        while every and not done.wait(every):
            with lock:
                watch.status()

    ticker = threading.Thread(target=tick, name="xray-tui-demo-status", daemon=True)
    ticker.start()
    try:
        demo.train(steps=args.steps or 300, every=args.every, fault=args.fault, fault_step=args.fault_step,
                   name=args.name, log=args.log, listener=listen, rules=rules,
                   should_stop=lambda: watch.tripped is not None)  # --fail-on: stop at once
    except KeyboardInterrupt:
        return 130
    finally:
        done.set()
        ticker.join()
    # the probe's close gives its publisher 5 s; on a busy machine the End comes a little later
    deadline = time.monotonic() + 30.0
    while watch.tripped is None and not watch.ends and time.monotonic() < deadline:
        time.sleep(0.05)
    with lock:
        return watch.finish(args.fail_on)


def _demo_app(args) -> int:
    """The trainer in a child process, the app in this one; `q` stops both."""
    logf = tempfile.NamedTemporaryFile(prefix="xray-demo-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "probes.demo", "--steps", str(args.steps), "--every", str(args.every),
           "--fault", args.fault, "--fault-step", str(args.fault_step), "--name", args.name,
           "--parent", str(os.getpid())]  # it stops when this process is gone, however it went
    if args.log:
        cmd += ["--log", args.log]
    env = dict(os.environ)
    # Leave the app a core: torch's OpenMP threads spin at each parallel region's barrier, and when
    # one of them shares a core with the app every region waits for it (on 2 cores the demo ran
    # at 0.3 steps/s beside the app, 7 with one thread fewer).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) - 1)))
    child = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    source = feed.PidSource(child.pid, label=args.name, alive=lambda: child.poll() is None)
    try:
        return viewer.run_app(source, args)
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGINT)  # lets the probe close its socket and recording
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        logf.close()
        if child.returncode not in (0, -signal.SIGINT, None):
            print(f"xray-tui: the demo trainer exited with {child.returncode}; log: {logf.name}", file=sys.stderr)
        else:
            os.unlink(logf.name)
