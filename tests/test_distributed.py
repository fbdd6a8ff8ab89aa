"""torch.distributed (gloo, CPU): two ranks, each serving its own stream."""

import subprocess
import sys
from pathlib import Path

import pytest

from probes.protocol import stats, wire

pytestmark = pytest.mark.slow
SCRIPT = str(Path(__file__).parent / "dist_script.py")


def run(tmp_path, *extra):
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", SCRIPT, str(tmp_path), "6", *extra],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-8000:]
    return [wire.read_file(str(tmp_path / f"rank{r}.xray"))[0] for r in (0, 1)]


def steps(msgs):
    """Each rank's own steps (rank 0 also sends the whole job's, rank -1: tests/test_multinode.py)."""
    return [m for m in msgs if isinstance(m, wire.Step) and m.rank >= 0]


def test_each_rank_streams_unwrapped_names_and_all_gathered_grad_norms(tmp_path):
    r0, r1 = run(tmp_path)
    assert (r0[0].rank, r0[0].world_size, r1[0].rank) == (0, 2, 1)
    names = {s.layer for s in steps(r0)[0].samples}
    assert "0.weight" in names and not any(n.startswith("module.") for n in names)  # DDP wrapper unwrapped
    for a, b in zip(steps(r0), steps(r1)):
        assert a.rank_grad_norms == b.rank_grad_norms  # the same all-gathered vector on both ranks
        assert len(a.rank_grad_norms) == 2
        # DDP averaged the gradients: both ranks hold the same ones
        assert a.rank_grad_norms[0] == pytest.approx(a.rank_grad_norms[1], rel=1e-5)
        own = sum(s.sumsq for s in a.samples if s.kind == "grad") ** 0.5
        assert own == pytest.approx(a.rank_grad_norms[0], rel=1e-4)
    # weights are the same on both ranks; merged statistics add up exactly
    w0 = {s.layer: s for s in steps(r0)[-1].samples if s.kind == "weight"}
    w1 = {s.layer: s for s in steps(r1)[-1].samples if s.kind == "weight"}
    assert stats.mean(w0["0.weight"]) == pytest.approx(stats.mean(w1["0.weight"]))


def test_a_corrupted_rank_shows_in_the_gathered_norms(tmp_path):
    r0, _ = run(tmp_path, "--corrupt-at", "3")
    norms = [st.rank_grad_norms for st in steps(r0)]
    assert all(n[1] == pytest.approx(n[0], rel=1e-5) for n in norms[:3])
    assert all(n[1] > 50 * n[0] for n in norms[3:])
    # rank 0's probe judges the gathered norms and names the outlier rank
    (alert,) = [a for a in r0 if isinstance(a, wire.Alert) and a.rule == "rank-divergence"]
    assert alert.rank == 1 and 3 <= alert.step <= 5 and alert.severity in ("warning", "critical")
