"""
Chat data for FocuSFT: agentic conversations -> token ids, loss masks, segment labels, batches.

A conversation is the messages/tools format of TRL and the HF ecosystem:

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": ...}, ...],
     "tools": [{"type": "function", "function": {...}}, ...]}            # "tools" is optional

stored one per line in a JSONL file, or one per row in a parquet file (columns "messages" and
optionally "tools"; other names with messages_key / tools_key, --messages-key / --tools-key). `--data`
names a file, a directory or glob of them, or a hub dataset "hf:owner/name[@revision][:split or file
pattern]"; several sources comma-separated (resolve_sources). Parquet needs pyarrow, an optional
dependency (pip install pyarrow); JSONL does not.

- `content` is a string, or a list of {"type": "text", "text": ...} parts (joined with "").
- An assistant message may carry `tool_calls`, each {"type": "function", "function": {"name",
  "arguments"}} (OpenAI shape) or {"name", "arguments"}. `arguments` is a JSON object, or a JSON
  STRING, which we parse first. NOTE: the Qwen2.5 template itself does not parse it: a string is
  run through `tojson` again and the model is trained on '"{\\"city\\": \\"Oslo\\"}"', a silent
  data bug in OpenAI-style data. We render the parsed object, i.e. what the model must emit.
- `messages` and `tools` may also be JSON strings (common on the hub): they are parsed first.
- NOTE: a parquet column has ONE type for all rows, so objects of different shapes are merged:
  `arguments` {"city": ...} in one call and {"query": ...} in another are stored, and read back, as
  {"city": ..., "query": null} in both; the same happens to the `properties` of different tools. We
  render what the file holds, nulls included, as the template and the authors' loader do, and log a
  note; store such objects as JSON strings to keep them apart.
- Extra keys (e.g. "answer", "name", "tool_call_id") are ignored; so is "enable_thinking" (a Qwen3
  template switch; Qwen2.5's template has no thinking mode), with a note when present.

Pipeline, one function per step:

    resolve_sources        --data -> .jsonl / .parquet files (hub datasets fetched into the HF cache)
    read_conversations     files -> validated, normalised messages; errors name file:line or file:row N
    render_chat            messages -> text, exactly the Qwen2.5 chat template (written by hand,
                           no jinja), plus the character spans of every segment
    encode_chat            text -> ids with ONE call to the tokenizer; loss mask and segment labels
                           come from the encoding's character offsets
    load_dataset           all of the above, truncated to max_length, empty samples dropped and counted
    collate / epoch_batches   samples -> right-padded (B, S) batches, deterministic per (seed, epoch)

Loss mask (the authors' convention): an assistant turn is rendered as

    <|im_start|>assistant\\n  Sure, ... <tool_call>...</tool_call>  <|im_end|>\\n
    '--- header: context ---'  '------------- supervised: loss_mask = 1 -------------'

Everything else (system, user, tool results, the header itself) has loss_mask = 0. A token is
supervised iff its first character is. NOTE: with a BPE vocabulary a response that starts with
"\\n" merges with the header's "\\n" into one token, which therefore stays context (_label_tokens).

Run `python data.py show --data examples/agentic.jsonl --index 0` to see what the model is trained on.
"""

import argparse
import fnmatch
import glob
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch

# -----------------------------------------------------------------------------
# Constants

INSTRUCT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
BASE_SYSTEM = "You are a helpful assistant."

# Per-token segment labels, used by the attention analysis (evals/analyze.py). A token belongs to
# the segment in which its first character lies; template scaffolding (<|im_start|>user,
# <|im_end|>\n) belongs to the turn it frames.
SEG_SYSTEM_USER = 0       # system prompt, tools block, user turns
SEG_TOOL = 1              # the user turn that wraps <tool_response> blocks
SEG_ASSISTANT_HEADER = 2  # "<|im_start|>assistant\n" (also the generation prompt)
SEG_RESPONSE = 3          # what the assistant says or calls, up to and including "<|im_end|>\n"
SEGMENT_NAMES = ("system/user", "tool", "assistant header", "response")

ROLES = ("system", "user", "assistant", "tool")
TRUNCATION_POLICIES = ("right", "left", "drop", "error")
DATA_SUFFIXES = (".jsonl", ".parquet")  # what a directory, a glob or a hub dataset contributes
# Words that name a split in a hub dataset's file paths (the hub's own convention).
SPLIT_WORDS = ("train", "training", "validation", "valid", "val", "dev", "test", "testing", "eval", "evaluation")
THINKING_KEY = "enable_thinking"  # a Qwen3 template switch some datasets carry per conversation; unused here

# The fixed text of the tools block in the system turn (Qwen2.5 template, verbatim).
TOOLS_HEAD = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)

# The released Qwen2.5-Instruct chat template (tokenizer_config.json, "chat_template"), kept as data:
# we never execute it, but we write it beside checkpoints so that transformers renders exactly what
# render_chat renders. The base-model template is the same text with BASE_SYSTEM in both places.
QWEN25_CHAT_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOOL_CALL_TOKENS = ("<tool_call>", "</tool_call>")  # added tokens, but not "special" in Qwen2.5
BYTE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + len(TOOL_CALL_TOKENS)  # 261


class DataError(Exception):
    """A problem with the user's data or files. The CLI prints it as `error: ...` (no traceback)."""


def _json(x):
    # The template's `tojson` (transformers overrides jinja's HTML-escaping one): ", " and ": "
    # separators, key order kept, non-ASCII characters written as is.
    return json.dumps(x, ensure_ascii=False)


def fmt_seconds(s: float) -> str:
    """A duration for a log line: "4m05s", "2h07m"; "?" when not finite (an ETA with no rate yet)."""
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# -----------------------------------------------------------------------------
# Tokenizer


@dataclass
class Tokenizer:
    """A thin wrapper around a `tokenizers.Tokenizer` plus the few facts the template needs."""

    tk: tokenizers.Tokenizer
    eos_token_id: int   # <|im_end|> for instruct/chat, <|endoftext|> for base
    pad_token_id: int   # <|endoftext|>
    default_system: str  # the system prompt the template inserts when the conversation has none

    def encode(self, text: str) -> list[int]:
        # NOTE: always encode a WHOLE rendered conversation: the pre-tokenizer's split regex merges
        # across piece boundaries ("user\n" + "\nHi" is 198 198 piecewise, 271 as one string).
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stop_token_ids(self) -> list[int]:
        ids = [self.eos_token_id]
        for t in ("<|im_end|>", "<|endoftext|>"):
            i = self.tk.token_to_id(t)
            if i is not None and i not in ids:
                ids.append(i)
        return ids

    def files(self) -> dict[str, str]:
        """tokenizer.json + tokenizer_config.json, loadable by load_tokenizer and by transformers.

        The chat template written is the Qwen2.5 one with this tokenizer's default system prompt,
        i.e. the template render_chat implements, whatever template the source directory had.
        """
        template = QWEN25_CHAT_TEMPLATE.replace(INSTRUCT_SYSTEM, self.default_system)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # load tokenizer.json as is
            "bos_token": None,
            "eos_token": self.tk.id_to_token(self.eos_token_id),
            "pad_token": self.tk.id_to_token(self.pad_token_id),
            "unk_token": None,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "model_max_length": 131072,
            "chat_template": template,
        }
        return {
            "tokenizer.json": self.tk.to_str(),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        }


def _token_id(tk, token, what, where):
    if isinstance(token, dict):  # older configs store AddedToken dicts
        token = token.get("content")
    i = tk.token_to_id(token) if isinstance(token, str) else None
    if i is None:
        raise DataError(f"{where}: {what} {token!r} is not in the vocabulary of tokenizer.json")
    return i


def load_tokenizer(path) -> Tokenizer:
    """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja) from a model directory."""
    path = Path(path)
    d = path.parent if path.name == "tokenizer.json" else path
    if not (d / "tokenizer.json").is_file():
        raise DataError(f"{d}: no tokenizer.json found (expected a model directory containing tokenizer.json)")
    try:
        tk = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    except Exception as e:  # the Rust side raises plain Exceptions for malformed files
        raise DataError(f"{d / 'tokenizer.json'}: cannot be loaded ({e})") from None
    config = {}
    if (d / "tokenizer_config.json").is_file():
        try:
            config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{d / 'tokenizer_config.json'}: invalid JSON ({e})") from None
    # transformers >= 4.43 saves the template in its own file; older ones inside tokenizer_config.json
    template = config.get("chat_template")
    if (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    # Both Qwen2.5 variants contain BASE_SYSTEM; only the instruct one says "You are Qwen".
    if isinstance(template, str) and INSTRUCT_SYSTEM not in template and BASE_SYSTEM in template:
        default_system = BASE_SYSTEM
    else:
        default_system = INSTRUCT_SYSTEM
    where = str(d / "tokenizer_config.json")
    has_im_end = tk.token_to_id("<|im_end|>") is not None
    eos = _token_id(tk, config.get("eos_token") or ("<|im_end|>" if has_im_end else "<|endoftext|>"), "eos_token", where)
    pad = _token_id(tk, config.get("pad_token") or "<|endoftext|>", "pad_token", where)
    return Tokenizer(tk=tk, eos_token_id=eos, pad_token_id=pad, default_system=default_system)


def _byte_alphabet() -> list[str]:
    """The byte-level alphabet: byte b is written as one printable character.

    Printable Latin-1 bytes stand for themselves; the other 68 (control characters, space, ...)
    are moved to U+0100 and up, in byte order. Same convention as GPT-2 / Qwen BPE vocabularies,
    which is what the ByteLevel pre-tokenizer and decoder of `tokenizers` expect.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    chars, moved = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + moved))
            moved += 1
    return chars


def byte_tokenizer() -> Tokenizer:
    """A 261-token tokenizer for the tiny demo model: ids 0..255 are the bytes themselves, then
    <|endoftext|> <|im_start|> <|im_end|> (special) and <tool_call> </tool_call> (added, not special,
    as in Qwen2.5). Built in code so the demo needs no download."""
    vocab = {c: b for b, c in enumerate(_byte_alphabet())}
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))  # no merges: 1 token per byte
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    tk.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tk.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in TOOL_CALL_TOKENS])
    assert tk.get_vocab_size() == BYTE_VOCAB_SIZE
    return Tokenizer(tk=tk, eos_token_id=tk.token_to_id("<|im_end|>"),
                     pad_token_id=tk.token_to_id("<|endoftext|>"), default_system=INSTRUCT_SYSTEM)


TOOL_RESPONSE_TOKENS = ("<tool_response>", "</tool_response>")  # added tokens in Qwen2.5, like <tool_call>


def word_tokenizer(texts) -> Tokenizer:
    """A word-level tokenizer fitted on `texts` (rendered conversations), for the tiny demo model:
    one token per word, per run of punctuation, per whitespace run (GPT-2's split, byte-level
    text as in Qwen2.5), plus the ChatML, <tool_call> and <tool_response> tokens. Deterministic:
    the vocabulary is the sorted set of pieces. A piece never seen in `texts` becomes <unk>.

    Names and values are then single tokens, so a demo conversation is ~100 tokens, not ~800 bytes.
    NOTE: " Oslo" (after a space) and "Oslo" (at a line start) are different tokens, as in BPE."""
    pre = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    added = SPECIAL_TOKENS + TOOL_CALL_TOKENS + TOOL_RESPONSE_TOKENS
    split = re.compile("|".join(map(re.escape, added)))  # added tokens are matched before the split
    pieces = {w for text in texts for part in split.split(text) for w, _ in pre.pre_tokenize_str(part)}
    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, "<unk>", *sorted(pieces)])}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    tk.decoder = tokenizers.decoders.ByteLevel()
    tk.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tk.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                   for t in TOOL_CALL_TOKENS + TOOL_RESPONSE_TOKENS])
    return Tokenizer(tk=tk, eos_token_id=tk.token_to_id("<|im_end|>"),
                     pad_token_id=tk.token_to_id("<|endoftext|>"), default_system=INSTRUCT_SYSTEM)

# -----------------------------------------------------------------------------
# Validation: JSON object -> normalised messages {"role", "content": str, "tool_calls": [{"name", "arguments": dict}]}


def _type(x) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(x), type(x).__name__)


def _content_text(content, where):
    """A string, or a list of {"type": "text", "text": str} parts joined with "". None stays None."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("text"), str) or part.get("type", "text") != "text":
                kind = part.get("type") if isinstance(part, dict) else None
                what = f"has type {kind!r}, only text is supported" if kind not in (None, "text") else \
                    'must be {"type": "text", "text": <string>}'
                raise DataError(f"{where}: content part {j} {what}")
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(f"{where}: content must be a string or a list of text parts, got {_type(content)}")


def _tool_call(call, where):
    if not isinstance(call, dict):
        raise DataError(f"{where}: must be an object, got {_type(call)}")
    # OpenAI shape or {name, arguments}. `function` may be present but null: a parquet column holding
    # both shapes gives every row both keys.
    f = call["function"] if call.get("function") is not None else call
    if not isinstance(f, dict):
        raise DataError(f"{where}: 'function' must be an object, got {_type(f)}")
    name = f.get("name")
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: 'name' must be a non-empty string, got {_type(name)}")
    if "arguments" not in f:
        raise DataError(f"{where} ({name}): missing 'arguments'")
    args = f["arguments"]
    if isinstance(args, str):  # OpenAI stores arguments as a JSON string: parse it (see module docstring)
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} ({name}): 'arguments' is a string but not valid JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise DataError(f"{where} ({name}): 'arguments' must be a JSON object (or a string holding one), got {_type(args)}")
    return {"name": name, "arguments": args}


def _from_json_string(value, key, where):
    """Hub datasets often store nested fields as JSON strings (one Arrow type fits all rows): parse them."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise DataError(f"{where}: {key!r} must be a list, got a string (that is not valid JSON either)") from None


def _normalize_messages(messages, where, key="messages"):
    messages = _from_json_string(messages, key, where)
    if not isinstance(messages, list):
        raise DataError(f"{where}: {key!r} must be a list, got {_type(messages)}")
    if not messages:
        raise DataError(f"{where}: {key!r} is empty")
    out = []
    for i, m in enumerate(messages):
        at = f"{where}: message {i}"
        if not isinstance(m, dict):
            raise DataError(f"{at}: must be an object, got {_type(m)}")
        role = m.get("role")
        if role not in ROLES:
            got = f"unknown role {role!r}" if "role" in m else "missing 'role'"
            raise DataError(f"{at}: {got} (expected one of {', '.join(ROLES)})")
        at = f"{at} ({role})"
        content = _content_text(m.get("content"), at)
        calls = m.get("tool_calls")
        if calls is None:
            calls = []
        if not isinstance(calls, list):
            raise DataError(f"{at}: 'tool_calls' must be a list, got {_type(calls)}")
        if calls and role != "assistant":
            raise DataError(f"{at}: only assistant messages may have 'tool_calls'")
        calls = [_tool_call(c, f"{at}: tool call {k}") for k, c in enumerate(calls)]
        if role == "assistant" and not content and not calls:
            raise DataError(f"{at}: assistant turn has neither content nor tool_calls")
        if content is None and role != "assistant":
            raise DataError(f"{at}: missing 'content'" if "content" not in m else f"{at}: content is null")
        out.append({"role": role, "content": content or "", "tool_calls": calls})
    return out


def _normalize_tools(tools, where, key="tools"):
    """Tool schemas are rendered as they are (`tojson`), null-valued keys included (module docstring)."""
    tools = _from_json_string(tools, key, where)
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: {key!r} must be a list of objects (function schemas), got {_type(tools)}")
    return tools or None  # [] renders like no tools at all (the template tests `if tools`)


def validate_conversation(obj, where: str, messages_key="messages", tools_key="tools"):
    """Check one parsed JSONL line; raise DataError("<where>: <what is wrong>") or return the
    normalised (messages, tools)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with a {messages_key!r} list, got {_type(obj)}")
    if messages_key not in obj:
        raise DataError(f"{where}: missing {messages_key!r}")
    return (_normalize_messages(obj[messages_key], where, messages_key),
            _normalize_tools(obj.get(tools_key), where, tools_key))


# -----------------------------------------------------------------------------
# Rendering: the Qwen2.5 chat template, by hand


def _render(messages, tools, add_generation_prompt, default_system):
    """Normalised messages -> (text, pieces); pieces = [(start, end, segment)] tiling the text."""
    parts, pieces, pos = [], [], 0

    def emit(s, seg):
        nonlocal pos
        parts.append(s)
        pieces.append((pos, pos + len(s), seg))
        pos += len(s)

    # The system turn always comes first: the conversation's first message if it is a system
    # message, else the default prompt; with tools, the tools block is appended inside it.
    system = messages[0]["content"] if messages[0]["role"] == "system" else default_system
    if tools:
        emit("<|im_start|>system\n" + system + TOOLS_HEAD + "".join("\n" + _json(t) for t in tools) + TOOLS_TAIL,
             SEG_SYSTEM_USER)
    else:
        emit("<|im_start|>system\n" + system + "<|im_end|>\n", SEG_SYSTEM_USER)

    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "system" and i == 0:
            continue  # already rendered above
        if role in ("user", "system"):  # a system message later on is a turn of its own
            emit(f"<|im_start|>{role}\n{content}<|im_end|>\n", SEG_SYSTEM_USER)
        elif role == "assistant":
            # "<|im_start|>assistant" + "\n" + content (if any) + "\n<tool_call>..." per call + "<|im_end|>\n".
            # Without content the first call supplies the "\n", so the header is always the same text.
            body = content
            for c in m["tool_calls"]:
                call = '{"name": "' + c["name"] + '", "arguments": ' + _json(c["arguments"]) + "}"
                body += ("\n" if body else "") + "<tool_call>\n" + call + "\n</tool_call>"
            emit("<|im_start|>assistant\n", SEG_ASSISTANT_HEADER)
            emit(body + "<|im_end|>\n", SEG_RESPONSE)
        else:  # tool: a run of consecutive tool messages shares one user turn
            if i == 0 or messages[i - 1]["role"] != "tool":
                emit("<|im_start|>user", SEG_TOOL)
            emit("\n<tool_response>\n" + content + "\n</tool_response>", SEG_TOOL)
            if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                emit("<|im_end|>\n", SEG_TOOL)

    if add_generation_prompt:
        emit("<|im_start|>assistant\n", SEG_ASSISTANT_HEADER)
    return "".join(parts), pieces


def render_chat(messages, tools=None, add_generation_prompt=False, default_system=INSTRUCT_SYSTEM):
    """Render like the Qwen2.5 chat template (character for character).

    Returns (text, spans): spans are the supervised character spans [start, end), one per
    assistant turn, from just after "<|im_start|>assistant\\n" to just after "<|im_end|>\\n".
    """
    text, pieces = _render(_normalize_messages(messages, "render_chat"), _normalize_tools(tools, "render_chat"),
                           add_generation_prompt, default_system)
    return text, [(s, e) for s, e, seg in pieces if seg == SEG_RESPONSE]


# -----------------------------------------------------------------------------
# Encoding: whole text -> ids once; masks from character offsets


@dataclass
class Sample:
    input_ids: list[int]
    loss_mask: list[int]  # 1 = supervised target token
    segments: list[int]   # SEG_* label per token


def _label_tokens(offsets, pieces):
    """Per-token segment = segment of the piece containing the token's first character.

    The only token that can straddle two segments is the header's "\\n" merged with a response
    that itself starts with newlines ("\\n" + "\\nok" -> "\\n\\n", id 271 in Qwen2.5); special and
    added tokens (<|im_start|>, <|im_end|>, <tool_call>) cut every other boundary. The straddling
    token counts as header (context): at inference the header is given, never predicted. So such a
    response's leading newline is not a target, rather than the model learning to emit header text.
    """
    starts = np.fromiter((s for s, _ in offsets), dtype=np.int64, count=len(offsets))
    piece_starts = np.array([s for s, _, _ in pieces], dtype=np.int64)
    piece_segs = np.array([g for _, _, g in pieces], dtype=np.int64)
    segs = piece_segs[np.searchsorted(piece_starts, starts, side="right") - 1]
    return (segs == SEG_RESPONSE).astype(np.int64).tolist(), segs.tolist()


def encode_chat(tokenizer: Tokenizer, messages, tools=None) -> Sample:
    text, pieces = _render(_normalize_messages(messages, "encode_chat"), _normalize_tools(tools, "encode_chat"),
                           False, tokenizer.default_system)
    enc = tokenizer.tk.encode(text, add_special_tokens=False)
    mask, segs = _label_tokens(enc.offsets, pieces)
    return Sample(input_ids=enc.ids, loss_mask=mask, segments=segs)


def _encode_many(tokenizer, conversations, chunk=256):
    """[(messages, tools)] (normalised) -> [Sample]; encode_batch runs on all cores (Rust threads)."""
    samples = []
    for i in range(0, len(conversations), chunk):  # chunked: Encoding objects are large
        rendered = [_render(m, t, False, tokenizer.default_system) for m, t in conversations[i:i + chunk]]
        encs = tokenizer.tk.encode_batch([text for text, _ in rendered], add_special_tokens=False)
        for enc, (_, pieces) in zip(encs, rendered):
            mask, segs = _label_tokens(enc.offsets, pieces)
            samples.append(Sample(input_ids=enc.ids, loss_mask=mask, segments=segs))
    return samples


# -----------------------------------------------------------------------------
# Sources: what --data names -> a list of .jsonl / .parquet files


def _is_pattern(s: str) -> bool:
    return any(c in s for c in "*?[")


def _names_files(selector: str) -> bool:
    """In hf:owner/name:<selector>, a file pattern or file name (else a split name)."""
    return _is_pattern(selector) or selector.endswith(DATA_SUFFIXES)


def _files_in(directory: Path) -> list[Path]:
    """Every .jsonl / .parquet file below `directory`, sorted; hidden folders (.cache, .git) skipped."""
    return sorted(p for p in directory.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def _names_split(relpath: str, split: str) -> bool:
    # The hub's file-naming rule: the split is a word of the path ("train/...", "data/train-00000-of-00001.parquet",
    # "sft.train.jsonl"), delimited by "/", "-", "_", ".", " " or digits.
    return re.search(rf"(^|[/\-_. 0-9]){re.escape(split)}($|[/\-_. 0-9])", relpath) is not None


def _select_split(files, root, selector, spec):
    """Files of the repository snapshot at `root` that `selector` (a split or a file pattern) picks."""
    rel = [f.relative_to(root).as_posix() for f in files]
    if not files:
        raise DataError(f"{spec}: the repository has no .parquet or .jsonl file (the formats read here)")
    if _names_files(selector):
        chosen = [f for f, r in zip(files, rel) if fnmatch.fnmatchcase(r, selector)]
        what = f"matching {selector!r}"
    else:
        split = selector or "train"
        chosen = [f for f, r in zip(files, rel) if _names_split(r, split)]
        # As on the hub: when no file names a split, the whole repository is the train split.
        if not chosen and split == "train" and not any(_names_split(r, s) for r in rel for s in SPLIT_WORDS):
            chosen = list(files)
        what = f"of split {split!r}"
    if not chosen:
        listing = ", ".join(rel[:20]) + (" ..." if len(rel) > 20 else "")
        raise DataError(f"{spec}: no .parquet or .jsonl file {what} (files: {listing}); "
                        f"pick a split (hf:owner/name:test) or a file pattern (hf:owner/name:data/*.parquet)")
    return chosen


def _hub_files(spec: str, log) -> list[Path]:
    """hf:owner/name[@revision][:split or file pattern] -> local files, fetched with huggingface_hub
    into its cache. Like a model, the dataset is downloaded once; later runs (and HF_HUB_OFFLINE=1)
    read the cache. Only .parquet and .jsonl files are fetched (all, or those a file pattern selects).
    The snapshot's folder, logged, is named after the commit: pass it as @revision to pin the data.
    """
    repo_revision, _, selector = spec[len("hf:"):].partition(":")
    repo, at, revision = repo_revision.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")) or (at and not revision):
        raise DataError(f"{spec}: expected hf:owner/name[@revision], optionally followed by :split or "
                        f":<file pattern>")
    pattern = selector if _names_files(selector) else None
    try:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(repo, repo_type="dataset", revision=revision or None,
                                      allow_patterns=[pattern] if pattern else [f"*{s}" for s in DATA_SUFFIXES]))
    except Exception as e:  # offline, DNS, 404, gated, auth: all mean "not fetched"
        raise DataError(f"could not fetch the dataset {repo} from the Hugging Face hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}). Without network access, fetch it once where "
                        f"there is (it is then cached, and HF_HUB_OFFLINE=1 reads the cache), or download its files "
                        f"and pass their directory: --data /path/to/dir") from None
    files = _select_split(_files_in(root), root, selector, spec)
    log(f"data {spec}: {len(files)} file{'s' * (len(files) != 1)} from {root}")
    return files


def resolve_sources(spec, log=print) -> list[Path]:
    """--data -> files. Comma-separated sources, each one of: a file (.parquet, or JSONL whatever its
    name), a directory (its .jsonl and .parquet files, recursively), a glob ("shards/*.parquet"), or a
    hub dataset "hf:owner/name" (train split), "hf:owner/name:split", "hf:owner/name:<file pattern>",
    each optionally pinned to a commit or tag: "hf:owner/name@<revision>:split"."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise DataError("no data given (expected a .jsonl or .parquet file, a directory, a glob or hf:owner/name)")
    files = []
    for part in parts:
        path = Path(part).expanduser()
        if part.startswith("hf:"):
            found = _hub_files(part, log)
        elif path.is_dir():
            found = _files_in(path)
        elif _is_pattern(part):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True)
                           if p.endswith(DATA_SUFFIXES) and os.path.isfile(p))
        elif path.is_file():
            found = [path]
        else:
            hub_like = part.count("/") == 1 and not part.startswith((".", "/", "~"))
            raise DataError(f"{path}: no such file" + (f" (a hub dataset is written hf:{part})" if hub_like else ""))
        if not found:
            raise DataError(f"{part}: no .jsonl or .parquet file found")
        files += found
    return files


# -----------------------------------------------------------------------------
# Reading: JSONL lines and parquet rows -> [(where, messages, tools)], every one validated


def read_json_lines(path: Path):
    """Yield (where, value) for each non-blank line of a JSON-lines file, where = "file:line"; a
    line that is not UTF-8 or not JSON raises DataError naming it. Values are not checked (a line
    may hold any JSON value): the caller says what it expects."""
    for lineno, raw in enumerate(Path(path).read_bytes().split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 (byte {e.start})") from None
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        yield where, value


def _read_jsonl(path: Path, messages_key, tools_key):
    """-> (conversations, how many carry enable_thinking). Blank lines are skipped; `where` is file:line."""
    out, thinking = [], 0
    for where, obj in read_json_lines(path):
        out.append((where, *validate_conversation(obj, where, messages_key, tools_key)))
        thinking += obj.get(THINKING_KEY) is not None
    if not out:
        raise DataError(f"{path}: file is empty (expected one JSON conversation per line)")
    return out, thinking


def _pyarrow_parquet(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:  # optional: only parquet input needs it
        raise DataError(f"{path}: reading parquet needs pyarrow, which is not installed: pip install pyarrow") from None
    return pq


def _read_parquet(path: Path, messages_key, tools_key):
    """-> (conversations, how many carry enable_thinking); `where` is "file:row N" (0-based, as in
    `datasets` and pandas). Only the columns used are read.

    Arrow's to_pylist() turns list and struct columns into plain Python lists and dicts (never numpy
    arrays, which pandas would give and which the authors' loader converts back with `_to_list`).
    """
    pq = _pyarrow_parquet(path)
    try:
        names = pq.read_schema(path).names
    except Exception as e:  # pyarrow's ArrowInvalid, OSError, ...: not a parquet file we can read
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    if messages_key not in names:
        raise DataError(f"{path}: no column {messages_key!r} (columns: {', '.join(names)}); "
                        f"name the conversation column with --messages-key")
    columns = list(dict.fromkeys(c for c in (messages_key, tools_key, THINKING_KEY) if c in names))
    table = pq.read_table(path, columns=columns)
    if table.num_rows == 0:
        raise DataError(f"{path}: file is empty (no rows)")
    messages = table.column(messages_key).to_pylist()
    tools = table.column(tools_key).to_pylist() if tools_key in columns else [None] * table.num_rows
    out = []
    for i, (m, t) in enumerate(zip(messages, tools)):
        where = f"{path}:row {i}"
        out.append((where, _normalize_messages(m, where, messages_key), _normalize_tools(t, where, tools_key)))
    thinking = table.num_rows - table.column(THINKING_KEY).null_count if THINKING_KEY in columns else 0
    return out, thinking


def read_conversations(spec, messages_key="messages", tools_key="tools", log=print):
    """--data -> [(where, messages, tools)] over all its files, in order, every conversation validated."""
    convs, thinking = [], 0
    for path in resolve_sources(spec, log):
        c, t = (_read_parquet if path.suffix == ".parquet" else _read_jsonl)(path, messages_key, tools_key)
        convs += c
        thinking += t
    if thinking:
        log(f"note: {thinking} conversations set {THINKING_KEY!r}; it is ignored, as Qwen2.5's chat "
            "template has no thinking mode (Qwen3's has)")
    nulls = sum(_has_null(tools) or any(_has_null(c["arguments"]) for m in ms for c in m["tool_calls"])
                for _, ms, tools in convs)
    if nulls:
        log(f"note: {nulls} conversations have null values in tool schemas or call arguments, rendered as "
            "stored; in parquet these are often other rows' keys (one struct type per column: see data.py)")
    return convs


def _has_null(x) -> bool:
    if isinstance(x, dict):
        return any(v is None or _has_null(v) for v in x.values())
    return isinstance(x, list) and any(v is None or _has_null(v) for v in x)


# -----------------------------------------------------------------------------
# Loading: conversations -> truncated samples with a summary line


def _truncate(sample, where, max_length, policy):
    """-> (sample or None, truncated?). `left` keeps the end of the conversation (the last answers)."""
    n = len(sample.input_ids)
    if n <= max_length:
        return sample, False
    if policy == "error":
        raise DataError(f"{where}: {n} tokens is longer than max_length={max_length} "
                        f"(raise --max-length or choose truncation right, left or drop)")
    if policy == "drop":
        return None, False
    cut = slice(0, max_length) if policy == "right" else slice(n - max_length, n)
    s = Sample(sample.input_ids[cut], sample.loss_mask[cut], sample.segments[cut])
    s.loss_mask[0] = 0  # token 0 is never a target (nothing before it predicts it)
    return s, True


def _build(convs, tokenizer, max_length, truncation):
    """-> (kept samples, stats dict)."""
    if truncation not in TRUNCATION_POLICIES:
        raise DataError(f"unknown truncation policy {truncation!r} (expected one of {', '.join(TRUNCATION_POLICIES)})")
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    kept, n_trunc, n_long, n_empty = [], 0, 0, 0
    for (where, _, _), sample in zip(convs, _encode_many(tokenizer, [(m, t) for _, m, t in convs])):
        sample, truncated = _truncate(sample, where, max_length, truncation)
        if sample is None:
            n_long += 1
        elif sum(sample.loss_mask) == 0:  # never train on a sample without a target
            n_empty += 1
        else:
            kept.append(sample)
            n_trunc += truncated
    lengths = [len(s.input_ids) for s in kept]
    stats = dict(conversations=len(convs), kept=len(kept), truncated=n_trunc, dropped=n_long + n_empty,
                 dropped_too_long=n_long, dropped_no_target=n_empty, tokens=sum(lengths),
                 supervised=sum(sum(s.loss_mask) for s in kept), lengths=lengths)
    return kept, stats


def _summary(name, st):
    lengths = st["lengths"]
    line = (f"data {name}: {st['conversations']} conversations | kept {st['kept']} "
            f"(truncated {st['truncated']}) | dropped {st['dropped']} ({st['dropped_too_long']} too long, "
            f"{st['dropped_no_target']} without supervised tokens)")
    if lengths:
        line += (f" | tokens {st['tokens']:,}, supervised {st['supervised']:,} "
                 f"({100 * st['supervised'] / st['tokens']:.1f}%) | length mean {statistics.fmean(lengths):.0f} "
                 f"median {statistics.median(lengths):.0f} max {max(lengths)}")
    return line


def load_dataset(data, tokenizer: Tokenizer, max_length=4096, truncation="right", log=print,
                 messages_key="messages", tools_key="tools") -> list[Sample]:
    """Read, validate, render, encode and truncate conversations; log one summary line.

    data: what resolve_sources accepts (files, directories, globs, hf:owner/name, comma-separated).
    messages_key / tools_key: the column (parquet) or key (JSONL) holding the messages and the tools.
    truncation: right (keep the start) | left (keep the end) | drop (skip long samples) | error.
    A sample left without any supervised token is dropped and counted, never trained on.
    """
    convs = read_conversations(data, messages_key, tools_key, log)
    samples, st = _build(convs, tokenizer, max_length, truncation)
    log(_summary(_display_name(data), st))
    if not samples:
        raise DataError(f"{data}: no supervised token in any conversation (need assistant turns within "
                        f"max_length={max_length}): nothing to train on")
    return samples


def _display_name(data) -> str:
    return Path(data).name if Path(str(data)).is_file() else str(data)


# -----------------------------------------------------------------------------
# Batching


def collate(samples: list[Sample], pad_id: int) -> dict:
    """Right-pad to the longest sample of THIS batch (not to max_length: no wasted compute)."""
    B, S = len(samples), max(len(s.input_ids) for s in samples)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, S, dtype=torch.bool)
    loss_mask = torch.zeros(B, S, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        attention_mask[i, :n] = True
        loss_mask[i, :n] = torch.tensor(s.loss_mask, dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def epoch_batches(lengths, batch_size, seed, epoch, rank=0, world_size=1, group_by_length=False) -> list[list[int]]:
    """This rank's batches of sample indices for one epoch; a pure function of its arguments, so a
    resumed run rebuilds the same list and skips the batches already done.

    The index order is the one of torch's DistributedSampler(shuffle=True, seed, drop_last=False)
    after set_epoch(epoch): one permutation of all samples seeded with seed + epoch, padded by
    wrapping around to a multiple of world_size, then every world_size-th index from `rank`.
    Every rank thus gets the same number of batches (a rank running out early would hang DDP).

    group_by_length: within blocks of 64 batches, sort this rank's indices by length so each batch
    holds similar lengths (less padding), then shuffle the batch order. The shuffle does not depend
    on the rank, so all ranks tend to process similarly long batches at the same step.
    """
    n = len(lengths)
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    total = math.ceil(n / world_size) * world_size
    while len(order) < total:  # wrap around (more than once if world_size > n)
        order += order[: total - len(order)]
    mine = order[rank:total:world_size]
    if group_by_length:
        block = 64 * batch_size
        mine = [j for b in range(0, len(mine), block)
                for j in sorted(mine[b:b + block], key=lambda j: -lengths[j])]
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    if group_by_length:
        g.manual_seed(seed + epoch + 1_000_003)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


# -----------------------------------------------------------------------------
# CLI: show what the model sees, and dataset statistics


def _cli_tokenizer(path):
    return load_tokenizer(path) if path else byte_tokenizer()


def show(data, index, tokenizer, messages_key="messages", tools_key="tools"):
    convs = read_conversations(data, messages_key, tools_key, log=lambda line: print(line, file=sys.stderr))
    if not 0 <= index < len(convs):
        raise DataError(f"{data}: --index {index} out of range ({len(convs)} conversations, 0-based)")
    where, messages, tools = convs[index]
    text, pieces = _render(messages, tools, False, tokenizer.default_system)
    enc = tokenizer.tk.encode(text, add_special_tokens=False)
    mask, _ = _label_tokens(enc.offsets, pieces)
    # Character-level supervision from the tokens, so a token straddling a boundary shows as it is trained.
    sup = [0] * len(text)
    for (s, e), m in zip(enc.offsets, mask):
        sup[s:e] = [m] * (e - s)
    color = sys.stdout.isatty()
    on, off = ("\033[32m", "\033[0m") if color else ("⟦", "⟧")
    out, i = [], 0
    while i < len(text):
        j = i
        while j < len(text) and sup[j] == sup[i]:
            j += 1
        out.append(on + text[i:j] + off if sup[i] else text[i:j])
        i = j
    print(f"{where}: {len(enc.ids)} tokens, {sum(mask)} supervised "
          f"({'green' if color else 'between ⟦ ⟧'}), {len(messages)} messages")
    print("".join(out), end="" if text.endswith("\n") else "\n")


def stats(data, tokenizer, max_length, truncation, messages_key="messages", tools_key="tools"):
    convs = read_conversations(data, messages_key, tools_key)
    samples, st = _build(convs, tokenizer, max_length, truncation)
    print(_summary(_display_name(data), st))
    roles = {r: sum(m["role"] == r for _, ms, _ in convs for m in ms) for r in ROLES}
    calls = sum(len(m["tool_calls"]) for _, ms, _ in convs for m in ms)
    print("messages: " + ", ".join(f"{r} {c}" for r, c in roles.items()) + f" | tool calls {calls} | "
          f"with tools block {sum(t is not None for _, _, t in convs)}")
    if samples:
        seg_counts = np.bincount(np.concatenate([np.asarray(s.segments) for s in samples]), minlength=len(SEGMENT_NAMES))
        print("tokens by segment: " + ", ".join(f"{n} {c:,}" for n, c in zip(SEGMENT_NAMES, seg_counts.tolist())))
        q = np.percentile(st["lengths"], [0, 10, 50, 90, 99, 100])
        print("length percentiles: " + ", ".join(f"p{p} {v:.0f}" for p, v in zip((0, 10, 50, 90, 99, 100), q)))
        sup = [sum(s.loss_mask) for s in samples]
        print(f"supervised tokens per sample: mean {statistics.fmean(sup):.1f}, min {min(sup)}, max {max(sup)}")


DATA_HELP = ("conversations: a .jsonl or .parquet file, a directory or glob of them, or a hub dataset "
             "hf:owner/name[@revision][:split or file pattern]; several comma-separated")


def main(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", required=True, help=DATA_HELP)
    common.add_argument("--tokenizer", default=None,
                        help="model directory with tokenizer.json (default: byte tokenizer)")
    common.add_argument("--messages-key", default="messages", help="column (parquet) or key (JSONL) of the messages")
    common.add_argument("--tools-key", default="tools", help="column (parquet) or key (JSONL) of the tool schemas")
    p = argparse.ArgumentParser(description="Inspect chat data as the model sees it.")
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("show", parents=[common], help="print one conversation with the supervised tokens highlighted")
    ps.add_argument("--index", type=int, default=0,
                    help="conversation index (0-based, over all files in order; blank lines skipped)")
    pt = sub.add_parser("stats", parents=[common], help="counts and token lengths")
    pt.add_argument("--max-length", type=int, default=4096)
    pt.add_argument("--truncation", default="right", choices=TRUNCATION_POLICIES)
    args = p.parse_args(argv)
    keys = dict(messages_key=args.messages_key, tools_key=args.tools_key)
    try:
        tok = _cli_tokenizer(args.tokenizer)
        if args.cmd == "show":
            show(args.data, args.index, tok, **keys)
        else:
            stats(args.data, tok, args.max_length, args.truncation, **keys)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `python data.py show ... | head`
        sys.stderr.close()


if __name__ == "__main__":
    main()
