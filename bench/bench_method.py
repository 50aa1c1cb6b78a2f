"""
Benchmark one optimizer step of the four methods (focusft.py), of the previous FocuSFT code path
and of the naive authors'-style step (tests/reference.py), side by side, with and without
activation checkpointing; and the inner loop alone, before (whole adapted stack in one torch.func
transform) and after (layers recomputed one at a time).

    python -m bench.bench_method --threads 1          # the 7B-at-4K proportions (several minutes on 2 cores)
    python -m bench.bench_method --vocab 152064       # the real Qwen2.5 vocabulary
    python -m bench.bench_method --keep-freed-memory  # no page-fault churn (see keep_freed_memory)
    python -m bench.bench_method --repeat 3 --no-memory --methods sft,focusft --ckpt on

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

Step variants: each step is zero_grad, loss, backward, torch.optim.AdamW step, in fp32 with batch 1.
`focusft` uses torch.func.grad (the default), `focusft-vjp` FocusConfig(inner_grad="vjp");
with checkpointing on both checkpoint every layer of the outer pass and recompute the adapted layers
one at a time in the inner loop (focusft_loss's default, by_layer=None). `focusft-keep` (checkpointing
on only) is `--inner-recompute off`: the inner loop keeps the adapted layers' activations, and so does
the outer pass, which checkpoints the layers below; `focusft-recompute` (checkpointing off only) is `--inner-recompute
on`. The summary names the variant `--inner-recompute auto` picks for this step on this machine (from
memory.py's estimate, as train.py does) and its ratios to SFT. `focusft-prev` (checkpointing on only) is the code path before
that: the inner loop differentiates the whole adapted stack in one transform (keeping all its
activations) and the outer pass does not checkpoint the adapted layers (what `focusft-keep` does
again, through focusft_loss). `naive-focusft` is
tests/reference.py: every inner step reruns the whole model with full-vocabulary logits.

Inner-loop variants: focusft.inner_loop alone (k = 2, fresh fast weights each call) on the same
batch, whole stack vs layer by layer, torch.func.grad vs vjp, beside one no_grad forward of the
adapted layers: what the layer-by-layer path pays per inner step, ideally, for recomputing.

All variants are timed interleaved (one call of each, round robin, order alternating, `--repeat`
rounds after `--warmup` rounds) and the median is reported, because the 2 CPU cores of this
machine are shared with other jobs. Wall time is the measure; the CPU time of the process is
printed beside it as a check that is less sensitive to other jobs (with `--threads 1` the two agree
on an idle machine).

Peak memory: what a variant allocates above what is live when it starts, i.e. activations and
temporaries (weights, gradients and AdamW state are the same for every method and are excluded):
torch.cuda.max_memory_allocated on CUDA; on CPU, which has no allocator counter, a separate untimed
call runs under torch.profiler(profile_memory=True) and the peak of the running sum of its
allocation records is reported.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

import focusft
import memory
import train
from focusft import FocusConfig
from model import Qwen2, Qwen2Config
from tests.reference import naive_focusft_loss

METHODS = ["sft", "sft-bidir", "causal-bilevel", "focusft", "focusft-keep", "focusft-recompute", "focusft-vjp",
           "focusft-prev", "naive-focusft"]
INNER = ["whole-stack", "whole-stack-vjp", "by-layer", "by-layer-vjp"]  # inner_loop alone


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


def previous_focusft_loss(model, batch, cfg, generator):
    """FocuSFT as focusft.py computed it before the inner loop recomputed layers: the inner loop
    differentiates the whole adapted stack in one transform, and the outer pass checkpoints only the
    layers below the adapted ones (the same loss and gradients)."""
    h, rope, mask, sel, targets = focusft.step_inputs(model, batch, cfg)
    layers = focusft.adapted_layers(model, cfg)
    h_bottom = model.run_layers(h, rope, mask, 0, layers.start)
    fast = focusft.init_fast_weights(model, cfg, generator)
    with focusft.activation_checkpointing_off(model):
        fast, _ = focusft.inner_loop(model, h_bottom.detach(), rope, mask, sel, targets, fast, cfg)
        h = model.run_layers(h_bottom, rope, mask, layers.start, layers.stop, fast, cfg.fast_scale)
    return focusft.response_loss(model, h, sel, targets, cfg.loss_chunk)


def make_loss_fn(model, batch, method, generator):
    if method == "naive-focusft":
        cfg = FocusConfig(method="focusft")
        return lambda: naive_focusft_loss(model, batch, cfg, generator)[0]
    if method == "focusft-prev":
        return lambda: previous_focusft_loss(model, batch, FocusConfig(), generator)
    if method in ("focusft-keep", "focusft-recompute"):  # --inner-recompute off / on
        by_layer = method == "focusft-recompute"
        return lambda: focusft.focusft_loss(model, batch, FocusConfig(), generator, by_layer=by_layer)[0]
    cfg = FocusConfig(method="focusft", inner_grad="vjp") if method == "focusft-vjp" else FocusConfig(method=method)
    return lambda: focusft.focusft_loss(model, batch, cfg, generator)[0]


def make_inner_fn(model, batch, name, generator):
    """focusft.inner_loop alone on the batch: "whole-stack" with checkpointing off, "by-layer" on;
    "-vjp" with FocusConfig(inner_grad="vjp"). The bottom layers run once, here."""
    cfg = FocusConfig(inner_grad="vjp" if name.endswith("-vjp") else "grad")
    with torch.no_grad():
        h, rope, mask, sel, targets = focusft.step_inputs(model, batch, cfg)
        h_bottom = model.run_layers(h, rope, mask, 0, focusft.adapted_layers(model, cfg).start)

    def inner():
        fast = focusft.init_fast_weights(model, cfg, generator)
        return focusft.inner_loop(model, h_bottom, rope, mask, sel, targets, fast, cfg)

    return inner, (h_bottom, rope, mask, cfg)


def make_forward_fn(model, pieces):
    """One no_grad forward of the adapted layers (B = 0 fast weights): the recomputation's cost."""
    h_bottom, rope, mask, cfg = pieces
    layers = focusft.adapted_layers(model, cfg)

    @torch.no_grad()
    def forward():
        fast = focusft.init_fast_weights(model, cfg, None)
        return model.run_layers(h_bottom, rope, mask, layers.start, layers.stop, fast, cfg.fast_scale)

    return forward


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


def peak_bytes(fn, device):
    """Peak bytes fn allocates above those live when it starts."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        return cpu_peak_bytes(fn)
    except AttributeError:  # a torch without kineto_results: report n/a rather than fail
        return None


def step_peak_memory(loss_fn, model, device):
    """Peak bytes of one forward + backward above the weights, their gradients and the AdamW state:
    the activations and temporaries. (Gradients are the same for every method, and so is what the
    AdamW step allocates.)"""
    if any(p.grad is None for p in model.parameters()):
        loss_fn().backward()
    model.zero_grad(set_to_none=False)  # keep the gradient buffers: backward accumulates into them
    return peak_bytes(lambda: loss_fn().backward(), device)


def layer_memory(model, args, device, dtype):
    """Bytes per token that one adapted layer's forward + backward allocates at its peak, as the
    slope between --seq/2 and --seq tokens (what does not grow with the length drops out): the
    outer pass (first-order autograd: a checkpointed layer's recompute and backward, with weight
    gradients accumulating into existing buffers) and the inner loop's per-layer step
    (torch.func.grad and torch.func.vjp of <layer(x, phi), g> w.r.t. (phi, x))."""
    cfg = FocusConfig()
    i = focusft.adapted_layers(model, cfg).stop - 1
    fast = focusft.init_fast_weights(model, cfg, None)[i]
    peaks = {}
    for S in (args.seq // 2, args.seq):
        batch, _ = synthetic_batch(S, args.vocab, args.supervised, args.turns, device, args.seed)
        with torch.no_grad():
            h, rope, mask, _, _ = focusft.step_inputs(model, batch, cfg)
        x, g = torch.randn_like(h), torch.randn_like(h)

        def dot(phi, x):
            return (model.run_layers(x, rope, mask, i, i + 1, {i: phi}, cfg.fast_scale) * g).sum()

        def outer(x=x.clone().requires_grad_()):
            model.run_layers(x, rope, mask, i, i + 1, {i: fast}, cfg.fast_scale).backward(g)

        model.gradient_checkpointing = False
        outer()  # the layer's weight gradients now exist, as in training
        for how in ("grad", "vjp"):
            with torch.no_grad():
                peaks[how, S] = peak_bytes(lambda: focusft.grads_and_value(dot, how)(fast, x), device)
        peaks["outer", S] = peak_bytes(outer, device)
    S0, S1 = args.seq // 2, args.seq
    e = torch.finfo(dtype).bits // 8
    print()
    print(f"one adapted layer, forward + backward, peak bytes per token ({S0} -> {S1} tokens; "
          f"D = {args.hidden}, I = {args.intermediate}, {args.dtype}):")
    for what, label in (("outer", "outer pass (autograd)"), ("grad", "inner, torch.func.grad"),
                        ("vjp", "inner, torch.func.vjp")):
        per_token = (peaks[what, S1] - peaks[what, S0]) / (S1 - S0)
        print(f"  {label}: {per_token:,.0f} B = {per_token / e:,.0f} elements of {e} B")


def parse_args():
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
    p.add_argument("--methods", default=",".join(METHODS), help="step variants")
    p.add_argument("--inner", default=",".join(INNER), help="inner-loop variants ('' for none)")
    p.add_argument("--ckpt", choices=["both", "on", "off"], default="both")
    p.add_argument("--repeat", type=int, default=5, help="timed rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip the (untimed) peak-memory runs")
    p.add_argument("--layer-memory", action="store_true", help="only measure one layer's activation bytes per token")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="CPU: glibc mallopt so that freed memory is reused instead of page-faulted in again")
    args = p.parse_args()
    if args.keep_freed_memory and not keep_freed_memory():
        p.error("--keep-freed-memory needs glibc (Linux)")
    for name, allowed in ((args.methods, METHODS), (args.inner, INNER)):
        for m in filter(None, name.split(",")):
            if m not in allowed:
                p.error(f"unknown variant {m!r}; choose from {', '.join(allowed)}")
    return args


def build_cases(args, model, opt, batch, generator):
    """name -> (checkpointing on?, function to time, function whose peak memory to measure)."""
    ckpts = {"both": [False, True], "on": [True], "off": [False]}[args.ckpt]
    cases = {}
    for c in ckpts:
        for m in filter(None, args.methods.split(",")):
            if m == "focusft-prev" and not c or m == ("focusft-recompute" if c else "focusft-keep"):
                continue  # the same as "focusft" here (without checkpointing the previous path is today's)
            loss_fn = make_loss_fn(model, batch, m, generator)
            cases[("step", m, c)] = (c, make_step(opt, loss_fn),
                                     lambda loss_fn=loss_fn: step_peak_memory(loss_fn, model, batch["input_ids"].device))
    for name in filter(None, args.inner.split(",")):
        inner, pieces = make_inner_fn(model, batch, name, generator)
        c = name.startswith("by-layer")
        cases[("inner", name, c)] = (c, inner, lambda inner=inner: peak_bytes(inner, batch["input_ids"].device))
    if args.inner:
        forward = make_forward_fn(model, pieces)
        cases[("inner", "forward", False)] = (False, forward, lambda: peak_bytes(forward, batch["input_ids"].device))
    return cases


def time_cases(cases, args, device, model):
    """Round robin over the cases, order alternating -> ({case: [wall s]}, {case: [CPU s]})."""
    def run(case):
        model.gradient_checkpointing = cases[case][0]
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        cases[case][1]()
        sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    for _ in range(args.warmup):
        for case in cases:
            run(case)
    wall, cpu = {case: [] for case in cases}, {case: [] for case in cases}
    order = list(cases)
    for r in range(args.repeat):
        for case in order if r % 2 == 0 else order[::-1]:  # alternate the order: no fixed neighbour
            w, c = run(case)
            wall[case].append(w)
            cpu[case].append(c)
        print(f"round {r + 1}/{args.repeat} (s): " + ", ".join(
            f"{name}{'+ckpt' if c else ''} {wall[(kind, name, c)][-1]:.2f}" for kind, name, c in order), flush=True)
    return wall, cpu


def report_steps(cases, wall, cpu, peaks, args, frac, k):
    med = {case: statistics.median(t) for case, t in wall.items()}
    med_cpu = {case: statistics.median(t) for case, t in cpu.items()}
    print(f"| method | ckpt | s/step (median of {args.repeat}) | min | vs sft | CPU s/step | CPU vs sft | peak mem |")
    print("|---|---|---|---|---|---|---|---|")
    for case in cases:
        kind, m, c = case
        if kind != "step":
            continue
        base, base_cpu = med.get(("step", "sft", c)), med_cpu.get(("step", "sft", c))
        ratio = f"{med[case] / base:.2f}x" if base else "n/a"
        ratio_cpu = f"{med_cpu[case] / base_cpu:.2f}x" if base_cpu else "n/a"
        mem = f"{peaks[case] / 2**20:.0f} MiB" if peaks.get(case) is not None else "n/a"
        print(f"| {m} | {'on' if c else 'off'} | {med[case]:.2f} | {min(wall[case]):.2f} | {ratio} "
              f"| {med_cpu[case]:.2f} | {ratio_cpu} | {mem} |")
    # In units of one forward of the whole model: an SFT step is 3 (forward, backward = 2 forwards),
    # 4 with checkpointing (+ the recompute). An inner step adds a forward and an activation-gradient
    # backward of the adapted layers, 2 * frac, and with checkpointing a recompute of them, + frac.
    # With --inner-recompute off the outer pass keeps the adapted layers' activations: - frac.
    print()
    print(f"ideal FocuSFT / SFT from FLOPs: {(3 + 2 * k * frac) / 3:.2f}x without checkpointing, "
          f"{(4 + 3 * k * frac) / 4:.2f}x with it, {(4 - frac + 2 * k * frac) / 4:.2f}x with it and --inner-recompute "
          f"off (as the previous code path)")
    keep = auto_keeps(args)
    for c in (False, True):
        pick = "focusft" if keep != c else "focusft-keep" if keep else "focusft-recompute"
        f, sft = ("step", pick, c), ("step", "sft", c)
        if f in med and sft in med:
            print(f"--inner-recompute auto picks {'off' if keep else 'on'} here ({pick}); "
                  f"{'with' if c else 'without'} checkpointing it costs {med[f] / med[sft]:.2f}x an SFT step "
                  f"(CPU time {med_cpu[f] / med_cpu[sft]:.2f}x)")
    for c in (False, True):
        f, sft, naive = ("step", "focusft", c), ("step", "sft", c), ("step", "naive-focusft", c)
        ratios = [f"{med[f] / med[ref]:.2f}x {name}" for ref, name in ((sft, "SFT"), (naive, "the naive step"))
                  if f in med and ref in med]
        if ratios:
            print(f"measured FocuSFT {'with' if c else 'without'} checkpointing: " + ", ".join(ratios))
    if ("step", "focusft-prev", True) in med and ("step", "focusft", True) in med:
        new, prev = ("step", "focusft", True), ("step", "focusft-prev", True)
        mem = (f", peak memory {peaks[new] / 2**20:.0f} vs {peaks[prev] / 2**20:.0f} MiB"
               if peaks.get(new) and peaks.get(prev) else "")
        print(f"FocuSFT with checkpointing, this code vs the previous path: {med[new] / med[prev]:.2f}x time{mem}")


def auto_keeps(args) -> bool:
    """Whether --inner-recompute auto keeps the inner loop's activations for this step on this
    device (memory.resolve_inner_recompute, the rule train.py applies, for one process)."""
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, tie_word_embeddings=False)
    cfg = train.TrainConfig(max_length=args.seq, batch_size=1, grad_accum=1, dtype=args.dtype, device=args.device,
                            estimate=memory.EstimateConfig(nproc=1, supervised_fraction=args.supervised))
    available, what = memory.device_memory(torch.device(args.device))
    chosen = memory.resolve_inner_recompute(cfg, config, torch.device(args.device).type, 1, available, what,
                                            log=lambda line: None)
    return chosen.inner_recompute == "off"


def report_inner(cases, wall, peaks, args, k):
    med = {case: statistics.median(t) for case, t in wall.items() if case[0] == "inner"}
    if not med:
        return
    fwd = med.pop(("inner", "forward", False))
    print()
    print(f"inner loop alone (k = {k}; median of {args.repeat}):")
    print("| path | inner grad | s | vs whole stack | peak mem | vs whole stack |")
    print("|---|---|---|---|---|---|")
    for case, t in med.items():
        name = case[1]
        how = "vjp" if name.endswith("-vjp") else "grad"
        ref = ("inner", "whole-stack" + ("-vjp" if how == "vjp" else ""), False)
        r = f"{t / med[ref]:.2f}x" if ref in med else "n/a"
        mem = f"{peaks[case] / 2**20:.0f} MiB" if peaks.get(case) is not None else "n/a"
        rm = f"{peaks[case] / peaks[ref]:.2f}x" if peaks.get(case) and peaks.get(ref) else "n/a"
        print(f"| {name.removesuffix('-vjp')} | {how} | {t:.3f} | {r} | {mem} | {rm} |")
    print(f"one no_grad forward of the adapted layers: {fwd:.3f} s")
    for how in ("", "-vjp"):
        a, b = ("inner", "by-layer" + how, True), ("inner", "whole-stack" + how, False)
        if a in med and b in med:
            extra = (med[a] - med[b]) / k
            print(f"recomputation cost ({'vjp' if how else 'grad'}): {extra:+.3f} s per inner step "
                  f"= {extra / fwd:.2f} forwards of the adapted layers (ideal 1.00)")


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
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
    k, frac = FocusConfig().inner_steps, len(layers) / args.layers
    print(f"model: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"{args.heads} heads / {args.kv_heads} KV, vocab {args.vocab}: {n_params / 1e6:.1f}M params, "
          f"{args.dtype} on {device} ({torch.get_num_threads()} threads"
          f"{', glibc keeps freed memory' if args.keep_freed_memory else ''})")
    print(f"batch: 1 x {args.seq} tokens, {int(batch['loss_mask'].sum())} supervised, runs (loss, length): {runs}")
    print(f"adapted layers {layers.start}..{layers.stop - 1}; k = {k}")
    if args.layer_memory:
        return layer_memory(model, args, device, dtype)

    cases = build_cases(args, model, opt, batch, generator)
    wall, cpu = time_cases(cases, args, device, model)
    peaks = {}
    if not args.no_memory:
        for case, (c, _, measure) in cases.items():
            model.gradient_checkpointing = c
            peaks[case] = measure()

    print()
    print(f"command: python -m bench.bench_method {' '.join(sys.argv[1:])}".rstrip())
    print()
    report_steps(cases, wall, cpu, peaks, args, frac, k)
    report_inner(cases, wall, peaks, args, k)
    print("s/step: wall clock; CPU s/step: CPU time of this process (all threads), less sensitive to other jobs")
    if peaks:
        how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler allocation records"
        print(f"peak mem: activations and temporaries above what is live at the start (weights, gradients, "
              f"AdamW state; for the inner loop also the bottom layers' output) ({how})")


if __name__ == "__main__":
    main()
