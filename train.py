"""
Fine-tune a Qwen2 / Qwen2.5 model with FocuSFT (or one of its ablations).

    python train.py --preset demo                                  # tiny model, bundled data, CPU, minutes
    torchrun --nproc_per_node 8 train.py --data hf:Gen-Verse/Open-AgentRL-SFT-3K   # the paper's run: Qwen2.5-7B, bf16
    python train.py --estimate-memory --max-length 32768                           # its memory per GPU, itemised

`main` reads as its phases: setup -> output dir -> data -> model -> optimizer -> resume -> loop
(train_step, log, save) -> final checkpoint. `train_step` is one optimizer step and is also what
bench/bench_train.py times, so what is measured is what is trained.

Every rank runs its own inner loop (no communication); DDP all-reduces the outer gradients once
per optimizer step. With more than one process the AdamW state is sharded across ranks (ZeRO-1).
`--fsdp` shards weights, gradients and AdamW state instead (FSDP2), for models that do not fit
on a GPU with DDP (Qwen2.5 14B and up); same results, more communication (see wrap_fsdp).
`--resume` continues bit-exactly from the newest checkpoint in --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import focusft
from checkpoint import resolve_checkpoint
from model import TINY, ModelError, Qwen2, Qwen2Config, RMSNorm


class TrainError(Exception):
    """A user-facing problem (bad flags, refused output dir, ...): printed without a traceback.
    Rank 0 prints it, unless it concerns one rank only (every_rank=True)."""

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


@dataclass
class TrainConfig:
    """Defaults are the paper's (Appendix A, Table 5) and the authors' launch script. The method's
    own settings (--method, --inner-steps, --lora-rank, ...) are focusft.FocusConfig's, in `focus`."""
    # what to train
    model: str = "Qwen/Qwen2.5-7B"  # hub id, local HF directory, or "tiny" / "tiny-words" (random, see TINY_WORDS)
    data: str = ""  # .jsonl/.parquet file, directory, glob or hf:owner/name[@rev][:split|pattern]; comma-separated
    messages_key: str = "messages"  # the column (parquet) or key (JSONL) of the messages
    tools_key: str = "tools"  # ... and of the tools
    out: str = "runs/focusft"
    max_length: int = 4096
    truncation: str = "right"  # right | left | drop | error
    # outer loop
    epochs: int = 5
    batch_size: int = 1  # per device
    grad_accum: int = 4  # 8 GPUs x 1 x 4 = 32 sequences per optimizer step
    lr: float = 1e-5
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01  # not on biases and norm weights (as HF Trainer)
    warmup_ratio: float = 0.1  # linear warm-up, then cosine to 0
    max_grad_norm: float = 1.0
    max_steps: int = 0  # > 0 caps the run (and the schedule)
    loss_norm: str = "mean"  # mean (the authors') | tokens
    seed: int = 1234
    dtype: str = "bf16"  # bf16 (weights in bfloat16, as the authors) | fp32
    grad_checkpointing: bool = True
    group_by_length: bool = False
    zero1: bool | None = None  # shard the AdamW state across ranks; None: on when more than one process
    fsdp: bool = False  # shard weights, gradients and AdamW state across ranks (FSDP2; torchrun only)
    # bookkeeping
    save_every: int = 0  # write out/step-N/ every N optimizer steps (0: only the final model)
    resume: bool = False
    overwrite: bool = False
    device: str = ""  # default: cuda:LOCAL_RANK if CUDA is available, else cpu
    threads: int = 0  # CPU threads of torch's operators (0: torch's default, one per core)
    backend: str = ""  # default: nccl on CUDA, gloo on CPU
    # --estimate-memory: print the estimated memory per GPU of a step with these flags; trains nothing
    estimate_memory: bool = False
    nproc: int = 8  # processes (GPUs) of the run to estimate: torchrun --nproc_per_node
    supervised_fraction: float = 1.0  # share of positions with a supervised target (1: the worst case)
    # the method (paper defaults live in focusft.FocusConfig, declared once)
    focus: focusft.FocusConfig = field(default_factory=focusft.FocusConfig)

    def settings(self) -> dict:
        """Every setting as one flat dict (what a checkpoint records)."""
        d = asdict(self)
        for k in ESTIMATE_ONLY:  # not a training setting
            del d[k]
        return {**d.pop("focus"), **d}


PRESETS = {
    # A CPU run of a few minutes: FocuSFT on the bundled agentic task (examples/make_agentic.py)
    # with a random 2-layer Qwen2 and a word-level tokenizer fitted on the data ("tiny-words").
    # Larger lr and batch than the paper's: it trains from scratch.
    "demo": dict(model="tiny-words", data="examples/agentic.jsonl", out="runs/demo", max_length=512, epochs=7,
                 batch_size=32, grad_accum=1, lr=3e-3, weight_decay=0.0, warmup_ratio=0.02, dtype="fp32",
                 grad_checkpointing=False, max_steps=800, save_every=100, threads=1),
}

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CHOICES = {"method": list(focusft.METHODS), "dtype": list(DTYPES), "loss_norm": ["mean", "tokens"],
           "clip_mode": ["per-tensor", "global"], "inner_grad": ["grad", "vjp"],
           "truncation": list(data.TRUNCATION_POLICIES), "backend": ["", "nccl", "gloo"]}
FOCUS_FLAGS = [f for f in fields(focusft.FocusConfig) if f.name != "targets"]
HELP = {  # flags whose default alone does not say what they do
    "model": "hub id, local HF checkpoint directory, 'tiny' (a random 0.8M-parameter Qwen2, byte tokenizer) or "
             "'tiny-words' (a random 0.1M-parameter Qwen2, word-level tokenizer fitted on --data)",
    "data": ".jsonl/.parquet file, directory, glob, or hf:owner/name[@revision][:split|pattern]; comma-separated",
    "zero1": "shard the AdamW state across ranks (default: on when more than one process runs)",
    "fsdp": "shard weights, gradients and AdamW state across ranks (FSDP2; under torchrun)",
    "method": "the paper's 2x2 ablation (Table 3)",
    "inner_grad": "grad: torch.func.grad; vjp: the same gradients, less memory",
    "loss_chunk": "supervised positions per piece of the cross-entropy (bounds the N x vocab log-probs)",
    "save_every": "write OUT/step-N/ (with optimizer and RNG state) every N optimizer steps; 0: final model only",
    "estimate_memory": "print the estimated memory per GPU of a step with these flags and exit: needs only "
                       "the model's config.json, no data, no GPU, no torchrun",
    "nproc": "--estimate-memory: the number of processes (GPUs) of the run",
    "supervised_fraction": "--estimate-memory: the share of positions with a supervised target (1: the worst case)",
}


def parse_args(argv=None) -> TrainConfig:
    """Flags from TrainConfig's and FocusConfig's fields (kebab-case); a preset, then flags, override defaults."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named preset; flags override it")
    for f in [f for f in fields(TrainConfig) if f.name != "focus"] + FOCUS_FLAGS:
        flag = "--" + f.name.replace("_", "-")
        if f.type.startswith("bool"):
            default = f"default: {f.default}"
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=HELP[f.name] if f.name in HELP and f.default is None else
                           "; ".join(filter(None, (HELP.get(f.name), default))))
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), default=None,
                           choices=CHOICES.get(f.name),
                           help="; ".join(filter(None, (HELP.get(f.name), f"default: {f.default!r}"))))
    args = vars(p.parse_args(argv))
    preset = PRESETS[args.pop("preset")] if args.get("preset") else {}
    args.pop("preset", None)
    given = {**preset, **{k: v for k, v in args.items() if v is not None}}
    focus_names = {f.name for f in FOCUS_FLAGS}
    try:
        focus = focusft.FocusConfig(**{k: v for k, v in given.items() if k in focus_names})
    except ValueError as e:  # e.g. --inner-steps 0
        raise TrainError(str(e)) from None
    return TrainConfig(**{k: v for k, v in given.items() if k not in focus_names}, focus=focus)


class FocuSFTStep(nn.Module):
    """The whole FocuSFT step as one forward, so that DDP (or FSDP's root) sees it.

    NOTE: DDP only all-reduces the gradients of a backward that follows the wrapper's forward;
    calling focusft_loss(model, ...) directly under DDP would silently skip the all-reduce."""

    def __init__(self, model: Qwen2, fcfg: focusft.FocusConfig):
        super().__init__()
        self.model, self.fcfg = model, fcfg
        self.sharded = False  # True once wrap_fsdp has made this module FSDP's root

    def forward(self, batch, generator):
        if not self.sharded:
            return focusft.focusft_loss(self.model, batch, self.fcfg, generator)
        # NOTE: the inner loop's backward (torch.func) runs inside this forward and passes FSDP's
        # hooks on the adapted blocks; at its end FSDP's root post-backward callback reshards every
        # group, by default the root's too (embedding, final norm, lm_head), and the next inner
        # step or the outer loss would meet sharded DTensors. So while the forward runs, the root
        # keeps its parameters after a backward, and no backward is "the last one" (on the last,
        # the outer backward, FSDP waits for its reduce-scatters and resets its prefetch order).
        self.set_reshard_after_backward(False, recurse=False)
        self.set_is_last_backward(False)
        try:
            return focusft.focusft_loss(self.model, batch, self.fcfg, generator)
        finally:
            self.set_reshard_after_backward(True, recurse=False)
            self.set_is_last_backward(True)


# Settings a resumed run must share with the run it continues (data order, schedule, method).
RESUME_MUST_MATCH = ("data", "messages_key", "tools_key", "method", "max_length", "truncation", "epochs",
                     "batch_size", "grad_accum", "lr", "warmup_ratio", "max_steps", "seed", "group_by_length",
                     "loss_norm", "fsdp")


# -----------------------------------------------------------------------------
# Setup: processes and device


@dataclass
class Runtime:
    """Who this process is in the run."""
    rank: int
    world: int
    device: torch.device
    distributed: bool  # launched by torchrun

    @property
    def main(self) -> bool:
        return self.rank == 0

    def log(self, *args, **kwargs):
        if self.main:
            print(*args, **kwargs, flush=True)


def setup(cfg: TrainConfig) -> Runtime:
    """Rank, device (cuda:LOCAL_RANK when there are GPUs) and, under torchrun, the process group."""
    distributed = "RANK" in os.environ
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if cfg.device:
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:  # under torchrun: one GPU per local rank
            device = torch.device("cuda", local_rank)
    elif torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise TrainError(f"local rank {local_rank} has no GPU: --nproc_per_node is larger than the "
                             f"{torch.cuda.device_count()} visible GPU(s)", every_rank=True)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = cfg.backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise TrainError("--backend nccl needs CUDA GPUs; use gloo on CPU (the default there)")
    if not cfg.data:
        raise TrainError("--data is required (conversations: a .jsonl or .parquet file, a directory or glob of them, "
                         "or hf:owner/name), or use --preset demo")
    if cfg.threads > 0:  # the demo's 0.1M-parameter model: its matmuls are too small to share
        torch.set_num_threads(cfg.threads)
    if cfg.fsdp and not distributed:
        raise TrainError("--fsdp shards the model across processes: launch with torchrun")
    if cfg.fsdp and cfg.zero1:
        raise TrainError("--fsdp already shards the AdamW state; drop --zero1")
    if cfg.fsdp and tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 13):
        raise TrainError(f"--fsdp needs torch >= 2.13 (FSDP2 under torch.func), not {torch.__version__}")
    if distributed:
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Runtime(rank, world, device, distributed)


def prepare_output(cfg: TrainConfig, rt: Runtime) -> tuple[Path, Path | None]:
    """--out, never mixing two runs; and the checkpoint to resume from, if any."""
    out = Path(cfg.out)
    resume_from = newest_checkpoint(out) if cfg.resume else None
    if not (cfg.resume or cfg.overwrite) and out.exists() and any(out.iterdir()):
        raise TrainError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    if rt.main:
        if cfg.overwrite and not cfg.resume:
            shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
    if cfg.resume and resume_from is None:
        rt.log(f"--resume: no checkpoint in {out}, starting from scratch")
    return out, resume_from


def newest_checkpoint(out: Path) -> Path | None:
    """The newest complete out/step-N/ (directories appear by atomic rename, so complete = present)."""
    steps = [(int(p.name[5:]), p) for p in out.glob("step-*") if p.name[5:].isdigit() and (p / "train_state.pt").is_file()]
    return max(steps)[1] if steps else None


# -----------------------------------------------------------------------------
# Data


@dataclass
class Plan:
    """The data and the schedule: which samples, how many steps."""
    samples: list
    lengths: list[int]
    steps_per_epoch: int
    total_steps: int


def load_tokenizer(cfg: TrainConfig):
    """The tokenizer and the checkpoint directory (None for the random models, see RANDOM_MODELS)."""
    if cfg.model == "tiny":
        return data.byte_tokenizer(), None
    if cfg.model == "tiny-words":  # a vocabulary of the training data's words (read twice: it is small)
        convs = data.read_conversations(cfg.data, cfg.messages_key, cfg.tools_key, log=lambda s: None)
        return data.word_tokenizer(data.render_chat(m, t)[0] for _, m, t in convs), None
    model_dir = resolve_checkpoint(cfg.model)
    try:  # a model that is not Qwen2 fails here, before minutes of data loading
        Qwen2Config.from_hf(json.loads((model_dir / "config.json").read_text()))
    except json.JSONDecodeError as e:
        raise ModelError(f"{model_dir / 'config.json'}: invalid JSON ({e})") from None
    return data.load_tokenizer(model_dir), model_dir


def plan_data(cfg: TrainConfig, tokenizer, rt: Runtime) -> Plan:
    samples = data.load_dataset(cfg.data, tokenizer, cfg.max_length, cfg.truncation, log=rt.log,
                                messages_key=cfg.messages_key, tools_key=cfg.tools_key)
    lengths = [len(s.input_ids) for s in samples]
    n_micro = len(data.epoch_batches(lengths, cfg.batch_size, cfg.seed, 0, rt.rank, rt.world))  # same every epoch
    steps_per_epoch = math.ceil(n_micro / cfg.grad_accum)
    total = cfg.epochs * steps_per_epoch
    return Plan(samples, lengths, steps_per_epoch, min(total, cfg.max_steps) if cfg.max_steps > 0 else total)


def micro_batches(cfg: TrainConfig, plan: Plan, tokenizer, step: int, rt: Runtime, cache: dict) -> list[dict]:
    """This rank's grad_accum micro-batches of optimizer step `step` (a pure function of the step)."""
    epoch, j = divmod(step, plan.steps_per_epoch)
    if epoch not in cache:  # one epoch's order at a time
        cache.clear()
        cache[epoch] = data.epoch_batches(plan.lengths, cfg.batch_size, cfg.seed, epoch, rt.rank, rt.world,
                                          cfg.group_by_length)
    idx = cache[epoch][j * cfg.grad_accum:(j + 1) * cfg.grad_accum]
    return [data.collate([plan.samples[i] for i in b], tokenizer.pad_token_id) for b in idx]


# -----------------------------------------------------------------------------
# Model and optimizer


# The random models (--model NAME, no download), for CPU runs and tests. "tiny": the byte tokenizer
# (data.byte_tokenizer) and model.TINY. "tiny-words": a word-level tokenizer fitted on the training
# data (data.word_tokenizer), and a model small and fast enough for the CPU demo to learn its
# retrieval task in minutes: 2 layers (the fewest that can look a name up: one attention layer
# moves each value onto the name next to it, the next matches the question's name), hidden 64,
# 0.1M parameters. NOTE: initializer_range 0.1, not HF's 0.02: at width 64, 0.02 makes q.k ~100x
# smaller than 1/sqrt(d)-scaled weights would, and attention learns nothing for hundreds of steps
# (measured on the demo task: no lookup at all after 500 steps at 0.02; at 0.1 it starts by step 200).
TINY_WORDS = dict(TINY, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.1)


def random_config(cfg: TrainConfig, tokenizer) -> Qwen2Config:
    """The config of the random model named by --model (see TINY_WORDS)."""
    if cfg.model == "tiny":
        return Qwen2Config(**TINY)
    vocab = -(-tokenizer.tk.get_vocab_size() // 16) * 16  # padded, as real vocabularies are
    return Qwen2Config(**dict(TINY_WORDS, vocab_size=vocab, eos_token_id=tokenizer.eos_token_id))


def build_model(cfg: TrainConfig, rt: Runtime, source: Path | Qwen2Config) -> Qwen2:
    """From a checkpoint directory, or a random model of the given config (the same init on every rank)."""
    dtype = DTYPES[cfg.dtype]
    torch.manual_seed(cfg.seed)
    if isinstance(source, Path):
        model = Qwen2.from_pretrained(source, dtype=dtype, device=rt.device)
    else:
        model = Qwen2(source).to(device=rt.device, dtype=dtype)
    model.config.torch_dtype = str(dtype).replace("torch.", "")
    model.gradient_checkpointing = cfg.grad_checkpointing
    return model


def wrap(model: Qwen2, cfg: TrainConfig, rt: Runtime) -> nn.Module:
    """The step as a module, inside DDP under torchrun. gradient_as_bucket_view: the gradients live
    in DDP's all-reduce buckets instead of beside them (one model-sized buffer less)."""
    step_module = FocuSFTStep(model, cfg.focus)
    if not rt.distributed:
        return step_module
    return DDP(step_module, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
               gradient_as_bucket_view=True)


def wrap_fsdp(cfg: TrainConfig, rt: Runtime, source: Path | Qwen2Config) -> tuple[Qwen2, FocuSFTStep]:
    """--fsdp: the model and the step as FSDP2's root. Every rank builds the model on the meta device
    and shards it: one group per decoder block, the root group holds embedding, final norm and
    lm_head. Rank 0 alone reads the weights (into host memory) and broadcasts them shard by shard.

    FSDP gathers a block's weights for each use and frees them after: an adapted block is gathered
    at every use by the inner loop (with checkpointing: its no_grad forward, then the recompute
    and backward of the top-down walk, per inner step) and by the outer pass; the others only by
    the outer pass. At most the root and a few blocks are unsharded at once."""
    full = build_model(cfg, replace(rt, device=torch.device("cpu")), source) if rt.main else None
    if isinstance(source, Path):
        config = Qwen2Config.from_hf(json.loads((source / "config.json").read_text()))
    else:
        config = source
    with torch.device("meta"):
        model = Qwen2(config).to(DTYPES[cfg.dtype])
    model.config.torch_dtype = str(DTYPES[cfg.dtype]).replace("torch.", "")
    model.gradient_checkpointing = cfg.grad_checkpointing
    model.source_dir = full.source_dir if rt.main else None
    step_module = FocuSFTStep(model, cfg.focus)
    mesh = init_device_mesh(rt.device.type, (rt.world,))
    blocks = list(model.model.layers)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(step_module, mesh=mesh)
    step_module.sharded = True
    # NOTE: FSDP's default prefetch follows the order of the last forward; the inner loop runs the
    # top blocks several times within one, so name the neighbours instead.
    for i, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[i + 1:i + 2])
        block.set_modules_to_backward_prefetch(blocks[i - 1:i] if i else [])
    step_module.to_empty(device=rt.device)
    weights = {"model." + k: v for k, v in full.state_dict().items()} if rt.main else {}
    set_model_state_dict(step_module, weights,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model, step_module


def param_groups(model: nn.Module, weight_decay: float):
    """Weight decay on matrices only; none on biases and RMSNorm weights (HF Trainer's rule)."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, RMSNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied weights appear once
        (no_decay if name.endswith(".bias") or id(p) in norm_params else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (HF's cosine schedule)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(model: Qwen2, cfg: TrainConfig, rt: Runtime, total_steps: int):
    """AdamW (fused kernel on CUDA: no optimizer-sized temporaries; foreach on CPU), its state
    sharded across ranks with ZeRO-1 when asked (default: when more than one process runs), and
    the warm-up + cosine schedule. Fast weights are never here: they are not Parameters."""
    kernel = {"fused": True} if rt.device.type == "cuda" else {"foreach": True}
    adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kernel)
    groups = param_groups(model, cfg.weight_decay)
    if use_zero1(cfg, rt):
        # Each rank keeps and updates the AdamW state of 1/world of the parameters, then broadcasts
        # them; gradients are still all-reduced in full by DDP, so clipping sees the whole norm.
        optimizer = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **adam)
    else:
        optimizer = torch.optim.AdamW(groups, **adam)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, total_steps, warmup))
    return optimizer, scheduler


def use_zero1(cfg: TrainConfig, rt: Runtime) -> bool:
    if cfg.fsdp:
        return False  # FSDP's AdamW state is sharded already (its parameters are)
    return rt.distributed and rt.world > 1 if cfg.zero1 is None else cfg.zero1 and rt.distributed


# -----------------------------------------------------------------------------
# One optimizer step (train.py's loop and bench/bench_train.py both call this)


class NonFiniteStep(Exception):
    """The loss or the gradient norm of a step is not finite; the step was not applied."""


@dataclass
class StepStats:
    loss: float  # the loss as optimised, averaged over ranks
    grad_norm: float  # before clipping
    inner_first: float  # inner-loop loss before the first update (mean over micro-batches and ranks)
    inner_last: float  # inner-loop loss before the last update (0 for the methods without inner loop)
    supervised_tokens: int  # over all ranks
    tokens: int  # real (non-padding) tokens over all ranks


def train_step(step_module, model, optimizer, scheduler, batches, generator, cfg: TrainConfig,
               rt: Runtime) -> StepStats:
    """Forward + backward of this rank's micro-batches (DDP all-reduces once, after the last),
    clip, AdamW, schedule. Raises NonFiniteStep, without applying it, on a non-finite loss or norm."""
    n_sup = [int((b["loss_mask"][:, 1:] & b["attention_mask"][:, 1:]).sum()) for b in batches]
    # summed over micro-batches, then over ranks: [loss as optimised, inner first, inner last,
    # supervised tokens, real tokens]
    totals = torch.tensor([0.0, 0.0, 0.0, sum(n_sup), sum(int(b["attention_mask"].sum()) for b in batches)],
                          dtype=torch.float64, device=rt.device)
    if cfg.loss_norm == "tokens":  # the global supervised-token count is needed before any backward
        n_global = totals[3].clone()
        if rt.distributed:
            dist.all_reduce(n_global)
        n_global = n_global.item()
    for k, batch in enumerate(batches):
        batch = {name: t.to(rt.device, non_blocking=True) for name, t in batch.items()}
        last = k == len(batches) - 1
        # FSDP reduce-scatters every micro-batch: deferring it would hold the whole model's gradients
        defer = rt.distributed and not last and not cfg.fsdp
        with step_module.no_sync() if defer else contextlib.nullcontext():
            loss, info = step_module(batch, generator)
            if cfg.loss_norm == "mean":  # the authors': mean per micro-batch, averaged over micro-batches (and ranks, by DDP)
                scaled = loss / len(batches)
            else:  # sum over all supervised tokens of the step / their global count (DDP averages over ranks: x world)
                scaled = loss * (n_sup[k] * rt.world / n_global)
            scaled.backward()
        totals[0] += scaled.detach().double()
        if info["inner_losses"] is not None:
            totals[1] += info["inner_losses"][0].double() / len(batches)
            totals[2] += info["inner_losses"][-1].double() / len(batches)
    if rt.distributed:
        dist.all_reduce(totals)
        totals[:3] /= rt.world
    loss_value = totals[0].item()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):  # a finite loss may have an inf gradient
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStep(f"loss ({loss_value})" if not math.isfinite(loss_value) else f"gradient norm ({grad_norm})")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss_value, grad_norm, totals[1].item(), totals[2].item(), int(totals[3]), int(totals[4]))


# -----------------------------------------------------------------------------
# Checkpoints and resume


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
             "fast_weights": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    generator.set_state(state["fast_weights"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, step: int, run: dict, with_state: bool):
    """Write an HF checkpoint (+ train_state.pt: optimizer, schedule, position, every rank's RNG).
    Called on every rank: the RNG states are gathered and a ZeRO-1 optimizer state is consolidated
    to rank 0 (both collective); rank 0 writes."""
    cfg, rt, model, optimizer = run["cfg"], run["rt"], run["model"], run["optimizer"]
    rngs = [None] * rt.world
    if rt.distributed:
        dist.all_gather_object(rngs, rng_state(run["generator"]))
    else:
        rngs[0] = rng_state(run["generator"])
    if with_state and isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
    if cfg.fsdp:  # the full weights and optimizer state, in rank 0's host memory (collective)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(run["step_module"], options=full)
        optimizer_state = get_optimizer_state_dict(run["step_module"], optimizer, options=full) if with_state else {}
    if rt.main:
        extra = {**run["tokenizer"].files(), "focusft.json": json.dumps(asdict(cfg.focus), indent=2) + "\n"}
        if with_state:
            spe = run["plan"].steps_per_epoch
            state = {"optimizer": optimizer_state if cfg.fsdp else optimizer.state_dict(),
                     "scheduler": run["scheduler"].state_dict(), "step": step, "epoch": step // spe,
                     "micro_batch": step % spe * cfg.grad_accum, "world_size": rt.world, "rng": rngs,
                     "config": cfg.settings()}
            extra["train_state.pt"] = lambda p: torch.save(state, p)
        if cfg.fsdp:
            model = unsharded_copy(model, weights)
        model.save_pretrained(path, extra_files=extra)
    if rt.distributed:
        dist.barrier()


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


def restore(path: Path, run: dict) -> int:
    """Load optimizer, schedule and this rank's RNG states from `path`; returns the step to continue at."""
    cfg, rt = run["cfg"], run["rt"]
    # map to CPU: RNG states must stay CPU byte tensors; the optimizer moves its state to the parameters
    # --fsdp: mmap, so that ranks other than 0 never read the full optimizer state (rank 0 broadcasts it)
    state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=False, mmap=cfg.fsdp)
    if state["world_size"] != rt.world:
        raise TrainError(f"{path} was written by {state['world_size']} process(es); resume with the same number")
    # the data order and the schedule are functions of these: resuming with others would continue elsewhere
    now, then = cfg.settings(), {**TrainConfig().settings(), **state["config"]}  # older runs: missing = default
    changed = [k for k in RESUME_MUST_MATCH if then[k] != now[k]]
    if changed:
        raise TrainError(f"{path} was written with other settings: " + ", ".join(
            f"--{k.replace('_', '-')} {then[k]!r} (now {now[k]!r})" for k in changed))
    if cfg.fsdp:
        set_optimizer_state_dict(run["step_module"], run["optimizer"], state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        run["optimizer"].load_state_dict(state["optimizer"])  # ZeRO-1: each rank keeps its own shard
    run["scheduler"].load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][rt.rank], run["generator"])
    rt.log(f"resuming from {path} at step {state['step']}")
    return state["step"]


def trim_log(log_path: Path, last_step: int):
    """Drop the log lines of steps after `last_step` (they run again after a resume)."""
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line cut short by the interruption
            if json.loads(line)["step"] <= last_step:
                kept.append(line + "\n")
    log_path.write_text("".join(kept))


def publish(src: Path, out: Path):
    """Move a finished checkpoint's files into `out`, one atomic rename each, config.json last
    (a directory without config.json is not a loadable checkpoint), then drop `src`."""
    names = sorted(p.name for p in src.iterdir())
    for name in [n for n in names if n != "config.json"] + ["config.json"]:
        os.replace(src / name, out / name)
    src.rmdir()


# -----------------------------------------------------------------------------
# Logging


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def log_step(st: StepStats, done: int, run: dict, lr: float, dt: float, eta: float, log_file):
    """One line per optimizer step on rank 0, and the same as a JSON line in OUT/log.jsonl."""
    total, spe = run["plan"].total_steps, run["plan"].steps_per_epoch
    rec = {"step": done, "total": total, "epoch": round(done / spe, 4), "loss": st.loss, "lr": lr,
           "grad_norm": st.grad_norm, "supervised_tokens": st.supervised_tokens, "tokens_per_s": st.tokens / dt,
           "s_per_step": dt, "eta_s": eta}
    inner = ""
    if run["cfg"].focus.bilevel:
        rec["inner_first"], rec["inner_last"] = st.inner_first, st.inner_last
        inner = f" | inner {st.inner_first:.4f}→{st.inner_last:.4f}"
    print(f"step {done}/{total} | epoch {rec['epoch']:.2f} | loss {st.loss:.4f}{inner} | lr {lr:.2e} | "
          f"gnorm {st.grad_norm:.2f} | sup {st.supervised_tokens} | {rec['tokens_per_s']:,.0f} tok/s | "
          f"{dt:.2f} s/step | ETA {fmt_time(eta)}", flush=True)
    log_file.write(json.dumps(rec) + "\n")
    log_file.flush()


# -----------------------------------------------------------------------------
# The run


def main(cfg: TrainConfig):
    if cfg.estimate_memory:
        return print_memory_estimate(cfg)
    rt = setup(cfg)
    out, resume_from = prepare_output(cfg, rt)
    tokenizer, model_dir = load_tokenizer(cfg)
    plan = plan_data(cfg, tokenizer, rt)
    source = resume_from or model_dir or random_config(cfg, tokenizer)
    if cfg.fsdp:
        model, step_module = wrap_fsdp(cfg, rt, source)
    else:
        model = build_model(cfg, rt, source)
        step_module = wrap(model, cfg, rt)
    optimizer, scheduler = build_optimizer(model, cfg, rt, plan.total_steps)
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed + 1000 * rt.rank)  # fast weights: one stream per rank
    run = dict(cfg=cfg, rt=rt, model=model, step_module=step_module, optimizer=optimizer, scheduler=scheduler,
               generator=generator, tokenizer=tokenizer, plan=plan)
    start = 0
    if resume_from is not None:
        start = restore(resume_from, run)
        if rt.main:
            trim_log(out / "log.jsonl", start)
    n_params = sum(p.numel() for p in model.parameters())
    rt.log(f"model {cfg.model}: {n_params / 1e6:.1f}M parameters, {cfg.dtype}, {rt.device}, world size {rt.world}"
           f"{' (ZeRO-1)' if use_zero1(cfg, rt) else ''}{' (FSDP2)' if cfg.fsdp else ''} | method {cfg.focus.method} | "
           f"{plan.total_steps} optimizer steps ({plan.steps_per_epoch}/epoch), "
           f"{cfg.batch_size * cfg.grad_accum * rt.world} sequences each")
    first_loss, last_loss = train_loop(run, step_module, out, start)
    finish(run, out, start, first_loss, last_loss)


def train_loop(run: dict, step_module, out: Path, start: int) -> tuple[float | None, float]:
    """Optimizer steps start..total-1: one step, one log line, a checkpoint every --save-every."""
    cfg, rt, plan = run["cfg"], run["rt"], run["plan"]
    log_file = open(out / "log.jsonl", "a") if rt.main else None
    cache: dict = {}
    run["t_start"], first_loss, last_loss = time.time(), None, float("nan")
    for step in range(start, plan.total_steps):
        t0 = time.time()
        batches = micro_batches(cfg, plan, run["tokenizer"], step, rt, cache)
        lr = run["scheduler"].get_last_lr()[0]
        try:
            st = train_step(step_module, run["model"], run["optimizer"], run["scheduler"], batches, run["generator"],
                            cfg, rt)
        except NonFiniteStep as e:
            last = newest_checkpoint(out)
            raise TrainError(f"non-finite {e} at step {step + 1}; stopped without applying it. "
                             + (f"Last checkpoint: {last}" if last else "No checkpoint was written yet.")) from None
        first_loss = st.loss if first_loss is None else first_loss
        last_loss, done = st.loss, step + 1
        dt = time.time() - t0
        eta = (time.time() - run["t_start"]) / (done - start) * (plan.total_steps - done)
        if rt.main:
            log_step(st, done, run, lr, dt, eta, log_file)
        if cfg.save_every and done % cfg.save_every == 0 and done < plan.total_steps:
            save(out / f"step-{done}", done, run, with_state=True)
    if log_file:
        log_file.close()
    return first_loss, last_loss


def finish(run: dict, out: Path, start: int, first_loss: float | None, last_loss: float):
    """The final model in HF layout directly in --out (loadable by model.py and transformers)."""
    cfg, rt, total = run["cfg"], run["rt"], run["plan"].total_steps
    save(out / "final.tmp", total, run, with_state=False)
    if rt.main:
        publish(out / "final.tmp", out)
        loss_line = f"loss {first_loss:.4f} → {last_loss:.4f}" if first_loss is not None else "no step run"
        print(f"done: {total - start} steps in {fmt_time(time.time() - run['t_start'])} | {loss_line} | "
              f"model saved to {out}/ (HF layout), log in {out}/log.jsonl")
        if cfg.data == PRESETS["demo"]["data"]:
            print(f"next: python eval.py demo --model {out}")
    if rt.distributed:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Memory estimate (--estimate-memory)
#
# The bytes one GPU holds at the peak of a training step, from the shapes alone: nothing is built
# but a meta-device model (for the parameter list) and no data is read. A step is a sequence of
# phases (inner loop, the outer backward's loss, its layers, the AdamW step); each phase adds its
# own tensors to the ones held all step (weights, AdamW state, and the gradients when DDP's
# buckets or gradient accumulation keep them; otherwise autograd makes them during the outer
# backward), and the peak is the largest phase. Every term names the code that allocates it.
# The per-layer terms are per-op accounting of model.Block under each kind of autograd (checked
# against one layer's measured peak: python -m bench.bench_method --layer-memory); the whole
# estimate is checked against the measured peak of real CPU steps in tests/test_memory.py. The
# CUDA-only terms (the kernels in memory_assumptions) are derived, not measured. They hold for
# I > ~2.5 D (every Qwen2 model): a layer's backward then peaks in its MLP.

ESTIMATE_ONLY = ("estimate_memory", "nproc", "supervised_fraction")
GiB = 2 ** 30


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
    params: list  # [numel, ...] per AdamW parameter group (train.param_groups)
    world: int  # processes
    ddp: bool  # under torchrun: DistributedDataParallel with gradient_as_bucket_view
    zero1: bool  # AdamW state sharded across the processes
    accum: int  # micro-batches per optimizer step (--grad-accum)
    layer_params: int  # parameters of one decoder layer

    @property
    def grads_held(self) -> bool:  # gradients exist all step: DDP's buckets, or accumulated over micro-batches
        return self.ddp or self.accum > 1

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


def memory_shape(cfg: TrainConfig, config: Qwen2Config) -> MemShape:
    """MemShape for a run with these flags (cfg.nproc processes) on a model with this config."""
    with torch.device("meta"):
        model = Qwen2(config)
    groups = [[p.numel() for p in g["params"]] for g in param_groups(model, cfg.weight_decay)]
    S, fc = cfg.max_length, cfg.focus
    cuda = torch.device(cfg.device or "cuda").type == "cuda"
    world = cfg.nproc
    ddp = world > 1
    zero1 = ddp and (cfg.zero1 is None or cfg.zero1)
    n_adapted = len(focusft.adapted_layers(model, fc)) if fc.bilevel else 0
    N = min(cfg.batch_size * (S - 1), math.ceil(cfg.supervised_fraction * cfg.batch_size * (S - 1)))
    return MemShape(D=config.hidden_size, I=config.intermediate_size, L=config.num_hidden_layers,
                    H=config.num_attention_heads, KVH=config.num_key_value_heads, hd=config.head_dim,
                    V=config.vocab_size, tied=config.tie_word_embeddings, B=cfg.batch_size, S=S, N=N,
                    e=DTYPES[cfg.dtype].itemsize, cuda=cuda, masked=fc.bidirectional,
                    ckpt=cfg.grad_checkpointing, bilevel=fc.bilevel, inner_grad=fc.inner_grad,
                    inner_steps=fc.inner_steps, L_a=n_adapted, r=fc.lora_rank, chunk=fc.loss_chunk,
                    params=groups, world=world, ddp=ddp, zero1=zero1, accum=cfg.grad_accum,
                    layer_params=sum(p.numel() for p in model.model.layers[0].parameters()))


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
    shards = zero1_shards(m.params, m.world) if m.zero1 else [[sum(g) for g in m.params]]
    where = f"ZeRO-1: the largest of {m.world} shards" if m.zero1 else "all parameters"
    rows = [(f"{dtype} weights", P * m.e)]
    if m.grads_held:
        rows.append(("gradients (" + ("= DDP's all-reduce buckets, gradient_as_bucket_view" if m.ddp else
                                      f"param.grad, summed over {m.accum} micro-batches") + ")", P * m.e))
    return rows + [(f"AdamW m + v, {dtype} ({where})", 2 * m.e * max(map(sum, shards)))]


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
    """What the outer forward of `layers` layers keeps for its backward: each layer's input under
    checkpointing (plus the stack's output if `output`), else every layer's activations."""
    n = f"{layers} layer" + "s" * (layers != 1)
    if m.ckpt:
        return [(f"outer forward: inputs of {n}, checkpointed" + (", and their output" if output else ""),
                 (layers + output) * m.X)]
    rows = [(f"outer forward: activations of {n} (no checkpointing)", layers * layer_saved(m) * m.T)]
    if output:
        rows.append(("outer forward: their output", m.X))
    if m.bilevel and m.e < 4 and layers:  # focusft_loss keeps the token embeddings (fp32: layer 0 keeps them anyway)
        rows.append(("token embeddings", m.X))
    return rows


def inner_loop_rows(m: MemShape) -> list[tuple[str, float]]:
    """The inner loop's peak (focusft.inner_loop), while the outer forward holds the bottom layers'
    graph (the adapted layers run again in the outer pass, after it)."""
    rows = outer_forward_rows(m, m.L - m.L_a, output=True) + step_input_rows(m)
    return rows + (inner_by_layer_rows(m) if m.ckpt else inner_whole_stack_rows(m))


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
    """focusft.inner_grads_whole_stack (checkpointing off): one transform over the adapted layers
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
    if m.ckpt:
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
    if m.e < 4 and not m.ckpt:
        rows.append(("fast weights cast to bf16, kept by the graph", m.F * m.e // 4))
    return rows


def optimizer_rows(m: MemShape) -> list[tuple[str, float]]:
    """AdamW's step: fused on CUDA (no temporaries); foreach on CPU: torch._foreach_sqrt of the
    second moments makes one temporary as large as the param group (this rank's shard of it)."""
    rows = [] if m.grads_held else [("gradients (param.grad)", sum(map(sum, m.params)) * m.e)]
    if m.cuda:
        return rows + [("AdamW step: fused kernel", 0)]
    shards = zero1_shards(m.params, m.world) if m.zero1 else [[sum(g) for g in m.params]]
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
    phases["AdamW step"] = optimizer_rows(m)
    return phases


def estimate_peak(m: MemShape) -> tuple[float, str]:
    """The estimated peak bytes per GPU and the phase where it occurs."""
    static = sum(b for _, b in static_rows(m))
    totals = {name: sum(b for _, b in rows) for name, rows in memory_phases(m).items()}
    name = max(totals, key=totals.get)
    return static + totals[name], name


# --- the command


def estimate_model_config(cfg: TrainConfig) -> Qwen2Config:
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
            raise TrainError(f"{path.parent} has no config.json")
    elif path.exists() or cfg.model.count("/") != 1:
        raise TrainError(f"--model {cfg.model!r} is neither a directory nor a hub id like 'Qwen/Qwen2.5-7B'")
    else:
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
        try:
            path = Path(hf_hub_download(cfg.model, "config.json", local_files_only=True))
        except Exception:  # not cached. NOTE: the metadata request fails at once offline, where
            try:              # hf_hub_download alone retries for about 25 s
                get_hf_file_metadata(hf_hub_url(cfg.model, "config.json"), timeout=10)
                path = Path(hf_hub_download(cfg.model, "config.json"))
            except Exception as e:  # offline, unknown repository, ...: all mean "no config"
                raise TrainError(f"no config.json for {cfg.model!r} in the Hugging Face cache, and fetching it "
                                 f"failed ({type(e).__name__}); pass a directory holding its config.json") from None
    try:
        return Qwen2Config.from_hf(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise TrainError(f"{path}: invalid JSON ({e})") from None
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:  # e.g. a size that is not a number
        raise TrainError(f"{path}: not a Qwen2 config ({type(e).__name__}: {e})") from None


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


def print_memory_estimate(cfg: TrainConfig):
    """--estimate-memory: the itemised estimate per GPU, phase by phase, and the peak."""
    if cfg.fsdp:
        raise TrainError("--estimate-memory covers DDP (with or without ZeRO-1) only, not --fsdp")
    if cfg.nproc < 1 or not 0 < cfg.supervised_fraction <= 1:
        raise TrainError("--nproc must be >= 1 and --supervised-fraction in (0, 1]")
    config = estimate_model_config(cfg)
    try:
        m = memory_shape(cfg, config)
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as e:  # sizes no model can have
        raise TrainError(f"--model {cfg.model}: its config makes no Qwen2 model ({type(e).__name__}: {e})") from None
    fc = cfg.focus
    run = (f"{m.world} processes: DDP" + (" + ZeRO-1" if m.zero1 else "") if m.ddp else
           "1 process (python train.py: no DDP)")
    print(f"Estimated memory per GPU of one training step: --model {cfg.model} "
          f"({sum(map(sum, m.params)) / 1e9:.2f}B parameters), {run}")
    print(f"  {fc.method}, {cfg.dtype}, batch {m.B} x {m.S:,} tokens, {m.N:,} supervised positions"
          + (" (all: the worst case)" if m.N == m.B * (m.S - 1) else "")
          + f", grad accumulation {m.accum}, activation checkpointing {'on' if m.ckpt else 'off'}")
    print(f"  loss chunk {fc.loss_chunk}" + (f", inner grad {fc.inner_grad}, {fc.inner_steps} inner steps on "
                                             f"{m.L_a} adapted layers, LoRA rank {m.r}" if m.bilevel else ""))
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
    print(f"\npeak per GPU: {peak / GiB:.1f} GiB")



if __name__ == "__main__":
    try:
        main(parse_args())
    except (TrainError, data.DataError, ModelError) as e:
        if int(os.environ.get("RANK", 0)) == 0 or getattr(e, "every_rank", False):
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
