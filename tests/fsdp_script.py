"""Two-rank FSDP training (CPU, gloo) with the probe on every rank (run with torchrun).

Usage: python -m torch.distributed.run --nproc_per_node 2 fsdp_script.py OUTDIR STEPS --fsdp {1,2}
       [--update-sample N]

The first Linear is wrapped in activation checkpointing's CheckpointWrapper,
then every Linear and the root are sharded: ``fully_shard`` (FSDP2, DTensor
parameters) or ``FullyShardedDataParallel(use_orig_params=True)`` (FSDP1,
flat 1-D pieces of each parameter). Each rank records its stream to
OUTDIR/rank{R}.xray; rank 0 saves the ground truth, gathered whole, to
OUTDIR/truth.pt: per step the full weights before the update, the full
gradients, the full weights after, and the ReLU output of both ranks' batches.
"""

import argparse
import gc

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

import probes

p = argparse.ArgumentParser()
p.add_argument("outdir")
p.add_argument("steps", type=int)
p.add_argument("--fsdp", type=int, choices=(1, 2), required=True)
p.add_argument("--update-sample", type=int, default=4096)
args = p.parse_args()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
# 0.weight (32x8) is larger than a small update_sample; 2.weight (1x32) leaves rank 1 an empty shard
model = nn.Sequential(checkpoint_wrapper(nn.Linear(8, 32)), nn.ReLU(), nn.Linear(32, 1))
names = [n for n, _ in model.named_parameters()]
clean = [n.replace("_checkpoint_wrapped_module.", "") for n in names]

if args.fsdp == 2:
    from torch.distributed.fsdp import fully_shard

    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)

    def full():
        """Whole parameters and gradients (DTensor.full_tensor: an all-gather)."""
        return [(q.full_tensor().detach().clone(), q.grad.full_tensor().clone() if q.grad is not None else None)
                for q in model.parameters()]
else:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    # device_id=cpu: without it FSDP1 looks for an accelerator and refuses to start
    model = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), use_orig_params=True,
                 device_id=torch.device("cpu"))

    def full():
        with FSDP.summon_full_params(model, with_grads=True):
            return [(q.detach().clone(), q.grad.clone() if q.grad is not None else None)
                    for q in model.parameters()]

acts = []
relu = next(m for m in model.modules() if isinstance(m, nn.ReLU))
relu.register_forward_hook(lambda m, i, o: acts.append(o.detach().clone()))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
gen = torch.Generator().manual_seed(rank)
truth = []
with probes.attach(model, opt, every=1, name=f"fsdp{args.fsdp}", log=f"{args.outdir}/rank{rank}.xray",
                   update_sample=args.update_sample, spectral_every=None) as xr:
    for step in range(args.steps):
        acts.clear()
        model(torch.randn(16, 8, generator=gen)).pow(2).mean().backward()
        before = full()
        gathered = [torch.empty_like(acts[0]) for _ in range(world)]
        dist.all_gather(gathered, acts[0])
        opt.step()
        after = full()
        truth.append({
            "weight": {n: w for n, (w, _) in zip(clean, before)},
            "grad": {n: g for n, (_, g) in zip(clean, before)},
            "after": {n: w for n, (w, _) in zip(clean, after)},
            "act": torch.cat(gathered),
            # which elements of each rank's flat shard the update is measured on (None: all)
            "subsets": {n: (None if i is None else i.tolist()) for n, i in xr._reads.subsets.items()},
        })
        opt.zero_grad()
    subsets = [None] * world
    dist.all_gather_object(subsets, truth[-1]["subsets"])
if rank == 0:
    torch.save({"steps": truth, "subsets": subsets, "names": clean}, f"{args.outdir}/truth.pt")
# FSDP2's state keeps gloo work objects (and tensors) alive; freed at interpreter exit they aborted
# the process now and then ("terminate called without an active exception"): free them first
del model, opt, xr, relu
gc.collect()
dist.barrier()
dist.destroy_process_group()
