"""
The memory one GPU holds at the peak of a training step, itemised (python train.py --estimate-memory).

    python train.py --estimate-memory --max-length 32768                              # the paper's run
    python train.py --estimate-memory --max-length 16384 --inner-grad vjp --nproc 4   # another run

The estimate comes from the shapes alone: nothing is built but a meta-device model (for the
parameter list) and no data is read. A step is a sequence of phases (inner loop, the outer
backward's loss, its layers, the AdamW step); each phase adds its own tensors to the ones held all
step (weights, AdamW state, and the gradients when DDP's buckets or gradient accumulation keep
them; otherwise autograd makes them during the outer backward), and the peak is the largest phase.
Every term names the code that allocates it. The per-layer terms are per-op accounting of
model.Block under each kind of autograd (checked against one layer's measured peak: python -m
bench.bench_method --layer-memory); the whole estimate is checked against the measured peak of real
CPU steps in tests/test_memory.py. The CUDA-only terms (the kernels in memory_assumptions) are
derived, not measured. They hold for I > ~2.5 D (every Qwen2 model): a layer's backward then peaks
in its MLP.

train.py imports this file, never the reverse: the functions take train.py's TrainConfig as `cfg`
and read only its fields (model, device, dtype, max_length, batch_size, grad_accum,
grad_checkpointing, weight_decay, zero1, fsdp, focus, and `estimate`, the EstimateConfig below).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import focusft
from model import DTYPES, TINY, TINY_WORDS, Qwen2, Qwen2Config, param_groups

GiB = 2 ** 30


class EstimateError(Exception):
    """A user-facing problem (bad flags, no usable config.json): train.py prints it as its own."""


@dataclass
class EstimateConfig:
    """The flags of --estimate-memory alone (TrainConfig.estimate); a checkpoint does not record them."""
    estimate_memory: bool = False
    nproc: int = 8  # processes (GPUs) of the run to estimate: torchrun --nproc_per_node
    supervised_fraction: float = 1.0  # share of positions with a supervised target (1: the worst case)


HELP = {  # their --help texts (train.parse_args)
    "estimate_memory": "print the estimated memory per GPU of a step with these flags and exit: needs only "
                       "the model's config.json, no data, no GPU, no torchrun",
    "nproc": "--estimate-memory: the number of processes (GPUs) of the run",
    "supervised_fraction": "--estimate-memory: the share of positions with a supervised target (1: the worst case)",
}


@dataclass
class MemShape:
    """Everything the estimate depends on. Sizes in elements; `e` is bytes per element of the
    model dtype; per-token quantities below are bytes per token of the micro-batch."""
    D: int  # hidden size
    I: int  # MLP intermediate size
    L: int  # decoder layers
    H: int  # query heads
    KVH: int  # key/value heads
    hd: int  # head dim
    V: int  # vocabulary
    tied: bool  # lm_head shares the embedding
    B: int  # micro-batch rows
    S: int  # tokens per row
    N: int  # supervised positions in the micro-batch
    e: int  # bytes per element (2: bf16, 4: fp32)
    cuda: bool  # CUDA kernels (else CPU ones)
    masked: bool  # a (B, 1, S, S) mask: bidirectional methods (causal ones pass None, see step_mask)
    ckpt: bool  # activation checkpointing
    bilevel: bool  # an inner loop
    inner_grad: str  # "grad" or "vjp"
    inner_steps: int  # k
    L_a: int  # adapted layers (0 without an inner loop)
    r: int  # LoRA rank of the fast weights
    chunk: int  # --loss-chunk
    params: list  # [numel, ...] per AdamW parameter group (model.param_groups)
    world: int  # processes
    ddp: bool  # under torchrun: DistributedDataParallel with gradient_as_bucket_view
    zero1: bool  # AdamW state sharded across the processes
    fsdp: bool  # --fsdp: weights, gradients and AdamW state sharded (FSDP2, train.wrap_fsdp)
    accum: int  # micro-batches per optimizer step (--grad-accum)
    layer_params: int  # parameters of one decoder layer
    inner_recompute: bool | None = None  # the inner loop recomputes layer by layer (--inner-recompute); None: as ckpt

    def __post_init__(self):
        if self.inner_recompute is None:  # what focusft.inner_loop does when not told
            self.inner_recompute = self.ckpt

    @property
    def outer_keeps_adapted(self) -> bool:  # focusft_loss: checkpointing on, the inner loop kept its activations
        return self.bilevel and self.ckpt and not self.inner_recompute

    @property
    def grads_held(self) -> bool:  # gradients exist all step: DDP's buckets, or accumulated over micro-batches
        return self.ddp or self.accum > 1 or self.fsdp  # FSDP: their shards (1/world), see fsdp_rows

    @property
    def root_params(self) -> int:  # FSDP's root unit: embedding, lm_head (untied) and the final norm
        return self.V * self.D * (1 if self.tied else 2) + self.D

    @property
    def T(self) -> int:  # tokens of the micro-batch
        return self.B * self.S

    @property
    def X(self) -> int:  # one hidden-state tensor (B, S, D): a layer's input or output
        return self.T * self.D * self.e

    @property
    def c(self) -> int:  # supervised positions per loss piece
        return min(self.N, self.chunk)

    @property
    def F(self) -> int:  # the fp32 fast weights: (A (r, in), B (out, r)) on gate, up, down of L_a layers
        return 4 * 3 * self.r * (self.D + self.I) * self.L_a


def memory_shape(cfg, config: Qwen2Config) -> MemShape:
    """MemShape for a run with these flags (cfg.estimate.nproc processes) on a model with this config."""
    with torch.device("meta"):
        model = Qwen2(config)
    groups = [[p.numel() for p in g["params"]] for g in param_groups(model, cfg.weight_decay)]
    S, fc = cfg.max_length, cfg.focus
    cuda = torch.device(cfg.device or "cuda").type == "cuda"
    world = cfg.estimate.nproc
    ddp = world > 1 and not cfg.fsdp
    zero1 = ddp and (cfg.zero1 is None or cfg.zero1)
    n_adapted = len(focusft.adapted_layers(model, fc)) if fc.bilevel else 0
    N = min(cfg.batch_size * (S - 1), math.ceil(cfg.estimate.supervised_fraction * cfg.batch_size * (S - 1)))
    return MemShape(D=config.hidden_size, I=config.intermediate_size, L=config.num_hidden_layers,
                    H=config.num_attention_heads, KVH=config.num_key_value_heads, hd=config.head_dim,
                    V=config.vocab_size, tied=config.tie_word_embeddings, B=cfg.batch_size, S=S, N=N,
                    e=DTYPES[cfg.dtype].itemsize, cuda=cuda, masked=fc.bidirectional,
                    ckpt=cfg.grad_checkpointing, bilevel=fc.bilevel, inner_grad=fc.inner_grad,
                    inner_steps=fc.inner_steps, L_a=n_adapted, r=fc.lora_rank, chunk=fc.loss_chunk,
                    params=groups, world=world, ddp=ddp, zero1=zero1, fsdp=cfg.fsdp, accum=cfg.grad_accum,
                    layer_params=sum(p.numel() for p in model.model.layers[0].parameters()),
                    inner_recompute={"on": True, "off": False}.get(cfg.inner_recompute))


def inner_loop_peak(cfg, config: Qwen2Config, recompute: bool) -> float:
    """The estimated peak bytes per GPU of a run with these flags, the inner loop recomputing its
    layers or keeping their activations (resolve_inner_recompute weighs both)."""
    return estimate_peak(replace(memory_shape(cfg, config), inner_recompute=recompute))[0]


def device_memory(device: torch.device) -> tuple[float, str]:
    """Bytes this process may use and what they are: the GPU's total memory, or on CPU the memory
    the machine has available now (/proc/meminfo's MemAvailable), shared by the local processes."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, "the GPU's total memory"
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        free = kib * 1024
    except (OSError, StopIteration, ValueError):  # not Linux: free physical pages
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return free / local, "available memory" + (f" / {local} processes" if local > 1 else "")


  # share of the device's memory the estimate may fill (the CUDA context, fragmentation)


INNER_HEADROOM = 0.85  # share of the device's memory an estimate may fill (the CUDA context, fragmentation)


INNER_WAYS = {True: "recomputes the adapted layers one at a time (least memory)",
              False: "keeps the adapted layers' activations (faster)"}


def resolve_inner_recompute(cfg, config: Qwen2Config, device: str, world: int, available: float, what: str,
                            log=print):
    """The flags with --inner-recompute auto resolved to on or off; the choice is logged.

    Keeping the inner loop's activations saves one forward of the adapted layers per inner step;
    recomputing them is what lets long sequences fit. auto keeps them when the estimated peak per
    GPU with them (this run's shape on `world` ranks) fits INNER_HEADROOM of `available` bytes."""
    if not cfg.focus.bilevel:
        return cfg
    if cfg.inner_recompute != "auto":
        log(f"inner loop: --inner-recompute {cfg.inner_recompute}: " + INNER_WAYS[cfg.inner_recompute == "on"])
        return cfg
    shape = replace(cfg, device=device, estimate=replace(cfg.estimate, nproc=world))
    keep, recompute = (inner_loop_peak(shape, config, r) for r in (False, True))
    budget = INNER_HEADROOM * available
    choice = "off" if keep <= budget else "on"
    log(f"inner loop: --inner-recompute auto chose {choice}: " + INNER_WAYS[choice == "on"])
    log(f"  estimated peak per {device.upper()} device: {keep / GiB:.3g} GiB keeping the activations, "
        f"{recompute / GiB:.3g} GiB recomputing; budget {budget / GiB:.3g} GiB "
        f"({INNER_HEADROOM:.0%} of {available / GiB:.3g} GiB, {what})")
    return replace(cfg, inner_recompute=choice)


# --- one decoder layer (model.Block), bytes per token


def attention_saved(m: MemShape) -> float:
    """What F.scaled_dot_product_attention keeps for its backward (model.Attention): q, k, v, the
    output (also o_proj's input), the log-sum-exp (fp32, per head) and, with a mask, the mask in the
    model dtype (SDPA converts the bool mask in every call). NOTE: on CUDA with a mask, k and v are
    expanded to all heads first (the memory-efficient kernel has no GQA); the CPU kernel reads them
    in place."""
    kv = m.H * m.hd if m.cuda and m.masked else m.KVH * m.hd
    return (2 * m.H * m.hd + 2 * kv) * m.e + 4 * m.H + (m.S * m.e if m.masked else 0)


def layer_saved(m: MemShape) -> float:
    """Outer pass, no checkpointing: what one layer's autograd graph keeps until its backward.
    Each RMSNorm keeps its input in fp32 (x.float(): a copy, or in fp32 the residual stream itself,
    so this counts the layer's input), x * rsqrt(...) cast back and the scaled output (which the
    projections keep); attention; the MLP keeps gate, up, silu(gate) and their product; rsqrt."""
    return 2 * 4 * m.D + 4 * m.D * m.e + attention_saved(m) + 4 * m.I * m.e + 8


def outer_layer_peak(m: MemShape) -> float:
    """Outer backward of one layer, at its peak (the MLP's): what the layer keeps, without its
    input, plus the gradient of silu(gate) * up arriving from down_proj (twice with LoRA: through
    the weight and through the fast weights, summed after), the gradient of the layer's output,
    and silu's and the product's input gradients taking over from the product (6 I in all)."""
    input_in_fp32 = 4 * m.D if m.e == 4 else 0  # counted by the caller
    return layer_saved(m) - input_in_fp32 + 2 * m.I * m.e + m.D * m.e


def inner_layer_peak(m: MemShape, how: str, wrt_input: bool) -> float:
    """Inner loop, one layer's gradient w.r.t. its fast weights (and its input if wrt_input)
    (focusft.inner_grads_by_layer) at its peak, for the micro-batch, without the layer's input.
    vjp (first-order) peaks at down_proj's backward: what the layer keeps, plus the gradient
    arriving and 3 I of gradients (through the weight, through the fast weights, their sum).
    torch.func.grad (create_graph=True) keeps its backward graph until the transform returns and
    peaks at the end (grad_graph) or, in a layer whose input needs a gradient, at attention's
    backward: the MLP's 12 I of graph, fp32 norm intermediates, attention's inputs and gradients."""
    e, T = m.e, m.T
    own_input = 4 * m.D if e == 4 and wrt_input else 0  # fp32: the first norm keeps the input itself
    if how == "vjp":
        return (inner_layer_saved(m, wrt_input) - own_input + (3 * m.I + m.D) * e) * T
    graph = grad_graph(m, wrt_input) * T
    if not wrt_input:
        return graph
    qkv_grads = (m.H + 2 * (m.H if m.cuda and m.masked else m.KVH)) * m.hd * e
    norms = 32 * m.D + (2 * m.D * e if e < 4 else 0)
    at_attention = (12 * m.I * e + 6 * m.r * e + norms + attention_saved(m) + qkv_grads) * T + attention_workspace(m)
    return max(at_attention, graph)


def attention_workspace(m: MemShape) -> float:
    """Scratch memory of one attention backward. The CPU flash kernel takes per thread two fp32
    blocks of queries x keys (and two more in bf16): q blocks of 256 rows from 768 tokens on (64
    from 192, else 32), key blocks of 512. CUDA's memory-efficient kernel: negligible."""
    if m.cuda:
        return 0
    q_block = 256 if m.S >= 768 else 64 if m.S >= 192 else 32
    block = min(q_block, m.S) * min(512, m.S)
    return torch.get_num_threads() * 2 * block * (4 + (m.e if m.e < 4 else 0))


def loss_piece(m: MemShape, how: str | None) -> float:
    """Peak bytes of the cross-entropy of one piece of c positions (focusft.chunk_loss), in its
    backward: logits (c, V), their fp32 log-probabilities and the gradients of both (12 B per
    logit); under torch.func.grad in bf16 the fp32 upcast is kept too (14 B). how: None for the
    outer pass (autograd), else the inner loop's transform."""
    per_logit = 14 if how == "grad" and m.e < 4 else 12
    return per_logit * m.c * m.V


# --- the phases of a step: (label, bytes) rows on top of the static rows


def static_rows(m: MemShape) -> list[tuple[str, float]]:
    """Held for the whole step: weights, gradients, AdamW state (train.build_optimizer)."""
    P = sum(map(sum, m.params))
    dtype = "bf16" if m.e == 2 else "fp32"
    if m.fsdp:  # every parameter cut in `world` shards along its first dimension
        shard = fsdp_shard(m) * m.e
        grads = [(f"gradients, FSDP: 1/{m.world} of them, summed over {m.accum} micro-batches", shard)]
        return [(f"{dtype} weights, FSDP: 1/{m.world} of them", shard), *(grads if m.accum > 1 else []),
                (f"AdamW m + v, {dtype} (FSDP: 1/{m.world} of them)", 2 * shard)]
    shards = zero1_shards(m.params, m.world) if m.zero1 else [[sum(g) for g in m.params]]
    where = f"ZeRO-1: the largest of {m.world} shards" if m.zero1 else "all parameters"
    rows = [(f"{dtype} weights", P * m.e)]
    if m.grads_held:
        rows.append(("gradients (" + ("= DDP's all-reduce buckets, gradient_as_bucket_view" if m.ddp else
                                      f"param.grad, summed over {m.accum} micro-batches") + ")", P * m.e))
    return rows + [(f"AdamW m + v, {dtype} ({where})", 2 * m.e * max(map(sum, shards)))]


def fsdp_shard(m: MemShape) -> int:
    """Elements of one rank's shard of the model: each parameter cut along its first dimension
    (FSDP2 pads it to a multiple of `world`; Qwen2's sizes need no padding)."""
    return sum(-(-n // m.world) for group in m.params for n in group)


def fsdp_rows(m: MemShape, phase: str) -> list[tuple[str, float]]:
    """--fsdp (train.wrap_fsdp): what a phase holds gathered beyond the shards. The root unit
    (embedding, lm_head, final norm) is gathered from the first forward to the end of the outer
    backward (the root does not reshard after its forward); a decoder layer is gathered while it
    runs, with the neighbour its prefetch names (set_modules_to_*_prefetch), and in the inner
    loop also the layer of the walk's previous recompute. In the outer backward a layer's full
    gradient lives until its reduce-scatter (copied into a flat buffer first); lm_head's until
    the root's, at the end, with the embedding's. With one micro-batch per step the gradients'
    shards appear in the outer backward (zero_grads frees them after each step)."""
    if not m.fsdp:
        return []
    layer, root, head = m.layer_params * m.e, m.root_params * m.e, m.V * m.D * m.e
    gathered = {"inner loop": 3, "outer backward: the end": 0, "AdamW step": 0}.get(phase, 2)
    rows = [] if phase == "AdamW step" else [("FSDP: the root unit gathered (embedding, lm_head, final norm)", root)]
    if gathered:
        rows.append((f"FSDP: {gathered} decoder layers gathered", gathered * layer))
    if phase == "outer backward: layers":
        rows.append(("FSDP: a layer's full gradients and their reduce-scatter buffer", 2 * layer))
        if not m.tied:  # tied: outer_layers_rows counts it
            rows.append(("FSDP: lm_head's full gradient, until the root's reduce-scatter", head))
    if phase == "outer backward: the end":
        rows.append(("FSDP: the root's full gradients and their reduce-scatter buffer", 2 * root))
    if m.accum == 1 and phase in ("outer backward: layers", "outer backward: the end", "AdamW step"):
        made = fsdp_shard(m) if phase != "outer backward: layers" else -(-m.layer_params // m.world)
        rows.append(("FSDP: gradient shards made so far" if made < fsdp_shard(m) else
                     f"FSDP: gradients, 1/{m.world} of them", made * m.e))
    return rows


def zero1_shards(groups: list[list[int]], world: int) -> list[list[int]]:
    """Elements per parameter group on each rank as ZeroRedundancyOptimizer assigns them: group by
    group, largest parameter first, each to the rank with the fewest elements so far."""
    sizes, shards = [0] * world, [[0] * len(groups) for _ in range(world)]
    for i, group in enumerate(groups):
        for n in sorted(group, reverse=True):
            rank = sizes.index(min(sizes))
            sizes[rank] += n
            shards[rank][i] += n
    return shards


def step_input_rows(m: MemShape) -> list[tuple[str, float]]:
    """What focusft.step_inputs makes once per micro-batch and both loops use."""
    rows = [("rotary cos, sin: (B, S, hd) each", 2 * m.T * m.hd * m.e)]
    if m.masked:
        rows.append(("attention mask: bool (B, 1, S, S)", m.B * m.S ** 2))
    return rows


def outer_forward_rows(m: MemShape, layers: int, output: bool) -> list[tuple[str, float]]:
    """What the outer forward of the lowest `layers` layers keeps for its backward: each layer's
    input under checkpointing (plus the stack's output if `output`), else every layer's activations.
    With checkpointing, the adapted layers keep their activations when the inner loop kept its own."""
    def n(k):
        return f"{k} layer" + "s" * (k != 1)

    if m.ckpt:
        kept = max(0, layers - (m.L - m.L_a)) if m.outer_keeps_adapted else 0
        rows = [(f"outer forward: inputs of {n(layers - kept)}, checkpointed" + (", and their output" if output else ""),
                 (layers - kept + output) * m.X)]
        if kept:
            rows.append((f"outer forward: activations of the {n(kept)} adapted (kept, as the inner loop's)",
                         kept * layer_saved(m) * m.T))
        return rows
    rows = [(f"outer forward: activations of {n(layers)} (no checkpointing)", layers * layer_saved(m) * m.T)]
    if output:
        rows.append(("outer forward: their output", m.X))
    if m.bilevel and m.e < 4 and layers:  # focusft_loss keeps the token embeddings (fp32: layer 0 keeps them anyway)
        rows.append(("token embeddings", m.X))
    return rows


def inner_loop_rows(m: MemShape) -> list[tuple[str, float]]:
    """The inner loop's peak (focusft.inner_loop), while the outer forward holds the bottom layers'
    graph (the adapted layers run again in the outer pass, after it)."""
    rows = outer_forward_rows(m, m.L - m.L_a, output=True) + step_input_rows(m)
    return rows + (inner_by_layer_rows(m) if m.inner_recompute else inner_whole_stack_rows(m))


def inner_by_layer_rows(m: MemShape) -> list[tuple[str, float]]:
    """focusft.inner_grads_by_layer: the larger of (a) the top layer's gradient, with the inputs of
    the adapted layers below kept and dL/dh (B, S, D), or the lowest layer's (w.r.t. its fast
    weights only), and (b) the loss pieces at the top, with (N, D) hidden states and gradients."""
    how = m.inner_grad
    top = [("inner loop: adapted layers' inputs and dL/dh", m.L_a * m.X),
           (f"inner loop: the top layer's torch.func.{how}", inner_layer_peak(m, how, wrt_input=m.L_a > 1))]
    low = [("inner loop: dL/dh", m.X),
           (f"inner loop: the lowest layer's torch.func.{how}", inner_layer_peak(m, how, wrt_input=False))]
    loss = [("inner loop: adapted layers' inputs and the top output", m.L_a * m.X),
            ("inner loop: h at the supervised positions and dL/dh there: (N, D) each", 2 * m.N * m.D * m.e),
            (f"inner loop: loss piece of {m.c} positions under torch.func.{how}", loss_piece(m, how))]
    walk = max(top if m.L_a > 1 else low, low, key=lambda rows: sum(b for _, b in rows))
    walk = walk + [("inner loop: this layer's fast-weight gradients", m.F / m.L_a * (2 if m.e < 4 else 1))]
    return max(walk, loss, key=lambda rows: sum(b for _, b in rows)) + inner_fast_rows(m)


def inner_fast_rows(m: MemShape) -> list[tuple[str, float]]:
    """focusft_loss keeps the fresh fast weights while inner_loop makes new ones each step, and the
    previous step's clipped gradients live until the next step's replace them."""
    if m.inner_steps == 1:
        return [("fast weights (fp32)", m.F)]
    return [("fast weights (fp32): the fresh ones, the current ones, the last gradients", 3 * m.F)]


def inner_whole_stack_rows(m: MemShape) -> list[tuple[str, float]]:
    """focusft.inner_grads_whole_stack (--inner-recompute off): one transform over the adapted layers
    and the loss over all N positions at once. It peaks in the loss's backward, with every adapted
    layer's activations kept, or later: under torch.func.grad the layers' backward graphs stay
    until the transform returns; under vjp, the top layer's backward."""
    how, T = m.inner_grad, m.T
    saved = ((m.L_a - 1) * inner_layer_saved(m, wrt_input=True) + inner_layer_saved(m, wrt_input=False)) * T
    kept = [(f"inner loop: activations of the {m.L_a} adapted layers", saved),
            ("inner loop: their output; h at the supervised positions (N, D)", m.X + m.N * m.D * m.e)]
    at_loss = kept + [(f"inner loop: loss over all {m.N} positions", loss_piece(replace(m, chunk=m.N), how))]
    if how == "grad":
        graphs = (m.L_a - 1) * grad_graph(m, wrt_input=True) + grad_graph(m, wrt_input=False)
        later = [(f"inner loop: backward graphs of the {m.L_a} adapted layers (torch.func.grad)", graphs * T),
                 ("inner loop: the loss's backward graph: fp32 (N, V) twice", 8 * m.N * m.V)]
    else:
        later = kept[:1] + [("inner loop: the top layer's gradients", (3 * m.I + m.D) * m.e * T)]
    return max(at_loss, later, key=lambda rows: sum(b for _, b in rows)) + [
        ("inner loop: fast-weight gradients", m.F)] + inner_fast_rows(m)


def inner_layer_saved(m: MemShape, wrt_input: bool) -> float:
    """Inner loop, first-order, per token: what one layer keeps for its backward under torch.func
    (base weights constant): both norms' fp32 inputs, the second norm's output (LoRA's A keeps it),
    attention, the MLP's 4 I and the LoRA products x A^T (r each). The lowest adapted layer, whose
    input needs no gradient, keeps only its MLP's part."""
    mlp = m.D * m.e + 4 * m.I * m.e + 3 * m.r * m.e
    return 2 * 4 * m.D + attention_saved(m) + mlp + 8 if wrt_input else mlp


def grad_graph(m: MemShape, wrt_input: bool) -> float:
    """Per token, what torch.func.grad (create_graph=True) keeps of one layer once its backward
    is done: the twice-differentiable graph of the MLP (12 I; 13 I in the lowest layer) and of
    the RMSNorms (fp32), the LoRA products and their gradients."""
    e, D, lora = m.e, m.D, 3 * m.r * m.e + 8
    if not wrt_input:
        return 13 * m.I * e + 2 * D * e + lora
    return 12 * m.I * e + 44 * D + (3 * D * e if e < 4 else D * e) + 2 * lora


def outer_loss_rows(m: MemShape) -> list[tuple[str, float]]:
    """The start of the outer backward: the loss pieces run again one at a time (focusft.response_loss
    checkpoints them) while everything the outer forward kept waits."""
    rows = outer_forward_rows(m, m.L, output=False) + step_input_rows(m) + fast_weight_rows(m)
    rows += [("outer loss: h at the supervised positions and its gradient: (N, D) each", 2 * m.N * m.D * m.e),
             (f"outer loss: loss piece of {m.c} positions", loss_piece(m, None))]
    if m.N > m.chunk:  # autograd sums lm_head's gradient over the pieces (tied: and keeps it until the embedding's)
        rows.append(("outer loss: lm_head's gradient, summed over the pieces", m.V * m.D * m.e))
    return rows


def outer_layers_rows(m: MemShape, lowest: bool = False) -> list[tuple[str, float]]:
    """The outer backward through the top layer, with all layers below still waiting (the largest
    with DDP), or, if `lowest`, through the lowest layer, with the gradients of all others made
    (param.grad without DDP, on the first micro-batch: autograd makes them during the backward)."""
    where = "lowest" if lowest else "top"
    rows = outer_forward_rows(m, 1 if lowest else m.L, output=False) + step_input_rows(m) + fast_weight_rows(m)
    kept = m.outer_keeps_adapted and (not lowest or m.L_a == m.L)  # this layer's activations kept, not recomputed
    if m.ckpt and not kept:
        rows.append((f"outer backward: the {where} layer recomputed, its backward", outer_layer_peak(m) * m.T))
    else:
        rows.append((f"outer backward: the {where} layer's gradients", (2 * m.I * m.e + m.D * m.e) * m.T))
    if m.bilevel:  # down_proj's weight gradient is made before it is added to .grad
        rows.append(("outer backward: a weight gradient, D x I, before it is added", m.D * m.I * m.e))
    if m.tied:
        rows.append(("outer backward: lm_head's gradient, until the embedding's", m.V * m.D * m.e))
    if not m.grads_held:
        made = sum(map(sum, m.params)) - m.V * m.D - (1 if lowest else m.L) * m.layer_params  # tied: see above
        rows.append(("param.grad of " + ("all but the lowest layer and the embedding" if lowest else
                                         ("lm_head and " if not m.tied else "") + "the final norm"), made * m.e))
    return rows


def fast_weight_rows(m: MemShape) -> list[tuple[str, float]]:
    """The adapted fast weights, constants of the outer pass (and their bf16 copies, kept by the
    graph when the layers are not checkpointed)."""
    if not m.bilevel:
        return []
    rows = [("fast weights (fp32), constants of the outer pass", m.F)]
    if m.e < 4 and (not m.ckpt or m.outer_keeps_adapted):
        rows.append(("fast weights cast to bf16, kept by the graph", m.F * m.e // 4))
    return rows


def optimizer_rows(m: MemShape) -> list[tuple[str, float]]:
    """AdamW's step: fused on CUDA (no temporaries); foreach on CPU: torch._foreach_sqrt of the
    second moments makes one temporary as large as the param group (this rank's shard of it)."""
    rows = [] if m.grads_held else [("gradients (param.grad)", sum(map(sum, m.params)) * m.e)]
    if m.cuda:
        return rows + [("AdamW step: fused kernel", 0)]
    shards = zero1_shards(m.params, m.world) if m.zero1 else [[sum(g) for g in m.params]]
    if m.fsdp:
        shards = [[sum(-(-n // m.world) for n in g) for g in m.params]]
    return rows + [("AdamW step: sqrt(v) of the largest param group (foreach)", m.e * max(max(s) for s in shards))]


def memory_phases(m: MemShape) -> dict[str, list[tuple[str, float]]]:
    """Each phase's rows (the static ones are not repeated)."""
    phases = {}
    if m.bilevel:
        phases["inner loop"] = inner_loop_rows(m)
    phases["outer backward: loss"] = outer_loss_rows(m)
    phases["outer backward: layers"] = outer_layers_rows(m)
    if not m.grads_held:
        phases["outer backward: the lowest layer"] = outer_layers_rows(m, lowest=True)
    if m.fsdp:
        phases["outer backward: the end"] = step_input_rows(m) + fast_weight_rows(m)
    phases["AdamW step"] = optimizer_rows(m)
    return {name: rows + fsdp_rows(m, name) for name, rows in phases.items()}


def estimate_peak(m: MemShape) -> tuple[float, str]:
    """The estimated peak bytes per GPU and the phase where it occurs."""
    static = sum(b for _, b in static_rows(m))
    totals = {name: sum(b for _, b in rows) for name, rows in memory_phases(m).items()}
    name = max(totals, key=totals.get)
    return static + totals[name], name


# --- the command


def estimate_model_config(cfg) -> Qwen2Config:
    """--model's config without its weights: "tiny", a directory with a config.json, or a hub id
    whose config.json is in the Hugging Face cache or, failing that, fetched (one small file)."""
    if cfg.model == "tiny":
        return Qwen2Config(**TINY)
    if cfg.model == "tiny-words":  # its vocabulary is fitted on the data; TINY's 272 bounds the demo's
        return Qwen2Config(**TINY_WORDS)
    path = Path(cfg.model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise EstimateError(f"{path.parent} has no config.json")
    elif path.exists() or cfg.model.count("/") != 1:
        raise EstimateError(f"--model {cfg.model!r} is neither a directory nor a hub id like 'Qwen/Qwen2.5-7B'")
    else:
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
        try:
            path = Path(hf_hub_download(cfg.model, "config.json", local_files_only=True))
        except Exception:  # not cached. NOTE: the metadata request fails at once offline, where
            try:              # hf_hub_download alone retries for about 25 s
                get_hf_file_metadata(hf_hub_url(cfg.model, "config.json"), timeout=10)
                path = Path(hf_hub_download(cfg.model, "config.json"))
            except Exception as e:  # offline, unknown repository, ...: all mean "no config"
                raise EstimateError(f"no config.json for {cfg.model!r} in the Hugging Face cache, and fetching it "
                                    f"failed ({type(e).__name__}); pass a directory holding its config.json") from None
    try:
        return Qwen2Config.from_hf(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise EstimateError(f"{path}: invalid JSON ({e})") from None
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:  # e.g. a size that is not a number
        raise EstimateError(f"{path}: not a Qwen2 config ({type(e).__name__}: {e})") from None


def memory_assumptions(m: MemShape) -> list[str]:
    """What the estimate takes for granted, printed under its title."""
    if m.cuda:
        kernels = ["as if on CUDA GPUs (--device cpu: CPU kernels): fused AdamW (no temporaries); SDPA's " + (
            "memory-efficient kernel, the (B, 1, S, S) mask converted to the model dtype in every attention "
            "call, k and v expanded to all heads (model.Attention)" if m.masked else
            "flash kernel (causal: no mask; grouped k and v read in place)")]
    else:
        kernels = ["CPU kernels: foreach AdamW; SDPA's CPU flash kernel (the mask converted to the model dtype "
                   "in every attention call; grouped k and v read in place)"]
    return kernels + [
        "not counted: the CUDA context (~0.5-1 GiB), NCCL's buffers, the caching allocator's "
        "fragmentation and cuBLAS workspaces: keep 10-15 % headroom",
        "an estimate from per-op accounting, checked against measured CPU steps (tests/test_memory.py), "
        "not against a GPU: compare torch.cuda.max_memory_allocated() after the first steps"]


def print_memory_estimate(cfg):
    """--estimate-memory: the itemised estimate per GPU, phase by phase, and the peak."""
    if cfg.fsdp and cfg.zero1:
        raise EstimateError("--fsdp already shards the AdamW state; drop --zero1")
    if cfg.estimate.nproc < 1 or not 0 < cfg.estimate.supervised_fraction <= 1:
        raise EstimateError("--nproc must be >= 1 and --supervised-fraction in (0, 1]")
    config = estimate_model_config(cfg)
    try:
        m = memory_shape(cfg, config)
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as e:  # sizes no model can have
        raise EstimateError(f"--model {cfg.model}: its config makes no Qwen2 model ({type(e).__name__}: {e})") from None
    fc = cfg.focus
    run = (f"{m.world} processes: FSDP2" if m.fsdp else f"{m.world} processes: DDP" + (" + ZeRO-1" if m.zero1 else "")
           if m.ddp else "1 process (python train.py: no DDP)")
    print(f"Estimated memory per GPU of one training step: --model {cfg.model} "
          f"({sum(map(sum, m.params)) / 1e9:.2f}B parameters), {run}")
    print(f"  {fc.method}, {cfg.dtype}, batch {m.B} x {m.S:,} tokens, {m.N:,} supervised positions"
          + (" (all: the worst case)" if m.N == m.B * (m.S - 1) else "")
          + f", grad accumulation {m.accum}, activation checkpointing {'on' if m.ckpt else 'off'}")
    print(f"  loss chunk {fc.loss_chunk}" + (f", inner grad {fc.inner_grad}, {fc.inner_steps} inner steps on "
                                             f"{m.L_a} adapted layers, LoRA rank {m.r}, the inner loop "
                                             + ("recomputing its layers" if m.inner_recompute else "keeping its activations")
                                             + f" (--inner-recompute {cfg.inner_recompute})" if m.bilevel else ""))
    for line in memory_assumptions(m):
        print(f"  {line}")
    static = static_rows(m)
    phases = memory_phases(m)
    totals = {name: sum(b for _, b in rows) for name, rows in phases.items()}
    worst = max(totals, key=totals.get)
    print(f"\n  {'held all step':<78} {'GiB':>7}")
    for label, b in static:
        print(f"    {label:<76} {b / GiB:7.2f}")
    for name, rows in phases.items():
        print(f"  {name + (' (the peak)' if name == worst else ''):<78} {totals[name] / GiB:7.2f}")
        for label, b in rows:
            print(f"    {label:<76} {b / GiB:7.2f}")
    peak = sum(b for _, b in static) + totals[worst]
    if m.bilevel and cfg.inner_recompute == "auto":  # resolve_inner_recompute
        keep, recompute = (estimate_peak(replace(m, inner_recompute=r))[0] / GiB for r in (False, True))
        print(f"\n--inner-recompute auto: {keep:.1f} GiB keeping the inner loop's activations, {recompute:.1f} GiB "
              f"recomputing; a run keeps them when the first fits {INNER_HEADROOM:.0%} of its device's memory")
    print(f"\npeak per GPU: {peak / GiB:.1f} GiB")
