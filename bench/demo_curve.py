"""
The demo's learning curve: held-out accuracy of every checkpoint of a `train.py --preset demo` run
against the training time it took to reach it.

    python train.py --preset demo && python -m bench.demo_curve runs/demo

Each checkpoint (OUT/step-N/, written every --save-every steps, and the final model in OUT/) is
scored by `eval.py demo` (greedy answers to the held-out conversations, exact city and shift);
the training time of step N is the sum of the logged step times up to N (OUT/log.jsonl), so it
excludes start-up and checkpoint writing. Prints a Markdown table.
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def accuracy(model_dir: Path, data: str | None) -> float:
    cmd = [sys.executable, str(REPO / "eval.py"), "demo", "--model", str(model_dir), "--out", str(model_dir / "eval")]
    r = subprocess.run(cmd + (["--data", data] if data else []), capture_output=True, text=True)
    found = re.search(r"demo: accuracy ([0-9.]+)%", r.stdout)
    if r.returncode != 0 or not found:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")
    return float(found.group(1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default="runs/demo", help="the --out directory of a demo training run")
    p.add_argument("--data", default=None, help="held-out conversations (default: eval.py demo's)")
    args = p.parse_args()
    run = Path(args.run)
    if not (run / "log.jsonl").is_file():
        sys.exit(f"error: {run / 'log.jsonl'} not found (train first: python train.py --preset demo)")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    seconds, total = {}, 0.0
    for rec in log:
        total += rec["s_per_step"]
        seconds[rec["step"]] = total
    steps = sorted(int(d.name[5:]) for d in run.glob("step-*") if d.name[5:].isdigit())
    points = [(s, run / f"step-{s}") for s in steps] + ([(log[-1]["step"], run)] if (run / "config.json").is_file() else [])
    print("| step | training time | held-out accuracy |\n|---|---|---|")
    for step, model_dir in points:
        t = seconds.get(step, float("nan"))
        print(f"| {step} | {int(t) // 60}m{int(t) % 60:02d}s | {accuracy(model_dir, args.data):.1f} % |", flush=True)


if __name__ == "__main__":
    main()
