"""The README's demo: accuracy on the held-out conversations of the bundled agentic haystack task
(examples/). The smallest benchmark; docs/evaluation.md ("Adding a benchmark") walks through it."""

import json
from pathlib import Path

import data
from evals.common import cell, Engine, EvalError, Job, percent, REPO, run_job

# -----------------------------------------------------------------------------
# Demo: held-out conversations of the bundled agentic haystack task


def eval_demo(engine: Engine, out_dir, data_path, max_new_tokens=64, samples=None, log=print) -> dict:
    """Each line: {"messages": [...], "tools": [...] (optional), "answer": str}. The model reads the
    conversation up to its final assistant turn and scores 1 if `answer` is in what it writes."""
    path = Path(data_path)
    if not path.is_file():
        raise EvalError(f"{path} not found (the held-out demo conversations; see examples/)")
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{where}: invalid JSON ({e.msg})") from None
        messages, tools = data.validate_conversation(obj, where)
        if not isinstance(obj.get("answer"), str) or not obj["answer"]:
            raise EvalError(f"{where}: missing the \"answer\" string")
        if messages[-1]["role"] == "assistant":  # the reference reply: the model writes its own
            messages = messages[:-1]
        if not messages:
            raise EvalError(f"{where}: nothing left to prompt with once the final assistant turn is removed")
        text, _ = data.render_chat(messages, tools=tools, add_generation_prompt=True,
                                   default_system=engine.tok.default_system)
        items.append({"index": len(items), "prompt": text, "refs": {"answer": obj["answer"]}})
    items = items[:samples]
    if not items:
        raise EvalError(f"{path}: no conversations")
    job = Job("demo", "heldout", items, max_new_tokens, lambda pred, refs: float(refs["answer"] in pred), percent)
    recs = run_job(engine, out_dir, job, log)
    score = percent([r["score"] for r in recs])
    log(f"demo: accuracy {score:.1f}% ({sum(r['score'] for r in recs):.0f}/{len(recs)} held-out conversations)")
    return {"demo": {"heldout": {"score": score, "n": len(recs)}}}


def table(name: str, entry: dict) -> list[str]:
    out = []
    for task, by_len in entry["scores"].items():
        for ln, v in by_len.items():
            out += ["## Demo (held-out agentic conversations)\n",
                    f"accuracy {cell(v['score'])}% on {v['n']} conversations ({task}/{ln})"]
    return out


# -----------------------------------------------------------------------------
# Entry: what eval.py's registry reads (its Benchmark protocol)

HELP = "accuracy on the held-out conversations of the bundled demo task"


def add_flags(sp):
    sp.add_argument("--data", default=str(REPO / "examples" / "agentic-heldout.jsonl"))
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.set_defaults(batch_size=32)  # 200 short prompts: batched, the demo's evaluation takes seconds, not minutes


def check(args):
    if not Path(args.data).is_file():
        raise EvalError(f"{args.data} not found (the held-out demo conversations; see examples/)")


def evaluate(engine: Engine, out: Path, args, log=print) -> dict:
    return eval_demo(engine, out, args.data, args.max_new_tokens, args.samples, log)


def meta(args) -> dict:
    return {}
