"""
Evaluate a checkpoint on the paper's benchmarks, offline once the data files are local.

    python eval.py babilong  --model DIR --data-dir eval_data/babilong [--download]   # Fig. 4, Table 6
    python eval.py ruler     --model DIR --haystack paul_graham_essays.txt            # Table 1
    python eval.py longbench --model DIR --data-dir eval_data/longbench [--download]  # Table 2
    python eval.py gpqa      --model DIR --data-dir eval_data/gpqa [--download]       # Table 2, tool use
    python eval.py demo      --model DIR                                              # the README's demo
    python eval.py analyze   --model DIR --data agentic.jsonl --index 0               # §4.4, Figs. 2, 3, 6
    python eval.py babilong  --model DIR --inner-adapt ...                            # Table 8

Prompts, generation budgets and metrics are those of the official harnesses (booydar/babilong,
NVIDIA/RULER, THUDM/LongBench; for GPQA, Open-AgentRL on verl), reproduced string for string,
quirks included; the few places where we cannot follow them exactly are marked "DEVIATION" below.

Prompts go through the checkpoint's chat template when the model was fine-tuned (a train.py
checkpoint, recognised by its focusft.json) or is an instruct model, and are fed raw to a base
model; --chat / --no-chat override that.

Every finished sample (for GPQA: every finished rollout) is appended to OUT/<task>/<length>.jsonl
at once, so an interrupted run started again with the same command skips what is done. At the end
of a sub-command, OUT/summary.json and OUT/summary.md hold every benchmark evaluated into OUT so
far, laid out like the paper's tables.

Reading order: this file is the command line (the benchmark protocol, the registry, the summary,
the flags, run/main). The work is in the evals/ package: evals/common.py (the engine: checkpoint,
prompt wrapping, generation; results files, resume, scores), one module per benchmark
(babilong, ruler, longbench, gpqa, demo; gpqa's code tool runs in evals/sandbox.py) and
evals/analyze.py (the attention analysis). docs/evaluation.md ("Adding a benchmark") shows how to add one.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Protocol

import data
import model as model_lib
from evals import analyze, babilong, demo, gpqa, longbench, ruler
from evals.common import Engine, EvalError, load_engine

# -----------------------------------------------------------------------------
# Benchmarks: what a benchmark module provides, and the registry


class Benchmark(Protocol):
    """What the command line needs from a benchmark module (evals/<name>.py): its sub-command's help
    line and flags, a check of its flags and data files before a model loads, its evaluation into
    OUT, the settings it records, and its table of summary.md."""
    HELP: str

    def add_flags(self, sp: argparse.ArgumentParser) -> None:
        """Its own flags (after common_flags)."""

    def check(self, args: argparse.Namespace) -> None:
        """Raise EvalError on a bad flag or a missing data file (may download with --download)."""

    def evaluate(self, engine: Engine, out: Path, args: argparse.Namespace, log=print) -> dict:
        """Evaluate into OUT; -> {task: {length: {"score", "n", ...}}}."""

    def meta(self, args: argparse.Namespace) -> dict:
        """Settings recorded in summary.json beside the scores."""

    def table(self, name: str, entry: dict) -> list[str]:
        """Markdown lines of summary.md from summary.json's entry {"scores", "meta"}."""


BENCHMARKS: dict[str, Benchmark] = {  # sub-command -> module; the order of --help and summary.md
    "babilong": babilong,
    "ruler": ruler,
    "longbench": longbench,
    "gpqa": gpqa,
    "demo": demo,
}


# -----------------------------------------------------------------------------
# Summary: OUT/summary.json and OUT/summary.md over every benchmark evaluated into OUT


def update_summary(out_dir: Path, bench: str, model_name: str, scores: dict, meta: dict) -> dict:
    """Merge {task: {length: {"score", "n", ...}}} into OUT/summary.json and rewrite OUT/summary.md."""
    out_dir = Path(out_dir)
    f = out_dir / "summary.json"
    summary = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    summary["model"] = model_name
    entry = summary.setdefault(bench, {"scores": {}, "meta": {}})
    for task, by_len in scores.items():
        entry["scores"].setdefault(task, {}).update(by_len)
    entry["meta"].update(meta)
    out_dir.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out_dir / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    return summary


def summary_markdown(summary: dict) -> str:
    """The tables of the paper, for one checkpoint (each benchmark draws its own: BENCHMARKS)."""
    name = summary.get("model", "model")
    out = [f"# Evaluation of {name}\n"]
    for bench, spec in BENCHMARKS.items():
        if bench in summary:
            out += spec.table(name, summary[bench]) + [""]
    return "\n".join(out)


# -----------------------------------------------------------------------------
# Command line


def common_flags(sp):
    sp.add_argument("--model", required=True, help="checkpoint directory (HF layout) or hub id")
    sp.add_argument("--out", default=None, help="results directory (default: eval_results/<model name>)")
    sp.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    sp.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on cuda, fp32 on cpu)")
    sp.add_argument("--batch-size", type=int, default=1, help="prompts (gpqa: rollouts) generated together")
    sp.add_argument("--prefill-chunk", type=int, default=1024, help="prompt tokens per prefill step")
    sp.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                    help="wrap prompts in the chat template (default: on for a train.py checkpoint, which has "
                         "focusft.json, and for an instruct model; off for a base model); --no-chat feeds raw prompts")
    sp.add_argument("--inner-adapt", action="store_true",
                    help="Table 8: one inner fast-weight step on each prompt before generating "
                         "(settings from focusft.json in the checkpoint, else the paper's)")
    sp.add_argument("--seed", type=int, default=42,
                    help="RULER sample generation, --inner-adapt init, gpqa choice order and sampling")
    sp.add_argument("--samples", type=int, default=None,
                    help="samples (gpqa: problems) per task and length (default: all; ruler: 500)")




def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on the paper's benchmarks.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, bench in BENCHMARKS.items():
        sp = sub.add_parser(name, help=bench.HELP)
        common_flags(sp)
        bench.add_flags(sp)
    analyze.add_flags(sub.add_parser("analyze", help=analyze.HELP))
    return p


def run(args, log=print) -> dict:
    """One benchmark sub-command: check flags and data (a bad path fails before a 7B model loads),
    load the engine, evaluate into OUT, merge the scores into OUT/summary.*."""
    if args.batch_size < 1 or (args.samples is not None and args.samples < 1):
        raise EvalError("--batch-size and --samples must be positive")
    bench = BENCHMARKS[args.cmd]
    bench.check(args)
    engine = load_engine(args.model, args.device, args.dtype, args.chat, args.batch_size, args.prefill_chunk,
                         args.inner_adapt, args.seed, log)
    name = Path(str(args.model).rstrip("/")).name
    out = Path(args.out or Path("eval_results") / name)
    check_run(out, {"model": str(getattr(engine.model, "source_dir", None) or args.model),
                    "inner_adapt": args.inner_adapt})
    scores = bench.evaluate(engine, out, args, log)
    meta = {"chat": engine.chat, "inner_adapt": args.inner_adapt, **bench.meta(args)}
    summary = update_summary(out, args.cmd, name, scores, meta)
    log("\n" + summary_markdown({"model": name, args.cmd: summary[args.cmd]}))
    log(f"results in {out}/ (summary.json, summary.md)")
    return summary


def check_run(out: Path, run_info: dict):
    """OUT/run.json pins the checkpoint and --inner-adapt of an output directory: resuming must
    not mix predictions of two models (prompt hashes catch other prompts, not other weights)."""
    f = out / "run.json"
    if f.is_file():
        prev = json.loads(f.read_text(encoding="utf-8"))
        for k, v in run_info.items():
            if k in prev and prev[k] != v:
                raise EvalError(f"{out} holds results for {k}={prev[k]!r}, not {v!r}; use another --out")
    out.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(run_info, indent=2) + "\n", encoding="utf-8")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        analyze.run_analyze(args) if args.cmd == "analyze" else run(args)
    except (EvalError, data.DataError, model_lib.ModelError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
