"""
What every benchmark shares: the engine (checkpoint, prompt wrapping, generation), results files
(one Job per file, resume, scores), progress on stderr, and small helpers for data files and
tables. eval.py is the command line; each benchmark is a module beside this one.
"""

import dataclasses
import hashlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

import data
import focusft
import checkpoint
import generate as generate_lib
import model as model_lib

REPO = Path(__file__).resolve().parents[1]


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
# Results: one job per results file, resume, scores


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
        print(f"{self.label}: {self.done}/{self.total} | {rate:.2f} {self.unit}/s | ETA {data.fmt_seconds(eta)}   ",
              end=end, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Helpers: summary tables, lengths, data files


def cell(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def avg(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def row(cells) -> str:
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
    try:
        for where, rec in data.read_json_lines(path):
            if not isinstance(rec, dict):
                raise EvalError(f"{where}: expected a JSON object per line")
            records.append(rec)
    except data.DataError as e:
        raise EvalError(f"{e}; the file is neither a JSON array nor JSON lines") from None
    return records


def require_fields(records: list[dict], fields: tuple, path: Path):
    for i, r in enumerate(records):
        missing = [k for k in fields if k not in r]
        if missing:
            raise EvalError(f"{path}: record {i} has no {', '.join(missing)} field")

