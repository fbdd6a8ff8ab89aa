"""The app with issue 12's messages: Scalars in the state and the header, and how a run ended."""

from __future__ import annotations

import math

from probes.protocol import wire
from tui import synthetic
from tui.app import XRayApp
from tui.feed import ListSource
from tui.state import SCALAR_DEPTH, RunState

from test_app import screen_text, settle


def scalars(step, rank=0, **values):
    return wire.Scalars(step=step, rank=rank, time=1_700_000_000.0 + step, values=values)


def test_state_keeps_a_ring_per_scalar_and_rank_and_the_latest_values():
    st = RunState()
    st.ingest(synthetic.hello(1))
    for s in range(SCALAR_DEPTH + 10):
        st.ingest(scalars(s, loss=float(s), lr=1e-3))
        st.ingest(scalars(s, rank=1, loss=-1.0))
    series = st.scalar_series("loss")
    assert len(series) == SCALAR_DEPTH and series[0] == (10, 10.0) and series[-1] == (SCALAR_DEPTH + 9, SCALAR_DEPTH + 9.0)
    assert st.scalar("loss") == SCALAR_DEPTH + 9.0 and st.scalar("loss", rank=1) == -1.0
    assert st.scalar("lr") == 1e-3 and st.scalar("lr", rank=1) is None and st.scalar("grad_norm") is None


def test_state_bounds_the_number_of_scalar_names():
    from tui.state import MAX_SCALAR_STREAMS

    st = RunState()
    st.ingest(scalars(0, **{f"user/{i}": 1.0 for i in range(MAX_SCALAR_STREAMS + 50)}))
    assert len(st.scalars) == MAX_SCALAR_STREAMS


def test_end_reason_of_the_state():
    st = RunState()
    st.ingest(synthetic.hello(1, rank=0, world_size=2))
    st.ingest(synthetic.hello(1, rank=1, world_size=2))
    st.ingest(wire.End(5, 0, "finished"))
    assert st.end_reason is None  # rank 1 still running
    st.ingest(wire.End(4, 1, "killed", "SIGTERM"))
    assert st.end_reason == "killed"


def stream(n_steps=4, end=None, loss=2.5):
    batches = [[synthetic.hello(3, run="scalar-run")]]
    for s in synthetic.steps(3, n_steps, elements=64):
        batches.append([s, scalars(s.step, loss=loss - 0.1 * s.step, lr=3e-4)])
    if end is not None:
        batches.append([end])
    return batches


async def test_header_shows_the_latest_loss_and_lr():
    app = XRayApp(ListSource(stream(end=wire.End(4, 0))))
    async with app.run_test(size=(120, 30)) as pilot:
        await settle(pilot, app, alerts=0)
        text = screen_text(app)
        assert "loss 2.2" in text and "lr 0.0003" in text
        assert app.connection == "run ended" and "run ended" in text


async def test_header_without_scalars_says_no_loss_yet():
    batches = [[synthetic.hello(3, run="old")], *[[s] for s in synthetic.steps(3, 4, elements=64)]]
    app = XRayApp(ListSource(batches))
    async with app.run_test(size=(120, 30)) as pilot:
        await settle(pilot, app, alerts=0)
        text = screen_text(app)
        assert "no loss yet" in text.split("\n")[2] and " lr " not in text


async def test_a_crash_is_said_in_the_header():
    app = XRayApp(ListSource(stream(end=wire.End(3, 0, "crashed", "ValueError: boom"), loss=math.nan)))
    async with app.run_test(size=(120, 30)) as pilot:
        await settle(pilot, app, alerts=0)
        assert app.connection == "run ended: crashed"
        text = screen_text(app)
        assert "run ended: crashed" in text and "loss nan" in text


def test_reattach_source_says_a_run_crashed():
    import threading

    from test_app import collect, publisher, wait_for
    from tui.reattach import ENDED, ReattachSource, Status

    pub = publisher("crashy", started=1.0)
    for s in synthetic.steps(2, 2, elements=16):
        pub.submit(lambda s=s: s)
    got, stop = [], threading.Event()
    reader = threading.Thread(target=collect, args=(ReattachSource("crashy", poll=0.05), stop, got), daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: sum(isinstance(m, wire.Step) for m in got) == 2)
        pub.submit(lambda: wire.End(step=2, rank=0, reason="crashed", error="ValueError: boom"))
        pub.close()
        assert wait_for(lambda: Status("run ended: crashed — waiting for a new run") in got)
        assert Status(ENDED) not in got
    finally:
        stop.set()
        pub.close()
        reader.join(5)
