"""The `xray-tui` command: demo, attach, ls, replay, export, detach.

Exit status: 0 when the watched run finished or was stopped by
``on_alert="stop"`` (or the command did its job); 1 when it crashed, was
killed or interrupted, or its stream stopped without an End (a live run
that disconnected, a recording cut short); 2 for usage errors, unknown runs
and bad input (one line on stderr, never a traceback); 3 as soon as
``--fail-on`` sees an alert of that severity or worse; 130 when the viewer
itself is interrupted.

This module holds the argument parser (every command's help text) and
:func:`main`; each command's body is in :mod:`tui.commands`.
"""

from __future__ import annotations

import argparse
import os
import sys

from probes.protocol import rundir, wire
from tui import feed
from tui.commands.attach import cmd_attach
from tui.commands.demo import cmd_demo
from tui.commands.errors import EXIT_OK, EXIT_USAGE, CliError
from tui.commands.export import cmd_export
from tui.commands.inject import cmd_detach
from tui.commands.inspect import cmd_inspect
from tui.commands.ls import cmd_ls
from tui.commands.replay import cmd_replay
from tui.injector import InjectFailed

FAULTS = ("none", "exploding", "dead", "nan", "stalled")


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
        add_notify_options(sp)

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
    add_headless_notify_options(a)
    add_attach_options(a)
    a.set_defaults(func=cmd_attach)
    add_detach_parser(sub)

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
    add_headless_notify_options(r)
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
                   help="only samples and alerts whose layer matches REGEX (re.search), e.g. "
                        "'^transformer\\.h\\.0\\.' (block 0 of the demo's GPT-2) or 'mlp\\.c_fc$'; a filter "
                        "that matches no sample says which layers the recording has")
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


def add_notify_options(sp: argparse.ArgumentParser) -> None:
    """Notifications of new alerts and of the run's end, in the app and with --headless (tui/notify.py)."""
    sp.add_argument("--notify-on", choices=("info", "warning", "critical"), default=None,
                    help="notify alerts this severe or worse (default critical; info adds recoveries): in the "
                         "app a toast and a desktop notification through the terminal (OSC 9/777, the bell), "
                         "with --headless through --notify-cmd and --webhook. The run's end is always notified")
    sp.add_argument("--notify-interval", default="10", metavar="MINUTES",
                    help="at most one notification per rule and layer per MINUTES (default 10; 0: no limit); "
                         "many alerts at once come as one summary")
    sp.add_argument("--no-notify", action="store_true",
                    help="the app starts with notifications off (N turns them on)")


def add_headless_notify_options(sp: argparse.ArgumentParser) -> None:
    """``--notify-cmd`` and ``--webhook``: where headless mode sends its notifications."""
    g = sp.add_argument_group(
        "notifications with --headless",
        "Each alert of --notify-on severity or worse (rate-limited by --notify-interval) and the run's end "
        "(finished, crashed, killed, stream lost) are sent on a thread of their own: a slow command or a dead "
        "endpoint never stalls the output.")
    g.add_argument("--notify-cmd", metavar="CMD",
                   help="run CMD per notification (split like shell words, never run by a shell): the "
                        "notification's fields in XRAY_* environment variables (XRAY_EVENT, XRAY_SEVERITY, "
                        "XRAY_RULE, XRAY_LAYER, XRAY_STEP, XRAY_MESSAGE, XRAY_TEXT, XRAY_REASON, ...) and as "
                        "JSON on stdin; its output goes to stderr")
    g.add_argument("--webhook", metavar="URL",
                   help="POST each notification as JSON to URL: a Slack-compatible \"text\" and the "
                        "structured fields; retried with backoff. @FILE reads the URL from FILE (a webhook URL "
                        "is a secret, and the process list shows command lines)")
    g.add_argument("--webhook-timeout", default=None, metavar="SECONDS",
                   help="seconds each --webhook try may take (default 5)")


def add_attach_options(a: argparse.ArgumentParser) -> None:
    """``attach``'s options for loading the probe into a process started without it."""
    g = a.add_argument_group(
        "loading the probe into a running process (--pid)",
        "For a run started without probes.attach: the probe is loaded into it with gdb or lldb (sys.remote_exec "
        "on Python 3.14+), found model and optimizer are watched, then the run is shown as any other. Needs the "
        "same user, a debugger and ptrace allowed; steps before it attached are not seen.")
    g.add_argument("--pid", type=_positive, metavar="PID", help="load the probe into this Python process")
    g.add_argument("--model", metavar="EXPR", help="the model to watch, an expression evaluated in the target's "
                   "__main__ (default: the root module whose parameters the optimizer trains)")
    g.add_argument("--optimizer", metavar="EXPR", help="the optimizer, an expression evaluated in the target's "
                   "__main__ (default: the only live optimizer)")
    g.add_argument("--every", type=_positive, metavar="N", help="sample one step in N (the probe's default: 10)")
    g.add_argument("--name", metavar="NAME", help="the run's name (default: the target script's name)")
    g.add_argument("--probe-log", metavar="FILE", help="the target records its stream to FILE "
                   "(probes.attach(log=FILE)); --log records what this viewer receives")
    g.add_argument("--timeout", type=_timeout, default=30.0, metavar="SECONDS",
                   help="how long the target may stay in C code before it loads the probe (default 30)")
    g.add_argument("--load-only", action="store_true",
                   help="load the probe and return; watch later with `xray-tui attach NAME`")


def add_detach_parser(sub) -> None:
    """``xray-tui detach PID``."""
    d = sub.add_parser("detach", help="remove a probe that attach --pid loaded",
                       description="Remove the probe `xray-tui attach --pid` loaded into a process: its hooks "
                                   "and thread go, the training goes on as before.")
    d.add_argument("pid", type=_positive, help="the process")
    d.add_argument("--timeout", type=_timeout, default=30.0, metavar="SECONDS",
                   help="how long the target may stay in C code before it runs the request (default 30)")
    d.set_defaults(func=cmd_detach)


# -- argument types ---------------------------------------------------------


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


def _int_list(text: str) -> list[int]:
    """An argparse type: comma-separated block numbers (``--layers 0,1,2``)."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block numbers like 0,1,2, got {text!r}")


def _timeout(text: str) -> float:
    """An argparse type: seconds > 0 (``--timeout`` of attach --pid and detach)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1 written in digits (a pid, ``--every``)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


# -- main -------------------------------------------------------------------


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
            sends = [flag for flag in ("--notify-cmd", "--webhook") if getattr(args, flag[2:].replace("-", "_"), None)]
            if sends:
                raise CliError(f"{' and '.join(sends)} work{'s' if len(sends) == 1 else ''} with --headless "
                               "(the app notifies through the terminal: a toast, OSC 9/777 and the bell)")
        return args.func(args)
    except (CliError, feed.FeedError, wire.WireError, rundir.RunDirError, InjectFailed) as exc:
        print(f"xray-tui: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
