"""
FSDP2 (torch's `fully_shard`) for the FocuSFT step, behind train.py's --fsdp: weights, gradients
and AdamW state sharded across ranks, for models that do not fit one GPU with DDP (Qwen2.5 14B and
up). Same results as DDP (tests/test_train.py), more communication.

    shard(step_module, blocks, device, world)   one group per decoder block; the root group (the
                                                 step module) holds embedding, final norm, lm_head
    keep_root_gathered(step_module)             around the step's forward, which runs the inner
                                                 loop's backward inside it (see its NOTE)
    load_full_weights(step_module, full)        rank 0's weights, broadcast shard by shard
    full_state / load_optimizer_state           full state dicts for checkpoints, on rank 0
    unsharded_copy(model, weights)              a plain Qwen2 over the full weights, to save

FSDP gathers a block's weights for each use and frees them after: an adapted block is gathered
at every use by the inner loop (with checkpointing: its no_grad forward, then the recompute and
backward of the top-down walk, per inner step) and by the outer pass; the others only by the
outer pass. At most the root and a few blocks are unsharded at once.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from model import Qwen2


def shard(step_module: nn.Module, blocks: list[nn.Module], device: torch.device, world: int):
    """Make every decoder block an FSDP group and the step module the root, on the device's mesh;
    the parameters are then allocated empty on `device` (load_full_weights fills them)."""
    mesh = init_device_mesh(device.type, (world,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(step_module, mesh=mesh)
    # NOTE: FSDP's default prefetch follows the order of the last forward; the inner loop runs the
    # top blocks several times within one, so name the neighbours instead.
    for i, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[i + 1:i + 2])
        block.set_modules_to_backward_prefetch(blocks[i - 1:i] if i else [])
    step_module.to_empty(device=device)


@contextlib.contextmanager
def keep_root_gathered(step_module):
    """Around the step's forward.

    NOTE: the inner loop's backward (torch.func) runs inside the forward and passes FSDP's hooks
    on the adapted blocks; at its end FSDP's root post-backward callback reshards every group, by
    default the root's too (embedding, final norm, lm_head), and the next inner step or the outer
    loss would meet sharded DTensors. So while the forward runs, the root keeps its parameters
    after a backward, and no backward is "the last one" (on the last, the outer backward, FSDP
    waits for its reduce-scatters and resets its prefetch order)."""
    step_module.set_reshard_after_backward(False, recurse=False)
    step_module.set_is_last_backward(False)
    try:
        yield
    finally:
        step_module.set_reshard_after_backward(True, recurse=False)
        step_module.set_is_last_backward(True)


def load_full_weights(step_module: nn.Module, full: Qwen2 | None):
    """Rank 0 holds the whole model (`full`, in host memory; None elsewhere) and broadcasts it."""
    weights = {"model." + k: v for k, v in full.state_dict().items()} if full is not None else {}
    set_model_state_dict(step_module, weights,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def full_state(step_module: nn.Module, optimizer, with_optimizer: bool) -> tuple[dict, dict]:
    """The full weights and (if asked) AdamW state, in rank 0's host memory. Collective."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(step_module, options=full)
    return weights, get_optimizer_state_dict(step_module, optimizer, options=full) if with_optimizer else {}


def load_optimizer_state(step_module: nn.Module, optimizer, state: dict):
    """A full AdamW state read on rank 0, broadcast and sharded."""
    set_optimizer_state_dict(step_module, optimizer, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def unsharded_copy(model: Qwen2, weights: dict) -> Qwen2:
    """A plain Qwen2 on the full state dict of the FSDP root ("model."-prefixed names), sharing its
    tensors, for model.save_pretrained."""
    with torch.device("meta"):
        plain = Qwen2(model.config)
    plain.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()}, strict=True, assign=True)
    if model.config.tie_word_embeddings:  # assign=True created two Parameters; make them one again
        plain.lm_head.weight = plain.model.embed_tokens.weight
    plain.source_dir = model.source_dir
    return plain
