"""
Generate the bundled agentic dataset: examples/agentic.jsonl (train) and examples/agentic-heldout.jsonl.

    python -m examples.make_agentic                # fixed seed: rerunning rewrites identical files
    python -m examples.make_agentic --records 16   # a harder task: 16 records per tool output

The task is retrieval in agentic form. The user asks for the office city and the shift of one
person; the assistant calls `roster(team)` and `shifts(day)`, each returning one record per line
about several people, and the final answer copies that person's two values:

    user       Office and Tuesday shift of Ivy (team Falcon)?
    assistant  <tool_call> roster {"team": "Falcon"} </tool_call> <tool_call> shifts {"day": "Tuesday"} </tool_call>
    tool       Lima Omar \n Oslo Ivy \n Rome Zoe ...      (the haystack: R records "value Name")
    tool       early Ana \n night Ivy \n ...               (R records)
    assistant  Found Ivy Oslo, Ivy night.                  answer = "Found Ivy Oslo, Ivy night"

The city and the shift are drawn at random for every conversation, so they can only be found in
the tool outputs, never guessed from the question. Cities and shifts come from small closed sets
(8 x 4: chance is 3 %). Every person has a one-word name (one token of the demo's word-level
tokenizer), distinct within a conversation.

Why this layout: the lookup is the smallest circuit a transformer can learn (two attention
layers: in the records, the name token takes in the value just before it; in the answer, the
name attends to the same name in the records and reads that value). NOTE: the value comes BEFORE
the name in the records because FocuSFT trains with bidirectional attention inside the tool
outputs (Eq. 5) while inference is causal: with "Name value" records the easiest circuit found in
training has the name look at the value AFTER it, which a causal model at inference cannot do
(measured: such runs copy one of the listed values, at random, into held-out answers).

Training conversations ask about 1..5 people (more lookups per conversation: faster learning)
with 1..R records per tool output (the short ones teach the lookup, the long ones the haystack);
held-out ones ask about one person among exactly R records (--records, default 8). Each line
has the usual "messages", plus "answer" (ignored by training, used by eval.py). A held-out
question (person, team, day) never occurs in the training file.
"""

import argparse
import json
import random
import statistics
from pathlib import Path

import data

SYSTEM = "You are a staff assistant. Use the tools, then answer with the records found."
NAMES = ["Ivy", "Omar", "Ana", "Leo", "Mia", "Noah", "Zoe", "Ravi", "Lena", "Yuki", "Ines", "Hugo", "Sara",
         "Theo", "Nina", "Ali", "Eva", "Max", "Rosa", "Kai", "Ada", "Ben", "Cleo", "Dan", "Elif", "Finn", "Gia",
         "Hana", "Igor", "Jade", "Karl", "Luz", "Milo", "Nora", "Otto", "Pia", "Rui", "Sven", "Tara", "Uma"]
TEAMS = ["Falcon", "Heron", "Otter", "Lynx", "Bison", "Raven", "Cobra", "Moose"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
CITIES = ["Oslo", "Lima", "Rome", "Cairo", "Perth", "Quito", "Tokyo", "Dakar"]   # answer values
SHIFTS = ["early", "noon", "late", "night"]                                      # answer values
QUESTIONS = [
    "Office and {day} shift of {names} (team {team})?",
    "Team {team}: which office, and which shift on {day}, for {names}?",
    "On {day}, which shift and which office for {names} of team {team}?",
]


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def records(rng, wanted, values, n):
    """n lines "value Name" in random order: the people asked about, with their values (a dict),
    and n - len(wanted) other people with random values."""
    others = rng.sample([x for x in NAMES if x not in wanted], n - len(wanted))
    rows = [(o, rng.choice(values)) for o in others] + list(wanted.items())
    rng.shuffle(rows)
    return "\n".join(f"{v} {who}" for who, v in rows)


def conversation(rng, n_records, n_people=1):
    """-> (json object, question key); n_records lines in each tool output, about n_people asked for."""
    people, team, day = rng.sample(NAMES, n_people), rng.choice(TEAMS), rng.choice(DAYS)
    cities = {p: rng.choice(CITIES) for p in people}
    shifts = {p: rng.choice(SHIFTS) for p in people}
    answer = "Found " + ", ".join(f"{p} {cities[p]}, {p} {shifts[p]}" for p in people)
    names = people[0] if n_people == 1 else ", ".join(people[:-1]) + " and " + people[-1]
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": rng.choice(QUESTIONS).format(names=names, team=team, day=day)},
        {"role": "assistant", "content": None, "tool_calls": [call("roster", team=team), call("shifts", day=day)]},
        {"role": "tool", "content": records(rng, cities, CITIES, n_records)},
        {"role": "tool", "content": records(rng, shifts, SHIFTS, n_records)},
        {"role": "assistant", "content": answer + "."},
    ]
    return {"messages": messages, "answer": answer}, (tuple(people), team, day)


def generate(seed=1234, n_train=4000, n_heldout=200, max_records=8, max_people=5):
    """-> (train, heldout). Held-out: one person, max_records records per tool output. Training:
    1..max_people people (more lookups per conversation: faster learning), with 1..max_records
    records (at least one per person). No held-out question occurs in training."""
    if not 1 <= max_records < len(NAMES):
        raise ValueError(f"records must be in 1..{len(NAMES) - 1}, not {max_records}")
    rng = random.Random(seed)
    heldout, held_keys = [], set()
    while len(heldout) < n_heldout:  # first, so that training can avoid their questions
        c, key = conversation(rng, max_records)
        if key not in held_keys:
            held_keys.add(key)
            heldout.append(c)
    train = []
    while len(train) < n_train:
        k = rng.randint(1, min(max_people, max_records))
        c, key = conversation(rng, rng.randint(k, max_records), k)
        if key not in held_keys:
            train.append(c)
    return train, heldout


def write(path, convs):
    with open(path, "w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    texts = [data.render_chat(c["messages"])[0] for c in convs]
    tok = data.word_tokenizer(texts)
    sizes = [len(tok.encode(t)) for t in texts]
    print(f"{path}: {len(convs)} conversations, {path.stat().st_size / 1e6:.2f} MB | word tokens "
          f"min {min(sizes)} mean {statistics.fmean(sizes):.0f} max {max(sizes)}")


def main():
    p = argparse.ArgumentParser(description="Generate examples/agentic.jsonl and examples/agentic-heldout.jsonl.")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-heldout", type=int, default=200)
    p.add_argument("--records", type=int, default=8,
                   help="records per tool output in held-out conversations (training: 1 to this many)")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent))
    args = p.parse_args()
    try:
        train, heldout = generate(args.seed, args.n_train, args.n_heldout, args.records)
    except ValueError as e:
        p.error(str(e))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "agentic.jsonl", train)
    write(out / "agentic-heldout.jsonl", heldout)


if __name__ == "__main__":
    main()
