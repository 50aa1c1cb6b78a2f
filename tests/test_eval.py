"""
Tests for eval.py: metrics against hand-computed cases (official quirks included), prompts byte for
byte against the official strings (typed in here again from the protocol notes), RULER generators
(determinism, lengths, answers really in the context), resume, and end-to-end runs of the CLI on a
tiny random checkpoint.
"""

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import eval as ev
from conftest import ROOT, qwen_tokenizer_dir, shared_file

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


# -----------------------------------------------------------------------------
# Stand-ins: a character-level tokenizer and a model that echoes a canned answer


class CharTok:
    """One token per character; '\\x01' is a special token skipped when decoding."""
    default_system = QWEN_SYSTEM
    pad_token_id = 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 1))

    def stop_token_ids(self):
        return [1]


class FakeModel:
    """generate() answers every prompt with `reply` and records what it was asked."""

    def __init__(self, reply="kitchen"):
        self.reply, self.calls, self.prompts = reply, 0, []

    def generate(self, prompts, max_new_tokens, stop_ids, pad_id=0, prefill_chunk=1024, **kw):
        self.calls += 1
        self.prompts += [list(p) for p in prompts]
        return [[ord(c) for c in self.reply][:max_new_tokens] for _ in prompts]


@pytest.fixture(autouse=True)
def fake_models_generate(monkeypatch):
    """model.generate(model, ...) runs a FakeModel's own generate()."""
    real = ev.model_lib.generate

    def generate(model, *args, **kwargs):
        return model.generate(*args, **kwargs) if isinstance(model, FakeModel) else real(model, *args, **kwargs)
    monkeypatch.setattr(ev.model_lib, "generate", generate)


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
    assert ev.compare_answers(target, output, question, LOC) is expected


def test_compare_answers_multi_target_and_qa5_names():
    labels = ["apple", "football", "milk", "nothing"]  # qa8 labels, targets like "apple,milk"
    assert ev.compare_answers("apple,milk", "apple and milk", "What is Mary carrying?", labels) is True
    assert ev.compare_answers("apple,milk", "apple", "What is Mary carrying?", labels) is False
    assert ev.compare_answers("apple,milk", "apple, milk, football", "What is Mary carrying?", labels) is False
    # a comma target of length <= 3 is one label, not a list (the `len(target) > 3` rule)
    assert ev.compare_answers("a,b", "a,b", "?", ["a,b"]) is True
    assert ev.compare_answers("Fred", "fred", "Who did Mary give the apple to?", ev.BABILONG_LABELS["qa5"]) is True
    # "Mary" is in the question, so only "Fred" counts in the answer
    assert ev.compare_answers("Fred", "Mary gave it to Fred", "Who did Mary give the apple to?",
                              ev.BABILONG_LABELS["qa5"]) is True


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
    assert ev.babilong_prompt(task, context, question) == expected


def test_babilong_qa1_prompt_whole_string():
    got = ev.babilong_prompt("qa1", "Daniel went to the office.", "Where is Daniel?")
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
    pytest.importorskip("data")
    assert ev.wrap_prompt("Hi {x}", True, QWEN_SYSTEM) == (
        f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nHi {{x}}<|im_end|>\n<|im_start|>assistant\n")
    assert ev.wrap_prompt("Hi", False, QWEN_SYSTEM) == "Hi"
    engine = ev.Engine(model=None, tok=CharTok(), chat=True)
    assert engine.wrap("Q", " Answer:").endswith("<|im_start|>assistant\n Answer:")  # prefix inside the assistant turn


# -----------------------------------------------------------------------------
# RULER: metric


def test_string_match_all_hand_computed():
    preds = ["The numbers are 1234567 and 7654321.", "none", "ALPHA beta"]
    refs = [["1234567", "7654321", "1111111"], ["x"], ["alpha", "Beta", "gamma", "delta"]]
    # (2/3 + 0 + 2/4) / 3 * 100 = 38.888... -> 38.89
    assert ev.string_match_all(preds, refs) == 38.89
    # partial matches count: a reference inside a longer token is a hit (substring test)
    assert ev.string_match_all(["12345678"], [["1234567"]]) == 100.0
    assert ev.string_match_all(["VAR ABCDE"], [["ABCDE", "FGHIJ"]]) == 50.0


def test_ruler_postprocess():
    assert ev.ruler_postprocess("  a\x00b\tc\x1f \n") == "a\nb\nc"


# -----------------------------------------------------------------------------
# RULER: generators with the real Qwen2.5 tokenizer


@pytest.fixture(scope="module")
def qwen():
    pytest.importorskip("wonderwords", reason="RULER's word lists: pip install -r requirements.txt")
    data = pytest.importorskip("data")
    tok = data.load_tokenizer(qwen_tokenizer_dir())

    def count(text):
        return len(tok.encode(text))

    def wrap(p):
        return ev.wrap_prompt(p, True, tok.default_system)
    return tok, count, wrap


@pytest.fixture(scope="module")
def essay():
    return shared_file("haystack/paul_graham_essays.txt").read_text(encoding="utf-8")


def check_lengths(samples, count, target, budget):
    for s in samples:
        n = count(s["prompt"])
        assert n + budget == s["length"] <= target
    assert max(s["length"] for s in samples) >= 0.9 * target  # the search fills the window


CHAT_HEAD = f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n"


@pytest.mark.parametrize("target,haystack", [(2048, "essay"), (1024, "noise")])
def test_ruler_niah_multivalue(qwen, essay, target, haystack):
    tok, count, wrap = qwen
    text = essay if haystack == "essay" else None
    a = ev.ruler_samples("niah_multivalue", target, 3, 42, count, wrap, text)
    assert a == ev.ruler_samples("niah_multivalue", target, 3, 42, count, wrap, text)  # deterministic
    assert a[0]["prompt"] != ev.ruler_samples("niah_multivalue", target, 1, 7, count, wrap, text)[0]["prompt"]
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
            assert Counter(body)[ev.NOISE] == len(body) - 4


def main_list(prompt):
    """The numbered list of the task (the last one in the prompt) -> words in order."""
    ctx = prompt.split("Memorize the ones that appear most often.\n")[-1].split("\nQuestion:")[0]
    return re.findall(r"(?:^| )\d+\. (.+?)(?= \d+\. |$)", ctx)


@pytest.mark.parametrize("target,freq", [(4096, (30, 3)), (1024, (6, 1))])
def test_ruler_cwe(qwen, target, freq):
    tok, count, wrap = qwen
    a = ev.ruler_samples("cwe", target, 2, 42, count, wrap)
    assert a == ev.ruler_samples("cwe", target, 2, 42, count, wrap)
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
    a = ev.ruler_samples("vt", target, 3, 42, count, wrap)
    assert a == ev.ruler_samples("vt", target, 3, 42, count, wrap)
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


def test_sentence_split_fallback_rejoins_to_the_text():
    text = 'He met Mr. Smith in the U.S. yesterday. "Really?" she asked! J. R. Tolkien wrote it. The end'
    sents = ev.split_sentences(text)
    assert " ".join(sents) == text
    if ev.sentence_splitter_name() == "regex-fallback":
        # like Punkt: '?' and '!' always end a sentence; initials and abbreviations do not
        assert sents == ['He met Mr. Smith in the U.S. yesterday.', '"Really?"', 'she asked!',
                         'J. R. Tolkien wrote it.', 'The end']


# -----------------------------------------------------------------------------
# LongBench: metric, prompts, truncation


def test_normalize_answer_official():
    assert ev.normalize_answer("The Cat's  hat!") == "cats hat"
    assert ev.normalize_answer("an banana, a THEory") == "banana theory"  # articles only as whole words
    assert ev.normalize_answer("U.S.A.") == "usa"


def test_qa_f1_hand_computed():
    # "cat sat" vs "cat sat down": overlap 2, precision 1, recall 2/3 -> F1 0.8
    assert ev.qa_f1_score("the cat sat", "A cat sat down") == pytest.approx(0.8)
    assert ev.qa_f1_score("dog", "cat") == 0
    assert ev.qa_f1_score("", "cat") == 0
    # repeated tokens count with multiplicity (Counter overlap): x 1 + y 1 = 2 of 3 on each side
    assert ev.qa_f1_score("x x y", "x y y") == pytest.approx(2 / 3)
    # max over answers: "paris" vs "paris france" -> 2/3 beats "london" -> 0
    assert ev.longbench_sample_score("Paris.", ["London", "Paris, France"]) == pytest.approx(2 / 3)
    assert ev.longbench_sample_score("Paris", ["paris", "Paris, France"]) == 1.0


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
    assert ev.longbench_prompt(task, rec) == expected
    assert ev.LONGBENCH_TASKS[task]["max_new_tokens"] == {"narrativeqa": 128, "qasper": 128,
                                                          "multifieldqa_en": 64, "hotpotqa": 32}[task]


def test_truncate_middle():
    tok = CharTok()
    assert ev.truncate_middle("abcdefghij", tok, 10) == "abcdefghij"
    assert ev.truncate_middle("abcdefghij", tok, 4) == "abij"
    assert ev.truncate_middle("abcdefghij", tok, 5) == "abij"  # half = int(5 / 2) = 2 on each side


def test_truncate_middle_real_tokenizer(qwen):
    tok, count, _ = qwen
    prompt = "Question first. " + " ".join(f"word{i}" for i in range(3000)) + " Answer:"
    out = ev.truncate_middle(prompt, tok, 500)
    assert out.startswith("Question first. word0") and out.endswith("word2999 Answer:")
    assert abs(count(out) - 500) <= 2


# -----------------------------------------------------------------------------
# Engine: resume, data files, summary


def items_for(n, prompt="P"):
    return [{"index": i, "prompt": f"{prompt}{i}", "refs": {"target": "kitchen"}} for i in range(n)]


def score_target(pred, refs):
    return float(refs["target"] in pred)


def test_resume_skips_finished_samples(tmp_path):
    model = FakeModel("kitchen")
    engine = ev.Engine(model=model, tok=CharTok(), chat=False, batch_size=2)
    items = items_for(5)
    ev.run_task(engine, tmp_path, "qa1", "4k", items[:2], 20, score_target, log=lambda *a: None)
    f = tmp_path / "qa1" / "4k.jsonl"
    assert len(f.read_text().splitlines()) == 2 and model.calls == 1
    with open(f, "a") as fh:  # a crash in the middle of writing the third line
        fh.write('{"index": 2, "prompt_tok')
    model.calls, model.prompts = 0, []
    recs = ev.run_task(engine, tmp_path, "qa1", "4k", items, 20, score_target, log=lambda *a: None)
    assert sorted("".join(map(chr, p)) for p in model.prompts) == ["P2", "P3", "P4"]  # 0 and 1 skipped
    assert [r["index"] for r in recs] == [0, 1, 2, 3, 4] and all(r["score"] == 1.0 for r in recs)
    lines = [json.loads(x) for x in f.read_text().splitlines()]
    assert sorted(r["index"] for r in lines) == [0, 1, 2, 3, 4]
    assert lines[-1].keys() >= {"index", "prompt_tokens", "prediction", "target", "score"}
    model.calls = 0
    ev.run_task(engine, tmp_path, "qa1", "4k", items, 20, score_target, log=lambda *a: None)
    assert model.calls == 0
    with pytest.raises(ev.EvalError, match="different prompt"):  # other settings, same --out
        ev.run_task(engine, tmp_path, "qa1", "4k", items_for(5, "Q"), 20, score_target, log=lambda *a: None)


def test_results_are_keyed_by_index_when_sorted_by_length(tmp_path):
    class Echo(FakeModel):
        def generate(self, prompts, max_new_tokens, stop_ids, pad_id=0, prefill_chunk=1024, **kw):
            self.prompts.append([len(p) for p in prompts])
            return [p[:1] for p in prompts]  # echo the first character
    model = Echo()
    engine = ev.Engine(model=model, tok=CharTok(), chat=False, batch_size=2)
    items = [{"index": i, "prompt": c * (i + 1), "refs": {}} for i, c in enumerate("abcd")]
    recs = ev.run_task(engine, tmp_path, "t", "1", items, 5, lambda p, r: 0.0, log=lambda *a: None)
    assert [r["prediction"] for r in recs] == ["a", "b", "c", "d"]
    assert model.prompts == [[4, 3], [2, 1]]  # longest first


def test_read_records_formats(tmp_path):
    rows = [{"input": "c1", "question": "q1", "target": "t1"}, {"input": "c2", "question": "q2", "target": "t2"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "c.json").write_text(json.dumps({k: {str(i): r[k] for i, r in enumerate(rows)} for k in rows[0]}))
    for name in "abc":
        assert ev.read_records(tmp_path / f"{name}.json") == rows
    (tmp_path / "d.json").write_text('{"input": 1}\n{oops\n')
    with pytest.raises(ev.EvalError, match="d.json:2"):
        ev.read_records(tmp_path / "d.json")


def test_babilong_run_with_stand_ins(tmp_path):
    d = tmp_path / "data" / "data" / "qa1"
    d.mkdir(parents=True)
    rows = [{"input": "Mary went to the kitchen.", "question": "Where is Mary?", "target": "kitchen"},
            {"input": "John went to the garden.", "question": "Where is John?", "target": "garden"}]
    (d / "0k.json").write_text(json.dumps(rows))
    model = FakeModel("kitchen. The most recent")  # 20 new tokens = 20 characters here
    engine = ev.Engine(model=model, tok=CharTok(), chat=False)
    scores = ev.eval_babilong(engine, tmp_path / "out", tmp_path / "data", ["qa1"], ["0k"], log=lambda *a: None)
    assert scores == {"qa1": {"0k": {"score": 50.0, "n": 2}}}
    assert "".join(map(chr, model.prompts[0])) == ev.babilong_prompt("qa1", rows[0]["input"], rows[0]["question"])
    with pytest.raises(ev.EvalError, match="--download"):
        ev.eval_babilong(engine, tmp_path / "out", tmp_path / "data", ["qa2"], ["0k"], log=lambda *a: None)


def test_longbench_run_with_stand_ins(tmp_path):
    (tmp_path / "data").mkdir()
    rows = [{"context": "x" * 500, "input": "Where?", "answers": ["the Paris", "Lyon"]},
            {"context": "short", "input": "Who?", "answers": ["Bob"]}]
    (tmp_path / "data" / "hotpotqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    model = FakeModel("Paris, France")
    engine = ev.Engine(model=model, tok=CharTok(), chat=False)
    scores = ev.eval_longbench(engine, tmp_path / "out", tmp_path, ["hotpotqa"], max_length=300,
                               log=lambda *a: None)
    # F1("paris france", "paris") = 2/3 on the first sample, 0 on the second -> 33.33
    assert scores == {"hotpotqa": {"300": {"score": 33.33, "n": 2}}}
    sent = sorted(("".join(map(chr, p)) for p in model.prompts), key=len)
    assert sent[0] == ev.longbench_prompt("hotpotqa", rows[1])  # short: untouched
    full = ev.longbench_prompt("hotpotqa", rows[0])
    assert sent[1] == full[:150] + full[-150:]  # long: middle-truncated to 2 x 150 characters


def test_longbench_download_extracts_the_qa_files(tmp_path, monkeypatch):
    import zipfile

    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("data/hotpotqa.jsonl", '{"context": "c", "input": "q", "answers": ["a"]}\n')
        z.writestr("data/qasper.jsonl", "{}\n")
        z.writestr("data/lcc.jsonl", "{}\n")
    asked = []
    monkeypatch.setattr(ev, "download", lambda repo, name, local_dir=None: asked.append((repo, name)) or archive)
    path = ev.longbench_file(tmp_path / "lb", "hotpotqa", fetch=True)
    assert asked == [("THUDM/LongBench", "data.zip")]
    assert path == tmp_path / "lb" / "data" / "hotpotqa.jsonl" and ev.read_records(path)[0]["answers"] == ["a"]
    assert sorted(f.name for f in path.parent.iterdir()) == ["hotpotqa.jsonl", "qasper.jsonl"]  # QA files only


def test_demo_prompt_drops_the_reference_reply(tmp_path):
    data = pytest.importorskip("data")
    conv = {"messages": [{"role": "user", "content": "Where is Ivy?"},
                         {"role": "assistant", "content": "", "tool_calls": [{"name": "roster", "arguments": {}}]},
                         {"role": "tool", "content": "Ivy, Oslo"},
                         {"role": "assistant", "content": "Ivy is in Oslo."}],
            "tools": [{"type": "function", "function": {"name": "roster", "parameters": {}}}], "answer": "Oslo"}
    (tmp_path / "h.jsonl").write_text(json.dumps(conv) + "\n")
    model = FakeModel("In Oslo")
    engine = ev.Engine(model=model, tok=CharTok(), chat=True)
    scores = ev.eval_demo(engine, tmp_path / "out", tmp_path / "h.jsonl", log=lambda *a: None)
    assert scores == {"demo": {"heldout": {"score": 100.0, "n": 1}}}
    expected, _ = data.render_chat(conv["messages"][:-1], tools=conv["tools"], add_generation_prompt=True)
    assert "".join(map(chr, model.prompts[0])) == expected
    assert expected.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_summary_tables(tmp_path):
    ev.update_summary(tmp_path, "babilong", "ckpt", {"qa1": {"4k": {"score": 80.0, "n": 100}},
                                                     "qa2": {"4k": {"score": 60.0, "n": 100},
                                                             "16k": {"score": 30.0, "n": 100}}}, {})
    ev.update_summary(tmp_path, "ruler", "ckpt", {"cwe": {"4096": {"score": 97.8, "n": 500}},
                                                  "vt": {"4096": {"score": 100.0, "n": 500}}}, {"haystack": "noise"})
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["babilong"]["scores"]["qa2"]["16k"]["score"] == 30.0 and "ruler" in s
    md = (tmp_path / "summary.md").read_text()
    assert "| Task | 4K | 16K |" in md
    assert "| QA1 | 80.0 | – |" in md and "| Average | 70.0 | 30.0 |" in md
    assert "| Model | CWE 4K | VT 4K | Avg@4K |" in md and "| ckpt | 97.8 | 100.0 | 98.9 |" in md


# -----------------------------------------------------------------------------
# End to end: the CLI on a tiny random checkpoint


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    model_lib = pytest.importorskip("model")
    data = pytest.importorskip("data")
    import torch

    torch.manual_seed(0)
    m = model_lib.Qwen2(model_lib.Qwen2Config(**model_lib.TINY))
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    m.save_pretrained(path, extra_files=data.byte_tokenizer().files())
    return path


def run_cli(*argv, env=None):
    """The CLI in a fresh process (for what must not leak between tests, like HF_HUB_OFFLINE)."""
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)


def cli(capsys, *argv):
    """The CLI in this process (no second torch import) -> (exit code, stdout, stderr)."""
    try:
        ev.main([str(a) for a in argv])
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
    pytest.importorskip("focusft")
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
        assert recs[0]["prompt_tokens"] > len(ev.babilong_prompt("qa2", rows[0]["input"], rows[0]["question"]))
        assert json.loads((out / "summary.json").read_text())["babilong"]["meta"]["inner_adapt"] == bool(extra)


def test_ruler_end_to_end_byte_tokenizer(tiny_ckpt, tmp_path, capsys, monkeypatch):
    pytest.importorskip("wonderwords", reason="RULER's word lists: pip install -r requirements.txt")
    # a shorter generation budget keeps this wiring test fast; the sizing logic follows it
    monkeypatch.setitem(ev.RULER_TASKS["niah_multivalue"], "tokens_to_generate", 8)
    out = tmp_path / "out"
    code, _, err = cli(capsys, "ruler", "--model", tiny_ckpt, "--tasks", "niah_multivalue", "--lengths", 2048,
                       "--samples", 1, "--out", out, "--no-chat")
    assert code == 0, err
    recs = [json.loads(x) for x in (out / "niah_multivalue" / "2048.jsonl").read_text().splitlines()]
    assert len(recs) == 1 and len(recs[0]["references"]) == 4 and recs[0]["prompt_tokens"] + 8 <= 2048
    summary = json.loads((out / "summary.json").read_text())["ruler"]
    assert summary["meta"]["haystack"] == "noise" and summary["meta"]["chat"] is False
    assert "| Model | NIAH-MV 2K | Avg@2K |" in (out / "summary.md").read_text()


def test_chat_default_follows_the_tokenizer_template(tiny_ckpt, tmp_path):
    import shutil

    data = pytest.importorskip("data")
    assert ev.load_engine(tiny_ckpt, log=lambda *a: None).chat is True  # instruct template
    base = tmp_path / "base"
    shutil.copytree(tiny_ckpt, base)
    tok = data.byte_tokenizer()
    tok.default_system = data.BASE_SYSTEM  # a base model's template: "You are a helpful assistant."
    for name, text in tok.files().items():
        (base / name).write_text(text)
    e = ev.load_engine(base, log=lambda *a: None)
    assert e.chat is False and e.wrap("Q", " A:") == "Q A:"
    assert ev.load_engine(base, chat=True, log=lambda *a: None).wrap("Q").startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ<|im_end|>")


def test_inner_adapt_wiring(tmp_path, monkeypatch):
    import torch

    focusft = pytest.importorskip("focusft")
    (tmp_path / "focusft.json").write_text(json.dumps(
        {"inner_lr": 0.5, "lora_rank": 8, "lora_alpha": 32.0, "layer_fraction": 0.5, "lr": 1e-5}))
    cfg = ev.load_focus_config(tmp_path, log=lambda *a: None)
    assert (cfg.inner_lr, cfg.lora_rank, cfg.lora_alpha, cfg.layer_fraction) == (0.5, 8, 32.0, 0.5)
    calls = []

    def fake_adapt(model, input_ids, attention_mask, cfg_, generator, steps=1):
        calls.append((input_ids.shape, bool(attention_mask.all()), cfg_, steps, torch.is_grad_enabled()))
        return {"fast": len(calls)}

    monkeypatch.setattr(focusft, "adapt_on_prompt", fake_adapt)

    class Model(FakeModel):
        def parameters(self):
            return iter([torch.zeros(1)])

        def generate(self, prompts, max_new_tokens, stop_ids, pad_id=0, prefill_chunk=1024, **kw):
            self.prompts.append((len(prompts), kw))
            return [[ord("x")] for _ in prompts]

    model = Model()
    engine = ev.Engine(model=model, tok=CharTok(), chat=False, batch_size=2, focus_cfg=cfg)
    assert engine.generate([[5, 6, 7], [8, 9]], 4, seeds=[1, 2]) == ["x", "x"]
    # one prompt at a time, each with its own fast weights, scaled by alpha / rank
    assert [c[0] for c in calls] == [(1, 3), (1, 2)] and all(c[1] and c[3] == 1 and c[4] for c in calls)
    assert model.prompts == [(1, {"fast_weights": {"fast": 1}, "fast_scale": 4.0}),
                             (1, {"fast_weights": {"fast": 2}, "fast_scale": 4.0})]
    (tmp_path / "focusft.json").write_text(json.dumps({"method": "bogus"}))
    with pytest.raises(ev.EvalError, match="focusft.json"):
        ev.load_focus_config(tmp_path, log=lambda *a: None)


def test_out_dir_is_pinned_to_one_checkpoint(tmp_path):
    ev.check_run(tmp_path, {"model": "/ckpt/a", "inner_adapt": False})
    ev.check_run(tmp_path, {"model": "/ckpt/a", "inner_adapt": False})  # same run: resumes
    with pytest.raises(ev.EvalError, match="another --out"):
        ev.check_run(tmp_path, {"model": "/ckpt/b", "inner_adapt": False})
    with pytest.raises(ev.EvalError, match="inner_adapt"):
        ev.check_run(tmp_path, {"model": "/ckpt/a", "inner_adapt": True})


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
    import model as M

    torch = pytest.importorskip("torch")
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
    import data

    torch = pytest.importorskip("torch")
    m = planted_sink_model()
    runs = [(0, 20), (1, 10), (0, 10), (1, 10)]  # (loss_mask, length): context, response, tool output, response
    loss_mask = [v for v, n in runs for _ in range(n)]
    segments = ([data.SEG_SYSTEM_USER] * 20 + [data.SEG_RESPONSE] * 10 + [data.SEG_TOOL] * 10
                + [data.SEG_RESPONSE] * 10)
    ids = [0] + torch.randint(1, 32, (49,), generator=torch.Generator().manual_seed(1)).tolist()
    sample = data.Sample(input_ids=ids, loss_mask=loss_mask, segments=segments)
    result = ev.analyze(m, [sample], heatmap_layer=1)
    for name in ev.ANALYSIS_MASKS:
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
    torch = pytest.importorskip("torch")
    import data
    import model as M

    m = M.Qwen2(M.Qwen2Config(**M.TINY))
    m.save_pretrained(tmp_path / "ckpt", extra_files=data.byte_tokenizer().files())
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "analyze", "--model", str(tmp_path / "ckpt"),
                        "--index", "0", "1", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "out" / "analysis" / "analysis.json").read_text())
    assert res["index"] == [0, 1] and len(res["causal"]["layers"]) == M.TINY["num_hidden_layers"]
    assert "causal mask: sink" in r.stdout and "| mean |" in r.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "eval.py"), "analyze", "--model", str(tmp_path / "ckpt"),
                          "--index", "100000", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         cwd=ROOT)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
