"""Tests for train.py (the trainer). Every test compares against a reference:

  * 2 processes (torchrun, gloo) against 1 process with the same global batch, for each loss
    normalisation, and FocuSFT under DDP against a 2-rank reference written out here in one process
    (each rank's fast-weight generator is seeded seed + 1000 * rank, so a 1-process run draws other
    fast weights and cannot be the reference for a bilevel method);
  * gradient accumulation over 4 micro-batches against one batch of 4;
  * an interrupted and resumed run against the uninterrupted one, bit for bit (CPU, fp32): resumed
    from a mid-epoch checkpoint, from an epoch boundary, after a real kill, and with 2 ranks;
  * the schedule against transformers.get_cosine_schedule_with_warmup (or a re-derivation of it),
    the weight-decay groups against transformers' Trainer rule, the saved checkpoint against
    transformers' Qwen2ForCausalLM logits;
  * every user error against its message; the CLI's exit code 2 without a traceback in subprocesses
    (the other cases raise, in this process, one of the exception types the CLI turns into that).

Runs use the tiny random model (--model tiny), fp32 on CPU and a generated JSONL of short
conversations (60-160 byte tokens), so a run takes seconds. NOTE: AdamW's first update is about
lr * sign(grad) whatever the gradient's scale, so comparing weights alone would miss a wrong
normalisation constant; the tests also compare the logged loss and pre-clip gradient norm.
Run: python -m pytest tests/test_train.py
"""

import contextlib
import gc
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

REPO = Path(__file__).resolve().parents[1]

import checkpoint
import data
import focusft
import health
import memory
import train
from model import TINY, ModelError, Qwen2, Qwen2Config

# Each subprocess gets one thread: the CI box has 2 cores, and torchrun starts 2 processes.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(k, None)

# Flags shared by the runs: tiny model, fp32 on CPU, no warm-up (every step updates), an lr large
# enough that a wrong gradient moves the weights visibly; a stuck 2-process run stops within 2 min
# with the phase it was stuck in (health.Watchdog), before run_cli's timeout.
BASE = ["--model", "tiny", "--device", "cpu", "--dtype", "fp32", "--max-length", "256", "--dist-timeout", "120",
        "--no-grad-checkpointing", "--warmup-ratio", "0", "--lr", "1e-3"]


# -----------------------------------------------------------------------------
# Helpers


def write_data(path: Path, n: int, seed: int = 0, equal_targets: bool = False) -> Path:
    """n short conversations. The byte tokenizer maps each ASCII character to one token, so an
    answer of k characters gives exactly k + 2 supervised tokens (answer, <|im_end|>, "\\n")."""
    rng = random.Random(seed)
    letters = "abcdefghij klmnop"
    with open(path, "w") as f:
        for _ in range(n):
            user = "".join(rng.choice(letters) for _ in range(rng.randint(20, 90)))
            answer = "".join(rng.choice(letters) for _ in range(24 if equal_targets else rng.randint(6, 48)))
            msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user},
                    {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


LAUNCHES: list[str] = []  # what this test's launches printed, for the message of one that times out


@pytest.fixture(autouse=True)
def forget_launches():
    LAUNCHES.clear()


def run_cli(args, nproc: int = 1, env=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """python train.py ARGS, or torchrun --standalone (free port) with nproc processes. A launch that
    exceeds `timeout` fails the test with every worker's stacks and what this test's launches printed."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.Popen(launcher + [str(REPO / "train.py"), *map(str, args)], cwd=REPO, env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        ranks = workers(proc)
        notes = dump_stacks(ranks)
        time.sleep(2)  # the dumps reach stderr
        # NOTE: torchrun starts each worker in a session of its own, out of reach of a process-group
        # kill; on SIGTERM it stops them itself (SIGKILL after 30 s). Only then is the launcher killed.
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=45)
        except subprocess.TimeoutExpired:
            for pid in [*ranks.values(), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            out, err = proc.communicate()
        LAUNCHES.append(launch_record(args, f"killed after {timeout} s; {notes}", out, err))
        pytest.fail(f"a launch exceeded its {timeout} s; this test's launches:\n" + "\n".join(LAUNCHES), pytrace=False)
    LAUNCHES.append(launch_record(args, f"exit code {proc.returncode}", out, err))
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def launch_record(args, outcome: str, out: str, err: str, tail: int = 20000) -> str:
    return (f"=== train.py {' '.join(map(str, args))}: {outcome}\n--- stdout (end)\n{out[-tail:]}\n"
            f"--- stderr (end)\n{err[-tail:]}")


def workers(launch: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of a launch's train.py processes: torchrun's children, found in /proc by their
    parent's pid, their RANK read from their environment; or the launch itself (one process)."""
    ranks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):  # processes come and go
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == launch.pid:  # fields after "(comm)": state, ppid
                env = (stat.parent / "environ").read_bytes().split(b"\0")
                rank = next(int(e[5:]) for e in env if e.startswith(b"RANK="))
                ranks[rank] = int(stat.parent.name)
    return ranks or {0: launch.pid}


def dump_stacks(ranks: dict[int, int]) -> str:
    """Every worker's stacks: py-spy's dump when installed (returned), else SIGUSR1, which train.py
    turns into a faulthandler dump of every thread on that worker's stderr. NOTE: SIGUSR1 goes only
    to workers that already catch it: its default action would kill one still starting up."""
    notes = []
    for rank, pid in sorted(ranks.items()):
        if shutil.which("py-spy"):
            r = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
            notes.append(f"py-spy dump of rank {rank} (pid {pid}):\n{r.stdout}{r.stderr}")
            continue
        with contextlib.suppress(OSError):
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            if int(status["SigCgt"], 16) >> (signal.SIGUSR1 - 1) & 1:
                os.kill(pid, signal.SIGUSR1)
                notes.append(f"rank {rank} (pid {pid}): stacks on stderr")
                continue
        notes.append(f"rank {rank} (pid {pid}): no stacks (not catching SIGUSR1)")
    return "; ".join(notes)


def run_ok(args, nproc: int = 1):
    r = run_cli(args, nproc)
    assert r.returncode == 0, f"train.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def run_inprocess(args):
    """The same run inside this process (saves a Python + torch start-up)."""
    train.main(train.parse_args([str(a) for a in args]))


def weights(out: Path) -> dict:
    return load_file(out / "model.safetensors")


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def assert_weights_close(wa: dict, wb: dict, lr=1e-3):
    """Equal up to float summation order. NOTE: AdamW turns rounding noise in a near-zero gradient
    into an update of up to ~lr (m / sqrt(v) is ~ +-1 for any tiny g), so a few elements may differ
    by a percent of lr; a real difference (another batch, another normalisation) moves most
    elements by ~lr. Hence a bound on the max at 5 % of lr and on the mean at 1e-5 of lr."""
    assert wa.keys() == wb.keys()
    diff = torch.cat([(wa[k].float() - wb[k].float()).abs().flatten() for k in wa])
    worst = max(wa, key=lambda k: (wa[k].float() - wb[k].float()).abs().max())
    assert diff.max() <= 0.05 * lr, f"{worst}: max |diff| {diff.max().item():.3g}"
    assert diff.mean() <= 1e-5 * lr, f"mean |diff| {diff.mean().item():.3g}"


def assert_same_run(out_a: Path, out_b: Path):
    """Final weights close, and per step the same loss, gradient norm, supervised tokens and lr."""
    assert_weights_close(weights(out_a), weights(out_b))
    la, lb = log_records(out_a), log_records(out_b)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        assert ra["supervised_tokens"] == rb["supervised_tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-12)


def assert_weights_equal(out_a: Path, out_b: Path):
    wa, wb = weights(out_a), weights(out_b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs: max |diff| {(wa[k] - wb[k]).abs().max().item():.3g}"


def reference_ddp_run(path, *, world, batch_size, grad_accum, epochs, method, loss_norm, lr=1e-3, seed=1234,
                      max_length=256) -> dict:
    """`world` DDP ranks simulated in one process, written from the semantics rather than from
    train.py's loop: rank r takes every world-th index of the epoch's permutation (DistributedSampler,
    via data.epoch_batches), draws its fast weights from its own generator (seed + 1000 r), and the
    optimizer sees the average over ranks of each rank's accumulated gradient. loss_norm "mean":
    each micro-batch's mean loss weighs 1 / (micro-batches x ranks); "tokens": every supervised token
    of the step weighs 1 / (their global count). Returns the final state_dict."""
    tok = data.byte_tokenizer()
    samples = data.load_dataset(path, tok, max_length, log=lambda *a: None)
    lengths = [len(s.input_ids) for s in samples]
    torch.manual_seed(seed)
    model = Qwen2(Qwen2Config(**TINY))
    fcfg = focusft.FocusConfig(method=method)
    opt = torch.optim.AdamW(train.param_groups(model, 0.01), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    steps_per_epoch = math.ceil(len(data.epoch_batches(lengths, batch_size, seed, 0, 0, world)) / grad_accum)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: train.lr_lambda(s, total, 0))  # no warm-up (BASE)
    gens = [torch.Generator().manual_seed(seed + 1000 * r) for r in range(world)]
    for step in range(total):
        epoch, j = divmod(step, steps_per_epoch)
        mine = [data.epoch_batches(lengths, batch_size, seed, epoch, r, world)[j * grad_accum:(j + 1) * grad_accum]
                for r in range(world)]  # rank r's micro-batches of this step
        micro = [[data.collate([samples[i] for i in idx], tok.pad_token_id) for idx in m] for m in mine]
        n_sup = [[int((b["loss_mask"][:, 1:] & b["attention_mask"][:, 1:]).sum()) for b in bs] for bs in micro]
        n_global = sum(map(sum, n_sup))
        for r in range(world):
            for b, n in zip(micro[r], n_sup[r]):
                loss, _ = focusft.focusft_loss(model, b, fcfg, gens[r])
                w = 1 / (len(micro[r]) * world) if loss_norm == "mean" else n / n_global
                (loss * w).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def unequal_data(tmp):
    return write_data(tmp / "unequal.jsonl", 8, seed=0)


@pytest.fixture(scope="module")
def equal_data(tmp):
    return write_data(tmp / "equal.jsonl", 8, seed=1, equal_targets=True)


# -----------------------------------------------------------------------------
# Schedule, weight-decay groups (no process needed)


def hf_cosine_lambdas(total, warmup):
    """lr multipliers of steps 0..total-1 from transformers, or a re-derivation of its formula."""
    try:
        from transformers import get_cosine_schedule_with_warmup
    except ImportError:
        def f(s):
            if s < warmup:
                return s / max(1, warmup)
            return max(0.0, 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
        return [f(s) for s in range(total)]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("total,ratio", [(10, 0.1), (47, 0.1), (3, 0.1), (1, 0.1), (8, 0.0), (100, 0.25)])
def test_lr_schedule_matches_hf_cosine_with_warmup(total, ratio):
    warmup = math.ceil(ratio * total)  # HF TrainingArguments.get_warmup_steps for a ratio
    ours = [train.lr_lambda(s, total, warmup) for s in range(total)]
    assert ours == pytest.approx(hf_cosine_lambdas(total, warmup), abs=1e-12)
    if warmup < total:
        assert ours[warmup] == 1.0  # warm-up ends at the full lr
    if warmup:
        assert ours[0] == 0.0
    if warmup < total:
        assert train.lr_lambda(total, total, warmup) == pytest.approx(0.0, abs=1e-12)  # decays to 0
    if total > 2 * warmup + 2:
        assert 0 < ours[-1] < 0.05 and ours == sorted(ours[:warmup + 1]) + sorted(ours[warmup + 1:], reverse=True)


def test_weight_decay_groups():
    torch.manual_seed(0)
    model = Qwen2(Qwen2Config(**TINY))  # tied embeddings: lm_head.weight is embed_tokens.weight
    groups = train.param_groups(model, 0.01)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    name = {id(p): n for n, p in model.named_parameters()}
    decay = {name[id(p)] for p in groups[0]["params"]}
    no_decay = {name[id(p)] for p in groups[1]["params"]}
    # every parameter exactly once, the tied matrix included once
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(name) == len(list(model.parameters()))
    assert not decay & no_decay
    assert no_decay == {n for n in name.values() if n.endswith(".bias") or n.endswith("norm.weight")}
    assert decay == {n for n, p in model.named_parameters() if p.ndim == 2}
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.3.post_attention_layernorm.weight",
            "model.norm.weight"} <= no_decay
    # HF Trainer's own rule on the same architecture (names only: transformers may list a tied alias)
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**Qwen2Config(**TINY).to_hf()))
    hf_names = {n for n, _ in hf.named_parameters()}
    assert hf_names == set(name.values())
    assert set(transformers.Trainer.get_decay_parameter_names(None, hf)) & hf_names == decay


# -----------------------------------------------------------------------------
# Distributed: 2 processes == 1 process with the same global batch
#
# data.epoch_batches gives rank r the indices order[r::2] (DistributedSampler), so with batch 1
# the 2 ranks' j-th micro-batches hold order[2j] and order[2j+1]: exactly the j-th micro-batch of
# ONE rank with batch 2, and micro-batches 2j, 2j+1 of one rank with batch 1. Hence:
#   loss-norm tokens: 2 ranks x b1 x a2 == 1 x b2 x a2 == 1 x b1 x a4 (sum over tokens / global count)
#   loss-norm mean:   2 ranks x b1 x a2 == 1 x b1 x a4 for any data (each micro-batch weighs 1/4);
#                     == 1 x b2 x a2 only if the paired samples have equal supervised-token counts.


def test_ddp_tokens_norm_equals_one_process(tmp, unequal_data):
    common = [*BASE, "--data", unequal_data, "--method", "sft", "--loss-norm", "tokens", "--epochs", 2]
    run_ok([*common, "--out", tmp / "tok2", "--batch-size", 1, "--grad-accum", 2], nproc=2)
    run_inprocess([*common, "--out", tmp / "tok1b2", "--batch-size", 2, "--grad-accum", 2])
    run_inprocess([*common, "--out", tmp / "tok1a4", "--batch-size", 1, "--grad-accum", 4])
    assert len(log_records(tmp / "tok2")) == 4  # 2 steps per epoch, 2 epochs (the per-epoch shuffle is used)
    assert_same_run(tmp / "tok2", tmp / "tok1b2")
    assert_same_run(tmp / "tok2", tmp / "tok1a4")  # incl. the logged loss: the token mean over the step


def test_ddp_mean_norm_equals_one_process(tmp, equal_data, unequal_data):
    common = [*BASE, "--method", "sft-bidir", "--loss-norm", "mean", "--epochs", 2]
    run_ok([*common, "--data", equal_data, "--out", tmp / "mean2", "--batch-size", 1, "--grad-accum", 2], nproc=2)
    run_inprocess([*common, "--data", equal_data, "--out", tmp / "mean1b2", "--batch-size", 2, "--grad-accum", 2])
    run_inprocess([*common, "--data", equal_data, "--out", tmp / "mean1a4", "--batch-size", 1, "--grad-accum", 4])
    assert_same_run(tmp / "mean2", tmp / "mean1b2")
    assert_same_run(tmp / "mean2", tmp / "mean1a4")
    # The authors' normalisation weighs micro-batches, not tokens: with unequal answer lengths a
    # batch of 2 is NOT two micro-batches of 1 (this is the documented difference, not a bug).
    run_inprocess([*common, "--data", unequal_data, "--out", tmp / "meanU_b2", "--batch-size", 2, "--grad-accum", 2])
    run_inprocess([*common, "--data", unequal_data, "--out", tmp / "meanU_a4", "--batch-size", 1, "--grad-accum", 4])
    la, lb = log_records(tmp / "meanU_b2"), log_records(tmp / "meanU_a4")
    assert abs(la[0]["loss"] - lb[0]["loss"]) > 1e-3
    with pytest.raises(AssertionError):  # and the bound of assert_weights_close does see it
        assert_weights_close(weights(tmp / "meanU_b2"), weights(tmp / "meanU_a4"))


def test_ddp_focusft_matches_two_rank_reference_and_resumes(tmp, unequal_data):
    common = [*BASE, "--data", unequal_data, "--method", "focusft", "--epochs", 1, "--batch-size", 1,
              "--grad-accum", 2, "--save-every", 1]
    run_ok([*common, "--out", tmp / "ff2"], nproc=2)
    assert len(log_records(tmp / "ff2")) == 2
    ref = reference_ddp_run(unequal_data, world=2, batch_size=1, grad_accum=2, epochs=1, method="focusft",
                            loss_norm="mean")
    got = weights(tmp / "ff2")
    assert set(got) == set(ref) - {"lm_head.weight"}  # tied: HF checkpoints carry no lm_head
    assert_weights_close(got, {k: ref[k] for k in got})
    # a 1-rank reference draws different fast weights: the comparison above is not vacuous
    ref1 = reference_ddp_run(unequal_data, world=1, batch_size=1, grad_accum=4, epochs=1, method="focusft",
                             loss_norm="mean")
    with pytest.raises(AssertionError):
        assert_weights_close(got, {k: ref1[k] for k in got})
    # every rank's RNG state is saved, each with its own fast-weight generator
    state = torch.load(tmp / "ff2" / "step-1" / "train_state.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["fast_weights"], state["rng"][1]["fast_weights"])
    # resume both ranks from step 1: bit-identical to the uninterrupted 2-process run
    (tmp / "ff2r").mkdir()
    shutil.copytree(tmp / "ff2" / "step-1", tmp / "ff2r" / "step-1")
    r = run_ok([*common, "--out", tmp / "ff2r", "--resume"], nproc=2)
    assert "resuming from" in r.stdout
    assert_weights_equal(tmp / "ff2", tmp / "ff2r")


def test_zero1_equals_plain_ddp(tmp, unequal_data):
    """ZeRO-1 (AdamW state sharded over the 2 ranks, on by default) == replicated AdamW, bit for bit:
    the weights, and the consolidated optimizer state of the checkpoint."""
    common = [*BASE, "--data", unequal_data, "--method", "focusft", "--epochs", 1, "--batch-size", 1,
              "--grad-accum", 2, "--save-every", 1]
    r = run_ok([*common, "--out", tmp / "z1"], nproc=2)
    assert "(ZeRO-1)" in r.stdout
    r = run_ok([*common, "--out", tmp / "z0", "--no-zero1"], nproc=2)
    assert "ZeRO" not in r.stdout
    assert_weights_equal(tmp / "z1", tmp / "z0")
    a, b = (torch.load(tmp / d / "step-1" / "train_state.pt", weights_only=False)["optimizer"] for d in ("z1", "z0"))
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) == len(list(Qwen2(Qwen2Config(**TINY)).parameters()))
    for i in a["state"]:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][i][name], b["state"][i][name]), (i, name)


@pytest.mark.parametrize("zero1", [True, False], ids=["zero1", "ddp"])
def test_teardown_frees_ddp_before_the_process_group(tmp, unequal_data, monkeypatch, zero1):
    """A run ends with no DDP alive when the process group is destroyed. DDP's C++ reducer holds the
    group: when it drops the last reference, gloo's destructor joins its worker threads holding the
    GIL while a worker frees the last collective's tensors and waits for the GIL (a deadlock at exit
    seen in 1 launch of ~30 on a loaded CPU; its stacks: Reducer::~Reducer -> ~ProcessGroupGloo ->
    thread::join, and a gloo worker in ~AsyncAllgatherWork -> gil_scoped_acquire). One rank, in this
    process, with torchrun's environment."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    alive = []
    real = train.dist.destroy_process_group

    def destroy(*args, **kwargs):
        alive.extend(type(o).__name__ for o in gc.get_objects() if issubclass(type(o), DistributedDataParallel))
        return real(*args, **kwargs)

    monkeypatch.setattr(train.dist, "destroy_process_group", destroy)
    run_inprocess([*BASE, "--data", unequal_data, "--method", "focusft", "--epochs", 1, "--batch-size", 2,
                   "--out", tmp / f"teardown-{zero1}", "--zero1" if zero1 else "--no-zero1"])
    assert not train.dist.is_initialized()
    assert alive == [], f"alive at destroy_process_group: {alive}"


def test_stuck_rank_stops_the_run_and_resumes(tmp, unequal_data):
    """Fault injection with no hook in train.py: rank 1 is frozen (SIGSTOP) once step-2 exists. Rank 0
    must stop within --dist-timeout with exit code 2 and one line naming its rank, the phase it
    waited in and the last checkpoint; torchrun must end the run (it SIGTERMs the other workers,
    then SIGKILLs them after 30 s: a stopped process only dies on SIGKILL). While rank 0 waits, a
    SIGUSR1 prints its stacks. Resuming then ends with the weights of an uninterrupted run, bit for bit
    (both launched while torchrun waits out its 30 s: rank 1 is frozen, rank 0 gone)."""
    timeout = 8  # a step's phase includes its compute: a few seconds on a loaded box
    common = [*BASE, "--data", unequal_data, "--method", "sft", "--epochs", 5, "--batch-size", 1, "--grad-accum", 1,
              "--save-every", 2, "--dist-timeout", timeout]  # 4 steps per epoch: 20 steps
    out, logs = tmp / "stuck", [open(tmp / f"stuck.{name}", "w+") for name in ("stdout", "stderr")]
    launch = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(REPO / "train.py"), *map(str, [*common, "--out", out])],
                              cwd=REPO, env=ENV, stdout=logs[0], stderr=logs[1])
    ranks, ended = {}, []
    try:
        deadline = time.monotonic() + 240
        while not (out / "step-2" / "train_state.pt").is_file():
            assert launch.poll() is None and time.monotonic() < deadline, "the run ended before step-2"
            time.sleep(0.01)
        ranks = workers(launch)
        os.kill(ranks[1], signal.SIGSTOP)
        frozen = time.monotonic()
        time.sleep(1)
        dumped = dump_stacks({0: ranks[0]})  # rank 0 is waiting for rank 1 by now: its stacks, please
        while is_running(ranks[0]):
            time.sleep(0.05)
        rank0_s, last = time.monotonic() - frozen, checkpoint.newest_checkpoint(out)
        waiter = threading.Thread(target=lambda: ended.append((launch.wait(), time.monotonic())[1]))
        waiter.start()
        run_ok([*common, "--out", tmp / "unstuck"], nproc=2)  # the reference
        resumed = run_ok([*common, "--out", out, "--resume"], nproc=2)  # the same command again, resuming
        waiter.join(timeout=120)
    finally:
        launch.kill()
        for pid in ranks.values():  # a stopped worker left behind would never end
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launch.wait()
    stdout, stderr = (f.seek(0) or f.read() for f in logs)
    assert ended, "torchrun did not end the run"
    print(f"rank 0 stopped {rank0_s:.1f} s and torchrun {ended[0] - frozen:.1f} s after rank 1 was frozen")
    assert "done:" not in stdout, "the run was not interrupted"
    assert launch.returncode != 0 and not is_running(ranks[1])
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-5000:]
    print(errors[0])
    assert re.fullmatch(rf"error: rank 0 waited more than {timeout} s \(--dist-timeout\) for the other ranks in "
                        rf"(train_step \d+|save step-\d+) \(.+\): a rank is stuck or gone\. Last checkpoint: {last}",
                        errors[0]), errors[0]
    assert "exitcode  : 2" in stderr  # torchrun's summary of rank 0
    assert rank0_s < timeout + 10, f"rank 0 stopped only {rank0_s:.1f} s after rank 1 was frozen"
    # faulthandler's dump of every thread of rank 0: the main thread in the loop, the watchdog's own
    stacks = dumped + stderr  # py-spy's dump, if installed, else faulthandler's on stderr
    assert re.search(r'train\.py", line \d+,? in train_loop|train_loop \(.*train\.py', stacks), stacks[-5000:]
    assert re.search(r'health\.py", line \d+,? in _watch|_watch \(.*health\.py', stacks), stacks[-5000:]
    assert f"resuming from {last} at step" in resumed.stdout
    assert_weights_equal(tmp / "unstuck", out)


def is_running(pid: int) -> bool:
    """Neither gone nor a zombie (a worker that ended stays one until torchrun reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_fsdp_equals_ddp_and_resumes(tmp, unequal_data):
    """--fsdp (FSDP2: weights, gradients and AdamW state sharded over the 2 ranks) against DDP on the
    same FocuSFT run, activation checkpointing on; then resumed from step 1, bit for bit. What makes
    FSDP delicate here is the inner loop's backward inside the forward (see fsdp.keep_root_gathered)."""
    common = [*BASE, "--data", unequal_data, "--method", "focusft", "--epochs", 1, "--batch-size", 1,
              "--grad-accum", 2, "--save-every", 1, "--grad-checkpointing"]
    r = run_ok([*common, "--out", tmp / "fsdp", "--fsdp"], nproc=2)
    assert "(FSDP2)" in r.stdout
    run_ok([*common, "--out", tmp / "fsdp_ddp"], nproc=2)
    assert_same_run(tmp / "fsdp", tmp / "fsdp_ddp")  # weights, and per step loss and gradient norm
    state = torch.load(tmp / "fsdp" / "step-1" / "train_state.pt", weights_only=False)
    assert len(state["optimizer"]["state"]) == len(list(Qwen2(Qwen2Config(**TINY)).parameters()))
    (tmp / "fsdpr").mkdir()
    shutil.copytree(tmp / "fsdp" / "step-1", tmp / "fsdpr" / "step-1")
    r = run_ok([*common, "--out", tmp / "fsdpr", "--resume", "--fsdp"], nproc=2)
    assert "resuming from" in r.stdout
    assert_weights_equal(tmp / "fsdp", tmp / "fsdpr")


def test_error_fsdp_without_torchrun(tmp, unequal_data):
    with pytest.raises(train.TrainError, match="torchrun"):
        run_inprocess([*BASE, "--data", unequal_data, "--out", tmp / "fsdp1", "--fsdp"])


def test_grad_accumulation_equals_one_batch(tmp, unequal_data, equal_data):
    """4 micro-batches of 1 == 1 batch of 4 (padding inside the batch of 4 changes nothing).
    Non-bilevel methods only: a bilevel batch shares one fast-weight draw and one inner loop."""
    for norm, method, path in (("tokens", "sft-bidir", unequal_data), ("mean", "sft", equal_data)):
        common = [*BASE, "--data", path, "--method", method, "--loss-norm", norm, "--epochs", 1]
        run_inprocess([*common, "--out", tmp / f"acc-{norm}-a4", "--batch-size", 1, "--grad-accum", 4])
        run_inprocess([*common, "--out", tmp / f"acc-{norm}-b4", "--batch-size", 4, "--grad-accum", 1])
        assert_same_run(tmp / f"acc-{norm}-a4", tmp / f"acc-{norm}-b4")
    # and the runs did train: the weights moved away from the random init
    torch.manual_seed(1234)
    init = Qwen2(Qwen2Config(**TINY)).state_dict()
    w = weights(tmp / "acc-mean-a4")
    assert (w["model.layers.0.mlp.up_proj.weight"] - init["model.layers.0.mlp.up_proj.weight"]).abs().max() > 1e-4


def test_inner_recompute_auto_follows_the_estimate(tmp, unequal_data, monkeypatch, capsys):
    """--inner-recompute auto keeps the inner loop's activations exactly when memory.py's estimated
    peak with them fits 85 % of the device's memory (device_memory patched to just above and just
    below), says so in the run's first log lines with both estimated peaks, and both choices train
    the same run. --no-grad-checkpointing (BASE): the inner loop's choice is its own."""
    args = [*BASE, "--method", "focusft", "--data", unequal_data, "--batch-size", 2, "--grad-accum", 1,
            "--max-steps", 2]
    cfg = train.parse_args([str(a) for a in args + ["--nproc", 1]])  # the estimate of a 1-process run
    keep, recompute = (memory.inner_loop_peak(cfg, Qwen2Config(**TINY), r) for r in (False, True))
    calls = []
    by_layer = focusft.inner_grads_by_layer
    monkeypatch.setattr(focusft, "inner_grads_by_layer", lambda *a: calls.append(1) or by_layer(*a))
    outs = {}
    for fits, want in ((1.01, "off"), (0.99, "on")):
        monkeypatch.setattr(memory, "device_memory", lambda device, fits=fits: (fits * keep / 0.85, "patched"))
        calls.clear()
        outs[want] = tmp / f"auto-{want}"
        run_inprocess([*args, "--out", outs[want]])
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith(f"inner loop: --inner-recompute auto chose {want}: "), lines[:2]
        assert (f"{keep / 2**30:.3g} GiB keeping the activations, {recompute / 2**30:.3g} GiB recomputing; "
                f"budget {fits * keep / 2**30:.3g} GiB") in lines[1], lines[1]
        assert bool(calls) == (want == "on")
    assert_same_run(outs["off"], outs["on"])
    run_inprocess([*args, "--inner-recompute", "on", "--out", tmp / "explicit-on"])
    assert capsys.readouterr().out.startswith("inner loop: --inner-recompute on: recomputes the adapted layers")
    assert_same_run(outs["on"], tmp / "explicit-on")


# -----------------------------------------------------------------------------
# Checkpoints and exact resume (one uninterrupted FocuSFT run is the reference)
#
# 10 samples, batch 1, accumulation 3: 4 steps per epoch (the last one has a single micro-batch),
# 2 epochs = 8 steps. step-2 is mid-epoch (6 micro-batches into epoch 0), step-4 an epoch boundary.

FOCUS_RUN = ["--model", "tiny", "--device", "cpu", "--dtype", "fp32", "--max-length", "256", "--lr", "1e-3",
             "--method", "focusft", "--epochs", 2, "--batch-size", 1, "--grad-accum", 3, "--save-every", 2]


@pytest.fixture(scope="module")
def focus_run(tmp):
    """An uninterrupted run with the defaults otherwise (activation checkpointing on, 10 % warm-up)."""
    path = write_data(tmp / "ten.jsonl", 10, seed=2)
    out = tmp / "focus"
    r = run_ok([*FOCUS_RUN, "--data", path, "--out", out])
    return path, out, r.stdout


def test_run_output_and_log(focus_run):
    _, out, stdout = focus_run
    steps = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 8 and steps[0].startswith("step 1/8 | epoch 0.25 | loss ")
    for key in ("inner ", "→", "lr ", "gnorm ", "sup ", "tok/s", "s/step", "ETA "):
        assert key in steps[-1]
    assert "done: 8 steps" in stdout
    recs = log_records(out)
    assert [r["step"] for r in recs] == list(range(1, 9))
    for r in recs:
        assert {"total", "epoch", "loss", "inner_first", "inner_last", "lr", "grad_norm", "supervised_tokens",
                "tokens_per_s", "s_per_step", "eta_s"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["inner_last"] < r["inner_first"]  # the inner loop adapts
    # the logged lr follows HF's cosine schedule with ceil(10 % of 8) = 1 warm-up step
    assert [r["lr"] for r in recs] == pytest.approx([1e-3 * f for f in hf_cosine_lambdas(8, 1)], rel=1e-12)
    assert recs[1]["lr"] == pytest.approx(1e-3)  # warm-up end
    # checkpoints every 2 steps, but not at the last step (the final model is there)
    assert sorted(p.name for p in out.glob("step-*")) == ["step-2", "step-4", "step-6"]
    assert not list(out.glob(".*"))  # no temporary directories left behind


def test_checkpoint_contents(focus_run):
    _, out, _ = focus_run
    torch.manual_seed(0)
    model = Qwen2(Qwen2Config(**TINY))
    hf_keys = set(model.state_dict()) - {"lm_head.weight"}
    lora_shapes = {(32, 128), (352, 32), (32, 352), (128, 32)}  # A and B of gate/up and of down
    param_shapes = [tuple(p.shape) for g in train.param_groups(model, 0.01) for p in g["params"]]
    assert not lora_shapes & set(param_shapes)  # so a LoRA-shaped tensor would stand out
    for d in (out / "step-2", out / "step-4", out):
        assert set(load_file(d / "model.safetensors")) == hf_keys  # nothing beyond the HF keys
        assert (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file()
    st = torch.load(out / "step-2" / "train_state.pt", weights_only=False)
    assert (st["step"], st["epoch"], st["micro_batch"]) == (2, 0, 6)
    st4 = torch.load(out / "step-4" / "train_state.pt", weights_only=False)
    assert (st4["step"], st4["epoch"], st4["micro_batch"]) == (4, 1, 0)
    # the optimizer holds exactly the base parameters: one state per parameter, their shapes
    opt = st["optimizer"]
    assert sorted(opt["state"]) == list(range(len(param_shapes)))
    for i, s in opt["state"].items():
        assert tuple(s["exp_avg"].shape) == tuple(s["exp_avg_sq"].shape) == param_shapes[i]
    assert st["scheduler"]["last_epoch"] == 2
    assert set(st["rng"][0]) >= {"torch", "python", "numpy", "fast_weights"}

    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from tensors(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from tensors(v)

    assert not [t.shape for t in tensors(st) if tuple(t.shape) in lora_shapes]
    # the final checkpoint loads in our model.py
    ours = Qwen2.from_pretrained(out)
    w = load_file(out / "model.safetensors")
    assert all(torch.equal(ours.state_dict()[k], w[k]) for k in w)


def test_checkpoint_loads_in_transformers(focus_run):
    transformers = pytest.importorskip("transformers")
    _, out, _ = focus_run
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = Qwen2.from_pretrained(out).eval()
    tok = data.byte_tokenizer()
    ids = torch.tensor([data.encode_chat(tok, [{"role": "user", "content": "abc def"},
                                               {"role": "assistant", "content": "ghij"}]).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = data.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])[0]
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


@pytest.mark.parametrize("k", [2, 4])
def test_resume_is_bit_exact(tmp, focus_run, k):
    """Resume from step-k alone (k=2 mid-epoch, k=4 epoch boundary): same weights, bit for bit."""
    path, out, _ = focus_run
    rout = tmp / f"resume-{k}"
    rout.mkdir()
    shutil.copytree(out / f"step-{k}", rout / f"step-{k}")
    r = run_ok([*FOCUS_RUN, "--data", path, "--out", rout, "--resume"])
    assert f"resuming from {rout / f'step-{k}'} at step {k}" in r.stdout
    assert [line.split(" |")[0] for line in r.stdout.splitlines() if line.startswith("step ")] == \
        [f"step {s}/8" for s in range(k + 1, 9)]
    assert_weights_equal(out, rout)
    # the logged losses of the resumed steps are those of the uninterrupted run
    assert [x["loss"] for x in log_records(rout)] == [x["loss"] for x in log_records(out)[k:]]


def test_kill_and_resume_is_bit_exact(tmp, focus_run):
    """A real interruption: kill the process once step 5 is logged (step-4 is complete by then)."""
    path, out, _ = focus_run
    kout = tmp / "killed"
    cmd = [sys.executable, str(REPO / "train.py"), *map(str, [*FOCUS_RUN, "--data", path, "--out", kout])]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 5/8"):
                proc.kill()
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode != 0 and not (kout / "model.safetensors").exists()  # really interrupted
    assert (kout / "step-4" / "train_state.pt").is_file()
    # restarting in a directory that holds a run needs --resume (checked here on a real one)
    expect_user_error([*FOCUS_RUN, "--data", path, "--out", kout], "already holds a run", "--resume")
    assert [x["step"] for x in log_records(kout)][:4] == [1, 2, 3, 4]  # (5 too, if written before the kill)
    r = run_ok([*FOCUS_RUN, "--data", path, "--out", kout, "--resume"])
    resumed_at = int(r.stdout.split(" at step ")[1].split()[0])  # 4, or 6 if step-6 was written before the kill
    assert resumed_at in (4, 6) and (kout / f"step-{resumed_at}").is_dir()
    assert_weights_equal(out, kout)
    # the log holds each step once: lines of steps redone after the checkpoint were dropped
    recs = log_records(kout)
    assert [x["step"] for x in recs] == list(range(1, 9))
    assert [x["loss"] for x in recs] == [x["loss"] for x in log_records(out)]


# -----------------------------------------------------------------------------
# User errors. The CLI turns exactly TrainError, DataError and ModelError into `error: ...` and exit
# code 2 (checked in subprocesses below); the other cases run in this process and check that one of
# those is raised, with its message.

USER_ERRORS = (train.TrainError, data.DataError, ModelError)


def expect_user_error(args, *fragments):
    with pytest.raises(USER_ERRORS) as e:
        run_inprocess(args)
    for f in fragments:
        assert f in str(e.value), f"{f!r} not in: {e.value}"
    return e.value


def assert_cli_error(r: subprocess.CompletedProcess, *fragments):
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.stderr.startswith("error: ") or "\nerror: " in r.stderr, r.stderr
    for f in fragments:
        assert f in r.stderr, f"{f!r} not in: {r.stderr}"


def test_cli_error_missing_data(tmp):
    r = run_cli([*BASE, "--data", tmp / "nope.jsonl", "--out", tmp / "e1"])
    assert_cli_error(r, "nope.jsonl", "no such file")


def test_cli_error_hub_id_offline(tmp, unequal_data):
    """No network (HF_HUB_OFFLINE=1, empty cache): a prompt error suggesting a local path, no hang."""
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf-home")}
    r = run_cli([*BASE[2:], "--model", "Qwen/Qwen2.5-7B", "--data", unequal_data, "--out", tmp / "e4"],
                env=env, timeout=120)
    assert_cli_error(r, "Qwen/Qwen2.5-7B", "local directory")


def test_cli_error_nproc_above_gpus(tmp, unequal_data):
    """The GPU-count check on this GPU-less machine: torch.cuda is patched in the child before
    train.py runs as __main__, which sees itself as local rank 1 of 2 (non-zero ranks print this
    error too: it concerns them)."""
    code = ("import runpy, sys, torch; torch.cuda.is_available = lambda: True; "
            "torch.cuda.device_count = lambda: 1; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    env = {**ENV, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    r = subprocess.run([sys.executable, "-c", code, str(REPO / "train.py"), "--model", "tiny",
                        "--data", str(unequal_data), "--out", str(tmp / "e8")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert_cli_error(r, "--nproc_per_node", "1 visible GPU")
    assert not (tmp / "e8").exists()


def test_error_invalid_json_line(tmp):
    bad = tmp / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    bad.write_text(good + "\n" + '{"messages": [\n')
    expect_user_error([*BASE, "--data", bad, "--out", tmp / "e2"], "bad.jsonl:2", "invalid JSON")


def test_error_not_qwen2(tmp, unequal_data):
    llama = tmp / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 272}))
    for name, text in data.byte_tokenizer().files().items():  # a complete directory except for the model type
        (llama / name).write_text(text)
    expect_user_error([*BASE[2:], "--model", llama, "--data", unequal_data, "--out", tmp / "e3"],
                      "model_type='llama'", "Qwen2")


def test_error_nccl_without_cuda(tmp, unequal_data):
    expect_user_error([*BASE, "--data", unequal_data, "--out", tmp / "e5", "--backend", "nccl"], "nccl", "CUDA")


def test_error_output_dir_holds_a_run(tmp, unequal_data):
    out = tmp / "e6"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')
    expect_user_error([*BASE, "--data", unequal_data, "--out", out], str(out), "--resume", "--overwrite")
    assert (out / "log.jsonl").read_text() == '{"step": 1}\n'  # untouched


def test_error_non_finite_loss_keeps_last_checkpoint(tmp, unequal_data):
    """lr 1e30 makes step 1's update blow the weights up; step 2's loss is NaN."""
    out = tmp / "e7"
    expect_user_error([*BASE[:-2], "--lr", "1e30", "--method", "sft", "--data", unequal_data, "--out", out,
                       "--batch-size", 1, "--grad-accum", 1, "--save-every", 1],
                      "non-finite loss", "step 2", f"Last checkpoint: {out / 'step-1'}")
    assert (out / "step-1" / "train_state.pt").is_file() and not (out / "step-2").exists()
    assert not (out / "model.safetensors").exists()  # no final model from a diverged run


def test_nproc_above_gpu_count_inprocess(tmp, unequal_data, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    err = expect_user_error(["--model", "tiny", "--data", unequal_data, "--out", tmp / "gpu"],
                            "--nproc_per_node", "1 visible GPU")
    assert err.every_rank  # printed by the rank concerned, not only by rank 0


def test_messages_key_reaches_the_data(tmp, unequal_data):
    """--messages-key names the column/key of the conversations (datasets that do not call it "messages")."""
    renamed = tmp / "renamed.jsonl"
    rows = [json.loads(line) for line in unequal_data.read_text().splitlines()]
    renamed.write_text("".join(json.dumps({"conversation": r["messages"]}) + "\n" for r in rows))
    args = [*BASE, "--data", renamed, "--method", "sft", "--max-steps", 1]
    expect_user_error([*args, "--out", tmp / "mk0"], "messages")  # the default key is not there
    run_inprocess([*args, "--out", tmp / "mk1", "--messages-key", "conversation"])
    assert log_records(tmp / "mk1")[0]["supervised_tokens"] > 0


# -----------------------------------------------------------------------------
# The demo's random model with a word-level tokenizer


def test_tiny_words_model_trains_and_saves_its_tokenizer(tmp_path):
    """--model tiny-words: the tokenizer is fitted on --data, the vocabulary sized to it, and both
    are saved, so that eval.py and data.load_tokenizer read the checkpoint as any other."""
    from examples import make_agentic
    train_convs, held = make_agentic.generate(seed=3, n_train=24, n_heldout=4, max_records=4)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in train_convs))
    out = tmp_path / "out"
    run_inprocess(["--model", "tiny-words", "--data", path, "--out", out, "--device", "cpu", "--dtype", "fp32",
                   "--batch-size", "4", "--grad-accum", "1", "--max-steps", "2", "--no-grad-checkpointing"])
    tok = data.load_tokenizer(out)
    fitted = data.word_tokenizer(data.render_chat(c["messages"])[0] for c in train_convs)
    assert tok.tk.to_str() == fitted.tk.to_str()
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] % 16 == 0 and 0 <= config["vocab_size"] - tok.tk.get_vocab_size() < 16
    assert config["eos_token_id"] == tok.eos_token_id and config["num_hidden_layers"] == train.TINY_WORDS["num_hidden_layers"]
    model = Qwen2.from_pretrained(out)
    assert model.config.initializer_range == train.TINY_WORDS["initializer_range"]
    assert len(log_records(out)) == 2


# -----------------------------------------------------------------------------
# The fast-weight dependence check (health.DependenceCheck)
#
# The failure it catches: the outer loss falls because the inner loop fits each batch, while the
# plain model (the one saved and evaluated; its loss is `inner_first`) stays bad. Reproduced on the
# demo's tiny-words model with an inner loop far stronger than the paper's (8 inner steps, each
# fast-weight gradient clipped at 3 instead of 1) on conversations whose answer is always the
# same: the inner loop learns that answer within the step, the outer loss collapses to 0.01-0.2
# while inner_first stays at 1.5-4. The normal run is the paper's inner loop on the demo's data.

WORDS = "apple berry cherry delta echo fox golf hotel india juliet kilo lima mike".split()
DEPENDENCE_RUN = ["--model", "tiny-words", "--device", "cpu", "--dtype", "fp32", "--no-grad-checkpointing",
                  "--lr", "3e-3", "--warmup-ratio", "0", "--grad-accum", 1, "--threads", 1]
DEPENDENT = [*DEPENDENCE_RUN, "--max-length", 128, "--batch-size", 4, "--epochs", 8, "--inner-steps", 8,
             "--inner-clip", 3]


def write_constant_answer_data(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20)))
            msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": "yes no " * 6}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def warning_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("warning: ")]


def flagged(records) -> int:
    """Steps of `records` that the rule flags, by its definition (DependenceCheck)."""
    return sum(x["inner_first"] >= 3 * x["loss"] and x["inner_first"] - x["loss"] >= 1 for x in records)


@pytest.fixture(scope="module")
def dependent_run(tmp):
    """The reproduced failure (80 steps, ~15 s), run once: its data, output directory and stdout."""
    path = write_constant_answer_data(tmp / "constant.jsonl")
    out = tmp / "dependent"
    r = run_ok([*DEPENDENT, "--data", path, "--out", out, "--save-every", 40])
    return path, out, r.stdout


def test_dependence_check_rule():
    """The rule on made-up losses, against its definition: 40 of the last 50 steps after warm-up
    with inner_first >= 3 x loss and >= 1 nat above it; once."""
    def first_warning(pairs, warmup=0):
        check = health.DependenceCheck(warmup=warmup)
        fired = [s for s, (loss, first) in enumerate(pairs, 1) if check.update(s, loss, first)]
        assert len(fired) <= 1
        return fired[0] if fired else None

    bad, good = (0.2, 5.7), (1.0, 1.03)
    assert first_warning([bad] * 200) == 50  # never in the first 49 steps
    assert first_warning([bad] * 200, warmup=10) == 60  # the warm-up steps do not count
    assert first_warning([good] * 200) is None
    assert first_warning(([good] * 11 + [bad] * 39) * 4) is None  # 39 of 50: not enough
    assert first_warning([good] * 10 + [bad] * 40) == 50  # 40 of 50
    assert first_warning([(0.01, 0.9)] * 100) is None  # 90x, but 0.89 nats: both conditions are needed
    assert first_warning([(1.0, 2.9)] * 100) is None  # 1.9 nats, but 2.9x
    assert first_warning([(1.0, 3.0)] * 100) == 50


def test_fast_weight_dependence_warns(dependent_run):
    """A run that depends on its fast weights warns once, in one line right after the step's line,
    records it on that step's log.jsonl record and repeats it after the summary."""
    _, out, stdout = dependent_run
    recs = log_records(out)
    warned = [x for x in recs if "warning" in x]
    assert len(warned) == 1
    step = warned[0]["step"]
    assert step >= 50 and flagged(recs[step - 50:step]) >= 40 and flagged(recs[step - 51:step - 1]) < 40
    expected = f"warning: {warned[0]['warning']}"
    assert expected.startswith(f"warning: step {step}: the plain model's loss (inner_first, mean ")
    assert "depend on fast weights that inference does not use" in expected and "--inner-steps" in expected
    lines = stdout.splitlines()
    assert warning_lines(stdout) == [expected, expected]
    assert lines[lines.index(expected) - 1].startswith(f"step {step}/80 |")
    assert lines[-1] == expected and lines[-2].startswith("done: 80 steps")


def test_dependence_warning_survives_resume(tmp, dependent_run):
    """Resumed from step 40 (before the warning): the replayed log.jsonl makes it warn at the same
    step with the same text as the uninterrupted run, once, and repeat it in the summary."""
    path, out, _ = dependent_run
    rout = tmp / "dependent-resumed"
    rout.mkdir()
    shutil.copytree(out / "step-40", rout / "step-40")
    (rout / "log.jsonl").write_text("".join(line + "\n" for line in (out / "log.jsonl").read_text().splitlines()[:45]))
    r = run_ok([*DEPENDENT, "--data", path, "--out", rout, "--resume"])
    assert [x.get("warning") for x in log_records(rout)] == [x.get("warning") for x in log_records(out)]
    assert warning_lines(r.stdout) == 2 * [f"warning: {x['warning']}" for x in log_records(out) if "warning" in x]


def test_normal_run_does_not_warn(tmp_path, capsys):
    """The paper's inner loop on 160 of the demo's conversations (60 steps, so the check could
    fire): no warning in the output or the log."""
    path = tmp_path / "demo160.jsonl"
    path.write_text("".join((REPO / "examples" / "agentic.jsonl").read_text().splitlines(keepends=True)[:160]))
    out = tmp_path / "out"
    run_inprocess([*DEPENDENCE_RUN, "--max-length", 512, "--batch-size", 8, "--epochs", 3, "--data", path,
                   "--out", out])
    stdout = capsys.readouterr().out
    recs = log_records(out)
    assert len(recs) == 60 and flagged(recs) == 0 and not [x for x in recs if "warning" in x]
    assert not warning_lines(stdout) and stdout.splitlines()[-1].startswith("done: 60 steps")
