"""
The paper's Table 3 ablation at CPU scale: the four methods of the 2 x 2 design (bidirectional
context mask x inner loop) trained on the demo task, several seeds, two difficulty levels.

    python -m bench.ablation                                 # 4 methods x 3 seeds x 2 difficulties, 2 jobs
    python -m bench.ablation --steps 0                       # the demo preset's full 800 steps (~2x longer)
    python -m bench.ablation --seeds 1 2 --records 4 --steps 50 --out runs/ablation-small
    python -m bench.ablation --dry-run                       # print the plan and exit

                     causal mask         bidirectional context
    no inner loop    "sft"               "sft-bidir"
    inner loop       "causal-bilevel"    "focusft"

Difficulty is the number of records per tool output (`--records`, examples/make_agentic.py):
with more records the one that answers the question is a smaller share of the context, the
attention dilution the method is about. Each difficulty has one data set, written once and used
by every run; every run trains the same number of steps on it with one torch thread.

A run is what a user runs, through the command-line entry points called in-process:

    train.py --preset demo --data D/agentic.jsonl --method M --seed S --out RUN/model [--max-steps N]
    eval.py demo --model RUN/model --data D/agentic-heldout.jsonl --out RUN/eval
    eval.py analyze --model RUN/model --data D/agentic-heldout.jsonl --index 0 .. K-1 --out RUN/eval

and records, in RUN/result.json: held-out accuracy, training wall time and the median step time
(the inner loop's cost), and, from `analyze`, the attention of the response tokens under the
CAUSAL mask (the one inference uses, whatever the training mask): the sink mass (share on
positions 0-4), the tool share (on the tool outputs) and the context engagement (system, user
and tool turns), each averaged over heads, layers and the K conversations.

Layout of --out:
    settings.json                      what every run shares (a later invocation must match it)
    data/records-R/                    the data set of one difficulty
    runs/records-R-METHOD-seed-S/      model/, eval/, log.txt (the run's output), result.json
    results.md, results.json, results.png (the plot needs matplotlib; skipped without it)

Resumable: a run with a result.json is done and skipped; any other run directory is what a crash
left behind and is wiped and run again. `--jobs N` runs N at a time, each in a worker process.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import runpy
import shutil
import statistics
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import data
import focusft
import train
from examples import make_agentic

# eval.py is a script (a module named eval would hide the builtin): run it once for its main()
EVAL_MAIN = runpy.run_path(str(Path(__file__).resolve().parents[1] / "eval.py"))["main"]


@dataclass
class AblationConfig:
    methods: list[str] = field(default_factory=lambda: list(focusft.METHODS))
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    records: list[int] = field(default_factory=lambda: [4, 8])  # records per tool output: few, many (the demo's)
    # optimizer steps per run (0: the demo preset's 800). 400, so that the 24 runs take ~45 minutes
    # on 2 cores with --jobs 2; the schedule (warm-up, cosine) follows the cap.
    steps: int = 400
    n_train: int = 0  # training conversations per difficulty; 0: make_agentic's default
    n_heldout: int = 200  # held-out conversations (all are scored)
    data_seed: int = 1234
    analyze_samples: int = 16  # held-out conversations read by `eval.py analyze`
    max_new_tokens: int = 64  # eval.py demo's default
    out: str = "runs/ablation"
    jobs: int = 2

    def shared(self) -> dict:
        """The settings every run shares: results of runs made with others must not be mixed."""
        return {k: getattr(self, k) for k in ("steps", "n_train", "n_heldout", "data_seed", "analyze_samples",
                                              "max_new_tokens")} | {
            "demo_preset": train.PRESETS["demo"],  # the training recipe, and the data generator's code:
            "make_agentic_sha256": hashlib.sha256(Path(make_agentic.__file__).read_bytes()).hexdigest()}


class AblationError(Exception):
    """A user-facing problem: printed without a traceback."""


@dataclass(frozen=True)
class Run:
    method: str
    records: int
    seed: int

    @property
    def name(self) -> str:
        return f"records-{self.records}-{self.method}-seed-{self.seed}"


def plan(cfg: AblationConfig) -> list[Run]:
    """Every (difficulty, seed, method), methods innermost: the four methods of one seed run close
    together in time, so that a slow spell of the shared machine does not fall on one method."""
    return [Run(m, r, s) for r in cfg.records for s in cfg.seeds for m in cfg.methods]


def data_dir(cfg: AblationConfig, records: int) -> Path:
    return Path(cfg.out) / "data" / f"records-{records}"


def run_dir(cfg: AblationConfig, run: Run) -> Path:
    return Path(cfg.out) / "runs" / run.name


def read_result(cfg: AblationConfig, run: Run) -> dict | None:
    f = run_dir(cfg, run) / "result.json"
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None


def write_json(path: Path, obj):
    """Atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Phases of the experiment: settings, data, runs, report


def check_settings(cfg: AblationConfig):
    """OUT/settings.json pins what the runs share; a later invocation may add seeds, methods or
    difficulties, but not change the budget or the data under finished runs."""
    out = Path(cfg.out)
    f = out / "settings.json"
    now = json.loads(json.dumps(cfg.shared()))  # as JSON would read it back (tuples -> lists)
    if f.is_file():
        before = json.loads(f.read_text(encoding="utf-8"))
        changed = [k for k in now if before.get(k) != now[k]]
        if changed:
            raise AblationError(f"{out} holds runs made with other settings ("
                                + ", ".join(f"{k}: {before.get(k)!r}, now {now[k]!r}" for k in changed)
                                + "); use another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(f, now)


def call_main(main, argv: list[str]):
    """Run a command-line main() that reads sys.argv, with `argv` as its arguments."""
    saved = sys.argv
    sys.argv = [main.__module__] + argv
    try:
        main()
    finally:
        sys.argv = saved


def prepare_data(cfg: AblationConfig, records: int, log=print) -> Path:
    """`python -m examples.make_agentic --records R ...` once per difficulty (a `done` file marks
    a complete data set; anything else is written again)."""
    d = data_dir(cfg, records)
    if (d / "done").is_file():
        return d
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    argv = ["--seed", str(cfg.data_seed), "--n-heldout", str(cfg.n_heldout), "--out-dir", str(d),
            "--records", str(records)] + (["--n-train", str(cfg.n_train)] if cfg.n_train else [])
    log(f"data: python -m examples.make_agentic {' '.join(argv)}")
    log_file = d / "make_agentic.log"
    with open(log_file, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            call_main(make_agentic.main, argv)
            code = 0
        except SystemExit as e:  # argparse refused an argument
            code = e.code
    if code:
        raise AblationError(f"examples.make_agentic failed: {log_file.read_text().strip().splitlines()[-1]}")
    (d / "done").touch()
    return d


def run_commands(cfg: AblationConfig, run: Run) -> dict[str, list[str]]:
    """The argument lists of the run's three commands (train.py, eval.py demo, eval.py analyze)."""
    d, out = data_dir(cfg, run.records), run_dir(cfg, run)
    model, heldout = str(out / "model"), str(d / "agentic-heldout.jsonl")
    # an epoch has at least one step, so with --epochs = --max-steps the cap decides the run's length
    steps = ["--max-steps", str(cfg.steps), "--epochs", str(cfg.steps)] if cfg.steps else []
    return {
        "train": ["--preset", "demo", "--data", str(d / "agentic.jsonl"), "--method", run.method,
                  "--seed", str(run.seed), "--out", model, "--save-every", "0"] + steps,
        "demo": ["demo", "--model", model, "--data", heldout, "--out", str(out / "eval"),
                 "--max-new-tokens", str(cfg.max_new_tokens)],
        "analyze": ["analyze", "--model", model, "--data", heldout, "--out", str(out / "eval"),
                    "--index", *map(str, range(min(cfg.analyze_samples, cfg.n_heldout)))],
    }


def execute(cfg: AblationConfig, run: Run) -> dict:
    """One run from scratch: train, score, analyze; returns (and writes) its result.json."""
    out = run_dir(cfg, run)
    shutil.rmtree(out, ignore_errors=True)  # what a crashed attempt left behind
    out.mkdir(parents=True)
    cmd = run_commands(cfg, run)
    with open(out / "log.txt", "w", buffering=1) as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print("train.py " + " ".join(cmd["train"]), flush=True)
        t0 = time.time()
        train.main(train.parse_args(cmd["train"]))
        train_s = time.time() - t0
        print("eval.py " + " ".join(cmd["demo"]), flush=True)
        EVAL_MAIN(cmd["demo"])
        print("eval.py " + " ".join(cmd["analyze"]), flush=True)
        EVAL_MAIN(cmd["analyze"])
    result = {"method": run.method, "records": run.records, "seed": run.seed, "train_s": train_s,
              **read_metrics(out), "total_s": time.time() - t0}
    write_json(out / "result.json", result)
    return result


def read_metrics(out: Path) -> dict:
    """What the three commands wrote: the training log, eval.py's summary and analysis."""
    log = [json.loads(line) for line in (out / "model" / "log.jsonl").read_text().splitlines()]
    step_times = [r["s_per_step"] for r in log[1:]] or [r["s_per_step"] for r in log]  # step 1 warms up
    demo = json.loads((out / "eval" / "summary.json").read_text())["demo"]["scores"]["demo"]["heldout"]
    causal = json.loads((out / "eval" / "analysis" / "analysis.json").read_text())["causal"]["mean_over_layers"]
    return {"steps": log[-1]["step"], "s_per_step": statistics.median(step_times), "final_loss": log[-1]["loss"],
            "accuracy": demo["score"], "heldout_n": demo["n"], "sink": 100 * causal["sink"],
            "tool": 100 * causal["tool"], "context": 100 * causal["context"]}


def attempt(cfg: AblationConfig, run: Run) -> tuple[Run, dict | None, str, float]:
    """execute() that reports a failure instead of raising: (run, result or None, error, seconds).
    SystemExit too: eval.py's main exits on a user error."""
    t0 = time.time()
    try:
        return run, execute(cfg, run), "", time.time() - t0
    except (Exception, SystemExit) as e:
        log_file = run_dir(cfg, run) / "log.txt"
        error = f"{type(e).__name__}: {e}".splitlines()[0]
        with contextlib.suppress(OSError):
            if isinstance(e, SystemExit):  # eval.py printed the reason as its last line
                error = log_file.read_text().strip().splitlines()[-1]
            with open(log_file, "a") as f:
                traceback.print_exc(file=f)
        return run, None, error, time.time() - t0


def one_thread():
    """Each run uses one torch thread: --jobs runs share the cores without OpenMP teams waiting on
    descheduled threads (see bench/bench_train.py), and step times compare across runs."""
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # once per process, before any inter-op work
        torch.set_num_interop_threads(1)


# -----------------------------------------------------------------------------
# Scheduling and progress


class Progress:
    """One line per started and finished run, with an ETA from the durations seen so far (per
    method and difficulty when known: the inner loop makes a run several times longer)."""

    def __init__(self, todo: list[Run], jobs: int, skipped: int, log=print):
        self.todo, self.jobs, self.log = list(todo), jobs, log
        self.total, self.done, self.skipped = len(todo) + skipped, skipped, skipped
        self.seconds: dict[tuple, list[float]] = {}
        self.running: dict[Run, float] = {}
        self.failed: list[tuple[Run, str]] = []
        self.t0 = time.time()

    def estimate(self, run: Run) -> float | None:
        """Seconds: the mean of the same method and difficulty; else method x difficulty factors."""
        same = self.seconds.get((run.method, run.records))
        if same:
            return statistics.fmean(same)
        seen = [s for v in self.seconds.values() for s in v]
        if not seen:
            return None
        by_method = [s for (m, _), v in self.seconds.items() if m == run.method for s in v]
        by_records = [s for (_, r), v in self.seconds.items() if r == run.records for s in v]
        mean = statistics.fmean(seen)
        return (statistics.fmean(by_method) if by_method else mean) * \
            (statistics.fmean(by_records) if by_records else mean) / mean

    def eta(self) -> str:
        now, left = time.time(), 0.0
        for run in self.todo:
            est = self.estimate(run)
            if est is None:
                return "?"
            left += est if run not in self.running else max(0.0, est - (now - self.running[run]))
        return data.fmt_seconds(left / self.jobs)

    def start(self, run: Run):
        self.running[run] = time.time()
        self.log(f"[{self.done}/{self.total}] start {run.name}")

    def finish(self, run: Run, result: dict | None, error: str, seconds: float):
        del self.running[run]
        self.todo.remove(run)
        self.done += 1
        if result is None:
            self.failed.append((run, error))
            what = f"FAILED after {data.fmt_seconds(seconds)}: {error} (see its log.txt)"
        else:
            self.seconds.setdefault((run.method, run.records), []).append(seconds)
            what = (f"accuracy {result['accuracy']:.1f}% | {result['s_per_step']:.2f} s/step | "
                    f"run {data.fmt_seconds(seconds)}")
        self.log(f"[{self.done}/{self.total}] {run.name}: {what} | elapsed {data.fmt_seconds(time.time() - self.t0)} "
                 f"| ETA {self.eta()}")


def run_all(cfg: AblationConfig, todo: list[Run], progress: Progress):
    """In this process with --jobs 1, else in --jobs worker processes (spawned: a forked child
    would inherit torch's thread pools), at most --jobs runs at a time."""
    if cfg.jobs == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as one_thread(), undone after (the caller may be a test session)
        try:
            for run in todo:
                progress.start(run)
                progress.finish(*attempt(cfg, run))
        finally:
            torch.set_num_threads(threads)
        return
    queue = list(todo)
    with ProcessPoolExecutor(cfg.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=one_thread) as pool:
        pending = set()
        while queue or pending:
            while queue and len(pending) < cfg.jobs:
                progress.start(queue[0])
                pending.add(pool.submit(attempt, cfg, queue.pop(0)))
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                try:
                    progress.finish(*fut.result())
                except BrokenProcessPool:
                    raise AblationError("a worker process died (out of memory?) during "
                                        + ", ".join(r.name for r in progress.running)
                                        + "; finished runs are kept: run the same command again to continue") from None


# -----------------------------------------------------------------------------
# Aggregation: mean and sample standard deviation over seeds, per (method, difficulty)

METRICS = {  # key in result.json -> column title, decimals
    "accuracy": ("held-out accuracy (%)", 1),
    "train_s": ("training (s)", 0),
    "s_per_step": ("s/step", 2),
    "step_vs_sft": ("step time / sft's", 2),  # per seed: both ran at about the same time (see plan)
    "sink": ("sink mass (%)", 2),
    "tool": ("tool share (%)", 1),
    "context": ("context engagement (%)", 1),
}


def with_step_ratio(results: list[dict]) -> list[dict]:
    """Each result plus step_vs_sft: its step time over that of the sft run of the same difficulty
    and seed. NOTE: on shared cores a step's time drifts several-fold over an hour; the four
    methods of one seed run side by side (see plan), so this ratio is what shows the inner loop's
    cost, not s/step across seeds."""
    sft = {(x["records"], x["seed"]): x["s_per_step"] for x in results if x["method"] == "sft"}
    return [x | ({"step_vs_sft": x["s_per_step"] / sft[x["records"], x["seed"]]}
                 if (x["records"], x["seed"]) in sft else {}) for x in results]


def summarize(results: list[dict], methods: list[str], records: list[int]) -> list[dict]:
    """One row per (difficulty, method) that has results, in plan order; a metric none of its
    runs has (step_vs_sft without sft runs) is (None, None)."""
    results, rows = with_step_ratio(results), []
    for r in records:
        for m in methods:
            mine = [x for x in results if x["method"] == m and x["records"] == r]
            if mine:
                rows.append({"records": r, "method": m, "seeds": sorted(x["seed"] for x in mine),
                             **{k: mean_std([x[k] for x in mine if k in x]) for k in METRICS}})
    return rows


def mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); no deviation from a single value, nothing from none."""
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def fmt(ms: tuple[float | None, float | None], decimals: int) -> str:
    mean, std = ms
    if mean is None:
        return "–"
    return f"{mean:.{decimals}f}" if std is None else f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def table(rows: list[dict]) -> str:
    head = ["records", "method", "bidir. mask", "inner loop"] + [t for t, _ in METRICS.values()] + ["seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        bilevel, bidir = focusft.METHODS[row["method"]]
        cells = [str(row["records"]), row["method"], "yes" if bidir else "no", "yes" if bilevel else "no"]
        cells += [fmt(row[k], d) for k, (_, d) in METRICS.items()] + [str(len(row["seeds"]))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def against_baseline(rows: list[dict], baseline: str = "sft") -> list[str]:
    """Accuracy difference of each method from the baseline at each difficulty, and whether it
    exceeds the seed spread: the mean ± std intervals do not overlap (|diff| > std_a + std_b)."""
    lines = []
    for row in rows:
        base = next((b for b in rows if b["method"] == baseline and b["records"] == row["records"]), None)
        if base is None or row is base:
            continue
        (a, sa), (b, sb) = row["accuracy"], base["accuracy"]
        if sa is None or sb is None:
            verdict = "one seed: no spread to compare with"
        else:
            verdict = "exceeds the seed spread" if abs(a - b) > sa + sb else "within the seed spread"
        lines.append(f"- records {row['records']}, {row['method']} - {baseline}: {a - b:+.1f} points ({verdict})")
    return lines


def plot(rows: list[dict], path: Path) -> bool:
    """Accuracy, step time relative to sft, sink mass and tool share per method x difficulty, with ± std error
    bars; False without matplotlib (optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    methods = list(dict.fromkeys(r["method"] for r in rows))
    records = list(dict.fromkeys(r["records"] for r in rows))
    width = 0.8 / len(records)
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for ax, key in zip(axes, ("accuracy", "step_vs_sft", "sink", "tool")):
        for j, rec in enumerate(records):
            cells = [next((r[key] for r in rows if r["method"] == m and r["records"] == rec), (math.nan, None))
                     for m in methods]
            ax.bar([i + j * width for i in range(len(methods))], [math.nan if c[0] is None else c[0] for c in cells], width,
                   yerr=[c[1] or 0 for c in cells], capsize=3, label=f"{rec} records")
        ax.set_xticks([i + width * (len(records) - 1) / 2 for i in range(len(methods))], methods)
        ax.set(ylabel=METRICS[key][0], title=PLOT_TITLES[key])
        ax.legend()
    axes[0].set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


PLOT_TITLES = {"accuracy": "held-out accuracy (mean ± std over seeds)",
               "step_vs_sft": "training step time / sft's (same seed)",
               "sink": "sink mass, causal mask (positions 0-4)", "tool": "attention on tool outputs, causal mask"}


def report(cfg: AblationConfig, runs: list[Run], ran: int, wall_s: float, log=print) -> list[dict]:
    """results.md (the table, the differences from sft, every run), results.json, results.png."""
    results = [r for r in (read_result(cfg, run) for run in runs) if r is not None]
    rows = summarize(results, cfg.methods, cfg.records)
    out = Path(cfg.out)
    steps = sorted({r["steps"] for r in results})
    md = [f"# Ablation (Table 3) on the demo task: {len(results)} runs, {', '.join(map(str, steps))} steps each",
          "", table(rows), "",
          "Mean ± sample standard deviation over seeds. Sink mass, tool share and context engagement: "
          "attention of the response tokens under the causal mask (inference), averaged over heads, "
          f"layers and {min(cfg.analyze_samples, cfg.n_heldout)} held-out conversations. Runs: {cfg.jobs} at a "
          f"time, one torch thread each; the last invocation ran {ran} of them in {data.fmt_seconds(wall_s)}.", "",
          "Accuracy against sft:", *against_baseline(rows), "", "## Every run", "",
          "| run | accuracy (%) | final loss | training (s) | s/step | sink (%) | tool (%) |", "|---|---|---|---|---|---|---|"]
    md += [f"| records-{r['records']}-{r['method']}-seed-{r['seed']} | {r['accuracy']:.1f} | {r['final_loss']:.4f} | "
           f"{r['train_s']:.0f} | {r['s_per_step']:.2f} | {r['sink']:.2f} | {r['tool']:.1f} |" for r in results]
    (out / "results.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    write_json(out / "results.json", {"settings": cfg.shared(), "last_invocation": {"runs": ran, "wall_s": wall_s},
                                      "summary": rows, "runs": results})
    log("\n" + "\n".join(md[2:md.index("## Every run")]))
    pngs = " and results.png" if rows and plot(rows, out / "results.png") else \
        " (no plot: matplotlib is not installed)" if rows else ""
    log(f"results in {out}/results.md, results.json{pngs}")
    return rows


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> tuple[AblationConfig, bool]:
    d = AblationConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=d.methods, choices=list(focusft.METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=d.seeds, help="training seeds (model init, data order)")
    p.add_argument("--records", nargs="+", type=int, default=d.records,
                   help="difficulty levels: records per tool output (examples/make_agentic.py --records)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per run (0: the demo preset's)")
    p.add_argument("--n-train", type=int, default=d.n_train, help="training conversations (0: make_agentic's default)")
    p.add_argument("--n-heldout", type=int, default=d.n_heldout, help="held-out conversations, all scored")
    p.add_argument("--data-seed", type=int, default=d.data_seed, help="make_agentic's seed (the same data for every run)")
    p.add_argument("--analyze-samples", type=int, default=d.analyze_samples,
                   help="held-out conversations read by eval.py analyze")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--out", default=d.out)
    p.add_argument("--jobs", type=int, default=d.jobs, help="runs at a time, one torch thread each")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands of its first run, and exit")
    args = vars(p.parse_args(argv))
    dry = args.pop("dry_run")
    cfg = AblationConfig(**args)
    if min(cfg.records) < 1 or cfg.jobs < 1 or cfg.steps < 0 or cfg.n_train < 0 or cfg.n_heldout < 1 \
            or cfg.analyze_samples < 1:
        p.error("--records, --jobs, --n-heldout and --analyze-samples must be positive, --steps and --n-train >= 0")
    for k in ("methods", "seeds", "records"):  # a repeated value would run (and count) twice
        setattr(cfg, k, list(dict.fromkeys(getattr(cfg, k))))
    return cfg, dry


def main(argv=None, log=print) -> list[dict]:
    cfg, dry = parse_args(argv)
    runs = plan(cfg)
    todo = [r for r in runs if read_result(cfg, r) is None]
    log(f"ablation: {len(cfg.methods)} methods x {len(cfg.seeds)} seeds x {len(cfg.records)} difficulties "
        f"(records {', '.join(map(str, cfg.records))}) = {len(runs)} runs, {len(runs) - len(todo)} already done | "
        f"steps {cfg.steps or 'of the demo preset'} | --jobs {cfg.jobs} | {cfg.out}/")
    if dry:
        for name, argv_ in run_commands(cfg, runs[0]).items():
            log(("train.py " if name == "train" else "eval.py ") + " ".join(argv_))
        return []
    check_settings(cfg)
    for rec in cfg.records:
        prepare_data(cfg, rec, log)
    t0 = time.time()
    progress = Progress(todo, cfg.jobs, len(runs) - len(todo), log)
    run_all(cfg, todo, progress)
    rows = report(cfg, runs, len(todo), time.time() - t0, log)
    log(f"wall time {data.fmt_seconds(time.time() - t0)} for {len(todo)} runs")
    if progress.failed:
        raise AblationError(f"{len(progress.failed)} run(s) failed: "
                            + ", ".join(r.name for r, _ in progress.failed)
                            + "; run the same command again to redo them")
    return rows


if __name__ == "__main__":
    try:
        main()
    except AblationError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
