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
import memory
from checkpoint import resolve_checkpoint
from model import DTYPES, TINY, TINY_WORDS, ModelError, Qwen2, Qwen2Config, param_groups


# -----------------------------------------------------------------------------
# Config: TrainConfig, presets, flags. The sections below follow a run: setup, data, model and
# optimizer, the step, the loop, checkpoints and resume, main. The memory estimate is memory.py.


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
    model: str = "Qwen/Qwen2.5-7B"  # hub id, local HF directory, or "tiny" / "tiny-words" (random, see random_config)
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
    # The inner loop's own checkpointing (same numbers, see choose_inner_recompute): "on" recomputes the
    # adapted layers one at a time (focusft.inner_grads_by_layer), "off" keeps their activations (faster),
    # "auto" keeps them when the estimated peak (memory.py) fits the device.
    inner_recompute: str = "auto"
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
    # --estimate-memory and its own flags (memory.py): print the memory per GPU of a step; trains nothing
    estimate: memory.EstimateConfig = field(default_factory=memory.EstimateConfig)
    # the method (paper defaults live in focusft.FocusConfig, declared once)
    focus: focusft.FocusConfig = field(default_factory=focusft.FocusConfig)

    def settings(self) -> dict:
        """Every setting as one flat dict (what a checkpoint records)."""
        d = asdict(self)
        del d["estimate"]  # not a training setting
        return {**d.pop("focus"), **d}


PRESETS = {
    # A CPU run of a few minutes: FocuSFT on the bundled agentic task (examples/make_agentic.py)
    # with a random 2-layer Qwen2 and a word-level tokenizer fitted on the data ("tiny-words").
    # Larger lr and batch than the paper's: it trains from scratch.
    "demo": dict(model="tiny-words", data="examples/agentic.jsonl", out="runs/demo", max_length=512, epochs=7,
                 batch_size=32, grad_accum=1, lr=3e-3, weight_decay=0.0, warmup_ratio=0.02, dtype="fp32",
                 grad_checkpointing=False, max_steps=800, save_every=100, threads=1),
}


CHOICES = {"method": list(focusft.METHODS), "dtype": list(DTYPES), "loss_norm": ["mean", "tokens"],
           "clip_mode": ["per-tensor", "global"], "inner_grad": ["grad", "vjp"],
           "truncation": list(data.TRUNCATION_POLICIES), "backend": ["", "nccl", "gloo"],
           "inner_recompute": ["auto", "on", "off"]}
FOCUS_FLAGS = [f for f in fields(focusft.FocusConfig) if f.name != "targets"]
ESTIMATE_FLAGS = list(fields(memory.EstimateConfig))  # --estimate-memory's own (memory.py)
HELP = {  # flags whose default alone does not say what they do
    "model": "hub id, local HF checkpoint directory, 'tiny' (a random 0.8M-parameter Qwen2, byte tokenizer) or "
             "'tiny-words' (a random 0.1M-parameter Qwen2, word-level tokenizer fitted on --data)",
    "data": ".jsonl/.parquet file, directory, glob, or hf:owner/name[@revision][:split|pattern]; comma-separated",
    "zero1": "shard the AdamW state across ranks (default: on when more than one process runs)",
    "fsdp": "shard weights, gradients and AdamW state across ranks (FSDP2; under torchrun)",
    "method": "the paper's 2x2 ablation (Table 3)",
    "inner_grad": "grad: torch.func.grad; vjp: the same gradients, less memory",
    "loss_chunk": "supervised positions per piece of the cross-entropy (bounds the N x vocab log-probs)",
    "inner_recompute": "the inner loop: recompute the adapted layers one at a time (on: least memory), keep their "
                       "activations (off: faster), or keep them when the estimated peak fits the device (auto)",
    "save_every": "write OUT/step-N/ (with optimizer and RNG state) every N optimizer steps; 0: final model only",
    **memory.HELP,
}


def parse_args(argv=None) -> TrainConfig:
    """Flags from the fields of TrainConfig, then memory.EstimateConfig, then focusft.FocusConfig (kebab-case);
    a preset, then flags, override defaults."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named preset; flags override it")
    own = [f for f in fields(TrainConfig) if f.name not in ("estimate", "focus")]
    for f in own + ESTIMATE_FLAGS + FOCUS_FLAGS:
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
    focus_names, estimate_names = {f.name for f in FOCUS_FLAGS}, {f.name for f in ESTIMATE_FLAGS}
    try:
        focus = focusft.FocusConfig(**{k: v for k, v in given.items() if k in focus_names})
    except ValueError as e:  # e.g. --inner-steps 0
        raise TrainError(str(e)) from None
    estimate = memory.EstimateConfig(**{k: v for k, v in given.items() if k in estimate_names})
    return TrainConfig(**{k: v for k, v in given.items() if k not in focus_names | estimate_names},
                       focus=focus, estimate=estimate)


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
    """The tokenizer and the checkpoint directory (None for the random models "tiny" and
    "tiny-words", see random_config)."""
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


def random_config(cfg: TrainConfig, tokenizer) -> Qwen2Config:
    """The config of the random model named by --model: "tiny" (model.TINY, for the byte tokenizer) or
    "tiny-words" (model.TINY_WORDS, with the vocabulary of the word tokenizer fitted on --data)."""
    if cfg.model == "tiny":
        return Qwen2Config(**TINY)
    vocab = -(-tokenizer.tk.get_vocab_size() // 16) * 16  # padded, as real vocabularies are
    return Qwen2Config(**dict(TINY_WORDS, vocab_size=vocab, eos_token_id=tokenizer.eos_token_id))


def source_config(source: Path | Qwen2Config) -> Qwen2Config:
    """The config of a checkpoint directory (its config.json) or of a random model."""
    return Qwen2Config.from_hf(json.loads((source / "config.json").read_text())) if isinstance(source, Path) else source


def device_memory(rt: Runtime) -> tuple[float, str]:
    """Bytes this process may use and what they are: the GPU's total memory, or on CPU the memory
    the machine has available now (/proc/meminfo's MemAvailable), shared by the local processes."""
    if rt.device.type == "cuda":
        return torch.cuda.get_device_properties(rt.device).total_memory, "the GPU's total memory"
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        free = kib * 1024
    except (OSError, StopIteration, ValueError):  # not Linux: free physical pages
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return free / local, "available memory" + (f" / {local} processes" if local > 1 else "")


INNER_HEADROOM = 0.85  # share of the device's memory the estimate may fill (the CUDA context, fragmentation)
INNER_WAYS = {True: "recomputes the adapted layers one at a time (least memory)",
              False: "keeps the adapted layers' activations (faster)"}


def choose_inner_recompute(cfg: TrainConfig, rt: Runtime, config: Qwen2Config) -> TrainConfig:
    """Resolve --inner-recompute auto to on or off, and log the choice (the run's first lines).

    Keeping the inner loop's activations saves one forward of the adapted layers per inner step;
    recomputing them is what lets long sequences fit. auto keeps them when memory.py's estimated
    peak per GPU with them fits INNER_HEADROOM of the device's memory (the smallest over the ranks,
    so that all ranks choose alike: under --fsdp their collectives must match). NOTE: the estimate
    is DDP's; under --fsdp, which shards more, it is an upper bound."""
    if not cfg.focus.bilevel:
        return cfg
    if cfg.inner_recompute != "auto":
        rt.log(f"inner loop: --inner-recompute {cfg.inner_recompute}: " + INNER_WAYS[cfg.inner_recompute == "on"])
        return cfg
    shape = replace(cfg, device=rt.device.type, estimate=replace(cfg.estimate, nproc=rt.world))
    keep, recompute = (memory.inner_loop_peak(shape, config, r) for r in (False, True))
    available, what = device_memory(rt)
    if rt.distributed:
        smallest = torch.tensor([available], dtype=torch.float64, device=rt.device)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        available = smallest.item()
    budget = INNER_HEADROOM * available
    choice = "off" if keep <= budget else "on"
    gib = memory.GiB
    rt.log(f"inner loop: --inner-recompute auto chose {choice}: " + INNER_WAYS[choice == "on"])
    rt.log(f"  estimated peak per {rt.device.type.upper()} device: {keep / gib:.3g} GiB keeping the activations, "
           f"{recompute / gib:.3g} GiB recomputing; budget {budget / gib:.3g} GiB "
           f"({INNER_HEADROOM:.0%} of {available / gib:.3g} GiB, {what})")
    return replace(cfg, inner_recompute=choice)


def inner_by_layer(cfg: TrainConfig) -> bool | None:
    """focusft_loss's by_layer for --inner-recompute: on True, off False; auto (not yet resolved by
    choose_inner_recompute, e.g. in benchmarks) None: recompute when activation checkpointing is on."""
    return {"on": True, "off": False}.get(cfg.inner_recompute)


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
# The step: FocuSFTStep, wrapped for DDP or FSDP; one optimizer step (train.py's loop and
# bench/bench_train.py both call train_step)


class FocuSFTStep(nn.Module):
    """The whole FocuSFT step as one forward, so that DDP (or FSDP's root) sees it.

    NOTE: DDP only all-reduces the gradients of a backward that follows the wrapper's forward;
    calling focusft_loss(model, ...) directly under DDP would silently skip the all-reduce."""

    def __init__(self, model: Qwen2, fcfg: focusft.FocusConfig, by_layer: bool | None = None):
        super().__init__()
        self.model, self.fcfg, self.by_layer = model, fcfg, by_layer  # by_layer: see inner_by_layer
        self.sharded = False  # True once wrap_fsdp has made this module FSDP's root

    def forward(self, batch, generator):
        if not self.sharded:
            return focusft.focusft_loss(self.model, batch, self.fcfg, generator, self.by_layer)
        # NOTE: the inner loop's backward (torch.func) runs inside this forward and passes FSDP's
        # hooks on the adapted blocks; at its end FSDP's root post-backward callback reshards every
        # group, by default the root's too (embedding, final norm, lm_head), and the next inner
        # step or the outer loss would meet sharded DTensors. So while the forward runs, the root
        # keeps its parameters after a backward, and no backward is "the last one" (on the last,
        # the outer backward, FSDP waits for its reduce-scatters and resets its prefetch order).
        self.set_reshard_after_backward(False, recurse=False)
        self.set_is_last_backward(False)
        try:
            return focusft.focusft_loss(self.model, batch, self.fcfg, generator, self.by_layer)
        finally:
            self.set_reshard_after_backward(True, recurse=False)
            self.set_is_last_backward(True)


def wrap(model: Qwen2, cfg: TrainConfig, rt: Runtime) -> nn.Module:
    """The step as a module, inside DDP under torchrun. gradient_as_bucket_view: the gradients live
    in DDP's all-reduce buckets instead of beside them (one model-sized buffer less)."""
    step_module = FocuSFTStep(model, cfg.focus, inner_by_layer(cfg))
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
    config = source_config(source)
    with torch.device("meta"):
        model = Qwen2(config).to(DTYPES[cfg.dtype])
    model.config.torch_dtype = str(DTYPES[cfg.dtype]).replace("torch.", "")
    model.gradient_checkpointing = cfg.grad_checkpointing
    model.source_dir = full.source_dir if rt.main else None
    step_module = FocuSFTStep(model, cfg.focus, inner_by_layer(cfg))
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
    n_sup = [int(focusft.supervised_positions(b)[0].sum()) for b in batches]
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
# The loop


@dataclass
class Run:
    """What main builds once and the loop, the log and the checkpoints share."""
    cfg: TrainConfig
    rt: Runtime
    out: Path  # --out
    plan: Plan
    tokenizer: data.Tokenizer
    model: Qwen2  # the network itself (under --fsdp: its sharded parameters)
    step_module: nn.Module  # FocuSFTStep, inside DDP under torchrun, or FSDP's root
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator  # the fast weights' random init: one stream per rank
    t_start: float = 0.0  # time.time() when the loop started


def train_loop(run: Run, start: int) -> tuple[float | None, float]:
    """Optimizer steps start..total-1: one step, one log line, a checkpoint every --save-every."""
    cfg, rt, plan, out = run.cfg, run.rt, run.plan, run.out
    log_file = open(out / "log.jsonl", "a") if rt.main else None
    cache: dict = {}
    run.t_start, first_loss, last_loss = time.time(), None, float("nan")
    for step in range(start, plan.total_steps):
        t0 = time.time()
        batches = micro_batches(cfg, plan, run.tokenizer, step, rt, cache)
        lr = run.scheduler.get_last_lr()[0]
        try:
            st = train_step(run.step_module, run.model, run.optimizer, run.scheduler, batches, run.generator, cfg, rt)
        except NonFiniteStep as e:
            last = newest_checkpoint(out)
            raise TrainError(f"non-finite {e} at step {step + 1}; stopped without applying it. "
                             + (f"Last checkpoint: {last}" if last else "No checkpoint was written yet.")) from None
        first_loss = st.loss if first_loss is None else first_loss
        last_loss, done = st.loss, step + 1
        dt = time.time() - t0
        eta = (time.time() - run.t_start) / (done - start) * (plan.total_steps - done)
        if rt.main:
            log_step(st, done, run, lr, dt, eta, log_file)
        if cfg.save_every and done % cfg.save_every == 0 and done < plan.total_steps:
            save(out / f"step-{done}", done, run, with_state=True)
    if log_file:
        log_file.close()
    return first_loss, last_loss


def log_step(st: StepStats, done: int, run: Run, lr: float, dt: float, eta: float, log_file):
    """One line per optimizer step on rank 0, and the same as a JSON line in OUT/log.jsonl."""
    total, spe = run.plan.total_steps, run.plan.steps_per_epoch
    rec = {"step": done, "total": total, "epoch": round(done / spe, 4), "loss": st.loss, "lr": lr,
           "grad_norm": st.grad_norm, "supervised_tokens": st.supervised_tokens, "tokens_per_s": st.tokens / dt,
           "s_per_step": dt, "eta_s": eta}
    inner = ""
    if run.cfg.focus.bilevel:
        rec["inner_first"], rec["inner_last"] = st.inner_first, st.inner_last
        inner = f" | inner {st.inner_first:.4f}→{st.inner_last:.4f}"
    print(f"step {done}/{total} | epoch {rec['epoch']:.2f} | loss {st.loss:.4f}{inner} | lr {lr:.2e} | "
          f"gnorm {st.grad_norm:.2f} | sup {st.supervised_tokens} | {rec['tokens_per_s']:,.0f} tok/s | "
          f"{dt:.2f} s/step | ETA {data.fmt_seconds(eta)}", flush=True)
    log_file.write(json.dumps(rec) + "\n")
    log_file.flush()


# -----------------------------------------------------------------------------
# Checkpoints and resume


# Settings a resumed run must share with the run it continues (data order, schedule, method).
RESUME_MUST_MATCH = ("data", "messages_key", "tools_key", "method", "max_length", "truncation", "epochs",
                     "batch_size", "grad_accum", "lr", "warmup_ratio", "max_steps", "seed", "group_by_length",
                     "loss_norm", "fsdp")


def newest_checkpoint(out: Path) -> Path | None:
    """The newest complete out/step-N/ (directories appear by atomic rename, so complete = present)."""
    steps = [(int(p.name[5:]), p) for p in out.glob("step-*") if p.name[5:].isdigit() and (p / "train_state.pt").is_file()]
    return max(steps)[1] if steps else None


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


def save(path: Path, step: int, run: Run, with_state: bool):
    """Write an HF checkpoint (+ train_state.pt: optimizer, schedule, position, every rank's RNG).
    Called on every rank: the RNG states are gathered and a ZeRO-1 optimizer state is consolidated
    to rank 0 (both collective); rank 0 writes."""
    cfg, rt, model, optimizer = run.cfg, run.rt, run.model, run.optimizer
    rngs = [None] * rt.world
    if rt.distributed:
        dist.all_gather_object(rngs, rng_state(run.generator))
    else:
        rngs[0] = rng_state(run.generator)
    if with_state and isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
    if cfg.fsdp:  # the full weights and optimizer state, in rank 0's host memory (collective)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(run.step_module, options=full)
        optimizer_state = get_optimizer_state_dict(run.step_module, optimizer, options=full) if with_state else {}
    if rt.main:
        extra = {**run.tokenizer.files(), "focusft.json": json.dumps(asdict(cfg.focus), indent=2) + "\n"}
        if with_state:
            spe = run.plan.steps_per_epoch
            state = {"optimizer": optimizer_state if cfg.fsdp else optimizer.state_dict(),
                     "scheduler": run.scheduler.state_dict(), "step": step, "epoch": step // spe,
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


def restore(path: Path, run: Run) -> int:
    """Load optimizer, schedule and this rank's RNG states from `path`; returns the step to continue at."""
    cfg, rt = run.cfg, run.rt
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
        set_optimizer_state_dict(run.step_module, run.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        run.optimizer.load_state_dict(state["optimizer"])  # ZeRO-1: each rank keeps its own shard
    run.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][rt.rank], run.generator)
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
# The run


def main(cfg: TrainConfig):
    if cfg.estimate.estimate_memory:  # memory.py: a table from the shapes, no run
        try:
            return memory.print_memory_estimate(cfg)
        except memory.EstimateError as e:
            raise TrainError(str(e)) from None
    rt = setup(cfg)
    out, resume_from = prepare_output(cfg, rt)
    tokenizer, model_dir = load_tokenizer(cfg)
    source = resume_from or model_dir or random_config(cfg, tokenizer)
    cfg = choose_inner_recompute(cfg, rt, source_config(source))
    plan = plan_data(cfg, tokenizer, rt)
    if cfg.fsdp:
        model, step_module = wrap_fsdp(cfg, rt, source)
    else:
        model = build_model(cfg, rt, source)
        step_module = wrap(model, cfg, rt)
    optimizer, scheduler = build_optimizer(model, cfg, rt, plan.total_steps)
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed + 1000 * rt.rank)  # fast weights: one stream per rank
    run = Run(cfg=cfg, rt=rt, out=out, plan=plan, tokenizer=tokenizer, model=model, step_module=step_module,
              optimizer=optimizer, scheduler=scheduler, generator=generator)
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
    first_loss, last_loss = train_loop(run, start)
    finish(run, start, first_loss, last_loss)


def finish(run: Run, start: int, first_loss: float | None, last_loss: float):
    """The final model in HF layout directly in --out (loadable by model.py and transformers)."""
    cfg, rt, out, total = run.cfg, run.rt, run.out, run.plan.total_steps
    save(out / "final.tmp", total, run, with_state=False)
    if rt.main:
        publish(out / "final.tmp", out)
        loss_line = f"loss {first_loss:.4f} → {last_loss:.4f}" if first_loss is not None else "no step run"
        print(f"done: {total - start} steps in {data.fmt_seconds(time.time() - run.t_start)} | {loss_line} | "
              f"model saved to {out}/ (HF layout), log in {out}/log.jsonl")
        if cfg.data == PRESETS["demo"]["data"]:
            print(f"next: python eval.py demo --model {out}")
    if rt.distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(parse_args())
    except (TrainError, data.DataError, ModelError) as e:
        if int(os.environ.get("RANK", 0)) == 0 or getattr(e, "every_rank", False):
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
