"""
Evaluate a checkpoint on the paper's benchmarks, offline once the data files are local.

    python eval.py babilong  --model DIR --data-dir eval_data/babilong [--download]   # Fig. 4, Table 6
    python eval.py ruler     --model DIR --haystack paul_graham_essays.txt            # Table 1
    python eval.py longbench --model DIR --data-dir eval_data/longbench [--download]  # Table 2
    python eval.py demo      --model DIR                                              # the README's demo
    python eval.py analyze   --model DIR --data agentic.jsonl --index 0               # §4.4, Figs. 2, 3, 6
    python eval.py babilong  --model DIR --inner-adapt ...                            # Table 8

Prompts, generation budgets and metrics are those of the official repositories (booydar/babilong,
NVIDIA/RULER, THUDM/LongBench), reproduced string for string, quirks included; the few places
where we cannot follow them exactly are marked "DEVIATION" below.

Every finished sample is appended to OUT/<task>/<length>.jsonl at once, so an interrupted run
started again with the same command skips what is done. At the end of a sub-command,
OUT/summary.json and OUT/summary.md hold every benchmark evaluated into OUT so far, laid out
like the paper's tables.

Reading order: the engine (checkpoint, prompt wrapping, generation with resume, summary), then
one section per benchmark (prompts, data, scoring), then the command line.
"""

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import random
import re
import string
import sys
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import model as model_lib

REPO = Path(__file__).resolve().parent
QWEN_INSTRUCT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


class EvalError(Exception):
    """A user-facing problem (missing file, bad flag, no network). The CLI prints `error: ...`
    and exits with status 2, without a traceback."""


# -----------------------------------------------------------------------------
# Engine: checkpoint, prompt wrapping, generation with resume, summary


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

    def generate(self, prompts: list[list[int]], max_new_tokens: int, seeds: list[int]) -> list[str]:
        """Greedy continuations of a batch of token-id prompts, decoded without special tokens."""
        stop, pad = self.tok.stop_token_ids(), self.tok.pad_token_id
        if self.focus_cfg is None:
            outs = model_lib.generate(self.model, prompts, max_new_tokens, stop_ids=stop, pad_id=pad,
                                       prefill_chunk=self.prefill_chunk)
        else:
            # Table 8: one inner step on each prompt, then generate with those fast weights. One
            # prompt at a time: every prompt gets its own fast weights.
            import focusft

            device = next(self.model.parameters()).device
            outs = []
            for ids, seed in zip(prompts, seeds):
                x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, S)
                g = torch.Generator(device=device).manual_seed(seed)
                with torch.enable_grad():  # the inner step differentiates w.r.t. the fast weights
                    fw = focusft.adapt_on_prompt(self.model, x, torch.ones_like(x, dtype=torch.bool),
                                                 self.focus_cfg, g, steps=1)
                outs += model_lib.generate(self.model, [ids], max_new_tokens, stop_ids=stop, pad_id=pad,
                                            prefill_chunk=self.prefill_chunk, fast_weights=fw,
                                            fast_scale=self.focus_cfg.fast_scale)
        return [self.tok.decode(o, skip_special_tokens=True) for o in outs]


def wrap_prompt(prompt: str, chat: bool, default_system: str) -> str:
    """The text the model reads before its answer: the chat template with the prompt as the only
    user turn and the generation prompt (`<|im_start|>assistant\\n`) appended, or the raw prompt."""
    if not chat:
        return prompt
    import data

    text, _ = data.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True,
                               default_system=default_system)
    return text


def load_engine(model_dir, device=None, dtype=None, chat=None, batch_size=1, prefill_chunk=1024,
                inner_adapt=False, seed=0, log=print) -> Engine:
    """Load a checkpoint (model.py) and its tokenizer (data.py).

    chat=None picks the default: on iff the tokenizer's chat template is the Qwen instruct one
    (its default system prompt is "You are Qwen, created by Alibaba Cloud. ..."), i.e. an
    instruct or FocuSFT/SFT checkpoint; off for a base model, whose template says only
    "You are a helpful assistant.".
    """
    import data
    import model as model_lib

    path = model_lib.resolve_checkpoint(model_dir)
    tok = data.load_tokenizer(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    try:
        torch_dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                       "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
    except KeyError:
        raise EvalError(f"--dtype {dtype!r}: choose bf16, fp16 or fp32") from None
    model = model_lib.Qwen2.from_pretrained(path, dtype=torch_dtype, device=device)
    model.eval().requires_grad_(False)  # inference only; --inner-adapt's fast weights carry their own grads
    if chat is None:
        chat = tok.default_system == QWEN_INSTRUCT_SYSTEM
    focus_cfg = None
    if inner_adapt:
        focus_cfg = load_focus_config(path, log)
    log(f"model {path} | {device} {str(torch_dtype).replace('torch.', '')} | "
        f"{'chat template' if chat else 'raw prompts'}{' | inner-adapt' if inner_adapt else ''}")
    return Engine(model=model, tok=tok, chat=chat, batch_size=batch_size, prefill_chunk=prefill_chunk,
                  focus_cfg=focus_cfg, seed=seed)


def load_focus_config(path: Path, log=print):
    """The training run's fast-weight settings (focusft.json beside the weights, written by
    train.py), so --inner-adapt uses what the model was trained with; the paper's defaults
    otherwise."""
    import focusft

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


def prompt_sha(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


def read_results(path: Path) -> dict[int, dict]:
    """Finished samples of one task/length file, by index.

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
            done[int(rec["index"])] = rec
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise EvalError(f"{path}:{lineno}: not a result line; delete the file to start this task again") from None
    return done


def run_task(engine: Engine, out_dir: Path, task: str, length: str, items: list[dict],
             max_new_tokens: int, score: Callable[[str, dict], float], log=print) -> list[dict]:
    """Generate and score every item not yet in OUT/<task>/<length>.jsonl; return all records.

    items: {"index": int, "prompt": str (exactly what the model reads), "refs": {...}} where
    refs are stored with the result and passed to score(prediction, refs) -> float in [0, 1].
    """
    path = Path(out_dir) / task / f"{length}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_results(path)
    for it in items:  # resuming with other prompts (tokenizer, template, seed ...) would mix two runs
        rec = done.get(it["index"])
        if rec is not None and rec.get("prompt_sha") != prompt_sha(it["prompt"]):
            raise EvalError(f"{path}: sample {it['index']} was run with a different prompt (other "
                            "tokenizer, template or settings); use a new --out or delete the file")
    todo = [it for it in items if it["index"] not in done]
    label = f"{task}/{length}"
    if not todo:
        log(f"{label}: all {len(items)} samples already done")
    else:
        if done:
            log(f"{label}: resuming, {len(items) - len(todo)} of {len(items)} samples already done")
        # Longest first: similar lengths share a batch (little padding), and a prompt that does
        # not fit in memory fails in the first minute rather than after hours.
        # int32 arrays: 500 prompts of 16K tokens as Python int lists would take ~300 MB
        ids = {it["index"]: np.asarray(engine.tok.encode(it["prompt"]), dtype=np.int32) for it in todo}
        todo.sort(key=lambda it: (-len(ids[it["index"]]), it["index"]))
        started, last_print, n_new = time.time(), 0.0, 0
        with open(path, "a", encoding="utf-8") as f:
            for b in range(0, len(todo), engine.batch_size):
                batch = todo[b:b + engine.batch_size]
                preds = engine.generate([ids[it["index"]].tolist() for it in batch], max_new_tokens,
                                        seeds=[engine.seed + it["index"] for it in batch])
                for it, pred in zip(batch, preds):
                    rec = {"index": it["index"], "prompt_tokens": len(ids[it["index"]]),
                           "prompt_sha": prompt_sha(it["prompt"]), "prediction": pred, **it["refs"],
                           "score": score(pred, it["refs"])}
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    f.flush()
                    done[it["index"]] = rec
                n_new += len(batch)
                now = time.time()
                if sys.stderr.isatty() or now - last_print > 10 or n_new == len(todo):
                    progress(label, len(items) - len(todo) + n_new, len(items), n_new, now - started)
                    last_print = now
    return [done[it["index"]] for it in items]


def progress(label: str, done: int, total: int, new: int, elapsed: float):
    rate = new / elapsed if elapsed > 0 else float("inf")
    eta = (total - done) / rate if rate > 0 else float("inf")
    end = "\r" if sys.stderr.isatty() and done < total else "\n"
    print(f"{label}: {done}/{total} | {rate:.2f} samples/s | ETA {fmt_seconds(eta)}   ",
          end=end, file=sys.stderr, flush=True)


def fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def mean_score(records: list[dict]) -> float:
    """Per-sample scores in [0, 1] -> percentage with 2 decimals, as every official scorer rounds."""
    return round(100 * sum(r["score"] for r in records) / len(records), 2) if records else float("nan")


def update_summary(out_dir: Path, bench: str, model_name: str, scores: dict, meta: dict) -> dict:
    """Merge {task: {length: {"score", "n"}}} into OUT/summary.json and rewrite OUT/summary.md."""
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


def _cell(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def _avg(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summary_markdown(summary: dict) -> str:
    """The tables of the paper, for one checkpoint."""
    name = summary.get("model", "model")
    out = [f"# Evaluation of {name}\n"]
    if "babilong" in summary:  # Table 6 (tasks x lengths); its Average row is Fig. 4 / Table 3
        s = summary["babilong"]["scores"]
        tasks = sorted(s, key=lambda t: int(t[2:]))
        lengths = sorted({ln for t in s.values() for ln in t}, key=length_tokens)
        out += ["## BABILong (accuracy %)\n", "| Task | " + " | ".join(ln.upper() for ln in lengths) + " |",
                "|---" * (len(lengths) + 1) + "|"]
        for t in tasks:
            out.append(f"| {t.upper()} | " + " | ".join(_cell(s[t].get(ln, {}).get("score")) for ln in lengths) + " |")
        out.append("| Average | " + " | ".join(
            _cell(_avg([s[t][ln]["score"] for t in tasks if ln in s[t]])) for ln in lengths) + " |")
        out.append("")
    if "ruler" in summary:  # Table 1 (task x length columns), plus the averages of Table 7
        s = summary["ruler"]["scores"]
        tasks = [t for t in RULER_TASKS if t in s]
        lengths = sorted({ln for t in s.values() for ln in t}, key=int)
        cols = [(t, ln) for t in tasks for ln in lengths]
        head = [f"{RULER_TASKS[t]['title']} {int(ln) // 1024}K" for t, ln in cols]
        head += [f"Avg@{int(ln) // 1024}K" for ln in lengths]
        vals = [s[t].get(ln, {}).get("score") for t, ln in cols]
        vals += [_avg([s[t][ln]["score"] for t in tasks if ln in s[t]]) for ln in lengths]
        meta = summary["ruler"]["meta"]
        out += [f"## RULER (string_match_all %; NIAH haystack: {meta.get('haystack', '?')})\n",
                "| Model | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|",
                f"| {name} | " + " | ".join(_cell(v) for v in vals) + " |", ""]
    if "longbench" in summary:  # Table 2
        s = summary["longbench"]["scores"]
        tasks = [t for t in LONGBENCH_TASKS if t in s]
        vals = [_avg([v["score"] for v in s[t].values()]) for t in tasks]
        out += [f"## LongBench QA (F1 %, max length {summary['longbench']['meta'].get('max_length', '?')})\n",
                "| Model | " + " | ".join(LONGBENCH_TASKS[t]["title"] for t in tasks) + " | Avg |",
                "|---" * (len(tasks) + 2) + "|",
                f"| {name} | " + " | ".join(_cell(v) for v in vals) + f" | {_cell(_avg(vals))} |", ""]
    if "demo" in summary:
        for task, by_len in summary["demo"]["scores"].items():
            for ln, v in by_len.items():
                out += ["## Demo (held-out agentic conversations)\n",
                        f"accuracy {_cell(v['score'])}% on {v['n']} conversations ({task}/{ln})", ""]
    return "\n".join(out)


def length_tokens(label: str) -> int:
    """'4k' -> 4096, '128k' -> 131072, '1M' -> 2**20, '4096' -> 4096."""
    m = re.fullmatch(r"(\d+)([kKmM]?)", label)
    if not m:
        raise EvalError(f"bad length {label!r}: use e.g. 4k or 4096")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


def download(repo_id: str, filename: str, local_dir: Path | None = None) -> Path:
    """One file of a Hugging Face dataset repository; a clear error without network."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo_id, repo_type="dataset", filename=filename,
                                    local_dir=str(local_dir) if local_dir else None))
    except Exception as e:  # offline, DNS, 404, auth: all mean "not fetched"
        first = str(e).splitlines()[0] if str(e) else ""
        raise EvalError(f"could not download {filename} from the dataset {repo_id} "
                        f"({type(e).__name__}: {first}); without network access, copy the file there "
                        "by hand and run again without --download") from None


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


def eval_babilong(engine: Engine, out_dir, data_dir, tasks, lengths, samples=None, fetch=False, log=print) -> dict:
    scores = {}
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

            recs = run_task(engine, out_dir, task, length, items, BABILONG_MAX_NEW_TOKENS, score, log)
            scores.setdefault(task, {})[length] = {"score": mean_score(recs), "n": len(recs)}
            log(f"babilong {task} {length}: {scores[task][length]['score']:.2f}")
    return scores


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
def _punkt():
    """nltk.sent_tokenize if nltk and its punkt model are installed, else None."""
    try:
        import nltk

        nltk.sent_tokenize("A b. C d.")
        return nltk.sent_tokenize
    except (ImportError, LookupError):
        return None


def sentence_splitter_name() -> str:
    return "nltk-punkt" if _punkt() else "regex-fallback"


def split_sentences(text: str) -> list[str]:
    """RULER splits the essay haystack with nltk.sent_tokenize (Punkt, English model).

    DEVIATION: when nltk and its punkt data are not installed (they are not runtime
    dependencies, and the model cannot be downloaded offline) we split after . ! ? (and any
    closing quotes or brackets) followed by whitespace, except after initials ("J."), dotted
    abbreviations ("U.S.") and a few common ones ("Mr."). The text is the same either way
    (sentences are re-joined with the single spaces they were split on); only the set of places
    where needles can go differs. summary.json records which splitter ran.
    """
    if _punkt():
        return _punkt()(text)
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


def ruler_niah_multivalue(target: int, num_samples: int, seed: int, count, wrap,
                          essay: str | None = None) -> list[dict]:
    """NIAH-MultiValue: 4 needles "One of the special magic numbers for {key} is: {value}." with
    one adjective-noun key and 7-digit values, hidden in the essay haystack (or the noise one).

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
            cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles))) + [len(sents)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            sentences = [NOISE] * n
            for pos, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
                sentences.insert(pos, needle)
            context = "\n".join(sentences)
        prompt = wrap(spec["template"].format(type_needle_v=type_v, context=context, query=key))
        return prompt + spec["answer_prefix"].format(type_needle_v=type_v, query=key), values

    inc = 500 if words is not None else (25 if target >= 4096 else 5)
    return _ruler_fill(make, count, target, spec["tokens_to_generate"], num_samples, inc, "niah_multivalue")


def _ruler_fill(make, count, target, budget, num_samples, inc, what) -> list[dict]:
    """NIAH's sizing: estimate tokens per haystack unit at `inc` units, search up to 3x
    the estimate, then draw the samples (shrinking a draw that came out too long)."""
    per_unit = count(make(inc)[0]) / inc
    size = search_size(make, count, target - budget, inc, max(int(target / per_unit * 3), inc * 2)) or inc
    out = []
    for i in range(num_samples):
        prompt, answers, n = fit_sample(make, count, target - budget, size, inc, what)
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
    per_word = count(make(4096)[0]) / 4096
    size = search_size(make, count, target - budget, inc, max(int(target // per_word) * 2, inc * 2)) or inc
    out = []
    for i in range(num_samples):
        prompt, answers, n = fit_sample(make, count, target - budget, size, inc, "cwe")
        out.append({"index": i, "prompt": prompt, "outputs": answers, "length": n + budget})
    return out


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
    per_unit = count(make_icl(5)[0]) / 5
    size = search_size(make_icl, count, 500, 5, max(int(500 / per_unit * 3), 10)) or 5
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
    per_unit = count(make(inc)[0]) / inc
    size = search_size(make, count, target - budget - count(icl), inc, max(int(target / per_unit * 3), inc * 2)) or inc
    out = []
    for i in range(num_samples):
        prompt, answers, n = fit_sample(make_task, count, target - budget, size, inc, "vt")
        out.append({"index": i, "prompt": prompt, "outputs": answers, "length": n + budget})
    return out


def ruler_samples(task: str, target: int, num_samples: int, seed: int, count, wrap, essay: str | None = None):
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
    return round(sum(string_match_fraction(p, ref) for p, ref in zip(preds, refs)) / len(preds) * 100, 2)


def eval_ruler(engine: Engine, out_dir, tasks, lengths, samples=500, seed=42, essay=None, log=print) -> dict:
    scores = {}
    for task in tasks:
        for length in lengths:
            target = int(length)
            t0 = time.time()
            gen = ruler_samples(task, target, samples, seed, engine.count, engine.wrap,
                                essay if task == "niah_multivalue" else None)
            log(f"ruler {task} {target}: generated {len(gen)} samples in {time.time() - t0:.0f}s "
                f"(prompt tokens {min(g['length'] for g in gen) - RULER_TASKS[task]['tokens_to_generate']}"
                f"..{max(g['length'] for g in gen) - RULER_TASKS[task]['tokens_to_generate']})")
            items = [{"index": g["index"], "prompt": g["prompt"], "refs": {"references": g["outputs"]}} for g in gen]

            def score(pred, refs):
                return string_match_fraction(ruler_postprocess(pred), refs["references"])

            recs = run_task(engine, out_dir, task, str(target), items, RULER_TASKS[task]["tokens_to_generate"],
                            score, log)
            scores.setdefault(task, {})[str(target)] = {"score": mean_score(recs), "n": len(recs)}
            log(f"ruler {task} {target}: {scores[task][str(target)]['score']:.2f}")
    return scores


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


def eval_longbench(engine: Engine, out_dir, data_dir, tasks, max_length=LONGBENCH_MAX_LENGTH, samples=None,
                   fetch=False, log=print) -> dict:
    scores = {}
    for task in tasks:
        path = longbench_file(data_dir, task, fetch)
        records = read_records(path)[:samples]
        if not records:
            raise EvalError(f"{path}: no records")
        require_fields(records, ("context", "input", "answers"), path)
        # truncation comes first, on the bare prompt; the chat template is added after (pred.py)
        items = [{"index": i, "prompt": engine.wrap(truncate_middle(longbench_prompt(task, r), engine.tok, max_length)),
                  "refs": {"answers": r["answers"]}} for i, r in enumerate(records)]
        recs = run_task(engine, out_dir, task, str(max_length), items, LONGBENCH_TASKS[task]["max_new_tokens"],
                        lambda pred, refs: longbench_sample_score(pred, refs["answers"]), log)
        scores[task] = {str(max_length): {"score": mean_score(recs), "n": len(recs)}}
        log(f"longbench {task}: {scores[task][str(max_length)]['score']:.2f}")
    return scores


# -----------------------------------------------------------------------------
# Demo: held-out conversations of the bundled agentic haystack task


def eval_demo(engine: Engine, out_dir, data_path, max_new_tokens=64, samples=None, log=print) -> dict:
    """Each line: {"messages": [...], "tools": [...] (optional), "answer": str}. The model reads the
    conversation up to its final assistant turn and scores 1 if `answer` is in what it writes."""
    import data

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
    recs = run_task(engine, out_dir, "demo", "heldout", items, max_new_tokens,
                    lambda pred, refs: float(refs["answer"] in pred), log)
    score = mean_score(recs)
    log(f"demo: accuracy {score:.1f}% ({sum(r['score'] for r in recs):.0f}/{len(recs)} held-out conversations)")
    return {"demo": {"heldout": {"score": score, "n": len(recs)}}}


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
    import data
    import focusft

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
    import data
    import model as model_lib

    path = model_lib.resolve_checkpoint(args.model)
    tok = data.load_tokenizer(path)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}.get(args.dtype)
    if args.dtype is not None and dtype is None:
        raise EvalError(f"--dtype {args.dtype!r}: choose bf16 or fp32")
    model = model_lib.Qwen2.from_pretrained(path, dtype=dtype or (torch.bfloat16 if device.startswith("cuda")
                                                                  else torch.float32), device=device)
    model.eval().requires_grad_(False)
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
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on the paper's benchmarks.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--model", required=True, help="checkpoint directory (HF layout) or hub id")
        sp.add_argument("--out", default=None, help="results directory (default: eval_results/<model name>)")
        sp.add_argument("--device", default=None, help="default: cuda if available, else cpu")
        sp.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on cuda, fp32 on cpu)")
        sp.add_argument("--batch-size", type=int, default=1, help="prompts generated together")
        sp.add_argument("--prefill-chunk", type=int, default=1024, help="prompt tokens per prefill step")
        sp.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap prompts in the chat template (default: on iff the tokenizer's template is the "
                             "Qwen instruct one); --no-chat feeds raw prompts, for base models")
        sp.add_argument("--inner-adapt", action="store_true",
                        help="Table 8: one inner fast-weight step on each prompt before generating "
                             "(settings from focusft.json in the checkpoint, else the paper's)")
        sp.add_argument("--seed", type=int, default=42, help="RULER sample generation and --inner-adapt init")
        sp.add_argument("--samples", type=int, default=None,
                        help="samples per task and length (default: all; ruler: 500)")

    b = sub.add_parser("babilong", help="BABILong qa1-qa5 (Fig. 4, Table 6)")
    common(b)
    b.add_argument("--data-dir", default="eval_data/babilong", help="holds data/qaN/<length>.json")
    b.add_argument("--download", action="store_true", help="fetch missing files from RMT-team/babilong")
    b.add_argument("--tasks", nargs="+", default=list(BABILONG_PROMPTS), choices=list(BABILONG_PROMPTS))
    b.add_argument("--lengths", nargs="+", default=["4k", "8k", "16k", "32k"],
                   help="any of 0k 1k 2k 4k 8k 16k 32k 64k 128k")

    r = sub.add_parser("ruler", help="RULER NIAH-MV, CWE, VT, generated locally (Table 1)")
    common(r)
    r.set_defaults(samples=500)
    r.add_argument("--tasks", nargs="+", default=list(RULER_TASKS), choices=list(RULER_TASKS))
    r.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384], help="target lengths in tokens")
    r.add_argument("--haystack", default=None,
                   help="essay text for NIAH-MV (the paper's setting: Paul Graham's essays, one text file); "
                        "without it NIAH-MV uses the noise haystack")

    lb = sub.add_parser("longbench", help="LongBench QA: HotpotQA, MultifieldQA-en, NarrativeQA, Qasper (Table 2)")
    common(lb)
    lb.add_argument("--data-dir", default="eval_data/longbench", help="holds data/<name>.jsonl")
    lb.add_argument("--download", action="store_true", help="fetch THUDM/LongBench's data.zip and extract it")
    lb.add_argument("--tasks", nargs="+", default=list(LONGBENCH_TASKS), choices=list(LONGBENCH_TASKS))
    lb.add_argument("--max-length", type=int, default=LONGBENCH_MAX_LENGTH,
                    help="middle-truncate prompts to this many tokens (LongBench's value for 8K models)")

    an = sub.add_parser("analyze", help="attention sinks and context engagement (paper §4.4, Figs. 2, 3, 6)")
    an.add_argument("--model", required=True, help="checkpoint directory (HF layout) or hub id")
    an.add_argument("--data", default=str(REPO / "examples" / "agentic-heldout.jsonl"),
                    help="multi-turn agentic conversations (JSONL)")
    an.add_argument("--index", nargs="+", type=int, default=[0], help="which conversations (0-based)")
    an.add_argument("--max-length", type=int, default=4096, help="truncate samples to this many tokens")
    an.add_argument("--layer", type=int, default=None, help="heatmap/profile layer (default: the middle one)")
    an.add_argument("--out", default=None, help="results directory (default: eval_results/<model name>)")
    an.add_argument("--device", default=None)
    an.add_argument("--dtype", default=None, help="bf16 | fp32 (default: bf16 on cuda, fp32 on cpu)")

    d = sub.add_parser("demo", help="accuracy on the held-out conversations of the bundled demo task")
    common(d)
    d.add_argument("--data", default=str(REPO / "examples" / "agentic-heldout.jsonl"))
    d.add_argument("--max-new-tokens", type=int, default=64)
    return p


def run(args, log=print) -> dict:
    if args.batch_size < 1 or (args.samples is not None and args.samples < 1):
        raise EvalError("--batch-size and --samples must be positive")
    essay = None
    if args.cmd == "ruler":
        for n in args.lengths:
            if n < 1024:
                raise EvalError(f"--lengths {n}: too short for RULER's prompts (use 1024 or more)")
        if args.haystack:
            f = Path(args.haystack)
            if not f.is_file():
                raise EvalError(f"--haystack {f}: file not found")
            essay = f.read_text(encoding="utf-8")
        elif "niah_multivalue" in args.tasks:
            log("note: no --haystack given, NIAH-MV uses the noise haystack (the paper uses the essays)")
    # Data files first (downloading what is missing), so a bad path fails before a 7B model loads.
    if args.cmd == "babilong":
        for task in args.tasks:
            for ln in args.lengths:
                length_tokens(ln)
                babilong_file(Path(args.data_dir), task, ln, args.download)
    if args.cmd == "longbench":
        for task in args.tasks:
            longbench_file(Path(args.data_dir), task, args.download)
    if args.cmd == "demo" and not Path(args.data).is_file():
        raise EvalError(f"{args.data} not found (the held-out demo conversations; see examples/)")
    engine = load_engine(args.model, args.device, args.dtype, args.chat, args.batch_size, args.prefill_chunk,
                         args.inner_adapt, args.seed, log)
    name = Path(str(args.model).rstrip("/")).name
    out = Path(args.out or Path("eval_results") / name)
    check_run(out, {"model": str(getattr(engine.model, "source_dir", None) or args.model),
                    "inner_adapt": args.inner_adapt})
    meta = {"chat": engine.chat, "inner_adapt": args.inner_adapt}
    if args.cmd == "babilong":
        scores = eval_babilong(engine, out, Path(args.data_dir), args.tasks, args.lengths, args.samples,
                               args.download, log)
    elif args.cmd == "ruler":
        scores = eval_ruler(engine, out, args.tasks, args.lengths, args.samples, args.seed, essay, log)
        meta.update(seed=args.seed, haystack=Path(args.haystack).name if essay is not None else "noise",
                    sentence_splitter=sentence_splitter_name())
    elif args.cmd == "longbench":
        scores = eval_longbench(engine, out, Path(args.data_dir), args.tasks, args.max_length, args.samples,
                                args.download, log)
        meta.update(max_length=args.max_length)
    else:
        scores = eval_demo(engine, out, args.data, args.max_new_tokens, args.samples, log)
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
    user_errors = [EvalError]
    for mod, cls in (("data", "DataError"), ("model", "ModelError")):
        try:
            user_errors.append(getattr(__import__(mod), cls))
        except (ImportError, AttributeError):
            pass
    try:
        run_analyze(args) if args.cmd == "analyze" else run(args)
    except tuple(user_errors) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
