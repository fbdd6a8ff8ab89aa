"""bench/roofline.py: its byte count against a hand count, and its launch plan against the probe's own.

The roofline replays a sampled step's reductions on meta tensors; these tests check that what it
counts is what the probe does: the bytes of every watched tensor (by hand, from GPT-2's shapes) and
the launches (kernel and grid, in order) that a real probe makes on a real model of the same config.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("triton")
de = pytest.importorskip("probes.engines.device", reason="the device engine does not load here")

_spec = importlib.util.spec_from_file_location(
    "roofline", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "roofline.py"))
roofline = sys.modules["roofline"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(roofline)

interpreter_only = pytest.mark.skipif(not de.INTERPRET, reason="launches on CPU tensors: Triton's interpreter")


@pytest.fixture(autouse=True)
def fresh_engines():
    from probes import engines

    engines.reset()
    yield
    engines.reset()


@pytest.mark.parametrize("bf16", [False, True])
def test_bytes_equal_a_hand_count(bf16):
    L, d, V, P, B, T = 1, 8, 16, 64, 2, 4
    tr = roofline.trace(*roofline.tiny_gpt2(L, d, V, P), B, T, bf16=bf16)
    n = B * T
    lo = 2 if bf16 else 4  # a matmul's output under bf16 autocast
    # wte, ln_1, ln_2, the block and ln_f are float32 [B, T, d]; wpe is [1, T, d]; then per block
    # c_attn [n, 3d], attn.c_proj [n, d], mlp.c_fc and the GELU [n, 4d], mlp.c_proj [n, d]; lm_head [n, V]
    want_act = 4 * (n * d * (1 + 3 * L + 1) + T * d) + lo * (L * n * (3 * d + d + 4 * d + 4 * d + d) + n * V)
    # wte (tied with lm_head: one tensor), wpe, per block two LayerNorms, c_attn, c_proj, c_fc, mlp.c_proj; ln_f
    want_par = V * d + P * d + L * (4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d)
                                    + (4 * d * d + d)) + 2 * d
    s = roofline.summary(tr, roofline.replay(tr, de, torch.device("meta")))
    assert s["must_read_bytes"]["activations"] == want_act
    assert s["must_read_bytes"]["weights"] == 4 * want_par == s["must_read_bytes"]["grads"]
    assert tr.nparams == want_par and tr.tokens == n
    assert [a.name for a in tr.acts if a.units] == ["transformer.h.0.mlp.act"]
    # the statistics launches read each watched tensor once, plus the update deltas (float32)
    updates = sum(min(k, 4096) for _, k in tr.trainable)
    assert s["engine_bytes_by_kernel"]["_stats_kernel"] == want_act + 8 * want_par + 4 * updates
    assert s["units_reread_bytes"] == lo * n * 4 * d  # the GELU's output, read again for its dead units


def _probe_launches(config, cls, batch, seq):
    """(kernel, programs) of each launch of one sampled step of a real probe (launches skipped)."""
    from probes.capture import probe

    torch.manual_seed(0)
    model = cls(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    launched = []

    def launch(kernel, grid, *args, **kwargs):
        launched.append((kernel.__name__, int(torch.tensor(grid).prod())))
        if kernel is de._finalize_kernel:
            args[4].zero_()  # rows the publisher can read

    de._launch = launch
    # the every-step tier off: its 4 gathers a step are not the sampled step's statistics that the
    # roofline plans (tests/test_device_engine.py counts them)
    xr = probe.attach(model, opt, every=1, serve=False, spectral_every=None, signals=False)
    try:
        step()  # the first sampled step grows the workspace
        del launched[:]
        step()
    finally:
        xr.close()
    return launched


@interpreter_only
def test_the_replayed_launches_are_the_probes(monkeypatch):
    """Same kernels, same grids, same order: activations held past the hold limit (set low, so some
    are reduced alone and some together, float32 and bf16 in one reduction), tensors split across
    several chunks (a GPU-like chunk of 512 elements), the weights, the update subsets, the finalize."""
    from probes.capture import activations

    monkeypatch.setenv("XRAY_TUI_ENGINE", "device")
    monkeypatch.setattr(activations, "ACT_HOLD_BYTES", 6 << 10)
    for name, value in {"BLOCK": 64, "ITERS": 8, "CHUNK": 512}.items():
        monkeypatch.setattr(de, name, value)
    monkeypatch.setattr(de, "_launch", de._launch)  # restored after _probe_launches replaces it
    config, cls = roofline.tiny_gpt2(2, 32, 64, 64)
    real = _probe_launches(config, cls, 2, 16)
    tr = roofline.trace(config, cls, 2, 16, bf16=True)
    planned = [(x.kernel, x.programs) for x in roofline.replay(tr, de, torch.device("meta"))]
    assert planned == real
    stats = [x for x in roofline.replay(tr, de, torch.device("meta")) if x.kernel == "_stats_kernel"]
    assert {x.dtypes for x in stats} == {"f32", "bf16"}  # one reduction launches once per dtype
    assert any(x.tensors > 1 for x in stats) and any(x.programs > x.tensors for x in stats)


@interpreter_only
def test_measure_runs_every_launch_and_times_it():
    tr = roofline.trace(*roofline.tiny_gpt2(1, 8, 16, 64), 2, 4, bf16=True)
    planned = roofline.replay(tr, de, torch.device("meta"))
    ran = roofline.measure(tr, de, repeat=1, device=torch.device("cpu"))
    assert [(x.kernel, x.programs, x.nbytes) for x in ran] == [(x.kernel, x.programs, x.nbytes) for x in planned]
    assert all(x.time_s > 0 for x in ran)
    text = roofline.launch_table(ran, peak=1e9)
    assert "GB/s" in text and len(text.splitlines()) == len(ran) + 2


def test_variants_parse_and_bad_input_exits_2(capsys):
    assert roofline.parse_variant("base") == {}
    assert roofline.parse_variant("iters=16+warps=8") == {"iters": 16, "warps": 8}
    assert roofline.parse_variant("tail=0") == {"tail": 0}
    for bad in ("iters=0", "block=100", "warp=8", "iters=x", "tail=2"):
        with pytest.raises(ValueError):
            roofline.parse_variant(bad)
    for argv in (["--model", "gpt5"], ["--batch", "0"], ["--device", "tpu"], ["--variants", "iters=16"],
                 ["--config", "/no/such/config.json"]):
        with pytest.raises(SystemExit) as e:
            roofline.main(argv)
        assert e.value.code == 2
        assert "error:" in capsys.readouterr().err


def test_a_config_file_gives_that_models_figures(tmp_path, capsys, monkeypatch):
    """``--config``: a user's own causal LM from its config.json (a tiny LLaMA here), counted like the
    built-in ones; a config that cannot train at the batch x seq asked is one line and exit 2."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100, max_position_embeddings=64).save_pretrained(tmp_path)
    assert roofline.main(["--config", str(tmp_path / "config.json"), "--batch", "2", "--seq", "8", "--json"]) == 0
    import json

    got = json.loads(capsys.readouterr().out)["models"]["config"]["summary"]
    # 10 per block (norms, q k v o, gate up down, the SiLU), the block, the embeddings, the final norm, lm_head
    assert got["tensors"]["activations"] == 11 + 3 and got["launches"]["_units_kernel"] == 1
    monkeypatch.setattr(roofline, "trace", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("size mismatch")))
    with pytest.raises(SystemExit) as e:
        roofline.main(["--config", str(tmp_path / "config.json"), "--batch", "1", "--seq", "8"])
    assert e.value.code == 2 and "failed: RuntimeError: size mismatch" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')  # not a causal LM
    with pytest.raises(SystemExit) as e:
        roofline.main(["--config", str(tmp_path / "config.json")])
    assert e.value.code == 2 and "KeyError" in capsys.readouterr().err
