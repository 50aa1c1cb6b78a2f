"""
Generate the bundled agentic dataset: examples/agentic.jsonl (train) and examples/agentic-heldout.jsonl.

    python -m examples.make_agentic            # fixed seed: rerunning rewrites identical files

The task is a needle-in-a-haystack in agentic form. The user asks for the office city and the
shift of one person; the assistant calls `roster(team)` (one or two teams) and `shifts(day)`,
each returning a list of records about many people, and the final answer copies the two facts
that belong to that person:

    user       Which office and shift does Ivy Park from team Falcon have on Tuesday?
    assistant  <tool_call> roster {"team": "Falcon"} </tool_call> <tool_call> shifts {"day": "Tuesday"} </tool_call>
    tool       Omar Lind, Lima \\n Ivy Park, Oslo \\n Ivy Moss, Rome ...       (the haystack)
    tool       Ana Ruiz: early \\n Ivy Park: night \\n ...
    assistant  Ivy Park is in Oslo, night shift.                              answer = "Oslo, night shift"

Distractors share first or last names with the person, so matching the whole name is needed.
Cities and shifts come from small closed sets (8 x 4), so a tiny model can learn the format and
accuracy (the answer string appearing verbatim in the final message) is easy to measure.
Sizes suit the tiny byte-level demo model: ~600-900 bytes per rendered conversation (the tools
are described in the system prompt; a "tools" list would add the template's ~700-byte tools block).

Each line has the usual "messages", plus "answer" (ignored by training, used by eval.py). A held-out question (person, teams, day) never occurs in the training file.
"""

import argparse
import json
import random
import statistics
from pathlib import Path

import data

# The tools are described in the system prompt rather than as a "tools" list: the template's tools
# block is ~700 identical bytes per conversation, which would double the demo's training cost.
SYSTEM = ("You are a staff assistant. Tools: roster(team) lists a team's people and offices; "
          "shifts(day) lists everyone's shift on that day. Answer in one line.")
FIRST = ["Ivy", "Omar", "Ana", "Leo", "Mia", "Noah", "Zoe", "Ravi", "Lena", "Yuki", "Ines", "Hugo",
         "Sara", "Theo", "Nina", "Ali", "Eva", "Max", "Rosa", "Kai"]
LAST = ["Park", "Lind", "Ruiz", "Moss", "Chen", "Sato", "Okafor", "Vogel", "Haddad", "Brandt", "Duarte",
        "Novak", "Patel", "Berg", "Costa", "Quinn", "Ito", "Mbeki", "Frost", "Klein"]
TEAMS = ["Falcon", "Heron", "Otter", "Lynx", "Bison", "Raven", "Cobra", "Moose"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
CITIES = ["Oslo", "Lima", "Rome", "Cairo", "Perth", "Quito", "Tokyo", "Dakar"]   # answer values
SHIFTS = ["early", "day", "late", "night"]                                       # answer values
QUESTIONS = [
    "Which office and shift does {name} from team {teams} have on {day}?",
    "{name} is in team {teams}. Where is their office, and what shift do they work on {day}?",
    "Find the office city and the {day} shift of {name} (team {teams}).",
]
OPENERS = [None, None, "Let me check.", "I'll look that up."]  # content next to the tool calls, sometimes


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def distractor_names(rng, target, k):
    """k other names, about half sharing the first or last name with the target (harder to match)."""
    first, last = target.split()
    names = []  # a list, not a set: set order depends on PYTHONHASHSEED and would break the fixed seed
    while len(names) < k:
        r = rng.random()
        n = f"{first} {rng.choice(LAST)}" if r < 0.25 else f"{rng.choice(FIRST)} {last}" if r < 0.5 else \
            f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        if n != target and n not in names:
            names.append(n)
    return names


def conversation(rng, n=5):
    """-> (json object, question key); n records per roster, n + 2 in the shift list."""
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    day, city, shift = rng.choice(DAYS), rng.choice(CITIES), rng.choice(SHIFTS)
    two_teams = rng.random() < 0.35  # the user is unsure of the team: three tool calls instead of two
    teams = rng.sample(TEAMS, 2 if two_teams else 1)
    home = rng.choice(teams)

    # Haystacks: each roster has n people (the person in exactly one of them), the shift list n + 2.
    others = distractor_names(rng, name, (n - 1) * len(teams) + n + 1)
    rosters = {}
    for t in teams:
        members = [others.pop() for _ in range(n - 1 if t == home else n)]
        rows = [(m, rng.choice(CITIES)) for m in members]
        if t == home:
            rows.insert(rng.randrange(n), (name, city))
        rosters[t] = "\n".join(f"{m}, {c}" for m, c in rows)
    rows = [(m, rng.choice(SHIFTS)) for m in others[:n + 1]]
    rows.insert(rng.randrange(n + 2), (name, shift))
    shift_list = "\n".join(f"{m}: {s}" for m, s in rows)

    question = rng.choice(QUESTIONS).format(name=name, teams=" or ".join(teams), day=day)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    roster_calls = [call("roster", team=t) for t in teams]
    if rng.random() < 0.5:  # all calls in one assistant turn, then all results
        messages.append({"role": "assistant", "content": rng.choice(OPENERS),
                         "tool_calls": roster_calls + [call("shifts", day=day)]})
        messages += [{"role": "tool", "content": rosters[t]} for t in teams]
        messages.append({"role": "tool", "content": shift_list})
    else:  # rosters first, then the shift list
        messages.append({"role": "assistant", "content": rng.choice(OPENERS), "tool_calls": roster_calls})
        messages += [{"role": "tool", "content": rosters[t]} for t in teams]
        messages.append({"role": "assistant", "content": None, "tool_calls": [call("shifts", day=day)]})
        messages.append({"role": "tool", "content": shift_list})
    answer = f"{city}, {shift} shift"
    messages.append({"role": "assistant", "content": f"{name} is in {answer}."})
    return {"messages": messages, "answer": answer}, (name, tuple(teams), day)


def write(path, convs):
    with open(path, "w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    sizes = [len(data.render_chat(c["messages"], c.get("tools"))[0].encode()) for c in convs]
    tok = data.byte_tokenizer()
    sup = [sum(data.encode_chat(tok, c["messages"], c.get("tools")).loss_mask) for c in convs[:200]]
    print(f"{path}: {len(convs)} conversations, {path.stat().st_size / 1e6:.2f} MB | rendered bytes "
          f"min {min(sizes)} mean {statistics.fmean(sizes):.0f} max {max(sizes)} | supervised bytes "
          f"(first 200) mean {statistics.fmean(sup):.0f}")


def main():
    p = argparse.ArgumentParser(description="Generate examples/agentic.jsonl and examples/agentic-heldout.jsonl.")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-heldout", type=int, default=200)
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent))
    p.add_argument("--records", type=int, default=5, help="people per roster (the shift list has 2 more)")
    args = p.parse_args()

    rng = random.Random(args.seed)
    convs, seen = [], set()
    while len(convs) < args.n_train + args.n_heldout:
        c, key = conversation(rng, args.records)
        if key not in seen:  # unique questions, so held-out ones are never seen in training
            seen.add(key)
            convs.append(c)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "agentic.jsonl", convs[:args.n_train])
    write(out / "agentic-heldout.jsonl", convs[args.n_train:])
    answers = [c["answer"] for c in convs]
    print(f"{len(set(answers))} distinct answers; most common {max(map(answers.count, set(answers)))} times "
          f"of {len(answers)}")


if __name__ == "__main__":
    main()
