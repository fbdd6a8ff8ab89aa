"""`xray-tui export` in every format, read back with the format's own reader (issue 14)."""

import csv
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import probes
from probes.protocol import histogram, stats, wire


def xray(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tui.cli", "export", *args], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    """A tiny recording: 4 steps of a 2-layer MLP, a loss, a note, and a NaN at step 3 (alerts)."""
    log = str(tmp_path_factory.mktemp("rec") / "run.xray")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with probes.attach(model, opt, every=1, serve=False, log=log) as xr:
        for i in range(4):
            if i == 1:
                xr.note("marker", where="here", n=3)
            if i == 3:
                with torch.no_grad():
                    model[2].bias[0] = float("nan")
            loss = model(torch.randn(4, 8)).pow(2).mean()
            loss.backward()
            xr.log(loss=loss)
            opt.step()
            opt.zero_grad()
    msgs, torn = wire.read_file(log)
    assert torn == 0
    samples = [(m, s) for m in msgs if isinstance(m, wire.Step) for s in m.samples]
    scalars = [(m.step, k, v) for m in msgs if isinstance(m, wire.Scalars) for k, v in m.values.items()]
    alerts = [m for m in msgs if isinstance(m, wire.Alert)]
    notes = [m for m in msgs if isinstance(m, wire.Note)]
    assert len(samples) == 4 * 15 and alerts and notes and any(k == "loss" for _, k, _ in scalars)
    return log, samples, scalars, alerts, notes


def same(a, b):
    """Equal floats, NaN equal to NaN (a statistic of the NaN step)."""
    if a is None or b is None:
        return a is None and b is None
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=0)


STATS = ("count", "mean", "std", "min", "max", "l2", "skewness", "p05", "median", "p95", "near_zero", "nan", "ratio")


def test_jsonl_what_and_filters(rec, tmp_path):
    log, samples, scalars, alerts, notes = rec
    out = xray(log, "--what", "samples,alerts", "--what", "notes", "--layer", r"^2\.", "--kind", "weight",
               "--kind", "grad", "-o", str(tmp_path / "o.jsonl"))
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    want = [(st.step, s.layer, s.kind) for st, s in samples if s.layer.startswith("2.") and s.kind in ("weight", "grad")]
    assert [(r["step"], r["layer"], r["kind"]) for r in lines if r["type"] == "sample"] == want and want
    assert not [r for r in lines if r["type"] == "scalar"]  # not asked for
    got_alerts = [(r["layer"], r["kind"]) for r in lines if r["type"] == "alert"]
    assert got_alerts == [(a.layer, a.kind) for a in alerts if a.layer.startswith("2.") and a.kind in ("weight", "grad")]
    assert got_alerts  # the NaN bias's weight and grad alerts; the act and loss ones are filtered out
    assert [r for r in lines if r["type"] == "note"] == [
        {"type": "note", "step": n.step, "rank": 0, "event": n.event, "data": dict(n.data)} for n in notes]
    assert out.stderr.startswith(f"wrote {len(want)} samples, {len(got_alerts)} alerts and 1 note to ")
    # an alert about the loss has no sample kind: a --layer alone keeps it, any --kind leaves it out
    loss = xray(log, "--what", "alerts", "--layer", r"^\(loss\)$")
    assert [json.loads(x)["rule"] for x in loss.stdout.splitlines()] == [a.rule for a in alerts if a.layer == "(loss)"]
    assert [a for a in alerts if a.layer == "(loss)"]
    assert xray(log, "--what", "alerts", "--layer", r"^\(loss\)$", "--kind", "act").stdout == ""


def test_csv_on_stdout_reads_back_with_the_csv_module(rec):
    log, samples, scalars, alerts, notes = rec
    out = xray(log, "--format", "csv", "--what", "samples,scalars,alerts,notes")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    srows = [r for r in rows if r["type"] == "sample"]
    assert len(srows) == len(samples)
    for row, (st, s) in zip(srows, samples):
        want = stats.export_dict(s, st.step, st.rank, st.phase)
        assert (int(row["step"]), row["layer"], row["kind"]) == (st.step, s.layer, s.kind)
        for k in STATS:
            assert same(float(row[k]) if row[k] else None, want[k]), (k, row[k], want[k])
        edges = [float(e) for e in row["hist_edges"].split()]
        counts = [int(c) for c in row["hist_counts"].split()]
        assert counts == s.hist.tolist()
        assert edges == histogram.EDGES[s.hist_lo: s.hist_lo + len(counts) + 1].tolist()
    assert any(r["nan"] != "0" for r in srows)  # the NaN step is in, as numbers
    assert [(int(r["step"]), r["name"], float(r["value"])) for r in rows if r["type"] == "scalar"] == [
        (st, k, pytest.approx(v, nan_ok=True)) for st, k, v in scalars]
    assert [(r["layer"], r["kind"], r["rule"], r["severity"]) for r in rows if r["type"] == "alert"] == [
        (a.layer, a.kind, a.rule, a.severity) for a in alerts]
    assert [(r["event"], json.loads(r["data"])) for r in rows if r["type"] == "note"] == [
        (n.event, dict(n.data)) for n in notes]
    assert all(r["hist_counts"] == "" and r["count"] == "" for r in rows if r["type"] != "sample")


def test_csv_opens_in_pandas_in_one_line(rec, tmp_path):
    pd = pytest.importorskip("pandas")
    log, samples, scalars, *_ = rec
    assert xray(log, "--format", "csv", "-o", str(tmp_path / "o.csv")).returncode == 0
    df = pd.read_csv(tmp_path / "o.csv")
    assert (df.type == "sample").sum() == len(samples) and (df.type == "scalar").sum() == len(scalars)
    assert df[df.type == "sample"]["max"].tolist() == pytest.approx([s.max for _, s in samples], nan_ok=True)


def test_parquet_reads_back_with_pyarrow(rec, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    log, samples, scalars, alerts, notes = rec
    out = xray(log, "--format", "parquet", "-o", str(tmp_path / "o.parquet"), "--what", "samples,scalars,alerts")
    assert out.returncode == 0, out.stderr
    assert out.stderr == f"wrote {len(samples)} samples, {len(scalars)} scalars and {len(alerts)} alerts to {tmp_path / 'o.parquet'}\n"
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    srows = [r for r in rows if r["type"] == "sample"]
    assert len(srows) == len(samples) and len(rows) == len(samples) + len(scalars) + len(alerts)
    for row, (st, s) in zip(srows, samples):
        want = stats.export_dict(s, st.step, st.rank, st.phase)
        assert (row["step"], row["layer"], row["kind"], row["phase"]) == (st.step, s.layer, s.kind, st.phase)
        for k in STATS:
            assert same(row[k], want[k]), (k, row[k], want[k])
        edges = histogram.edges_for(s.hist_lo, len(s.hist))
        assert row["hist_counts"] == s.hist.tolist()
        assert row["hist_edge_lo"] == edges[:-1].tolist() and row["hist_edge_hi"] == edges[1:].tolist()
    got = [(r["step"], r["name"], r["value"]) for r in rows if r["type"] == "scalar"]
    assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in scalars]
    assert all(same(g[2], w[2]) for g, w in zip(got, scalars))
    assert [(r["rule"], r["layer"], r["message"]) for r in rows if r["type"] == "alert"] == [
        (a.rule, a.layer, a.message) for a in alerts]


def test_tensorboard_reads_back_with_event_accumulator(rec, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log, samples, scalars, *_ = rec
    out = xray(log, "--format", "tensorboard", "-o", str(tmp_path / "tb"))
    assert out.returncode == 0, out.stderr
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0, "scalars": 0})
    ea.Reload()
    shown = [(st, s) for st, s in samples if s.hist.any()]  # an all-NaN histogram has nothing to show
    assert out.stderr.startswith(f"wrote {len(shown)} samples and {len(scalars)} scalars to ")
    assert set(ea.Tags()["histograms"]) == {f"{s.kind}/{s.layer}" for _, s in samples}
    for tag in ea.Tags()["histograms"]:
        events = ea.Histograms(tag)
        want = [(st, s) for st, s in shown if f"{s.kind}/{s.layer}" == tag]
        assert [e.step for e in events] == [st.step for st, _ in want]
        for e, (st, s) in zip(events, want):
            h = e.histogram_value
            assert list(h.bucket_limit) == histogram.edges_for(s.hist_lo, len(s.hist)).tolist()  # the real edges
            assert list(h.bucket) == [0] + s.hist.tolist() and h.num == s.hist.sum()
            assert e.wall_time == pytest.approx(st.time)
    for name in {k for _, k, _ in scalars}:
        got = [(e.step, e.value) for e in ea.Scalars(name)]
        want = [(st, v) for st, k, v in scalars if k == name]
        assert [g[0] for g in got] == [w[0] for w in want]
        assert np.allclose([g[1] for g in got], [w[1] for w in want], rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("args,message", [
    (["--format", "xml"], "unknown format 'xml'; supported: jsonl, csv, parquet, tensorboard"),
    (["--what", "samples,weights"], "--what: unknown 'weights'; choose from samples, scalars, alerts, notes"),
    (["--kind", "weight", "--kind", "gradient"], "--kind: unknown 'gradient'; choose from weight, grad, act, update"),
    (["--what", ","], "--what: empty; choose from samples"),
    (["--layer", "h.(0"], "--layer: bad regular expression 'h.(0'"),
    (["--format", "parquet"], "--format parquet needs -o FILE"),
    (["--format", "tensorboard"], "--format tensorboard needs -o DIR"),
    (["--format", "tensorboard", "-o", "/tmp/x", "--what", "alerts"], "--format tensorboard writes samples and scalars only"),
    (["--format", "tensorboard", "-o", "/etc/hostname"], "not a directory"),
])
def test_bad_export_input_is_one_line_and_exit_2(rec, args, message):
    out = xray(rec[0], *args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("fmt,module", [("parquet", "pyarrow"), ("tensorboard", "tensorboard")])
def test_a_missing_optional_package_says_what_to_install(rec, tmp_path, fmt, module):
    fake = tmp_path / "fake" / module
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f'raise ImportError("No module named {module}")\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")]))
    out = xray(rec[0], "--format", fmt, "-o", str(tmp_path / "out"), env=env)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"--format {fmt} needs {module}, which is not installed: pip install {module}" in out.stderr
    assert not (tmp_path / "out").exists()


def test_every_format_exports_without_torch(rec, tmp_path):
    """The viewer side never imports torch: a torch that cannot be imported changes nothing."""
    pytest.importorskip("pyarrow")
    pytest.importorskip("tensorboard")
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os\nos._exit(99)  # importing torch at all, even in a try, fails the export\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")]))
    for fmt, target in (("jsonl", "o.jsonl"), ("csv", "o.csv"), ("parquet", "o.parquet"), ("tensorboard", "tb")):
        out = xray(rec[0], "--format", fmt, "-o", str(tmp_path / target), "--what", "samples,scalars", env=env)
        assert out.returncode == 0 and out.stderr.startswith(f"wrote {len(rec[1])} samples"), (fmt, out.stderr)


def _sample(layer, kind, values):
    v = np.asarray(values, dtype=np.float32)
    lo, counts = histogram.trim(histogram.histogram(v))
    x = v.astype(np.float64)
    return wire.Sample(layer, kind, v.size, float(x.sum()), float((x * x).sum()), float(np.abs(x).sum()),
                       float(x.min()), float(x.max()), 0, int((x == 0).sum()), 0, 0, 0, lo,
                       wire.encode_counts(counts, v.size), v.size)


def test_tensorboard_writes_a_run_per_rank_and_tags_eval_passes(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    msgs = [wire.Hello(wire.PROTOCOL_VERSION, "two", rank=r, world_size=2) for r in (0, 1)]
    for step in (0, 1):
        for r in (0, 1):
            msgs.append(wire.Step(step, r, 100.0 + step, [_sample("fc", "weight", [r + 1.0, -3.0, 0.5])]))
            msgs.append(wire.Scalars(step, r, 100.0 + step, {"loss": 2.0 - step + r}))
    msgs.append(wire.Step(1, 0, 102.0, [_sample("fc", "act", [0.25, 7.0])], phase="eval"))
    log = tmp_path / "two.xray"
    log.write_bytes(wire.MAGIC + b"".join(wire.encode(m) for m in msgs))
    out = xray(str(log), "--format", "tensorboard", "-o", str(tmp_path / "tb"))
    assert out.returncode == 0 and out.stderr.startswith("wrote 5 samples and 4 scalars"), out.stderr
    assert sorted(os.listdir(tmp_path / "tb")) == ["rank0", "rank1"]
    for r in (0, 1):
        ea = EventAccumulator(str(tmp_path / "tb" / f"rank{r}"), size_guidance={"histograms": 0, "scalars": 0})
        ea.Reload()
        assert sorted(ea.Tags()["histograms"]) == (["eval/act/fc", "weight/fc"] if r == 0 else ["weight/fc"])
        assert [(e.step, e.value) for e in ea.Scalars("loss")] == [(0, 2.0 + r), (1, 1.0 + r)]
        h = ea.Histograms("weight/fc")[0].histogram_value
        assert (h.min, h.max, h.num) == (-3.0, r + 1.0, 3)
        s = _sample("fc", "weight", [r + 1.0, -3.0, 0.5])
        assert list(h.bucket_limit) == histogram.edges_for(s.hist_lo, len(s.hist)).tolist()
    assert list(ea.Tags()["histograms"]) and ea.Histograms("weight/fc")[1].step == 1
