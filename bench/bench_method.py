"""
Benchmark one optimizer step of the four methods (focusft.py) and of the naive authors'-style step
(tests/reference.py), side by side, with and without activation checkpointing.

    python -m bench.bench_method                     # the issue's setting (a few minutes on 2 cores)
    python -m bench.bench_method --vocab 152064      # the real Qwen2.5 vocabulary
    python -m bench.bench_method --keep-freed-memory # no page-fault churn (see keep_freed_memory)
    python -m bench.bench_method --repeat 3 --no-memory

The model is a CPU-sized random Qwen2 proportioned like Qwen2.5-7B at 4K tokens, so that the cost
ratios of the paper's setting carry over:

  * 28 layers, hidden 448, intermediate 2368 (= 5.29 x hidden, as 18944 / 3584), 7 heads of 64 with
    1 KV head (7:1 GQA, as 28:4). Per layer and token, attention (QK^T and PV) costs 4 * S * D FLOPs
    against 2 * (layer parameters) for the projections: 4*512*448 / (2*3.64M) = 0.126, the same as
    Qwen2.5-7B at 4K (4*4096*3584 / (2*233M)).
  * vocabulary 19,008 by default: it keeps the lm_head at Qwen2.5-7B's 8.3 % of the decoder-layer
    parameters (545M / 6.5B), so the logits cost -- which the naive step pays at every position and
    every inner step -- has the paper's weight. A 32K or the real 152K vocabulary (--vocab 152064,
    i.e. 67 % of the layers here) would overweight it; the flag is there to show the effect.
  * 512 tokens in several turns: a system+user block, then `--turns` assistant replies separated by
    tool outputs, 25 % of the tokens supervised.

Each step is: zero_grad, loss, backward, torch.optim.AdamW step, in fp32 with batch 1. The variants
are timed interleaved (one step of each, round robin, `--repeat` rounds after `--warmup` rounds) and
the median is reported, because the 2 CPU cores of this machine are shared with other jobs. Wall
time is the measure; the CPU time of the process is printed beside it as a check that is less
sensitive to other jobs (with `--threads 1` the two agree on an idle machine).

Peak memory: what forward + backward allocate above the weights, gradients and AdamW state, i.e.
activations and temporaries (the rest is the same for every method): torch.cuda.max_memory_allocated
on CUDA; on CPU, which has no allocator counter, a separate untimed step runs under
torch.profiler(profile_memory=True) and the peak of the running sum of its allocation records is
reported.

In FLOPs, an inner step of FocuSFT is a forward plus an activation-gradient backward through the top
35 % of the layers (the bottom layers run once and are shared): about a quarter of an SFT step, so
k=2 adds about half. The script prints that ideal ratio under the table.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

import focusft
from focusft import FocusConfig
from model import Qwen2, Qwen2Config
from tests.reference import naive_focusft_loss

METHODS = ["sft", "sft-bidir", "causal-bilevel", "focusft", "focusft-vjp", "naive-focusft"]


def synthetic_batch(seq: int, vocab: int, supervised: float, turns: int, device, seed: int = 0):
    """One multi-turn sample: a long system+user block (half the context), then `turns` assistant
    replies, each but the last followed by a tool output; `supervised` of the tokens are replies."""
    def split(n, k):  # n tokens into k nearly equal runs
        return [n // k + (i < n % k) for i in range(k)]

    n_resp = round(seq * supervised)
    n_ctx = seq - n_resp
    resp = split(n_resp, turns)
    tools = split(n_ctx // 2, turns - 1) if turns > 1 else []
    first = n_ctx - sum(tools)
    runs = [(0, first)]
    for t in range(turns):
        runs.append((1, resp[t]))
        if t < turns - 1:
            runs.append((0, tools[t]))
    loss_mask = torch.tensor([v for v, n in runs for _ in range(n)], dtype=torch.bool, device=device)[None]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(loss_mask), "loss_mask": loss_mask}, runs


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory in the process, as PyTorch's CUDA caching allocator
    does on GPUs. By default glibc serves blocks above a (dynamic) threshold with mmap and gives
    freed memory back to the kernel, so a step that allocates many transient activations page-
    faults them in again every time (sys time; the inner loop suffers most). Linux/glibc only."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
    ok = libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)  # blocks up to 32 MiB (the maximum) from the heap
    ok &= libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and never hand the heap's top back
    return bool(ok)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_loss_fn(model, batch, method, generator):
    if method == "naive-focusft":
        cfg = FocusConfig(method="focusft")

        def loss_fn():
            return naive_focusft_loss(model, batch, cfg, generator)[0]
    else:  # "focusft-vjp": FocuSFT with FocusConfig(inner_grad="vjp") instead of torch.func.grad
        cfg = FocusConfig(method="focusft", inner_grad="vjp") if method == "focusft-vjp" else FocusConfig(method=method)

        def loss_fn():
            return focusft.focusft_loss(model, batch, cfg, generator)[0]

    return loss_fn


def make_step(opt, loss_fn):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    return step


def cpu_peak_bytes(fn):
    """Peak of the bytes allocated by fn above those live at its start: the running sum of the
    profiler's allocation (+) and free (-) records, in time order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # NOTE: the raw records live in kineto_results; prof.events() folds allocations into the ops.
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory(loss_fn, model, device):
    """Peak bytes of one forward + backward above the weights, their gradients and the AdamW state:
    the activations and temporaries. (Gradients are the same for every method, and so is what the
    AdamW step allocates.)"""
    if any(p.grad is None for p in model.parameters()):
        loss_fn().backward()
    model.zero_grad(set_to_none=False)  # keep the gradient buffers: backward accumulates into them

    def fwd_bwd():
        loss_fn().backward()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        return cpu_peak_bytes(fwd_bwd)
    except AttributeError:  # a torch without kineto_results: report n/a rather than fail
        return None


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=448)
    p.add_argument("--intermediate", type=int, default=2368)
    p.add_argument("--heads", type=int, default=7)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--vocab", type=int, default=19008, help="19008 keeps Qwen2.5-7B's lm_head:layers ratio; 152064 = real")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--supervised", type=float, default=0.25, help="fraction of supervised tokens")
    p.add_argument("--turns", type=int, default=4, help="assistant replies (response runs)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ckpt", choices=["both", "on", "off"], default="both")
    p.add_argument("--repeat", type=int, default=5, help="timed rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip the (untimed) peak-memory step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="CPU: glibc mallopt so that freed memory is reused instead of page-faulted in again")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not keep_freed_memory():
        p.error("--keep-freed-memory needs glibc (Linux)")
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    ckpts = {"both": [False, True], "on": [True], "off": [False]}[args.ckpt]

    torch.manual_seed(args.seed)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(4096, args.seq),
                      tie_word_embeddings=False, torch_dtype=args.dtype)
    model = Qwen2(cfg).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    batch, runs = synthetic_batch(args.seq, args.vocab, args.supervised, args.turns, device, args.seed)
    generator = torch.Generator(device=device).manual_seed(1234)
    n_params = sum(p.numel() for p in model.parameters())
    layers = focusft.adapted_layers(model, FocusConfig())
    print(f"model: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"{args.heads} heads / {args.kv_heads} KV, vocab {args.vocab}: {n_params / 1e6:.1f}M params, "
          f"{args.dtype} on {device} ({torch.get_num_threads()} threads"
          f"{', glibc keeps freed memory' if args.keep_freed_memory else ''})")
    print(f"batch: 1 x {args.seq} tokens, {int(batch['loss_mask'].sum())} supervised, runs (loss, length): {runs}")
    print(f"adapted layers {layers.start}..{layers.stop - 1}; k = {FocusConfig().inner_steps}")

    variants = [(m, c) for c in ckpts for m in methods]
    loss_fns = {v: make_loss_fn(model, batch, v[0], generator) for v in variants}
    steps = {v: make_step(opt, loss_fns[v]) for v in variants}

    def run(v):  # -> (wall seconds, CPU seconds of this process, all threads)
        model.gradient_checkpointing = v[1]
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        steps[v]()
        sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    for _ in range(args.warmup):
        for v in variants:
            run(v)
    times = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for r in range(args.repeat):
        order = variants if r % 2 == 0 else variants[::-1]  # alternate the order: no fixed neighbour
        for v in order:
            wall, c = run(v)
            times[v].append(wall)
            cpu[v].append(c)
        print(f"round {r + 1}/{args.repeat} (s): " + ", ".join(f"{m}{'+ckpt' if c else ''} {times[(m, c)][-1]:.2f}"
                                                                for m, c in variants), flush=True)
    peaks = {}
    if not args.no_memory:
        for v in variants:
            model.gradient_checkpointing = v[1]
            peaks[v] = peak_memory(loss_fns[v], model, device)

    med = {v: statistics.median(t) for v, t in times.items()}
    med_cpu = {v: statistics.median(t) for v, t in cpu.items()}
    # In units of one forward: an SFT step is 3 (forward, backward = 2 forwards), 4 with checkpointing
    # (+ the recompute). An inner step adds a forward and an activation-gradient backward of the top
    # layers: 2 * frac. With checkpointing FocuSFT does not recompute the top layers (focusft.py).
    frac = (layers.stop - layers.start) / args.layers
    inner = FocusConfig().inner_steps * 2 * frac
    ideal, ideal_ckpt = (3 + inner) / 3, (4 - frac + inner) / 4
    print()
    print(f"command: python -m bench.bench_method {' '.join(sys.argv[1:])}".rstrip())
    print()
    print(f"| method | ckpt | s/step (median of {args.repeat}) | min | vs sft | CPU s/step | CPU vs sft | peak mem |")
    print("|---|---|---|---|---|---|---|---|")
    for m, c in variants:
        base, base_cpu = med.get(("sft", c)), med_cpu.get(("sft", c))
        ratio = f"{med[(m, c)] / base:.2f}x" if base else "n/a"
        ratio_cpu = f"{med_cpu[(m, c)] / base_cpu:.2f}x" if base_cpu else "n/a"
        mem = f"{peaks[(m, c)] / 2**20:.0f} MiB" if peaks.get((m, c)) is not None else "n/a"
        print(f"| {m} | {'on' if c else 'off'} | {med[(m, c)]:.2f} | {min(times[(m, c)]):.2f} | {ratio} "
              f"| {med_cpu[(m, c)]:.2f} | {ratio_cpu} | {mem} |")
    print()
    print(f"ideal FocuSFT / SFT from FLOPs: {ideal:.2f}x without checkpointing, {ideal_ckpt:.2f}x with it")
    for c, goal in ((False, 1.6), (True, 1.5)):
        if ("focusft", c) in med and ("sft", c) in med:
            r = med[("focusft", c)] / med[("sft", c)]
            print(f"goal FocuSFT / SFT <= {goal}x ({'with' if c else 'without'} checkpointing): "
                  f"{r:.2f}x {'PASS' if r <= goal else 'MISS'}")
        if ("focusft", c) in med and ("naive-focusft", c) in med:
            r = med[("focusft", c)] / med[("naive-focusft", c)]
            print(f"goal FocuSFT / naive <= 0.8x ({'with' if c else 'without'} checkpointing): "
                  f"{r:.2f}x {'PASS' if r <= 0.8 else 'MISS'}")
    print("s/step: wall clock; CPU s/step: CPU time of this process (all threads), less sensitive to other jobs")
    if peaks:
        how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler allocation records"
        print(f"peak mem: activations and temporaries of forward + backward, i.e. above the weights, "
              f"gradients and AdamW state ({how})")


if __name__ == "__main__":
    main()
