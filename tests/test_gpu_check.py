"""bench/gpu_check.py: the GPU check runs end to end on the CPU with a tiny model, its FLOP count
matches torch.utils.flop_counter on real steps, and its sizing for Qwen2.5-7B at 4K holds."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import focusft
from bench import gpu_check
from bench.bench_method import synthetic_batch
from model import TINY, Qwen2, Qwen2Config


@pytest.fixture
def tiny_dir(tmp_path):
    """A model directory holding only a config.json (the tiny random Qwen2: 4 layers, 2 adapted)."""
    d = tmp_path / "tiny-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(Qwen2Config(**TINY).to_hf()))
    return d


def test_runs_end_to_end_on_cpu(tiny_dir, tmp_path, capsys):
    out = tmp_path / "check.json"
    res = gpu_check.main(["--model", str(tiny_dir), "--max-length", "64", "--steps", "1", "--warmup", "1",
                          "--threads", "1", "--device", "cpu", "--json", str(out)])
    table = capsys.readouterr().out
    assert "| measure | sft | focusft | focusft / sft |" in table and "| MFU (cpu: no MFU) | – | – |" in table
    assert json.loads(out.read_text())["methods"].keys() == {"sft", "focusft"}
    s, f = res["methods"]["sft"], res["methods"]["focusft"]
    assert s["s_per_step"] > 0 and f["s_per_step"] > 0 and len(s["losses"]) == len(f["losses"]) == 2
    # The profiled step's SDPA calls, from the model's structure: L = 4 layers, checkpointed (each
    # forward runs again in the backward), L_a = 2 adapted; per inner step a no_grad forward and a
    # recompute of each adapted layer, and an attention backward in all but the lowest one.
    L, L_a, k = 4, 2, 2
    assert s["kernels"]["inner"] == {}
    assert s["kernels"]["outer"] == f["kernels"]["outer"] == {"flash (CPU) fwd": 2 * L, "flash (CPU) bwd": L}
    assert f["kernels"]["inner"] == {"flash (CPU) fwd": k * 2 * L_a, "flash (CPU) bwd": k * (L_a - 1)}
    # bf16 against fp32 from the same initial weights on the same samples: close, not equal
    for r in (s, f):
        drift = [abs(a - b) for a, b in zip(r["losses"], r["fp32_losses"])]
        assert 0 < max(drift) < 0.02 * abs(r["fp32_losses"][0])
    assert res["fp32_skipped"] == "" and "WARNING" not in table


def attention_flops(config: Qwen2Config, S: int) -> int:
    """One attention forward of one layer (QK^T and PV over all S keys): flop_counter counts none
    for the CPU kernel, so the tests add it as gpu_check counts it."""
    return 4 * S * S * config.num_attention_heads * config.head_dim


def counted(fn) -> int:
    with FlopCounterMode(display=False) as c:
        fn()
    return c.get_total_flops()


def test_model_flops_match_flop_counter():
    """sft: one real step (no checkpointing). focusft: its outer pass with adapted fast weights as
    constants, plus each inner step as plain autograd (base weights frozen, backward to the fast
    weights), which is the arithmetic focusft.inner_loop does through torch.func."""
    config = Qwen2Config(**dict(TINY, vocab_size=1000, num_hidden_layers=6))
    model = Qwen2(config)
    S = 128
    batch = synthetic_batch(S, config.vocab_size, 0.25, 4, "cpu")[0]
    N = int(batch["loss_mask"][:, 1:].sum())
    L, attn = config.num_hidden_layers, attention_flops(config, S)
    sft = focusft.FocusConfig(method="sft")
    sft_ref = counted(lambda: focusft.focusft_loss(model, batch, sft)[0].backward()) + 3 * L * attn
    assert gpu_check.model_flops(config, sft, 1, S, N) == sft_ref

    fc = focusft.FocusConfig()
    layers = focusft.adapted_layers(model, fc)
    h, rope, mask, sel, targets = focusft.step_inputs(model, batch, fc)
    kept = []
    bottom = counted(lambda: kept.append(model.run_layers(h, rope, mask, 0, layers.start)))  # forward only
    h_bottom = kept[0]
    fast = focusft.init_fast_weights(model, fc, torch.Generator().manual_seed(0))

    def outer():  # the top layers' forward, then the backward through all layers
        top = model.run_layers(h_bottom, rope, mask, layers.start, layers.stop, fast, fc.fast_scale)
        focusft.response_loss(model, top, sel, targets).backward()

    def inner_step():
        leaves = {i: {n: tuple(t.clone().requires_grad_() for t in ab) for n, ab in d.items()} for i, d in fast.items()}
        top = model.run_layers(h_bottom.detach(), rope, mask, layers.start, layers.stop, leaves, fc.fast_scale)
        focusft.response_loss(model, top, sel, targets, None).backward()

    model.requires_grad_(False)
    inner = counted(inner_step)
    model.requires_grad_(True)
    L_a = len(layers)
    focus_ref = bottom + counted(outer) + fc.inner_steps * inner + attn * (3 * L + fc.inner_steps * (3 * L_a - 2))
    assert gpu_check.model_flops(config, fc, 1, S, N) == focus_ref


def test_sizing_qwen7b_at_4k_fits_eight_minutes():
    """The module's sizing: Qwen2.5-7B (Qwen2Config's defaults) at 4K, 25 % supervised, the
    default steps (warmup 1 + 3 timed + 1 profiled per method) at 40 % MFU of an A100."""
    config, S, N = Qwen2Config(), 4096, 1024
    sft = gpu_check.model_flops(config, focusft.FocusConfig(method="sft"), 1, S, N)
    focus = gpu_check.model_flops(config, focusft.FocusConfig(), 1, S, N)
    assert math.isclose(sft / S, 44.9e9, rel_tol=1e-3) and math.isclose(focus / S, 67.6e9, rel_tol=1e-3)
    seconds = 5 * (sft + focus) / (gpu_check.MFU_FORECAST * 312e12)
    assert 15 < seconds < 20  # the docstring's 18 s; recomputation and start-up stay far below 480 s


def test_refuses_what_it_cannot_measure(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--model", str(tmp_path), "--device", "cpu"])  # no config.json
    assert "not a directory holding a config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.main(["--model", str(tiny_dir), "--layers", "2", "--load-weights"])
    assert "cannot load" in capsys.readouterr().err
    args = gpu_check.parse_args(["--model", str(tiny_dir), "--max-length", "64"])
    config = Qwen2Config(**TINY)
    need = gpu_check.estimate_bytes(gpu_check.train_config(args, "focusft", "bf16", torch.device("cuda")), config)
    with pytest.raises(gpu_check.CheckError, match=r"pass --layers [123] \(the most that fit\)"):
        gpu_check.check_fits(args, config, torch.device("cuda"), budget=need * 0.9)
