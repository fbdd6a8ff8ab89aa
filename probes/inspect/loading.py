"""Reading a local model directory, an adapter or a state dict, and the text's token ids (local files only)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch
from torch import nn

from probes.inspect.options import InspectError


#: Files whose presence means the directory has its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def load(path: str, device: str = "cpu", notes: list[str] | None = None):
    """The model (and a tokenizer, or None) of a local causal-LM directory; what was done
    instead of the expected is appended to ``notes``."""
    p = Path(path)
    if not p.exists():
        raise InspectError(f"{path}: no such directory")
    if not p.is_dir():
        raise InspectError(f"{path}: not a directory (give a transformers model directory)")
    if not (p / "config.json").is_file():
        raise InspectError(f"{path}: not a transformers model directory (no config.json)")
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError as exc:
        raise InspectError(f"inspect needs transformers ({exc}): pip install 'xray-tui[demo]'") from None
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise InspectError(f"{path}: unreadable config.json: {one_line(exc)}") from None
    archs = list(getattr(config, "architectures", None) or [])
    causal = ("ForCausalLM", "LMHeadModel")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (archs and not any(a.endswith(causal)
                                                                                        for a in archs)):
        what = archs[0] if archs else f"{config.model_type!r} model"
        raise InspectError(f"{path}: a {what} is not a causal language model (inspect loads "
                           "AutoModelForCausalLM directories: GPT-2, LLaMA, ...)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except Exception as exc:
        raise InspectError(f"{path}: cannot load the model: {one_line(exc)}") from None
    try:
        model.to(device)
    except Exception as exc:
        raise InspectError(f"device {device!r}: {one_line(exc)}") from None
    tokenizer = None  # a bare checkpoint: the text's bytes become token ids
    if any((p / f).is_file() for f in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            _note(notes, f"the tokenizer in {path} does not load ({one_line(exc)})")
    else:
        _note(notes, f"no tokenizer in {path} ({', '.join(TOKENIZER_FILES)})")
    return model, tokenizer


def _note(notes: list[str] | None, text: str) -> None:
    if notes is not None:
        notes.append(text)


def one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def token_ids(text: str, tokenizer, vocab_size: int, max_len: int | None = None, eos_id: int | None = None,
              notes: list[str] | None = None) -> torch.Tensor:
    """Token ids of ``text``: the tokenizer's, or its UTF-8 bytes modulo the vocabulary;
    a text of one token gets ``eos_id`` appended (as Visible-Distribution does: a loss needs
    two positions); cut to the model's ``max_len`` positions. Each of these is said in ``notes``."""
    ids = None
    if tokenizer is not None:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        if ids.numel() and int(ids.max()) >= vocab_size:
            _note(notes, f"the tokenizer gives ids up to {int(ids.max())}, beyond the model's vocabulary "
                         f"of {vocab_size}: not used")
            ids = None  # a tokenizer that does not fit this model
        if ids is not None and tokenizer.eos_token_id is not None:
            eos_id = tokenizer.eos_token_id
    if ids is None:
        ids = torch.tensor([[b % vocab_size for b in text.encode("utf-8")]], dtype=torch.long)
        _note(notes, f"the text was read as its {ids.shape[1]} UTF-8 bytes (modulo the vocabulary of "
                     f"{vocab_size}) as token ids")
    if ids.shape[1] == 1 and eos_id is not None and 0 <= eos_id < vocab_size:
        ids = torch.cat([ids, torch.tensor([[eos_id]], dtype=ids.dtype)], dim=1)
        _note(notes, f"the text gives one token: EOS (id {eos_id}) appended, so the loss has a target")
    if ids.shape[1] < 2:
        raise InspectError("the text must give at least 2 tokens (and the model names no EOS token to append)")
    if max_len and ids.shape[1] > max_len:
        _note(notes, f"the text's {ids.shape[1]} tokens were cut to the model's {max_len} positions")
        ids = ids[:, :max_len]
    return ids


def block_prefix(model: nn.Module) -> str | None:
    """The path of the model's list of transformer blocks (e.g. ``transformer.h``)."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and any(True for _ in m[0].children()):
            if best is None or len(m) > best[1]:
                best = (name, len(m))
    return best[0] if best else None


def layer_patterns(model: nn.Module, layers: list[int] | None) -> list[str] | None:
    """Glob patterns of the module paths of blocks ``layers``; None for everything."""
    if layers is None:
        return None
    prefix = block_prefix(model)
    if prefix is None:
        raise InspectError("--layers: this model has no list of transformer blocks")
    n = len(model.get_submodule(prefix))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise InspectError(f"--layers {','.join(map(str, bad))}: the model has blocks 0..{n - 1}")
    return [p for i in layers for p in (f"{prefix}.{i}", f"{prefix}.{i}.*")]


def selected(name: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatch(name, p) for p in patterns)
