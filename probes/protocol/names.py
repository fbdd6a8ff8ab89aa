"""Layer names as the protocol carries them: a parameter's or module's name without its wrappers.

DDP, torch.compile, PEFT, FSDP1 and activation checkpointing each add parts to
every name; the probe, the spectral pass and the viewer use one name per
layer whatever wraps the model. Plain strings: no torch.
"""

from __future__ import annotations


#: Prefixes that wrappers put in front of every name: DDP's ``module.``, torch.compile's
#: ``_orig_mod.``, and PEFT's ``base_model.model.`` (PeftModel -> LoraModel -> the model)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
#: Path components that FSDP1 (``FullyShardedDataParallel``) and activation checkpointing's
#: ``CheckpointWrapper`` insert anywhere in a name, not only in front (``_fsdp_wrapped_module.0._fsdp_wrapped_module.weight``)
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def unwrap_name(name: str) -> str:
    """Parameter and module names without DDP/compile/PEFT/FSDP1/checkpoint wrappers' parts."""
    stripped = True
    while stripped:  # in any nesting: DDP(compile(model)), a compiled PEFT model, ...
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix) or name == prefix[:-1]:
                name = name[len(prefix):]
                stripped = True
    if "_wrapped_module" in name:
        name = ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)
    return name
