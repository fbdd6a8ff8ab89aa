"""Tiny Hugging Face Trainer runs as a practitioner would make them: the healthy corpus and the faults.

Each run builds a small model from a ``transformers`` config (nothing is downloaded), a data set in
memory from the bundled public-domain text (``tui/data/corpus.txt``, character-level), and trains it
through the ``Trainer`` with :class:`probes.hf.XRayCallback` attached at ``every=5``, recording every
message. ``tests/test_practitioner.py`` asserts on them; ``python tests/practitioner_runs.py [NAME...]``
prints each run's alerts and the figures the new rules' bands were calibrated on
(:func:`figures`; ``--figures FILE...`` prints them for recordings, e.g. bench/healthy_runs.py's).

Healthy (:data:`HEALTHY`): ``gpt2``, ``llama`` (causal LMs from scratch, AdamW 1e-3), ``bert`` (a
sequence classifier at lr 1e-3 with the Trainer's clipping at 1.0: the issue's false ``exploding``),
``lora`` (peft LoRA r=8 on a LLaMA's q/v projections, lr 1e-3), each :data:`STEPS` steps.
Faults (:data:`FAULTS`): see each entry's description.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

STEPS = 200  # healthy runs: the corpus the false alarms are counted on
EVERY = 5
SEQ = 32
BATCH = 8


def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _text() -> tuple[torch.Tensor, int]:
    """The bundled corpus as character ids, and the vocabulary size."""
    from probes.demo import training as demo

    text = demo.corpus()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text[:200_000]], dtype=torch.long)
    return ids, len(chars)


class Windows(torch.utils.data.Dataset):
    """Windows of ``SEQ`` characters: a language-model data set (labels = inputs) or, with
    ``labels``, a classification one."""

    def __init__(self, ids: torch.Tensor, n: int, labels=None, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(len(ids) - SEQ, (n,), generator=g)
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        x = self.ids[self.starts[i]: self.starts[i] + SEQ]
        if self.labels is None:
            return {"input_ids": x, "labels": x}
        return {"input_ids": x, "labels": torch.tensor(int(self.labels[i]))}


def _classes(ds: Windows, vocab: int) -> list[int]:
    """A learnable label: whether a window holds more of the commonest character than the median."""
    counts = torch.bincount(ds.ids, minlength=vocab)
    common = int(counts.argmax())
    n = [int((ds.ids[s: s + SEQ] == common).sum()) for s in ds.starts]
    mid = sorted(n)[len(n) // 2]
    return [int(v > mid) for v in n]


def gpt2(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def bert(vocab: int):
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=4,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=SEQ, num_labels=2))


def lora(vocab: int):
    import peft

    return peft.get_peft_model(llama(vocab), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                             lora_dropout=0.0))


class _NoGrad(torch.nn.Module):
    """A module run under ``torch.no_grad()`` (the bug: a block wrapped by mistake)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.inner(*args, **kwargs)


# name -> (model builder, classification data?, lr, steps, extra: "frozen", "head-group", "constant",
#          "no-grad"; max_grad_norm)
RUNS = {
    "gpt2": dict(model=gpt2, lr=1e-3, steps=STEPS),
    "llama": dict(model=llama, lr=1e-3, steps=STEPS),
    # 400 steps: the linear decay leaves the lr high enough at step 125 for its plateau break (below)
    "bert": dict(model=bert, classify=True, lr=1e-3, steps=2 * STEPS),
    "lora": dict(model=lora, lr=1e-3, steps=STEPS),
    # the faults: each caught by step 30
    "frozen-base": dict(model=bert, classify=True, lr=1e-3, steps=40, fault="frozen",
                        what="every parameter but the classifier head requires_grad=False (no PEFT)"),
    "head-lr": dict(model=bert, classify=True, lr=1e-3, steps=40, fault="head-group",
                    what="the classifier head in its own param group at 1/20 of the body's lr 1e-3"),
    "constant-labels": dict(model=bert, classify=True, lr=1e-3, steps=40, fault="constant",
                            what="every label is 1"),
    "lora-lr": dict(model=lora, lr=5e-2, steps=40, what="LoRA at lr 5e-2"),
    "no-grad-layer": dict(model=bert, classify=True, lr=1e-3, steps=40, fault="no-grad",
                          what="torch.no_grad() around encoder layer 0"),
    "lr-tiny": dict(model=gpt2, lr=1e-8, steps=40, what="lr 1e-8"),
    "plateau": dict(model=gpt2, lr=1e-1, steps=60, what="lr 1e-1 from step 0, no warm-up"),
}
HEALTHY = ("gpt2", "llama", "bert", "lora")
FAULTS = tuple(n for n in RUNS if n not in HEALTHY)


def train(name: str, steps: int | None = None, *, every: int = EVERY, path: str | None = None) -> list:
    """Train run ``name``; every message its probe recorded (Hello, Steps, Scalars, Alerts, ...)."""
    from transformers import Trainer, TrainingArguments

    from probes.hf import XRayCallback
    from probes.protocol import wire

    _quiet()
    spec = RUNS[name]
    steps = steps or spec["steps"]
    torch.manual_seed(0)
    ids, vocab = _text()
    model = spec["model"](vocab)
    ds = Windows(ids, 4096)
    if spec.get("classify"):
        ds.labels = [1] * len(ds) if spec.get("fault") == "constant" else _classes(ds, vocab)
    fault = spec.get("fault")
    optimizers = (None, None)
    if fault == "frozen":
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("classifier."))
    elif fault == "head-group":
        head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
        body = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
        opt = torch.optim.AdamW([{"params": body, "lr": spec["lr"]}, {"params": head, "lr": spec["lr"] / 20}],
                                lr=spec["lr"], weight_decay=0.0)
        optimizers = (opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    elif fault == "no-grad":
        model.bert.encoder.layer[0] = _NoGrad(model.bert.encoder.layer[0])
    with contextlib.ExitStack() as stack:
        out = path or stack.enter_context(tempfile.TemporaryDirectory())
        log = os.path.join(out, f"{name}.xray")
        if os.path.exists(log):
            os.remove(log)  # the recorder would write NAME-1.xray beside it
        cb = XRayCallback(every=every, name=name, serve=False, log=log, spectral_every=None)
        # the healthy runs keep the Trainer's linear decay; a fault run is short, so its lr is held
        # (a decay to 0 over 40 steps would halve the fault)
        schedule = "linear" if name in HEALTHY else "constant"
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH,
                                 learning_rate=spec["lr"], lr_scheduler_type=schedule,
                                 report_to=[], logging_steps=10_000, save_strategy="no", use_cpu=True,
                                 disable_tqdm=True, dataloader_num_workers=0, seed=0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # on a shared 2-core machine OpenMP's spin-waits cost far more than they give
        try:
            Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb], optimizers=optimizers).train()
        finally:
            torch.set_num_threads(threads)
        msgs, _ = wire.read_file(log)
    return msgs


def alerts(msgs, *, info: bool = False) -> list:
    """The alerts among ``msgs`` (warnings and critical ones unless ``info``)."""
    from probes.protocol import wire

    return [m for m in msgs if isinstance(m, wire.Alert) and (info or m.severity != "info")]


def losses(msgs) -> list[tuple[int, float]]:
    """(step, loss) of every step."""
    from probes.protocol import wire

    return [(m.step, m.values["loss"]) for m in msgs if isinstance(m, wire.Scalars) and "loss" in m.values]


def figures(msgs) -> dict:
    """What the new rules' bands were calibrated on, over one recording: the widest gap between the
    median update ratio of the weight matrices and the slowest (lagging's peers), the largest std
    growth of a matrix over 10 samples (weight-spread's window), the fastest LoRA shift growth per
    step once past 0.5 (adapter-drift) and the largest shift, the loss at step 50 as a share of the
    start (loss-collapse), and the share of elements that train (frozen)."""
    import statistics

    from probes.protocol import stats, wire
    from probes.rules import RuleEngine

    eng = RuleEngine()
    gap = spread = rate = shift = 0.0
    first: dict = {}  # matrix -> its stds so far
    prev: dict = {}
    share = None  # at the first step
    for m in msgs:
        if isinstance(m, wire.Hello):
            eng.set_hello(m)
        elif isinstance(m, wire.Step) and m.phase == "train":
            eng.evaluate(m)  # (its zero-init bookkeeping)
            peers = eng.rules[[r.id for r in eng.rules].index("lagging")]
            sizes = {s.layer: s.count for s in m.samples if s.kind == "weight"}
            if share is None and eng.trainable is not None and sizes:
                share = sum(n for p, n in sizes.items() if p in eng.trainable) / sum(sizes.values())
            ratios = [s.ratio for s in m.samples if s.kind == "update" and s.ratio and peers._peer(s.layer)]
            if len(ratios) >= 3:
                gap = max(gap, statistics.median(ratios) / min(ratios))
            for s in m.samples:
                if s.kind != "weight":
                    continue
                if s.lora_shift is not None:
                    if s.layer in prev and s.lora_shift >= 0.5:
                        rate = max(rate, (s.lora_shift - prev[s.layer][1]) / (m.step - prev[s.layer][0]))
                    prev[s.layer] = (m.step, s.lora_shift)
                    shift = max(shift, s.lora_shift)
                elif s.count > 1 and eng.param_kind(s.layer) == "matrix" and not eng.zero_init.get(s.layer):
                    seen = first.setdefault(s.layer, [])  # its stds, as weight-spread's window
                    if seen and seen[max(0, len(seen) - 10)] > 0:
                        spread = max(spread, stats.std(s) / seen[max(0, len(seen) - 10)])
                    seen.append(stats.std(s))
    loss = losses(msgs)
    at50 = [v for st, v in loss if st <= loss[0][0] + 50][-3:]
    fall = statistics.median(at50) / statistics.median([v for _, v in loss[:3]]) if len(loss) >= 3 else math.nan
    return {"lagging gap": gap, "std growth": spread, "lora shift rate": rate, "lora shift max": shift,
            "loss at 50 / start": fall, "trainable share": 1.0 if share is None else share}


def main(argv: list[str]) -> int:
    import time

    if argv[:1] == ["--figures"]:
        from probes.protocol import wire

        for path in argv[1:]:
            msgs, _ = wire.read_file(path)
            print(os.path.basename(path), {k: round(v, 3) for k, v in figures(msgs).items()}, flush=True)
        return 0
    for name in argv or list(RUNS):
        t = time.perf_counter()
        msgs = train(name)
        loss = losses(msgs)
        print(f"{name}: {len(loss)} steps in {time.perf_counter() - t:.1f}s; loss {loss[0][1]:.3f} -> "
              f"{sum(v for _, v in loss[-10:]) / 10:.3f}", flush=True)
        print("  " + ", ".join(f"{k} {v:.3g}" for k, v in figures(msgs).items()))
        for a in alerts(msgs, info=True):
            print(f"  step {a.step} {a.severity} {a.rule} {a.layer} [{a.kind}] {a.message[:300]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
