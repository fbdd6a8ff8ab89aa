"""Spectral metrics against weightwatcher, numpy and known power laws; the live monitor."""

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

import probes
from probes.rules import spectral as spectral_rule
from probes.spectral import analysis as spectral
from probes.spectral.matrices import analyze_model, targets
from probes.spectral.monitor import SpectralMonitor
from probes.protocol import wire

METRICS = ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank")
#: Documented tolerance (docs/spectral.md): relative, per metric. The eigenvalues
#: differ from weightwatcher's float64 SVD by ~1e-7 relative (float32 Gram).
RTOL = 1e-5


def _matrices():
    rng = np.random.default_rng(0)
    return {
        "gauss": rng.standard_normal((300, 120)),
        "student_t": rng.standard_t(2.5, size=(400, 200)),
        "pareto": rng.pareto(1.5, size=(256, 128)) * rng.choice([-1, 1], size=(256, 128)),
        "wide": rng.standard_t(4, size=(96, 333)),
        "small_n": rng.standard_normal((40, 12)),  # 12 eigenvalues: weightwatcher's small-N fit
    }


def _linear_model(mats):
    model = nn.Sequential(*[nn.Linear(v.shape[1], v.shape[0], bias=False) for v in mats.values()])
    for lin, v in zip(model, mats.values()):
        lin.weight.data = torch.tensor(v, dtype=torch.float32)
    return model


def _ww_details(model):
    ww = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    return ww.WeightWatcher(model=model).analyze()


def _param_names(model, details) -> list[str]:
    """Our name (from named_parameters) of each weight weightwatcher analysed (by module).

    Tied weights (GPT-2's lm_head and wte) are one parameter to us, two layers to it.
    """
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(model.get_submodule(n).weight)] for n in details["longname"]]


def _compare(details, ours: dict, model):
    names = _param_names(model, details)
    assert set(names) == set(ours)
    for name, (_, row) in zip(names, details.iterrows()):
        m = ours[name]
        for k in METRICS:
            assert getattr(m, k) == pytest.approx(float(row[k]), rel=RTOL), (row["longname"], k)
        assert m.xmin == pytest.approx(float(row["xmin"]), rel=RTOL)
        # the trust gate's inputs are weightwatcher's own: num_pl_spikes and sigma
        assert m.n_tail == int(row["num_pl_spikes"]), row["longname"]
        assert m.sigma == pytest.approx(float(row["sigma"]), rel=RTOL)


def test_matches_weightwatcher_on_random_matrices():
    mats = _matrices()
    model = _linear_model(mats)
    details = _ww_details(model)
    ours = {m.name: m for m in analyze_model(model)}
    _compare(details, ours, model)
    # the matrices span the bands: heavy tails below 6, the Gaussian above
    assert ours["2.weight"].alpha < 2.5 and ours["0.weight"].alpha > 6


def test_matches_weightwatcher_on_conv2d():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 24, (1, 2)))
    details = _ww_details(model)
    ours = {m.name: m for m in analyze_model(model)}
    _compare(details, ours, model)
    assert ours["0.weight"].method == "conv-slices" and ours["0.weight"].n_evals == 16 * 9


def test_matches_weightwatcher_on_gpt2_shaped_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=96, n_head=4, n_positions=128, vocab_size=500)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # trained-like heavy tails in one block, the random init elsewhere
        w = model.transformer.h[0].mlp.c_fc.weight
        w.copy_(0.02 * torch.distributions.StudentT(2.0).sample(w.shape))
    details = _ww_details(model)
    ours = {m.name: m for m in analyze_model(model)}
    assert len(details) == len(ours) + 1  # lm_head is tied to wte
    _compare(details, ours, model)


def test_fit_recovers_a_known_power_law():
    rng = np.random.default_rng(1)
    for alpha in (2.0, 3.0, 4.5):
        x = 0.5 * rng.random(4000) ** (-1.0 / (alpha - 1.0))  # Pareto with pdf ~ x^-alpha above 0.5
        fit = spectral.fit_power_law(x)
        assert fit.alpha == pytest.approx(alpha, abs=0.15)
        assert fit.xmin >= 0.5


def test_fit_is_the_least_ks_candidate_by_brute_force():
    rng = np.random.default_rng(2)
    data = np.sort(rng.lognormal(0, 1, 300))
    fit = spectral.fit_power_law(data)
    best = (np.inf, None)
    for i in range(len(data) - 1):
        tail = data[i:]
        n = len(tail)
        a = 1 + n / np.sum(np.log(tail / tail[0]))
        d = np.max(np.abs(1 - (tail / tail[0]) ** (1 - a) - np.arange(n) / n))
        if d < best[0]:
            best = (d, a)
    assert fit.ks == pytest.approx(best[0], rel=1e-9)
    assert fit.alpha == pytest.approx(best[1], rel=1e-9)


def test_eigenvalues_and_norms_against_numpy():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((20000, 48)).astype(np.float32)  # a tall, embedding-like matrix
    ref = np.sort(np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2)
    e = spectral.eigenvalues(torch.from_numpy(w))
    np.testing.assert_allclose(e.evals, ref, rtol=1e-5)
    m = spectral.metrics_of(e)
    assert m.log_norm == pytest.approx(math.log10((w.astype(np.float64) ** 2).sum()), rel=1e-6)
    assert m.stable_rank == pytest.approx(ref.sum() / ref.max(), rel=1e-5)
    assert sum(m.esd) == np.sum(ref > spectral.EVALS_THRESH)


def test_lowrank_path_keeps_the_top_of_the_spectrum_and_exact_norms():
    torch.manual_seed(4)
    w = 0.05 * torch.distributions.StudentT(2.5).sample((600, 300))
    exact = spectral.analyze_matrix(w)
    low = spectral.analyze_matrix(w, max_dim=200)
    assert low.method == "lowrank" and low.n_evals == 200
    assert low.log_norm == pytest.approx(exact.log_norm, rel=1e-6)
    assert low.stable_rank == pytest.approx(exact.stable_rank, rel=1e-4)
    assert low.log_spectral_norm == pytest.approx(exact.log_spectral_norm, rel=1e-3)
    assert low.alpha == pytest.approx(exact.alpha, rel=0.05)


class _LoraLinear(nn.Module):
    """The shape of a peft LoRA layer: base_layer, lora_A/lora_B ModuleDicts, scaling."""

    def __init__(self, n_in, n_out, r):
        super().__init__()
        self.base_layer = nn.Linear(n_in, n_out)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(n_in, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, n_out, bias=False)})
        self.scaling = {"default": 2.0}
        nn.init.normal_(self.lora_B["default"].weight)


def test_lora_metrics_are_those_of_the_merged_weight():
    torch.manual_seed(5)
    model = nn.Sequential(_LoraLinear(64, 80, 4))
    tg, _ = targets(model)
    assert [t.name for t in tg] == ["0.base_layer.weight"]  # A and B are not analysed alone
    layer = model[0]
    merged = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    got = analyze_model(model)[0]
    want = spectral.analyze_matrix(merged.detach())
    base = spectral.analyze_matrix(layer.base_layer.weight.detach())
    for k in METRICS:
        assert getattr(got, k) == pytest.approx(getattr(want, k), rel=1e-6)
    assert got.log_spectral_norm != pytest.approx(base.log_spectral_norm, rel=1e-2)


def test_small_matrices_are_listed_as_skipped_not_dropped():
    model = nn.Sequential(nn.Linear(4, 100), nn.Linear(100, 50))
    tg, skipped = targets(model)
    assert [t.name for t in tg] == ["1.weight"]
    assert skipped and skipped[0][0] == "0.weight" and "min_evals" in skipped[0][1]


class Fit:
    """What the spectral rule reads of a fit (a Metrics or a wire.Spectral has these too)."""

    def __init__(self, alpha, n_tail, n_evals=768, name="w", stable_rank=None):
        self.alpha, self.n_tail, self.n_evals, self.name = alpha, n_tail, n_evals, name
        if stable_rank is not None:  # without it: an older probe's message, judged on alpha alone
            self.stable_rank = stable_rank


def test_alerts_use_weightwatchers_bands_and_recover():
    rules = spectral_rule.SpectralAlerts()
    m = Fit(9.0, 400)  # sigma 0.4: 3 above 6 is 7.5 sigma
    a = rules.evaluate(m, 10, 0)
    assert a.rule == "spectral" and a.severity == "warning" and a.threshold == 6.0 and "under-trained" in a.message
    assert "tail of 400" in a.message
    assert rules.evaluate(m, 20, 0) is None  # once while it lasts
    custom = spectral_rule.SpectralAlerts(low=2.0, high=100.0)
    assert custom.evaluate(m, 10, 0) is None
    m.alpha = 3.0
    assert rules.evaluate(m, 30, 0).severity == "info"
    low = rules.evaluate(Fit(1.4, 200, name="v"), 40, 0)  # sigma 0.028
    assert low.severity == "warning" and low.threshold == 2.0 and "over-trained" in low.message


def test_a_heavy_tailed_matrix_fires_over_trained():
    torch.manual_seed(1)
    m = spectral.analyze_matrix(torch.distributions.StudentT(1.0).sample((512, 256)), "t")
    assert m.alpha < 2 and m.n_tail >= spectral_rule.MIN_TAIL and spectral_rule.untrusted(m) == ""
    assert spectral_rule.SpectralAlerts().evaluate(m, 1, 0).severity == "warning"


@pytest.mark.parametrize("fit, why", [
    (Fit(1.6, 12, 32), "tail of 12 eigenvalues < 50 (of 32)"),  # the small-model false alarm
    (Fit(7.0, 8, 128), "tail of 8 eigenvalues"),  # a random matrix's top handful
    (Fit(1.92, 400), "within 2 standard errors"),  # sigma 0.046: 0.08 below 2 is 1.7 sigma
    (Fit(6.3, 100), "within 2 standard errors"),  # sigma 0.53: 0.3 above 6 is noise
    (Fit(None, 0), "no power-law fit"),
])
def test_untrusted_fits_neither_fire_nor_recover(fit, why):
    assert why in spectral_rule.untrusted(fit)
    rules = spectral_rule.SpectralAlerts()
    assert rules.evaluate(fit, 1, 0) is None
    rules.active.add("w")  # an alert raised by an earlier, trusted fit...
    assert rules.evaluate(fit, 2, 0) is None  # ...is not cleared by an untrusted one
    assert "w" in rules.active


def test_the_gate_is_the_tail_and_the_standard_error_not_a_moved_band():
    # the band edges stay WeightWatcher's 2 and 6: a well-measured alpha just past them fires
    assert spectral_rule.SpectralAlerts().evaluate(Fit(1.85, 2000), 1, 0) is not None  # sigma 0.019
    assert spectral_rule.SpectralAlerts().evaluate(Fit(6.3, 5000), 1, 0) is not None  # sigma 0.075
    # the same alphas from tails below MIN_TAIL do not
    assert spectral_rule.SpectralAlerts().evaluate(Fit(1.85, spectral_rule.MIN_TAIL - 1), 1, 0) is None
    # and the thresholds are the rule's own arguments
    lax = spectral_rule.SpectralAlerts(min_tail=8, sigmas=0.0)
    assert lax.evaluate(Fit(1.6, 12, 32), 1, 0) is not None


@pytest.mark.parametrize("fit", [
    # the healthy runs of issue 12 (docs/spectral.md): trusted fits below 2, spectra not collapsed
    Fit(1.41, 88, 128, stable_rank=12.5),  # the demo's h.3.attn.c_proj at step 1,500
    Fit(1.54, 44 + 60, 64, stable_rank=2.8),  # (its wpe, the lowest stable rank seen; tail raised to trust it)
    Fit(1.71, 62, 64, stable_rank=3.0),
])
def test_healthy_heavy_tails_without_a_collapsed_spectrum_do_not_fire(fit):
    assert spectral_rule.untrusted(fit) == ""  # trusted: it is the stable-rank condition that holds it back
    rules = spectral_rule.SpectralAlerts()
    assert rules.evaluate(fit, 1, 0) is None
    assert spectral_rule.SpectralAlerts(max_stable_rank=100.0).evaluate(fit, 1, 0) is not None  # alpha alone would


def test_a_collapsed_heavy_tailed_spectrum_fires_and_says_its_stable_rank():
    a = spectral_rule.SpectralAlerts().evaluate(Fit(1.40, 141, 256, stable_rank=1.25), 1, 0)
    assert a is not None and "stable rank 1.2" in a.message and "over-trained" in a.message
    # the under-trained side is not gated by it
    assert spectral_rule.SpectralAlerts().evaluate(Fit(9.0, 400, stable_rank=50.0), 1, 0) is not None


def test_spectral_messages_carry_the_tail_sigma_and_why_untrusted():
    torch.manual_seed(2)
    m = spectral.analyze_matrix(torch.randn(64, 32), "small")
    why = spectral_rule.untrusted(m)
    assert why.startswith(f"tail of {m.n_tail} eigenvalues")
    msg = wire.decode(wire.encode(m.to_wire(5, 0, why))[4:])
    assert (msg.n_tail, msg.untrusted) == (m.n_tail, why)
    assert msg.sigma == pytest.approx((m.alpha - 1) / math.sqrt(m.n_tail))
    d = m.as_dict()
    assert d["untrusted"] == why and d["sigma"] == msg.sigma
    # a Spectral from an older probe (no tail fields) still decodes, trusted by default
    import msgspec

    old = msgspec.msgpack.encode({"type": "spectral", "step": 1, "rank": 0, "layer": "x", "alpha": 1.5,
                                  "alpha_weighted": 1.0, "log_norm": 0.0, "log_spectral_norm": 0.0,
                                  "stable_rank": 1.0, "n_evals": 32})
    got = wire.decode(old)
    assert (got.n_tail, got.sigma, got.untrusted) == (0, None, "")


def test_the_detail_screen_says_an_alpha_is_not_trusted():
    from tui.detail import spectral_text
    from tui.state import RunState

    state = RunState()
    state.ingest(wire.Hello(version=wire.PROTOCOL_VERSION, run="r", layers=[wire.LayerInfo("lin", params=["weight"])]))
    fit = wire.Spectral(step=500, rank=0, layer="lin.weight", alpha=1.6, alpha_weighted=1.0, log_norm=0.0,
                        log_spectral_norm=0.0, stable_rank=3.0, n_evals=32, n_tail=12, sigma=0.17,
                        untrusted="tail of 12 eigenvalues < 50 [of 32]")
    state.ingest(fit)
    text = spectral_text(state, state.rows[0])
    assert "alpha 1.6" in text and "n_tail 12" in text
    assert "alpha not trusted" in text and r"\[of 32]" in text  # the reason is escaped, not markup


def test_monitor_sends_spectral_messages_and_alerts_without_stalling(tmp_path):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 16))
    with torch.no_grad():  # a Cauchy-tailed layer (alpha ~1.4, a long tail) next to a 16-eigenvalue one
        model[0].weight.copy_(torch.distributions.StudentT(1.0).sample((512, 256)))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put: exact ground truth
    log = tmp_path / "run.xray"
    xr = probes.attach(model, opt, every=1, serve=False, log=str(log), spectral_every=3)
    x = torch.randn(8, 256)
    for _ in range(4):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert xr.spectral.wait_pass(1, timeout=60)
    xr.close()
    msgs, torn = wire.read_file(str(log))
    spec = {m.layer: m for m in msgs if isinstance(m, wire.Spectral)}
    assert set(spec) == {"0.weight", "2.weight"}
    for name, p in (("0.weight", model[0].weight), ("2.weight", model[2].weight)):
        want = spectral.analyze_matrix(p.detach())
        assert spec[name].alpha == pytest.approx(want.alpha, rel=1e-9)
        assert spec[name].stable_rank == pytest.approx(want.stable_rank, rel=1e-9)
        assert spec[name].step >= 3
        # the heatmap grid: RMS of each block of W, in float16
        rows, cols = min(64, p.shape[0]), min(128, p.shape[1])
        blocks = p.detach().double().numpy().reshape(rows, p.shape[0] // rows, cols, p.shape[1] // cols)
        want_heat = np.minimum(np.sqrt((blocks**2).mean(axis=(1, 3))), 65504.0)  # float16's largest
        assert spec[name].heat_shape == [rows, cols]
        assert np.allclose(spec[name].heat_matrix(), want_heat, rtol=2e-3, atol=1e-6)
    alerts = [m for m in msgs if isinstance(m, wire.Alert) and m.rule == "spectral"]
    assert [a.layer for a in alerts] == ["0.weight"] and alerts[0].value < 2.0
    assert spec["0.weight"].untrusted == ""
    # 16 eigenvalues: alpha shown, marked untrusted with the reason, no alert
    assert spec["2.weight"].untrusted.startswith(f"tail of {spec['2.weight'].n_tail} eigenvalues")
    assert isinstance(msgs[-1], wire.End)


def test_monitor_off_and_bad_cadence():
    model = nn.Linear(16, 16)
    xr = probes.attach(model, serve=False, spectral_every=None)
    assert xr.spectral is None
    xr.close()
    with pytest.raises(ValueError):
        SpectralMonitor(object(), every=0)


def test_attach_rules_set_the_monitors_bands_and_gate(tmp_path):
    from probes.rules import RuleEngine
    from probes.rules.config import load

    torch.manual_seed(6)
    w = torch.distributions.StudentT(1.0).sample((128, 64))  # alpha ~1.4 from a tail of ~30: below MIN_TAIL
    m = spectral.analyze_matrix(w)
    assert m.alpha < 2 and 20 <= m.n_tail < spectral_rule.MIN_TAIL

    def alerts_with(rules):
        model = nn.Linear(64, 128)
        with torch.no_grad():
            model.weight.copy_(w)
        log = tmp_path / f"run-{len(list(tmp_path.iterdir()))}.xray"
        xr = probes.attach(model, every=1, serve=False, log=str(log), spectral_every=10**9, rules=rules)
        xr.spectral.request()
        assert xr.spectral.wait_pass(1, timeout=60)
        xr.close()
        msgs, _ = wire.read_file(str(log))
        spec = [x for x in msgs if isinstance(x, wire.Spectral)]
        return spec, [x for x in msgs if isinstance(x, wire.Alert) and x.rule == "spectral"]

    spec, fired = alerts_with(None)
    assert fired == [] and spec[0].untrusted.startswith("tail of")
    assert 2.0 < m.stable_rank < 10.0  # this sample's spectrum is heavy-tailed but not collapsed
    f = tmp_path / "rules.toml"
    f.write_text("[spectral]\nmin_tail = 20\n")
    spec, fired = alerts_with(RuleEngine(load(str(f))))
    assert spec[0].untrusted == "" and fired == []  # trusted now, held back by the stable-rank condition
    f.write_text("[spectral]\nmin_tail = 20\nmax_stable_rank = 10.0\n")
    spec, fired = alerts_with(RuleEngine(load(str(f))))
    assert spec[0].untrusted == "" and [a.layer for a in fired] == ["weight"]
    f.write_text("[spectral]\nmin_tail = 20\nmax_stable_rank = 10.0\nenabled = false\n")
    assert alerts_with(RuleEngine(load(str(f))))[1] == []


def test_heat_grid_shows_dead_rows_outlier_columns_and_conv_weights():
    w = torch.randn(300, 500) * 0.02
    w[:, 7] = 5.0  # an outlier input feature
    w[40:80] = 0.0  # dead output units
    (rows, cols), heat = spectral.heat_grid(w)
    grid = np.frombuffer(heat, dtype="<f2").astype(np.float64).reshape(rows, cols)
    assert (rows, cols) == (64, 128)
    # adaptive pooling: cell i covers rows floor(i*300/64) .. ceil((i+1)*300/64)
    assert (grid[9:17] == 0).all() and (grid[[8, 17]] > 0).all()  # rows 42..79 fill cells 9..16 alone
    alive = np.delete(grid, range(9, 17), axis=0)
    assert alive[:, 1].min() > 1.0 and np.median(alive[:, 20:]) == pytest.approx(0.02, rel=0.1)
    conv = torch.randn(16, 3, 5, 5)
    shape, heat = spectral.heat_grid(conv)
    assert shape == (16, 75) and len(heat) == 2 * 16 * 75
    # an old message without a grid, or a grid whose bytes do not match its shape, gives None
    m = spectral.analyze_matrix(w, "w").to_wire(0, 0)
    assert m.heat_matrix().shape == (64, 128)
    assert msgspec_replace(m, heat=m.heat[:-2]).heat_matrix() is None
    assert msgspec_replace(m, heat_shape=[], heat=b"").heat_matrix() is None


def msgspec_replace(msg, **changes):
    import msgspec

    return msgspec.structs.replace(msg, **changes)


def test_only_rank_0_publishes_spectral_alerts(tmp_path):
    """Under DDP every rank holds the same weights and judged the same fit: one warning per
    job, not one per rank (issue 12). Every rank still sends its figures."""
    torch.manual_seed(1)
    w = torch.distributions.StudentT(1.0).sample((512, 256))  # alpha ~1.4, stable rank ~1.4: fires
    out = {}
    for rank in (0, 1):
        model = nn.Linear(256, 512)
        with torch.no_grad():
            model.weight.copy_(w)
        log = tmp_path / f"rank{rank}.xray"
        xr = probes.attach(model, every=1, serve=False, log=str(log), spectral_every=10**9)
        xr.rank = rank  # what torch.distributed would have set
        xr.spectral.request()
        assert xr.spectral.wait_pass(1, timeout=60)
        xr.close()
        msgs, _ = wire.read_file(str(log))
        out[rank] = ([m for m in msgs if isinstance(m, wire.Spectral)],
                     [m for m in msgs if isinstance(m, wire.Alert) and m.rule == "spectral"])
    assert [a.layer for a in out[0][1]] == ["weight"] and out[1][1] == []
    assert len(out[0][0]) == len(out[1][0]) == 1
