"""FSDP (gloo, CPU): each rank measures its own shard, and the merged view of the
ranks equals the statistics of the whole tensor, gathered by the training script."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from probes.protocol import histogram, wire
from tui.merge import merge_samples

pytestmark = pytest.mark.slow
SCRIPT = str(Path(__file__).parent / "fsdp_script.py")
PARAMS = ["0.weight", "0.bias", "2.weight", "2.bias"]  # unwrapped: no _fsdp_wrapped_module, _checkpoint_wrapped_module


def run(tmp_path, *extra):
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", SCRIPT, str(tmp_path), "4", *extra],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-8000:]
    assert "switched off" not in out.stderr, out.stderr[-8000:]  # no part of the probe failed
    ranks = [wire.read_file(str(tmp_path / f"rank{r}.xray"))[0] for r in (0, 1)]
    return ranks, torch.load(tmp_path / "truth.pt")


def steps(msgs, rank: int | None = None):
    """The Steps of a recording: each rank's own, or with ``rank=-1`` the whole job's (rank 0's)."""
    return [m for m in msgs if isinstance(m, wire.Step) and (m.rank >= 0 if rank is None else m.rank == rank)]


def check(s, t: torch.Tensor):
    """``s`` has the statistics and the full histogram of ``t`` (numpy, float64)."""
    a = t.detach().double().numpy().reshape(-1)
    assert s.count == a.size
    assert s.sum == pytest.approx(a.sum(), rel=1e-5, abs=1e-12)
    assert s.sumsq == pytest.approx(np.square(a).sum(), rel=1e-5, abs=1e-15)
    assert s.abssum == pytest.approx(np.abs(a).sum(), rel=1e-5, abs=1e-12)
    assert (s.min, s.max) == (pytest.approx(a.min(), rel=1e-6), pytest.approx(a.max(), rel=1e-6))
    want = np.bincount(histogram.bin_index(a.astype(np.float32)), minlength=histogram.NUM_BINS + 1)
    got = np.zeros(histogram.NUM_BINS + 1, dtype=np.int64)
    got[s.hist_lo: s.hist_lo + len(s.hist)] = s.hist
    assert s.hist_n == a.size and (got == want).all()


def check_run(ranks, truth, whole_updates):
    r0, r1 = ranks
    assert (r0[0].rank, r1[0].rank, r0[0].world_size) == (0, 1, 2)
    hello_names = {li.name for li in r0[0].layers}
    assert hello_names == {"0", "1", "2"} and truth["names"] == PARAMS
    # no rule was fooled by shards: no-grad (an empty shard), rank-divergence (shards' norms differ)
    assert not [m for m in r0 + r1 if isinstance(m, wire.Alert)]
    s0, s1 = steps(r0), steps(r1)
    assert [s.step for s in s0] == [s.step for s in s1] == [0, 1, 2, 3]
    for a, b, want in zip(s0, s1, truth["steps"]):
        # every parameter is sharded: no gathered norms (they would differ in a healthy run)
        assert a.rank_grad_norms is None and b.rank_grad_norms is None
        got0 = {(s.layer, s.kind): s for s in a.samples}
        got1 = {(s.layer, s.kind): s for s in b.samples}
        assert {n for n, k in got0 if k == "weight"} == set(PARAMS) == {n for n, k in got1 if k == "grad"}

        def merged(key):
            # the viewer's merge (tui/state.py), less a rank's count-0 sample of an empty shard: its
            # NaN min/max would win when it comes first (test_precision.py's xfail shows that bug)
            return merge_samples([s for s in (got0[key], got1[key]) if s.count])

        for name in PARAMS:
            # each rank read its own piece, not the whole tensor...
            assert got0[(name, "weight")].count + got1[(name, "weight")].count == want["weight"][name].numel()
            # ...and the merged view is the whole tensor's
            check(merged((name, "weight")), want["weight"][name])
            check(merged((name, "grad")), want["grad"][name])
            if name in whole_updates:
                check(merged((name, "update")), want["after"][name] - want["weight"][name])
        check(merged(("1", "act")), want["act"])  # both ranks' batches
    # rank 0's whole-job samples (torch.distributed's SUM/MIN/MAX over the shards) are the whole tensors'
    jobs = steps(r0, wire.JOB_RANK)
    assert [s.step for s in jobs] == [0, 1, 2, 3]
    for st, want in zip(jobs, truth["steps"]):
        got = {(s.layer, s.kind): s for s in st.samples}
        for name in PARAMS:
            check(got[(name, "weight")], want["weight"][name])
            check(got[(name, "grad")], want["grad"][name])
            if name in whole_updates:
                check(got[(name, "update")], want["after"][name] - want["weight"][name])
        check(got[("1", "act")], want["act"])
        assert st.ranks.grad_norm == [pytest.approx(float("nan"), nan_ok=True)] * 2  # nothing replicated


def test_fsdp2_fully_shard_each_rank_its_shard_merged_equals_the_whole(tmp_path):
    ranks, truth = run(tmp_path, "--fsdp", "2", "--update-sample", "100")
    r1 = steps(ranks[1])
    # 2.weight (1x32) sharded on dim 0 over 2 ranks leaves rank 1 nothing: count-0 samples, no error
    assert {(s.kind, s.count) for s in r1[0].samples if s.layer == "2.weight"} == {
        ("weight", 0), ("grad", 0), ("update", 0)}
    check_run(ranks, truth, whole_updates=["0.bias", "2.weight", "2.bias"])
    # 0.weight's shard (16x8 = 128 elements) is larger than update_sample=100: each rank measures
    # the update on 100 elements of its own shard (rows 16r..16r+15 of the whole weight)
    for r, rank_msgs in enumerate(ranks):
        idx = truth["subsets"][r]["0.weight"]
        assert len(idx) == 100
        for st, want in zip(steps(rank_msgs), truth["steps"]):
            w = want["weight"]["0.weight"].chunk(2, 0)[r].reshape(-1)[idx]
            dw = want["after"]["0.weight"].chunk(2, 0)[r].reshape(-1)[idx] - w
            u = {s.layer: s for s in st.samples if s.kind == "update"}["0.weight"]
            assert u.count == 100
            assert u.sumsq == pytest.approx(dw.double().square().sum().item(), rel=1e-4)
            assert u.ratio == pytest.approx((dw.norm() / w.norm()).item(), rel=1e-4)


def test_fsdp1_use_orig_params_names_unwrapped_merged_equals_the_whole(tmp_path):
    ranks, truth = run(tmp_path, "--fsdp", "1")
    # FSDP1 gives each rank a flat 1-D piece of every parameter; the bias of layer 0 is all on rank 1
    r0 = steps(ranks[0])[0]
    assert {s.kind: s.count for s in r0.samples if s.layer == "0.bias"} == {"weight": 0, "grad": 0, "update": 0}
    check_run(ranks, truth, whole_updates=PARAMS)
