"""Tests for examples/focusft_hf.py (FocuSFT on a Hugging Face model). The references:

  * focusft.focusft_loss on this repository's Qwen2 (model.py) loaded from the SAME checkpoint,
    written by transformers: equal loss, inner losses and base-weight gradients for the four
    methods, in float64 (the fast weights stay fp32 on both sides), with the same generator seed,
    so the same fast-weight initialisation;
  * the same step without the feature: activation checkpointing on vs off, eager vs sdpa attention
    (the additive mask must mean the same to both), left vs right padding;
  * one process for DDP: two gloo processes, each with its own batch, must end with the mean of
    the two single-process gradients (and do not when the step bypasses DDP's forward);
  * transformers.Trainer: two optimizer steps train every weight and leave no fast weight behind.

The model is a tiny random HF Qwen2 (4 layers: layers 2..3 are adapted). Skips without
transformers, and the Trainer test without accelerate. Run: python -m pytest tests/test_focusft_hf.py
"""

import math
from functools import partial

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (tests/requirements.txt)")

import data
import focusft
from examples import focusft_hf
from examples.focusft_hf import FocusFTTrainer, focusft_loss, forward_replaced
from focusft import FocusConfig
from model import Qwen2

torch.set_num_threads(min(2, torch.get_num_threads()))  # the CI box has 2 cores; don't oversubscribe

HF_TINY = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.1,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})

# Per sample: runs of (loss_mask value, length). User / assistant (tool call) / tool output / assistant;
# the second sample is shorter, so it is padded by 5 tokens.
RUNS = [[(0, 6), (1, 3), (0, 5), (1, 4)], [(0, 4), (1, 2), (0, 3), (1, 4)]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random HF Qwen2 written by transformers, biases and norm weights moved off their init."""
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM._from_config(transformers.Qwen2Config(**HF_TINY), attn_implementation="sdpa",
                                                    dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("hf-qwen2")
    hf.save_pretrained(path)
    return path


def load_hf(path, attn="sdpa", dtype=torch.float64):
    return transformers.Qwen2ForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=dtype)


def samples_from_runs(runs, vocab=HF_TINY["vocab_size"], seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for sample in runs:
        flags = [v for v, n in sample for _ in range(n)]
        out.append(data.Sample(input_ids=torch.randint(1, vocab, (len(flags),), generator=g).tolist(),
                               loss_mask=flags, segments=[0] * len(flags)))
    return out


def make_batch(runs=RUNS, left_pad=False):
    batch = data.collate(samples_from_runs(runs), pad_id=0)
    if left_pad:  # move each sample's padding to the front
        for key in batch:
            for b, n in enumerate(batch["attention_mask"].sum(-1).tolist()):
                batch[key][b] = batch[key][b].roll(batch[key].shape[1] - n)
    return batch


def gen(seed=1234):
    return torch.Generator().manual_seed(seed)


def step(model, loss_fn, batch, cfg, seed=1234):
    """(loss, inner losses or None, {name: grad}) of one step from zero gradients."""
    model.zero_grad(set_to_none=True)
    loss, stats = loss_fn(model, batch, cfg, gen(seed))
    loss.backward()
    return loss.detach(), stats["inner_losses"], {n: p.grad for n, p in model.named_parameters()}


def max_rel_diff(got, want):
    """max over tensors of max|got - want| / max|want|."""
    return max(float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in want)


def assert_same_step(a, b, tol=1e-10):
    (loss_a, inner_a, grads_a), (loss_b, inner_b, grads_b) = a, b
    rel = {"loss": abs(float(loss_a / loss_b) - 1), "grads": max_rel_diff(grads_a, grads_b)}
    if inner_b is not None:
        rel["inner"] = float(((inner_a - inner_b).abs() / inner_b.abs()).max())
    print(f"max relative differences: {rel}")
    assert all(v <= tol for v in rel.values()), rel
    return rel


# -----------------------------------------------------------------------------
# The same step as focusft.py on model.py


@pytest.mark.parametrize("method", list(focusft.METHODS))
def test_matches_focusft_loss_on_our_model(checkpoint, method):
    hf = load_hf(checkpoint)
    ours = Qwen2.from_pretrained(checkpoint, dtype=torch.float64)
    batch, cfg = make_batch(), FocusConfig(method=method)
    got = step(hf, focusft_loss, batch, cfg)
    want = step(ours, focusft.focusft_loss, batch, cfg)
    assert sorted(got[2]) == sorted(want[2]) and all(g is not None for g in got[2].values())
    assert_same_step(got, want)
    if cfg.bilevel:  # the inner loop moved the fast weights: the comparison is not vacuous
        assert want[1][1] < want[1][0] - 1e-3
        plain = step(ours, focusft.focusft_loss, batch, FocusConfig(method="sft-bidir" if cfg.bidirectional else "sft"))
        assert abs(float(want[0] - plain[0])) > 1e-3


def test_bidirectional_mask_matters(checkpoint):
    hf = load_hf(checkpoint)
    causal = step(hf, focusft_loss, make_batch(), FocusConfig(method="sft"))
    bidir = step(hf, focusft_loss, make_batch(), FocusConfig(method="sft-bidir"))
    assert abs(float(causal[0] - bidir[0])) > 1e-3


@pytest.mark.parametrize("method", ["focusft", "causal-bilevel"])
def test_left_padding_matches_right_padding(checkpoint, method):
    hf = load_hf(checkpoint)
    cfg = FocusConfig(method=method)
    assert_same_step(step(hf, focusft_loss, make_batch(left_pad=True), cfg), step(hf, focusft_loss, make_batch(), cfg))


def test_eager_attention_gives_the_same_step(checkpoint, monkeypatch):
    """The additive 4-D mask means the same to eager attention (which adds it to the scores) as to
    SDPA. Eager takes its softmax in fp32 even in an fp64 model, hence the fp32-level tolerance.
    The footgun it avoids: eager attention given the bool mask runs, and masks nothing."""
    cfg = FocusConfig(method="focusft")
    eager = step(load_hf(checkpoint, "eager"), focusft_loss, make_batch(), cfg)
    assert_same_step(eager, step(load_hf(checkpoint), focusft_loss, make_batch(), cfg), tol=1e-5)
    monkeypatch.setattr(focusft_hf, "hf_attention_mask",
                        lambda hf_model, batch, cfg: focusft.build_mask(batch["loss_mask"], batch["attention_mask"]))
    with_bool_mask = step(load_hf(checkpoint, "eager"), focusft_loss, make_batch(), cfg)
    assert abs(float(with_bool_mask[0] / eager[0]) - 1) > 1e-3


def test_activation_checkpointing_gives_the_same_step(checkpoint):
    cfg = FocusConfig(method="focusft")
    plain = step(load_hf(checkpoint).train(), focusft_loss, make_batch(), cfg)
    hf = load_hf(checkpoint).train()
    hf.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in hf.model.layers)
    assert_same_step(step(hf, focusft_loss, make_batch(), cfg), plain)
    assert all(layer.gradient_checkpointing for layer in hf.model.layers)  # restored


def test_no_response_token_gives_zero_loss_reaching_every_parameter(checkpoint):
    hf = load_hf(checkpoint)
    loss, inner, grads = step(hf, focusft_loss, make_batch([[(0, 9)], [(0, 6)]]), FocusConfig())
    assert float(loss) == 0.0 and torch.equal(inner, torch.zeros(2, dtype=inner.dtype))
    assert all(g is not None and not g.any() for g in grads.values())


def test_no_hooks_or_fast_weights_left_behind(checkpoint):
    hf = load_hf(checkpoint)
    state_before = set(hf.state_dict())
    step(hf, focusft_loss, make_batch(), FocusConfig())
    assert set(hf.state_dict()) == state_before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in hf.modules())


def test_unsupported_attention_is_refused(checkpoint):
    hf = load_hf(checkpoint)
    hf.config._attn_implementation_internal = "flash_attention_2"  # (the public setter would load its kernel)
    with pytest.raises(ValueError, match="attn_implementation='sdpa' or 'eager'"):
        focusft_loss(hf, make_batch(), FocusConfig())


# -----------------------------------------------------------------------------
# DDP: two processes against one


def _ddp_worker(rank, path, rdv, out, runs):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=2)
    hf = load_hf(path)
    ddp = torch.nn.parallel.DistributedDataParallel(hf)
    batch, cfg = make_batch(runs[rank]), FocusConfig()
    grads = {}
    for how in ("bypassing DDP", "as DDP's forward"):
        hf.zero_grad(set_to_none=True)
        if how == "bypassing DDP":
            loss, _ = focusft_loss(hf, batch, cfg, gen(rank))
        else:
            with forward_replaced(hf, lambda b: focusft_loss(hf, b, cfg, gen(rank))):
                loss, _ = ddp(batch)
        loss.backward()
        grads[how] = {n: p.grad.clone() for n, p in hf.named_parameters()}
    torch.save(grads, f"{out}/rank{rank}.pt")
    del ddp  # before the process group (train.finish says why)
    torch.distributed.destroy_process_group()


def test_ddp_averages_the_gradients_of_two_processes(checkpoint, tmp_path):
    runs = [RUNS, [[(0, 5), (1, 6)], [(0, 7), (1, 2), (0, 2), (1, 3)]]]
    # fork: the workers inherit the imported modules instead of importing transformers again (seconds each);
    # _ddp_worker sets one thread first, as DataLoader workers do (a forked OpenMP pool is not usable)
    torch.multiprocessing.start_processes(_ddp_worker, nprocs=2, start_method="fork",
                                          args=(str(checkpoint), str(tmp_path / "rdv"), str(tmp_path), runs))
    hf = load_hf(checkpoint)
    single = [step(hf, focusft_loss, make_batch(runs[r]), FocusConfig(), seed=r)[2] for r in range(2)]
    single = [{n: g.clone() for n, g in grads.items()} for grads in single]  # step() hands out live .grad
    mean = {n: (single[0][n] + single[1][n]) / 2 for n in single[0]}
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert max_rel_diff(got["as DDP's forward"], mean) <= 1e-10
        # the footgun the Trainer avoids: a backward after the bare model's forward is not synchronised
        assert max_rel_diff(got["bypassing DDP"], single[r]) <= 1e-10
        assert max_rel_diff(got["bypassing DDP"], mean) > 1e-3


# -----------------------------------------------------------------------------
# transformers.Trainer


def test_trainer_two_optimizer_steps(checkpoint, tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (tests/requirements.txt)")
    hf = load_hf(checkpoint, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in hf.named_parameters()}
    samples = samples_from_runs(RUNS * 2 + [[(0, 3), (1, 8)], [(1, 5), (0, 2), (1, 4)]], seed=3)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, learning_rate=1e-2, save_strategy="no",
                                          report_to="none", remove_unused_columns=False, use_cpu=True,
                                          disable_tqdm=True, logging_steps=1, seed=0)
    trainer = FocusFTTrainer(model=hf, args=args, train_dataset=samples,
                             data_collator=partial(data.collate, pad_id=0), focus=FocusConfig())
    result = trainer.train()
    assert trainer.state.global_step == 2
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses) and math.isfinite(result.training_loss)
    # every weight moved (embedding rows of tokens that never occur get no gradient)
    for n, p in hf.named_parameters():
        moved = (p.detach() != before[n]).any(-1) if n == "model.embed_tokens.weight" else (p.detach() != before[n])
        assert moved.any() if n == "model.embed_tokens.weight" else moved.all(), n
    # the optimizer holds exactly the model's parameters; no fast weight, hook or forward override is left
    in_optimizer = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in hf.parameters()} and len(in_optimizer) == len(before)
    assert len(trainer.optimizer.state) == len(before)
    assert set(hf.state_dict()) == set(before)
    assert not any(m._forward_hooks for m in hf.modules()) and "forward" not in vars(hf)


def test_trainer_requires_remove_unused_columns_off(checkpoint, tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (tests/requirements.txt)")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        FocusFTTrainer(model=load_hf(checkpoint, dtype=torch.float32), args=args)
