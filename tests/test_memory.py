"""memory.py (train.py --estimate-memory): the estimate against the measured peak of real CPU training steps.

Each case runs three optimizer steps of train.py's own code (train.wrap, train.build_optimizer,
train.train_step, AdamW included) on a tiny random Qwen2 and measures the peak of live CPU bytes
in the third (tests/memtrack.py); memory.estimate_peak, given the same flags and the CPU kernels,
must come within 10 %. The cases vary the shape (hidden, intermediate, layers, heads, sequence,
batch, vocabulary, tied embeddings, supervised share, loss chunk), the method, activation
checkpointing, --inner-grad, the dtype, and run with a one-rank gloo DDP group or without DDP.
The CUDA-only terms (fused AdamW, SDPA's CUDA kernels) cannot be measured here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

import conftest
import focusft
import train
from memory import EstimateConfig, estimate_model_config, estimate_peak, memory_shape
from memtrack import measure_ranks_peak, measure_step_peak, synthetic_batch
from model import TINY, TINY_WORDS, Qwen2Config

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.10

BASE = dict(D=64, I=192, L=4, H=4, KVH=2, V=512, B=1, S=256)
SHAPES = {
    "base": {},
    "wide": dict(D=96, I=288, L=6, H=6, KVH=2, V=1000, S=384),  # more layers, longer
    "mha-b2": dict(I=256, L=3, KVH=4, V=2000, S=128, B=2),  # no GQA, two rows, large vocabulary
    "chunked": dict(S=200, B=3, V=3000, chunk=128),  # several loss pieces
    "sparse": dict(S=512, frac=0.3, chunk=64),  # 30 % of positions supervised
    "tied": dict(V=4000, tied=True),
}
# (shape, dtype, method, grad checkpointing, inner grad, DDP)
CASES = [
    *[("base", "fp32", method, ckpt, "grad", True) for method in focusft.METHODS for ckpt in (True, False)],
    ("base", "fp32", "focusft", True, "vjp", True),
    ("base", "fp32", "causal-bilevel", False, "vjp", True),
    ("base", "bf16", "focusft", True, "grad", True),
    ("base", "bf16", "focusft", True, "vjp", True),
    ("base", "bf16", "sft-bidir", False, "grad", True),
    ("base", "bf16", "causal-bilevel", False, "grad", True),
    ("wide", "bf16", "focusft", True, "grad", True),
    ("wide", "fp32", "sft", True, "grad", True),
    ("mha-b2", "fp32", "focusft", False, "vjp", True),
    ("mha-b2", "bf16", "sft-bidir", True, "grad", True),
    ("chunked", "fp32", "focusft", True, "grad", True),
    ("chunked", "bf16", "sft", False, "grad", True),
    ("sparse", "bf16", "focusft", True, "vjp", True),
    ("sparse", "fp32", "sft-bidir", False, "grad", True),
    ("tied", "fp32", "sft", True, "grad", True),
    ("tied", "bf16", "focusft", False, "grad", True),
    # without DDP the gradients appear during the backward instead of living in DDP's buckets
    ("base", "fp32", "sft", True, "grad", False),
    ("base", "bf16", "focusft", True, "grad", False),
    ("wide", "fp32", "focusft", False, "grad", False),
    ("tied", "fp32", "causal-bilevel", True, "vjp", False),
]


def case_id(case) -> str:
    shape, dtype, method, ckpt, how, ddp = case
    return f"{shape}-{dtype}-{method}-{'ckpt' if ckpt else 'nockpt'}-{how}-{'ddp' if ddp else 'noddp'}"


def setup_case(shape: str, dtype: str, method: str, ckpt: bool, how: str, accum: int = 1, **flags):
    """The model config, the flags (`accum` micro-batches per step; train.TrainConfig `flags`) and
    the micro-batches of a case."""
    s = {**BASE, "frac": 1.0, "chunk": focusft.FocusConfig.loss_chunk, "tied": False, **SHAPES[shape]}
    model_config = Qwen2Config(vocab_size=s["V"], hidden_size=s["D"], intermediate_size=s["I"],
                               num_hidden_layers=s["L"], num_attention_heads=s["H"], num_key_value_heads=s["KVH"],
                               tie_word_embeddings=s["tied"], max_position_embeddings=1024)
    focus = focusft.FocusConfig(method=method, inner_grad=how, loss_chunk=s["chunk"])
    cfg = train.TrainConfig(dtype=dtype, grad_checkpointing=ckpt, batch_size=s["B"], max_length=s["S"],
                            grad_accum=accum, focus=focus, device="cpu", **flags,
                            estimate=EstimateConfig(nproc=1, supervised_fraction=s["frac"]))
    n_supervised = memory_shape(cfg, model_config).N
    batches = [synthetic_batch(s["B"], s["S"], n_supervised, s["V"], seed=k) for k in range(accum)]
    return model_config, cfg, batches


def check_estimate(m, measured: int, tolerance: float = TOLERANCE):
    """The estimate for MemShape m within `tolerance` of the measured peak (bytes); the error is printed."""
    estimate, phase = estimate_peak(m)
    error = estimate / measured - 1
    report = f"estimate {estimate / 2**20:.3f} MiB (peak in {phase}) vs measured {measured / 2**20:.3f} MiB: {error:+.1%}"
    print(report)
    assert abs(error) < tolerance, report


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_estimate_matches_measured_peak(case):
    *spec, ddp = case
    assert_estimate_matches(*setup_case(*spec), ddp)


# --inner-recompute off with checkpointing: the inner loop and the outer pass keep the adapted layers'
# activations (the other cases follow checkpointing, auto's rule without a device)
KEPT_CASES = [
    ("base", "fp32", "focusft", True, "grad", True),
    ("base", "bf16", "causal-bilevel", True, "vjp", False),
    ("sparse", "bf16", "focusft", True, "vjp", True),  # the peak moves to the outer backward
    ("tied", "bf16", "focusft", True, "grad", False),
]


@pytest.mark.parametrize("case", KEPT_CASES, ids=case_id)
def test_estimate_matches_measured_peak_inner_kept(case):
    *spec, ddp = case
    assert_estimate_matches(*setup_case(*spec, inner_recompute="off"), ddp)


@pytest.mark.parametrize("ckpt, recompute", [(True, "off"), (False, "on")], ids=["ckpt-off", "nockpt-on"])
def test_estimate_follows_inner_recompute(ckpt, recompute):
    """--inner-recompute decides the inner loop's path, not --grad-checkpointing: the estimate follows it."""
    model_config, cfg, batches = setup_case("base", "fp32", "focusft", ckpt, "grad")
    cfg = replace(cfg, inner_recompute=recompute)
    assert memory_shape(cfg, model_config).inner_recompute == (recompute == "on")
    assert_estimate_matches(model_config, cfg, batches, ddp=True)


def assert_estimate_matches(model_config, cfg, batches, ddp: bool):
    torch.set_num_threads(1)  # the estimate's CPU attention scratch is per thread
    measured = measure_step_peak(model_config, cfg, batches, ddp=ddp)
    if not ddp:  # the measurement itself: a profiler running from before the model agrees
        assert measured.from_start == pytest.approx(measured.held_plus_rise, rel=0.005)
    # nproc 1 means `python train.py` (no DDP); a one-rank torchrun run has DDP
    check_estimate(replace(memory_shape(cfg, model_config), ddp=ddp), measured.held_plus_rise)


# Gradient accumulation (under DDP the micro-batches before the last accumulate into its buckets)
# and more than one rank: (shape, dtype, method, grad checkpointing, inner grad, micro-batches per
# step, ranks, parallelism: none (no torchrun), ddp, zero1 (DDP + ZeRO-1) or fsdp)
DIST_CASES = [
    ("base", "fp32", "sft", True, "grad", 2, 1, "ddp"),
    ("base", "fp32", "focusft", True, "grad", 4, 1, "ddp"),
    ("base", "bf16", "focusft", False, "vjp", 2, 1, "ddp"),
    ("base", "fp32", "sft", True, "grad", 2, 1, "none"),
    ("base", "fp32", "focusft", True, "grad", 2, 2, "ddp"),
    ("base", "fp32", "focusft", True, "grad", 2, 2, "zero1"),
    ("tied", "bf16", "sft", False, "grad", 3, 2, "zero1"),
    ("base", "fp32", "sft", True, "grad", 1, 2, "fsdp"),
    ("base", "fp32", "focusft", True, "grad", 1, 2, "fsdp"),
    ("base", "fp32", "focusft", True, "grad", 2, 2, "fsdp"),
    ("wide", "bf16", "focusft", True, "vjp", 2, 2, "fsdp"),
    ("base", "fp32", "focusft", False, "grad", 1, 2, "fsdp"),
    ("tied", "fp32", "sft-bidir", False, "grad", 2, 2, "fsdp"),
]


def dist_case_id(case) -> str:
    shape, dtype, method, ckpt, how, accum, world, parallel = case
    return f"{shape}-{dtype}-{method}-{'ckpt' if ckpt else 'nockpt'}-{how}-accum{accum}-{parallel}{world}"


@pytest.mark.parametrize("case", DIST_CASES, ids=dist_case_id)
def test_estimate_matches_measured_peak_accum_and_ranks(case, tmp_path):
    """The largest peak of the ranks against the estimate for a run of that many GPUs."""
    *spec, accum, world, parallel = case
    zero1 = {"zero1": True, "ddp": False}.get(parallel)  # DDP of 2 ranks is ZeRO-1 by default
    model_config, cfg, batches = setup_case(*spec, accum=accum, zero1=zero1, fsdp=parallel == "fsdp")
    torch.set_num_threads(1)
    if world == 1:
        measured = [measure_step_peak(model_config, cfg, batches, ddp=parallel != "none")]
    else:
        measured = measure_ranks_peak(model_config, cfg, batches, world, tmp_path)
    cfg = replace(cfg, estimate=replace(cfg.estimate, nproc=world))
    m = replace(memory_shape(cfg, model_config), ddp=parallel in ("ddp", "zero1"))
    check_estimate(m, max(p.held_plus_rise for p in measured))


SMALL_CONFIG = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 1000, "hidden_size": 64,
                "intermediate_size": 192, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def test_cli_config_only_directory(tmp_path, capsys):
    """A directory holding only a config.json is enough: the table, then one peak line at the end."""
    (tmp_path / "config.json").write_text(json.dumps(SMALL_CONFIG))
    cfg = train.parse_args(["--estimate-memory", "--model", str(tmp_path), "--max-length", "1024", "--nproc", "4"])
    train.main(cfg)
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert sum(line.startswith("peak per GPU") for line in lines) == 1
    for item in ("bf16 weights", "DDP's all-reduce buckets", "AdamW m + v", "ZeRO-1", "inner loop",
                 "outer backward", "loss piece", "fused", "CUDA"):
        assert item in out, item
    # the last line is estimate_peak's, for these flags (as if CUDA, 4 processes)
    peak, _ = estimate_peak(memory_shape(cfg, estimate_model_config(cfg)))
    assert lines[-1] == f"peak per GPU: {peak / 2**30:.1f} GiB"


def test_cli_bad_model_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--estimate-memory", "--model", str(tmp_path / "missing")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "neither a directory" in r.stderr


def test_bad_model_config(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "config.json").write_text(json.dumps({"model_type": "qwen2", "num_attention_heads": 0}))
    for model, expect in [(tmp_path, "has no config.json"), (tmp_path / "bad", "invalid JSON"),
                          (tmp_path / "zero", "not a Qwen2 config")]:
        with pytest.raises(train.TrainError, match=expect):
            train.main(train.parse_args(["--estimate-memory", "--model", str(model)]))


def test_hub_id_from_the_cache(tmp_path, monkeypatch):
    """A hub id whose config.json is in the Hugging Face cache needs no network."""
    conftest.make_hub_cache(tmp_path / "hub", "someone/small-qwen2", {"config.json": json.dumps(SMALL_CONFIG)})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config = estimate_model_config(train.parse_args(["--model", "someone/small-qwen2"]))
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 4, 1000)


@pytest.mark.parametrize("tokens, budget_gib", [(4096, 40), (32768, 70)])
def test_qwen7b_paper_run_estimate(tokens, budget_gib):
    """The paper's run (Qwen2.5-7B, bf16, 8 GPUs, default flags with the inner loop recomputing its
    layers, every position supervised) leaves
    room on an 80 GB GPU for what the estimate does not count (CUDA context, NCCL, the allocator)."""
    config_dir = conftest.shared_file("qwen2.5-configs/Qwen2.5-7B/config.json").parent
    cfg = train.parse_args(["--model", str(config_dir), "--max-length", str(tokens), "--inner-recompute", "on"])
    peak, _ = estimate_peak(memory_shape(cfg, estimate_model_config(cfg)))
    assert peak / 2**30 <= budget_gib


def test_random_models_need_no_files():
    """--model tiny / tiny-words name random models: their configs come from model.py itself."""
    for name, layers in (("tiny", TINY["num_hidden_layers"]), ("tiny-words", TINY_WORDS["num_hidden_layers"])):
        assert estimate_model_config(train.parse_args(["--model", name])).num_hidden_layers == layers


def test_memory_does_not_import_train():
    """memory.py stands alone: train.py imports it, never the reverse."""
    r = subprocess.run([sys.executable, "-c", "import sys, memory; print('train' in sys.modules)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
