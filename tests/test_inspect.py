"""`xray-tui inspect` on tiny GPT-2 and LLaMA directories built from configs (never downloaded)."""

import json
import struct
import xml.etree.ElementTree as ET
import base64
import re

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from probes.spectral import analysis as spectral
from probes.protocol import wire  # noqa: E402
from probes.inspect.loading import token_ids  # noqa: E402
from probes.inspect.options import DEFAULT_TEXT  # noqa: E402
from tui import cli, feed  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=300, bos_token_id=0, eos_token_id=0))
    gpt2.save_pretrained(root / "gpt2")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, max_position_embeddings=64, bos_token_id=0, eos_token_id=0))
    llama.save_pretrained(root / "llama")
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100))
    bert.save_pretrained(root / "bert")
    (root / "empty").mkdir()
    (root / "file.txt").write_text("not a model")
    return root


def run(capsys, *argv):
    rc = cli.main(["inspect", *map(str, argv)])
    return rc, capsys.readouterr().err


def entries(out):
    doc = json.loads((out / "layer_statistics.json").read_text())
    return doc, {(e["layer"], e["kind"]): e for e in doc["entries"]}


def test_gpt2_statistics_match_torch_ground_truth(model_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run(capsys, model_dirs / "gpt2", "--out", out, "--bins", 16)
    assert rc == 0, err
    doc, by = entries(out)
    assert doc["model_type"] == "gpt2" and {k for _, k in by} == {"weight", "grad", "act"}

    # ground truth: the same model, the same tokens, one forward/backward by hand
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs / "gpt2", local_files_only=True)
    acts = {}
    model.transformer.h[1].mlp.act.register_forward_hook(lambda m, i, o: acts.update(gelu=o.detach()))
    ids = token_ids(DEFAULT_TEXT, None, 300, 64)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert doc["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)

    w = model.transformer.h[0].mlp.c_fc.weight
    e = by[("transformer.h.0.mlp.c_fc.weight", "weight")]
    x = w.detach().double().numpy()
    assert e["mean"] == pytest.approx(x.mean(), rel=1e-6) and e["std"] == pytest.approx(x.std(), rel=1e-6)
    assert e["min"] == pytest.approx(x.min()) and e["max"] == pytest.approx(x.max())
    assert e["shape"] == [64, 256] and sum(e["histogram"]["counts"]) == x.size
    assert len(e["histogram"]["counts"]) == 16
    want = spectral.analyze_matrix(w.detach())
    assert e["spectral"]["alpha"] == pytest.approx(want.alpha, rel=1e-9)
    assert e["spectral"]["stable_rank"] == pytest.approx(want.stable_rank, rel=1e-9)

    g = by[("transformer.h.0.mlp.c_fc.weight", "grad")]
    assert g["l2"] == pytest.approx(float(w.grad.norm()), rel=1e-4)
    a = by[("transformer.h.1.mlp.act", "act")]
    assert a["mean"] == pytest.approx(float(acts["gelu"].double().mean()), rel=1e-4)
    assert a["count"] == acts["gelu"].numel()

    # pictures: a histogram per tensor and a heatmap per matrix, valid SVG, PNG inside
    for (layer, kind), entry in by.items():
        assert entry["pictures"][0].endswith(".hist.svg")
        for pic in entry["pictures"]:
            root = ET.parse(out / pic).getroot()
            assert root.tag == f"{SVG}svg"
    heat = (out / "weights" / "transformer.h.0.mlp.c_fc.weight.heatmap.svg").read_text()
    png = base64.b64decode(re.search(r"base64,([^\"]+)", heat).group(1))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (128, 64)  # 64x256 block-averaged to at most 128 a side
    assert (out / "activations").is_dir() and (out / "gradients").is_dir()


def test_llama_and_layer_selection(model_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run(capsys, model_dirs / "llama", "--out", out, "--layers", "1", "--no-gradients")
    assert rc == 0, err
    doc, by = entries(out)
    assert doc["model_type"] == "llama" and doc["layers"] == [1]
    assert by and all(".layers.1." in layer or layer.endswith("layers.1") for layer, _ in by)
    assert {k for _, k in by} == {"weight", "act"}
    assert ("model.layers.1.mlp.down_proj.weight", "weight") in by
    assert by[("model.layers.1.mlp.down_proj.weight", "weight")]["spectral"]["n_evals"] == 64
    assert not (out / "gradients").exists()


def test_recording_replays_in_the_app(model_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run(capsys, model_dirs / "gpt2", "--out", out, "--no-activations")
    assert rc == 0, err
    msgs, torn = wire.read_file(str(out / "inspection.xray"))
    assert torn == 0 and isinstance(msgs[0], wire.Hello) and isinstance(msgs[-1], wire.End)
    kinds = [type(m).__name__ for m in msgs]
    assert kinds.count("Step") == 1 and "Spectral" in kinds
    assert kinds.index("Step") < kinds.index("Spectral")
    _, by = entries(out)
    assert {k for _, k in by} == {"weight", "grad"}
    spec = {m.layer: m for m in msgs if isinstance(m, wire.Spectral)}
    for (layer, kind), e in by.items():
        if "spectral" in e:
            assert spec[layer].alpha == pytest.approx(e["spectral"]["alpha"])


async def test_tui_source_loads_spectral_into_the_app_state(model_dirs, tmp_path, capsys):
    from tui.app import XRayApp

    out = tmp_path / "out"
    rc, err = run(capsys, model_dirs / "gpt2", "--out", out, "--no-activations", "--no-gradients")
    assert rc == 0, err
    app = XRayApp(feed.FileSource(str(out / "inspection.xray")))
    async with app.run_test(size=(120, 40)) as pilot:
        for _ in range(50):
            await pilot.pause(0.05)
            if app.state.spectral and app.state.rows:
                break
        assert "transformer.h.0.mlp.c_fc.weight" in app.state.spectral
        assert len(app.state.rows) > 0


@pytest.mark.parametrize("target, message", [
    ("missing", "no such directory"),
    ("file.txt", "not a directory"),
    ("empty", "no config.json"),
    ("bert", "not a causal language model"),
])
def test_bad_model_directories_are_one_line_errors(model_dirs, tmp_path, capsys, target, message):
    rc, err = run(capsys, model_dirs / target, "--out", tmp_path / "out")
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("xray-tui")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_bad_layers_are_one_line_errors(model_dirs, tmp_path, capsys):
    rc, err = run(capsys, model_dirs / "gpt2", "--out", tmp_path / "out", "--layers", "7")
    assert rc == 2 and "blocks 0..1" in err and "Traceback" not in err


def _ground_truth(model_dir, text=DEFAULT_TEXT):
    """The same model and tokens, one forward/backward by hand; module outputs and inputs kept."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    model.train(False)
    outs, ins = {}, {}

    def keep(name):
        def hook(module, inputs, output):  # returns None: the output is not replaced
            o = output[0] if isinstance(output, tuple) else output
            if isinstance(o, torch.Tensor):
                outs.setdefault(name, o.detach())
            if inputs and isinstance(inputs[0], torch.Tensor):
                ins.setdefault(name, inputs[0].detach())
        return hook

    for name, m in model.named_modules():
        m.register_forward_hook(keep(name))
    ids = token_ids(text, None, model.config.vocab_size, 64)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return model, outs, ins, float(loss.detach())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_quantiles_are_exact_and_within_min_max(model_dirs, tmp_path, capsys, arch):
    out = tmp_path / "out"
    rc, err = run(capsys, model_dirs / arch, "--out", out, "--no-plots")
    assert rc == 0, err
    _, by = entries(out)
    model, outs, ins, _ = _ground_truth(model_dirs / arch)
    params = dict(model.named_parameters())
    names = ("p05", "p25", "median", "p75", "p95")
    for (layer, kind), e in by.items():
        q = [e[n] for n in names]
        assert all(e["min"] <= v <= e["max"] for v in q), (layer, kind, q, e["min"], e["max"])
        assert q == sorted(q) and e["quantiles"] == "exact"
        if kind in ("weight", "grad"):
            p = params[layer]
            a = (p if kind == "weight" else p.grad).detach().double().numpy().ravel()
            # exact: numpy's linear method on the same float32 values (float64 interpolation)
            assert q == pytest.approx(np.quantile(a, [0.05, 0.25, 0.5, 0.75, 0.95]), rel=1e-12, abs=1e-300)
    # the recording's samples: quantiles from the histogram, clamped, within [min, max] too
    from probes.protocol import stats
    msgs, _ = wire.read_file(str(out / "inspection.xray"))
    step = next(m for m in msgs if isinstance(m, wire.Step))
    for smp in step.samples:
        hq = stats.quantiles(smp)
        assert all(smp.min <= v <= smp.max for v in hq.values()), (smp.layer, smp.kind, hq)
    norm = "transformer.h.0.ln_1" if arch == "gpt2" else "model.layers.0.input_layernorm"
    w = by[(f"{norm}.weight", "weight")]  # fresh norm weights: all ones
    assert w["min"] == w["max"] == 1.0 and all(w[n] == 1.0 for n in names)
    if arch == "gpt2":
        b = by[("transformer.h.0.ln_1.bias", "weight")]
        assert all(b[n] == 0.0 for n in names)
        act = by[("transformer.h.1.mlp.act", "act")]
        a = outs["transformer.h.1.mlp.act"].double().numpy().ravel()
        # activations: the same forward, float32 kernels may round differently: tolerance of a few ulps
        assert [act[n] for n in names] == pytest.approx(np.quantile(a, [0.05, 0.25, 0.5, 0.75, 0.95]),
                                                         rel=1e-5, abs=1e-6)


def test_no_plots_no_heatmaps_and_heatmap_max_dim(model_dirs, tmp_path, capsys):
    out = tmp_path / "plain"
    rc, err = run(capsys, model_dirs / "gpt2", "--out", out, "--no-plots", "--no-activations")
    assert rc == 0, err
    _, by = entries(out)
    assert by and all(e["pictures"] == [] and e["histogram"]["counts"] for e in by.values())
    assert not list(out.rglob("*.svg")) and (out / "inspection.xray").is_file()

    out = tmp_path / "hist"
    rc, err = run(capsys, model_dirs / "gpt2", "--out", out, "--no-heatmaps", "--no-activations")
    assert rc == 0, err
    assert list(out.rglob("*.hist.svg")) and not list(out.rglob("*.heatmap.svg"))

    out = tmp_path / "small"
    rc, err = run(capsys, model_dirs / "gpt2", "--out", out, "--heatmap-max-dim", "20", "--no-activations")
    assert rc == 0, err
    for name, shape in [("transformer.h.0.mlp.c_fc.weight", (20, 20)), ("transformer.wpe.weight", (20, 20))]:
        heat = (out / "weights" / f"{name}.heatmap.svg").read_text()
        png = base64.b64decode(re.search(r"base64,([^\"]+)", heat).group(1))
        assert struct.unpack(">II", png[16:24])[::-1] == shape  # PNG: width, height


def test_eps_sets_the_near_zero_threshold(model_dirs, tmp_path, capsys):
    model, _, _, _ = _ground_truth(model_dirs / "llama")
    g = model.model.layers[0].mlp.down_proj.weight.grad.detach().double().numpy()
    for eps in ("0.05", "1e-4"):
        out = tmp_path / eps
        rc, err = run(capsys, model_dirs / "llama", "--out", out, "--no-plots", "--eps", eps)
        assert rc == 0, err
        _, by = entries(out)
        e = by[("model.layers.0.mlp.down_proj.weight", "grad")]
        assert e["near_zero"] == pytest.approx(np.mean(np.abs(g) < float(eps)), abs=0.5 / g.size)
    assert np.mean(np.abs(g) < 0.05) > np.mean(np.abs(g) < 1e-4)  # the switch changes something


@pytest.mark.parametrize("flag, value, message", [
    ("--heatmap-max-dim", "0", "--heatmap-max-dim must be >= 1"),
    ("--heatmap-max-dim", "big", "--heatmap-max-dim must be a whole number"),
    ("--eps", "-1", "--eps must be a finite number > 0"),
    ("--eps", "nan", "--eps must be a finite number > 0"),
    ("--eps", "x", "--eps must be a finite number > 0, got 'x'"),
    ("--bins", "0", "--bins must be >= 1"),
])
def test_bad_switch_values_are_one_line_errors(model_dirs, tmp_path, capsys, flag, value, message):
    rc, err = run(capsys, model_dirs / "gpt2", "--out", tmp_path / "out", flag, value)
    assert rc == 2 and "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines()]
    assert len(lines) == 1 and message in lines[0], err


@pytest.mark.parametrize("arch, extra", [
    ("gpt2", {"transformer.h.1.attn.c_proj.input": ("transformer.h.1.attn.c_proj", "in"),
              "transformer.h.1.attn.c_attn.q": ("transformer.h.1.attn.c_attn", 0),
              "transformer.h.1.attn.c_attn.k": ("transformer.h.1.attn.c_attn", 1),
              "transformer.h.1.attn.c_attn.v": ("transformer.h.1.attn.c_attn", 2)}),
    ("llama", {"model.layers.1.self_attn.o_proj.input": ("model.layers.1.self_attn.o_proj", "in"),
               "model.layers.1.mlp.down_proj.input": ("model.layers.1.mlp.down_proj", "in")}),
])
def test_module_inputs_and_split_qkv_are_activations(model_dirs, tmp_path, capsys, arch, extra):
    out = tmp_path / "out"
    rc, err = run(capsys, model_dirs / arch, "--out", out, "--no-gradients", "--no-weights")
    assert rc == 0, err
    _, by = entries(out)
    model, outs, ins, _ = _ground_truth(model_dirs / arch)
    for layer, (module, which) in extra.items():
        e = by[(layer, "act")]
        x = ins[module] if which == "in" else outs[module].chunk(3, dim=-1)[which]
        a = x.double().numpy().ravel()
        assert e["count"] == a.size and e["shape"] == list(x.shape)
        assert e["mean"] == pytest.approx(a.mean(), rel=1e-4, abs=1e-7)
        assert e["std"] == pytest.approx(a.std(), rel=1e-4)
        assert e["max"] == pytest.approx(a.max(), rel=1e-5) and e["min"] == pytest.approx(a.min(), rel=1e-5)
        assert e["median"] == pytest.approx(np.median(a), rel=1e-4, abs=1e-6)
        assert (out / "activations" / f"{layer}.hist.svg").is_file()
    if arch == "llama":  # the SwiGLU product: act(gate(x)) * up(x), checked against its own formula
        mlp = model.model.layers[1].mlp
        h = ins["model.layers.1.mlp.gate_proj"]
        swiglu = (mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)).detach()
        assert torch.allclose(swiglu, ins["model.layers.1.mlp.down_proj"], rtol=1e-5, atol=1e-7)
    # the recording carries them too
    msgs, _ = wire.read_file(str(out / "inspection.xray"))
    step = next(m for m in msgs if isinstance(m, wire.Step))
    assert set(extra) <= {s.layer for s in step.samples if s.kind == "act"}


def _png_rgb(uri_svg_text, index=0):
    """The RGB pixels of the ``index``-th PNG embedded in an SVG (our encoder: filter 0 rows)."""
    import zlib
    png = base64.b64decode(re.findall(r"base64,([^\"]+)", uri_svg_text)[index])
    w, h = struct.unpack(">II", png[16:24])
    pos, data = 8, b""
    while pos < len(png):
        n = struct.unpack(">I", png[pos:pos + 4])[0]
        if png[pos + 4:pos + 8] == b"IDAT":
            data += png[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(data), dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert not raw[:, 0].any()
    return raw[:, 1:].reshape(h, w, 3)


def _maxpool_numpy(x, oh, ow):
    """Largest-|x| element (sign kept) of each adaptive-pooling block: rows floor(i*H/oh)..ceil((i+1)*H/oh)."""
    H, W = x.shape
    out = np.empty((oh, ow))
    for i in range(oh):
        r0, r1 = (i * H) // oh, -((-(i + 1) * H) // oh)
        for j in range(ow):
            c0, c1 = (j * W) // ow, -((-(j + 1) * W) // ow)
            b = x[r0:r1, c0:c1]
            out[i, j] = b.flat[np.argmax(np.abs(b))]
    return out


def test_histogram_svg_has_axes_counts_and_a_summary(model_dirs, tmp_path, capsys):
    from probes.inspect.pictures import svg_histogram

    out = tmp_path / "out"
    rc, err = run(capsys, model_dirs / "gpt2", "--out", out, "--bins", 24, "--no-activations", "--no-gradients")
    assert rc == 0, err
    _, by = entries(out)
    name = "transformer.h.0.mlp.c_fc.weight"
    model, _, _, _ = _ground_truth(model_dirs / "gpt2")
    a = model.transformer.h[0].mlp.c_fc.weight.detach().numpy().ravel()
    want_counts, _ = np.histogram(a, bins=24, range=(float(a.min()), float(a.max())))
    root = ET.parse(out / "weights" / f"{name}.hist.svg").getroot()
    axes = {el.get("data-axis") for el in root.iter(f"{SVG}line") if el.get("class") == "axis"}
    assert axes == {"x", "y"}
    labels = {el.get("class"): el.text for el in root.iter(f"{SVG}text")}
    assert labels["ylabel"] == "count per bin" and labels["xlabel"].startswith("value")
    bars = [el for el in root.iter(f"{SVG}rect") if el.get("class") == "bar"]
    counts = [int(b.get("data-count")) for b in bars]
    assert counts == want_counts.tolist() == by[(name, "weight")]["histogram"]["counts"]
    # linear heights: a bar's top sits where the y axis says its count is
    ticks = sorted((float(t.get("data-value")), float(t.get("y")) - 4) for t in root.iter(f"{SVG}text")
                   if t.get("class") == "ytick")
    (c0, y0), (c1, y1) = ticks[0], ticks[-1]
    assert c0 == 0 and c1 >= max(counts) and len(ticks) >= 3
    for b, c in zip(bars, counts):
        top = float(b.get("y"))
        assert top == pytest.approx(y0 + (y1 - y0) * c / c1, abs=0.02)  # 2-decimal coordinates
    # bars span the x axis from min to max
    xs = [(float(b.get("x")), float(b.get("x")) + float(b.get("width")) + 0.5) for b in bars]
    xaxis = next(el for el in root.iter(f"{SVG}line") if el.get("data-axis") == "x")
    assert xs[0][0] == pytest.approx(float(xaxis.get("x1")), abs=0.01)
    assert xs[-1][1] == pytest.approx(float(xaxis.get("x2")), abs=0.02)
    box = {t.get("data-name"): float(t.get("data-value")) for t in root.iter(f"{SVG}text") if t.get("class") == "stat"}
    x64 = a.astype(np.float64)
    assert box["mean"] == pytest.approx(x64.mean(), rel=1e-6, abs=1e-9)
    assert box["std"] == pytest.approx(x64.std(), rel=1e-6)
    assert box["min"] == a.min() and box["max"] == a.max()

    # log option: heights proportional to log10(1 + count), the axis says so
    edges = np.linspace(0, 1, 4)
    svg = ET.fromstring(svg_histogram(edges, np.array([0, 1, 1000]), "t", scale="log"))
    assert next(t.text for t in svg.iter(f"{SVG}text") if t.get("class") == "ylabel").endswith("(log scale)")
    hs = [float(r.get("height")) for r in svg.iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert hs[0] == 0 and hs[1] / hs[2] == pytest.approx(np.log10(2) / np.log10(1001), abs=0.01)
    svg = ET.fromstring(svg_histogram(edges, np.array([0, 1, 1000]), "t"))  # linear: one value is 0.1% tall
    hs = [float(r.get("height")) for r in svg.iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert hs[1] / hs[2] == pytest.approx(1 / 1000, abs=0.01 / hs[2])


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_heatmap_pools_by_largest_magnitude_and_has_a_true_colour_bar(model_dirs, tmp_path, capsys, pool):
    from probes.inspect.pictures import colours

    out = tmp_path / "out"
    rc, err = run(capsys, model_dirs / "gpt2", "--out", out, "--heatmap-max-dim", "20", "--heatmap-pool", pool,
                  "--no-activations", "--no-gradients")
    assert rc == 0, err
    model, _, _, _ = _ground_truth(model_dirs / "gpt2")
    x = model.transformer.h[0].mlp.c_fc.weight.detach().numpy()  # 64 x 256
    text = (out / "weights" / "transformer.h.0.mlp.c_fc.weight.heatmap.svg").read_text()
    root = ET.fromstring(text)
    A = float(np.abs(x).max())
    if pool == "max":
        want = _maxpool_numpy(x.astype(np.float64), 20, 20)
        assert np.abs(want).max() == A  # the outlier survives pooling
    else:
        want = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x)[None, None], (20, 20))[0, 0].double().numpy()
        assert np.abs(want).max() < A
    assert np.array_equal(_png_rgb(text, 0), colours(want, A))  # colours scaled to the true |x|max
    ticks = sorted(float(t.get("data-value")) for t in root.iter(f"{SVG}text") if t.get("class") == "cbar-tick")
    assert ticks == [-A, 0.0, A]
    marks = {m.get("data-name"): float(m.get("data-value")) for m in root.iter(f"{SVG}line")
             if m.get("class") == "cbar-mark"}
    assert marks == {"min": float(x.min()), "max": float(x.max())}
    assert {el.get("data-axis") for el in root.iter(f"{SVG}line") if el.get("class") == "axis"} == {"x", "y"}
    xt = sorted(int(t.get("data-value")) for t in root.iter(f"{SVG}text") if t.get("class") == "xtick")
    assert xt == [0, 255]
    bar = _png_rgb(text, 1)  # the colour bar: full red at the top, full blue at the bottom
    assert np.array_equal(bar[0, 0], colours(np.array([[A]]), A)[0, 0])
    assert np.array_equal(bar[-1, 0], colours(np.array([[-A]]), A)[0, 0])


def test_downsample_max_keeps_an_outlier_and_its_sign():
    from probes.inspect.pictures import downsample

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 77, generator=g) * 0.02
    x[123, 45] = -0.5
    got = downsample(x, 16, "max")
    assert np.array_equal(got, _maxpool_numpy(x.double().numpy(), 16, 16))
    assert got.min() == pytest.approx(-0.5) and downsample(x, 16, "mean").min() > -0.1


def test_fallbacks_are_said_on_stderr_and_in_the_report(model_dirs, tmp_path, capsys):
    out = tmp_path / "bytes"
    rc, err = run(capsys, model_dirs / "gpt2", "--out", out, "--no-plots", "--text", "a")
    assert rc == 0, err
    doc, _ = entries(out)
    notes = [ln for ln in err.splitlines() if ln.startswith("xray-tui: note: ")]
    assert [ln.removeprefix("xray-tui: note: ") for ln in notes] == doc["notes"] and len(notes) == 3
    assert "no tokenizer" in notes[0] and "UTF-8 bytes" in notes[1] and "EOS (id 0) appended" in notes[2]
    assert doc["token_ids"] == [ord("a"), 0] and doc["tokens"] == 2

    long_text = "x" * 100  # 100 bytes, 64 positions
    rc, err = run(capsys, model_dirs / "gpt2", "--out", tmp_path / "long", "--no-plots", "--text", long_text)
    assert rc == 0 and "cut to the model's 64 positions" in err


def test_a_one_token_text_gets_the_tokenizers_eos(model_dirs, tmp_path, capsys):
    import shutil
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path / "gpt2tok"
    shutil.copytree(model_dirs / "gpt2", d)
    tok = Tokenizer(models.WordLevel({"<eos>": 7, "hello": 1, "world": 2, "<unk>": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(d)
    out = tmp_path / "out"
    rc, err = run(capsys, d, "--out", out, "--no-plots", "--text", "hello")
    assert rc == 0, err
    doc, _ = entries(out)
    assert doc["token_ids"] == [1, 7] and doc["notes"] == [
        "the text gives one token: EOS (id 7) appended, so the loss has a target"]
    rc, err = run(capsys, d, "--out", tmp_path / "two", "--no-plots", "--text", "hello world")
    assert rc == 0 and "note" not in err  # nothing done behind the user's back: nothing said
    assert entries(tmp_path / "two")[0]["token_ids"] == [1, 2]


def _changed_gpt2(model_dirs, root):
    """GPT-2 B: A with one matrix moved by a known delta, one outlier in it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs / "gpt2", local_files_only=True)
    g = torch.Generator().manual_seed(5)
    w = model.transformer.h[0].mlp.c_fc.weight
    delta = 0.01 * torch.randn(w.shape, generator=g)
    delta[3, 7] = 0.3
    with torch.no_grad():
        w.add_(delta)
    model.save_pretrained(root / "gpt2b")
    return root / "gpt2b"


def test_compare_two_checkpoints(model_dirs, tmp_path, capsys):
    from probes.inspect.pictures import colours

    b_dir = _changed_gpt2(model_dirs, tmp_path)
    out = tmp_path / "cmp"
    rc, err = run(capsys, model_dirs / "gpt2", b_dir, "--out", out, "--bins", 32, "--heatmap-max-dim", 16)
    assert rc == 0, err
    doc = json.loads((out / "layer_comparison.json").read_text())
    by = {e["layer"]: e for e in doc["entries"]}
    ma = transformers.AutoModelForCausalLM.from_pretrained(model_dirs / "gpt2", local_files_only=True)
    mb = transformers.AutoModelForCausalLM.from_pretrained(b_dir, local_files_only=True)
    pb = dict(mb.named_parameters())
    assert set(by) == {n for n, _ in ma.named_parameters()} and doc["b_kind"] == "model"
    for n, p in ma.named_parameters():
        wa, wb = p.detach().double().numpy(), pb[n].detach().double().numpy()
        na, nd = np.linalg.norm(wa), np.linalg.norm(wb - wa)
        want = nd / na if na else 0.0
        assert by[n]["rel_change"] == pytest.approx(want, rel=1e-12, abs=1e-300), n
    name = "transformer.h.0.mlp.c_fc.weight"
    e = by[name]
    wa = ma.transformer.h[0].mlp.c_fc.weight.detach().numpy()
    wb = mb.transformer.h[0].mlp.c_fc.weight.detach().numpy()
    assert e["rel_change"] > 0.1 and e["delta_absmax"] == pytest.approx(np.abs(wb.astype(np.float64) - wa).max())
    assert e["b"]["max"] == wb.max() and e["a"]["p95"] == pytest.approx(np.quantile(wa.astype(np.float64), 0.95))
    # both histograms overlaid, on common edges
    edges = np.array(e["histogram"]["edges"])
    assert edges[0] == min(wa.min(), wb.min()) and edges[-1] == max(wa.max(), wb.max())
    root = ET.parse(out / e["pictures"][0]).getroot()
    for series, w in (("a", wa), ("b", wb)):
        counts = [int(r.get("data-count")) for r in root.iter(f"{SVG}rect")
                  if r.get("class") == "bar" and r.get("data-series") == series]
        assert counts == np.histogram(w, bins=edges)[0].tolist() == e["histogram"][series]
        stat = {t.get("data-name"): float(t.get("data-value")) for t in root.iter(f"{SVG}text")
                if t.get("class") == "stat" and t.get("data-series") == series}
        assert stat["min"] == w.min() and stat["max"] == w.max()
    assert {el.get("data-axis") for el in root.iter(f"{SVG}line") if el.get("class") == "axis"} == {"x", "y"}
    # the heatmap of the difference: max-|x| pooled, colour bar ends at the true |ΔW|max
    d = wb.astype(np.float64) - wa.astype(np.float64)
    heat = (out / e["pictures"][1]).read_text()
    d32 = (torch.from_numpy(wb).double() - torch.from_numpy(wa).double()).float().double().numpy()
    A = float(np.abs(d).max())
    assert np.array_equal(_png_rgb(heat, 0), colours(_maxpool_numpy(d32, 16, 16), A))
    ticks = sorted(float(t.get("data-value")) for t in ET.fromstring(heat).iter(f"{SVG}text")
                   if t.get("class") == "cbar-tick")
    assert ticks == pytest.approx([-A, 0.0, A], rel=1e-12)
    # the spectral metrics of both
    for side, m in (("spectral_a", ma), ("spectral_b", mb)):
        want = spectral.analyze_matrix(m.transformer.h[0].mlp.c_fc.weight.detach())
        assert e[side]["alpha"] == pytest.approx(want.alpha, rel=1e-9)
    assert e["spectral_a"]["stable_rank"] != e["spectral_b"]["stable_rank"]
    # the recording: A at step 0, B at step 1, each with its spectral metrics
    msgs, torn = wire.read_file(str(out / "comparison.xray"))
    assert torn == 0
    steps = [m for m in msgs if isinstance(m, wire.Step)]
    assert [s.step for s in steps] == [0, 1]
    for s, w in zip(steps, (wa, wb)):
        smp = next(x for x in s.samples if x.layer == name and x.kind == "weight")
        assert smp.max == w.max()
    assert {m.step for m in msgs if isinstance(m, wire.Spectral) and m.layer == name} == {0, 1}


def test_compare_a_lora_adapter_as_its_merged_delta(model_dirs, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dirs / "llama", local_files_only=True)
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(base, cfg)
    pm.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "cmp"
    rc, err = run(capsys, model_dirs / "llama", tmp_path / "adapter", "--out", out, "--no-plots")
    assert rc == 0, err
    doc = json.loads((out / "layer_comparison.json").read_text())
    assert doc["b_kind"] == "lora-adapter" and "LoRA adapter" in doc["notes"][0] and "note: " in err
    by = {e["layer"]: e for e in doc["entries"]}
    layer = pm.base_model.model.model.layers[1].self_attn.q_proj
    a = layer.lora_A["default"].weight.detach().double().numpy()
    b = layer.lora_B["default"].weight.detach().double().numpy()
    w = layer.base_layer.weight.detach().double().numpy()
    want = np.linalg.norm(layer.scaling["default"] * b @ a) / np.linalg.norm(w)
    # merged in float32: W + delta rounded, so the relative change is exact to float32 rounding of W
    e = by["model.layers.1.self_attn.q_proj.weight"]
    assert e["rel_change"] == pytest.approx(want, rel=1e-4)
    assert by["model.layers.1.self_attn.k_proj.weight"]["rel_change"] == 0.0
    assert by["model.layers.0.self_attn.v_proj.weight"]["rel_change"] > 0


def test_compare_errors_are_one_line(model_dirs, tmp_path, capsys):
    rc, err = run(capsys, model_dirs / "gpt2", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert rc == 2 and "no such directory" in err and "Traceback" not in err
    rc, err = run(capsys, model_dirs / "gpt2", model_dirs / "gpt2", "--out", tmp_path / "o", "--no-weights")
    assert rc == 2 and "compares weights" in err


async def test_comparison_recording_opens_in_the_app(model_dirs, tmp_path, capsys):
    from tui.app import XRayApp

    b_dir = _changed_gpt2(model_dirs, tmp_path)
    out = tmp_path / "cmp"
    rc, err = run(capsys, model_dirs / "gpt2", b_dir, "--out", out, "--no-plots")
    assert rc == 0, err
    app = XRayApp(feed.FileSource(str(out / "comparison.xray")))
    async with app.run_test(size=(120, 40)) as pilot:
        for _ in range(50):
            await pilot.pause(0.05)
            if app.state.spectral and app.state.step == 1:
                break
        assert app.state.step == 1 and "transformer.h.0.mlp.c_fc.weight" in app.state.spectral
        assert app.state.spectral["transformer.h.0.mlp.c_fc.weight"].step == 1  # B's metrics, the last step


def test_activation_heatmaps_name_tokens_and_units(model_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run(capsys, model_dirs / "gpt2", "--out", out, "--no-weights", "--no-gradients")
    assert rc == 0, err
    root = ET.parse(out / "activations" / "transformer.h.1.mlp.act.heatmap.svg").getroot()
    labels = {t.get("class"): t.text for t in root.iter(f"{SVG}text")}
    assert labels["ylabel"] == "token" and labels["xlabel"] == "unit"
    ticks = sorted(int(t.get("data-value")) for t in root.iter(f"{SVG}text") if t.get("class") == "xtick")
    assert ticks == [0, 255]  # the MLP's 4 x 64 units


def test_compare_with_layer_selection(model_dirs, tmp_path, capsys):
    b_dir = _changed_gpt2(model_dirs, tmp_path)
    out = tmp_path / "cmp"
    rc, err = run(capsys, model_dirs / "gpt2", b_dir, "--out", out, "--layers", "0", "--no-plots")
    assert rc == 0, err
    doc = json.loads((out / "layer_comparison.json").read_text())
    layers = [e["layer"] for e in doc["entries"]]
    assert layers and all(n.startswith("transformer.h.0.") for n in layers)
    assert "transformer.h.0.mlp.c_fc.weight" in layers and doc["unmatched"] == []


def test_a_sampled_picture_histogram_says_so_and_keeps_the_true_range(monkeypatch):
    from probes.inspect import checkpoint as ins, pictures

    monkeypatch.setattr(ins, "PICTURE_SAMPLE", 1000)
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    x[1] = 40.0  # not in the strided sample (every 11th element)
    edges, counts, every = ins.linear_histogram(x, 8, float(x.min()), float(x.max()))
    assert every == 11 and edges[-1] == 40.0 and counts.sum() == len(range(0, 10_000, 11))
    assert np.array_equal(counts, np.histogram(x.numpy()[::11], bins=8, range=(float(x.min()), 40.0))[0])
    root = ET.fromstring(pictures.svg_histogram(edges, counts, "t", every=every))
    assert next(t.text for t in root.iter(f"{SVG}text") if t.get("class") == "ylabel") == \
        "count per bin, 1 in 11 elements"
