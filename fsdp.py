"""
FSDP2 for train.py --fsdp: the model's parameters, gradients and optimizer state sharded across the
ranks (torch.distributed.fsdp.fully_shard on each transformer block and on the root), and the sharded
optimizer state written and read with torch.distributed.checkpoint (DCP), which reshards it for any
number of processes (or one, without FSDP).

    model = fsdp.shard(model, rt)                     # moves it to rt.device; then the optimizers
    fsdp.save_optimizers(model, optimizers, path)     # every rank, its shards
    fsdp.load_optimizers(model, optimizers, path)     # every rank (or one process)
"""

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def shard(model, rt):
    """Shard each block, then the root (the embeddings, tied to the lm_head, and the last LayerNorm),
    each moved to the device as it is sharded (the model may come on the CPU). Under bf16 the blocks
    compute in bf16 and reduce gradients in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(rt.device_type, (rt.world_size,))
    policy = MixedPrecisionPolicy()
    if rt.dtype == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(model, "generate")  # its samples gather the root's parameters as forward does
    return model


def is_sharded(model):
    return any(isinstance(p, DTensor) for p in model.parameters())


def local(t):
    """This rank's part of a tensor (all of it when it is not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t):
    """The whole of a tensor, gathered from every rank when it is sharded (a collective)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def all_finite(tensors):
    """Whether every tensor is finite on every rank: one check over the local shards, then one
    all-reduce when they are sharded, so that every rank gives the same answer."""
    tensors = list(tensors)
    ok = torch.stack([torch.isfinite(local(t)).all() for t in tensors]).all() if tensors else torch.tensor(True)
    if any(isinstance(t, DTensor) for t in tensors):
        ok = ok.to(torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def full_model(model, new_model):
    """A whole, unsharded copy of a sharded model on rank 0 (None on the others), for the HF-format
    weights of a checkpoint: its state gathered to rank 0's CPU (a collective), loaded into
    new_model() there."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    copy = new_model()
    copy.load_state_dict(state)
    return copy


def optimizer_states(model, optimizers):
    """{opt0: ..., opt1: ...}: each optimizer's state keyed by parameter names, sharded as the
    model is (torch.distributed.checkpoint.state_dict)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return {f"opt{i}": get_optimizer_state_dict(model, opt) for i, opt in enumerate(optimizers)}


def save_optimizers(model, optimizers, path):
    """Every rank writes its shards of the optimizers' state into the directory path (DCP: one file
    per rank and .metadata); a non-finite value anywhere stops it on every rank."""
    import torch.distributed.checkpoint as dcp

    states = optimizer_states(model, optimizers)
    tensors = [v for s in states.values() for p in s["state"].values() for v in p.values() if torch.is_tensor(v)]
    if not all_finite(tensors):
        raise FloatingPointError("not checkpointing: the optimizer state holds non-finite values")
    dcp.save(states, checkpoint_id=path)


def load_optimizers(model, optimizers, path):
    """Load the optimizers' state that save_optimizers wrote, for this model's sharding (or none)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    states = optimizer_states(model, optimizers)
    dcp.load(states, checkpoint_id=path)
    for i, opt in enumerate(optimizers):
        set_optimizer_state_dict(model, opt, states[f"opt{i}"])
