"""Straightforward reference implementations the tests (and bench/) compare against.

`naive_focusft_loss` is structured like the authors' code: every inner step runs the WHOLE model
again, takes full-vocabulary logits at every position and differentiates with plain
torch.autograd.grad w.r.t. leaf fast-weight tensors, with no activation checkpointing and no
chunking. It must give the same loss and gradients as focusft.focusft_loss, which shares the bottom
layers, selects supervised positions first, uses torch.func (over the whole adapted stack, or
layer by layer with recomputation) and computes the cross-entropy in chunks."""

import torch
import torch.nn.functional as F

import focusft


def full_logits_loss(model, batch, mask, fast=None, scale=1.0):
    """Mean next-token cross-entropy over supervised targets from full (B, S, V) logits."""
    ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    pos = (am.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(ids, attn_mask=mask, position_ids=pos, fast_weights=fast, fast_scale=scale)
    labels = torch.where(lm & am, ids, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def naive_inner_loop(model, batch, mask, fast, cfg):
    losses = []
    for _ in range(cfg.inner_steps):
        leaves = focusft.map_fast(lambda t: t.detach().requires_grad_(), fast)
        loss = full_logits_loss(model, batch, mask, leaves, cfg.fast_scale)
        flat = [t for layer in leaves.values() for ab in layer.values() for t in ab]
        grads = torch.autograd.grad(loss, flat)
        losses.append(loss.detach())
        if not torch.isfinite(loss):
            continue
        if cfg.clip_mode == "global":
            total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
            grads = [g * min(1.0, cfg.inner_clip / (total.item() + 1e-6)) for g in grads]
        else:
            grads = [g * min(1.0, cfg.inner_clip / (g.norm().item() + 1e-6)) for g in grads]
        step = iter(cfg.inner_lr * g for g in grads)  # map_fast visits the factors in the order of `flat`
        fast = focusft.map_fast(lambda t: t.detach() - next(step), leaves)
    return fast, torch.stack(losses)


def naive_focusft_loss(model, batch, cfg, generator=None):
    mask = focusft.build_mask(batch["loss_mask"], batch["attention_mask"], cfg.bidirectional)
    if not cfg.bilevel:
        return full_logits_loss(model, batch, mask), None
    fast = focusft.init_fast_weights(model, cfg, generator)
    fast, losses = naive_inner_loop(model, batch, mask, fast, cfg)
    return full_logits_loss(model, batch, mask, fast, cfg.fast_scale), losses
