"""
Fine-tune a Qwen2 / Qwen2.5 model with FocuSFT (or one of its ablations). A flat script:
setup -> data -> model -> optimizer -> (resume) -> loop -> final checkpoint.

    python train.py --preset demo                                  # tiny model, bundled data, CPU, minutes
    torchrun --nproc_per_node 8 train.py --data agentic.jsonl      # the paper's run: Qwen2.5-7B, bf16

Every rank runs its own inner loop (no communication); DDP all-reduces the outer gradients once
per optimizer step. `--resume` continues bit-exactly from the newest checkpoint in --out.
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
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import focusft
from model import TINY, ModelError, Qwen2, Qwen2Config, RMSNorm, resolve_checkpoint


class TrainError(Exception):
    """A user-facing problem (bad flags, refused output dir, ...): printed without a traceback.
    Rank 0 prints it, unless it concerns one rank only (every_rank=True)."""

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


@dataclass
class TrainConfig:
    """Defaults are the paper's (Appendix A, Table 5) and the authors' launch script."""
    # what to train
    model: str = "Qwen/Qwen2.5-7B"  # hub id, local HF directory, or "tiny" (random, byte tokenizer)
    data: str = ""  # JSONL of {"messages": [...], "tools": [...]} conversations
    out: str = "runs/focusft"
    method: str = "focusft"  # focusft | sft | sft-bidir | causal-bilevel (paper Table 3)
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
    # inner loop (focusft.FocusConfig)
    inner_steps: int = 2
    inner_lr: float = 1.0
    inner_clip: float = 1.0
    clip_mode: str = "per-tensor"
    inner_grad: str = "grad"  # torch.func.grad (the design's) | vjp (same gradients, less memory, faster)
    lora_rank: int = 32
    lora_alpha: float = 64.0
    layer_fraction: float = 0.35
    # bookkeeping
    save_every: int = 0  # write out/step-N/ every N optimizer steps (0: only the final model)
    resume: bool = False
    overwrite: bool = False
    device: str = ""  # default: cuda:LOCAL_RANK if CUDA is available, else cpu
    backend: str = ""  # default: nccl on CUDA, gloo on CPU


PRESETS = {
    # A CPU run of about 4 minutes: one epoch (500 steps) of FocuSFT on the bundled agentic task
    # with a 4-layer random Qwen2 and the byte tokenizer. A much larger lr than the paper's: it
    # trains from scratch. It learns the conversation format (the loss falls from 5.2 to ~0.1),
    # not yet the retrieval: see the README.
    "demo": dict(model="tiny", data="examples/agentic.jsonl", out="runs/demo", max_length=2048, epochs=1,
                 batch_size=4, grad_accum=1, lr=2e-3, dtype="fp32", grad_checkpointing=False, max_steps=0,
                 save_every=100),
}


CHOICES = {"method": list(focusft.METHODS), "dtype": ["bf16", "fp32"], "loss_norm": ["mean", "tokens"],
           "clip_mode": ["per-tensor", "global"], "inner_grad": ["grad", "vjp"], "truncation": list(data.TRUNCATION_POLICIES),
           "backend": ["", "nccl", "gloo"]}


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named preset; flags override it")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"default: {f.default}")
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), default=None,
                           choices=CHOICES.get(f.name), help=f"default: {f.default!r}")
    args = vars(p.parse_args(argv))
    preset = PRESETS[args.pop("preset")] if args.get("preset") else {}
    args.pop("preset", None)
    return TrainConfig(**{**preset, **{k: v for k, v in args.items() if v is not None}})


def focus_config(cfg: TrainConfig) -> focusft.FocusConfig:
    names = {f.name for f in fields(focusft.FocusConfig)} - {"targets"}
    return focusft.FocusConfig(**{k: v for k, v in asdict(cfg).items() if k in names})


class FocuSFTStep(nn.Module):
    """The whole FocuSFT step as one forward, so that DDP sees it.

    NOTE: DDP only all-reduces the gradients of a backward that follows the wrapper's forward;
    calling focusft_loss(model, ...) directly under DDP would silently skip the all-reduce."""

    def __init__(self, model: Qwen2, fcfg: focusft.FocusConfig):
        super().__init__()
        self.model, self.fcfg = model, fcfg

    def forward(self, batch, generator):
        return focusft.focusft_loss(self.model, batch, self.fcfg, generator)


# Settings a resumed run must share with the run it continues (data order, schedule, method).
RESUME_MUST_MATCH = ("data", "method", "max_length", "truncation", "epochs", "batch_size", "grad_accum", "lr",
                     "warmup_ratio", "max_steps", "seed", "group_by_length", "loss_norm")


def lr_lambda(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (HF's cosine schedule)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def param_groups(model: nn.Module, weight_decay: float):
    """Weight decay on matrices only; none on biases and RMSNorm weights (HF Trainer's rule)."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, RMSNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied weights appear once
        (no_decay if name.endswith(".bias") or id(p) in norm_params else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def newest_checkpoint(out: Path) -> Path | None:
    """The newest complete out/step-N/ (directories appear by atomic rename, so complete = present)."""
    steps = [(int(p.name[5:]), p) for p in out.glob("step-*") if p.name[5:].isdigit() and (p / "train_state.pt").is_file()]
    return max(steps)[1] if steps else None


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def main(cfg: TrainConfig):
    # ---- setup: processes, device, precision
    distributed = "RANK" in os.environ  # launched by torchrun
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
    if distributed:
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    main_proc = rank == 0
    log = print if main_proc else (lambda *a, **k: None)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(cfg.dtype)
    if dtype is None:
        raise TrainError(f"--dtype must be bf16 or fp32, not {cfg.dtype!r}")
    try:
        fcfg = focus_config(cfg)  # validates --method and --clip-mode
    except ValueError as e:
        raise TrainError(str(e)) from None
    if cfg.loss_norm not in ("mean", "tokens"):
        raise TrainError(f"--loss-norm must be mean or tokens, not {cfg.loss_norm!r}")
    if not cfg.data:
        raise TrainError("--data is required (a JSONL file of conversations), or use --preset demo")

    # ---- output directory: never mix two runs
    out = Path(cfg.out)
    resume_from = newest_checkpoint(out) if cfg.resume else None
    if not (cfg.resume or cfg.overwrite) and out.exists() and any(out.iterdir()):
        raise TrainError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    if main_proc:
        if cfg.overwrite and not cfg.resume:
            shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)

    # ---- tokenizer and data
    if cfg.model == "tiny":
        tokenizer, model_dir = data.byte_tokenizer(), None
    else:
        model_dir = resolve_checkpoint(cfg.model)
        try:  # a model that is not Qwen2 fails here, before minutes of data loading
            Qwen2Config.from_hf(json.loads((model_dir / "config.json").read_text()))
        except json.JSONDecodeError as e:
            raise ModelError(f"{model_dir / 'config.json'}: invalid JSON ({e})") from None
        tokenizer = data.load_tokenizer(model_dir)
    samples = data.load_dataset(cfg.data, tokenizer, cfg.max_length, cfg.truncation, log=log)
    lengths = [len(s.input_ids) for s in samples]
    n_micro = len(data.epoch_batches(lengths, cfg.batch_size, cfg.seed, 0, rank, world))  # same every epoch
    steps_per_epoch = math.ceil(n_micro / cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)

    # ---- model (same random init on every rank for "tiny"; DDP also broadcasts rank 0's weights)
    torch.manual_seed(cfg.seed)
    source = resume_from or model_dir
    if source is not None:
        model = Qwen2.from_pretrained(source, dtype=dtype, device=device)
    else:
        model = Qwen2(Qwen2Config(**TINY)).to(device=device, dtype=dtype)
    model.config.torch_dtype = str(dtype).replace("torch.", "")
    model.gradient_checkpointing = cfg.grad_checkpointing
    step_module = FocuSFTStep(model, fcfg)
    if distributed:
        step_module = DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None)
    n_params = sum(p.numel() for p in model.parameters())

    # ---- optimizer and schedule (fast weights are never here: they are not Parameters)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, total_steps, warmup))
    generator = torch.Generator(device=device)  # fast-weight init; one stream per rank
    generator.manual_seed(cfg.seed + 1000 * rank)

    start_step = 0
    if resume_from is not None:
        # map to CPU: RNG states must stay CPU byte tensors; optimizer.load_state_dict moves its own
        # state to the parameters' device
        state = torch.load(resume_from / "train_state.pt", map_location="cpu", weights_only=False)
        if state["world_size"] != world:
            raise TrainError(f"{resume_from} was written by {state['world_size']} process(es); resume with the same number")
        # the data order and the schedule are functions of these: resuming with others would continue elsewhere
        changed = [k for k in RESUME_MUST_MATCH if state["config"].get(k) != getattr(cfg, k)]
        if changed:
            raise TrainError(f"{resume_from} was written with other settings: " + ", ".join(
                f"--{k.replace('_', '-')} {state['config'].get(k)!r} (now {getattr(cfg, k)!r})" for k in changed))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][rank], generator)
        start_step = state["step"]
        log(f"resuming from {resume_from} at step {start_step}")
        log_path = out / "log.jsonl"
        if main_proc and log_path.is_file():  # the steps after the checkpoint run again: drop their old lines
            kept = []
            for line in log_path.read_text().splitlines():
                with contextlib.suppress(ValueError):  # a line cut short by the interruption
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line + "\n")
            log_path.write_text("".join(kept))
    elif cfg.resume:
        log(f"--resume: no checkpoint in {out}, starting from scratch")

    def save(path: Path, step: int, with_state: bool):
        """Rank 0 writes an HF checkpoint (+ train_state.pt with every rank's RNG state)."""
        rngs = [None] * world
        if distributed:
            dist.all_gather_object(rngs, rng_state(generator))
        else:
            rngs[0] = rng_state(generator)
        if main_proc:
            extra = {**tokenizer.files(), "focusft.json": json.dumps(asdict(fcfg), indent=2) + "\n"}
            if with_state:
                state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                         "epoch": step // steps_per_epoch, "micro_batch": step % steps_per_epoch * cfg.grad_accum,
                         "world_size": world, "rng": rngs, "config": asdict(cfg)}
                extra["train_state.pt"] = lambda p: torch.save(state, p)
            model.save_pretrained(path, extra_files=extra)
        if distributed:
            dist.barrier()

    log(f"model {cfg.model}: {n_params / 1e6:.1f}M parameters, {cfg.dtype}, {device}, world size {world} | "
        f"method {cfg.method} | {total_steps} optimizer steps ({steps_per_epoch}/epoch), "
        f"{cfg.batch_size * cfg.grad_accum * world} sequences each")

    # ---- the loop: one optimizer step = grad_accum micro-batches on every rank
    log_file = open(out / "log.jsonl", "a") if main_proc else None
    epoch_cache: dict[int, list[list[int]]] = {}
    t_start, first_loss, loss_value = time.time(), None, float("nan")
    for step in range(start_step, total_steps):
        t0 = time.time()
        epoch, j = divmod(step, steps_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache = {epoch: data.epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, rank, world,
                                                     cfg.group_by_length)}
        micro = epoch_cache[epoch][j * cfg.grad_accum:(j + 1) * cfg.grad_accum]
        batches = [data.collate([samples[i] for i in idx], tokenizer.pad_token_id) for idx in micro]
        n_sup = [int((b["loss_mask"][:, 1:] & b["attention_mask"][:, 1:]).sum()) for b in batches]
        # stat: [loss sum, inner first, inner last, supervised tokens, real tokens] summed over ranks
        stat = torch.tensor([0.0, 0.0, 0.0, sum(n_sup), sum(int(b["attention_mask"].sum()) for b in batches)],
                            dtype=torch.float64, device=device)
        if cfg.loss_norm == "tokens":  # need the global supervised-token count before any backward
            n_global = stat[3].clone()
            if distributed:
                dist.all_reduce(n_global)
            n_global = n_global.item()
        for k, batch in enumerate(batches):
            batch = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
            last = k == len(batches) - 1
            sync = step_module.no_sync() if distributed and not last else contextlib.nullcontext()
            with sync:
                loss, info = step_module(batch, generator)
                if cfg.loss_norm == "mean":  # the authors': mean per micro-batch, averaged over micro-batches (and ranks, by DDP)
                    scaled = loss / len(batches)
                else:  # sum over all supervised tokens of the step / their global count (DDP averages over ranks: x world)
                    scaled = loss * (n_sup[k] * world / n_global)
                scaled.backward()
            stat[0] += scaled.detach().double()  # the loss as optimised (summed over ranks, / world below)
            if info["inner_losses"] is not None:
                stat[1] += info["inner_losses"][0].double() / len(batches)
                stat[2] += info["inner_losses"][-1].double() / len(batches)
        if distributed:
            dist.all_reduce(stat)
            stat[:3] /= world
        loss_value = stat[0].item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):  # a finite loss may have an inf gradient
            last_ckpt = newest_checkpoint(out)
            what = f"loss ({loss_value})" if not math.isfinite(loss_value) else f"gradient norm ({grad_norm})"
            raise TrainError(f"non-finite {what} at step {step + 1}; stopped without applying it. "
                             + (f"Last checkpoint: {last_ckpt}" if last_ckpt else "No checkpoint was written yet."))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        first_loss = loss_value if first_loss is None else first_loss

        # ---- log (rank 0)
        dt = time.time() - t0
        done = step + 1
        eta = (time.time() - t_start) / (done - start_step) * (total_steps - done)
        rec = {"step": done, "total": total_steps, "epoch": round(done / steps_per_epoch, 4),
               "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "supervised_tokens": int(stat[3]),
               "tokens_per_s": stat[4].item() / dt, "s_per_step": dt, "eta_s": eta}
        inner = ""
        if fcfg.bilevel:
            rec["inner_first"], rec["inner_last"] = stat[1].item(), stat[2].item()
            inner = f" | inner {rec['inner_first']:.4f}→{rec['inner_last']:.4f}"
        if main_proc:
            print(f"step {done}/{total_steps} | epoch {rec['epoch']:.2f} | loss {loss_value:.4f}{inner} | lr {lr:.2e} | "
                  f"gnorm {grad_norm:.2f} | sup {rec['supervised_tokens']} | {rec['tokens_per_s']:,.0f} tok/s | "
                  f"{dt:.2f} s/step | ETA {fmt_time(eta)}", flush=True)
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
        if cfg.save_every and done % cfg.save_every == 0 and done < total_steps:
            save(out / f"step-{done}", done, with_state=True)

    # ---- final model: HF layout directly in --out, loadable by model.py and transformers
    save(out / "final.tmp", total_steps, with_state=False)
    if main_proc:
        publish(out / "final.tmp", out)
        log_file.close()
        loss_line = f"loss {first_loss:.4f} → {loss_value:.4f}" if first_loss is not None else "no step run"
        print(f"done: {total_steps - start_step} steps in {fmt_time(time.time() - t_start)} | {loss_line} | "
              f"model saved to {out}/ (HF layout), log in {out}/log.jsonl")
        if cfg.data == PRESETS["demo"]["data"]:
            print(f"next: python eval.py demo --model {out}")
    if distributed:
        dist.destroy_process_group()


def publish(src: Path, out: Path):
    """Move a finished checkpoint's files into `out`, one atomic rename each, config.json last
    (a directory without config.json is not a loadable checkpoint), then drop `src`."""
    names = sorted(p.name for p in src.iterdir())
    for name in [n for n in names if n != "config.json"] + ["config.json"]:
        os.replace(src / name, out / name)
    src.rmdir()


if __name__ == "__main__":
    try:
        main(parse_args())
    except (TrainError, data.DataError, ModelError) as e:
        if int(os.environ.get("RANK", 0)) == 0 or getattr(e, "every_rank", False):
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
