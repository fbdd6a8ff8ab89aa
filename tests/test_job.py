"""The whole job's merge (probes/distributed/job.py) without torch.distributed: each "rank" packs its rows,
the buffers are summed and maxed as the collectives would, and rank 0's rows must be the
statistics of all the ranks' tensors together. Also the straggler rule and the viewer's use
of the job's samples."""

import math

import msgspec
import numpy as np
import pytest
import torch

from probes.protocol import histogram, wire
from probes.distributed import job as jobmod
from probes.distributed import merge as mergemod
from probes.distributed.job import Job, table_keys
from probes.capture.step import build_step
from probes.engines.batch import Batch
from probes.rules import RuleConfig, RuleEngine
from tui.state import Row, RunState

KEYS = [("a", "act"), ("w", "weight"), ("w", "grad"), ("w", "update"), ("v", "weight")]


def rank_rows(tensors: dict):
    """One rank's rows of ``{(layer, kind): tensor}`` as the probe reduces them."""
    b = Batch(0.05, 65535)
    for (layer, kind), t in tensors.items():
        if kind == "update":
            b.hold(layer, kind, t, ref_sumsq=float(t.double().square().sum() * 100))
        else:
            b.hold(layer, kind, t, units=kind == "act")
    rows, hists = b.to_host()
    return b.meta, rows, hists, b.hist_n


def merge(ranks: list[dict]) -> dict:
    """What rank 0 publishes for these ranks' tensors: {(layer, kind): Sample}."""
    job = Job.offline(KEYS)
    packed = [job.pack(*rank_rows(t)) for t in ranks]
    sums = sum(p[0] for p in packed)
    maxes = np.maximum.reduce([p[1] for p in packed])
    counts = sum(p[2] for p in packed)
    meta, rows, hists, hist_n = job.merged_rows((sums, maxes, counts))
    step = build_step(3, wire.JOB_RANK, 0.0, meta, rows, hists, hist_n)
    assert wire.decode(wire.encode(step)[4:]).rank == -1  # rank -1 is a valid frame
    return {(s.layer, s.kind): s for s in step.samples}


def test_merged_rows_are_the_statistics_of_all_ranks_tensors():
    g = torch.Generator().manual_seed(0)
    ranks = [{("a", "act"): torch.randn(4, 8, generator=g).relu(), ("w", "weight"): torch.randn(16, generator=g),
              ("w", "grad"): torch.randn(16, generator=g) * (10 if r == 2 else 1)} for r in range(3)]
    got = merge(ranks)
    for key in (("a", "act"), ("w", "weight"), ("w", "grad")):
        a = torch.cat([t[key].reshape(-1) for t in ranks]).double().numpy()
        s = got[key]
        assert s.count == a.size and s.sum == pytest.approx(a.sum()) and s.sumsq == pytest.approx((a * a).sum())
        assert (s.min, s.max) == (pytest.approx(a.min()), pytest.approx(a.max()))
        assert s.near_zero == int((np.abs(a) < 0.05).sum()) and s.zeros == int((a == 0).sum())
        want = np.bincount(histogram.bin_index(a.astype(np.float32)), minlength=histogram.NUM_BINS + 1)
        hist = np.zeros(histogram.NUM_BINS + 1, dtype=np.int64)
        hist[s.hist_lo: s.hist_lo + len(s.hist)] = s.hist
        assert s.hist_n == a.size and (hist == want).all()
    # the grad max comes from rank 2 alone; dead units: the mean of the ranks' fractions
    assert got[("w", "grad")].max == pytest.approx(float(ranks[2][("w", "grad")].max()))
    assert got[("a", "act")].dead_units is not None
    assert ("v", "weight") not in got  # a slot no rank filled is not sent


def test_nan_empty_and_missing_rows_merge_as_one_tensor_would():
    nan = torch.tensor([1.0, float("nan"), -2.0])
    ranks = [{("w", "weight"): torch.tensor([3.0, 4.0]), ("v", "weight"): torch.tensor([1.0])},
             {("w", "weight"): torch.zeros(0)},  # an empty FSDP shard: neutral, not NaN
             {("w", "weight"): torch.tensor([-5.0])}]
    got = merge(ranks)
    w = got[("w", "weight")]
    assert (w.count, w.min, w.max, w.sum) == (3, -5.0, 4.0, pytest.approx(2.0))
    assert got[("v", "weight")].count == 1  # a row only one rank has
    got = merge([{("w", "weight"): nan}, {("w", "weight"): torch.tensor([7.0])}])
    w = got[("w", "weight")]
    assert w.nan == 1 and math.isnan(w.sum) and math.isnan(w.min) and math.isnan(w.max)  # as the tensor's own


def test_the_update_ratio_merges_exactly():
    g = torch.Generator().manual_seed(1)
    ranks = [{("w", "update"): torch.randn(10, generator=g) * (r + 1)} for r in range(2)]
    got = merge(ranks)[("w", "update")]
    num = sum(float(t[("w", "update")].double().square().sum()) for t in ranks)
    assert got.ratio == pytest.approx(math.sqrt(num / (num * 100)))  # sqrt(sum ||dW||^2 / sum ||W||^2)


def test_table_keys_are_the_same_whatever_ran():
    w = torch.nn.Parameter(torch.zeros(2))
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    keys = table_keys([("w", w), ("f", frozen)], [("w", w)], ["m"])
    assert keys == [("m", "act"), ("w", "weight"), ("w", "grad"), ("f", "weight"), ("w", "update")]


def job_step(step, fwd, step_time=None):
    n = len(fwd)
    return wire.Step(step=step, rank=wire.JOB_RANK, time=0.0, samples=[], ranks=wire.RankStats(
        grad_norm=[1.0] * n, nonfinite=[0.0] * n, step_time=step_time or [0.1] * n, fwd_time=fwd,
        loss=[math.nan] * n))


def test_straggler_names_the_rank_and_host_with_hysteresis_and_recovery():
    eng = RuleEngine(RuleConfig())
    eng.hosts = ["gpu-a", "gpu-a", "gpu-b", "gpu-b"]
    fired = []
    slow = [0.01, 0.012, 0.3, 0.011]
    for step in range(6):
        fired += eng.evaluate(job_step(step, slow if step >= 1 else [0.01] * 4))
    (alert,) = fired
    assert (alert.rule, alert.rank, alert.step, alert.severity) == ("straggler", 2, 3, "warning")
    assert "gpu-b" in alert.message and "rank 2" in alert.message
    # a jitter of a few ms is no straggler (straggler_min_s), nor is one slow sample (k)
    assert not RuleEngine().evaluate(job_step(0, [0.001, 0.001, 0.005, 0.001]))
    back = []
    for step in range(6, 10):
        back += eng.evaluate(job_step(step, [0.01] * 4))
    assert [(a.severity, a.rank) for a in back] == [("info", 2)]
    # without data + forward times the wall time per step is judged; a rank's own steps never are
    eng = RuleEngine()
    out = [a for s in range(4) for a in eng.evaluate(job_step(s, [math.nan] * 3, [0.1, 0.1, 0.5]))]
    assert [a.rank for a in out] == [2]
    assert not RuleEngine().evaluate(wire.Step(step=0, rank=0, time=0.0, samples=[]))


def test_the_merged_view_shows_the_whole_jobs_samples():
    st = RunState()
    st.ingest(wire.Hello(version=wire.PROTOCOL_VERSION, run="r", rank=0, world_size=4,
                         layers=[wire.LayerInfo("", params=["w"])]))
    merged = merge([{("w", "weight"): torch.ones(3)}, {("w", "weight"): torch.ones(2)}])[("w", "weight")]
    own = merge([{("w", "weight"): torch.ones(3)}])[("w", "weight")]
    st.ingest(wire.Step(step=0, rank=0, time=0.0, samples=[own]))
    row = Row("", params=["w"])  # a top-level parameter "w": its stream is "w"
    assert st.latest(row, "weight", rank=None).count == 3  # no job samples yet: the ranks attached
    st.ingest(wire.Step(step=0, rank=-1, time=0.0, samples=[merged], ranks=wire.RankStats()))
    assert st.job and st.ranks == [0]
    assert st.latest(row, "weight", rank=None).count == 5  # the whole job's
    assert st.latest(row, "weight", rank=0).count == 3
    assert [s.count for _, s in st.series("w", "weight", rank=None)] == [5]


def test_histogram_windows_send_few_bins_and_stay_exact_when_values_move():
    """Rounds of two simulated ranks: after the first round only each slot's window of bins travels;
    a rank whose values leave the window has its slot sent again whole, so the counts stay exact."""
    jobs = [Job.offline(KEYS, rank=r, world=2) for r in range(2)]
    g = torch.Generator().manual_seed(2)
    sent = []
    for scale in (1.0, 1.0, 1e6, 1e6):
        tensors = [{("w", "weight"): torch.randn(500, generator=g) * (scale if r == 1 else 1.0),
                    ("w", "grad"): torch.randn(300, generator=g)} for r in range(2)]
        packed = [j.pack(*rank_rows(t)) for j, t in zip(jobs, tensors)]
        cuts = [j.cut(p[2]) for j, p in zip(jobs, packed)]
        for (sums, _, _), (_, lost) in zip(packed, cuts):
            sums[:, mergemod._LOST] = lost
        sums = sum(p[0] for p in packed)  # what the SUM all-reduce gives every rank
        maxes = np.maximum.reduce([p[1] for p in packed])
        flat = sum(c[0] for c in cuts)
        lost = np.nonzero(sums[:, mergemod._LOST] > 0)[0]
        whole = lambda part: sum(p[2][lost] for p in packed)  # noqa: E731 - the fifth all-reduce
        counts, again = jobs[0].merge_counts(flat, sums, packed[0][2], whole)
        sent.append((flat.size, again))
        for j in jobs:
            j._window(maxes)
        meta, rows, hists, hist_n = jobs[0].merged_rows((sums, maxes, counts))
        got = {(s.layer, s.kind): s for s in build_step(0, -1, 0.0, meta, rows, hists, hist_n).samples}
        for key in (("w", "weight"), ("w", "grad")):
            a = torch.cat([t[key] for t in tensors]).double().numpy()
            want = np.bincount(histogram.bin_index(a.astype(np.float32)), minlength=histogram.NUM_BINS + 1)
            hist = np.zeros(histogram.NUM_BINS + 1, dtype=np.int64)
            hist[got[key].hist_lo: got[key].hist_lo + len(got[key].hist)] = got[key].hist
            assert (hist == want).all(), (scale, key)
    full = len(KEYS) * histogram.NUM_BINS
    assert sent[0] == (full, 0)  # the first round: every bin
    assert sent[1][0] < full / 8 and sent[1][1] == 0  # then the windows only (279 bins of 3,205 here)
    assert sent[2][1] == histogram.NUM_BINS  # rank 1's weights moved out: that slot went again whole
    assert sent[3][1] == 0  # and the window followed them


async def test_the_app_shows_the_whole_job_by_default_and_r_cycles_to_the_local_rank():
    """Rank 0 alone attached (serve_local=False on a 4-rank job): the view is the whole job's,
    and ``r`` goes whole job -> rank 0 -> whole job."""
    from tui import synthetic
    from tui.app import XRayApp
    from tui.feed import ListSource

    own = synthetic.steps(3, 3, elements=64, seed=1, rank=0)
    whole = [wire.Step(step=s.step, rank=-1, time=s.time, ranks=wire.RankStats(step_time=[0.1] * 4),
                       samples=[msgspec.structs.replace(x, count=x.count * 4) for x in s.samples]) for s in own]
    batches = [[synthetic.hello(3, run="job", rank=0, world_size=4)]] + [[a, b] for a, b in zip(own, whole)]
    app = XRayApp(ListSource(batches))
    async with app.run_test(size=(120, 40)) as pilot:
        for _ in range(200):
            await pilot.pause(0.02)
            if app.state.step >= 2 and app.connection != "live":
                break
        app._paint()
        await pilot.pause()
        text = lambda: "\n".join(s.text for s in app.screen._compositor.render_strips())  # noqa: E731
        row = app.state.rows[0]
        assert app.table.rank is None and "whole job (4 ranks)" in text()
        assert app.state.latest(row, "weight", None).count == 4 * app.state.latest(row, "weight", 0).count
        await pilot.press("r")
        assert app.table.rank == 0 and "(rank 0)" in text()
        await pilot.press("r")
        assert app.table.rank is None


def test_a_nonfinite_alert_on_the_whole_job_names_the_ranks_that_hold_it():
    eng = RuleEngine()
    eng.hosts = ["a", "a", "b", "b"]
    bad = merge([{("w", "weight"): torch.ones(3)}, {("w", "weight"): torch.tensor([1.0, float("nan")])}])
    step = wire.Step(step=0, rank=-1, time=0.0, samples=list(bad.values()), ranks=wire.RankStats(
        grad_norm=[1.0] * 4, nonfinite=[0.0, 0.0, 0.0, 1.0], step_time=[0.1] * 4, fwd_time=[0.01] * 4,
        loss=[1.0] * 4))
    (alert,) = [a for a in eng.evaluate(step) if a.rule == "nonfinite"]
    assert alert.rank == -1 and "on rank 3 (b)" in alert.message


def test_the_job_merges_fewer_steps_while_a_rank_falls_behind_and_more_once_all_keep_up():
    job = Job.offline(KEYS)
    notes = []
    job._publish = lambda build: notes.extend(build())
    job.every = 10
    assert all(job.merges(s) for s in (0, 10, 20))
    job.throttle(jobmod.BACKLOG_HIGH + 1, step=30)  # some rank has more queued than that
    assert job.stride == 2 and [job.merges(s) for s in (40, 50, 60)] == [True, False, True]
    assert notes[-1].event == "job-stride" and notes[-1].data["stride"] == 2 and notes[-1].step == 30
    for _ in range(10):
        job.throttle(jobmod.BACKLOG_HIGH + 1)
    assert job.stride == jobmod.MAX_STRIDE  # bounded
    for _ in range(jobmod.CALM_ROUNDS - 1):
        job.throttle(0)
    assert job.stride == jobmod.MAX_STRIDE
    job.throttle(1)  # not calm yet: the count starts again
    for _ in range(jobmod.CALM_ROUNDS):
        job.throttle(0)
    assert job.stride == jobmod.MAX_STRIDE // 2 and notes[-1].data["why"] == "caught up"


def test_whole_job_alerts_say_job_not_rank_minus_one():
    from tui.widgets.alerts import alert_text

    alert = wire.Alert(step=7, rank=wire.JOB_RANK, severity="warning", rule="straggler", layer="(job)", kind="scalar",
                       value=2.0, threshold=1.5, message="rank 2 on node-b is slow")
    assert " job (job)  rank 2" in alert_text(alert, multi_rank=True)[2]  # not "r-1"
    assert " r3 (job)  rank 2" in alert_text(msgspec.structs.replace(alert, rank=3), multi_rank=True)[2]
