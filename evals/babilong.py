"""BABILong qa1-qa5 (paper Fig. 4, Table 6; Table 8 with --inner-adapt): prompts, data files, the
official scorer, jobs, the table."""

from pathlib import Path
from typing import Iterable

from evals.common import (
    avg, cell, download, Engine, EvalError, Job, length_tokens, percent, read_records, require_fields, row, run_jobs)

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


def table(name: str, entry: dict) -> list[str]:
    """Table 6 (tasks x lengths); its Average row is Fig. 4 / Table 3."""
    s = entry["scores"]
    tasks = sorted(s, key=lambda t: int(t[2:]))
    lengths = sorted({ln for t in s.values() for ln in t}, key=length_tokens)
    out = ["## BABILong (accuracy %)\n", row(["Task"] + [ln.upper() for ln in lengths]),
           "|---" * (len(lengths) + 1) + "|"]
    for t in tasks:
        out.append(row([t.upper()] + [cell(s[t].get(ln, {}).get("score")) for ln in lengths]))
    out.append(row(["Average"] + [cell(avg([s[t][ln]["score"] for t in tasks if ln in s[t]])) for ln in lengths]))
    return out


# -----------------------------------------------------------------------------
# Entry: what eval.py's registry reads (its Benchmark protocol)

HELP = "BABILong qa1-qa5 (Fig. 4, Table 6)"


def add_flags(sp):
    sp.add_argument("--data-dir", default="eval_data/babilong", help="holds data/qaN/<length>.json")
    sp.add_argument("--download", action="store_true", help="fetch missing files from RMT-team/babilong")
    sp.add_argument("--tasks", nargs="+", default=list(BABILONG_PROMPTS), choices=list(BABILONG_PROMPTS))
    sp.add_argument("--lengths", nargs="+", default=["4k", "8k", "16k", "32k"],
                    help="any of 0k 1k 2k 4k 8k 16k 32k 64k 128k")


def check(args):
    for task in args.tasks:
        for ln in args.lengths:
            length_tokens(ln)
            babilong_file(Path(args.data_dir), task, ln, args.download)  # downloads what is missing


def evaluate(engine: Engine, out: Path, args, log=print) -> dict:
    return eval_babilong(engine, out, Path(args.data_dir), args.tasks, args.lengths, args.samples, args.download, log)


def meta(args) -> dict:
    return {}
