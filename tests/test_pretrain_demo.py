"""Tests for examples/pretrain_demo_base.py: its text stays inside the demo tokenizer's vocabulary
(a word outside it would be <unk>), its accuracy counts what it says, and a run is deterministic and
saves a base that train.py's loader reads."""

import random

import pytest
import torch

import data
from examples import make_agentic
from examples import pretrain_demo_base as pre
from model import Qwen2


@pytest.fixture(scope="module")
def tok():
    return pre.demo_tokenizer()


@pytest.mark.parametrize("kind", ["all", "one", "copy", "reverse"])
def test_pretraining_text_is_in_the_demo_vocabulary(tok, kind):
    rng, unk = random.Random(3), tok.tk.token_to_id("<unk>")
    p_copy, p_reverse = float(kind == "copy"), float(kind == "reverse")
    b = pre.batch(rng, tok, 16, 12, "one" if kind == "one" else "all", p_reverse, p_copy)
    real = b["attention_mask"]
    assert not (b["input_ids"][real] == unk).any()
    assert b["loss_mask"].sum(1).min() > 0


def test_reverse_and_copy_answers(tok):
    conv = pre.reverse(random.Random(0), 5)
    records = dict(line.split(" ") for line in conv["messages"][3]["content"].splitlines())  # city -> name
    answer = conv["messages"][5]["content"].removeprefix("Found ").removesuffix(".")
    pairs = [pair.split(" ") for pair in answer.split(", ")]
    assert len(records) == len(pairs) == 5 and all(records[c] == n for c, n in pairs)
    conv = pre.copy(random.Random(0), 4)
    assert conv["messages"][5]["content"] == conv["messages"][3]["content"]


class Oracle(torch.nn.Module):
    """Predicts the true next token everywhere, except at the positions in `spoil` (argmax id 0)."""

    def __init__(self, spoil=()):
        super().__init__()
        self.spoil = spoil

    def hidden_states(self, ids):
        h = torch.nn.functional.one_hot(torch.roll(ids, -1, 1), 256).float()  # (B, S, 256): the next token
        for row, pos in self.spoil:
            h[row, pos] = 0.0
        return h

    def logits(self, h):
        return h


def test_hits_need_every_value_right(tok):
    """The oracle scores every conversation; one wrong value token makes its conversation, and only
    that one, a miss; a wrong token that is not a value does not."""
    b = pre.batch(random.Random(1), tok, 4, 8, "one")
    value_ids = torch.tensor([tok.tk.token_to_id("Ġ" + v) for v in make_agentic.CITIES + make_agentic.SHIFTS])
    targets = b["loss_mask"][1] & torch.isin(b["input_ids"][1], value_ids)
    value_at = targets.nonzero()[0, 0].item() - 1  # the position that predicts the first value
    other_at = (b["loss_mask"][2] & ~torch.isin(b["input_ids"][2], value_ids)).nonzero()[0, 0].item() - 1
    assert pre.loss_and_hits(Oracle(), b, value_ids)[1].tolist() == [True] * 4
    assert pre.loss_and_hits(Oracle([(1, value_at)]), b, value_ids)[1].tolist() == [True, False, True, True]
    assert pre.loss_and_hits(Oracle([(2, other_at)]), b, value_ids)[1].tolist() == [True] * 4


def test_a_short_run_is_deterministic_and_loads(tmp_path, tok):
    outs = []
    for name in ("a", "b"):
        args = pre.parse_args(["--steps", "3", "--eval-every", "3", "--out", str(tmp_path / name)])
        pre.pretrain(args, tok)
        outs.append((tmp_path / name / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    model = Qwen2.from_pretrained(tmp_path / "a")
    assert data.load_tokenizer(tmp_path / "a").tk.to_str() == tok.tk.to_str()
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size >= tok.tk.get_vocab_size()
