"""``xray-tui inspect``: offline statistics, spectral metrics and pictures of a model directory.

torch and transformers are imported here only, when the command runs: the
viewer itself never needs them.
"""

from __future__ import annotations

import os
import sys

from tui import feed
from tui.commands import viewer
from tui.commands.checks import number
from tui.commands.errors import EXIT_OK, CliError


def cmd_inspect(args) -> int:
    """Offline statistics, spectral metrics and pictures of a local causal-LM directory."""
    if not os.path.exists(args.model):
        raise CliError(f"{args.model}: no such directory")
    if not os.path.isdir(args.model):
        raise CliError(f"{args.model}: not a directory (give a transformers model directory)")
    try:  # torch and transformers are imported here only: the viewer never needs them
        from probes.inspect import checkpoint as inspection
        from probes.inspect.options import InspectError, Options, check
    except ImportError as exc:
        raise CliError(f"inspect needs torch and transformers ({exc.name} is missing): "
                       "pip install 'xray-tui[demo]' torch==2.13.0") from None
    max_dim = number(args.heatmap_max_dim, int, "--heatmap-max-dim", "a whole number >= 1")
    eps = number(args.eps, float, "--eps", "a finite number > 0")
    opts = Options(layers=args.layers, weights=not args.no_weights, activations=not args.no_activations,
                   gradients=not args.no_gradients, bins=args.bins, device=args.device,
                   progress=sys.stderr.isatty(), plots=not args.no_plots, heatmaps=not args.no_heatmaps,
                   heatmap_max_dim=max_dim, eps=eps, hist_scale=args.hist_scale, heatmap_pool=args.heatmap_pool)
    if args.text is not None:
        opts.text = args.text
    try:
        check(opts)
        if args.other is not None:
            from probes.inspect import compare

            report = compare.compare(args.model, args.other, args.out, opts)
        else:
            report = inspection.inspect(args.model, args.out, opts)
    except InspectError as exc:
        raise CliError(str(exc)) from None
    if args.other is not None:
        print(f"wrote {report.entries} weights' comparison to {report.json_path}, {len(report.pictures)} pictures "
              f"and the recording {report.recording}", file=sys.stderr)
        if args.tui:
            title = f"compare: {os.path.basename(os.path.abspath(args.model))} vs " \
                    f"{os.path.basename(os.path.abspath(args.other))}"
            return viewer.run_app(feed.FileSource(str(report.recording)), args, title=title)
        return EXIT_OK
    print(f"wrote {report.entries} tensors' statistics to {report.json_path}, {len(report.pictures)} pictures "
          f"and the recording {report.recording} (loss {report.loss:.4g})", file=sys.stderr)
    if args.tui:
        title = f"inspect: {os.path.basename(os.path.abspath(args.model))}"
        return viewer.run_app(feed.FileSource(str(report.recording)), args, title=title)
    return EXIT_OK
