"""Benchmark model.py and generate.py against transformers' Qwen2ForCausalLM (sdpa) on one CPU-sized
config.

Measures, with the SAME weights in both models:
  1. forward + backward time of a next-token loss over every position (logits from each model's own
     forward, the same cross-entropy outside), interleaved repeats, median, ratio ours / HF;
  2. greedy generation tokens/s: generate.generate vs hf.generate(do_sample=False) with eos disabled
     and min_new_tokens = max_new_tokens, so both produce exactly the same number of tokens; then the
     same with sampling (temperature 1.0, top-p 0.6, the GPQA setting; ours with one seeded
     generator per prompt), so the cost of sampling shows against greedy decoding on both sides;
  3. a long-prompt prefill of ours on a tiny model: wall time and the largest attention score block
     (queries x keys per head) any SDPA call saw, which chunked prefill keeps at prefill_chunk x T.

Not a test: numbers depend on the machine and on whatever else runs on it. transformers is needed
here (it is the reference) but never by model.py.

    python -m bench.bench_model                      # defaults: hidden 512, 8 layers, vocab 32000, seq 1024
    python -m bench.bench_model --layers 2 --seq 256 --gen-new 16 --long-prompt 4096   # quick look
"""

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import generate as G
import model as M


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per model (interleaved)")
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--gen-prompt", type=int, default=256)
    p.add_argument("--gen-new", type=int, default=64)
    p.add_argument("--gen-repeats", type=int, default=5)
    p.add_argument("--long-prompt", type=int, default=16384, help="prefill length for the chunking check (0: skip)")
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int) -> dict:
    """Seconds per call of each function: the functions take turns (one untimed warm-up each, then
    the order flips every round), so background load hits both sides alike. Returns name -> list."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(timed(fns[name]))
    return times


def summary(ours: list, hf: list) -> tuple[float, float, float, float]:
    """Median of each side, and two ratios ours / HF: the median of the per-round ratios (both sides
    of a round ran back to back under the same load: the most robust figure on a shared machine)
    and the ratio of the best times."""
    paired = statistics.median(o / h for o, h in zip(ours, hf))
    return statistics.median(ours), statistics.median(hf), paired, min(ours) / min(hf)


def build_models(args, transformers, dtype):
    """The same random weights in both models."""
    hf_cfg = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, args.gen_prompt + args.gen_new), tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    hf = transformers.Qwen2ForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    ours = M.Qwen2(M.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=hf_cfg.max_position_embeddings, rope_theta=1_000_000.0,
        tie_word_embeddings=False, torch_dtype=args.dtype)).to(dtype)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def bench_fwd_bwd(args, hf, ours, g) -> tuple[dict, float]:
    """1. forward + backward: times per repeat, and max |logit diff| (same function before timing it)."""
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    hf.train()
    ours.train()

    def loss_of(logits):
        return F.cross_entropy(logits.float().reshape(-1, args.vocab), targets.reshape(-1))

    def step_hf():
        hf.zero_grad(set_to_none=True)
        loss_of(hf(ids).logits).backward()

    def step_ours():
        ours.zero_grad(set_to_none=True)
        loss_of(ours(ids)).backward()

    with torch.no_grad():
        diff = (hf(ids[:, :128]).logits - ours(ids[:, :128])).abs().max().item()
    train = interleaved({"hf": step_hf, "ours": step_ours}, args.repeats)
    hf.eval()
    ours.eval()
    return train, diff


def bench_generation(args, hf, ours, g) -> tuple[dict, bool]:
    """2. greedy and sampled generation, eos disabled on both sides: times, and same greedy tokens?"""
    prompts = torch.randint(0, args.vocab, (args.gen_batch, args.gen_prompt), generator=g)
    out = {}

    def gen_hf():
        with torch.no_grad():
            o = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                            max_new_tokens=args.gen_new, min_new_tokens=args.gen_new,
                            eos_token_id=None, pad_token_id=0)
        out["hf"] = o[:, args.gen_prompt:].tolist()

    def gen_ours():
        out["ours"] = G.generate(ours, prompts.tolist(), args.gen_new, stop_ids=[])

    def sample_hf():
        with torch.no_grad():
            hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0, top_p=0.6,
                        top_k=0, max_new_tokens=args.gen_new, min_new_tokens=args.gen_new, eos_token_id=None,
                        pad_token_id=0)

    def sample_ours():
        gens = [torch.Generator().manual_seed(i) for i in range(args.gen_batch)]
        G.generate(ours, prompts.tolist(), args.gen_new, stop_ids=[], temperature=1.0, top_p=0.6, generator=gens)

    gen = interleaved({"hf": gen_hf, "ours": gen_ours, "hf_sample": sample_hf, "ours_sample": sample_ours},
                      args.gen_repeats)
    assert all(len(r) == args.gen_new for r in out["hf"] + out["ours"]), "unequal token counts"
    return gen, out["hf"] == out["ours"]


def bench_long_prefill(args, g) -> dict | None:
    """3. long prefill of a tiny model: how big does any attention block get?"""
    if not args.long_prompt:
        return None
    tiny = M.Qwen2(M.Qwen2Config(**M.TINY)).eval()
    prompt = torch.randint(0, tiny.config.vocab_size, (args.long_prompt,), generator=g).tolist()
    seen = []
    sdpa = M.F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *a, **kw):
        seen.append((q.shape[-2], k.shape[-2]))
        return sdpa(q, k, v, *a, **kw)

    M.F.scaled_dot_product_attention = recording_sdpa
    try:
        secs = timed(lambda: G.generate(tiny, [prompt], 1, stop_ids=[], prefill_chunk=args.prefill_chunk))
    finally:
        M.F.scaled_dot_product_attention = sdpa
    q, k = max(seen, key=lambda s: s[0] * s[1])
    return dict(secs=secs, q=q, k=k, calls=len(seen))


def report(args, transformers, n_params, diff, train, gen, same_tokens, long):
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"{args.dtype}")
    print(f"config: hidden {args.hidden}, intermediate {args.intermediate}, layers {args.layers}, heads "
          f"{args.heads}/{args.kv_heads} kv, vocab {args.vocab} ({n_params / 1e6:.1f}M params); "
          f"max |logit diff| ours vs HF {diff:.1e}")
    print()
    n_tok = args.gen_batch * args.gen_new
    to, th, r_time, r_best = summary(train["ours"], train["hf"])
    go, gh, r_gen, r_gen_best = summary(gen["ours"], gen["hf"])
    print("| measurement | ours | transformers (sdpa) | ours / HF, paired median (best-of) |")
    print("|---|---|---|---|")
    print(f"| fwd+bwd, batch {args.batch} x seq {args.seq}, median of {args.repeats} | {to * 1e3:.0f} ms | "
          f"{th * 1e3:.0f} ms | {r_time:.2f}x time ({r_best:.2f}x) |")
    print(f"| greedy generate, {args.gen_batch} x {args.gen_prompt} prompt + {args.gen_new} new, median of "
          f"{args.gen_repeats} | {n_tok / go:.0f} tok/s | {n_tok / gh:.0f} tok/s | "
          f"{1 / r_gen:.2f}x tok/s ({1 / r_gen_best:.2f}x) |")
    so, sh, r_sample, r_sample_best = summary(gen["ours_sample"], gen["hf_sample"])
    print(f"| sampled generate (temperature 1, top-p 0.6), same shape | {n_tok / so:.0f} tok/s | {n_tok / sh:.0f} tok/s "
          f"| {1 / r_sample:.2f}x tok/s ({1 / r_sample_best:.2f}x) |")
    print(f"sampling / greedy time, paired median: ours {statistics.median(s / g for s, g in zip(gen['ours_sample'], gen['ours'])):.2f}x, "
          f"HF {statistics.median(s / g for s, g in zip(gen['hf_sample'], gen['hf'])):.2f}x")
    print(f"generated tokens identical: {same_tokens}")
    if long:
        T = args.long_prompt
        print(f"prefill {T} tokens, tiny model (hidden {M.TINY['hidden_size']}, {M.TINY['num_hidden_layers']} layers), "
              f"prefill_chunk {args.prefill_chunk}: {long['secs']:.1f} s, {long['calls']} SDPA calls; largest "
              f"score block {long['q']} x {long['k']} per head ({long['q'] * long['k'] / (T * T):.3f} of {T} x {T})")
    print()
    print("command: python " + " ".join([sys.argv[0]] + sys.argv[1:]))


def main():
    args = parse_args()
    try:
        import transformers
    except ImportError:
        print("error: this benchmark compares against transformers; pip install transformers", file=sys.stderr)
        sys.exit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    hf, ours = build_models(args, transformers, getattr(torch, args.dtype))
    n_params = sum(p.numel() for p in ours.parameters())
    g = torch.Generator().manual_seed(args.seed)
    train, diff = bench_fwd_bwd(args, hf, ours, g)
    gen, same_tokens = bench_generation(args, hf, ours, g)
    long = bench_long_prefill(args, g)
    report(args, transformers, n_params, diff, train, gen, same_tokens, long)



if __name__ == "__main__":
    main()
