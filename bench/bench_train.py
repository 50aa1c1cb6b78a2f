"""
Benchmark full optimizer steps through train.py's own code: `train.train_step` on the model that
`train.wrap` puts inside DistributedDataParallel (a 1-rank gloo group created in this process) with
the optimizer and schedule of `train.build_optimizer` -- the loss normalisation, no_sync on
accumulation micro-steps, gradient clipping, AdamW, the cosine LambdaLR. Reports tokens/s of SFT and FocuSFT, with and without activation
checkpointing.

    python -m bench.bench_train                       # defaults (several minutes on 2 cores)
    python -m bench.bench_train --repeat 5 --grad-accum 4 --methods sft,sft-bidir,focusft
    python -m bench.bench_train --threads 1           # on shared cores: see the NOTE below

NOTE: with 2 threads on 2 cores that other jobs also use, a step's time is bimodal (2.6 s or 49 s
for the same SFT step here): an OpenMP team with one thread descheduled waits for it at every
barrier. One thread per process gives stable timings (spread < 3 %); the ratios are what count.

Model and batch are bench/bench_method.py's (imported from it): a random Qwen2 proportioned like
Qwen2.5-7B at 4K tokens (28 layers, hidden 448, intermediate 2368, 7 heads / 1 KV head, vocab
19,008) on 512-token multi-turn samples with 25 % supervised tokens. What this adds over
bench_method.py is everything train.py does around the loss: DDP's gradient hooks and bucketed
all-reduce (trivial with one rank, but its copies are paid), the per-step host syncs of the log
line, clipping, the scheduler.

Variants are timed interleaved (one optimizer step of each, round robin, alternating the order),
`--repeat` rounds after `--warmup` rounds; the median is reported, as the cores are shared.
"""

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist

import focusft
import train
from bench.bench_method import synthetic_batch
from model import Qwen2, Qwen2Config


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=448)
    p.add_argument("--intermediate", type=int, default=2368)
    p.add_argument("--heads", type=int, default=7)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--vocab", type=int, default=19008)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--supervised", type=float, default=0.25)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1, help="per micro-batch (the paper: 1)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (the paper: 4)")
    p.add_argument("--loss-norm", choices=["mean", "tokens"], default="mean")
    p.add_argument("--methods", default="sft,focusft")
    p.add_argument("--ckpt", choices=["both", "on", "off"], default="both")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build(args, device: torch.device) -> dict:
    """The model inside train.wrap's DDP, with train.build_optimizer's optimizer and schedule."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(args.seed)
    mcfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, max_position_embeddings=max(4096, args.seq),
                       tie_word_embeddings=False, torch_dtype=args.dtype)
    model = Qwen2(mcfg).to(device=device, dtype=dtype)
    cfg = train.TrainConfig(loss_norm=args.loss_norm)  # the paper's optimizer settings
    rt = train.Runtime(rank=0, world=1, device=device, distributed=True)
    # One DDP wrapper for all variants (two wrappers over the same parameters would both hook their
    # gradients); a variant only swaps the FocusConfig and the checkpointing flag.
    ddp = train.wrap(model, cfg, rt)
    optimizer, scheduler = train.build_optimizer(model, cfg, rt, total_steps=10**6)  # the lr value does not change the cost
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    return dict(model=model, ddp=ddp, cfg=cfg, rt=rt, optimizer=optimizer, scheduler=scheduler, generator=generator)


def micro_batches(args, device: torch.device) -> list[dict]:
    batches = []
    for k in range(args.grad_accum):
        rows = [synthetic_batch(args.seq, args.vocab, args.supervised, args.turns, device, args.seed + k * 997 + b)[0]
                for b in range(args.batch_size)]
        batches.append({name: torch.cat([r[name] for r in rows]) for name in rows[0]})  # (B, S) each
    return batches


def time_variants(args, b: dict, batches: list[dict], variants: list[tuple[str, bool]], device) -> dict:
    """Seconds per optimizer step of each (method, checkpointing) variant, interleaved rounds."""
    fcfgs = {m: focusft.FocusConfig(method=m) for m, _ in variants}

    def run(v):
        b["ddp"].module.fcfg = fcfgs[v[0]]
        b["model"].gradient_checkpointing = v[1]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train.train_step(b["ddp"], b["model"], b["optimizer"], b["scheduler"], batches, b["generator"], b["cfg"],
                         b["rt"])  # what train.py runs
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        for v in variants:
            run(v)
    times = {v: [] for v in variants}
    for r in range(args.repeat):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            times[v].append(run(v))
        print(f"round {r + 1}/{args.repeat}: " + ", ".join(f"{m}{'+ckpt' if c else ''} {times[(m, c)][-1]:.2f}s"
                                                          for m, c in variants), flush=True)
    return times


def report(args, times: dict, variants: list[tuple[str, bool]], tokens: int):
    # The median is the headline; the minimum is shown too: on shared cores a slow outlier only
    # ever adds time, so the fastest round is the closest to the step's own cost.
    med = {v: statistics.median(t) for v, t in times.items()}
    low = {v: min(t) for v, t in times.items()}
    print()
    print(f"command: python -m bench.bench_train {' '.join(sys.argv[1:])}".rstrip())
    print()
    print(f"| method | ckpt | s/step (median of {args.repeat}) | tokens/s | time vs sft | min s/step | min vs sft |")
    print("|---|---|---|---|---|---|---|")
    for m, c in variants:
        base, base_low = med.get(("sft", c)), low.get(("sft", c))
        ratio = f"{med[(m, c)] / base:.2f}x" if base else "n/a"
        ratio_low = f"{low[(m, c)] / base_low:.2f}x" if base_low else "n/a"
        print(f"| {m} | {'on' if c else 'off'} | {med[(m, c)]:.2f} | {tokens / med[(m, c)]:,.0f} | {ratio} | "
              f"{low[(m, c)]:.2f} | {ratio_low} |")
    print()
    for c in (False, True):
        if ("focusft", c) in med and ("sft", c) in med:
            print(f"FocuSFT / SFT step time, activation checkpointing {'on' if c else 'off'}: "
                  f"{med[('focusft', c)] / med[('sft', c)]:.2f}x (medians; "
                  f"{low[('focusft', c)] / low[('sft', c)]:.2f}x from the minima; the paper reports 1.71x on GPUs)")


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = args.methods.split(",")
    ckpts = {"both": [False, True], "on": [True], "off": [False]}[args.ckpt]

    # One rank of a real process group: DDP's reducer, hooks and all-reduce run as under torchrun.
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    b = build(args, device)
    batches = micro_batches(args, device)
    tokens = sum(int(x["attention_mask"].sum()) for x in batches)
    supervised = sum(int(x["loss_mask"].sum()) for x in batches)
    n_params = sum(p.numel() for p in b["model"].parameters())
    cfg = b["cfg"]
    print(f"model: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads / "
          f"{args.kv_heads} KV, vocab {args.vocab}: {n_params / 1e6:.1f}M params, {args.dtype} on {device} "
          f"({torch.get_num_threads()} threads), DDP {backend} world size 1")
    print(f"optimizer step: {args.grad_accum} micro-batch(es) of {args.batch_size} x {args.seq} tokens = {tokens} tokens, "
          f"{supervised} supervised; loss-norm {args.loss_norm}; AdamW lr {cfg.lr} wd {cfg.weight_decay}, "
          f"clip {cfg.max_grad_norm}")
    variants = [(m, c) for c in ckpts for m in methods]
    times = time_variants(args, b, batches, variants, device)
    b.clear()  # DDP before the process group (train.finish says why)
    dist.destroy_process_group()
    report(args, times, variants, tokens)


if __name__ == "__main__":
    main()
