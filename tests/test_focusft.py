"""Tests for focusft.py (the method). Every test compares against a reference:

  * the attention mask against a brute-force double loop written from the rule in the authors'
    code (runs of equal loss-mask value are turns; see the docstring of `brute_force_mask`), and
    against hand-drawn 6x6 matrices;
  * the torch.func inner gradients (whole stack, and recomputed layer by layer) against plain
    torch.autograd.grad and against each other, the clipping against torch.nn.utils.clip_grad_norm_;
  * the chunked cross-entropy against the one-piece one; a micro-batch without response tokens
    (loss 0, a zero gradient for every parameter);
  * the whole step (all four methods, both clipping modes, with and without activation
    checkpointing) against tests/reference.py, which recomputes everything the way the authors'
    code does;
  * "sft" against a plain causal next-token SFT loss written out here.

The models are model.TINY with untied embeddings (so that a mix-up of lm_head and embed_tokens
shows): 4 layers, so layers 2..3 are adapted. Comparisons of gradients run in float64 so that a
real mismatch cannot hide inside rounding noise (the fast weights themselves stay fp32, as in
training). Run: python -m pytest tests/test_focusft.py
"""

import math
from dataclasses import replace

import pytest
import torch


import focusft
import generate as generate_lib
import model as model_lib
from focusft import FocusConfig
from model import TINY, Qwen2, Qwen2Config
from reference import full_logits_loss, naive_focusft_loss

torch.set_num_threads(min(2, torch.get_num_threads()))  # the CI box has 2 cores; don't oversubscribe

UNTIED = {**TINY, "tie_word_embeddings": False}


def tiny_model(dtype=torch.float64, seed=0, config=UNTIED):
    torch.manual_seed(seed)
    model = Qwen2(Qwen2Config(**config))
    with torch.no_grad():  # move biases and norm weights off their init so that a dropped one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def batch_from_runs(samples, vocab=TINY["vocab_size"], seed=0, left_pad=False):
    """samples: one list of (loss_value, run_length) per sample -> a padded batch dict."""
    g = torch.Generator().manual_seed(seed)
    lengths = [sum(n for _, n in runs) for runs in samples]
    B, S = len(samples), max(lengths)
    tokens = torch.randint(0, vocab, (B, S), generator=g)  # sample b's tokens: tokens[b, :length]
    ids = torch.zeros(B, S, dtype=torch.long)  # padding id 0
    am = torch.zeros(B, S, dtype=torch.bool)
    lm = torch.zeros(B, S, dtype=torch.bool)
    for b, runs in enumerate(samples):
        flags = [bool(v) for v, n in runs for _ in range(n)]
        where = slice(S - len(flags), S) if left_pad else slice(0, len(flags))
        ids[b, where] = tokens[b, :len(flags)]
        am[b, where] = True
        lm[b, where] = torch.tensor(flags)
    return {"input_ids": ids, "attention_mask": am, "loss_mask": lm}


# Two multi-turn samples: user / assistant (tool call) / tool output / assistant; the second is
# shorter, so it is right-padded by 5 tokens.
BATCH_RUNS = [[(0, 6), (1, 3), (0, 5), (1, 4)], [(0, 4), (1, 2), (0, 3), (1, 4)]]


def gen(seed=1234):
    return torch.Generator().manual_seed(seed)


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def flat_fast(fast):
    return [t for layer in fast.values() for ab in layer.values() for t in ab]


def prepare(model, batch, cfg):
    """The per-batch pieces focusft_loss builds before the inner loop (h_bottom detached)."""
    h, rope, mask, sel, targets = focusft.step_inputs(model, batch, cfg)
    start = focusft.adapted_layers(model, cfg).start
    return model.run_layers(h, rope, mask, 0, start).detach(), rope, mask, sel, targets


def with_nonzero_b(fast, seed=5):
    """The same fast weights with B != 0, so that A gets a gradient too."""
    g = gen(seed)
    return {i: {n: (A, 0.1 * torch.randn(B.shape, generator=g)) for n, (A, B) in layer.items()}
            for i, layer in fast.items()}


# -----------------------------------------------------------------------------
# Eq. 5: the mask


def brute_force_mask(loss_mask, attention_mask, bidirectional=True):
    """The authors' rule, one (i, j) pair at a time. Turns are the maximal runs of equal loss-mask
    value among the real tokens. For real query i and real key j: j in an earlier run -> visible;
    same context run -> visible both ways; same response run -> visible iff j <= i; later run ->
    never. Padding keys are never visible; a padding query sees only itself. Causal: j <= i."""
    B, S = loss_mask.shape
    out = torch.zeros(B, 1, S, S, dtype=torch.bool)
    for b in range(B):
        lm, am = loss_mask[b].tolist(), attention_mask[b].tolist()
        run, r, prev = [None] * S, -1, None
        for t in range(S):
            if am[t]:
                if lm[t] != prev:
                    r, prev = r + 1, lm[t]
                run[t] = r
        for i in range(S):
            for j in range(S):
                if not am[i]:
                    ok = i == j
                elif not am[j]:
                    ok = False
                elif not bidirectional:
                    ok = j <= i
                elif run[j] < run[i]:
                    ok = True
                elif run[j] > run[i]:
                    ok = False
                elif not lm[i]:  # same context run
                    ok = True
                else:  # same response run
                    ok = j <= i
                out[b, 0, i, j] = ok
    return out


@pytest.mark.parametrize("bidirectional", [True, False])
def test_mask_matches_brute_force_on_random_patterns(bidirectional):
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        B, S = 3, int(torch.randint(1, 24, (1,), generator=g))
        p_flip = float(torch.rand(1, generator=g)) * 0.6  # short and long runs
        lm = torch.zeros(B, S, dtype=torch.bool)
        lm[:, 0] = torch.rand(B, generator=g) < 0.5
        for t in range(1, S):
            lm[:, t] = lm[:, t - 1] ^ (torch.rand(B, generator=g) < p_flip)
        n_real = torch.randint(0, S + 1, (B,), generator=g)
        am = torch.arange(S)[None, :] < n_real[:, None]  # right padding (some rows all padding)
        if trial % 3 == 1:
            am = am.flip(-1)  # left padding
        if trial % 2:
            lm = lm & am  # as data.py produces it; otherwise padding carries random loss-mask values
        got = focusft.build_mask(lm, am, bidirectional)
        want = brute_force_mask(lm, am, bidirectional)
        assert got.shape == (B, 1, S, S) and got.dtype == torch.bool
        assert torch.equal(got, want), f"trial {trial}: lm={lm.int().tolist()} am={am.int().tolist()}"


# Hand-drawn 6x6 cases: loss mask (r = 1), attention mask, and the expected rows (query i sees key j).
HAND_DRAWN = {
    "single turn": ([0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1]]),
    "multi-turn with a tool run": ([0, 0, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1], [  # user, call, tool output, answer
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1]]),
    "no response tokens": ([0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [[1] * 6] * 6),
    "all response": ([1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1]]),
    "right padding": ([0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1]]),
    "left padding": ([0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1], [
        [1, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 1]]),
}


@pytest.mark.parametrize("case", list(HAND_DRAWN))
def test_mask_hand_drawn(case):
    lm, am, rows = HAND_DRAWN[case]
    got = focusft.build_mask(torch.tensor([lm], dtype=torch.bool), torch.tensor([am], dtype=torch.bool))
    assert got[0, 0].int().tolist() == rows


def test_causal_mask_is_tril_with_padding():
    lm = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 0, 1, 1, 1]], dtype=torch.bool)
    am = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    got = focusft.build_mask(lm, am, bidirectional=False)[:, 0]
    tril = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(got[1], tril)  # no padding: exactly tril, whatever the loss mask
    want = tril & am[0][None, :]  # padding keys blocked ...
    want[4:] = torch.eye(6, dtype=torch.bool)[4:]  # ... and each padding query sees only itself
    assert torch.equal(got[0], want)


def test_step_mask_none_only_for_causal_right_padded():
    right = batch_from_runs(BATCH_RUNS)
    nopad = batch_from_runs([BATCH_RUNS[0], BATCH_RUNS[0]])
    left = batch_from_runs(BATCH_RUNS, left_pad=True)
    assert focusft.step_mask(right, bidirectional=False) is None
    assert focusft.step_mask(nopad, bidirectional=False) is None
    assert torch.equal(focusft.step_mask(left, bidirectional=False),
                       brute_force_mask(left["loss_mask"], left["attention_mask"], False))
    for b in (right, nopad, left):
        assert torch.equal(focusft.step_mask(b, bidirectional=True),
                           brute_force_mask(b["loss_mask"], b["attention_mask"], True))


def test_causal_none_mask_equals_explicit_causal_mask(monkeypatch):
    """The None shortcut (SDPA is_causal) must give the same loss and gradients as the mask."""
    model, batch = tiny_model(), batch_from_runs(BATCH_RUNS)
    cfg = FocusConfig(method="causal-bilevel")
    assert focusft.step_mask(batch, False) is None
    loss, stats = focusft.focusft_loss(model, batch, cfg, gen())
    loss.backward()
    want = grads_of(model)
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(focusft, "step_mask", lambda b, bidir: focusft.build_mask(
        b["loss_mask"], b["attention_mask"], bidir))
    loss2, stats2 = focusft.focusft_loss(model, batch, cfg, gen())
    loss2.backward()
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(stats2["inner_losses"], stats["inner_losses"])
    for n, g in grads_of(model).items():
        torch.testing.assert_close(g, want[n], msg=lambda m: f"{n}: {m}")


# -----------------------------------------------------------------------------
# Fast weights


def test_init_fast_weights_layers_shapes_and_distribution():
    model, cfg = tiny_model(torch.float32), FocusConfig()
    fast = focusft.init_fast_weights(model, cfg, gen(7))
    assert list(fast) == [2, 3]  # int(4 * 0.65) = 2 .. 3
    D, I, r = TINY["hidden_size"], TINY["intermediate_size"], cfg.lora_rank
    for layer in fast.values():
        assert set(layer) == {"gate_proj", "up_proj", "down_proj"}
        for name, (A, B) in layer.items():
            fan_in, out = (I, D) if name == "down_proj" else (D, I)
            assert A.shape == (r, fan_in) and B.shape == (out, r)
            assert A.dtype == B.dtype == torch.float32
            assert not A.requires_grad and not B.requires_grad
            assert torch.count_nonzero(B) == 0
            bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
            assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound
            assert abs(A.var().item() - bound ** 2 / 3) < 0.15 * bound ** 2 / 3
    # deterministic for a seeded generator, different for another seed
    again = focusft.init_fast_weights(model, cfg, gen(7))
    other = focusft.init_fast_weights(model, cfg, gen(8))
    assert all(torch.equal(a, b) for a, b in zip(flat_fast(fast), flat_fast(again)))
    assert not torch.equal(fast[2]["gate_proj"][0], other[2]["gate_proj"][0])
    # generator=None draws from torch's global generator
    torch.manual_seed(3)
    glob = focusft.init_fast_weights(model, cfg, None)
    torch.manual_seed(3)
    assert torch.equal(glob[3]["up_proj"][0], focusft.init_fast_weights(model, cfg, None)[3]["up_proj"][0])


def test_adapted_layers_of_qwen25_7b_are_18_to_27():
    cfg7b = Qwen2Config(vocab_size=64, hidden_size=448, intermediate_size=2368, num_hidden_layers=28,
                        num_attention_heads=7, num_key_value_heads=1)
    with torch.device("meta"):  # no memory: only the layer count and projection shapes matter
        model = Qwen2(cfg7b)
    fast = focusft.init_fast_weights(model, FocusConfig(), gen())
    assert list(fast) == list(range(18, 28))  # "top 10 of 28" (paper Table 5)
    assert fast[27]["down_proj"][0].shape == (32, 2368) and fast[27]["down_proj"][1].shape == (448, 32)
    assert list(focusft.adapted_layers(model, FocusConfig(layer_fraction=0.5))) == list(range(14, 28))


def test_fast_weights_never_become_module_state():
    model, batch = tiny_model(), batch_from_runs(BATCH_RUNS)
    keys = list(model.state_dict())
    params = [p for p in model.parameters()]
    seen = []  # every fast-weight dict the model receives
    run_layers = model.run_layers

    def spy(*args, **kw):
        fw = kw.get("fast_weights", args[5] if len(args) > 5 else None)
        if fw:
            seen.append(fw)
        return run_layers(*args, **kw)

    model.run_layers = spy
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, _ = focusft.focusft_loss(model, batch, FocusConfig(), gen())
    loss.backward()
    opt.step()
    assert seen, "the outer pass received no fast weights"
    fast = seen[-1]  # the outer pass: the adapted fast weights, as constants
    assert list(model.state_dict()) == keys
    assert len(list(model.parameters())) == len(params)
    assert all(p is q for p, q in zip(model.parameters(), params))
    assert len(opt.param_groups[0]["params"]) == len(params)
    for t in flat_fast(fast):
        assert t.grad_fn is None and not t.requires_grad and t.grad is None
        assert all(t is not p for p in params)
    assert any(torch.count_nonzero(B) for layer in fast.values() for _, B in layer.values())  # they adapted


# -----------------------------------------------------------------------------
# Eq. 3: the inner loop


def clipped(g, max_norm):
    return g * min(1.0, max_norm / (g.norm().item() + 1e-6))


INNER_PATHS = {"whole-stack": focusft.inner_grads_whole_stack, "by-layer": focusft.inner_grads_by_layer}


@pytest.mark.parametrize("inner_grad", ["grad", "vjp"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["whole-stack", "by-layer"])
def test_inner_gradients_equal_plain_autograd(inner_grad, ckpt):
    """One inner step with lr 1 and no clipping returns phi - grad: compare grad with autograd.grad
    on a straightforward full forward of the model (torch.func.grad and torch.func.vjp; the whole
    stack in one transform, and layer by layer as with activation checkpointing on)."""
    model, batch = tiny_model(), batch_from_runs(BATCH_RUNS)
    model.gradient_checkpointing = ckpt
    cfg = FocusConfig(inner_steps=1, inner_lr=1.0, inner_clip=1e9, inner_grad=inner_grad, loss_chunk=5)
    fast = with_nonzero_b(focusft.init_fast_weights(model, cfg, gen()))
    mask = focusft.build_mask(batch["loss_mask"], batch["attention_mask"], cfg.bidirectional)
    leaves = focusft.map_fast(lambda t: t.clone().requires_grad_(), fast)
    ref_loss = full_logits_loss(model, batch, mask, leaves, cfg.fast_scale)
    ref_grads = torch.autograd.grad(ref_loss, flat_fast(leaves))

    new, losses = focusft.inner_loop(model, *prepare(model, batch, cfg), fast, cfg)
    torch.testing.assert_close(losses[0], ref_loss.detach().float(), rtol=1e-6, atol=0)
    for old, upd, ref in zip(flat_fast(fast), flat_fast(new), ref_grads):
        assert ref.norm() > 0
        torch.testing.assert_close(old - upd, ref, rtol=1e-5, atol=1e-7)

    # the same step with clipping: each tensor's gradient clipped on its own
    new, _ = focusft.inner_loop(model, *prepare(model, batch, cfg), fast, replace(cfg, inner_clip=0.12))
    for old, upd, ref in zip(flat_fast(fast), flat_fast(new), ref_grads):
        torch.testing.assert_close(old - upd, clipped(ref, 0.12), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("inner_grad", ["grad", "vjp"])
def test_by_layer_recomputation_equals_the_whole_stack(inner_grad):
    """inner_grads_by_layer (recompute each layer, chunked loss) and inner_grads_whole_stack (one
    transform, one-piece loss) give the same gradients and loss, and inner_loop with either gives
    the same fast weights and losses after 3 clipped steps, for both clipping modes."""
    model, batch = tiny_model(), batch_from_runs(BATCH_RUNS)
    cfg = FocusConfig(inner_steps=3, inner_grad=inner_grad, loss_chunk=4)
    pieces = prepare(model, batch, cfg)
    fast = with_nonzero_b(focusft.init_fast_weights(model, cfg, gen()))
    with torch.no_grad():
        out = {name: path(model, *pieces, fast, cfg) for name, path in INNER_PATHS.items()}
    (g0, l0), (g1, l1) = out.values()
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for a, b in zip(flat_fast(g0), flat_fast(g1), strict=True):
        assert a.norm() > 0
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
    for clip_mode, clip in (("per-tensor", 0.12), ("global", 0.3)):
        cfg_clip = replace(cfg, clip_mode=clip_mode, inner_clip=clip)
        runs = []
        for ckpt in (False, True):
            model.gradient_checkpointing = ckpt
            runs.append(focusft.inner_loop(model, *pieces, fast, cfg_clip))
        (f0, l0), (f1, l1) = runs
        torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
        for a, b in zip(flat_fast(f0), flat_fast(f1), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)


def test_inner_loop_keeps_no_graph_and_no_base_grads():
    model, batch = tiny_model(), batch_from_runs(BATCH_RUNS)
    cfg = FocusConfig()
    h_bottom, rope, mask, sel, targets = prepare(model, batch, cfg)
    h_bottom.requires_grad_()  # even if handed a tensor that requires grad, nothing may attach to it
    fast0 = focusft.init_fast_weights(model, cfg, gen())
    fast, losses = focusft.inner_loop(model, h_bottom, rope, mask, sel, targets, fast0, cfg)
    assert all(p.grad is None for p in model.parameters())
    assert h_bottom.grad is None
    assert losses.grad_fn is None and not losses.requires_grad
    for t in flat_fast(fast):
        assert t.grad_fn is None and not t.requires_grad


def test_inner_loop_lowers_the_inner_loss():
    model, batch = tiny_model(torch.float32), batch_from_runs(BATCH_RUNS)
    cfg = FocusConfig(inner_steps=3)
    pieces = prepare(model, batch, cfg)
    fast0 = focusft.init_fast_weights(model, cfg, gen())
    fast, losses = focusft.inner_loop(model, *pieces, fast0, cfg)
    h_bottom, rope, mask, sel, targets = pieces
    layers = focusft.adapted_layers(model, cfg)
    with torch.no_grad():
        h = model.run_layers(h_bottom, rope, mask, layers.start, layers.stop, fast, cfg.fast_scale)
        after = focusft.response_loss(model, h, sel, targets)
    assert torch.all(losses[1:] < losses[:-1]), losses
    assert after < losses[-1] < losses[0] - 0.05, (losses, after)


def test_non_finite_inner_loss_skips_the_update():
    model, batch = tiny_model(torch.float32), batch_from_runs(BATCH_RUNS)
    cfg = FocusConfig()
    h_bottom, rope, mask, sel, targets = prepare(model, batch, cfg)
    fast0 = focusft.init_fast_weights(model, cfg, gen())
    for bad in (float("inf"), float("nan")):
        h = h_bottom.clone()
        h[0, 3, 5] = bad
        fast, losses = focusft.inner_loop(model, h, rope, mask, sel, targets, fast0, cfg)
        assert not torch.isfinite(losses).any()
        for a, b in zip(flat_fast(fast0), flat_fast(fast)):
            assert torch.equal(a, b)
    fast, losses = focusft.inner_loop(model, h_bottom, rope, mask, sel, targets, fast0, cfg)  # sanity
    assert torch.isfinite(losses).all() and not all(torch.equal(a, b) for a, b in zip(flat_fast(fast0), flat_fast(fast)))


@pytest.mark.parametrize("mode", ["per-tensor", "global"])
def test_clipping_matches_clip_grad_norm(mode):
    g = torch.Generator().manual_seed(0)
    grads = {i: {n: (s * torch.randn(4, 6, generator=g), s * torch.randn(5, 4, generator=g))
                 for n, s in (("gate_proj", 0.01), ("up_proj", 0.5), ("down_proj", 3.0))} for i in (2, 3)}
    got = flat_fast(focusft.clip_fast_grads(grads, 0.8, mode))
    copies = [torch.nn.Parameter(torch.zeros_like(t)) for t in flat_fast(grads)]
    for p, t in zip(copies, flat_fast(grads)):
        p.grad = t.clone()
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(copies, 0.8)
    else:
        for p in copies:
            torch.nn.utils.clip_grad_norm_([p], 0.8)
    for a, p in zip(got, copies):
        torch.testing.assert_close(a, p.grad)
    norms = [t.norm() for t in got]
    if mode == "per-tensor":  # the small ones untouched, the big ones cut to the limit
        assert min(norms) < 0.8 and max(n.item() for n in norms) == pytest.approx(0.8, rel=1e-5)


# -----------------------------------------------------------------------------
# The whole step against the naive (authors'-style) reference


STEP_CASES = [(m, "per-tensor") for m in focusft.METHODS] + [(m, "global") for m in ("causal-bilevel", "focusft")]


@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("method,clip_mode", STEP_CASES)
def test_step_matches_naive_reference(method, clip_mode, ckpt):
    """Loss, inner losses and every base-weight gradient equal those of a naive implementation
    that reruns the whole model at every inner step with full-vocabulary logits. The loss runs in
    pieces of 5 supervised positions (13 here), so the chunked paths are the ones compared."""
    model, batch = tiny_model(), batch_from_runs(BATCH_RUNS)
    # the per-tensor inner gradient norms are 0.03-0.18 here, their global norm 0.34-0.39: these
    # clips cut some tensors but not others, and the global norm in both steps
    cfg = FocusConfig(method=method, clip_mode=clip_mode, inner_clip=0.12 if clip_mode == "per-tensor" else 0.3,
                      loss_chunk=5)
    ref_loss, ref_inner = naive_focusft_loss(model, batch, cfg, gen())
    ref_loss.backward()
    want = grads_of(model)
    model.zero_grad(set_to_none=True)

    model.gradient_checkpointing = ckpt
    loss, stats = focusft.focusft_loss(model, batch, cfg, gen())
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert stats["n_targets"] == int((batch["loss_mask"][:, 1:] & batch["attention_mask"][:, 1:]).sum()) == 13
    if cfg.bilevel:
        assert stats["inner_losses"].shape == (cfg.inner_steps,)
        torch.testing.assert_close(stats["inner_losses"], ref_inner.to(stats["inner_losses"].dtype),
                                   rtol=1e-6, atol=0)
        assert stats["inner_losses"][1] < stats["inner_losses"][0]
    else:
        assert stats["inner_losses"] is None
    got = grads_of(model)
    assert got.keys() == want.keys() and len(got) == len(list(model.parameters()))
    for n, g in got.items():  # the cross-entropy and the fast weights are fp32: ~1e-7 relative noise
        torch.testing.assert_close(g, want[n], rtol=1e-5, atol=1e-6 * want[n].abs().max().item(),
                                   msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("method", list(focusft.METHODS))
def test_inner_recompute_on_and_off_give_the_same_step(method, ckpt):
    """focusft_loss(by_layer=True) (the adapted layers recomputed one at a time, --inner-recompute on)
    and by_layer=False (their activations kept, in the outer pass too: off), checkpointing on or off: the
    same loss, inner losses and base-weight gradients. Not bit for bit for the bilevel methods: the
    two paths sum the same terms in another order (one transform vs a chain of per-layer ones, the
    loss in one piece vs chunks of 5), so they agree to float noise (fp64 model, fp32 fast weights:
    ~1e-7 relative). The methods without an inner loop never look at by_layer: bitwise equal."""
    model, batch = tiny_model(), batch_from_runs(BATCH_RUNS)
    model.gradient_checkpointing = ckpt
    cfg = FocusConfig(method=method, loss_chunk=5)
    runs = []
    for by_layer in (True, False):
        model.zero_grad(set_to_none=True)
        loss, stats = focusft.focusft_loss(model, batch, cfg, gen(), by_layer=by_layer)
        loss.backward()
        runs.append((loss.detach(), stats["inner_losses"], grads_of(model)))
    (l0, i0, g0), (l1, i1, g1) = runs
    assert g0.keys() == g1.keys() and len(g0) == len(list(model.parameters()))
    if not cfg.bilevel:
        assert i0 is i1 is None and torch.equal(l0, l1)
        assert all(torch.equal(g0[n], g1[n]) for n in g0)
        return
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    torch.testing.assert_close(i1, i0, rtol=1e-6, atol=0)
    assert not torch.equal(i0, torch.zeros_like(i0)) and i0[1] < i0[0]
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6 * g0[n].abs().max().item(),
                                   msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("method", ["causal-bilevel", "focusft"])
def test_left_and_right_padding_give_the_same_step(method):
    """Where the padding sits must not matter: same loss, inner losses and gradients."""
    model = tiny_model()
    cfg = FocusConfig(method=method, inner_clip=0.06)
    out = []
    for left in (False, True):
        model.zero_grad(set_to_none=True)
        loss, stats = focusft.focusft_loss(model, batch_from_runs(BATCH_RUNS, left_pad=left), cfg, gen())
        loss.backward()
        out.append((loss, stats["inner_losses"], grads_of(model)))
    (l0, i0, g0), (l1, i1, g1) = out
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    torch.testing.assert_close(i1, i0, rtol=1e-6, atol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6 * g0[n].abs().max().item())


def test_clip_mode_matters_here():
    """The global-clip cases of test_step_matches_naive_reference would prove nothing if the mode
    made no difference on that batch."""
    model, batch = tiny_model(), batch_from_runs(BATCH_RUNS)
    cfg = FocusConfig(clip_mode="global", inner_clip=0.3)
    loss, _ = focusft.focusft_loss(model, batch, cfg, gen())
    per_tensor, _ = focusft.focusft_loss(model, batch, replace(cfg, clip_mode="per-tensor"), gen())
    assert not torch.allclose(per_tensor, loss, rtol=1e-6, atol=0)


def test_chunked_loss_equals_one_piece():
    """Eq. 4 in checkpointed pieces of 4 positions (13 targets: 4 pieces) vs in one piece: the same
    loss and gradients w.r.t. h and every parameter; and the inner loop's chunked dL/dh
    (response_loss_grad) vs autograd of the one-piece loss."""
    model, batch = tiny_model(), batch_from_runs(BATCH_RUNS)
    h, rope, mask, sel, targets = focusft.step_inputs(model, batch, FocusConfig())
    h = model.run_layers(h, rope, mask)
    wrt = [h] + list(model.parameters())
    one = focusft.response_loss(model, h, sel, targets, chunk=None)
    want = torch.autograd.grad(one, wrt, retain_graph=True)
    chunked = focusft.response_loss(model, h, sel, targets, chunk=4)
    got = torch.autograd.grad(chunked, wrt)
    torch.testing.assert_close(chunked, one, rtol=1e-6, atol=0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7 * w.abs().max().item())
    with torch.no_grad():
        loss, g_h = focusft.response_loss_grad(model, h.detach(), sel, targets, FocusConfig(loss_chunk=4))
    torch.testing.assert_close(loss, one.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(g_h, want[0], rtol=1e-6, atol=1e-9)


def test_loss_chunk_bounds_the_logits_with_checkpointing(monkeypatch):
    """With checkpointing on, no loss computation (inner or outer, forward or backward) sees more
    than loss_chunk positions at once, and the result is that of one piece."""
    model, batch = tiny_model(), batch_from_runs(BATCH_RUNS)
    model.gradient_checkpointing = True
    rows = []
    logits = model.logits
    monkeypatch.setattr(model, "logits", lambda x: rows.append(x.shape[0]) or logits(x))
    loss, stats = focusft.focusft_loss(model, batch, FocusConfig(loss_chunk=4), gen())
    loss.backward()
    assert max(rows) == 4 and sum(rows) == 13 * (2 + 2)  # 2 inner steps, outer forward and recompute
    chunked = grads_of(model)
    model.zero_grad(set_to_none=True)
    loss1, stats1 = focusft.focusft_loss(model, batch, FocusConfig(), gen())
    loss1.backward()
    torch.testing.assert_close(loss, loss1, rtol=1e-6, atol=0)
    torch.testing.assert_close(stats["inner_losses"], stats1["inner_losses"], rtol=1e-6, atol=0)
    for n, g in grads_of(model).items():
        torch.testing.assert_close(chunked[n], g, rtol=1e-5, atol=1e-6 * g.abs().max().item())


def test_checkpointing_covers_every_layer_of_the_outer_pass_and_none_of_the_inner(monkeypatch):
    """run_layers checkpoints through model.checkpoint: each layer once (the outer pass), none
    inside the inner loop (torch.func would refuse it)."""
    model, batch = tiny_model(), batch_from_runs(BATCH_RUNS)
    model.gradient_checkpointing = True
    layers = list(model.model.layers)
    seen = []
    real = model_lib.checkpoint
    monkeypatch.setattr(model_lib, "checkpoint", lambda fn, *a, **kw: seen.append(layers.index(fn)) or real(fn, *a, **kw))
    loss, _ = focusft.focusft_loss(model, batch, FocusConfig(), gen())
    loss.backward()
    assert seen == [0, 1, 2, 3]


@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("method", list(focusft.METHODS))
def test_micro_batch_without_response_tokens(method, ckpt):
    """Loss 0 (not NaN), and its backward gives every parameter a zero gradient: DDP needs a
    gradient for each parameter from every rank. Tied TINY: the shared embedding/head too."""
    model = tiny_model(torch.float32, config=TINY)
    model.gradient_checkpointing = ckpt
    batch = batch_from_runs([[(0, 9)], [(0, 6)]])  # context only; the second sample is padded
    loss, stats = focusft.focusft_loss(model, batch, FocusConfig(method=method, loss_chunk=4), gen())
    assert stats["n_targets"] == 0 and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, n
    if FocusConfig(method=method).bilevel:
        assert torch.equal(stats["inner_losses"], torch.zeros(2))


def plain_sft_loss(model, batch, mask=None):
    """Causal next-token cross-entropy on the response tokens, straight from the definition."""
    ids, lm = batch["input_ids"], batch["loss_mask"] & batch["attention_mask"]
    logits = model(ids, attn_mask=mask)  # (B, S, V); mask None = causal
    return torch.nn.functional.cross_entropy(logits[:, :-1][lm[:, 1:]].float(), ids[:, 1:][lm[:, 1:]])


def test_sft_is_plain_causal_sft_and_sft_bidir_differs_only_by_the_mask(monkeypatch):
    model, batch = tiny_model(), batch_from_runs(BATCH_RUNS)  # right padded: positions = arange
    want = plain_sft_loss(model, batch)
    want.backward()
    want_grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    loss, stats = focusft.focusft_loss(model, batch, FocusConfig(method="sft"))
    loss.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    for n, g in grads_of(model).items():
        torch.testing.assert_close(g, want_grads[n], msg=lambda m: f"{n}: {m}")

    bidir = brute_force_mask(batch["loss_mask"], batch["attention_mask"], True)
    loss_bidir, _ = focusft.focusft_loss(model, batch, FocusConfig(method="sft-bidir"))
    torch.testing.assert_close(loss_bidir, plain_sft_loss(model, batch, bidir), rtol=1e-6, atol=0)
    assert abs(loss_bidir.item() - loss.item()) > 1e-4  # the context really is bidirectional
    # with the mask forced back to causal, sft-bidir is sft
    build = focusft.build_mask
    monkeypatch.setattr(focusft, "build_mask", lambda lm, am, bidirectional=True: build(lm, am, False))
    loss_forced, _ = focusft.focusft_loss(model, batch, FocusConfig(method="sft-bidir"))
    torch.testing.assert_close(loss_forced, loss, rtol=1e-6, atol=0)


# -----------------------------------------------------------------------------
# Inference-time adaptation, bf16


def test_adapt_on_prompt_lowers_the_prompt_loss():
    model = tiny_model(torch.float32)
    prompts = batch_from_runs([[(0, 20)], [(0, 14)]], seed=3)
    ids, am = prompts["input_ids"], prompts["attention_mask"]
    cfg = FocusConfig()
    prompt = {"input_ids": ids, "attention_mask": am, "loss_mask": am}  # every prompt token is a target
    mask = focusft.build_mask(am, am, bidirectional=False)
    with torch.no_grad():
        losses = [full_logits_loss(model, prompt, mask).item()]
    for steps in (1, 3):
        fast = focusft.adapt_on_prompt(model, ids, am, cfg, gen(), steps=steps)
        assert list(fast) == list(focusft.adapted_layers(model, cfg))
        with torch.no_grad():
            losses.append(full_logits_loss(model, prompt, mask, fast, cfg.fast_scale).item())
    assert losses[0] > losses[1] > losses[2], losses
    # the generation API accepts them
    out = generate_lib.generate(model, [ids[0].tolist()], max_new_tokens=3, stop_ids=[], fast_weights=fast,
                                    fast_scale=cfg.fast_scale)
    assert len(out[0]) == 3


def test_bf16_smoke():
    model, batch = tiny_model(torch.bfloat16), batch_from_runs(BATCH_RUNS)
    model.gradient_checkpointing = True
    loss, stats = focusft.focusft_loss(model, batch, FocusConfig(), gen())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(stats["inner_losses"]).all()
    loss.backward()
    grads = grads_of(model)
    assert len(grads) == len(list(model.parameters()))
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads.values())
    ref, _ = naive_focusft_loss(tiny_model(torch.float32), batch, FocusConfig(), gen())
    assert abs(loss.item() - ref.item()) < 0.05  # bf16 rounding only


def test_config_rejects_unknown_settings():
    with pytest.raises(ValueError, match="unknown method"):
        FocusConfig(method="focus")
    with pytest.raises(ValueError, match="clip_mode"):
        FocusConfig(clip_mode="norm")
    with pytest.raises(ValueError, match="inner_steps"):
        FocusConfig(inner_steps=0)
    assert [(FocusConfig(method=m).bilevel, FocusConfig(method=m).bidirectional) for m in focusft.METHODS] == \
        [(False, False), (False, True), (True, False), (True, True)]
