"""GPQA Diamond with a Python tool (paper Table 2, right): multi-turn sampled rollouts as verl's
ToolAgentLoop runs them, the code tool (its sandbox is evals/sandbox.py), metrics, the table."""

import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data
from evals import sandbox
from evals.common import (
    append_record, cell, check_same_prompts, download, Engine, EvalError, Progress, prompt_sha, read_records,
    read_results, row)

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
    tool_python: str | None = None  # the interpreter the code runs with (None: the evaluator's own)
    unsafe_tool_sandbox: bool = False  # run the code WITHOUT the jail (sandbox.run_python's jail=False)


RUN_ONLY = ("rollouts", "tool_python", "unsafe_tool_sandbox")  # settings that do not change what a rollout asks


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
    # verl's SandboxFusionTool: timeout = parameters.get("timeout", default_timeout); the schema does
    # not offer it, but a model may pass it. DEVIATION: capped at --tool-timeout (verl has no cap).
    timeout = args.get("timeout", cfg.tool_timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        return 'Error when executing tool: "timeout" must be a positive number of seconds'
    out = sandbox.run_python(prepare_code(args["code"]), min(timeout, cfg.tool_timeout), cfg.tool_memory_mb,
                             python=cfg.tool_python, jail=not cfg.unsafe_tool_sandbox)
    return truncate_chars(out, cfg.tool_response_chars)


def tool_sandbox(cfg: GPQAConfig) -> str:
    """What the code runs in, as summary.json and summary.md record it."""
    if cfg.unsafe_tool_sandbox:
        return "none (--unsafe-tool-sandbox): no jail; rlimits, and a cgroup per call where one can be made"
    return sandbox.sandbox_name()


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
            "seconds": round(time.time() - e.started, 2), "response": response,
            # kept with the rollout, so a resumed run cannot hide that part of it ran without the jail
            **({"unjailed": True} if cfg.unsafe_tool_sandbox else {})}


def run_gpqa(engine: Engine, out_dir: Path, problems: list[dict], cfg: GPQAConfig, log=print) -> dict:
    """Run every (problem, rollout) not yet in OUT/gpqa/diamond.jsonl, keeping up to --batch-size
    episodes in flight (a finished one is replaced at once), and write each as it finishes.
    Returns {problem: [records by rollout]}."""
    path = Path(out_dir) / "gpqa" / "diamond.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_results(path, key=lambda rec: (int(rec["problem"]), int(rec["rollout"])))
    # a rollout's identity: its user turn and every setting but the number of rollouts (more may be added)
    settings = json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_ONLY}, sort_keys=True)
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
    """Per rollout count n, in % over problems: pass@1 ("score") = the mean accuracy of a rollout
    (= unbiased pass@k at k = 1; verl's mean@n), maj@n = the majority vote's accuracy, unbiased
    pass@k for k = 1, 2, 4, ..., n (pass@n: at least one rollout right), and verl's bootstrap
    maj@n / best@n (what Open-AgentRL logs); plus mean turns, calls and tokens.
    Why pass@1 is the mean although the paper's text says "majority vote": a per-problem vote over
    GPQA Diamond's 198 problems is a multiple of 1/198, and the paper's pass@1 figures are not
    (19.4% and 15.6% are 38.4 and 30.9 problems) while its pass@32 figures are (160 and 156 of 198)."""
    recs = [r for rs in by_problem.values() for r in rs]
    n = len(next(iter(by_problem.values())))
    ks = sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})
    acc = lambda f: round(100 * float(np.mean([f(rs) for rs in by_problem.values()])), 2)  # noqa: E731
    boot = [verl_bootstrap([r["correct"] for r in rs], [r["vote"] for r in rs], n) for rs in by_problem.values()]
    return {
        "score": acc(lambda rs: np.mean([r["correct"] for r in rs])), "n": len(by_problem), "rollouts": n,
        "maj@n": acc(lambda rs: rs[majority([r["vote"] for r in rs])]["correct"]),
        "pass@k": {str(k): acc(lambda rs, k=k: pass_at_k(n, sum(r["correct"] for r in rs), k)) for k in ks},
        "verl_maj": round(100 * float(np.mean([m for _, m in boot])), 2),
        "verl_best": round(100 * float(np.mean([b for b, _ in boot])), 2),
        **{f"mean_{k}": round(float(np.mean([r[k] for r in recs])), 1)
           for k in ("turns", "tool_calls", "generated_tokens", "response_tokens", "prefilled_tokens")},
        **({"unjailed_rollouts": unjailed} if (unjailed := sum(bool(r.get("unjailed")) for r in recs)) else {}),
    }


def eval_gpqa(engine: Engine, out_dir, data_dir, cfg: GPQAConfig, problems: int | None = None, fetch=False,
              log=print) -> dict:
    if not engine.chat:
        raise EvalError("gpqa runs in the chat template (its tools block and tool turns): drop --no-chat")
    todo = read_gpqa(gpqa_file(Path(data_dir), fetch))[:problems]
    if cfg.unsafe_tool_sandbox:
        log("WARNING: --unsafe-tool-sandbox: the model's code runs WITHOUT a jail, as this user: it can read and "
            "write your files, use the network and signal your processes")
    else:
        log(f"gpqa: the code tool runs in a bubblewrap jail; {sandbox.sandbox_limits()}")
    m = gpqa_metrics(run_gpqa(engine, out_dir, todo, cfg, log))
    n = m["rollouts"]
    log(f"gpqa: pass@1 {m['score']:.2f} | pass@{n} {m['pass@k'][str(n)]:.2f} | maj@{n} {m['maj@n']:.2f} | "
        f"{m['mean_turns']} turns, {m['mean_generated_tokens']:.0f} generated tokens per rollout")
    return {"diamond": {str(m["rollouts"]): m}}


def table(name: str, entry: dict) -> list[str]:
    """Table 2, right half (its columns pass@1 and pass@32, for n = 32): a header and a row per
    rollout count n. pass@1 is the mean accuracy of a rollout, maj@n the majority vote's."""
    out = ["## GPQA Diamond with a Python tool (%)\n"]
    for n, m in sorted(entry["scores"].get("diamond", {}).items(), key=lambda kv: int(kv[0])):
        # summary.json files written before pass@1 was the mean hold the vote as "score", the mean as "mean"
        pass1, maj = (m["score"], m["maj@n"]) if "maj@n" in m else (m["mean"], m["score"])
        out += [row(["Model", "Rollouts", "pass@1", f"pass@{n}", f"maj@{n}", f"verl maj@{n}", f"verl best@{n}",
                     "turns", "generated tokens"]), "|---" * 9 + "|",
                row([name, n, cell(pass1), cell(m["pass@k"][n]), cell(maj), cell(m["verl_maj"]), cell(m["verl_best"]),
                     f"{m['mean_turns']:.1f}", f"{m['mean_generated_tokens']:.0f}"])]
    where = entry["meta"].get("tool_sandbox", "not recorded")
    # the entry of the most rollouts counts every rollout the smaller ones do
    unjailed = max([m.get("unjailed_rollouts", 0) for m in entry["scores"].get("diamond", {}).values()], default=0)
    unsafe = "**UNSAFE:** " if entry["meta"].get("unsafe_tool_sandbox") or unjailed else ""
    out.append(f"\n{unsafe}The code tool ran in: {where}.")
    if unjailed:
        out.append(f"{unjailed} rollout(s) ran without the jail (--unsafe-tool-sandbox), in this or an earlier run.")
    return out


# -----------------------------------------------------------------------------
# Entry: what eval.py's registry reads (its Benchmark protocol)

HELP = "GPQA Diamond with a Python tool, sampled multi-turn rollouts (Table 2)"


def add_flags(sp):
    sp.add_argument("--data-dir", default="eval_data/gpqa",
                    help="holds gpqa_diamond.csv (the official file), or gpqa_diamond.jsonl (same columns, or "
                         "Open-AgentRL-Eval's problem/solution/domain)")
    sp.add_argument("--download", action="store_true",
                    help="fetch gpqa_diamond.csv from Idavidrein/gpqa (gated: accept its terms on the hub, then "
                         "`huggingface-cli login` or set HF_TOKEN)")
    d = GPQAConfig()
    sp.add_argument("--rollouts", type=int, default=d.rollouts, help="sampled episodes per problem")
    sp.add_argument("--temperature", type=float, default=d.temperature)
    sp.add_argument("--top-p", type=float, default=d.top_p)
    sp.add_argument("--max-turns", type=int, default=d.max_turns, help="assistant turns per episode")
    sp.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    sp.add_argument("--max-response-tokens", type=int, default=d.max_response_tokens,
                    help="generated + tool tokens per episode")
    sp.add_argument("--tool-timeout", type=float, default=d.tool_timeout, help="seconds per code run")
    sp.add_argument("--tool-memory-mb", type=int, default=d.tool_memory_mb, help="address-space limit of a code run")
    sp.add_argument("--tool-python", default=None, metavar="PATH",
                    help="the interpreter the code runs with, whose libraries the model can import (default: "
                         "the one running eval.py)")
    sp.add_argument("--unsafe-tool-sandbox", action="store_true",
                    help="UNSAFE: run the model's code without the bubblewrap jail (rlimits only: it can read and "
                         "write your files and use the network); recorded in summary.json and summary.md")


def gpqa_config(args) -> GPQAConfig:
    return GPQAConfig(rollouts=args.rollouts, temperature=args.temperature, top_p=args.top_p,
                      max_turns=args.max_turns, max_prompt_tokens=args.max_prompt_tokens,
                      max_response_tokens=args.max_response_tokens, tool_timeout=args.tool_timeout,
                      tool_memory_mb=args.tool_memory_mb, seed=args.seed,
                      tool_python=os.path.abspath(args.tool_python) if args.tool_python else None,
                      unsafe_tool_sandbox=args.unsafe_tool_sandbox)


def check(args):
    if args.inner_adapt:
        raise EvalError("--inner-adapt is not supported for gpqa (the paper's Table 8 is BABILong)")
    if args.chat is False:
        raise EvalError("gpqa runs in the chat template (its tools block and tool turns): drop --no-chat")
    args.chat = True  # whatever the checkpoint: an agent loop has no raw-prompt form
    cfg = gpqa_config(args)
    if cfg.rollouts < 1 or cfg.max_turns < 1 or not 0 < cfg.top_p <= 1 or cfg.temperature < 0:
        raise EvalError("--rollouts and --max-turns must be positive, --top-p in (0, 1], --temperature >= 0")
    if cfg.tool_timeout <= 0 or cfg.tool_memory_mb < 1:
        raise EvalError("--tool-timeout and --tool-memory-mb must be positive")
    why = None if cfg.unsafe_tool_sandbox else sandbox.sandbox_check()
    if why:
        raise EvalError(f"gpqa's code tool needs its sandbox: {why}; or run the model's code unjailed with "
                        "--unsafe-tool-sandbox (see docs/sandbox.md)")
    check_tool_python(cfg)
    gpqa_file(Path(args.data_dir), args.download)


def check_tool_python(cfg: GPQAConfig):
    """The interpreter must start in the sandbox (a pyenv shim or a wrapper script needs files the
    jail does not mount): run one line there."""
    python = cfg.tool_python or sys.executable
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise EvalError(f"--tool-python {python}: no such executable file")
    out = sandbox.run_python("import sys; print(sys.version_info[0])", 60, cfg.tool_memory_mb, python=python,
                             jail=not cfg.unsafe_tool_sandbox)
    if out != "3\n":
        last = (out.strip().splitlines() or ["no output"])[-1]
        raise EvalError(f"--tool-python {python} does not run Python 3 in the tool's sandbox ({last}); pass the "
                        "interpreter itself (python -c 'import sys; print(sys.executable)')")


def evaluate(engine: Engine, out: Path, args, log=print) -> dict:
    return eval_gpqa(engine, out, Path(args.data_dir), gpqa_config(args), args.samples, args.download, log)


def meta(args) -> dict:
    cfg = gpqa_config(args)
    return {**dataclasses.asdict(cfg), "tool_python": cfg.tool_python or sys.executable,
            "tool_sandbox": tool_sandbox(cfg)}
