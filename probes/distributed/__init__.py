"""The whole job across ranks and nodes: :mod:`~probes.distributed.job` merges every rank's
sample into rank -1 through a torch.distributed group of the probe's own, with the arithmetic
of :mod:`~probes.distributed.merge` (packing rows into buffers, histogram windows, unpacking);
:mod:`~probes.distributed.shards` is a rank's piece of a sharded (FSDP) tensor.
"""
