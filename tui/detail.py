"""The layer detail screen: one layer's history, kind by kind.

Shows, for the chosen kind (weight, grad, act, update):
- the histogram-over-time ("HOT") chart: x = step, y = histogram bin (signed,
  log-spaced, largest values on top), colour = log(1 + count);
- the current histogram against the first one still kept;
- L2 norm, mean / std and the near-zero share (or the update ratio) over time;
- the weight matrix and spectral figures, or why they are not shown;
- the layer's alerts.

The screen reads the app's :class:`~tui.state.RunState` when the app paints
(:meth:`DetailScreen.refresh_data`), never from the reader thread, and
rebuilds its charts only when the stream has a new sample.
"""

from __future__ import annotations

import numpy as np
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from probes.protocol import histogram, stats
from tui.state import KINDS, Row, RunState
from tui.widgets.alerts import alert_text
from tui.widgets.heatmap import Heatmap, HotChart
from tui.widgets.plots import Chart, Series

#: Why there is no weight heatmap (yet), said plainly instead of drawing something made up.
MATRIX_PENDING = (
    "none yet: the probe sends one with each spectral pass (every 500 steps by default; "
    "e asks a live run for one now), for 2-D and conv weights of at least 8 rows and columns"
)
#: Where spectral figures (WeightWatcher's alpha, stable rank, log norms) go
#: once the probe sends them as ``Spectral`` messages; see :func:`spectral_text`.
SPECTRAL_PENDING = (
    "Spectral figures (alpha, stable rank, log spectral norm): none in this "
    "stream. They appear here when the probe computes them (a low-cadence pass "
    "on 2-D weights)."
)
KIND_KEYS = {"weight": "w", "grad": "g", "act": "a", "update": "u"}


def spectral_of(state: RunState, row: Row):
    """The latest ``Spectral`` message of ``row``'s weight, or None."""
    return state.spectral.get(row.name) or state.spectral.get(row.stream("weight") or "")


def spectral_text(state: RunState, row: Row) -> str:
    """The spectral panel's text for ``row``.

    The place for spectral figures: RunState keeps the latest ``Spectral``
    message per layer in ``state.spectral`` once probes.protocol.wire defines one;
    until then this says that there are none.
    """
    latest = spectral_of(state, row)
    if latest is None:
        return SPECTRAL_PENDING
    import msgspec

    fields = {k: v for k, v in msgspec.structs.asdict(latest).items()
              if isinstance(v, (int, float)) and k not in ("step", "rank")}
    text = "[b]spectral[/b]  " + "  ".join(f"{k} {v:.3g}" for k, v in fields.items())
    why = getattr(latest, "untrusted", "")
    if why:  # alpha shown, but the probe does not alert on it (probes/rules/spectral.py)
        from rich.markup import escape

        text += f"\n[b]alpha not trusted[/b] (no spectral alert): {escape(why[:200])}"
    return text


def time_series(series: list) -> dict[str, tuple]:
    """Steps and the statistics over time of a list of (step, Sample)."""
    steps = tuple(st for st, _ in series)
    return {
        "step": steps,
        "l2": tuple(stats.l2(s) for _, s in series),
        "mean": tuple(stats.mean(s) for _, s in series),
        "std": tuple(stats.std(s) for _, s in series),
        "near_zero": tuple(100 * stats.fraction(s.near_zero, s) for _, s in series),
        "ratio": tuple(s.ratio if s.ratio is not None else float("nan") for _, s in series),
        "dead": tuple(100 * s.dead_units if s.dead_units is not None else float("nan") for _, s in series),
    }


def density(sample, lo: float, hi: float, width: int) -> np.ndarray:
    """The sample's density on ``width`` equal columns of [lo, hi] (integrates to its share in range).

    Each fixed (log-spaced) bin's count is spread evenly over the part of
    the bin inside the tensor's exact [min, max], then summed per linear
    column and divided by the column's width: what a person expects a
    histogram to look like (a normal tensor draws a bell). Giving each bin's
    whole count to the column of its midpoint, as a sparkline may, draws a
    comb: many narrow bins near zero, few wide ones in the tails.
    """
    out = np.zeros(width)
    if not sample.hist.size or width <= 0 or hi <= lo:
        return out
    edges = histogram.edges_for(sample.hist_lo, len(sample.hist)).astype(np.float64)
    if np.isfinite(sample.min) and np.isfinite(sample.max):
        edges = np.clip(edges, sample.min, sample.max)
    cum = np.concatenate([[0.0], np.cumsum(sample.hist, dtype=np.float64)])
    cols = np.linspace(lo, hi, width + 1)
    mass = np.diff(np.interp(cols, edges, cum))
    total = cum[-1]
    return mass / total / ((hi - lo) / width) if total > 0 else out


def current_vs_initial(series: list, width: int = 40, chosen: int | None = None) -> tuple[tuple, ...]:
    """x (value) and the densities of the newest, the first kept and (optionally) a chosen sample.

    All over one linear range (the union of their min and max), as
    densities so that different sample sizes compare. Returns
    ``(x, now, first)`` or, with ``chosen`` (an index into ``series``),
    ``(x, now, first, chosen_density)``; empty tuples when there is no spread.
    """
    picked = [series[-1][1], series[0][1]] + ([series[chosen][1]] if chosen is not None else [])
    # a sample gone all NaN has no [min, max]: the range comes from the others (it draws flat)
    lo = min((s.min for s in picked if np.isfinite(s.min)), default=np.nan)
    hi = max((s.max for s in picked if np.isfinite(s.max)), default=np.nan)
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return ((),) * (1 + len(picked))
    x = tuple(lo + (i + 0.5) * (hi - lo) / width for i in range(width))
    return (x, *(tuple(density(s, lo, hi, width)) for s in picked))


class DetailScreen(Screen):
    """Everything the stream says about one layer (escape goes back)."""

    DEFAULT_CSS = """
    DetailScreen { layout: vertical; background: $surface; }
    #detail-title { height: auto; background: $panel; padding: 0 1; }
    #detail-body { height: 1fr; }
    #detail-left { width: 3fr; }
    #detail-right { width: 2fr; min-width: 30; border-left: solid $panel; }
    #hot-title { height: auto; color: $xray-muted; padding: 0 1; }
    #hot { height: 1fr; min-height: 5; }
    #hist { height: 12; }
    .note { color: $xray-muted; padding: 0 1; margin-top: 1; height: auto; }
    #matrix-title { color: $xray-muted; padding: 0 1; margin-top: 1; height: auto; }
    #matrix { height: 12; }
    #layer-alerts { padding: 0 1; margin-top: 1; height: auto; }
    """

    BINDINGS = [
        Binding("escape,backspace", "app.pop_screen", "Back"),
        Binding("w", "kind('weight')", "Weight"),
        Binding("g", "kind('grad')", "Grad"),
        # a and u: the title line lists every kind with its key; the footer fits 80 columns
        Binding("a", "kind('act')", "Act", show=False),
        Binding("u", "kind('update')", "Update", show=False),
        Binding("l", "hist_log", "Hist log y", show=False),  # in the help: the footer fits 80 columns
        # a replay's timeline, over the scroll bindings of the panel that has the focus
        Binding("left", "app.seek(-1)", "Step back", show=False, priority=True),
        Binding("right", "app.seek(1)", "Step on", show=False, priority=True),
    ]

    def __init__(self, state: RunState, row: Row, *, rank: int | None = None, kind: str | None = None,
                 until: int | None = None, other: RunState | None = None, other_label: str = "") -> None:
        super().__init__()
        self.state = state
        self.row = row
        self.rank = rank
        self.kind = kind or self._first_kind()
        self._seen: tuple | None = None
        #: Show no sample after this step (a replay's chosen step); None: up to the newest.
        self.until = until
        #: A second run (``replay A --vs B``): its histogram at the same step is drawn over this one's.
        self.other, self.other_label = other, other_label
        self._newest = None  # (step, Sample): the recording's newest when a replay shows an earlier step

    def _first_kind(self) -> str:
        for k in ("weight", "act", "grad", "update"):
            if self.row.stream(k) is not None:
                return k
        return "weight"

    def compose(self) -> ComposeResult:
        yield Static(id="detail-title")
        yield Static(id="too-small")
        with Horizontal(id="detail-body"):
            with Vertical(id="detail-left"):
                yield Static(id="hot-title")
                yield HotChart(id="hot")
                yield Chart(title="histogram: density, linear axis", id="hist")
            with VerticalScroll(id="detail-right"):
                # log_y None: a log axis when the values span two decades (a norm that explodes or vanishes)
                yield Chart(title="L2 norm ‖x‖₂ over steps", log_y=None, id="norm")
                yield Chart(title="mean and std over steps", log_y=None, id="meanstd")
                yield Chart(title="near zero, % of elements with |x| < eps", log_y=None, id="nearzero")
                yield Static(id="layer-alerts")
                yield Static(id="spectral", classes="note")
                yield Static(id="matrix-title")  # last: the tallest panel, scrolled to on small screens
                yield Heatmap(id="matrix", empty_text=MATRIX_PENDING)
        yield Footer()

    def on_mount(self) -> None:
        self.app._check_size()
        self.refresh_data(force=True)

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """A kind's key works (and is in the footer) only when the layer has that stream: a
        block's detail (activations only) lists no ``w Weight`` or ``g Grad``."""
        if action == "kind" and parameters:
            return self.row.stream(parameters[0]) is not None
        return True

    def action_kind(self, kind: str) -> None:
        """Show the HOT chart and plots of another kind of this layer."""
        self.kind = kind
        self.refresh_data(force=True)

    def action_hist_log(self) -> None:
        """Switch the histogram between a linear and a log density axis (tails show on a log axis)."""
        hist = self.query_one("#hist", Chart)
        hist.log_y_setting = not hist.log_y_setting
        self.refresh_data(force=True)

    def set_until(self, step: int | None) -> None:
        """Show the layer as it was at ``step`` (a replay's chosen step; None: the newest)."""
        self.until = step
        self.refresh_data(force=True)

    def set_rank(self, rank: int | None) -> None:
        """Follow the table's rank view (None = merged)."""
        self.rank = rank
        self.refresh_data(force=True)

    def refresh_data(self, force: bool = False) -> None:
        """Rebuild from the state if the stream moved (the app's thread only)."""
        state, row, kind = self.state, self.row, self.kind
        stream = row.stream(kind)
        series = state.series(stream, kind, self.rank) if stream is not None else []
        #: The recording's newest sample when a replay shows an earlier step: drawn beside it.
        self._newest = None
        if self.until is not None:
            if series and series[-1][0] > self.until:
                self._newest = series[-1]
            series = [item for item in series if item[0] <= self.until]
        key = (kind, self.rank, self.until, len(series), series[-1][0] if series else None, state.alerts_seen,
               id(spectral_of(state, row)))  # a spectral pass brings new figures and a new heatmap
        if key == self._seen and not force:
            return
        self._seen = key
        # One rank: no "merged ranks" to puzzle over.
        merged = f"whole job ({state.world_size} ranks)" if state.job else "merged ranks"
        view = "" if len(state.hellos) <= 1 and not state.job else f"{merged}  ·  " if self.rank is None \
            else f"rank {self.rank}  ·  "
        kinds = "  ".join(f"[b]{KIND_KEYS[k]}[/b] {k}" + (" ◀" if k == kind else "")
                          for k in KINDS if row.stream(k) is not None)
        depth = state.stream_depth or state.depth
        self.query_one("#detail-title", Static).update(
            f"[b]{row.name}[/b]  {row.type}  params: {', '.join(row.params) or '—'}  ·  {view}"
            f"{len(series)} samples kept (at most {depth} per stream)"
            + (f"  ·  LoRA adapter of [b]{row.adapter_of}[/b]" if row.adapter_of else "")
            + f"\n{kinds}   [dim]escape: back[/dim]")
        self._show_hot(stream, kind, series)
        self._show_plots(kind, series)
        self._show_matrix()
        self.query_one("#spectral", Static).update(spectral_text(state, row))
        self._show_alerts()

    def _show_hot(self, stream: str | None, kind: str, series: list) -> None:
        hot = self.query_one("#hot", HotChart)
        self.query_one("#hot-title", Static).update(
            f"[b]HOT {kind}[/b]: x step · y value (signed log bins; empty ones folded, ≈) · colour count")
        if stream is None:
            why = "this layer's output is not hooked" if kind == "act" else "this layer has no parameters"
            hot.show_series([], empty_text=f"no {kind} stream: {why}")
            return
        hot.show_series(series, empty_text=f"no {kind} samples yet")

    def _show_plots(self, kind: str, series: list) -> None:
        color = f"xray-{kind}"
        hist, norm = self.query_one("#hist", Chart), self.query_one("#norm", Chart)
        meanstd, near = self.query_one("#meanstd", Chart), self.query_one("#nearzero", Chart)
        if not series:
            for chart in (hist, norm, meanstd, near):
                chart.show([], empty_text=f"no {kind} samples yet")
            return
        x, now, first = current_vs_initial(series)[:3]
        if self.other is not None:
            self._show_overlay(hist, kind, series, color)
        elif not x:
            last = series[-1][1]
            hist.show([], empty_text=f"every value is {last.min:g} now (min = max): no spread to draw")
        else:
            last = series[-1][1]
            bad = stats.nonfinite(last)
            # NaN/inf have no bin: say so, or a flat "now" line reads as "all values gone to zero".
            unbinned = f", {100 * bad / last.count:.3g}% NaN/inf unbinned" if bad and last.count else ""
            lines = [Series(x, first, f"first kept (step {series[0][0]})", "xray-muted"),
                     Series(x, now, f"now (step {series[-1][0]}){unbinned}", color)]
            if self._newest is not None and len(series) > 0:
                # A replay at an earlier step: first kept vs the chosen step vs the recording's last.
                ext = series + [self._newest]
                x, last_d, first, chosen = current_vs_initial(ext, chosen=len(series) - 1)
                if x:
                    lines = [Series(x, first, f"first kept (step {series[0][0]})", "xray-muted"),
                             Series(x, last_d, f"last (step {self._newest[0]})", "xray-grad"),
                             Series(x, chosen, f"step {series[-1][0]}{unbinned}", color)]
            hist.show(lines)
        ts = time_series(series)
        steps = ts["step"]
        # One step range for every chart of the screen (the HOT chart covers the same series).
        xlim = (steps[0], steps[-1]) if steps and steps[-1] > steps[0] else None
        lines = [Series(steps, ts["l2"], "‖x‖₂", color)]
        evals = self.state.eval_series(self.row.name, rank=self.rank) if kind == "act" else []
        if self.until is not None:
            evals = [item for item in evals if item[0] <= self.until]
        if evals:  # evaluation passes, drawn beside the training ones, never mixed into them
            lines.append(Series(tuple(st for st, _ in evals), tuple(stats.l2(s) for _, s in evals),
                                "‖x‖₂ eval", "xray-muted"))
        norm.show(lines, xlim=xlim)
        meanstd.show([Series(steps, ts["mean"], "mean", color), Series(steps, ts["std"], "std", "xray-muted")],
                     xlim=xlim)
        if kind == "update":
            init = next((s.init_dist for _, s in reversed(series) if s.init_dist is not None), None)
            title = ("update ratio ‖ΔW‖/‖W‖ over steps (healthy ~1e-3)" if init is None else
                     f"‖ΔW‖/‖W‖ (healthy ~1e-3) · from init ‖W−W₀‖/‖W₀‖ {init:.3g}")
            near.show([Series(steps, ts["ratio"], "‖ΔW‖/‖W‖", color)], title=title, xlim=xlim)
        elif kind == "weight" and any(s.lora_shift is not None for _, s in series):
            shift = tuple(s.lora_shift if s.lora_shift is not None else float("nan") for _, s in series)
            near.show([Series(steps, shift, "‖B·A·s‖/‖W‖", color)], xlim=xlim,
                      title=f"LoRA shift ‖B·A·scale‖/‖W_base‖, now {series[-1][1].lora_shift or 0:.3g}")
        elif kind == "act" and any(v == v for v in ts["dead"]):
            near.show([Series(steps, ts["near_zero"], "|x|<eps %", color),
                       Series(steps, ts["dead"], "dead units %", "xray-dead")], xlim=xlim,
                      title="near zero and dead units, % (dead: never above eps)")
        else:
            near.show([Series(steps, ts["near_zero"], "|x|<eps %", color)], xlim=xlim,
                      title="near zero, % of elements with |x| < eps")

    def _show_overlay(self, hist: Chart, kind: str, series: list, color: str) -> None:
        """Both runs' histograms at the step shown, as densities on one linear axis."""
        from tui import compare as cmp

        other, row = self.other, self.row
        step = series[-1][0]
        mine = series[-1][1]
        theirs = None
        if row.name in other._row_index:
            theirs = other.latest(other.rows[other._row_index[row.name]], kind, None, step)
        if theirs is None:
            hist.show([], empty_text=f"B ({self.other_label}) has no {kind} sample of this layer at step {step} "
                                     "or before", title="histogram: A vs B")
            return
        lo = min((v for v in (mine.min, theirs.min) if np.isfinite(v)), default=np.nan)
        hi = max((v for v in (mine.max, theirs.max) if np.isfinite(v)), default=np.nan)
        if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
            hist.show([], empty_text="no spread to draw (min = max, or NaN)", title="histogram: A vs B")
            return
        width = 48
        x = tuple(lo + (i + 0.5) * (hi - lo) / width for i in range(width))
        dist = cmp.hist_distance(mine, theirs)
        change = cmp.rel_change(cmp.norm(mine), cmp.norm(theirs))
        hist.show([Series(x, tuple(density(mine, lo, hi, width)), f"A (step {step})", color),
                   Series(x, tuple(density(theirs, lo, hi, width)), f"B {self.other_label}", "xray-grad")],
                  title=f"A vs B (density) · norm {cmp.pct(change)} · "
                        f"{'—' if dist is None else f'{dist * 100:.0f}%'} in other bins")

    def _show_matrix(self) -> None:
        """The weight's magnitude as a heatmap, from the latest spectral pass."""
        latest = spectral_of(self.state, self.row)
        grid = latest.heat_matrix() if latest is not None else None
        title, box = self.query_one("#matrix-title", Static), self.query_one("#matrix", Heatmap)
        if grid is None:
            title.update("[b]weight matrix[/b]")
            box.show(np.zeros((0, 0)), empty_text=MATRIX_PENDING)
            return
        rows, cols = (list(latest.shape) + [grid.shape[0], grid.shape[1]])[:2]
        finite = grid[np.isfinite(grid)]
        top = float(finite.max()) if finite.size else float("nan")
        title.update(f"[b]weight matrix[/b] {rows}x{cols} at step {latest.step}, in {grid.shape[0]}x{grid.shape[1]} "
                     f"cells · colour: RMS of each cell's block, 0 (blank) .. {top:.2g}")
        box.show(np.nan_to_num(grid, nan=0.0, posinf=0.0), y_top="row 0", y_bottom=f"row {rows - 1}",
                 x_labels=("col 0", f"col {cols - 1}"))

    def _show_alerts(self) -> None:
        alerts = self.state.stream_alerts(self.row)
        if self.until is not None:
            alerts = [a for a in alerts if a.step <= self.until]
        box = self.query_one("#layer-alerts", Static)
        if not alerts:
            box.update("[b]alerts[/b]\n[dim]none for this layer[/dim]")
            return
        multi = self.state.world_size > 1
        lines = [f"[b]alerts[/b] ({len(alerts)}, newest first)"]
        for a in alerts[:20]:
            step, sev, rest = alert_text(a, multi_rank=multi)
            lines.append(f"{step.strip():>6} {sev.strip():<8} {rest}".replace("[", r"\["))
        box.update("\n".join(lines))
