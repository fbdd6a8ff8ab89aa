"""The writers of ``xray-tui export``: a recording as JSON lines, CSV, Parquet or TensorBoard events.

What is written is chosen by :class:`Selection` (record types, a layer regex, sample kinds);
each writer takes the selected records and returns the :class:`Counts` it wrote.

- ``jsonl``: one JSON object per record, ``"type"`` first (sample, scalar, alert, note).
- ``csv`` and ``parquet``: one table, a row per record, the same columns for every type
  (:data:`TABLE_COLUMNS`); ``type`` says which, a column that does not apply is empty (null).
  A sample's histogram is two columns in CSV (``hist_edges``: its ``n + 1`` bin edges,
  ``hist_counts``: its ``n`` counts, both space-separated) and three list columns in Parquet
  (``hist_edge_lo``, ``hist_edge_hi``: each bin's edges; ``hist_counts``).
- ``tensorboard``: event files in a directory (``rank<N>/`` per rank when the run had several):
  a histogram per sample, tagged ``<kind>/<layer>`` (``eval/act/<layer>`` for evaluation
  passes), with its real bin edges, and the scalars under their own names.

Only the standard library, numpy and msgspec are needed for jsonl and csv; pyarrow and tensorboard
(the ``export`` extra) are imported by their writers alone. Never torch: this is the viewer side.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import IO, Iterable, Iterator

from probes.protocol import stats, wire

from .headless import alert_json, clean

FORMATS = ("jsonl", "csv", "parquet", "tensorboard")
#: formats that write a file or directory and cannot go to stdout
NEED_OUTPUT = ("parquet", "tensorboard")
WHAT = ("samples", "scalars", "alerts", "notes")
DEFAULT_WHAT = ("samples", "scalars")
KINDS = ("weight", "grad", "act", "update")
#: the optional package each format needs: (module, what to pip install)
PACKAGES = {"parquet": ("pyarrow", "pyarrow"), "tensorboard": ("tensorboard", "tensorboard")}


class ExportError(Exception):
    """A one-line error about the export's arguments or environment."""


def _split(values: Iterable[str] | None) -> list[str]:
    """Repeatable options that also take comma lists: ["a,b", "c"] -> ["a", "b", "c"]."""
    return [v.strip() for text in values or () for v in text.split(",") if v.strip()]


def _choose(option: str, values: Iterable[str] | None, allowed: tuple[str, ...], default) -> tuple[str, ...]:
    got = _split(values)
    if values and not got:
        raise ExportError(f"{option}: empty; choose from {', '.join(allowed)}")
    for v in got:
        if v not in allowed:
            raise ExportError(f"{option}: unknown {v!r}; choose from {', '.join(allowed)}")
    return tuple(dict.fromkeys(got)) if got else tuple(default)


@dataclass
class Selection:
    """What to export: record types, and the samples' (and alerts') layers and kinds."""

    what: tuple[str, ...] = DEFAULT_WHAT
    layer: re.Pattern | None = None
    kinds: tuple[str, ...] = KINDS
    #: what :meth:`records` saw: each sample layer (in recording order) with its kinds, and how many it kept
    seen: dict = field(default_factory=dict, compare=False)
    kept_samples: int = field(default=0, compare=False)

    @classmethod
    def parse(cls, what=None, layer: str | None = None, kinds=None) -> "Selection":
        """From the command line's --what, --layer and --kind (ExportError for a bad one)."""
        pattern = None
        if layer is not None:
            try:
                pattern = re.compile(layer)
            except re.error as exc:
                raise ExportError(f"--layer: bad regular expression {layer!r}: {exc}") from None
        return cls(_choose("--what", what, WHAT, DEFAULT_WHAT), pattern, _choose("--kind", kinds, KINDS, KINDS))

    def _keeps(self, layer: str, kind: str) -> bool:
        kinds_ok = kind in self.kinds or (kind == "scalar" and set(self.kinds) == set(KINDS))  # no --kind given
        return kinds_ok and (self.layer is None or self.layer.search(layer) is not None)

    def records(self, batches: Iterable[list]) -> Iterator[tuple]:
        """The selected records, in recording order: ``("sample", step, sample)``,
        ``("scalar", scalars, name, value)``, ``("alert", alert)``, ``("note", note)``, and
        every ``("hello", hello)`` (for writers that need the run's shape).

        --layer and --kind select samples and alerts (an alert about the loss, layer ``(loss)``,
        has kind ``scalar``: any --kind leaves it out); scalars and notes are per run.
        """
        for batch in batches:
            for msg in batch:
                if isinstance(msg, wire.Step):
                    if "samples" in self.what:
                        for s in msg.samples:
                            self.seen.setdefault(s.layer, set()).add(s.kind)
                            if self._keeps(s.layer, s.kind):
                                self.kept_samples += 1
                                yield ("sample", msg, s)
                elif isinstance(msg, wire.Scalars):
                    if "scalars" in self.what:
                        for name, value in msg.values.items():
                            yield ("scalar", msg, name, value)
                elif isinstance(msg, wire.Alert):
                    if "alerts" in self.what and self._keeps(msg.layer, msg.kind):
                        yield ("alert", msg)
                elif isinstance(msg, wire.Note):
                    if "notes" in self.what:
                        yield ("note", msg)
                elif isinstance(msg, wire.Hello):
                    yield ("hello", msg)


    def unmatched(self, shown: int = 4) -> str | None:
        """After :meth:`records`: when --layer or --kind kept none of the recording's samples, a line
        saying which layers and kinds it has (a few names, so a wrong regex can be fixed); else None."""
        kind_filter = set(self.kinds) != set(KINDS)
        if (self.layer is None and not kind_filter) or self.kept_samples or not self.seen:
            return None
        given = " ".join(([f"--layer '{self.layer.pattern}'"] if self.layer is not None else [])
                         + ([f"--kind {','.join(self.kinds)}"] if kind_filter else []))
        names = list(self.seen)
        matching = [n for n in names if self.layer is None or self.layer.search(n)]
        if matching:  # the layers matched, the kinds did not
            names, where = matching, "the layers it matches"
        else:
            where = "the recording's layers"
        listed = ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")
        kinds = ", ".join(k for k in KINDS if any(k in self.seen[n] for n in names))
        return f"{given} matched no sample; {where}: {listed}; their kinds: {kinds}"


@dataclass
class Counts:
    """Records written, by type."""

    n: dict = field(default_factory=lambda: dict.fromkeys(("sample", "scalar", "alert", "note"), 0))

    def add(self, kind: str) -> None:
        self.n[kind] += 1

    def describe(self, what: Iterable[str]) -> str:
        """E.g. ``75 samples and 30 scalars``: the types ``what`` selected (--what's words)."""
        parts = [f"{v} {k}{'' if v == 1 else 's'}" for k, v in self.n.items() if k + "s" in what]
        return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else "".join(parts)


def require(fmt: str) -> None:
    """ExportError naming what to pip install when the format's optional package is missing."""
    if fmt not in PACKAGES:
        return
    module, package = PACKAGES[fmt]
    try:  # named imports, not a computed one: the viewer imports nothing a stream could name
        if fmt == "parquet":
            import pyarrow  # noqa: F401
        else:
            import tensorboard  # noqa: F401
    except ImportError:
        raise ExportError(f"--format {fmt} needs {module}, which is not installed: "
                          f"pip install {package} (or pip install 'xray-tui[export]')") from None
    except Exception as exc:  # a broken install (an ABI mismatch, ...) is still one line, not a traceback
        raise ExportError(f"--format {fmt} needs {module}, which failed to import "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
                          f"pip install --force-reinstall {package}") from None


# -- jsonl --------------------------------------------------------------------


def note_json(n: wire.Note) -> dict:
    """A note as exported: ``{"type": "note", "step", "rank", "event", "data"}``."""
    return clean({"type": "note", "step": n.step, "rank": n.rank, "event": n.event, "data": dict(n.data)})


def record_json(rec: tuple) -> dict:
    """The documented JSON object of one record (samples as ``stats.export_dict``)."""
    kind = rec[0]
    if kind == "sample":
        return clean(stats.export_dict(rec[2], rec[1].step, rec[1].rank, rec[1].phase))
    if kind == "scalar":
        return clean({"type": "scalar", "step": rec[1].step, "rank": rec[1].rank, "name": rec[2], "value": rec[3]})
    if kind == "alert":
        return alert_json(rec[1])
    return note_json(rec[1])


def write_jsonl(records: Iterable[tuple], out: IO[str]) -> Counts:
    counts = Counts()
    for rec in records:
        if rec[0] == "hello":
            continue
        out.write(json.dumps(record_json(rec)) + "\n")
        counts.add(rec[0])
    return counts


# -- tables (csv, parquet) --------------------------------------------------------

_EMPTY = wire.Sample("", "weight", 0, 0.0, 0.0, 0.0, math.nan, math.nan, 0, 0, 0, 0, 0, 0, b"", 0)
_ID_KEYS = ("type", "step", "rank", "phase", "layer", "kind")
#: the statistics of a sample row, in export_dict's order (count ... lora_shift)
STAT_COLUMNS = tuple(k for k in stats.export_dict(_EMPTY, 0, 0) if k not in _ID_KEYS + ("hist",))
INT_COLUMNS = frozenset({"step", "rank", "count", "nan", "inf", "hist_sampled"})
_TAIL = ("name", "value", "severity", "rule", "threshold", "message", "event", "data")


def table_columns(hist: tuple[str, ...]) -> tuple[str, ...]:
    """The table's columns with the format's histogram columns ``hist``."""
    return _ID_KEYS + STAT_COLUMNS + ("hist_sampled",) + hist + _TAIL


CSV_HIST = ("hist_edges", "hist_counts")
PARQUET_HIST = ("hist_edge_lo", "hist_edge_hi", "hist_counts")
#: the CSV table's columns (Parquet's differ in the histogram columns only)
TABLE_COLUMNS = table_columns(CSV_HIST)


def _row(rec: tuple) -> dict:
    """A record as a table row without histogram columns (absent keys are empty cells)."""
    kind = rec[0]
    if kind == "sample":
        step, s = rec[1], rec[2]
        d = stats.export_dict(s, step.step, step.rank, step.phase)
        del d["hist"]
        d["hist_sampled"] = s.hist_n
        return d
    if kind == "scalar":
        return {"type": "scalar", "step": rec[1].step, "rank": rec[1].rank, "name": rec[2], "value": rec[3]}
    if kind == "alert":
        a = rec[1]
        return {"type": "alert", "step": a.step, "rank": a.rank, "layer": a.layer, "kind": a.kind, "value": a.value,
                "severity": a.severity, "rule": a.rule, "threshold": a.threshold, "message": a.message}
    n = rec[1]
    return {"type": "note", "step": n.step, "rank": n.rank, "event": n.event,
            "data": json.dumps(clean(dict(n.data)), sort_keys=True)}


def write_csv(records: Iterable[tuple], out: IO[str]) -> Counts:
    """One CSV table (header first); NaN and infinities as ``nan``, ``inf``, ``-inf``."""
    counts = Counts()
    writer = csv.DictWriter(out, fieldnames=TABLE_COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    for rec in records:
        if rec[0] == "hello":
            continue
        row = _row(rec)
        if rec[0] == "sample":
            s = rec[2]
            row["hist_edges"] = " ".join(repr(float(e)) for e in stats.hist_edges(s))
            row["hist_counts"] = " ".join(str(int(c)) for c in s.hist)
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        counts.add(rec[0])
    return counts


def write_parquet(records: Iterable[tuple], path: str, rows_per_group: int = 50_000) -> Counts:
    """One Parquet table, written in row groups so a long recording is never held whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = table_columns(PARQUET_HIST)
    lists = {"hist_edge_lo": pa.list_(pa.float64()), "hist_edge_hi": pa.list_(pa.float64()),
             "hist_counts": pa.list_(pa.int64())}
    text = {"type", "phase", "layer", "kind", "name", "severity", "rule", "message", "event", "data"}
    schema = pa.schema([(c, lists[c] if c in lists else pa.string() if c in text
                         else pa.int64() if c in INT_COLUMNS else pa.float64()) for c in columns])
    counts = Counts()
    buf: list[dict] = []
    with pq.ParquetWriter(path, schema) as writer:
        def flush():
            writer.write_table(pa.Table.from_pylist(buf, schema=schema))
            buf.clear()

        for rec in records:
            if rec[0] == "hello":
                continue
            row = _row(rec)
            if rec[0] == "sample":
                s = rec[2]
                edges = stats.hist_edges(s)
                row["hist_edge_lo"], row["hist_edge_hi"] = edges[:-1].tolist(), edges[1:].tolist()
                row["hist_counts"] = s.hist.tolist()
            buf.append(row)
            counts.add(rec[0])
            if len(buf) >= rows_per_group:
                flush()
        if buf or not sum(counts.n.values()):  # an empty export is still a table with its columns
            flush()
    return counts


# -- tensorboard ------------------------------------------------------------------


def histogram_proto(s: wire.Sample):
    """A sample's histogram as TensorBoard's HistogramProto, on its real (fixed) bin edges.

    ``bucket_limit`` holds the right edge of each bucket, so the run's first edge goes in as a
    leading empty bucket: ``bucket_limit`` = all ``n + 1`` edges, ``bucket`` = ``[0] + counts``.
    ``num`` is the histogram's total (the finite elements of the ``hist_n`` it sampled);
    ``sum`` and ``sum_squares`` are the whole tensor's mean and mean square times ``num``.
    """
    from tensorboard.compat.proto.summary_pb2 import HistogramProto

    edges = stats.hist_edges(s)
    counts = s.hist.astype(float)
    num = float(counts.sum())
    m = s.sum / s.count if s.count else 0.0
    ms = s.sumsq / s.count if s.count else 0.0
    lo = s.min if math.isfinite(s.min) else float(edges[0])
    hi = s.max if math.isfinite(s.max) else float(edges[-1])
    return HistogramProto(min=lo, max=hi, num=num, sum=m * num if math.isfinite(m) else 0.0,
                          sum_squares=ms * num if math.isfinite(ms) else 0.0,
                          bucket_limit=edges.tolist(), bucket=[0.0] + counts.tolist())


def write_tensorboard(records: Iterable[tuple], logdir: str) -> Counts:
    """Event files under ``logdir``: one event per Step (its histograms) and per Scalars (its values).

    A sample whose histogram is empty (no element, or none finite) has no histogram to show
    and is left out; an alert or note is not written (TensorBoard has no place for them).
    """
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    counts = Counts()
    writers: dict[int, EventFileWriter] = {}
    world = 1

    def writer(rank: int) -> EventFileWriter:
        if rank not in writers:
            writers[rank] = EventFileWriter(logdir if world == 1 else os.path.join(logdir, f"rank{rank}"))
        return writers[rank]

    pending: list = []  # the summary values of the Step or Scalars message being read
    current = None

    def take(msg) -> None:
        """Values from ``msg`` follow: write out those of the message before it (one event each)."""
        nonlocal current
        if msg is not current:
            if pending:
                writer(current.rank).add_event(Event(wall_time=current.time, step=current.step,
                                                     summary=Summary(value=pending[:])))
                pending.clear()
            current = msg

    try:
        for rec in records:
            if rec[0] == "hello":
                world = max(world, rec[1].world_size) if not writers else world
                continue
            if rec[0] == "sample":
                step, s = rec[1], rec[2]
                take(step)
                if len(s.hist) == 0 or not s.hist.any():
                    continue
                tag = f"{s.kind}/{s.layer}" if step.phase == "train" else f"{step.phase}/{s.kind}/{s.layer}"
                pending.append(Summary.Value(tag=tag, histo=histogram_proto(s)))
                counts.add("sample")
            elif rec[0] == "scalar":
                take(rec[1])
                pending.append(Summary.Value(tag=rec[2], simple_value=rec[3]))
                counts.add("scalar")
        take(None)
    finally:
        for w in writers.values():
            w.close()
    return counts
