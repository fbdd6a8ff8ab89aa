"""The two-line header: which run, how far, how fast, and whether it is live.

Everything shown comes from the messages (step, the probe's own clock for
steps/s), never from the wall clock, so a replay and a snapshot test read the
same as the live run did.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from rich.text import Text
from textual.widget import Widget

from tui.state import RunState
from tui.widgets.trend import direction, trend_line

#: Scalar values the header's loss and lr trends keep (the sparkline shows what fits).
TREND_STEPS = 64


@dataclass(frozen=True)
class HeaderInfo:
    """What the header shows; the app builds one per paint."""

    run: str
    step: int
    steps_per_s: float | None
    ranks: int
    world_size: int
    connection: str
    paused: bool
    samples: int
    drops: int
    active_alerts: int
    layers_shown: int
    layers_total: int
    filter: str = ""
    title: str = "xray-tui"
    view: str = ""  # "merged" or "rank N" when the run has several ranks
    live_step: int = -1  # the run's step; differs from ``step`` while the view is paused
    engine: str = ""  # the probe's statistics engine fell back ("torch on cuda: why"), from its Note
    loss: float | None = None  # the newest Scalars loss (None: the probe sends none)
    lr: float | None = None  # the newest learning rate (param group 0)
    loss_trend: tuple = ()  # the newest TREND_STEPS losses, oldest first
    lr_trend: tuple = ()
    #: In a replay: the run's last step (the header says "step S of N (replay)", and no
    #: steps/s: a recording has no live rate); its End's step when that is later than the last
    #: sample (the step the headless end line names). None for a live run.
    replay_last: int | None = None
    lost: str = ""  # what this viewer lost when it fell behind ("380 steps, last at 12:03:05"), "" if nothing

    @classmethod
    def from_state(cls, state: RunState, *, label: str, connection: str, paused: bool,
                   layers_shown: int, filter: str = "", title: str = "xray-tui",
                   view: str = "", shown_step: int | None = None,
                   replay_last: int | None = None) -> "HeaderInfo":
        """Summarise ``state`` (on the app's thread).

        ``shown_step`` is the step the (paused or replayed) table shows, if not
        the newest; ``replay_last`` the recording's last step in a replay.
        """
        step = state.step if shown_step is None else shown_step
        return cls(run=state.run or label, step=step, live_step=state.step, steps_per_s=state.steps_per_s,
                   ranks=len(state.hellos), world_size=state.world_size, connection=connection,
                   paused=paused, samples=state.samples_seen, drops=state.drops,
                   active_alerts=len(state.active if shown_step is None else state.active_at(shown_step)),
                   layers_shown=layers_shown,
                   layers_total=len(state.rows), filter=filter, title=title, view=view,
                   engine=engine_fallback(state), loss=state.scalar("loss", until=shown_step),
                   lr=state.scalar("lr", until=shown_step),
                   loss_trend=_tail(state, "loss", shown_step), lr_trend=_tail(state, "lr", shown_step),
                   replay_last=replay_last, lost=lost_text(state))


def _tail(state: RunState, name: str, until: int | None) -> tuple:
    """The newest TREND_STEPS values of scalar ``name`` (lowest rank that sends it), at ``until`` or before."""
    for rank in sorted(state.latest_scalars):
        buf = state.scalars.get((rank, name))
        if buf:
            out = []
            for step, value in reversed(buf):
                if until is not None and step > until:
                    continue
                out.append(value)
                if len(out) >= TREND_STEPS:
                    break
            return tuple(reversed(out))
    return ()


def lost_text(state: RunState) -> str:
    """What this viewer lost in the drop episodes so far, in words ("" when nothing)."""
    if not state.lost:
        return ""
    at = time.strftime("%H:%M:%S", time.localtime(state.lost[-1].started))
    what = "sampled steps" if any(ep.sampled for ep in state.lost) else "steps"
    return f"{state.lost_steps:,} {what}, last at {at}"


def engine_fallback(state: RunState) -> str:
    """The latest ``engine-fallback`` Note, in words ("" when the engine never fell back)."""
    for note in reversed(state.notes):
        if note.event == "engine-fallback":
            return f"engine fell back to torch on {note.data.get('device', '?')}: {note.data.get('why', '')}"
    return ""


class XRayHeader(Widget):
    """Run name, step, speed, ranks, connection, pause flag, samples and drops."""

    COMPONENT_CLASSES = {
        "xray-header--title",
        "xray-header--muted",
        "xray-header--ok",
        "xray-header--info",
        "xray-header--warning",
        "xray-header--critical",
        "xray-header--paused",
    }

    DEFAULT_CSS = """
    XRayHeader {
        height: 3;
        background: $panel;
        color: $foreground;
    }
    XRayHeader > .xray-header--title { text-style: bold; color: $primary; }
    XRayHeader > .xray-header--muted { color: $xray-muted; }
    XRayHeader > .xray-header--ok { color: $xray-ok; text-style: bold; }
    XRayHeader > .xray-header--info { color: $xray-info; text-style: bold; }
    XRayHeader > .xray-header--warning { color: $xray-warning; text-style: bold; }
    XRayHeader > .xray-header--critical { color: $xray-critical; text-style: bold; }
    XRayHeader > .xray-header--paused { color: $background; background: $xray-warning; text-style: bold; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.info: HeaderInfo | None = None

    def show(self, info: HeaderInfo) -> None:
        """Display ``info`` (repaints only when it changed)."""
        if info != self.info:
            self.info = info
            self.refresh()

    def _style(self, name: str):
        return self.get_component_rich_style(f"xray-header--{name}", partial=True)

    def _connection_style(self, connection: str):
        if connection == "live":
            return self._style("ok")
        if connection.startswith("run ended"):
            failed = connection.startswith("run ended:") and not connection.startswith("run ended: stopped")
            return self._style("critical" if failed else "info")  # crashed, killed, interrupted
        if connection.startswith("error"):
            return self._style("critical")
        if connection.startswith("disconnected"):
            return self._style("warning")
        return self._style("muted")

    def _scalars(self, info: HeaderInfo, width: int) -> Text:
        """The third line: `` loss 2.314 ▇▆▅▄▃▂ ↓ · lr 3e-04 ▁▂▃▃ →``; ``no loss yet`` until one comes."""
        muted = self._style("muted")
        if info.loss is None and info.lr is None:
            return Text.assemble(" ", ("no loss yet", muted),
                                 (" (the probe sends it from xr.log(loss=...) or a Trainer/Lightning callback)"
                                  if width >= 100 else "", muted))
        parts: list = [" "]
        shown = [(label, value, trend, fmt) for label, value, trend, fmt in
                 (("loss", info.loss, info.loss_trend, ".4g"), ("lr", info.lr, info.lr_trend, ".3g"))]
        # Each trend gets an equal share of what the numbers leave on the line.
        spark = max(min((width - 40) // 2, TREND_STEPS), 8)
        for i, (label, value, trend, fmt) in enumerate(shown):
            if i:
                parts.append((" · ", muted))
            if value is None:
                parts.append((f"no {label}", muted))
                continue
            bad = not math.isfinite(value)
            parts += [(f"{label} ", muted), (format(value, fmt) if not bad else str(value),
                                             self._style("critical") if bad else "bold")]
            if len(trend) >= 2:
                line = trend_line(list(trend), min(spark, len(trend)))
                arrow = direction(list(trend))
                parts += [" ", (line, self._style("critical") if "✖" in line else self._style("info")),
                          (f" {arrow}" if arrow else "", muted)]
        return Text.assemble(*parts)

    def render(self) -> Text:
        """Two lines, each left part plus a right-aligned status."""
        info = self.info
        width = self.size.width
        if info is None:
            return Text(" xray-tui", style=self._style("title"))
        muted = self._style("muted")
        sep = (" · ", muted)
        step = f"{info.step:,}" if info.step >= 0 else "—"
        speed = f"{info.steps_per_s:.2f} steps/s" if info.steps_per_s else "— steps/s"
        if info.replay_last is not None:
            # A recording has no live rate: where the view stands in it instead, and how to move.
            step = f"{step} of {info.replay_last:,} (replay)"
            speed = "← → step · [ ] 10 · < > first/last · : go to" if width >= 120 else ""
        run = (info.run, "bold") if info.run else ("no run yet", muted)
        left1 = Text.assemble(" ", (info.title, self._style("title")), "  ", run,
                              sep, ("step ", muted), step, *((sep, (speed, muted if info.replay_last is not None
                                                                    else None)) if speed else ()), sep,
                              ("ranks ", muted), f"{info.ranks}/{info.world_size}",
                              *(((" ", muted), (f"({info.view})", "bold")) if info.view else ()))
        right1 = Text.assemble(("● ", self._connection_style(info.connection)),
                               (info.connection, self._connection_style(info.connection)), " ")
        layers = f"{info.layers_total:,}" if not info.filter else f"{info.layers_shown:,}/{info.layers_total:,}"
        left2 = Text.assemble(" ", ("layers ", muted), layers,
                              *(((" /", muted), (info.filter, "bold"), ("/", muted)) if info.filter else ()),
                              sep, ("samples ", muted), f"{info.samples:,}", sep, ("drops ", muted),
                              (f"{info.drops:,}", self._style("warning") if info.drops else None),
                              *((sep, ("lost ", muted), (info.lost, self._style("warning"))) if info.lost else ()),
                              sep,
                              ("alerts ", muted),
                              (f"{info.active_alerts} active",
                               self._style("warning") if info.active_alerts else None))
        right2 = Text("")
        if info.engine:
            right2 = Text(f" {info.engine} ", style=self._style("warning"))
        if info.paused:
            behind = f" · run at step {info.live_step:,}" if info.live_step > info.step else ""
            right2 = Text(f" PAUSED{behind} · p resumes ", style=self._style("paused"))
        lines = []
        for left, right in ((left1, right1), (left2, right2)):
            # A long status ("disconnected — retrying (cannot connect to …)") must not push
            # the run's name and step off the line: it gets at most what the left part spares.
            room = max(width - min(left.cell_len, width // 2) - 1, 12)
            if right.cell_len > room:
                right.truncate(room - 1, overflow="ellipsis")
                right.append(" ")
            gap = width - left.cell_len - right.cell_len
            if gap < 1:
                # Narrow terminal: the status matters more than the tail of the left part.
                left.truncate(max(width - right.cell_len - 1, 0), overflow="ellipsis")
                gap = max(width - left.cell_len - right.cell_len, 0)
            lines.append(Text.assemble(left, " " * gap, right))
        third = self._scalars(info, width)
        third.truncate(width, overflow="ellipsis")
        lines.append(third)
        out = Text("\n").join(lines)
        out.no_wrap = True
        out.overflow = "crop"
        return out
