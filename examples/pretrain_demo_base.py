"""
An experiment: pretrain a small base model on the demo task's text (examples/make_agentic.py) so
that the demo could fine-tune a model that already looks a name up, as the paper fine-tunes a
pretrained model. NOTE: in the budgets measured so far it does NOT learn the lookup (results and
commands in docs/data.md, "Pretraining a base"); the demo still trains from scratch.

    python -m examples.pretrain_demo_base --steps 3000 --out /tmp/base   # the multi-query setup
    python -m examples.pretrain_demo_base --copy 0.3 --out /tmp/base     # with copying mixed in

The pretraining text is the demo's own conversations (chat template, tool calls, tool outputs of
"value Name" records), drawn afresh at every step, asking about EVERY person in the records
(multi-query associative recall: one conversation holds up to --max-records lookups, not one or
two). The number of records grows from 2 to --max-records over the first --curriculum steps. The
loss is on the assistant's turns, as in fine-tuning, so a fine-tune would start at a low loss.
Optional mixtures: --copy (the answer repeats a tool output: plain copying, which forms a
previous-token attention head, the first half of the lookup circuit) and --reverse (people looked
up by city, the direction in which the name follows the value it is looked up by).

Progress is lookup accuracy at 8 records ("acc8"): fresh conversations of the held-out shape (one
person, 8 records per tool output), teacher-forced, the share with BOTH values (city and shift)
predicted right; copying the values of a random listed record gives about 0.08, chance is 1/32. Cost is
logged in process CPU time (user + sys; with --threads 1 it is the time one core spent) and wall
time. Deterministic for a given --seed (acc8 agreed at 1 and 2 threads). --out saves the latest
base (HF layout, demo tokenizer) at every evaluation; `train.py --model DIR` fine-tunes it.
"""

import argparse
import math
import random
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data
from examples import make_agentic
from model import TINY_WORDS, Qwen2, Qwen2Config

EXAMPLES = Path(__file__).resolve().parent


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads): the cost on a shared machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def demo_tokenizer() -> data.Tokenizer:
    """The word-level tokenizer `train.py --model tiny-words` fits on examples/agentic.jsonl."""
    convs = data.read_conversations(str(EXAMPLES / "agentic.jsonl"), log=lambda s: None)
    return data.word_tokenizer(data.render_chat(m, t)[0] for _, m, t in convs)


def reverse(rng: random.Random, n: int) -> dict:
    """A conversation whose answer looks people up by city: "Found Oslo Ivy, Lima Omar." (n <= 8
    distinct cities). The easy direction for a causal model: the name follows its city."""
    conv, _ = make_agentic.conversation(rng, n, n)
    people = rng.sample(make_agentic.NAMES, n)
    cities = dict(zip(people, rng.sample(make_agentic.CITIES, n)))
    conv["messages"][3]["content"] = "\n".join(f"{c} {p}" for p, c in cities.items())
    asked = rng.sample(people, n)
    conv["messages"][5]["content"] = "Found " + ", ".join(f"{cities[p]} {p}" for p in asked) + "."
    return conv


def copy(rng: random.Random, n: int) -> dict:
    """A conversation whose answer repeats the first tool output verbatim: plain copying, learned
    through a previous-token attention head, the first half of the lookup circuit."""
    conv, _ = make_agentic.conversation(rng, n, 1)
    conv["messages"][5]["content"] = conv["messages"][3]["content"]
    return conv


def batch(rng: random.Random, tok, size: int, max_records: int, people: str, p_reverse=0.0, p_copy=0.0) -> dict:
    """`size` fresh conversations with 1..max_records records each; people="all" asks about every
    person in the records (the multi-query text), "one" about one (the held-out shape). Shares
    p_copy and p_reverse of them are `copy` and `reverse` conversations instead."""
    samples = []
    for _ in range(size):
        n = rng.randint(1, max_records) if people == "all" else max_records
        u = rng.random() if p_copy or p_reverse else 1.0  # no draw without mixtures (the stream measured)
        if u < p_copy:
            conv = copy(rng, n)
        elif u < p_copy + p_reverse:
            conv = reverse(rng, min(n, len(make_agentic.CITIES)))
        else:
            conv, _ = make_agentic.conversation(rng, n, n if people == "all" else 1)
        samples.append(data.encode_chat(tok, conv["messages"]))
    return data.collate(samples, tok.pad_token_id)


def supervised(model, b: dict):
    """Logits (N, V) and targets (N,) at the N supervised positions, and the row of each."""
    ids, mask = b["input_ids"], b["loss_mask"]
    h = model.hidden_states(ids)  # (B, S, D); causal, right padding is never attended to
    pred_pos = mask[:, 1:]  # position t predicts token t+1
    return model.logits(h[:, :-1][pred_pos]), ids[:, 1:][pred_pos], pred_pos.nonzero()[:, 0]


def loss_and_hits(model, b: dict, value_ids: torch.Tensor):
    """Mean cross-entropy over the supervised tokens; and, per conversation, whether every value
    token of the answer (city, shift) is the argmax prediction. Logits only where supervised."""
    logits, targets, row = supervised(model, b)
    loss = F.cross_entropy(logits.float(), targets)
    right = (logits.argmax(-1) == targets) | ~torch.isin(targets, value_ids)
    wrong = torch.zeros(b["input_ids"].shape[0]).index_add_(0, row, (~right).float())
    return loss, wrong == 0


@torch.no_grad()
def diagnose(path, tok):
    """What a saved base does: per-field accuracy with 1, 2, 4 and 8 records (beside the accuracy of
    copying the values of a random listed record), and token accuracy of copying 8 records."""
    model, rng = Qwen2.from_pretrained(path).eval(), random.Random(1)
    ids = {k: torch.tensor([tok.tk.token_to_id("Ġ" + v) for v in vs])
           for k, vs in (("city", make_agentic.CITIES), ("shift", make_agentic.SHIFTS))}
    for n in (1, 2, 4, 8):
        logits, targets, _ = supervised(model, batch(rng, tok, 128, n, "one"))
        right = logits.argmax(-1) == targets
        print(f"{n} records: " + ", ".join(
            f"{k} {right[torch.isin(targets, v)].float().mean():.2f} (random record "
            f"{(1 + (n - 1) / len(v)) / n:.2f})" for k, v in ids.items()))
    logits, targets, _ = supervised(model, batch(rng, tok, 128, 8, "one", p_copy=1.0))
    print(f"copying 8 records: token accuracy {(logits.argmax(-1) == targets).float().mean():.2f}")


@torch.no_grad()
def lookup_accuracy(model, tok, value_ids, n=256, records=8, seed=0) -> float:
    """Share of fresh one-person conversations with `records` records where both values are right."""
    model.eval()
    rng, hits = random.Random(seed), []
    for _ in range(n // 64):
        hits.append(loss_and_hits(model, batch(rng, tok, 64, records, "one"), value_ids)[1])
    model.train()
    return torch.cat(hits).float().mean().item()


def build(args, tok) -> Qwen2:
    vocab = -(-tok.tk.get_vocab_size() // 16) * 16  # as train.py's tiny-words
    cfg = dict(TINY_WORDS, vocab_size=vocab, eos_token_id=tok.eos_token_id, hidden_size=args.hidden,
               intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
               num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)
    torch.manual_seed(args.seed)
    return Qwen2(Qwen2Config(**cfg))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the base here (HF layout, with the tokenizer)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--max-records", type=int, default=12)
    p.add_argument("--curriculum", type=int, default=1000, help="steps over which records grow from 2 to --max-records")
    p.add_argument("--people", choices=["all", "one"], default="all")
    p.add_argument("--copy", type=float, default=0.0, help="share of conversations repeating a tool output")
    p.add_argument("--reverse", type=float, default=0.0, help="share of conversations looking people up by city")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--diagnose", metavar="DIR", help="only print what the base saved in DIR does (see diagnose)")
    return p.parse_args(argv)


def pretrain(args, tok):
    """The loop: acc8 (and the CPU and wall time so far) every --eval-every steps, then the base
    saved to --out; the training loss and the share of training conversations with every value
    right ("train-hits") every 50 steps."""
    value_ids = torch.tensor([tok.tk.token_to_id("Ġ" + v) for v in make_agentic.CITIES + make_agentic.SHIFTS])
    model = build(args, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    print(f"{sum(q.numel() for q in model.parameters()) / 1e6:.2f}M parameters; {vars(args)}", flush=True)
    rng, cpu0, wall0 = random.Random(args.seed), cpu_seconds(), time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            acc = lookup_accuracy(model, tok, value_ids)
            print(f"step {step:5d}  cpu {(cpu_seconds() - cpu0) / 60:6.2f} min  wall {(time.time() - wall0) / 60:6.2f} min"
                  f"  acc8 {acc:.3f}", flush=True)
            if args.out:  # the latest base, so that a stopped run leaves one
                model.save_pretrained(args.out, extra_files=tok.files())
        if step == args.steps:
            break
        grown = 2 + (args.max_records - 2) * min(1.0, step / max(1, args.curriculum))
        b = batch(rng, tok, args.batch_size, round(grown), args.people, args.reverse, args.copy)
        loss, hits = loss_and_hits(model, b, value_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"  step {step:5d} loss {loss.item():.3f} train-hits {hits.float().mean().item():.2f} "
                  f"records<={round(grown)}", flush=True)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    tok = demo_tokenizer()
    if args.diagnose:
        diagnose(args.diagnose, tok)
    else:
        pretrain(args, tok)


if __name__ == "__main__":
    main()
