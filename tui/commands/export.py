"""``xray-tui export``: a recording's records as JSON lines, CSV, Parquet or TensorBoard events.

The arguments are checked here (format, selection, output) before the
recording is read; the writers themselves are :mod:`tui.export`.
"""

from __future__ import annotations

import os
import sys

from tui import feed
from tui.commands.checks import check_recording, check_writable
from tui.commands.errors import EXIT_OK, CliError


def cmd_export(args) -> int:
    """Write a recording's samples, scalars, alerts and notes as JSON lines, CSV, Parquet or TensorBoard events."""
    from tui import export  # the writers; pyarrow and tensorboard only when their format is asked for

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
    check_recording(args.file)
    if args.format == "tensorboard":
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise CliError(f"-o {args.output}: not a directory (tensorboard writes event files into a directory)")
        try:
            os.makedirs(args.output, exist_ok=True)
        except OSError as exc:
            raise CliError(f"-o {args.output}: {exc.strerror or exc}") from None
    else:
        check_writable(args.output, "-o")
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
    unmatched = selection.unmatched()
    if unmatched:
        print(f"xray-tui: export: {unmatched}", file=sys.stderr)
    if source.torn:
        print(f"xray-tui: {args.file}: {source.torn} torn bytes at the end were skipped", file=sys.stderr)
    return EXIT_OK
