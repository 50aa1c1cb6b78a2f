"""
The first things to check on a GPU, in one command: speed, memory, attention kernels, bf16 drift.

    python -m bench.gpu_check --model DIR                      # DIR holds a Qwen2 config.json (weights optional)
    python -m bench.gpu_check --model DIR --max-length 16384 --inner-grad vjp --json out.json
    python -m bench.gpu_check --model DIR --layers 14           # a shallower copy of the model (said in the output)

On one device (cuda:0 when there is a GPU, else the CPU), with train.py's own code: train.setup,
train.build_model, train.wrap, train.build_optimizer (AdamW and its schedule) and train.train_step,
so what is timed is what is trained. Random weights from DIR/config.json (nothing is downloaded;
--load-weights reads DIR's checkpoint instead), bf16, the paper's settings (TrainConfig and
FocusConfig defaults: lr 1e-5, AdamW, activation checkpointing, 2 inner steps at lr 1.0 on LoRA
fast weights of the top 35 % of the layers, clipped per tensor), batch 1 and ONE micro-batch per
optimizer step (the paper accumulates 4; the cost per micro-batch is the same). The data are
synthetic: --max-length tokens per sample, a system+user block then 4 assistant replies between
tool outputs, 25 % of the tokens supervised (--supervised-fraction); one new sample per step.

For sft and focusft in turn, on a freshly built model: --warmup steps, then --steps timed steps
(median s/step, tokens/s, MFU), peak torch.cuda.max_memory_allocated / max_memory_reserved over the
timed steps against memory.py's estimate for the same flags (`train.py --estimate-memory --nproc 1
--grad-accum 1 ...`), then one more step under torch.profiler (kept apart so that the profiler does
not distort the timings) to see which SDPA kernel ran inside the inner loop and in the outer pass;
a warning if SDPA fell back to its math kernel (full (B, H, S, S) scores). Then, if an fp32 copy of
the run fits (memory.py's estimate), the same steps again in fp32 from the same initial weights on
the same samples: the bf16 loss drift. One markdown table at the end; --json writes the numbers.

MFU counts model FLOPs (model_flops): per token, 2 x the matmul weights of every layer plus 4 S H hd
for attention (QK^T and PV over all S keys, not halved for causal masks, as PaLM counts), the
vocabulary projection only at the supervised positions (the method computes logits nowhere else),
x 3 for forward and backward; FocuSFT adds the LoRA products and, per inner step, a forward of the
adapted layers and the head and a backward w.r.t. activations and fast weights only (the base
weights get no gradient): about 2 x forward. Recomputation (activation checkpointing, the inner
loop's by-layer recompute) is not counted. tests/test_gpu_check.py checks the count against
torch.utils.flop_counter on real steps.
Peak bf16 FLOP/s come from GPU_PEAK_TFLOPS by device name, or --peak-tflops; none on a CPU.

Sizing: Qwen2.5-7B (7.6e9 parameters) at 4K tokens, 25 % supervised, is 44.9 GFLOP per token for
an sft step and 67.6 for a focusft step (1.51x): 1.84e14 and 2.77e14 FLOP per step. The defaults
run (warmup 1 + steps 3 + profiled 1) = 5 steps of each: 2.3e15 FLOP, 18 s at 40 % MFU on an
A100 (125 TFLOP/s), 6 s on an H100 SXM; recomputation adds about a third (24 s). The fp32 steps are
skipped for the 7B on one 80 GB GPU (memory.py: 113 GiB in fp32). Building the random model twice
on the GPU takes seconds, CUDA start-up and the profiler tens of seconds; --load-weights reads 15 GB
twice (about a minute each from a fast disk). Under 8 minutes with a wide margin; the command
prints its own forecast from the same formula before it starts. Memory: full AdamW (bf16 state,
as train.py keeps it) fits: memory.py estimates 56.8 GiB for focusft (the peak: the lowest layer's
backward with every other gradient made) on one GPU; the check refuses a run whose estimate does
not fit the device and names the --layers that would.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import focusft
import memory
import train
from bench.bench_method import synthetic_batch
from model import ModelError, Qwen2Config

GiB = 2 ** 30
MFU_FORECAST = 0.40  # the MFU the forecast assumes
HEADROOM = 0.9  # share of the device memory a run may plan for (the CUDA context and fragmentation: the rest)

# Dense bf16 tensor-core peak, TFLOP/s, by a piece of torch.cuda.get_device_name (first match wins:
# the longer names first, so "H100 PCIe" is not read as "H100" and "L40S" not as "L4").
GPU_PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("A100", 312),
                   ("L40S", 362), ("L4", 121), ("A10G", 125), ("RTX 4090", 165)]

# SDPA's backends by the name of the aten op that ran (the same on CPU and CUDA), and CUDA kernel names
SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math", "overrideable")
CUDA_ATTENTION_KERNELS = ("flash_fwd", "flash_bwd", "fmha", "efficient_attention", "cudnn")
INNER = "gpu_check: inner loop"


class CheckError(Exception):
    """A user-facing problem (bad flags, a run that does not fit): one line, no traceback."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", required=True, help="a directory holding the model's config.json (and, "
                                                    "with --load-weights, its checkpoint)")
    p.add_argument("--max-length", type=int, default=4096, help="tokens per sample (each sample is that long)")
    p.add_argument("--supervised-fraction", type=float, default=0.25, help="share of supervised tokens")
    p.add_argument("--steps", type=int, default=3, help="timed steps per method (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (CUDA kernels, AdamW state)")
    p.add_argument("--layers", type=int, default=0, help="keep only the first N decoder layers (0: all)")
    p.add_argument("--load-weights", action="store_true", help="the checkpoint's weights, not random ones")
    p.add_argument("--inner-grad", choices=["grad", "vjp"], default=focusft.FocusConfig.inner_grad)
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                   default=train.TrainConfig.grad_checkpointing)
    p.add_argument("--no-fp32", action="store_true", help="skip the fp32 steps (the bf16 drift)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak bf16 TFLOP/s "
                                                                  "(default: from its name, GPU_PEAK_TFLOPS)")
    p.add_argument("--device", default="", help="default: cuda:0 if there is a GPU, else cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of torch's operators (0: torch's default)")
    p.add_argument("--json", default="", help="also write the numbers to this file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.layers < 0 or args.max_length < 16:
        raise CheckError("--steps must be >= 1, --warmup and --layers >= 0, --max-length >= 16")
    if not 0 < args.supervised_fraction <= 1:
        raise CheckError("--supervised-fraction must be in (0, 1]")
    if args.layers and args.load_weights:
        raise CheckError("--layers builds a shallower random model; it cannot load the checkpoint's weights")
    return args


# -----------------------------------------------------------------------------
# Model FLOPs, peak FLOP/s


def model_flops(config: Qwen2Config, fcfg: focusft.FocusConfig, B: int, S: int, N: int) -> float:
    """Matmul FLOPs of one micro-batch's step (B rows of S tokens, N supervised positions), without
    recomputation. Per token, a layer's forward is 2 x its matmul weights + 4 S H hd (QK^T and PV
    over all S keys: causal masks not halved, as PaLM counts); the head 2 D V per supervised
    position only; forward + backward = 3 x forward. Bilevel methods add the LoRA products of the
    adapted layers in the outer pass (forward, and backward w.r.t. activations) and, per inner
    step, what the inner loop runs: a forward of the adapted layers and the head, and a backward
    w.r.t. activations and fast weights only (no base-weight gradients); in the lowest adapted
    layer only what the fast weights' gradients need (down_proj's input gradient, no attention).
    An activation backward costs 1 x the forward of a matmul with weights, 2 x that of attention
    (q, k and v all need gradients)."""
    D, I, hd = config.hidden_size, config.intermediate_size, config.head_dim
    H, KVH, L, T = config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers, B * S
    attention = T * 4 * S * H * hd
    layer = T * 2 * (2 * D * H * hd + 2 * D * KVH * hd + 3 * D * I) + attention  # q, o; k, v; gate, up, down
    head = 2 * D * config.vocab_size * N
    flops = 3 * (L * layer + head)
    if not fcfg.bilevel:
        return flops
    L_a = L - int(L * (1 - fcfg.layer_fraction))  # focusft.adapted_layers
    shapes = [(I, D) if name == "down_proj" else (D, I) for name in fcfg.targets]  # (in, out)
    lora = T * sum(2 * fcfg.lora_rank * (i + o) for i, o in shapes)  # x A^T, then (.) B^T
    # the lowest layer's LoRA backward: dB, d(x A^T), dA, and dx through down_proj's only
    lowest = T * (2 * D * I + sum(2 * fcfg.lora_rank * (2 * o + i) for i, o in shapes) + 2 * fcfg.lora_rank * I)
    inner_step = (L_a * (layer + lora) + head) + (head + (L_a - 1) * (layer + attention + 2 * lora) + lowest)
    return flops + 2 * L_a * lora + fcfg.inner_steps * inner_step


def peak_tflops(device: torch.device, flag: float) -> tuple[float | None, str]:
    """The device's peak bf16 TFLOP/s and where the number comes from."""
    if flag > 0:
        return flag, "--peak-tflops"
    if device.type != "cuda":
        return None, f"{device.type}: no MFU"
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_TFLOPS:
        if key in name:
            return tflops, f"{name}: {tflops} TFLOP/s bf16 dense"
    return None, f"{name}: unknown peak, pass --peak-tflops"


# -----------------------------------------------------------------------------
# The run's pieces: flags, memory estimate, one phase of steps


def train_config(args, method: str, dtype: str, device: torch.device) -> train.TrainConfig:
    """train.py's config for this check: its defaults (the paper's) but one micro-batch per step."""
    focus = focusft.FocusConfig(method=method, inner_grad=args.inner_grad)
    estimate = memory.EstimateConfig(nproc=1, supervised_fraction=args.supervised_fraction)
    return train.TrainConfig(model=args.model, data="synthetic tokens (bench/gpu_check.py)", max_length=args.max_length,
                             grad_accum=1, dtype=dtype, grad_checkpointing=args.grad_checkpointing,
                             device=str(device), threads=args.threads, focus=focus, estimate=estimate)


def estimate_bytes(cfg: train.TrainConfig, config: Qwen2Config) -> float:
    """memory.py's peak for these flags on one process (train.py --estimate-memory --nproc 1)."""
    return memory.estimate_peak(memory.memory_shape(cfg, config))[0]


def estimate_command(cfg: train.TrainConfig) -> str:
    return (f"python train.py --estimate-memory --model {cfg.model} --nproc 1 --max-length {cfg.max_length} "
            f"--grad-accum 1 --method {cfg.focus.method} --dtype {cfg.dtype} --inner-grad {cfg.focus.inner_grad} "
            f"--supervised-fraction {cfg.estimate.supervised_fraction}"
            + ("" if cfg.grad_checkpointing else " --no-grad-checkpointing"))


def device_budget(device: torch.device) -> float | None:
    """Bytes a run may plan for on the device (None on a CPU: not checked)."""
    if device.type != "cuda":
        return None
    return HEADROOM * torch.cuda.get_device_properties(device).total_memory - GiB  # minus the CUDA context


def check_fits(args, config: Qwen2Config, device: torch.device, budget: float | None):
    """Refuse a bf16 run whose estimate exceeds the device; name the largest --layers that fits."""
    def need(c: Qwen2Config) -> float:
        return max(estimate_bytes(train_config(args, m, "bf16", device), c) for m in ("sft", "focusft"))

    if budget is None or need(config) <= budget:
        return
    fitting = [n for n in range(config.num_hidden_layers - 1, 0, -1)
               if need(replace(config, num_hidden_layers=n)) <= budget]
    raise CheckError(f"the run needs about {need(config) / GiB:.1f} GiB (memory.py) and the device has "
                     f"{budget / GiB:.1f} GiB to plan for; "
                     + (f"pass --layers {fitting[0]} (the most that fit)" if fitting else "no --layers fits")
                     + " or a smaller --max-length")


@contextlib.contextmanager
def inner_loop_marked():
    """focusft.inner_loop inside a profiler range, so that its ops can be told from the outer pass's.
    focusft_loss looks inner_loop up in its module at every call, so replacing it there is enough."""
    original = focusft.inner_loop

    def marked(*a, **kw):
        with record_function(INNER):
            return original(*a, **kw)

    focusft.inner_loop = marked
    try:
        yield
    finally:
        focusft.inner_loop = original


def sdpa_kernels(prof) -> dict:
    """The SDPA ops (by backend) that ran inside the inner loop and outside it (the outer pass), and
    on CUDA the attention kernels. An op is inside when it starts inside the marked range: the
    inner loop is synchronous on the host, whichever thread runs a backward."""
    events = prof.events()
    windows = [e.time_range for e in events if e.name == INNER]
    found = {"inner": Counter(), "outer": Counter(), "cuda": Counter()}
    for e in events:
        name = e.name
        if name.startswith("aten::_scaled_dot_product") or name.startswith("aten::_efficient_attention") \
                or name.startswith("aten::_flash_attention"):
            backend = next((b for b in SDPA_BACKENDS if b in name), name)
            backend += " (CPU)" if "for_cpu" in name else ""
            where = "inner" if any(w.start <= e.time_range.start <= w.end for w in windows) else "outer"
            found[where][backend + (" bwd" if "backward" in name else " fwd")] += 1
        elif e.device_type == torch.autograd.DeviceType.CUDA and any(k in name for k in CUDA_ATTENTION_KERNELS):
            found["cuda"][name[:60]] += 1
    return {k: dict(v) for k, v in found.items()}


def run_phase(args, cfg: train.TrainConfig, source, batches: list[dict], profiled: bool) -> dict:
    """Build the model and optimizer as train.py does, run the steps (warmup, then timed), and with
    `profiled` one more step under torch.profiler. Returns times, losses, memory and kernels."""
    rt = train.setup(cfg)
    cuda = rt.device.type == "cuda"
    # a random model is built on the device itself (fast; the same init in every phase of a run)
    with torch.device(rt.device) if cuda and not isinstance(source, Path) else contextlib.nullcontext():
        model = train.build_model(cfg, rt, source)
    step_module = train.wrap(model, cfg, rt)
    optimizer, scheduler = train.build_optimizer(model, cfg, rt, total_steps=len(batches))
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    if cuda:  # the fp32 init's blocks would count as reserved
        torch.cuda.empty_cache()
    times, losses = [], []
    for i, batch in enumerate(batches):
        if cuda and i == args.warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        st = train.train_step(step_module, model, optimizer, scheduler, [batch], generator, cfg, rt)  # .item(): synced
        times.append(time.perf_counter() - t0)
        losses.append(st.loss)
    out = {"s_per_step": statistics.median(times[args.warmup:]), "losses": losses,
           "tokens": int(batches[0]["attention_mask"].sum()), "supervised": int(batches[0]["loss_mask"][:, 1:].sum())}
    if cuda:
        out["peak_allocated"] = torch.cuda.max_memory_allocated(rt.device)
        out["peak_reserved"] = torch.cuda.max_memory_reserved(rt.device)
    if profiled:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with inner_loop_marked(), profile(activities=activities) as prof:
            train.train_step(step_module, model, optimizer, scheduler, [batches[-1]], generator, cfg, rt)
        out["kernels"] = sdpa_kernels(prof)
    del model, step_module, optimizer, scheduler
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


# -----------------------------------------------------------------------------
# The check


def model_source(args, device: torch.device) -> tuple[Qwen2Config, Path | Qwen2Config, str]:
    """The config (with --layers applied), what build_model builds from, and how to name it."""
    path = Path(args.model).expanduser()
    if not (path / "config.json").is_file():
        raise CheckError(f"--model {args.model}: not a directory holding a config.json")
    try:
        config = memory.estimate_model_config(train_config(args, "sft", "bf16", device))
    except memory.EstimateError as e:
        raise CheckError(str(e)) from None
    L = config.num_hidden_layers
    name = path.resolve().name
    if args.layers and args.layers < L:
        config = replace(config, num_hidden_layers=args.layers)
        name += f" with its first {args.layers} of {L} layers (--layers)"
    elif args.layers > L:
        raise CheckError(f"--layers {args.layers}: the model has {L}")
    if args.load_weights:
        return config, path, name + ", its checkpoint's weights"
    return config, config, name + ", random weights"


def run_check(args) -> dict:
    """Every phase, in order: sft, focusft (bf16, timed then profiled), then fp32 when it fits."""
    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    if "RANK" in os.environ:
        raise CheckError("run it as one process (python -m bench.gpu_check), not under torchrun")
    config, source, name = model_source(args, device)
    budget = device_budget(device)
    check_fits(args, config, device, budget)
    n = args.warmup + args.steps
    batches = [synthetic_batch(args.max_length, config.vocab_size, args.supervised_fraction, 4, "cpu", seed)[0]
               for seed in range(n)]  # (1, S) each, moved to the device by train_step
    N = int(batches[0]["loss_mask"][:, 1:].sum())
    peak, peak_from = peak_tflops(device, args.peak_tflops)
    res = {"model": name, "device": str(device), "peak_tflops": peak, "peak_from": peak_from,
           "params": None, "methods": {}, "max_length": args.max_length, "supervised": N, "steps": args.steps,
           "warmup": args.warmup, "grad_checkpointing": args.grad_checkpointing, "inner_grad": args.inner_grad}
    flops = {m: model_flops(config, focusft.FocusConfig(method=m), 1, args.max_length, N) for m in ("sft", "focusft")}
    if peak:
        planned = (n + 1) * sum(flops.values())
        print(f"forecast: {planned:.2e} FLOP of bf16 steps, {planned / (MFU_FORECAST * peak * 1e12):.0f} s at "
              f"{MFU_FORECAST:.0%} MFU (+ model builds and fp32 steps if any)", flush=True)
    for method in ("sft", "focusft"):
        cfg = train_config(args, method, "bf16", device)
        print(f"{method}: {n} bf16 steps + 1 profiled ...", flush=True)
        r = run_phase(args, cfg, source, batches, profiled=True)
        r["flops"] = flops[method]
        r["estimate"] = estimate_bytes(cfg, config)
        r["estimate_command"] = estimate_command(cfg)
        res["methods"][method] = r
    res["params"] = sum(map(sum, memory.memory_shape(cfg, config).params))
    res["fp32_skipped"] = fp32_drift(args, config, source, batches, budget, device, res)
    return res


def fp32_drift(args, config, source, batches, budget, device, res) -> str:
    """The same steps in fp32 from the same initial weights, when an fp32 run fits; returns why not
    ('' when run). The losses land in res["methods"][m]["fp32_losses"]."""
    if args.no_fp32:
        return "--no-fp32"
    need = max(estimate_bytes(train_config(args, m, "fp32", device), config) for m in ("sft", "focusft"))
    if budget is not None and need > budget:
        return f"fp32 needs about {need / GiB:.0f} GiB (memory.py), the device has {budget / GiB:.0f} GiB to plan for"
    for method in ("sft", "focusft"):
        print(f"{method}: {len(batches)} fp32 steps (the drift) ...", flush=True)
        r = run_phase(args, train_config(args, method, "fp32", device), source, batches, profiled=False)
        res["methods"][method]["fp32_losses"] = r["losses"]
    return ""


# -----------------------------------------------------------------------------
# The report


def kernels_text(counts: dict) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))


def report_rows(res: dict) -> list[tuple[str, str, str, str]]:
    """(measure, sft, focusft, focusft / sft) rows of the table."""
    s, f = res["methods"]["sft"], res["methods"]["focusft"]
    cuda = res["device"].startswith("cuda")
    both = (s, f)

    def row(label, fn, ratio=False):
        vals = [fn(r) for r in both]
        rat = f"{vals[1] / vals[0]:.2f}×" if ratio and all(isinstance(v, float) for v in vals) and vals[0] else ""
        return (label, *[v if isinstance(v, str) else f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in vals], rat)

    def mfu(r):
        return "–" if not res["peak_tflops"] else f"{r['flops'] / r['s_per_step'] / (res['peak_tflops'] * 1e12):.1%}"

    def drift(r):
        if "fp32_losses" not in r:
            return f"skipped: {res['fp32_skipped']}"
        d = [abs(a - b) for a, b in zip(r["losses"], r["fp32_losses"])]
        return f"max {max(d):.4f} (rel. {max(x / abs(b) for x, b in zip(d, r['fp32_losses'])):.2%})"

    def mem(key):
        return lambda r: r[key] / GiB if cuda else "n/a (CPU)"

    rows = [row(f"s/step (median of {res['steps']})", lambda r: float(r["s_per_step"]), ratio=True),
            row("tokens/s", lambda r: float(r["tokens"] / r["s_per_step"]), ratio=True),
            row("model TFLOP per step", lambda r: float(r["flops"] / 1e12), ratio=True),
            row(f"MFU ({res['peak_from']})", mfu),
            row("peak max_memory_allocated, GiB", mem("peak_allocated"), ratio=cuda),
            row("peak max_memory_reserved, GiB", mem("peak_reserved")),
            row("memory.py estimate, GiB", lambda r: float(r["estimate"] / GiB), ratio=True),
            row("allocated / estimate", lambda r: f"{r['peak_allocated'] / r['estimate']:.2f}" if cuda else "n/a (CPU)"),
            row("SDPA in the inner loop", lambda r: kernels_text(r["kernels"]["inner"]) if r is f else "– (none)"),
            row("SDPA in the outer pass", lambda r: kernels_text(r["kernels"]["outer"])),
            row("bf16 losses, step by step", lambda r: " ".join(f"{x:.4f}" for x in r["losses"])),
            row("bf16 vs fp32 loss drift", drift)]
    if cuda:
        rows.append(row("CUDA attention kernels", lambda r: kernels_text(r["kernels"]["cuda"])))
    return rows


def print_report(res: dict):
    s = res["methods"]["sft"]
    print()
    print(f"model: {res['model']}, {res['params'] / 1e9:.3f}B parameters, bf16, on {res['device']} "
          f"({res['peak_from']})")
    print(f"run: train.py's code, the paper's settings (AdamW lr 1e-5, activation checkpointing "
          f"{'on' if res['grad_checkpointing'] else 'off'}, 2 inner steps, inner lr 1.0, top 35 % of layers, "
          f"inner grad {res['inner_grad']}), 1 micro-batch of 1 x {res['max_length']:,} tokens per step, "
          f"{res['supervised']:,} supervised ({res['supervised'] / res['max_length']:.0%}, synthetic, 4 replies); "
          f"{res['warmup']} warmup + {res['steps']} timed steps per method")
    print(f"estimate: {s['estimate_command']} (and --method focusft)")
    warnings = [f"{m}: SDPA ran its math kernel ({where}): full (B, H, S, S) scores, slow and large"
                for m, r in res["methods"].items() for where in ("inner", "outer")
                if any(k.startswith("math") for k in r["kernels"][where])]
    for w in warnings:
        print(f"WARNING: {w}")
    print()
    print("| measure | sft | focusft | focusft / sft |")
    print("|---|---|---|---|")
    for label, a, b, ratio in report_rows(res):
        print(f"| {label} | {a} | {b} | {ratio} |")


def main(argv=None):
    try:
        args = parse_args(argv)
        res = run_check(args)
    except (CheckError, train.TrainError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print_report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
