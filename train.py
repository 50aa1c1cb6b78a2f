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
import datetime
import faulthandler
import gc
import io
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import focusft
import fsdp
import health
import memory
import checkpoint
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
    # The inner loop's own checkpointing (same numbers): "on" recomputes the adapted layers one at a time
    # (focusft.inner_grads_by_layer), "off" keeps their activations (faster), "auto" keeps them when the
    # estimated peak (memory.py) fits the device (choose_inner_recompute).
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
    dist_timeout: float = 1800.0  # seconds a rank waits for the others in one phase (health.Watchdog)
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
    "dist_timeout": "seconds a rank waits for the others in one phase (a step, a checkpoint's gather or barrier, "
                    "teardown) before it stops with an error naming the phase and the rank. The longest legitimate "
                    "wait: the barrier while rank 0 writes a checkpoint (Qwen2.5-7B with AdamW state in fp32: "
                    "91 GB, 30 min at 50 MB/s)",
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
    preset = PRESETS.get(args.pop("preset"), {})
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
    watchdog: health.Watchdog | None = None  # under torchrun: bounds each phase that waits for the other ranks

    @property
    def main(self) -> bool:
        return self.rank == 0

    def phase(self, name: str):
        """`with rt.phase(name):` around code that waits for the other ranks (health.Watchdog)."""
        return self.watchdog.phase(name) if self.watchdog else contextlib.nullcontext()

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
    if cfg.dist_timeout <= 0:
        raise TrainError(f"--dist-timeout must be positive, not {cfg.dist_timeout:g}")
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID` prints every thread's stack to this rank's stderr
        # (not when stderr has no file descriptor: a run inside another program that captures it)
        with contextlib.suppress(io.UnsupportedOperation, ValueError):
            faulthandler.register(signal.SIGUSR1, all_threads=True)
    watchdog = None
    if distributed:  # the backend's timeout backs up the watchdog's, which names the phase
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout + 60))
        watchdog = health.Watchdog(rank, cfg.dist_timeout)
    return Runtime(rank, world, device, distributed, watchdog)


def prepare_output(cfg: TrainConfig, rt: Runtime) -> tuple[Path, Path | None]:
    """--out, never mixing two runs; and the checkpoint to resume from, if any."""
    out = Path(cfg.out)
    resume_from = checkpoint.newest_checkpoint(out) if cfg.resume else None
    if not (cfg.resume or cfg.overwrite) and out.exists() and any(out.iterdir()):
        raise TrainError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    if rt.main:
        if cfg.overwrite and not cfg.resume:
            shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
    if cfg.resume and resume_from is None:
        rt.log(f"--resume: no checkpoint in {out}, starting from scratch")
    if rt.watchdog:
        rt.watchdog.note = lambda: checkpoint.last_saved(out)
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
    model_dir = checkpoint.resolve_checkpoint(cfg.model)
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


def choose_inner_recompute(cfg: TrainConfig, rt: Runtime, config: Qwen2Config) -> TrainConfig:
    """--inner-recompute auto resolved to on or off by memory.py's estimate against this device's
    memory: the smallest over the ranks, so that all ranks choose alike (under --fsdp their
    collectives must match). Logged in the run's first lines."""
    available, what = memory.device_memory(rt.device)
    if rt.distributed and cfg.focus.bilevel and cfg.inner_recompute == "auto":
        smallest = torch.tensor([available], dtype=torch.float64, device=rt.device)
        with rt.phase("inner-recompute auto (the smallest memory over the ranks)"):
            dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        available = smallest.item()
    return memory.resolve_inner_recompute(cfg, config, rt.device.type, rt.world, available, what, rt.log)


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


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return math.ceil(cfg.warmup_ratio * total_steps)


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
    warmup = warmup_steps(cfg, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, total_steps, warmup))
    return optimizer, scheduler


def use_zero1(cfg: TrainConfig, rt: Runtime) -> bool:
    """Never under FSDP: its AdamW state is sharded already (its parameters are)."""
    return not cfg.fsdp and rt.distributed and (rt.world > 1 if cfg.zero1 is None else cfg.zero1)


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
        with fsdp.keep_root_gathered(self) if self.sharded else contextlib.nullcontext():
            return focusft.focusft_loss(self.model, batch, self.fcfg, generator, self.by_layer)


def wrap(model: Qwen2, cfg: TrainConfig, rt: Runtime) -> nn.Module:
    """The step as a module, inside DDP under torchrun. gradient_as_bucket_view: the gradients live
    in DDP's all-reduce buckets instead of beside them (one model-sized buffer less).

    NOTE: under no_sync (every micro-batch but the last of a step) DDP's hooks do not run, so a
    .grad that is None is made afresh by autograd, a second model-sized buffer next to the
    buckets. So the gradients exist before DDP is built (it takes them over as views of its
    buckets, the first step included) and zero_grads keeps them (zeroed, not freed)."""
    step_module = FocuSFTStep(model, cfg.focus, inner_by_layer(cfg))
    if not rt.distributed:
        return step_module
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return DDP(step_module, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
               gradient_as_bucket_view=True)


def wrap_fsdp(cfg: TrainConfig, rt: Runtime, source: Path | Qwen2Config) -> tuple[Qwen2, FocuSFTStep]:
    """--fsdp: the model and the step as FSDP2's root (fsdp.py). Every rank builds the model on the
    meta device and shards it; rank 0 alone reads the weights (into host memory) and broadcasts them."""
    full = build_model(cfg, replace(rt, device=torch.device("cpu")), source) if rt.main else None
    with torch.device("meta"):
        model = Qwen2(source_config(source)).to(DTYPES[cfg.dtype])
    model.config.torch_dtype = str(DTYPES[cfg.dtype]).replace("torch.", "")
    model.gradient_checkpointing = cfg.grad_checkpointing
    model.source_dir = full.source_dir if rt.main else None
    step_module = FocuSFTStep(model, cfg.focus, inner_by_layer(cfg))
    fsdp.shard(step_module, list(model.model.layers), rt.device, rt.world)
    step_module.sharded = True
    fsdp.load_full_weights(step_module, full)
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
        zero_grads(optimizer, step_module)
        raise NonFiniteStep(f"loss ({loss_value})" if not math.isfinite(loss_value) else f"gradient norm ({grad_norm})")
    optimizer.step()
    scheduler.step()
    zero_grads(optimizer, step_module)
    return StepStats(loss_value, grad_norm, totals[1].item(), totals[2].item(), int(totals[3]), int(totals[4]))


def zero_grads(optimizer, step_module):
    """After a step. Under DDP the gradients are views of its all-reduce buckets: zeroed in place,
    so that the next step's micro-batches under no_sync accumulate into the buckets (see wrap).
    Without DDP, and under FSDP (whose gradients are shards, 1/world of the model), they are
    freed: they exist only from the first backward of a step to its optimizer step."""
    optimizer.zero_grad(set_to_none=not isinstance(step_module, DDP))


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
    dependence: health.DependenceCheck | None = None  # rank 0 of a bilevel run: the fast-weight dependence check


def train_loop(run: Run, start: int) -> tuple[float | None, float]:
    """Optimizer steps start..total-1: one step, one log line, a checkpoint every --save-every.
    Rank 0 of a bilevel run also watches for fast-weight dependence (health.DependenceCheck)."""
    cfg, rt, plan, out = run.cfg, run.rt, run.plan, run.out
    if rt.main and cfg.focus.bilevel:
        run.dependence = health.DependenceCheck(warmup=warmup_steps(cfg, plan.total_steps))
        for rec in checkpoint.read_log(out / "log.jsonl", start):  # after --resume: the steps before `start`
            run.dependence.update(rec["step"], rec["loss"], rec["inner_first"])
    log_file = open(out / "log.jsonl", "a", buffering=1) if rt.main else None  # line-buffered: flushed per step
    cache: dict = {}
    run.t_start, first_loss, last_loss = time.time(), None, float("nan")
    for step in range(start, plan.total_steps):
        t0 = time.time()
        batches = micro_batches(cfg, plan, run.tokenizer, step, rt, cache)
        lr = run.scheduler.get_last_lr()[0]
        try:
            with rt.phase(f"train_step {step + 1} (forward, backward, the gradients' all-reduce)"):
                st = train_step(run.step_module, run.model, run.optimizer, run.scheduler, batches, run.generator,
                                cfg, rt)
        except NonFiniteStep as e:
            raise TrainError(f"non-finite {e} at step {step + 1}; stopped without applying it. "
                             + checkpoint.last_saved(out)) from None
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
    inner, warning = "", None
    if run.cfg.focus.bilevel:
        rec["inner_first"], rec["inner_last"] = st.inner_first, st.inner_last
        inner = f" | inner {st.inner_first:.4f}→{st.inner_last:.4f}"
        warning = run.dependence.update(done, st.loss, st.inner_first)
    print(f"step {done}/{total} | epoch {rec['epoch']:.2f} | loss {st.loss:.4f}{inner} | lr {lr:.2e} | "
          f"gnorm {st.grad_norm:.2f} | sup {st.supervised_tokens} | {rec['tokens_per_s']:,.0f} tok/s | "
          f"{dt:.2f} s/step | ETA {data.fmt_seconds(eta)}", flush=True)
    if warning:  # once per run (health.DependenceCheck); the summary repeats it
        rec["warning"] = warning
        print(f"warning: {warning}", flush=True)
    log_file.write(json.dumps(rec) + "\n")


# -----------------------------------------------------------------------------
# Checkpoints and resume


# Settings a resumed run must share with the run it continues (data order, schedule, method).
RESUME_MUST_MATCH = ("data", "messages_key", "tools_key", "method", "max_length", "truncation", "epochs",
                     "batch_size", "grad_accum", "lr", "warmup_ratio", "max_steps", "seed", "group_by_length",
                     "loss_norm", "fsdp")


def save(path: Path, step: int, run: Run, with_state: bool):
    """Write an HF checkpoint (+ train_state.pt: optimizer, schedule, position, every rank's RNG).
    Called on every rank: the RNG states are gathered and a ZeRO-1 optimizer state is consolidated
    to rank 0 (both collective); rank 0 writes."""
    cfg, rt, model, optimizer = run.cfg, run.rt, run.model, run.optimizer
    rngs = [None] * rt.world
    with rt.phase(f"save {path.name} (the gather of RNG, optimizer and FSDP states to rank 0)"):
        if rt.distributed:
            dist.all_gather_object(rngs, checkpoint.rng_state(run.generator))
        else:
            rngs[0] = checkpoint.rng_state(run.generator)
        if with_state and isinstance(optimizer, ZeroRedundancyOptimizer):
            optimizer.consolidate_state_dict(to=0)
        if cfg.fsdp:  # the full weights and optimizer state, in rank 0's host memory (collective)
            weights, optimizer_state = fsdp.full_state(run.step_module, optimizer, with_state)
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
            model = fsdp.unsharded_copy(model, weights)
        model.save_pretrained(path, extra_files=extra)
    if rt.distributed:
        with rt.phase(f"save {path.name} (the barrier while rank 0 writes)"):  # the longest legitimate wait
            dist.barrier()


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
        fsdp.load_optimizer_state(run.step_module, run.optimizer, state["optimizer"])
    else:
        run.optimizer.load_state_dict(state["optimizer"])  # ZeRO-1: each rank keeps its own shard
    run.scheduler.load_state_dict(state["scheduler"])
    checkpoint.set_rng_state(state["rng"][rt.rank], run.generator)
    rt.log(f"resuming from {path} at step {state['step']}")
    return state["step"]


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
    run = build_run(cfg, rt, out, plan, tokenizer, source)
    start = 0
    if resume_from is not None:
        with rt.phase(f"restore {resume_from.name}"):
            start = restore(resume_from, run)
        if rt.main:
            checkpoint.trim_log(out / "log.jsonl", start)
    n_params = sum(p.numel() for p in run.model.parameters())
    rt.log(f"model {cfg.model}: {n_params / 1e6:.1f}M parameters, {cfg.dtype}, {rt.device}, world size {rt.world}"
           f"{' (ZeRO-1)' if use_zero1(cfg, rt) else ''}{' (FSDP2)' if cfg.fsdp else ''} | method {cfg.focus.method} | "
           f"{plan.total_steps} optimizer steps ({plan.steps_per_epoch}/epoch), "
           f"{cfg.batch_size * cfg.grad_accum * rt.world} sequences each")
    first_loss, last_loss = train_loop(run, start)
    finish(run, start, first_loss, last_loss)


def build_run(cfg: TrainConfig, rt: Runtime, out: Path, plan: Plan, tokenizer: data.Tokenizer,
              source: Path | Qwen2Config) -> Run:
    """The model (wrapped for DDP or sharded by FSDP2), AdamW and its schedule, the fast weights'
    generator. Only the Run holds them, so that `finish` can let go of DDP before the process group."""
    with rt.phase("wrap (the broadcast of the initial weights)"):
        if cfg.fsdp:
            model, step_module = wrap_fsdp(cfg, rt, source)
        else:
            model = build_model(cfg, rt, source)
            step_module = wrap(model, cfg, rt)
    optimizer, scheduler = build_optimizer(model, cfg, rt, plan.total_steps)
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed + 1000 * rt.rank)  # fast weights: one stream per rank
    return Run(cfg=cfg, rt=rt, out=out, plan=plan, tokenizer=tokenizer, model=model, step_module=step_module,
               optimizer=optimizer, scheduler=scheduler, generator=generator)


def finish(run: Run, start: int, first_loss: float | None, last_loss: float):
    """The final model in HF layout directly in --out (loadable by model.py and transformers)."""
    cfg, rt, out, total = run.cfg, run.rt, run.out, run.plan.total_steps
    save(out / "final.tmp", total, run, with_state=False)
    if rt.main:
        checkpoint.publish(out / "final.tmp", out)
        loss_line = f"loss {first_loss:.4f} → {last_loss:.4f}" if first_loss is not None else "no step run"
        print(f"done: {total - start} steps in {data.fmt_seconds(time.time() - run.t_start)} | {loss_line} | "
              f"model saved to {out}/ (HF layout), log in {out}/log.jsonl")
        if run.dependence and run.dependence.warning:
            print(f"warning: {run.dependence.warning}")
        if cfg.data == PRESETS["demo"]["data"]:
            print(f"next: python eval.py demo --model {out}")
    if rt.distributed:
        with rt.phase("teardown (destroy_process_group)"):
            # NOTE: DDP's C++ reducer holds the process group. Had it dropped the last reference (DDP freed
            # after destroy_process_group), gloo's destructor would join its worker threads holding the GIL
            # while a worker freeing the last collective's tensors waits for the GIL: a deadlock at exit
            # (1 run in ~30 on a loaded CPU). With DDP gone first, destroy_process_group drops the last one.
            run.step_module = run.optimizer = None
            gc.collect()  # and now, should a reference cycle hold DDP
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(parse_args())
    except (TrainError, data.DataError, ModelError) as e:
        if int(os.environ.get("RANK", 0)) == 0 or getattr(e, "every_rank", False):
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
