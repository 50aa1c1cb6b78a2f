"""LongBench v1 QA (paper Table 2, left): HotpotQA, MultifieldQA-en, NarrativeQA, Qasper; prompts,
middle truncation, F1, the table."""

import re
import string
import zipfile
from collections import Counter
from pathlib import Path
from typing import Iterable

from evals.common import (
    avg, cell, download, Engine, EvalError, Job, percent, read_records, require_fields, row, run_jobs)

# -----------------------------------------------------------------------------
# LongBench v1 QA (THUDM/LongBench: config/dataset2prompt.json, config/dataset2maxlen.json,
# pred.py, metrics.py). Data: data/<name>.jsonl from the dataset's data.zip.

LONGBENCH_TASKS = {  # paper Table 2 order; prompts verbatim, typos included ("asconcisely")
    "hotpotqa": {
        "title": "HotpotQA", "max_new_tokens": 32,
        "prompt": "Answer the question based on the given passages. Only give me the answer and do not output any "
                  "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
                  "given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\n"
                  "Answer:",
    },
    "multifieldqa_en": {
        "title": "Multifield", "max_new_tokens": 64,
        "prompt": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
                  "based on the above text, only give me the answer and do not output any other words.\n\nQuestion: "
                  "{input}\nAnswer:",
    },
    "narrativeqa": {
        "title": "Narrative", "max_new_tokens": 128,
        "prompt": "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
                  "question asconcisely as you can, using a single phrase if possible. Do not provide any "
                  "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as "
                  "you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}"
                  "\n\nAnswer:",
    },
    "qasper": {
        "title": "Qasper", "max_new_tokens": 128,
        "prompt": "You are given a scientific article and a question. Answer the question as concisely as you can, "
                  "using a single phrase or sentence if possible. If the question cannot be answered based on the "
                  "information in the article, write \"unanswerable\". If the question is a yes/no question, answer "
                  "\"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n "
                  "Answer the question based on the above article as concisely as you can, using a single phrase or "
                  "sentence if possible. If the question cannot be answered based on the information in the article, "
                  "write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
                  "\"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    },
}
# LongBench's pred.py gives each model a max_length of its context window minus room to
# generate: 7500 for its 8K models (xgen-7b-8k, internlm-7b-8k), 3500 for 4K, 31500 for 32K.
# The paper evaluates "at 8K", hence the default.
LONGBENCH_MAX_LENGTH = 7500


def longbench_prompt(task: str, record: dict) -> str:
    return LONGBENCH_TASKS[task]["prompt"].format(context=record["context"], input=record["input"])


def truncate_middle(prompt: str, tok, max_length: int) -> str:
    """LongBench's truncation: if the prompt is longer than max_length tokens, keep the first and
    the last max_length/2 tokens (the instructions sit at both ends), decoded and re-joined."""
    ids = tok.encode(prompt)
    if len(ids) <= max_length:
        return prompt
    half = int(max_length / 2)
    return tok.decode(ids[:half], skip_special_tokens=True) + tok.decode(ids[-half:], skip_special_tokens=True)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, drop articles, collapse whitespace (SQuAD's normalisation)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: list, ground_truth: list) -> float:
    common = Counter(prediction) & Counter(ground_truth)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = num_same / len(prediction)
    recall = num_same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def longbench_sample_score(prediction: str, answers: list[str]) -> float:
    """The best F1 over the reference answers (LongBench's scorer starts from 0)."""
    score = 0.0
    for answer in answers:
        score = max(score, qa_f1_score(prediction, answer))
    return score


def longbench_file(data_dir: Path, task: str, fetch: bool) -> Path:
    path = Path(data_dir) / "data" / f"{task}.jsonl"
    if path.is_file():
        return path
    if not fetch:
        raise EvalError(f"{path} not found: unzip THUDM/LongBench's data.zip into {data_dir} "
                        "(giving data/<name>.jsonl) or add --download")
    archive = download("THUDM/LongBench", "data.zip")
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as z:  # extract only the QA files we evaluate, flattened into data/
        for member in z.namelist():
            name = Path(member).name
            if name in {f"{t}.jsonl" for t in LONGBENCH_TASKS}:
                (path.parent / name).write_bytes(z.read(member))
    if not path.is_file():
        raise EvalError(f"{archive} has no {task}.jsonl")
    return path


def longbench_jobs(engine: Engine, data_dir, tasks, max_length=LONGBENCH_MAX_LENGTH, samples=None,
                   fetch=False) -> Iterable[Job]:
    for task in tasks:
        path = longbench_file(data_dir, task, fetch)
        records = read_records(path)[:samples]
        if not records:
            raise EvalError(f"{path}: no records")
        require_fields(records, ("context", "input", "answers"), path)
        # truncation comes first, on the bare prompt; the chat template is added after (pred.py)
        items = [{"index": i, "prompt": engine.wrap(truncate_middle(longbench_prompt(task, r), engine.tok, max_length)),
                  "refs": {"answers": r["answers"]}} for i, r in enumerate(records)]
        yield Job(task, str(max_length), items, LONGBENCH_TASKS[task]["max_new_tokens"],
                  lambda pred, refs: longbench_sample_score(pred, refs["answers"]), percent)


def eval_longbench(engine: Engine, out_dir, data_dir, tasks, max_length=LONGBENCH_MAX_LENGTH, samples=None,
                   fetch=False, log=print) -> dict:
    """{task: {str(max_length): ...}}: runs with different --max-length keep apart, in their own
    results files and in their own rows of the summary table."""
    return run_jobs(engine, out_dir, longbench_jobs(engine, data_dir, tasks, max_length, samples, fetch),
                    "longbench", log)


def table(name: str, entry: dict) -> list[str]:
    """Table 2, left half: one row per --max-length evaluated into this directory (never averaged
    across lengths: a 3500-token run is not an 8K result)."""
    s = entry["scores"]
    tasks = [t for t in LONGBENCH_TASKS if t in s]
    out = ["## LongBench QA (F1 %)\n", row(["Model", "Max length"] + [LONGBENCH_TASKS[t]["title"] for t in tasks] + ["Avg"]),
           "|---" * (len(tasks) + 3) + "|"]
    for ln in sorted({ln for t in tasks for ln in s[t]}, key=int):
        vals = [s[t].get(ln, {}).get("score") for t in tasks]
        mean = avg(vals) if None not in vals else None  # an average over some of the tasks is no Avg
        out.append(row([name, ln] + [cell(v) for v in vals] + [cell(mean)]))
    return out


# -----------------------------------------------------------------------------
# Entry: what eval.py's registry reads (its Benchmark protocol)

HELP = "LongBench QA: HotpotQA, MultifieldQA-en, NarrativeQA, Qasper (Table 2)"


def add_flags(sp):
    sp.add_argument("--data-dir", default="eval_data/longbench", help="holds data/<name>.jsonl")
    sp.add_argument("--download", action="store_true", help="fetch THUDM/LongBench's data.zip and extract it")
    sp.add_argument("--tasks", nargs="+", default=list(LONGBENCH_TASKS), choices=list(LONGBENCH_TASKS))
    sp.add_argument("--max-length", type=int, default=LONGBENCH_MAX_LENGTH,
                    help="middle-truncate prompts to this many tokens (LongBench's value for 8K models)")


def check(args):
    for task in args.tasks:
        longbench_file(Path(args.data_dir), task, args.download)


def evaluate(engine: Engine, out: Path, args, log=print) -> dict:
    return eval_longbench(engine, out, Path(args.data_dir), args.tasks, args.max_length, args.samples,
                          args.download, log)


def meta(args) -> dict:
    return {}
