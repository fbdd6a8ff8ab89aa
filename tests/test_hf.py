"""The Hugging Face Trainer callback on a real (tiny) Trainer run."""

import pytest
import torch

pytest.importorskip("accelerate")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from probes.protocol import wire  # noqa: E402
from probes.hf import XRayCallback  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.arange(16) % 7 + i % 3
        return {"input_ids": ids, "labels": ids}


def test_trainer_callback_streams_grads_after_clipping(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    cb = XRayCallback(every=2, name="hf", serve=False, log=str(tmp_path / "hf.xray"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                             max_grad_norm=1e-3, report_to=[], logging_steps=100, save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[cb]).train()
    msgs, torn = wire.read_file(str(tmp_path / "hf.xray"))
    steps = [m for m in msgs if isinstance(m, wire.Step)]
    assert torn == 0 and [s.step for s in steps] == [0, 2, 4]
    assert isinstance(msgs[-1], wire.End)
    for st in steps:
        grads = [s for s in st.samples if s.kind == "grad"]
        assert grads
        total = sum(s.sumsq for s in grads) ** 0.5
        assert total == pytest.approx(1e-3, rel=1e-3)  # clipped to max_grad_norm: read after clipping
        assert any(s.kind == "act" and s.layer == "transformer.h.0.mlp.act" for s in st.samples)
        assert any(s.kind == "update" and s.ratio for s in st.samples)
    # every step's loss (from the model output's .loss) and the optimizer's lr, in step order
    scalars = [m for m in msgs if isinstance(m, wire.Scalars)]
    assert [m.step for m in scalars] == list(range(6))
    assert all(m.values["loss"] > 0 and "lr" in m.values for m in scalars)
    assert all("grad_norm" in m.values for m in scalars if m.step in (0, 2, 4))
    assert scalars[0].values["grad_norm"] == pytest.approx(1e-3, rel=1e-3)  # the clipped norm


def test_peft_lora_names_come_without_the_wrappers_prefix(tmp_path):
    """A PEFT model's names read as the model's own (no ``base_model.model.``), adapters grouped."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    import probes

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    xr = probes.attach(model, opt, every=1, serve=False, log=str(tmp_path / "p.xray"), spectral_every=None)
    ids = torch.arange(8).reshape(1, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    xr.close()
    msgs, _ = wire.read_file(str(tmp_path / "p.xray"))
    names = [li.name for li in msgs[0].layers]
    assert not any(n.startswith("base_model") for n in names)
    assert "model.layers.0.self_attn.q_proj.lora_A.default" in names
    lora_a = next(li for li in msgs[0].layers if li.name == "model.layers.0.self_attn.q_proj.lora_A.default")
    assert lora_a.adapter_of == "model.layers.0.self_attn.q_proj.base_layer"  # peft keeps the Linear there
    step = next(m for m in msgs if isinstance(m, wire.Step))
    assert any(s.layer == "model.layers.0.self_attn.q_proj.lora_B.default.weight" and s.kind == "grad"
               for s in step.samples)
    scalars = next(m for m in msgs if isinstance(m, wire.Scalars))
    assert scalars.values["loss"] > 0  # read from the PEFT model's output


class Ragged(torch.utils.data.Dataset):
    """Sequences whose labels have different numbers of real tokens (-100 elsewhere), so a step's
    token-weighted loss (num_items_in_batch) differs from the mean of its micro-batches' means."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        ids = (torch.arange(16) * (i % 5 + 1)) % 13 + 1
        labels = ids.clone()
        labels[4 + (i * 3) % 12:] = -100
        return {"input_ids": ids, "labels": labels}


@pytest.mark.slow
@pytest.mark.parametrize("accumulation,num_items", [(1, True), (4, True), (4, False)])
def test_recorded_loss_is_the_trainers_logged_loss(tmp_path, accumulation, num_items):
    """The loss recorded for each step equals the loss the Trainer logs (logging_steps=1), whether the
    model divides by ``num_items_in_batch`` (each micro-batch's ``.loss`` a share of the step's) or the
    Trainer divides each micro-batch's mean loss by the accumulation steps."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    path = str(tmp_path / "ga.xray")
    cb = XRayCallback(every=1, name="ga", serve=False, log=path, spectral_every=None)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             gradient_accumulation_steps=accumulation, report_to=[], logging_steps=1,
                             save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_drop_last=True)
    trainer = Trainer(model=model, args=args, train_dataset=Ragged(), callbacks=[cb])
    given = []
    model.register_forward_pre_hook(lambda m, a, kw: given.append(kw.get("num_items_in_batch") is not None),
                                    with_kwargs=True)
    if not num_items:
        trainer.model_accepts_loss_kwargs = False  # as for a model whose forward takes no loss kwargs
    trainer.train()
    assert given and all(g == num_items for g in given)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    msgs, _ = wire.read_file(path)
    recorded = [m.values["loss"] for m in msgs if isinstance(m, wire.Scalars)]
    assert len(logged) == 3
    assert recorded == pytest.approx(logged, rel=1e-5)
