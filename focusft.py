"""
FocuSFT: bilevel optimisation for dilution-aware long-context fine-tuning (the method).

One training step on a batch (paper §3, Eq. 2):

  1. build the GLM-style mask once (Eq. 5)                               build_mask
  2. run the layers BELOW the adapted ones once, with autograd           (shared bottom)
  3. inner loop (Eq. 3): fresh LoRA fast weights on the FFNs of the top
     35 % of layers, k = 2 SGD steps (lr 1.0, clipped) on the response
     loss, gradients via torch.func w.r.t. the fast weights only         init_fast_weights, inner_loop
  4. outer loss (Eq. 4): the top layers again, with the adapted fast
     weights as constants (first-order), cross-entropy on the response
     tokens; its backward reaches the base weights only                  response_loss
  5. the fast weights are dropped; inference uses the plain model.

`focusft_loss(model, batch, cfg, generator)` does all of it and is the function to port.
The paper's 2x2 ablation (Table 3) is `FocusConfig.method`:

                     causal mask         bidirectional context
    no inner loop    "sft"               "sft-bidir"
    inner loop       "causal-bilevel"    "focusft"

What the method needs from a model (all it uses of model.py; provide these to port it):
  * `model.embed(input_ids)` -> h (B, S, D), `model.rope(position_ids, dtype)` -> (cos, sin);
  * `model.run_layers(h, rope, mask, i, j, fast_weights, fast_scale)`: decoder layers i..j-1 under a
    bool (B, 1, S, S) mask (None = causal), with LoRA factors {layer: {proj: (A, B)}} added to the
    FFN projections, checkpointing each layer when `model.gradient_checkpointing` and grad are on;
  * `model.model.norm` and `model.logits`: the final norm and the vocabulary projection;
  * `model.config.num_hidden_layers`, `model.model.layers[i].mlp.<proj>.in_features/out_features`
    and `model.lm_head.weight.device` (where the fast weights go and their shapes).
The one rule: no activation checkpointing inside a torch.func transform. torch.func refuses the
saved-tensor hooks that torch.utils.checkpoint is built on, so the inner loop turns the model's
checkpointing off and, when memory matters, recomputes the adapted layers one at a time by hand
(`inner_grads_by_layer`).

Where we differ from the authors' code (same numbers, less work): the bottom layers run once per
step instead of once per inner step plus once for the outer pass, logits are computed only at
supervised positions (in chunks), and the inner loop keeps no graph to the base weights.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

METHODS = {  # name -> (bilevel, bidirectional)
    "sft": (False, False),
    "sft-bidir": (False, True),
    "causal-bilevel": (True, False),
    "focusft": (True, True),
}


@dataclass
class FocusConfig:
    """The method's settings; defaults are the paper's (Appendix A, Table 5)."""
    method: str = "focusft"  # one of METHODS
    inner_steps: int = 2  # k
    inner_lr: float = 1.0
    inner_clip: float = 1.0  # max gradient norm of each fast-weight tensor
    clip_mode: str = "per-tensor"  # "per-tensor" (the authors') or "global" (one norm over all)
    inner_grad: str = "grad"  # torch.func.grad, or "vjp": same gradients, less memory (see grads_and_value)
    lora_rank: int = 32
    lora_alpha: float = 64.0  # fast_scale = alpha / rank = 2
    layer_fraction: float = 0.35  # adapt layers int(L * (1 - fraction)) .. L-1 (18..27 of 28)
    targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    # Supervised positions per piece of the response cross-entropy. The loss then peaks at about
    # 12 bytes x loss_chunk x V (logits, fp32 log-probabilities and their gradients), 1.9 GB at
    # 1024 for V = 152,064, whatever the sequence length. Not a paper setting: any value gives the
    # same loss and gradients.
    loss_chunk: int = 1024

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, not {self.inner_steps} (for no inner loop use method 'sft')")
        if self.clip_mode not in ("per-tensor", "global"):
            raise ValueError(f"clip_mode must be 'per-tensor' or 'global', not {self.clip_mode!r}")
        if self.inner_grad not in ("grad", "vjp"):
            raise ValueError(f"inner_grad must be 'grad' or 'vjp', not {self.inner_grad!r}")
        if self.loss_chunk < 1:
            raise ValueError(f"loss_chunk must be >= 1, not {self.loss_chunk}")
        self.targets = tuple(self.targets)

    @property
    def bilevel(self) -> bool:
        return METHODS[self.method][0]

    @property
    def bidirectional(self) -> bool:
        return METHODS[self.method][1]

    @property
    def fast_scale(self) -> float:
        return self.lora_alpha / self.lora_rank


# -----------------------------------------------------------------------------
# Eq. 5: the attention mask


def visible_up_to(loss_mask: torch.Tensor, attention_mask: torch.Tensor, bidirectional: bool = True):
    """For every token, the last position it may attend to: (B, S) long.

    Turns are maximal runs of tokens with the same (loss_mask, attention_mask) value. A context
    token (loss_mask 0) sees up to the end of its own run; a response token (loss_mask 1) sees up
    to itself. With bidirectional=False every token sees up to itself (causal)."""
    B, S = loss_mask.shape
    pos = torch.arange(S, device=loss_mask.device).expand(B, S)
    if not bidirectional:
        return pos
    kind = loss_mask.long() * 2 + attention_mask.long()  # padding is its own kind: runs stop there
    last_of_run = torch.ones_like(loss_mask, dtype=torch.bool)
    last_of_run[:, :-1] = kind[:, 1:] != kind[:, :-1]
    # run_end[i] = the first j >= i that ends a run: a reverse cumulative minimum
    candidates = torch.where(last_of_run, pos, S - 1)
    run_end = candidates.flip(-1).cummin(-1).values.flip(-1)
    return torch.where(loss_mask.bool(), pos, run_end)


def build_mask(loss_mask: torch.Tensor, attention_mask: torch.Tensor, bidirectional: bool = True):
    """Eq. 5, the GLM-style mask of both loops: bool (B, 1, S, S), True = query i may see key j.

    Query i sees key j iff j <= visible_up_to(i) and j is not padding. One row per token, drawn
    for context c (loss 0), response r (loss 1) and padding p:

        keys ->   c0 c1 c2 r3 r4 c5 c6 r7 p8
        c0         x  x  x  .  .  .  .  .  .     context run 0-2: bidirectional inside the run
        c1         x  x  x  .  .  .  .  .  .
        c2         x  x  x  .  .  .  .  .  .
        r3         x  x  x  x  .  .  .  .  .     response: causal
        r4         x  x  x  x  x  .  .  .  .
        c5         x  x  x  x  x  x  x  .  .     a later context run (tool output, next user turn)
        c6         x  x  x  x  x  x  x  .  .     sees all earlier runs and its own run
        r7         x  x  x  x  x  x  x  x  .
        p8         .  .  .  .  .  .  .  .  x     padding sees only itself (no all-masked SDPA row)

    Nothing ever sees a later run. A sample without response tokens is one bidirectional run.
    bidirectional=False gives the plain causal mask (with padding blocked the same way)."""
    valid = attention_mask.bool()
    S = loss_mask.shape[1]
    keys = torch.arange(S, device=loss_mask.device)
    vis = visible_up_to(loss_mask, valid, bidirectional)  # (B, S)
    mask = (keys[None, None, :] <= vis[:, :, None]) & valid[:, None, :] & valid[:, :, None]  # (B, S, S)
    mask |= ~valid[:, :, None] & (keys[None, :, None] == keys[None, None, :])
    return mask[:, None]  # (B, 1, S, S): the same for every head


# -----------------------------------------------------------------------------
# Fast weights (the inner loop's parametric memory)


def adapted_layers(model, cfg: FocusConfig) -> range:
    """The top `layer_fraction` of the decoder layers: int(L * (1 - fraction)) .. L-1."""
    L = model.config.num_hidden_layers
    return range(int(L * (1 - cfg.layer_fraction)), L)


def init_fast_weights(model, cfg: FocusConfig, generator: torch.Generator | None):
    """Fresh LoRA factors for every adapted projection: {layer: {name: (A (r, in), B (out, r))}}.

    A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0, so the adapted model starts
    out equal to the base model. They are plain fp32 tensors (not Parameters): nothing transient can
    reach a module, a state_dict, an optimizer or a checkpoint. Drawn on the generator's device
    (generator None: torch's default generator of the model's device)."""
    device = model.lm_head.weight.device
    draw_on = generator.device if generator is not None else device
    fast = {}
    for i in adapted_layers(model, cfg):
        mlp = model.model.layers[i].mlp
        fast[i] = {}
        for name in cfg.targets:
            proj = getattr(mlp, name)
            A = torch.empty(cfg.lora_rank, proj.in_features, device=draw_on)
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            B = torch.zeros(proj.out_features, cfg.lora_rank, device=device)
            fast[i][name] = (A.to(device), B)
    return fast


def map_fast(fn, *trees):
    """Apply fn factor by factor to fast-weight trees of the same layout {layer: {name: (A, B)}}:
    map_fast(lambda p, g: p - g, fast, grads) is {i: {n: (A - gA, B - gB)}}."""
    return {i: {n: tuple(fn(*factors) for factors in zip(*(t[i][n] for t in trees))) for n in layer}
            for i, layer in trees[0].items()}


# -----------------------------------------------------------------------------
# Eq. 4 (and the inner objective of Eq. 3): response-token cross-entropy


def chunk_loss(model, h_sel, targets, n: int):
    """The share of Eq. 4's mean that rows h_sel (c, D) contribute: sum of their cross-entropies / n.
    The final norm and the vocabulary projection run on these rows only: never a (B, S, V) tensor."""
    logits = model.logits(model.model.norm(h_sel))  # (c, V)
    return F.cross_entropy(logits.float(), targets, reduction="sum") / n


def response_loss(model, h, sel, targets, chunk: int | None = FocusConfig.loss_chunk):
    """Eq. 4: mean next-token cross-entropy over the response tokens of the micro-batch.

    h: top-layer hidden states (B, S, D) before the final norm; sel: (B, S-1) bool, True where
    position t predicts a supervised token t+1; targets: (N,) those tokens. With more than `chunk`
    targets the loss is a sum over pieces of `chunk` positions, each recomputed in backward
    (torch.utils.checkpoint), so at most chunk x V log-probabilities and their gradient exist at
    once. chunk=None: one piece (inside torch.func, which refuses checkpointing).
    With N = 0 the loss is 0 and its backward still reaches every parameter (with zeros), which
    DistributedDataParallel needs: an empty cross-entropy sums to 0 instead of dividing by 0."""
    h_sel = h[:, :-1][sel]  # (N, D)
    N = targets.numel()
    n = max(N, 1)
    if chunk is None or N <= chunk:
        return chunk_loss(model, h_sel, targets, n)
    # NOTE: the loss has no randomness, so the RNG state need not be saved for the recompute
    return sum(checkpoint(chunk_loss, model, h_sel[a:a + chunk], targets[a:a + chunk], n,
                          use_reentrant=False, preserve_rng_state=False) for a in range(0, N, chunk))


# -----------------------------------------------------------------------------
# Eq. 3: the inner loop


def grads_and_value(f, how: str):
    """f(*args) -> scalar, turned into a function returning (gradients w.r.t. every arg, value).

    how="grad": torch.func.grad_and_value. how="vjp": torch.func.vjp pulled back with
    create_graph=False. Same gradients; NOTE: torch.func.grad always runs its backward with
    create_graph=True (so transforms can nest), so autograd uses twice-differentiable formulas,
    which save more tensors and run more kernels (bench/bench_method.py measures both)."""
    def run(*args):
        if how == "grad":
            return torch.func.grad_and_value(f, argnums=tuple(range(len(args))))(*args)
        value, pull = torch.func.vjp(f, *args)
        return pull(torch.ones_like(value), create_graph=False), value

    return run


def clip_fast_grads(grads, max_norm: float, mode: str):
    """Clip each fast-weight tensor's gradient to norm <= max_norm on its own (the authors'), or
    all of them by their global norm. Same formula as torch.nn.utils.clip_grad_norm_."""
    def coef(norm):  # scale down only when the norm exceeds max_norm
        return (max_norm / (norm + 1e-6)).clamp(max=1.0)

    if mode == "global":
        flat = [g for layer in grads.values() for ab in layer.values() for g in ab]
        c = coef(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in flat])))
        return map_fast(lambda g: g * c, grads)
    return map_fast(lambda g: g * coef(torch.linalg.vector_norm(g)), grads)


@contextmanager
def activation_checkpointing_off(model):
    """Run the model without activation checkpointing inside the `with` block.
    NOTE: torch.func transforms refuse saved-tensor hooks, which is how activation checkpointing
    works: the inner loop needs it off, and recomputes by hand instead (inner_grads_by_layer)."""
    was = model.gradient_checkpointing
    model.gradient_checkpointing = False
    try:
        yield
    finally:
        model.gradient_checkpointing = was


def inner_grads_whole_stack(model, h_bottom, rope, mask, sel, targets, fast, cfg: FocusConfig):
    """grad_phi L_inner and L_inner of Eq. 3 in one torch.func transform over the adapted layers,
    the final norm and the head: the straightforward form. It keeps the activations of every
    adapted layer and all N x V log-probabilities until the backward (train.py --inner-recompute
    off; the default without activation checkpointing)."""
    layers = adapted_layers(model, cfg)

    def loss_of(fast):
        h = model.run_layers(h_bottom, rope, mask, layers.start, layers.stop, fast, cfg.fast_scale)
        return response_loss(model, h, sel, targets, chunk=None)

    (grads,), loss = grads_and_value(loss_of, cfg.inner_grad)(fast)
    return grads, loss


def response_loss_grad(model, h, sel, targets, cfg: FocusConfig):
    """For the inner loop (Eq. 3): Eq. 4's loss at the top hidden states h (B, S, D) and its
    gradient dL/dh (B, S, D), taken `cfg.loss_chunk` supervised positions at a time with
    torch.func, so at most chunk x V log-probabilities (and their gradient) exist at once.
    No supervised position: loss 0, gradient 0."""
    h_sel = h[:, :-1][sel]  # (N, D)
    N = targets.numel()
    g_sel = torch.empty_like(h_sel)  # (N, D)
    loss = torch.zeros((), device=h.device)
    for a in range(0, N, cfg.loss_chunk):
        part = slice(a, a + cfg.loss_chunk)
        (g_part,), value = grads_and_value(lambda x: chunk_loss(model, x, targets[part], N), cfg.inner_grad)(h_sel[part])
        g_sel[part] = g_part
        loss += value
    g = torch.zeros_like(h)  # positions that predict no supervised token get no gradient
    g[:, :-1][sel] = g_sel
    return loss, g


def inner_grads_by_layer(model, h_bottom, rope, mask, sel, targets, fast, cfg: FocusConfig):
    """The same grad_phi L_inner and L_inner of Eq. 3, with the adapted layers recomputed one at a
    time (activation checkpointing by hand, which torch.func allows):

      1. run the adapted layers under no_grad, keeping only each layer's input x_l;
      2. L_inner and g = dL/dh at the top, chunk by chunk (response_loss_grad);
      3. from the top layer down, recompute layer l from x_l and take the gradient of
         <layer_l(x_l, phi_l), g> w.r.t. (phi_l, x_l): that is grad_{phi_l} L_inner and the g of
         the layer below (the chain rule, one layer at a time).

    Holds one layer's activations plus one (B, S, D) tensor per adapted layer, for one extra
    forward of the adapted layers (train.py --inner-recompute on; the default with activation
    checkpointing)."""
    layers = adapted_layers(model, cfg)
    inputs, h = [], h_bottom
    for i in layers:
        inputs.append(h)
        h = model.run_layers(h, rope, mask, i, i + 1, fast, cfg.fast_scale)
    loss, g = response_loss_grad(model, h, sel, targets, cfg)
    del h
    grads = {}
    for i in reversed(layers):
        x = inputs.pop()

        def dot(phi, x=x):  # <layer_i(x, phi), g>; its gradient is g pulled back through layer i
            return (model.run_layers(x, rope, mask, i, i + 1, {i: phi}, cfg.fast_scale) * g).sum()

        if i > layers.start:
            (grads[i], g), _ = grads_and_value(dot, cfg.inner_grad)(fast[i], x)
        else:  # the lowest adapted layer's input gradient is not needed: w.r.t. phi only
            (grads[i],), _ = grads_and_value(dot, cfg.inner_grad)(fast[i])
    return {i: grads[i] for i in layers}, loss


def inner_loop(model, h_bottom, rope, mask, sel, targets, fast, cfg: FocusConfig, by_layer: bool | None = None):
    """Eq. 3: phi <- phi - eta * clip(grad_phi L_inner(theta, phi)), k times.

    L_inner is the response loss of Eq. 4 under the same mask (inner-outer consistency).
    h_bottom: the output of the layers below the adapted ones, detached (they do not depend on
    phi). Gradients are taken with torch.func w.r.t. the fast weights only, under no_grad: no
    autograd graph to the base weights is built or kept. They come layer by layer
    (inner_grads_by_layer: little memory) if by_layer, by default when model.gradient_checkpointing
    is on, otherwise from one transform (inner_grads_whole_stack: simplest, one forward less per
    step); the numbers are the same (train.py chooses with --inner-recompute). A step whose loss is not finite is skipped, without a host sync. Returns (adapted fast
    weights, (k,) inner losses: the loss before each update)."""
    by_layer = model.gradient_checkpointing if by_layer is None else by_layer
    grads_and_loss = inner_grads_by_layer if by_layer else inner_grads_whole_stack
    losses = []
    with torch.no_grad(), activation_checkpointing_off(model):
        for _ in range(cfg.inner_steps):
            grads, loss = grads_and_loss(model, h_bottom, rope, mask, sel, targets, fast, cfg)
            grads = clip_fast_grads(grads, cfg.inner_clip, cfg.clip_mode)
            ok = torch.isfinite(loss)
            fast = map_fast(lambda p, g: torch.where(ok, p - cfg.inner_lr * g, p), fast, grads)
            losses.append(loss)
    return fast, torch.stack(losses)


# -----------------------------------------------------------------------------
# One training step (the function to port)


def supervised_positions(batch):
    """sel (B, S-1): position t predicts supervised token t+1; targets (N,): those tokens."""
    sel = batch["loss_mask"][:, 1:] & batch["attention_mask"][:, 1:]
    return sel, batch["input_ids"][:, 1:][sel]


def step_mask(batch, bidirectional: bool):
    """The mask for both loops, built once per batch. For a causal mask on a right-padded batch
    `None` is exact (real tokens never look right, padding outputs are never used) and lets SDPA
    pick its fastest causal kernel (FlashAttention on GPUs)."""
    am = batch["attention_mask"]
    right_padded = bool((am[:, :-1] >= am[:, 1:]).all()) and bool(am[:, 0].all())
    if not bidirectional and right_padded:
        return None
    return build_mask(batch["loss_mask"], am, bidirectional)


def step_inputs(model, batch, cfg: FocusConfig):
    """What both loops share for a batch: token embeddings h (B, S, D), rope (cos, sin), the mask
    (Eq. 5), sel (B, S-1) and targets (N,) (see supervised_positions)."""
    sel, targets = supervised_positions(batch)
    mask = step_mask(batch, cfg.bidirectional)
    # cumsum, not arange: correct with left padding too (identical for right padding)
    position_ids = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    h = model.embed(batch["input_ids"])
    return h, model.rope(position_ids, h.dtype), mask, sel, targets


def focusft_loss(model, batch, cfg: FocusConfig, generator: torch.Generator | None = None,
                 by_layer: bool | None = None):
    """Outer loss of one micro-batch (Eq. 2) and inner-loop stats.

    batch: input_ids (B, S) long, attention_mask (B, S) bool (True = real token), loss_mask (B, S)
    bool (True = supervised response token). generator: seeds the fast-weight init (bilevel only).
    by_layer: how the inner loop takes its gradients (see inner_loop; None: recompute the adapted
    layers when model.gradient_checkpointing is on); False also keeps the outer pass's activations of
    the adapted layers. Same numbers either way; it trades time for memory.
    Returns (loss, stats); loss.backward() gives the first-order FocuSFT gradient of the base
    weights. stats: {"inner_losses": (k,) tensor or None, "n_targets": N}. A micro-batch without
    response tokens gives loss 0 whose backward still reaches every parameter (with zeros).

    NOTE for DDP: call this inside the DistributedDataParallel-wrapped module's forward; DDP only
    all-reduces gradients of a backward that follows its own forward."""
    h, rope, mask, sel, targets = step_inputs(model, batch, cfg)
    stats = {"inner_losses": None, "n_targets": targets.numel()}
    if not cfg.bilevel:
        h = model.run_layers(h, rope, mask)
        return response_loss(model, h, sel, targets, cfg.loss_chunk), stats

    layers = adapted_layers(model, cfg)
    h_bottom = model.run_layers(h, rope, mask, 0, layers.start)  # once, with autograd, for both loops
    fast = init_fast_weights(model, cfg, generator)
    by_layer = model.gradient_checkpointing if by_layer is None else by_layer
    fast, stats["inner_losses"] = inner_loop(model, h_bottom.detach(), rope, mask, sel, targets, fast, cfg,
                                          by_layer)
    # First-order: the adapted fast weights are constants here (they carry no graph). With activation
    # checkpointing on, the layers below are checkpointed; the adapted ones too if the inner loop
    # recomputed them. If it kept their activations (by_layer False), it has just held about as much
    # (under torch.func.grad, more) as the outer pass keeps of them: keeping those too leaves the
    # step's peak (nearly) where it was and saves recomputing them (memory.py counts both).
    with nullcontext() if by_layer else activation_checkpointing_off(model):
        h = model.run_layers(h_bottom, rope, mask, layers.start, layers.stop, fast, cfg.fast_scale)
    return response_loss(model, h, sel, targets, cfg.loss_chunk), stats


def adapt_on_prompt(model, input_ids, attention_mask, cfg: FocusConfig, generator: torch.Generator,
                    steps: int = 1):
    """Inference-time adaptation (paper Appendix B.3, Table 8): `steps` inner steps on the prompt
    itself (next-token loss over all prompt tokens, causal mask), with the run's fast-weight
    settings. Returns fast weights for generate.generate(model, ..., fast_weights=, fast_scale=cfg.fast_scale).
    Prompts are long and every prompt token is a target, so the layers are always recomputed one at
    a time and the loss taken in chunks: memory stays that of one layer plus one chunk of logits."""
    cfg = replace(cfg, method="causal-bilevel", inner_steps=steps)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask.bool(), "loss_mask": attention_mask.bool()}
    layers = adapted_layers(model, cfg)
    with torch.no_grad():
        h, rope, mask, sel, targets = step_inputs(model, batch, cfg)
        h_bottom = model.run_layers(h, rope, mask, 0, layers.start)
    fast = init_fast_weights(model, cfg, generator)
    fast, _ = inner_loop(model, h_bottom, rope, mask, sel, targets, fast, cfg, by_layer=True)
    return fast
