"""
Benchmark data.py: load + validate + render + encode + mask N agentic conversations of ~4K tokens
with the real Qwen2.5 tokenizer (../shared/qwen2.5-tokenizer, or --tokenizer DIR).

    python -m bench.bench_data                      # 3,000 conversations of ~4K tokens
    python -m bench.bench_data --n 300 --repeat 3

Target (issue): 3,000 x ~4K tokens in <= 30 s on a 2-core CPU. The conversations are synthetic but
shaped like real agentic data: system prompt, two tool schemas, a user request, several assistant
turns with tool calls (some with content, some with several calls), long JSON tool outputs and a
final answer. The JSONL is written to a temporary file first; only load_dataset is timed.
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import data

TOOLS = [
    {"type": "function", "function": {
        "name": "search_orders", "description": "Search the order database.",
        "parameters": {"type": "object", "properties": {
            "customer": {"type": "string", "description": "Customer name"},
            "status": {"type": "string", "enum": ["open", "shipped", "returned"]}},
            "required": ["customer"]}}},
    {"type": "function", "function": {
        "name": "get_invoice", "description": "Fetch an invoice by order id.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "integer"}},
                       "required": ["order_id"]}}},
]
NAMES = ["Ava Moss", "Liam Chen", "Zoë Brandt", "Noah Ilić", "Mia Okafor", "Ethan Sato", "Chloé Durand",
         "Omar Haddad", "Ines Duarte", "Yuki Tanaka", "Lena Vogel", "Ravi Patel"]
CITIES = ["Lima", "Oslo", "Cairo", "Perth", "Quito", "Tokyo", "Dakar", "Rome", "Kraków", "São Paulo"]
ITEMS = ["desk lamp", "USB-C cable", "espresso machine", "hiking boots", "notebook", "monitor arm",
         "rain jacket", "standing desk", "headphones", "water bottle"]


def records(rng, n):
    return [{"order_id": rng.randrange(10_000, 99_999), "customer": rng.choice(NAMES), "city": rng.choice(CITIES),
             "item": rng.choice(ITEMS), "qty": rng.randint(1, 9), "total": round(rng.uniform(5, 900), 2),
             "status": rng.choice(["open", "shipped", "returned"])} for _ in range(n)]


def conversation(rng, target_tokens):
    """One multi-turn tool-use conversation of roughly target_tokens Qwen2.5 tokens."""
    who = rng.choice(NAMES)
    msgs = [{"role": "system", "content": "You are a support agent for an online shop. Be concise."},
            {"role": "user", "content": f"Hi! Can you check the recent orders of {who} and tell me what is still open?"}]
    n_rounds = rng.randint(2, 4)
    per_round = max(5, (target_tokens - 600) // (n_rounds * 55))  # ~55 tokens per record on average
    for r in range(n_rounds):
        calls = [{"type": "function", "function": {"name": "search_orders",
                                                   "arguments": json.dumps({"customer": who, "status": s})}}
                 for s in rng.sample(["open", "shipped", "returned"], rng.randint(1, 2))]
        content = "Let me look that up." if rng.random() < 0.5 else None
        msgs.append({"role": "assistant", "content": content, "tool_calls": calls})
        for _ in calls:
            msgs.append({"role": "tool", "content": json.dumps(records(rng, per_round // len(calls)), ensure_ascii=False)})
    msgs.append({"role": "assistant", "content": f"{who} has {rng.randint(1, 5)} open orders; the largest is "
                                                 f"a {rng.choice(ITEMS)} shipping to {rng.choice(CITIES)}."})
    return {"messages": msgs, "tools": TOOLS}


def main():
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "qwen2.5-tokenizer"
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--n", type=int, default=3000, help="number of conversations")
    p.add_argument("--tokens", type=int, default=4000, help="approximate tokens per conversation")
    p.add_argument("--tokenizer", default=str(shared), help="directory with tokenizer.json")
    p.add_argument("--repeat", type=int, default=1, help="timed runs (the best is reported too)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    try:
        tok = data.load_tokenizer(args.tokenizer)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(args.n):
                f.write(json.dumps(conversation(rng, args.tokens), ensure_ascii=False) + "\n")
        print(f"generated {args.n} conversations, {path.stat().st_size / 1e6:.1f} MB; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before timing")
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            samples = data.load_dataset(path, tok, max_length=4096, log=print)
            times.append(time.perf_counter() - t0)
        ntok = sum(len(s.input_ids) for s in samples)
        for i, dt in enumerate(times):
            print(f"run {i}: {dt:.2f} s | {args.n / dt:.0f} conversations/s | {ntok / dt / 1e6:.2f} M tokens/s")
        print(f"best {min(times):.2f} s for {args.n} conversations, {ntok:,} tokens "
              f"(mean {ntok / args.n:.0f} per conversation); load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
