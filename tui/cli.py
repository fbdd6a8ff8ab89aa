"""The `xray-tui` command: demo, attach, ls, replay, export, detach.

Exit status: 0 when the watched run finished or was stopped by
``on_alert="stop"`` (or the command did its job); 1 when it crashed, was
killed or interrupted, or its stream stopped without an End (a live run
that disconnected, a recording cut short); 2 for usage errors, unknown runs
and bad input (one line on stderr, never a traceback); 3 as soon as
``--fail-on`` sees an alert of that severity or worse; 130 when the viewer
itself is interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from probes.protocol import rundir, wire

from . import feed, inject_cli
from .headless import AlertPrinter, RunWatch

EXIT_OK, EXIT_DISCONNECTED, EXIT_USAGE, EXIT_ALERT = 0, 1, 2, 3
FAULTS = ("none", "exploding", "dead", "nan", "stalled")


class CliError(Exception):
    """A one-line error for the user; exit status 2."""


# -- commands ---------------------------------------------------------------


def cmd_ls(args) -> int:
    """List live runs (removing stale entries of dead processes)."""
    try:
        runs = rundir.live_runs()
    except rundir.RunDirError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        for r in runs:
            print(json.dumps(r.as_json()))
        return EXIT_OK
    if not runs:
        print(f"no live runs in {rundir.run_dir()}")
        return EXIT_OK
    # RANKS: ranks serving here / the job's world size; NODES: hosts of the job (rank 0 knows them)
    print(f"{'NAME':<24} {'PID':>8} {'RANKS':>6} {'NODES':>5}  {'STARTED':<19}  COMMAND")
    for r in runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.ranks[0].started))
        ranks = f"{len(r.ranks)}/{r.ranks[0].world_size}"
        nodes = max(m.nodes for m in r.ranks)
        print(f"{r.name:<24} {r.pid:>8} {ranks:>6} {nodes:>5}  {started:<19}  {' '.join(r.ranks[0].argv)[:60]}")
        logs = [m.log for m in r.ranks if m.log]
        if logs:  # where to replay it from later
            more = f" (+{len(logs) - 1} more ranks)" if len(logs) > 1 else ""
            print(f"{'':<24} recording: {logs[0]}{more}")
    return EXIT_OK


def _live_source(args):
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


def _rules_engine(args):
    """A RuleEngine with the thresholds of ``--rules FILE``, or None without it."""
    if not getattr(args, "rules", None):
        return None
    from probes.rules import RuleEngine
    from probes.rules.config import RulesConfigError, load

    try:
        return RuleEngine(load(args.rules))
    except RulesConfigError as exc:
        raise CliError(str(exc)) from None


def _headless(source, args, *, live: bool) -> int:
    """Print alerts and status lines from ``source``, then how the run ended; pick the exit code.

    Exit 3 as soon as an alert meets ``--fail-on`` (the run may go on), else
    0 when the run finished or stopped, 1 when it crashed, was killed or
    interrupted, or the stream stopped without an End. Status lines come
    every ``--status-every`` seconds: of the wall clock when live (a hung
    run still gets them), of the probe's own timestamps in a replay.
    """
    every = _seconds(args.status_every, "--status-every")
    every = None if args.quiet or every <= 0 else every
    printer = AlertPrinter(as_json=args.json, rules=_rules_engine(args))
    printer.fail_on = args.fail_on
    watch = RunWatch(printer, live=live, label=source.label)
    try:
        if live:
            _watch_live(source, watch, every)
        else:
            _watch_replay(source, watch, every)
    except KeyboardInterrupt:
        return 130
    torn = getattr(source, "torn", 0)
    if torn:
        print(f"xray-tui: {source.label}: the recording ends with {torn} torn bytes "
              "(the writer stopped mid-frame); everything before them was read", file=sys.stderr)
    return watch.finish(args.fail_on)


_DONE = object()


def _watch_live(source, watch: RunWatch, every: float | None) -> None:
    """Read the live source on a thread of its own, so status lines keep their clock while the
    run is quiet; return when the stream ends or ``--fail-on`` trips (the reader is stopped)."""
    q: queue.Queue = queue.Queue(maxsize=256)
    stop = threading.Event()

    def read() -> None:
        item = _DONE
        try:
            for batch in source.batches(stop):
                while not stop.is_set():
                    try:
                        q.put(batch, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            item = exc
        q.put(item)

    reader = threading.Thread(target=read, name="xray-tui-headless-reader", daemon=True)
    reader.start()
    next_status = time.monotonic() + every if every else math.inf
    try:
        while True:
            try:
                item = q.get(timeout=max(0.0, min(next_status - time.monotonic(), 1.0)))
            except queue.Empty:
                item = None
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            for msg in item or ():
                watch.handle(msg)
                if watch.tripped is not None:
                    return
            if time.monotonic() >= next_status:
                watch.status()
                next_status += every * (math.floor((time.monotonic() - next_status) / every) + 1)
    finally:
        stop.set()
        reader.join(2.0)  # the recording (--log) is closed by the reader's generator


def _watch_replay(source, watch: RunWatch, every: float | None) -> None:
    """Read a recording; status lines at each ``every`` seconds of the probe's own clock."""
    next_status = None
    stop = threading.Event()
    gen = source.batches(stop)
    try:
        for batch in gen:
            for msg in batch:
                watch.handle(msg)
                if watch.tripped is not None:
                    return
                t = watch.newest_time
                if every and t is not None:
                    if next_status is None:
                        next_status = t + every
                    elif t >= next_status:
                        watch.status()
                        next_status += every * (math.floor((t - next_status) / every) + 1)
    finally:
        gen.close()


def _run_app(source, args, title: str | None = None, replay: bool = False, **compare) -> int:
    from .app import XRayApp  # Textual is imported only for the app

    try:
        app = XRayApp(source, theme=args.theme, title=title, replay=replay, **compare)
    except ValueError as exc:  # an unknown theme
        raise CliError(str(exc)) from None
    app.run()
    return app.return_code or EXIT_OK


def _check_recording(path: str) -> None:
    """A recording given on the command line: a file whose first frame is an xray-tui hello
    (read before any screen opens, so a wrong file is a one-line error, not an app)."""
    if os.path.isdir(path):
        raise CliError(f"{path}: is a directory, not a recording")
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    reader = wire.FrameReader(source=path)
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
            whole = not f.read(1)
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror or exc}") from None
    if not head:
        raise CliError(f"{path}: empty file, not an xray-tui recording")
    reader.feed(head)  # WireError (bad magic, a first frame that is not a hello) is a one-line error
    if reader.hello is None and whole:
        raise CliError(f"{path}: not an xray-tui recording (no hello message)")


def _check_sockets(paths) -> None:
    """``--socket`` paths: each one exists and is a private socket (checked before the app opens)."""
    for path in paths:
        if path.startswith("tcp:"):
            continue
        if not os.path.exists(path):
            raise CliError(f"{path}: no such socket (see `xray-tui ls` for live runs)")
        try:
            rundir.check_private(Path(path), want_dir=False)
        except rundir.RunDirError as exc:
            raise CliError(str(exc)) from None


def _check_writable(path: str | None, what: str = "--log") -> None:
    """A file to be written: its folder exists and it is not a folder (checked before any work)."""
    if not path:
        return
    if os.path.isdir(path):
        raise CliError(f"{what} {path}: is a directory; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"{what} {path}: no such directory {folder}")
    if not os.access(folder, os.W_OK):
        raise CliError(f"{what} {path}: {folder} is not writable")


def cmd_attach(args) -> int:
    """Watch a live run: the app, or alerts on stdout with --headless.

    The app follows the run by name: it keeps the last data when the run ends
    or disconnects and re-attaches when a run of that name is live again;
    with no name and several live runs it asks which (tui.reattach, tui.chooser).
    ``--pid`` first loads the probe into a process started without it (tui.inject_cli).
    """
    _check_writable(args.log)
    if args.pid is not None:
        return inject_cli.cmd_attach_pid(args, cmd_attach)
    inject_cli.check_pid_options(args)
    if args.socket:
        _check_sockets(args.socket)
    if args.headless or args.socket:
        source = _live_source(args)
        if args.headless:
            return _headless(source, args, live=True)
        return _run_app(source, args)
    from .reattach import ReattachSource, live_runs

    if args.run is not None:
        feed.resolve_run(args.run)  # an unknown name is a one-line error, as in headless mode
    elif not live_runs():
        feed.resolve_run(None)  # "no live runs (start one with ...)"
    return _run_app(ReattachSource(args.run, record=args.log), args)


def cmd_replay(args) -> int:
    """Open a recording in the app, or print its alerts with --headless; --vs B sets a second beside it."""
    _check_recording(args.file)
    source = feed.FileSource(args.file)
    if args.headless:
        if args.vs:
            raise CliError("--vs compares two recordings in the app; it does not go with --headless")
        return _headless(source, args, live=False)
    # The header says it is a recording, so nobody takes it for a live run.
    if not args.vs:
        return _run_app(source, args, title=f"replay: {os.path.basename(args.file)}", replay=True)
    _check_recording(args.vs)
    from .compare import load_state

    try:
        other = load_state(args.vs)
    except wire.WireError as exc:
        raise CliError(f"{args.vs}: {exc}") from None
    a, b = os.path.basename(args.file), os.path.basename(args.vs)
    return _run_app(source, args, title=f"compare: A {a} vs B {b}", replay=True, other=other, other_label=b)


def cmd_export(args) -> int:
    """Write a recording's samples, scalars, alerts and notes as JSON lines, CSV, Parquet or TensorBoard events."""
    from . import export  # the writers; pyarrow and tensorboard only when their format is asked for

    if args.format not in export.FORMATS:
        raise CliError(f"unknown format {args.format!r}; supported: {', '.join(export.FORMATS)}")
    try:
        selection = export.Selection.parse(args.what, args.layer, args.kind)
        if args.format in export.NEED_OUTPUT and not args.output:
            raise export.ExportError(f"--format {args.format} needs -o "
                                     f"{'DIR' if args.format == 'tensorboard' else 'FILE'}; it cannot go to stdout")
        if args.format == "tensorboard" and set(selection.what) - {"samples", "scalars"}:
            raise export.ExportError("--format tensorboard writes samples and scalars only; "
                                     "export alerts and notes as jsonl, csv or parquet")
        export.require(args.format)
    except export.ExportError as exc:
        raise CliError(str(exc)) from None
    _check_recording(args.file)
    if args.format == "tensorboard":
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise CliError(f"-o {args.output}: not a directory (tensorboard writes event files into a directory)")
        try:
            os.makedirs(args.output, exist_ok=True)
        except OSError as exc:
            raise CliError(f"-o {args.output}: {exc.strerror or exc}") from None
    else:
        _check_writable(args.output, "-o")
    source = feed.FileSource(args.file)
    records = selection.records(source.batches())
    if args.format == "tensorboard":
        counts = export.write_tensorboard(records, args.output)
    elif args.format == "parquet":
        try:
            counts = export.write_parquet(records, args.output)
        except OSError as exc:
            raise CliError(f"-o {args.output}: {exc}") from None
    else:
        try:
            out = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout
        except OSError as exc:
            raise CliError(f"-o {args.output}: {exc.strerror or exc}") from None
        try:
            counts = (export.write_csv if args.format == "csv" else export.write_jsonl)(records, out)
        except BrokenPipeError:
            return EXIT_OK
        finally:
            if args.output:
                out.close()
    if args.output:
        print(f"wrote {counts.describe(selection.what)} to {args.output}", file=sys.stderr)
    if source.torn:
        print(f"xray-tui: {args.file}: {source.torn} torn bytes at the end were skipped", file=sys.stderr)
    return EXIT_OK


def cmd_demo(args) -> int:
    """Train the demo GPT-2 with the probe attached, and watch it."""
    try:
        from probes.demo import training as demo
    except ImportError as exc:
        raise CliError(f"the demo needs torch and transformers ({exc.name} is missing): "
                       "pip install 'xray-tui[demo]' torch==2.13.0") from None
    _check_writable(args.log)
    if args.headless:
        return _demo_headless(demo, args)
    return _demo_app(args)


def _demo_headless(demo, args) -> int:
    """Train in this process and print what `attach --headless` prints: alerts, a status line every
    ``--status-every`` seconds, the end line; the same exit status (3 stops the training at once)."""
    every = _seconds(args.status_every, "--status-every")
    every = None if args.quiet or every <= 0 else every
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
    rules = _rules_engine(args)  # the probe itself evaluates the rules with these thresholds
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
           "--fault", args.fault, "--fault-step", str(args.fault_step), "--name", args.name]
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
        return _run_app(source, args)
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


def _count(least: int):
    """An argparse type: an integer >= ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
        return value
    parse.__name__ = f"integer >= {least}"
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: one line on stderr, exit 2."""

    def error(self, message: str):
        where = self.prog.removeprefix("xray-tui").strip()
        self.exit(EXIT_USAGE, f"xray-tui: error: {where + ': ' if where else ''}{message} (see {self.prog} --help)\n")


def _seconds(text: str, flag: str) -> float:
    """``text`` as seconds >= 0, or a one-line error naming ``flag``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise CliError(f"{flag} must be a number of seconds >= 0, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block numbers like 0,1,2, got {text!r}")


def _number(text: str, kind, flag: str, what: str):
    """``text`` as an int or float, or a one-line error naming ``flag`` (checked for range later)."""
    try:
        return kind(text)
    except ValueError:
        raise CliError(f"{flag} must be {what}, got {text!r}") from None


def cmd_inspect(args) -> int:
    """Offline statistics, spectral metrics and pictures of a local causal-LM directory."""
    if not os.path.exists(args.model):
        raise CliError(f"{args.model}: no such directory")
    if not os.path.isdir(args.model):
        raise CliError(f"{args.model}: not a directory (give a transformers model directory)")
    try:  # torch and transformers are imported here only: the viewer never needs them
        from probes.inspect import checkpoint as inspection
    except ImportError as exc:
        raise CliError(f"inspect needs torch and transformers ({exc.name} is missing): "
                       "pip install 'xray-tui[demo]' torch==2.13.0") from None
    max_dim = _number(args.heatmap_max_dim, int, "--heatmap-max-dim", "a whole number >= 1")
    eps = _number(args.eps, float, "--eps", "a finite number > 0")
    opts = inspection.Options(layers=args.layers, weights=not args.no_weights, activations=not args.no_activations,
                              gradients=not args.no_gradients, bins=args.bins, device=args.device,
                              progress=sys.stderr.isatty(), plots=not args.no_plots, heatmaps=not args.no_heatmaps,
                              heatmap_max_dim=max_dim, eps=eps, hist_scale=args.hist_scale,
                              heatmap_pool=args.heatmap_pool)
    if args.text is not None:
        opts.text = args.text
    try:
        inspection.check(opts)
        if args.other is not None:
            from probes.inspect import compare

            report = compare.compare(args.model, args.other, args.out, opts)
        else:
            report = inspection.inspect(args.model, args.out, opts)
    except inspection.InspectError as exc:
        raise CliError(str(exc)) from None
    if args.other is not None:
        print(f"wrote {report.entries} weights' comparison to {report.json_path}, {len(report.pictures)} pictures "
              f"and the recording {report.recording}", file=sys.stderr)
        if args.tui:
            title = f"compare: {os.path.basename(os.path.abspath(args.model))} vs " \
                    f"{os.path.basename(os.path.abspath(args.other))}"
            return _run_app(feed.FileSource(str(report.recording)), args, title=title)
        return EXIT_OK
    print(f"wrote {report.entries} tensors' statistics to {report.json_path}, {len(report.pictures)} pictures "
          f"and the recording {report.recording} (loss {report.loss:.4g})", file=sys.stderr)
    if args.tui:
        title = f"inspect: {os.path.basename(os.path.abspath(args.model))}"
        return _run_app(feed.FileSource(str(report.recording)), args, title=title)
    return EXIT_OK


# -- parser -----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with help that explains each command."""
    p = _Parser(
        prog="xray-tui",
        description="An X-ray for a training run: per-layer histograms and alerts of a live PyTorch run.",
        epilog="Attach a probe in your training script with `xr = probes.attach(model, optimizer)`, "
               "then run `xray-tui attach`. Exit status (headless attach and replay): 0 the run finished or "
               "was stopped, 1 it crashed, was killed or interrupted, or ended without an End (disconnected), "
               "2 usage error or bad input, 3 at once when --fail-on sees such an alert.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    def output_opts(sp, log: bool = True, status: bool = True):
        sp.add_argument("--headless", action="store_true",
                        help="no screen: print alerts one line each, a status line now and then, and one "
                             "line saying how the run ended")
        sp.add_argument("--json", action="store_true", help="with --headless: one JSON object per line")
        sp.add_argument("--fail-on", choices=("warning", "critical"), default=None,
                        help="with --headless: exit 3 as soon as an alert this severe (or worse) arrives")
        sp.add_argument("--theme", default=None, help="colour theme of the app")
        if log:
            sp.add_argument("--log", metavar="FILE", help="record the full stream to FILE (replay it later)")
        if status:
            sp.add_argument("--status-every", default="60", metavar="SECONDS",
                            help="with --headless: a status line (step, steps/s, loss, lr, alerts so far) every "
                                 "SECONDS (default 60; of the run's own clock in a replay; 0: none)")
            sp.add_argument("--quiet", action="store_true", help="with --headless: no status lines")
        sp.add_argument("--rules", metavar="FILE", help="with --headless: alert thresholds from a TOML file "
                        "(docs/alerts.md); the rules are evaluated again with them")

    d = sub.add_parser("demo", help="train a small GPT-2 with the probe attached and watch it",
                       description="Train a small GPT-2 (built from a config, char-level, on a bundled "
                                   "public-domain text) with the probe attached; open the app on it, or "
                                   "with --headless print the alerts. --fault injects a failure.")
    output_opts(d)
    d.add_argument("--steps", type=_count(0), default=0,
                   help="steps to train (default 0: until q; 300 with --headless)")
    d.add_argument("--every", type=_count(1), default=5, help="sample one step in N (default 5)")
    d.add_argument("--fault", choices=FAULTS, default="none", help="failure to inject (default none)")
    d.add_argument("--fault-step", type=_count(0), default=50, metavar="S", help="step to inject it at (default 50)")
    d.add_argument("--name", default="demo", help="run name (default demo)")
    d.set_defaults(func=cmd_demo)

    a = sub.add_parser("attach", help="watch a live run (the app, or --headless alerts)",
                       description="Connect to every rank of a live run and show it. With no RUN, the only "
                                   "live run is chosen. The history the probe kept is shown at once.")
    a.add_argument("run", nargs="?", help="run name (see `xray-tui ls`)")
    a.add_argument("--socket", action="append", metavar="PATH", help="connect to this socket instead")
    a.add_argument("--tcp", nargs="?", const=True, metavar="HOST:PORT",
                   help="connect over TCP (a probe started with tcp=...): alone, the named run's own "
                        "listener and token; with HOST:PORT, that address and the token of --token-file "
                        "or $XRAY_TUI_TOKEN")
    a.add_argument("--token-file", metavar="FILE",
                   help="with --tcp HOST:PORT: file holding the run's token (the probe's <run>.token, mode 600)")
    output_opts(a)
    inject_cli.add_attach_options(a)
    a.set_defaults(func=cmd_attach)
    inject_cli.add_detach_parser(sub)

    ls = sub.add_parser("ls", help="list live runs", description="List live runs; removes stale entries.")
    ls.add_argument("--json", action="store_true", help="one JSON object per run")
    ls.set_defaults(func=cmd_ls)

    r = sub.add_parser("replay", help="open a recording in the app (or --headless alerts)",
                       description="Open a recording made with probes.attach(log=...) or --log.")
    r.add_argument("file", help="a recording (probes.attach(log=...), attach --log, demo --log)")
    r.add_argument("--vs", metavar="B", help="a second recording to show beside it: per layer both runs' norms, "
                                             "ratios and their difference at the same step, both histograms "
                                             "overlaid in the detail")
    output_opts(r, log=False)
    r.set_defaults(func=cmd_replay)

    e = sub.add_parser("export", help="write a recording as JSON lines, CSV, Parquet or TensorBoard events",
                       description="Write a recording's samples (one per step, rank, layer and kind: statistics "
                                   "and histogram), scalars (one per step, rank and name: loss, lr, ...), alerts "
                                   "and notes. jsonl: one JSON object per record with a \"type\" (non-finite "
                                   "values are null; a sample's nan/inf counts say why). csv and parquet: one "
                                   "table, a row per record, the same columns for every type (\"type\" says "
                                   "which; cells that do not apply are empty); a sample's histogram is "
                                   "hist_edges and hist_counts (space-separated) in csv, list columns "
                                   "hist_edge_lo, hist_edge_hi and hist_counts in parquet. tensorboard: event "
                                   "files in a directory, a histogram per sample tagged KIND/LAYER with its real "
                                   "bin edges, and the scalars. parquet needs pyarrow and tensorboard needs "
                                   "tensorboard (pip install 'xray-tui[export]').")
    e.add_argument("file", help="a recording (probes.attach(log=...), attach --log, demo --log)")
    e.add_argument("--format", default="jsonl", help="jsonl (default), csv, parquet (needs -o FILE) or "
                                                     "tensorboard (needs -o DIR)")
    e.add_argument("-o", "--output", metavar="OUT",
                   help="the file (a directory for tensorboard) to write; jsonl and csv go to stdout without it")
    e.add_argument("--what", action="append", metavar="TYPES",
                   help="record types to write, a comma list or repeated: samples, scalars, alerts, notes "
                        "(default samples,scalars)")
    e.add_argument("--layer", metavar="REGEX",
                   help="only samples and alerts whose layer matches REGEX (re.search), e.g. '^h\\.0\\.'")
    e.add_argument("--kind", action="append", metavar="KINDS",
                   help="only samples and alerts of these kinds, a comma list or repeated: weight, grad, act, "
                        "update (alerts about the loss have none and are left out)")
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="statistics, spectral metrics and pictures of a model directory",
                       description="Load a local GPT-2, LLaMA or any AutoModelForCausalLM directory (local files "
                                   "only), run one forward/backward pass on a text, and write "
                                   "layer_statistics.json, SVG histograms and heatmaps (weights/, activations/, "
                                   "gradients/) and inspection.xray (a recording) into --out.")
    i.add_argument("model", metavar="MODEL_DIR", help="a transformers model directory (config.json and weights)")
    i.add_argument("other", nargs="?", default=None, metavar="OTHER_DIR",
                   help="compare MODEL_DIR's weights with this one's (a fine-tune, a later checkpoint, or a "
                        "peft LoRA adapter directory for MODEL_DIR, compared merged): relative change per "
                        "weight, overlaid histograms, heatmap of the difference, spectral metrics of both")
    i.add_argument("--out", required=True, metavar="DIR", help="output directory (created if needed)")
    i.add_argument("--text", default=None, help="text for the forward/backward pass (default: a Dickens line)")
    i.add_argument("--layers", type=_int_list, default=None, metavar="0,1,2",
                   help="only these transformer blocks (default: the whole model)")
    i.add_argument("--no-weights", action="store_true", help="leave out weights (and their spectral metrics)")
    i.add_argument("--no-activations", action="store_true", help="leave out activations")
    i.add_argument("--no-gradients", action="store_true", help="leave out gradients (no backward pass)")
    i.add_argument("--bins", type=int, default=64, metavar="N", help="bins of the pictures' histograms (default 64)")
    i.add_argument("--device", default="cpu", metavar="DEV", help="torch device, e.g. cuda:0 (default cpu)")
    i.add_argument("--no-plots", action="store_true", help="no pictures: layer_statistics.json and the recording only")
    i.add_argument("--no-heatmaps", action="store_true", help="histograms only, no heatmaps")
    i.add_argument("--heatmap-max-dim", default="128", metavar="N",
                   help="largest heatmap side in cells; bigger matrices are pooled down to it (default 128)")
    i.add_argument("--hist-scale", choices=("linear", "log"), default="linear",
                   help="histogram bar heights: counts per bin on a linear (default) or log axis")
    i.add_argument("--heatmap-pool", choices=("max", "mean"), default="max",
                   help="how a big matrix is pooled to the heatmap: the largest |x| of each block, sign kept "
                        "(default: outliers stay visible), or the block mean")
    i.add_argument("--eps", default="0.05", metavar="EPS",
                   help="near-zero threshold: near_zero is the share of |x| < EPS (default 0.05)")
    i.add_argument("--tui", action="store_true", help="open the result in the app afterwards")
    i.add_argument("--theme", default=None, help="colour theme of the app (with --tui)")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if not getattr(args, "headless", True):
            given = [flag for flag, on in (("--rules", getattr(args, "rules", None)), ("--json", args.json),
                                           ("--fail-on", args.fail_on), ("--quiet", getattr(args, "quiet", False)))
                     if on]
            if given:
                raise CliError(f"{', '.join(given)} work{'s' if len(given) == 1 else ''} with --headless "
                               "(the app shows the alerts the probe sent)")
        return args.func(args)
    except (CliError, feed.FeedError, wire.WireError, rundir.RunDirError, inject_cli.InjectFailed) as exc:
        print(f"xray-tui: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
