"""Tests for data.py: rendering vs transformers' apply_chat_template with the real Qwen2.5 template,
token ids vs the real tokenizer, loss masks, bad input, truncation, parquet vs JSONL, sources
(directories, globs, hub datasets from an offline cache), batching."""

import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
import data

import conftest
from conftest import qwen_tokenizer_dir

# -----------------------------------------------------------------------------
# A varied set of conversations

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city — °C.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}}

CASES = {
    "plain": ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], None),
    "system_first": ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                      {"role": "assistant", "content": "6"}], None),
    "system_not_first": ([{"role": "user", "content": "a"}, {"role": "system", "content": "New rule: shout."},
                          {"role": "assistant", "content": "OK!"}], None),
    "tools_two_calls_one_turn": ([
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Oslo and Lima?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lima"}}}]},
        {"role": "tool", "content": "Oslo: 3°C"}, {"role": "tool", "content": "Lima: 19°C"},
        {"role": "assistant", "content": "Oslo 3°C, Lima 19°C."}], [WEATHER, SEARCH]),
    "content_plus_calls_default_system": ([
        {"role": "user", "content": "Search it"},
        {"role": "assistant", "content": "Sure, searching.", "tool_calls": [{"name": "search", "arguments": {}}]},
        {"role": "tool", "content": "[]"}, {"role": "assistant", "content": "Nothing found."}], [SEARCH]),
    "string_arguments": ([
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "n": [1, 2.5, null]}'}}]},
        {"role": "tool", "content": "{\"temp\": -2}"}, {"role": "assistant", "content": "It is -2 °C."}], [WEATHER]),
    "unicode": ([{"role": "user", "content": "日本語で答えて 🙂 — naïve café\u0301"},
                 {"role": "assistant", "content": "はい、わかりました。 🎉\n\n  indented\tline"}], None),
    "consecutive_tools_sequential": ([
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "search", "arguments": {"q": "a"}}]},
        {"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"}, {"role": "tool", "content": "r3"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "search", "arguments": {"q": "b"}}]},
        {"role": "tool", "content": "r4"},
        {"role": "assistant", "content": "done"}], [SEARCH]),
    "response_starts_with_newline": ([{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "\n\nok"}], None),
    "prompt_ends_with_tool": ([
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "search", "arguments": {}}]},
        {"role": "tool", "content": "result"}], [SEARCH]),
    "tool_first_and_empty_tools": ([{"role": "tool", "content": "orphan"}, {"role": "user", "content": "?"},
                                    {"role": "assistant", "content": "!"}], []),
}


def plain_messages(messages):
    """What the jinja template expects: string content, arguments as objects (an independent rewrite)."""
    out = copy.deepcopy(messages)
    for m in out:
        if isinstance(m.get("content"), list):
            m["content"] = "".join(p["text"] for p in m["content"])
        for c in m.get("tool_calls") or []:
            f = c.get("function", c)
            if isinstance(f["arguments"], str):
                f["arguments"] = json.loads(f["arguments"])
    return out


def supervised_by_offsets(text, offsets, spans):
    """Brute-force reference for the loss mask: a token is supervised iff its first character lies in a span."""
    return [int(any(s <= start < e for s, e in spans)) for start, _ in offsets]


# -----------------------------------------------------------------------------
# Oracles: transformers + the real Qwen2.5 tokenizer


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle for the chat template")
    return transformers.AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))


@pytest.fixture(scope="module")
def qwen():
    return data.load_tokenizer(qwen_tokenizer_dir())


def test_real_tokenizer_found_in_the_hub_cache_without_shared(tmp_path, monkeypatch):
    """Without ../shared the tests take the real tokenizer from the Hugging Face hub cache."""
    src = qwen_tokenizer_dir()
    files = {f: (src / f).read_bytes() for f in conftest.QWEN_TOKENIZER_FILES}
    conftest.make_hub_cache(tmp_path / "hub", conftest.QWEN_TOKENIZER_REPO, files)
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(conftest, "SHARED", tmp_path / "no-shared")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found, why = conftest._qwen_tokenizer_dir.__wrapped__()
    assert found is not None, why
    assert found.is_relative_to(tmp_path / "hub")
    assert data.load_tokenizer(found).encode("Hello") == data.load_tokenizer(src).encode("Hello")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    found, why = conftest._qwen_tokenizer_dir.__wrapped__()
    assert found is None and "LocalEntryNotFound" in why  # offline, not cached: a reason, no network wait


def test_template_constant_is_the_released_one():
    config = json.loads((qwen_tokenizer_dir() / "tokenizer_config.json").read_text())
    assert data.QWEN25_CHAT_TEMPLATE == config["chat_template"]


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_render_matches_apply_chat_template(hf_tok, name, gen):
    messages, tools = CASES[name]
    ref = hf_tok.apply_chat_template(plain_messages(messages), tools=tools, tokenize=False, add_generation_prompt=gen)
    text, spans = data.render_chat(messages, tools, add_generation_prompt=gen)
    assert text == ref
    # Every span is one assistant turn's body: it follows a header and ends with "<|im_end|>\n".
    assert len(spans) == sum(m["role"] == "assistant" for m in messages)
    for s, e in spans:
        assert text[:s].endswith("<|im_start|>assistant\n") and text[s:e].endswith("<|im_end|>\n")
        assert "<|im_start|>" not in text[s:e]


def test_base_template_default_system(hf_tok):
    base = data.QWEN25_CHAT_TEMPLATE.replace(data.INSTRUCT_SYSTEM, data.BASE_SYSTEM)
    assert base.count(data.BASE_SYSTEM) == 2 and "Qwen" not in base
    for name in ("plain", "content_plus_calls_default_system"):
        messages, tools = CASES[name]
        ref = hf_tok.apply_chat_template(plain_messages(messages), tools=tools, tokenize=False, chat_template=base)
        text, _ = data.render_chat(messages, tools, default_system=data.BASE_SYSTEM)
        assert text == ref and data.INSTRUCT_SYSTEM not in text


def test_string_arguments_are_parsed_not_double_encoded(hf_tok):
    messages, tools = CASES["string_arguments"]
    text, _ = data.render_chat(messages, tools)
    assert '"arguments": {"city": "Zürich", "n": [1, 2.5, null]}' in text
    # What the unpatched template does with the raw string (the silent bug we avoid):
    raw = hf_tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert '"arguments": "{\\"city\\"' in raw and raw != text


def test_content_parts_are_joined():
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Hi"}]}]
    joined = [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hi"}]
    assert data.render_chat(parts) == data.render_chat(joined)


@pytest.mark.parametrize("name", sorted(CASES))
def test_ids_and_mask_real_tokenizer(hf_tok, qwen, name):
    messages, tools = CASES[name]
    text, spans = data.render_chat(messages, tools)
    sample = data.encode_chat(qwen, messages, tools)
    # ids: the real tokenizer encoding the whole rendered string, in one go
    assert sample.input_ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    enc = qwen.tk.encode(text, add_special_tokens=False)
    assert sample.loss_mask == supervised_by_offsets(text, enc.offsets, spans)
    assert len(sample.segments) == len(sample.input_ids)
    assert all((g == data.SEG_RESPONSE) == bool(m) for g, m in zip(sample.segments, sample.loss_mask))


def test_mask_hand_checked_real_tokenizer(qwen):
    im_start, im_end, nl = 151644, 151645, 198
    # plain turn: supervised = "Hello!<|im_end|>\n", not the header
    s = data.encode_chat(qwen, *CASES["plain"])
    sup = [t for t, m in zip(s.input_ids, s.loss_mask) if m]
    assert qwen.decode(sup, skip_special_tokens=False) == "Hello!<|im_end|>\n" and sup[-2:] == [im_end, nl]
    i = len(s.input_ids) - len(sup)
    assert s.input_ids[i - 3:i] == [im_start, qwen.encode("assistant")[0], nl] and s.loss_mask[i - 3:i] == [0, 0, 0]
    assert s.segments[i - 3:i] == [data.SEG_ASSISTANT_HEADER] * 3
    # response starting with newlines: the header "\n" and the response's "\n\n" merge into one
    # token "\n\n\n" that starts in the header -> context; the rest "ok<|im_end|>\n" is supervised.
    s = data.encode_chat(qwen, *CASES["response_starts_with_newline"])
    sup = [t for t, m in zip(s.input_ids, s.loss_mask) if m]
    assert qwen.decode(sup, skip_special_tokens=False) == "ok<|im_end|>\n"
    j = s.loss_mask.index(1)
    assert qwen.decode(s.input_ids[j - 1:j], skip_special_tokens=False) == "\n\n\n"
    assert s.segments[j - 1] == data.SEG_ASSISTANT_HEADER
    # tool-call turn without content: supervised starts at <tool_call> (id 151657)
    s = data.encode_chat(qwen, *CASES["prompt_ends_with_tool"])
    sup = [t for t, m in zip(s.input_ids, s.loss_mask) if m]
    assert sup[0] == 151657
    assert qwen.decode(sup, skip_special_tokens=False) == \
        '<tool_call>\n{"name": "search", "arguments": {}}\n</tool_call><|im_end|>\n'


def test_mask_hand_checked_byte_tokenizer():
    bt = data.byte_tokenizer()
    # with one token per byte nothing straddles: the leading newlines are supervised
    s = data.encode_chat(bt, *CASES["response_starts_with_newline"])
    sup = [t for t, m in zip(s.input_ids, s.loss_mask) if m]
    assert bt.decode(sup, skip_special_tokens=False) == "\n\nok<|im_end|>\n"
    # multi-byte characters: every byte of a supervised character is supervised
    s = data.encode_chat(bt, *CASES["unicode"])
    sup = [t for t, m in zip(s.input_ids, s.loss_mask) if m]
    assert bt.decode(sup, skip_special_tokens=False) == CASES["unicode"][0][1]["content"] + "<|im_end|>\n"


def test_segments_hand_checked():
    bt = data.byte_tokenizer()
    messages, tools = CASES["tools_two_calls_one_turn"]
    text, _ = data.render_chat(messages, tools)
    s = data.encode_chat(bt, messages, tools)
    # decode each segment's tokens (byte tokenizer: tokens are contiguous and in order)
    runs, prev = [], None
    for t, g in zip(s.input_ids, s.segments):
        if g != prev:
            runs.append((g, []))
            prev = g
        runs[-1][1].append(t)
    got = [(data.SEGMENT_NAMES[g], bt.decode(ids, skip_special_tokens=False)) for g, ids in runs]
    system_end = text.index("<|im_start|>assistant")
    tool_start = text.index("<|im_start|>user\n<tool_response>")
    expected = [
        ("system/user", text[:system_end]),
        ("assistant header", "<|im_start|>assistant\n"),
        ("response", text[system_end + 22:tool_start]),
        ("tool", "<|im_start|>user\n<tool_response>\nOslo: 3°C\n</tool_response>\n<tool_response>\nLima: 19°C\n"
                 "</tool_response><|im_end|>\n"),
        ("assistant header", "<|im_start|>assistant\n"),
        ("response", "Oslo 3°C, Lima 19°C.<|im_end|>\n"),
    ]
    assert got == expected
    assert expected[2][1].startswith("<tool_call>\n") and expected[2][1].endswith("</tool_call><|im_end|>\n")


# -----------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer():
    bt = data.byte_tokenizer()
    assert bt.tk.get_vocab_size() == data.BYTE_VOCAB_SIZE == 261
    text = "aZ ~\n\t\x00é€😀"
    assert bt.encode(text) == list(text.encode("utf-8"))  # id == byte value
    assert bt.decode(bt.encode(text)) == text
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
    assert [bt.tk.token_to_id(n) for n in names] == [256, 257, 258, 259, 260]
    assert (bt.eos_token_id, bt.pad_token_id, bt.default_system) == (258, 256, data.INSTRUCT_SYSTEM)
    assert bt.stop_token_ids() == [258, 256]
    ids = bt.encode("<|im_start|>x<tool_call>y<|im_end|>")
    assert ids == [257, 120, 259, 121, 258]
    assert bt.decode(ids) == "x<tool_call>y"  # tool-call tokens are not special: kept, as in Qwen2.5
    import tokenizers
    assert set(data._byte_alphabet()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())


def test_load_real_tokenizer(qwen):
    assert (qwen.eos_token_id, qwen.pad_token_id) == (151645, 151643)
    assert qwen.default_system == data.INSTRUCT_SYSTEM
    assert qwen.stop_token_ids() == [151645, 151643]
    assert qwen.encode("user\n\nHi") != qwen.encode("user\n") + qwen.encode("\nHi")  # why we encode once


def test_load_tokenizer_base_variant_and_errors(tmp_path):
    bt = data.byte_tokenizer()
    (tmp_path / "tokenizer.json").write_text(bt.tk.to_str())
    base = data.QWEN25_CHAT_TEMPLATE.replace(data.INSTRUCT_SYSTEM, data.BASE_SYSTEM)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|endoftext|>"}, "pad_token": "<|endoftext|>", "chat_template": base}))
    tok = data.load_tokenizer(tmp_path)
    assert (tok.default_system, tok.eos_token_id, tok.pad_token_id) == (data.BASE_SYSTEM, 256, 256)
    # chat_template.jinja (transformers >= 4.43) wins over the config's copy
    (tmp_path / "chat_template.jinja").write_text(data.QWEN25_CHAT_TEMPLATE)
    assert data.load_tokenizer(tmp_path).default_system == data.INSTRUCT_SYSTEM
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(data.DataError, match="eos_token '<nope>' is not in the vocabulary"):
        data.load_tokenizer(tmp_path)
    with pytest.raises(data.DataError, match="no tokenizer.json"):
        data.load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("which", ["byte", "qwen"])
def test_files_load_in_transformers_and_round_trip(tmp_path, which):
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle for saved tokenizers")
    tok = data.byte_tokenizer() if which == "byte" else data.load_tokenizer(qwen_tokenizer_dir())
    for name, content in tok.files().items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.eos_token_id, hf.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    back = data.load_tokenizer(tmp_path)
    assert (back.eos_token_id, back.pad_token_id, back.default_system) == \
        (tok.eos_token_id, tok.pad_token_id, tok.default_system)
    for name in ("tools_two_calls_one_turn", "unicode", "string_arguments"):
        messages, tools = CASES[name]
        text, _ = data.render_chat(messages, tools, add_generation_prompt=True, default_system=tok.default_system)
        assert hf.apply_chat_template(plain_messages(messages), tools=tools, tokenize=False,
                                      add_generation_prompt=True) == text
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text) == back.encode(text)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)


# -----------------------------------------------------------------------------
# Bad input: file:line and what is wrong

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def user_then(assistant):
    return {"messages": [{"role": "user", "content": "q"}, assistant]}


BAD_LINES = {
    "invalid_json": ('{"messages": [', "invalid JSON"),
    "not_object": ("[1, 2]", "expected a JSON object"),
    "missing_messages": (json.dumps({"tools": []}), "missing 'messages'"),
    "empty_messages": (json.dumps({"messages": []}), "'messages' is empty"),
    "messages_not_list": (json.dumps({"messages": "hi"}), "'messages' must be a list, got a string"),
    "unknown_role": (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "unknown role 'bot'"),
    "missing_role": (json.dumps({"messages": [{"content": "x"}]}), "missing 'role'"),
    "content_wrong_type": (json.dumps({"messages": [{"role": "user", "content": 5}]}),
                           "message 0 (user): content must be a string or a list of text parts, got a number"),
    "content_missing": (json.dumps({"messages": [{"role": "user"}]}), "message 0 (user): missing 'content'"),
    "image_part": (json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}]}),
                   "content part 0 has type 'image', only text is supported"),
    "assistant_empty": (json.dumps(user_then({"role": "assistant", "content": ""})),
                        "message 1 (assistant): assistant turn has neither content nor tool_calls"),
    "assistant_null_no_calls": (json.dumps(user_then({"role": "assistant", "content": None, "tool_calls": []})),
                                "assistant turn has neither content nor tool_calls"),
    "tool_calls_not_list": (json.dumps(user_then({"role": "assistant", "tool_calls": {"name": "f"}})),
                            "'tool_calls' must be a list, got an object"),
    "call_without_name": (json.dumps(user_then({"role": "assistant", "tool_calls": [{"arguments": {}}]})),
                          "tool call 0: 'name' must be a non-empty string"),
    "call_without_arguments": (json.dumps(user_then({"role": "assistant", "tool_calls": [{"name": "f"}]})),
                               "tool call 0 (f): missing 'arguments'"),
    "arguments_bad_json_string": (json.dumps(user_then({"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{city: Oslo}"}}]})),
        "'arguments' is a string but not valid JSON"),
    "arguments_list": (json.dumps(user_then({"role": "assistant", "tool_calls": [{"name": "f", "arguments": [1]}]})),
                       "'arguments' must be a JSON object (or a string holding one), got a list"),
    "tool_calls_on_user": (json.dumps({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"name": "f", "arguments": {}}]}]}), "only assistant messages may have 'tool_calls'"),
    "tools_not_list": (json.dumps({**GOOD, "tools": {"name": "f"}}), "'tools' must be a list of objects"),
}


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_bad_input_names_file_line_and_problem(tmp_path, name):
    line, message = BAD_LINES[name]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n" + json.dumps(GOOD) + "\n")  # bad line is line 3
    with pytest.raises(data.DataError) as e:
        data.load_dataset(path, data.byte_tokenizer(), log=lambda s: None)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)


def test_bad_files(tmp_path):
    bt = data.byte_tokenizer()
    with pytest.raises(data.DataError, match="no such file"):
        data.load_dataset(tmp_path / "nope.jsonl", bt)
    for content in ("", "\n  \n"):
        (tmp_path / "empty.jsonl").write_text(content)
        with pytest.raises(data.DataError, match="empty.jsonl: file is empty"):
            data.load_dataset(tmp_path / "empty.jsonl", bt)
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n\xe9\n")
    with pytest.raises(data.DataError, match="latin1.jsonl:2: not valid UTF-8"):
        data.load_dataset(tmp_path / "latin1.jsonl", bt)
    nosup = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "no answer"}]}
    (tmp_path / "nosup.jsonl").write_text(json.dumps(nosup) + "\n" + json.dumps(nosup) + "\n")
    logs = []
    with pytest.raises(data.DataError, match="nosup.jsonl: no supervised token in any conversation"):
        data.load_dataset(tmp_path / "nosup.jsonl", bt, log=logs.append)
    assert "dropped 2 (0 too long, 2 without supervised tokens)" in logs[0]
    with pytest.raises(data.DataError, match="render_chat: message 1 \\(assistant\\): assistant turn has neither"):
        data.render_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}])


def test_extra_keys_ignored(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({**GOOD, "answer": "yo", "id": 7}) + "\n")
    (s,) = data.load_dataset(path, data.byte_tokenizer(), log=lambda s: None)
    assert s == data.encode_chat(data.byte_tokenizer(), GOOD["messages"])


def run_cli(capsys, *args):
    """data.main in-process (fast); returns (exit code, stdout, stderr)."""
    code = 0
    try:
        data.main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_errors_and_show(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    expected = f"error: {bad}:2: message 0: unknown role 'robot' (expected one of system, user, assistant, tool)"
    # once for real, as a user runs it: exit status 2, one line, no traceback
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "stats", "--data", str(bad)],
                       capture_output=True, text=True, cwd=ROOT)
    assert (r.returncode, r.stderr.strip(), r.stdout) == (2, expected, "")
    assert run_cli(capsys, "show", "--data", str(bad)) == (2, "", expected + "\n")
    code, _, err = run_cli(capsys, "stats", "--data", str(bad), "--tokenizer", str(tmp_path / "nowhere"))
    assert code == 2 and err.startswith("error: ") and "no tokenizer.json" in err
    good = tmp_path / "good.jsonl"
    messages, tools = CASES["tools_two_calls_one_turn"]
    good.write_text(json.dumps({"messages": messages, "tools": tools}) + "\n")
    code, out, err = run_cli(capsys, "show", "--data", str(good), "--index", "0")
    assert code == 0, err
    text, spans = data.render_chat(messages, tools)
    body = out.split("\n", 1)[1]  # after the header line; not a terminal -> brackets
    assert body.replace("⟦", "").replace("⟧", "") == text
    assert [p.split("⟧")[0] for p in body.split("⟦")[1:]] == [text[s:e] for s, e in spans]
    code, _, err = run_cli(capsys, "show", "--data", str(good), "--index", "1")
    assert code == 2 and "out of range" in err
    code, out, _ = run_cli(capsys, "stats", "--data", str(good))
    assert code == 0 and "kept 1 (truncated 0)" in out and "tool calls 2" in out


# -----------------------------------------------------------------------------
# Truncation


def long_conversation(n_words, answer):
    return {"messages": [{"role": "user", "content": " ".join(["word"] * n_words)},
                         {"role": "assistant", "content": answer}]}


def test_truncation_policies(tmp_path):
    bt = data.byte_tokenizer()
    convs = [long_conversation(5, "short"), long_conversation(40, "a medium answer"), long_conversation(150, "x" * 30)]
    full = [data.encode_chat(bt, c["messages"]) for c in convs]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in convs))
    L = len(full[1].input_ids) - 3  # conversation 0 fits; 1 and 2 are too long
    assert len(full[0].input_ids) <= L

    logs = []
    right = data.load_dataset(path, bt, max_length=L, truncation="right", log=logs.append)
    # right: conversation 1 keeps part of its answer; conversation 2 loses it all -> dropped and counted
    assert len(right) == 2 and right[0] == full[0]
    assert right[1].input_ids == full[1].input_ids[:L] and right[1].loss_mask == full[1].loss_mask[:L]
    assert "kept 2 (truncated 1) | dropped 1 (0 too long, 1 without supervised tokens)" in logs[-1]

    left = data.load_dataset(path, bt, max_length=L, truncation="left", log=logs.append)
    assert [len(s.input_ids) for s in left] == [len(full[0].input_ids), L, L]
    for s, f in zip(left[1:], full[1:]):
        assert s.input_ids == f.input_ids[-L:] and s.segments == f.segments[-L:]
        assert s.loss_mask == [0] + f.loss_mask[-L + 1:]  # the first token can never be a target
    assert "kept 3 (truncated 2) | dropped 0" in logs[-1]

    drop = data.load_dataset(path, bt, max_length=L, truncation="drop", log=logs.append)
    assert drop == [full[0]] and "dropped 2 (2 too long, 0 without" in logs[-1]

    with pytest.raises(data.DataError, match=f"t.jsonl:2: {len(full[1].input_ids)} tokens is longer than max_length={L}"):
        data.load_dataset(path, bt, max_length=L, truncation="error")
    with pytest.raises(data.DataError, match="unknown truncation policy 'middle'"):
        data.load_dataset(path, bt, truncation="middle")
    assert all(len(s.input_ids) <= L for s in right + left + drop)


# -----------------------------------------------------------------------------
# Parquet, directories, globs, hub datasets


def arrow_table(rows):
    """Rows -> an Arrow table, one type inferred per column (as `datasets` does), missing keys null."""
    pa = pytest.importorskip("pyarrow")
    columns = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist takes the first row's keys only
    return pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows])


def write_parquet(path, rows):
    table = arrow_table(rows)
    import pyarrow.parquet as pq
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return Path(path)


def parquet_bytes(rows):
    table = arrow_table(rows)
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def read_parquet_rows(path):
    import pyarrow.parquet as pq
    return pq.read_table(path).to_pylist()


def write_jsonl(path, rows):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return Path(path)


def quiet(*args, **kwargs):
    return data.load_dataset(*args, log=lambda s: None, **kwargs)


# Two files, each with one type per column: object arguments in one, JSON-string arguments in the other
# (a column cannot hold both). Within a file every tool call has the same argument keys, so the
# columns' merged struct types add nothing but null `tool_calls` to messages without calls.
STRUCT_ROWS = [{"messages": CASES[n][0]} for n in ("plain", "system_first", "system_not_first", "unicode",
                                                   "response_starts_with_newline")]
STRUCT_ROWS.insert(3, {"messages": CASES["tools_two_calls_one_turn"][0], "tools": [WEATHER]})
STRING_ROWS = [{"messages": CASES["string_arguments"][0], "tools": CASES["string_arguments"][1]},
               {"messages": [{"role": "user", "content": "Find it"},
                             {"role": "assistant", "content": None, "tool_calls": [
                                 {"type": "function", "function": {"name": "search", "arguments": "{}"}}]},
                             {"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"},
                             {"role": "assistant", "content": "Found r1 and r2."}]}]


def test_parquet_equals_jsonl_token_for_token(tmp_path, qwen):
    rows = STRUCT_ROWS + STRING_ROWS
    write_parquet(tmp_path / "pq" / "a.parquet", STRUCT_ROWS)
    write_parquet(tmp_path / "pq" / "b.parquet", STRING_ROWS)
    jsonl = write_jsonl(tmp_path / "all.jsonl", rows)
    # what pyarrow gives back is the rows themselves, plain Python, up to the nulls of merged types
    back = read_parquet_rows(tmp_path / "pq" / "a.parquet")
    assert [[{k: v for k, v in m.items() if v is not None} for m in r["messages"]] for r in back] == \
        [[{k: v for k, v in m.items() if v is not None} for m in r["messages"]] for r in STRUCT_ROWS]
    for tok in (qwen, data.byte_tokenizer()):
        from_jsonl = quiet(jsonl, tok)
        from_parquet = quiet(tmp_path / "pq", tok)  # a directory: its files in sorted order
        assert len(from_parquet) == len(rows)
        for a, b in zip(from_parquet, from_jsonl):
            assert a.input_ids == b.input_ids and a.loss_mask == b.loss_mask and a.segments == b.segments
    convs = data.read_conversations(tmp_path / "pq", log=lambda s: None)
    assert [w for w, _, _ in convs] == [f"{tmp_path / 'pq' / 'a.parquet'}:row {i}" for i in range(6)] + \
        [f"{tmp_path / 'pq' / 'b.parquet'}:row {i}" for i in range(2)]


def plain_python(x):
    """True iff x is built from dict, list, str, int, float, bool and None only (no numpy, no tuples)."""
    if isinstance(x, dict):
        return all(isinstance(k, str) and plain_python(v) for k, v in x.items())
    if isinstance(x, list):
        return all(plain_python(v) for v in x)
    return x is None or type(x) in (str, int, float, bool)


def test_parquet_nested_columns_become_plain_python_exactly(tmp_path):
    tool = {"type": "function", "function": {"name": "plot", "description": "Plot — ünïcode",
            "parameters": {"type": "object", "required": ["xs", "style"], "properties": {
                "xs": {"type": "array", "items": {"type": "number"}, "default": [0.5, 1.0, -2.25]},
                "grid": {"type": "array", "default": [[1, 2], [3, 4]]},
                "style": {"type": "string", "enum": ["line", "bar"]},
                "log": {"type": "boolean", "default": True}, "bins": {"type": "integer", "default": 10}}}}}
    messages = [{"role": "user", "content": "plot"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                    "name": "plot", "arguments": {"xs": [1.5, 2.0], "style": "bar", "grid": [[0]], "log": False}}}]},
                {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "Done."}]
    path = write_parquet(tmp_path / "t.parquet", [{"messages": messages, "tools": [tool]}])
    ((_, msgs, tools),) = data.read_conversations(path, log=lambda s: None)
    assert tools == [tool] and plain_python(tools) and plain_python(msgs)
    arguments = messages[1]["tool_calls"][0]["function"]["arguments"]
    assert msgs[1]["tool_calls"] == [{"name": "plot", "arguments": arguments}] and plain_python(arguments)
    assert data.render_chat(msgs, tools) == data.render_chat(messages, [tool])


# Open-AgentRL-SFT-3K (the paper's training set) as its trainers read it: one parquet file with a
# `messages` column (verl's MultiTurnSFTDataset, messages_key=messages, tools_key=tools), assistant
# turns calling the sandbox tool `code_interpreter` in OpenAI shape with {"code": ...} arguments, its
# output as "tool" messages, a final answer with \boxed{} or a ```python block. As `datasets` writes
# it, every message carries every key of the column's struct type (null where unused).
CODE_TOOL = {"type": "function", "function": {
    "name": "code_interpreter", "description": "A tool for executing code.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "The code to execute."}},
                   "required": ["code"]}}}


def agentrl_message(role, content, code=None, call_id=None):
    calls = None if code is None else [{"id": call_id, "type": "function",
                                        "function": {"name": "code_interpreter", "arguments": {"code": code}}}]
    return {"role": role, "content": content, "tool_calls": calls, "tool_call_id": None if code else call_id}


FIB = "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
AGENTRL_ROWS = [
    {"messages": [
        agentrl_message("user", "Find the sum of the positive divisors of 360. Put the answer in \\boxed{}."),
        agentrl_message("assistant", "I will compute it directly.",
                        "n = 360\nprint(sum(d for d in range(1, n + 1) if n % d == 0))", "c0"),
        agentrl_message("tool", "1170\n", call_id="c0"),
        agentrl_message("assistant", "The divisors of 360 sum to \\boxed{1170}.")],
     "tools": [CODE_TOOL], "enable_thinking": False},
    {"messages": [
        agentrl_message("system", "You are a careful competitive programmer. Test your code before answering."),
        agentrl_message("user", "Read n and print the n-th Fibonacci number (F(1) = 1)."),
        agentrl_message("assistant", "", FIB + "print([fib(i) for i in range(1, 8)])", "c1"),
        agentrl_message("tool", "[1, 1, 2, 3, 5, 8, 13]\n", call_id="c1"),
        agentrl_message("assistant", "Let me also check a large input for speed.",
                        "import time\nt = time.time()\nfib(10**5)\nprint(round(time.time() - t) < 2)", "c2"),
        agentrl_message("tool", 'Traceback (most recent call last):\n  File "<string>", line 3, in <module>\n'
                                "NameError: name 'fib' is not defined\n", call_id="c2"),
        agentrl_message("assistant", "The sandbox keeps no state; define it again.",
                        FIB + "print(len(str(fib(10**5))))", "c3"),
        agentrl_message("tool", "20899\n", call_id="c3"),
        agentrl_message("assistant", "```python\nn = int(input())\na, b = 0, 1\nfor _ in range(n):\n"
                                     "    a, b = b, a + b\nprint(a)\n```")],
     "tools": [CODE_TOOL], "enable_thinking": False},
]


def test_open_agentrl_shaped_rows_render_like_the_template(tmp_path, hf_tok, qwen):
    as_objects = write_parquet(tmp_path / "full_sft.parquet", AGENTRL_ROWS)
    # the variant many hub datasets use: tools and arguments as JSON strings
    strings = [{**r, "tools": json.dumps(r["tools"]), "messages": [
        {**m, "tool_calls": m["tool_calls"] and [{**c, "function": {**c["function"], "arguments": json.dumps(
            c["function"]["arguments"])}} for c in m["tool_calls"]]} for m in r["messages"]]} for r in AGENTRL_ROWS]
    as_strings = write_parquet(tmp_path / "strings.parquet", strings)
    for path in (as_objects, as_strings):
        logs = []
        samples = data.load_dataset(path, qwen, max_length=100_000, log=logs.append)
        assert any("2 conversations set 'enable_thinking'; it is ignored" in line for line in logs)
        for row, sample in zip(read_parquet_rows(path), samples):  # the rows exactly as the file holds them
            tools = json.loads(row["tools"]) if isinstance(row["tools"], str) else row["tools"]
            ref = hf_tok.apply_chat_template(plain_messages(row["messages"]), tools=tools, tokenize=False)
            text, spans = data.render_chat(row["messages"], tools)
            assert text == ref and '{"name": "code_interpreter", "arguments": {"code": "' in text
            assert sample.input_ids == hf_tok(ref, add_special_tokens=False)["input_ids"]
            offsets = qwen.tk.encode(ref, add_special_tokens=False).offsets
            assert sample.loss_mask == supervised_by_offsets(ref, offsets, spans)
        first = samples[0]
        sup = qwen.decode([t for t, m in zip(first.input_ids, first.loss_mask) if m], skip_special_tokens=False)
        assert sup.startswith("I will compute it directly.\n<tool_call>\n")
        assert sup.endswith("\\boxed{1170}.<|im_end|>\n")


def test_parquet_merged_argument_shapes_render_as_stored(tmp_path, hf_tok):
    """Different argument objects in one column are merged into one struct type: the missing keys come
    back as nulls, and are rendered as the template renders them (and as the authors trained)."""
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "roster", "arguments": {"team": "Heron"}}}]},
        {"role": "tool", "content": "x"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "shifts", "arguments": {"day": "Monday"}}}]}]}]
    path = write_parquet(tmp_path / "m.parquet", rows)
    logs = []
    convs = data.read_conversations(path, log=logs.append)
    assert convs[0][1][1]["tool_calls"][0]["arguments"] == {"team": "Heron", "day": None}
    assert any("note: 2 conversations have null values in tool schemas or call arguments" in line for line in logs)
    for row, (_, messages, tools) in zip(read_parquet_rows(path), convs):
        text, _ = data.render_chat(messages, tools)
        assert text == hf_tok.apply_chat_template(row["messages"], tokenize=False)
    assert '"arguments": {"team": "Heron", "day": null}' in data.render_chat(convs[0][1])[0]


def test_parquet_column_names_and_errors_name_file_and_row(tmp_path, capsys):
    bt = data.byte_tokenizer()
    good = GOOD["messages"]
    path = write_parquet(tmp_path / "c.parquet", [{"conversations": good, "functions": [WEATHER]}] * 2)
    with pytest.raises(data.DataError, match=r"c.parquet: no column 'messages' \(columns: conversations, functions\); "
                                             r"name the conversation column with --messages-key"):
        quiet(path, bt)
    samples = quiet(path, bt, messages_key="conversations", tools_key="functions")
    assert samples[0] == data.encode_chat(bt, good, [WEATHER])
    code, out, err = run_cli(capsys, "stats", "--data", str(path), "--messages-key", "conversations",
                             "--tools-key", "functions")
    assert code == 0 and "with tools block 2" in out, err
    code, out, err = run_cli(capsys, "show", "--data", str(path), "--messages-key", "conversations", "--index", "1")
    assert code == 0 and out.startswith(f"{path}:row 1: ")

    bad = write_parquet(tmp_path / "bad.parquet", [GOOD, GOOD, {"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(data.DataError, match=f"^{bad}:row 2: message 0: unknown role 'robot'"):
        quiet(bad, bt)
    # messages as a JSON string column: parsed; a string that is not JSON is named
    as_string = write_parquet(tmp_path / "s.parquet", [{"messages": json.dumps(good)}, {"messages": "hi"}])
    with pytest.raises(data.DataError, match=f"^{as_string}:row 1: 'messages' must be a list, got a string"):
        quiet(as_string, bt)
    write_parquet(as_string, [{"messages": json.dumps(good)}])
    assert quiet(as_string, bt) == [data.encode_chat(bt, good)]
    (tmp_path / "text.parquet").write_text("not parquet")
    with pytest.raises(data.DataError, match="text.parquet: not a readable parquet file"):
        quiet(tmp_path / "text.parquet", bt)
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"messages": pa.array([], type=pa.list_(pa.string()))}), tmp_path / "empty.parquet")
    with pytest.raises(data.DataError, match="empty.parquet: file is empty"):
        quiet(tmp_path / "empty.parquet", bt)


def test_missing_pyarrow_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    path = write_parquet(tmp_path / "x.parquet", [GOOD])
    jsonl = write_jsonl(tmp_path / "x.jsonl", [GOOD])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow...` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    expected = f"{path}: reading parquet needs pyarrow, which is not installed: pip install pyarrow"
    with pytest.raises(data.DataError) as e:
        quiet(path, data.byte_tokenizer())
    assert str(e.value) == expected
    assert run_cli(capsys, "stats", "--data", str(path)) == (2, "", f"error: {expected}\n")
    assert len(quiet(jsonl, data.byte_tokenizer())) == 1  # JSONL never needs it


def test_sources_files_directories_globs_lists(tmp_path):
    bt = data.byte_tokenizer()
    a = write_jsonl(tmp_path / "d" / "a.jsonl", [GOOD])
    b = write_parquet(tmp_path / "d" / "sub" / "b.parquet", [GOOD, GOOD])
    write_jsonl(tmp_path / "d" / ".cache" / "x.jsonl", [GOOD])
    (tmp_path / "d" / "README.md").write_text("# not data")
    txt = write_jsonl(tmp_path / "conversations.txt", [GOOD])  # a file named explicitly is JSONL whatever its name
    log = lambda s: None
    assert data.resolve_sources(tmp_path / "d", log) == [a, b]  # hidden folders and other files skipped
    assert data.resolve_sources(f"{tmp_path}/d/**/*.parquet", log) == [b]
    assert data.resolve_sources(f" {b} , {txt},{a}", log) == [b, txt, a]
    assert len(quiet(f"{tmp_path / 'd'},{txt}", bt)) == 4
    with pytest.raises(data.DataError, match=r"no such file \(a hub dataset is written hf:someone/agentic\)"):
        data.resolve_sources("someone/agentic", log)
    (tmp_path / "e").mkdir()
    for spec in (tmp_path / "e", f"{tmp_path}/*.parquet"):
        with pytest.raises(data.DataError, match="no .jsonl or .parquet file found"):
            data.resolve_sources(spec, log)
    for spec in ("hf:agentic", "hf:a/b/c", "hf:/b", "hf:a/b@:train"):
        with pytest.raises(data.DataError, match=r"expected hf:owner/name\[@revision\]"):
            data.resolve_sources(spec, log)
    with pytest.raises(data.DataError, match="no data given"):
        data.resolve_sources(" , ", log)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty huggingface_hub cache in tmp_path, with the hub unreachable (HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_hub_dataset_from_the_offline_cache(offline_hub):
    bt = data.byte_tokenizer()
    train = [GOOD, {"messages": CASES["plain"][0]}]
    test = [{"messages": CASES["unicode"][0]}]
    snap = conftest.make_hub_cache(offline_hub, "someone/agentic-sft", {
        "data/train-00000-of-00001.parquet": parquet_bytes(train), "data/test-00000-of-00001.jsonl":
        "".join(json.dumps(r) + "\n" for r in test), "README.md": "---\nlicense: mit\n---\n"}, repo_type="dataset")
    logs = []
    samples = data.load_dataset("hf:someone/agentic-sft", bt, log=logs.append)  # the train split by default
    assert samples == [data.encode_chat(bt, r["messages"]) for r in train]
    assert logs[0] == f"data hf:someone/agentic-sft: 1 file from {snap}"
    assert quiet("hf:someone/agentic-sft:test", bt) == [data.encode_chat(bt, test[0]["messages"])]
    assert len(quiet("hf:someone/agentic-sft:data/*", bt)) == 3  # a file pattern
    assert len(quiet("hf:someone/agentic-sft:train,hf:someone/agentic-sft:test", bt)) == 3
    with pytest.raises(data.DataError, match=r"hf:someone/agentic-sft:validation: no .parquet or .jsonl file of split "
                                             r"'validation' \(files: data/test-00000-of-00001.jsonl, data/train-"):
        quiet("hf:someone/agentic-sft:validation", bt)
    # Open-AgentRL-SFT-3K's layout: one file at the top that names no split -> all of it is the train split
    conftest.make_hub_cache(offline_hub, "Gen-Verse/Open-AgentRL-SFT-3K", {
        "full_sft_3k_shuffled_v4.parquet": parquet_bytes(AGENTRL_ROWS), ".gitattributes": "*.parquet filter=lfs\n"},
        repo_type="dataset")
    for spec in ("hf:Gen-Verse/Open-AgentRL-SFT-3K", "hf:Gen-Verse/Open-AgentRL-SFT-3K:train"):
        assert len(quiet(spec, bt, max_length=100_000)) == 2
    # @revision pins a commit: an update of the dataset (a new snapshot, refs/main moved) leaves it alone
    conftest.make_hub_cache(offline_hub, "someone/agentic-sft", {"data/train.jsonl": json.dumps(GOOD) + "\n"},
                            repo_type="dataset", commit="1" * 40)
    assert len(quiet("hf:someone/agentic-sft", bt)) == 1
    assert quiet(f"hf:someone/agentic-sft@{snap.name}", bt) == samples and snap.name == "0" * 40
    with pytest.raises(data.DataError) as e:  # not cached, and offline: says what to do, no traceback
        quiet("hf:someone/not-cached", bt)
    assert str(e.value).startswith("could not fetch the dataset someone/not-cached from the Hugging Face hub (")
    assert "HF_HUB_OFFLINE=1 reads the cache" in str(e.value) and "--data /path/to/dir" in str(e.value)


# -----------------------------------------------------------------------------
# Batching


def make_samples(lengths):
    return [data.Sample(list(range(1, n + 1)), [0] * (n // 2) + [1] * (n - n // 2), [0] * n) for n in lengths]


def test_collate_pads_to_longest_in_batch():
    samples = make_samples([3, 7, 5])
    b = data.collate(samples, pad_id=99)
    assert set(b) == {"input_ids", "attention_mask", "loss_mask"}
    assert b["input_ids"].shape == (3, 7) and b["input_ids"].dtype == torch.long
    assert b["attention_mask"].dtype == torch.bool and b["loss_mask"].dtype == torch.bool
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        assert b["input_ids"][i, :n].tolist() == s.input_ids and (b["input_ids"][i, n:] == 99).all()
        assert b["attention_mask"][i].tolist() == [True] * n + [False] * (7 - n)
        assert b["loss_mask"][i].tolist() == [bool(m) for m in s.loss_mask] + [False] * (7 - n)


@pytest.mark.parametrize("n,world,batch", [(10, 1, 3), (10, 2, 2), (11, 3, 4), (2, 4, 1), (37, 2, 5)])
def test_epoch_batches_match_distributed_sampler(n, world, batch):
    lengths = [(7 * i) % 13 + 1 for i in range(n)]
    ds = make_samples(lengths)  # torch's samplers and DataLoader take any sized, indexable dataset
    for epoch in (0, 3):
        for rank in range(world):
            sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True,
                                                          seed=1234, drop_last=False)
            sampler.set_epoch(epoch)
            batches = data.epoch_batches(lengths, batch, seed=1234, epoch=epoch, rank=rank, world_size=world)
            assert [i for b in batches for i in b] == list(sampler)
            assert all(len(b) == batch for b in batches[:-1])
            # the same through a DataLoader using the sampler
            loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, collate_fn=list)
            assert [[s.input_ids for s in b] for b in loader] == [[ds[i].input_ids for i in b] for b in batches]


def test_epoch_batches_deterministic_and_grouped():
    lengths = [(37 * i) % 101 + 1 for i in range(500)]
    a = data.epoch_batches(lengths, 4, seed=7, epoch=2, rank=1, world_size=2)
    assert a == data.epoch_batches(lengths, 4, seed=7, epoch=2, rank=1, world_size=2)
    assert a != data.epoch_batches(lengths, 4, seed=7, epoch=3, rank=1, world_size=2)
    assert a != data.epoch_batches(lengths, 4, seed=8, epoch=2, rank=1, world_size=2)
    for rank in (0, 1):
        plain = data.epoch_batches(lengths, 4, seed=7, epoch=2, rank=rank, world_size=2)
        grouped = data.epoch_batches(lengths, 4, seed=7, epoch=2, rank=rank, world_size=2, group_by_length=True)
        assert grouped == data.epoch_batches(lengths, 4, seed=7, epoch=2, rank=rank, world_size=2, group_by_length=True)
        assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)  # same samples
        assert len(grouped) == len(plain)  # same number of steps on every rank

        def padded(batches):
            return sum(len(b) * max(lengths[i] for i in b) for b in batches)
        assert padded(grouped) < 0.8 * padded(plain)


# -----------------------------------------------------------------------------
# The bundled dataset


def demo_texts(convs):
    return [data.render_chat(c["messages"])[0] for c in convs]


def test_bundled_dataset_is_reproducible_and_consistent(tmp_path):
    r = subprocess.run([sys.executable, "-m", "examples.make_agentic", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for name in ("agentic.jsonl", "agentic-heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (ROOT / "examples" / name).read_bytes(), f"{name} is stale"
    train = [json.loads(l) for l in (ROOT / "examples" / "agentic.jsonl").read_text().splitlines()]
    held = [json.loads(l) for l in (ROOT / "examples" / "agentic-heldout.jsonl").read_text().splitlines()]
    assert len(held) == 200 and len(train) >= 1000
    tok = data.word_tokenizer(demo_texts(train))
    samples = data.load_dataset(ROOT / "examples" / "agentic.jsonl", tok, log=lambda s: None)
    assert len(samples) == len(train) and max(len(s.input_ids) for s in samples) <= 512
    for c, s in zip(train[:100], samples):
        sup = tok.decode([t for t, m in zip(s.input_ids, s.loss_mask) if m], skip_special_tokens=False)
        assert sup.endswith(c["messages"][-1]["content"] + "<|im_end|>\n")
        check_demo_conversation(c)
    for c in held:
        check_demo_conversation(c, n_records=8)
    assert tok.tk.token_to_id("<unk>") not in {i for s in samples for i in s.input_ids}


def answer_records(answer):
    """"Found Ivy Oslo, Ivy night, Omar Lima, Omar late" -> [("Ivy", "Oslo", "night"), ("Omar", "Lima", "late")]"""
    pairs = [p.split() for p in answer.removeprefix("Found ").split(", ")]
    return [(a[0], a[1], b[1]) for a, b in zip(pairs[::2], pairs[1::2]) if a[0] == b[0]]


def check_demo_conversation(c, n_records=None):
    """The answer is the asked people's records, found in the tool outputs and nowhere before them."""
    system, user, calls, roster, shifts, final = c["messages"]
    assert final["content"] == c["answer"] + "."
    found = answer_records(c["answer"])
    assert found and len(c["answer"].split(", ")) == 2 * len(found)
    for who, city, shift in found:
        assert f"{city} {who}" in roster["content"].split("\n") and f"{shift} {who}" in shifts["content"].split("\n")
        assert f" {who}" in user["content"]
    values = {v for _, city, shift in found for v in (city, shift)}
    before = " ".join([system["content"], user["content"], json.dumps(calls["tool_calls"])])
    assert not values & set(before.replace("(", " ").replace(")", " ").replace('"', " ").split())
    for tool in (roster, shifts):  # one record per person, distinct people
        names = [line.split()[1] for line in tool["content"].split("\n")]
        assert len(set(names)) == len(names) and {who for who, _, _ in found} <= set(names)
        assert n_records is None or len(names) == n_records


@pytest.mark.parametrize("records", [4, 16])
def test_make_agentic_records(records):
    from examples import make_agentic
    train, held = make_agentic.generate(seed=7, n_train=300, n_heldout=50, max_records=records)
    for c in held:
        check_demo_conversation(c, n_records=records)
        assert len(answer_records(c["answer"])) == 1  # held out: one person
    sizes = [len(c["messages"][3]["content"].split("\n")) for c in train]
    assert min(sizes) == 1 and max(sizes) == records  # training: a mix of sizes, up to `records`
    for c in train:
        check_demo_conversation(c)
    assert not {c["messages"][1]["content"] for c in held} & {c["messages"][1]["content"] for c in train}
    assert make_agentic.generate(seed=7, n_train=300, n_heldout=50, max_records=records) == (train, held)
    with pytest.raises(ValueError, match="records must be in"):
        make_agentic.generate(max_records=len(make_agentic.NAMES))


def test_make_agentic_cli_records(tmp_path):
    r = subprocess.run([sys.executable, "-m", "examples.make_agentic", "--out-dir", str(tmp_path), "--records", "16",
                        "--n-train", "40", "--n-heldout", "5", "--seed", "3"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    held = [json.loads(l) for l in (tmp_path / "agentic-heldout.jsonl").read_text().splitlines()]
    assert len(held) == 5 and all(len(c["messages"][4]["content"].split("\n")) == 16 for c in held)
    assert len((tmp_path / "agentic.jsonl").read_text().splitlines()) == 40
    r = subprocess.run([sys.executable, "-m", "examples.make_agentic", "--out-dir", str(tmp_path), "--records", "0"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "records must be in" in r.stderr


def test_word_tokenizer_round_trip_and_deterministic(tmp_path):
    from examples import make_agentic
    train, held = make_agentic.generate(seed=5, n_train=200, n_heldout=20)
    tok = data.word_tokenizer(demo_texts(train))
    assert tok.tk.to_str() == data.word_tokenizer(demo_texts(train)).tk.to_str()  # deterministic
    assert tok.tk.to_str() == data.word_tokenizer(reversed(demo_texts(train))).tk.to_str()  # order-free
    for text in demo_texts(train + held):
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == text and tok.tk.token_to_id("<unk>") not in ids
    # one token per name and value; the name is the same token in the question, the records and the answer
    c = held[0]
    (who, city, shift), = answer_records(c["answer"])
    final = tok.encode(c["answer"])
    assert len(final) == 6 and final[1] == final[4] == tok.tk.token_to_id("\u0120" + who)  # Found, " Ivy", " Oslo", ...
    roster = tok.encode(c["messages"][3]["content"])
    assert tok.decode(roster[roster.index(final[1]) - 1:roster.index(final[1]) + 1]) == f"{city} {who}"
    assert final[1] in tok.encode(c["messages"][1]["content"])
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert [tok.tk.token_to_id(n) for n in names] == [0, 1, 2] and (tok.eos_token_id, tok.pad_token_id) == (2, 0)
    assert tok.decode(tok.encode("<tool_call>\nOslo")) == "<tool_call>\nOslo"  # added, not special, as in Qwen2.5
    assert tok.decode(tok.encode("Found Zanzibar")) == "Found<unk>"  # an unseen word
    for name, content in tok.files().items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    loaded = data.load_tokenizer(tmp_path)
    assert loaded.encode(demo_texts(held)[0]) == tok.encode(demo_texts(held)[0])
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)