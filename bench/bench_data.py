"""
Benchmark data.py: read + validate + render + encode + mask N agentic conversations of ~4K tokens
with the real Qwen2.5 tokenizer (a local directory, or Qwen/Qwen2.5-7B-Instruct's from the hub), from JSONL and
from parquet (the same conversations), measured side by side in one run.

    python -m bench.bench_data                      # 3,000 conversations of ~4K tokens
    python -m bench.bench_data --n 300 --repeat 3

It answers two questions: how long 3,000 x ~4K tokens take on a 2-core CPU, and whether parquet
costs more than JSONL. The
conversations are synthetic but shaped like real agentic data: system prompt, two tool schemas, a
user request, several assistant turns with tool calls (some with content, some with several calls),
long JSON tool outputs and a final answer. Both files are written to a temporary directory first
(parquet with pyarrow, which this benchmark needs); only data.py is timed. The two formats
alternate within each repeat and medians are reported, so drifting load on a shared machine hits
both alike. Two phases are timed: reading alone (read_conversations: parse and validate) and the
whole of load_dataset.
"""

import argparse
import json
import os
import random
import statistics
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


def write_files(convs, directory: Path):
    """The same conversations as JSONL and as parquet. In parquet the messages are a list-of-struct
    column; the tools are a JSON string column, as on many hub datasets: as structs the two tools'
    `properties` would be merged into one type and read back with each other's keys as nulls."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl, parquet = directory / "bench.jsonl", directory / "bench.parquet"
    with open(jsonl, "w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    rows = [{"messages": c["messages"], "tools": json.dumps(c["tools"], ensure_ascii=False)} for c in convs]
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    return {"jsonl": jsonl, "parquet": parquet}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def tokenizer_dir(name: str) -> Path:
    """A local directory as is, else a hub id whose tokenizer files are fetched (or read from the cache)."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, "tokenizer.json")).parent
    except Exception as e:  # offline, unknown id: all mean "not available here"
        sys.exit(f"error: no tokenizer directory {name!r}, and fetching it from the hub failed "
                 f"({type(e).__name__}); pass --tokenizer DIR")


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--n", type=int, default=3000, help="number of conversations")
    p.add_argument("--tokens", type=int, default=4000, help="approximate tokens per conversation")
    p.add_argument("--tokenizer", default="Qwen/Qwen2.5-7B-Instruct",
                   help="directory with tokenizer.json, or a hub id (its tokenizer files are fetched and cached)")
    p.add_argument("--repeat", type=int, default=3, help="timed load_dataset runs per format (medians reported)")
    p.add_argument("--read-repeat", type=int, default=5, help="timed read_conversations runs per format")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    try:
        tok = data.load_tokenizer(tokenizer_dir(args.tokenizer))
        import pyarrow  # noqa: F401  (the benchmark writes parquet)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    except ImportError:
        sys.exit("error: this benchmark writes parquet with pyarrow: pip install pyarrow")
    rng = random.Random(args.seed)
    convs = [conversation(rng, args.tokens) for _ in range(args.n)]
    quiet = lambda line: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        files = write_files(convs, Path(tmp))
        sizes = ", ".join(f"{k} {v.stat().st_size / 1e6:.1f} MB" for k, v in files.items())
        print(f"generated {args.n} conversations ({sizes}); {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.2f} before timing")
        read = {k: [] for k in files}
        for _ in range(args.read_repeat):
            for k, path in files.items():
                dt, got = timed(lambda: data.read_conversations(path, log=quiet))
                read[k].append(dt)
                assert len(got) == args.n
        load, samples = {k: [] for k in files}, {}
        for _ in range(args.repeat):
            for k, path in files.items():
                dt, samples[k] = timed(lambda: data.load_dataset(path, tok, max_length=4096, log=quiet))
                load[k].append(dt)
    assert samples["jsonl"] == samples["parquet"], "parquet and JSONL must give the same samples"
    ntok = sum(len(s.input_ids) for s in samples["jsonl"])
    print(f"{ntok:,} tokens (mean {ntok / args.n:.0f} per conversation); identical samples from both formats")
    for phase, times in (("read_conversations", read), ("load_dataset", load)):
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in times.items():
            print(f"{phase:18s} {k:8s} median {med[k]:6.2f} s  (runs: {', '.join(f'{t:.2f}' for t in v)})"
                  + (f" | {args.n / med[k]:.0f} conversations/s, {ntok / med[k] / 1e6:.2f} M tokens/s"
                     if phase == "load_dataset" else ""))
        print(f"{phase:18s} parquet / jsonl = {med['parquet'] / med['jsonl']:.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
