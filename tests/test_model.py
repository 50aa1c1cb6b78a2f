"""Tests for model.py, generate.py and checkpoint.py. Every test compares against a reference:

  * Hugging Face `transformers.Qwen2ForCausalLM` (sdpa and eager) as the oracle for logits, gradients,
    masks, position ids, checkpoints and generation (these tests skip when transformers is absent);
  * a hand-written formula (fast weights), a merged-weight model (LoRA), the model without the
    feature (zero LoRA, checkpointing, KV cache, chunked prefill) or brute-force greedy decoding.

The shared fixture is a tiny random Qwen2 (hidden 64, 3 layers, 4 heads, 2 KV heads, vocab 301) with
biases and norm weights moved away from their initial values so that a dropped bias or a norm applied
in the wrong place shows up. Sequence lengths are odd on purpose. Run: python -m pytest tests/test_model.py
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

import generate as G
import model as M
from model import ModelError, Qwen2, Qwen2Config

ATOL = 1e-4  # fp32 logits: ours vs HF

# name -> HF config kwargs. "odd" has an explicit head_dim that differs from hidden/heads and a
# 3:1 GQA ratio; "tied-yarn" checks tied embeddings and the YaRN rope of Qwen2.5's long-context setting.
VARIANTS = {
    "gqa-untied": dict(vocab_size=301, hidden_size=64, intermediate_size=136, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "tied-yarn": dict(vocab_size=301, hidden_size=64, intermediate_size=136, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True,
                      rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 64}),
    "odd": dict(vocab_size=257, hidden_size=60, intermediate_size=100, num_hidden_layers=2,
                num_attention_heads=6, num_key_value_heads=2, head_dim=12, max_position_embeddings=512,
                rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
}

# Our own config of the shared fixture (for the tests that need no oracle).
SMALL = dict(vocab_size=301, hidden_size=64, intermediate_size=136, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False,
             initializer_range=0.1, torch_dtype="float32", bos_token_id=None, eos_token_id=None)


def perturb_(model, seed=0):
    """Move biases and norm weights away from their init (0 and 1) so they are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return perturb_(Qwen2(Qwen2Config(**{**SMALL, **overrides})).eval(), seed)


def ids_for(vocab, *shape, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def additive(mask):
    """Boolean "may attend" mask -> the additive float mask HF expects for a custom 4-D mask."""
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


def brute_force_greedy(model, prompt, n):
    """Reference decoding: recompute the whole sequence every step, no cache, no padding."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


# -----------------------------------------------------------------------------
# Oracle fixture: an HF model per variant, built and saved once for the whole file


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """variant -> (HF sdpa model, HF eager model, checkpoint directory written by transformers)."""
    transformers = pytest.importorskip("transformers")
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cfg = transformers.Qwen2Config(**VARIANTS[name], initializer_range=0.1)
            hf = transformers.Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
            perturb_(hf.eval())
            path = tmp_path_factory.mktemp(name)
            hf.save_pretrained(path)
            eager = transformers.Qwen2ForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                                   dtype=torch.float32).eval()
            cache[name] = (hf, eager, path)
        return cache[name]

    return get


# -----------------------------------------------------------------------------
# Config parsing


OLD_FORM = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 1000, "hidden_size": 128,
    "intermediate_size": 300, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 7, "eos_token_id": 9,
    "use_sliding_window": False, "sliding_window": 4096, "hidden_act": "silu",
}
NEW_FORM = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 1000, "hidden_size": 128,
    "intermediate_size": 300, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "yarn", "factor": 4.0,
                        "original_max_position_embeddings": 8192},
    "tie_word_embeddings": True, "dtype": "bfloat16", "bos_token_id": 7, "eos_token_id": 9,
    "layer_types": ["full_attention", "full_attention"],
}


@pytest.mark.parametrize("form", [OLD_FORM, NEW_FORM], ids=["old", "new"])
def test_config_both_forms(form):
    cfg = Qwen2Config.from_hf(json.loads(json.dumps(form)))
    assert cfg.rope_theta == 1e6 and cfg.torch_dtype == "bfloat16" and cfg.tie_word_embeddings
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["factor"] == 4.0
    assert cfg.rope_scaling["original_max_position_embeddings"] == 8192
    assert cfg.head_dim == 128 // 8 and cfg.rms_norm_eps == 1e-5 and cfg.eos_token_id == 9
    # Derived YaRN values, from the formulas in the notes (d=16, theta=1e6, orig=8192):
    d = 16
    corr = lambda r: d * math.log(8192 / (r * 2 * math.pi)) / (2 * math.log(1e6))  # noqa: E731
    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), d - 1)
    inv_freq, attn = M.rope_inv_freq(cfg)
    base = 1.0 / 1e6 ** (torch.arange(0, d, 2).float() / d)
    keep = 1 - ((torch.arange(d // 2).float() - low) / (high - low)).clamp(0, 1)
    torch.testing.assert_close(inv_freq, base / 4 * (1 - keep) + base * keep)
    assert attn == pytest.approx(0.1 * math.log(4.0) + 1)
    assert 0 < low < high < d // 2  # the ramp really blends (the test would be vacuous otherwise)


def test_config_default_rope_both_forms():
    old = {**OLD_FORM, "rope_scaling": None}
    new = {**NEW_FORM, "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"}}
    assert Qwen2Config.from_hf(old).rope_scaling is None and Qwen2Config.from_hf(old).rope_theta == 1e6
    cfg = Qwen2Config.from_hf(new)
    assert cfg.rope_scaling is None and cfg.rope_theta == 5000.0
    inv_freq, attn = M.rope_inv_freq(cfg)
    torch.testing.assert_close(inv_freq, 1.0 / 5000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert attn == 1.0


def test_config_to_hf_round_trip():
    for form in (OLD_FORM, NEW_FORM):
        cfg = Qwen2Config.from_hf(form)
        d = cfg.to_hf()
        assert d["architectures"] == ["Qwen2ForCausalLM"] and d["model_type"] == "qwen2" and d["dtype"] == "bfloat16"
        assert Qwen2Config.from_hf(json.loads(json.dumps(d))) == cfg


@pytest.mark.parametrize("form", [OLD_FORM, NEW_FORM], ids=["old", "new"])
def test_yarn_matches_hf(form):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = transformers.Qwen2Config.from_dict(json.loads(json.dumps(form)))
    ref_inv_freq, ref_attn = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    inv_freq, attn = M.rope_inv_freq(Qwen2Config.from_hf(form))
    torch.testing.assert_close(inv_freq, ref_inv_freq, rtol=0, atol=0)
    assert attn == pytest.approx(ref_attn, abs=1e-12)


@pytest.mark.parametrize("yarn", [
    {"factor": 3.0, "original_max_position_embeddings": 4096},
    {"factor": 2.5, "original_max_position_embeddings": 8192, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    {"factor": 8.0, "original_max_position_embeddings": 2048, "mscale": 1.0, "mscale_all_dim": 0.5},
    {"factor": 4.0, "original_max_position_embeddings": 8192, "attention_factor": 1.3},
    {"factor": None, "original_max_position_embeddings": 8192},  # derived: max_position_embeddings / orig
], ids=["factor3", "betas-no-truncate", "mscale", "attention-factor", "no-factor"])
def test_yarn_variants_match_hf(yarn):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    form = {**NEW_FORM, "rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", **yarn}}
    hf_cfg = transformers.Qwen2Config.from_dict(json.loads(json.dumps(form)))
    ref_inv_freq, ref_attn = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    inv_freq, attn = M.rope_inv_freq(Qwen2Config.from_hf(form))
    torch.testing.assert_close(inv_freq, ref_inv_freq, rtol=0, atol=0)
    assert attn == pytest.approx(ref_attn, abs=1e-12)


@pytest.mark.parametrize("model_type,arch", [("llama", "LlamaForCausalLM"), ("qwen3", "Qwen3ForCausalLM"),
                                             ("qwen2", "Qwen2ForSequenceClassification")])
def test_unsupported_model_is_a_clear_error(model_type, arch):
    with pytest.raises(ModelError, match="unsupported model"):
        Qwen2Config.from_hf({**NEW_FORM, "model_type": model_type, "architectures": [arch]})


@pytest.mark.parametrize("kind", ["linear", "dynamic", "llama3", "longrope"])
def test_unsupported_rope_is_a_clear_error(kind):
    with pytest.raises(ModelError, match=f"rope type '{kind}' is not supported"):
        Qwen2Config.from_hf({**OLD_FORM, "rope_scaling": {"type": kind, "factor": 2.0}})
    with pytest.raises(ModelError, match=f"rope type '{kind}' is not supported"):
        Qwen2Config.from_hf({**NEW_FORM, "rope_parameters": {"rope_theta": 1e6, "rope_type": kind, "factor": 2.0}})


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        Qwen2.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(Qwen2Config(**SMALL).to_hf()))
    with pytest.raises(ModelError, match="no model.safetensors"):
        Qwen2.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read"):
        Qwen2.from_pretrained(tmp_path)
    with pytest.raises(ModelError, match="neither a checkpoint directory nor a hub id"):
        Qwen2.from_pretrained(tmp_path / "does" / "not" / "exist")


def test_weights_with_wrong_layout_are_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    small_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match="model.layers.1.mlp.up_proj.weight"):
        Qwen2.from_pretrained(tmp_path)


def test_offline_hub_id_is_a_clear_error(tmp_path):
    """With HF_HUB_OFFLINE=1 and an empty cache, a hub id must fail fast and suggest a local path."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = ("import model\n"
            "try:\n"
            "    model.Qwen2.from_pretrained('Qwen/Qwen2.5-0.5B')\n"
            "except model.ModelError as e:\n"
            "    print('ModelError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=90)
    assert out.returncode == 0, out.stderr
    assert "ModelError:" in out.stdout and "Qwen/Qwen2.5-0.5B" in out.stdout
    assert "local directory" in out.stdout


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    """A hub id is fetched with huggingface_hub.snapshot_download (stubbed here: no network in tests)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    ref = small_model()
    ref.save_pretrained(tmp_path / "snap")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    m = Qwen2.from_pretrained("someone/tiny-qwen")
    assert calls[0][0] == "someone/tiny-qwen" and "*.safetensors" in calls[0][1] and "*.json" in calls[0][1]
    assert m.source_dir == tmp_path / "snap"
    torch.testing.assert_close(m.lm_head.weight, ref.lm_head.weight, rtol=0, atol=0)


# -----------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_grads_match_hf(hf_checkpoint, variant):
    hf, eager, path = hf_checkpoint(variant)
    ours = Qwen2.from_pretrained(path).eval()
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight  # one Parameter, not two copies
    V = ours.config.vocab_size
    ids = ids_for(V, 2, 37, seed=1)
    target = ids_for(V, 2, 37, seed=2)

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, V), target.reshape(-1))

    hf.zero_grad()
    ref = hf(ids).logits
    loss_of(ref).backward()
    out = ours(ids)
    loss_of(out).backward()
    assert (out - ref).abs().max() <= ATOL
    assert ref.std() > 0.3  # logits are far from uniform: the comparison is not vacuous
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), eager(ids).logits, rtol=0, atol=ATOL)
    hf_params = dict(hf.named_parameters())
    names = [n for n, _ in ours.named_parameters()]
    assert sorted(names) == sorted(hf_params)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_hidden_states_and_logits_pieces(hf_checkpoint):
    hf, _, path = hf_checkpoint("gqa-untied")
    ours = Qwen2.from_pretrained(path)
    ids = ids_for(301, 2, 13)
    with torch.no_grad():
        ref = hf.model(ids).last_hidden_state  # after the final norm
        h = ours.hidden_states(ids)
        torch.testing.assert_close(h, ref, rtol=0, atol=ATOL)
        # the low-level pieces compose to the same thing (what focusft.py does)
        pos = torch.arange(13).expand(2, 13)
        x = ours.embed(ids)
        x = ours.run_layers(x, ours.rope(pos, x.dtype), None, 0, 1)
        x = ours.run_layers(x, ours.rope(pos, x.dtype), None, 1)
        torch.testing.assert_close(ours.logits(ours.model.norm(x)), hf(ids).logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_custom_mask_matches_hf(hf_checkpoint, impl):
    """A bidirectional prefix ("prefix LM") mask vs HF given the same mask as a 4-D additive mask."""
    hf, eager, path = hf_checkpoint("tied-yarn")
    ref_model = hf if impl == "sdpa" else eager
    ours = Qwen2.from_pretrained(path)
    S = 21
    ids = ids_for(301, 2, S, seed=3)
    prefix = torch.tensor([5, 11])
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    mask = ((j <= i) | (j < prefix[:, None, None]))[:, None]  # (B, 1, S, S)
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=additive(mask)).logits
        out = ours(ids, attn_mask=mask)
        assert (out - ref).abs().max() <= ATOL
        # and the mask matters: the causal result is different inside the prefix
        assert (ours(ids)[:, :4] - out[:, :4]).abs().max() > 1e-2


def test_left_padding_position_ids_match_hf(hf_checkpoint):
    hf, _, path = hf_checkpoint("gqa-untied")
    ours = Qwen2.from_pretrained(path)
    S, lengths = 15, [15, 9]
    ids = ids_for(301, 2, S, seed=4)
    valid = torch.arange(S)[None, :] >= (S - torch.tensor(lengths))[:, None]  # (B, S) left padding
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    mask = ((j <= i) & valid[:, None, :]) | (i == j)  # pad queries see themselves (no empty rows)
    mask = mask[:, None]  # (B, 1, S, S)
    with torch.no_grad():
        out = ours(ids, attn_mask=mask, position_ids=pos)
        ref = hf(ids, attention_mask=additive(mask), position_ids=pos).logits
        assert (out - ref).abs().max() <= ATOL
        # the padded row equals the same tokens run alone without padding
        alone = ours(ids[1:, S - lengths[1]:])
        torch.testing.assert_close(out[1, S - lengths[1]:], alone[0], rtol=0, atol=1e-5)


def test_eager_probs_match_sdpa_and_hf(hf_checkpoint):
    hf, eager, path = hf_checkpoint("gqa-untied")
    ours = Qwen2.from_pretrained(path)
    ids = ids_for(301, 2, 11, seed=5)
    pos = torch.arange(11).expand(2, 11)
    with torch.no_grad():
        h0 = ours.embed(ids)
        rope = ours.rope(pos, h0.dtype)
        plain = ours.run_layers(h0, rope, None)
        probs = {0: None, 2: None}
        with_probs = ours.run_layers(h0, rope, None, attn_probs=probs)
        torch.testing.assert_close(with_probs, plain, rtol=0, atol=1e-5)
        ref = eager(ids, output_attentions=True).attentions
    for layer in (0, 2):
        assert probs[layer].shape == (2, 4, 11, 11)
        torch.testing.assert_close(probs[layer], ref[layer], rtol=0, atol=1e-5)
        assert probs[layer].triu(1).abs().max() == 0  # causal: nothing above the diagonal


@pytest.mark.parametrize("causal", [True, False])
def test_gqa_paths_agree(monkeypatch, causal):
    """enable_gqa (CPU), explicit repeat_interleave (CUDA with a mask, torch < 2.5) and the eager path
    compute the same attention, forward and backward."""
    m = small_model()
    S = 17
    ids = ids_for(301, 2, S, seed=7)
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    mask = None if causal else ((j <= i) | (j < 6)).expand(2, 1, S, S)
    pos = torch.arange(S).expand(2, S)
    w = torch.randn(2, S, 64, generator=torch.Generator().manual_seed(8))

    def run(**kw):
        h0 = m.embed(ids).detach().requires_grad_()
        out = m.run_layers(h0, m.rope(pos, h0.dtype), mask, **kw)
        (out * w).sum().backward()
        return out.detach(), h0.grad

    in_place = run()
    eager = run(attn_probs={0: None, 1: None, 2: None})
    monkeypatch.setattr(M, "SDPA_HAS_GQA", False)
    expanded = run()
    for other in (eager, expanded):
        torch.testing.assert_close(other[0], in_place[0], rtol=0, atol=1e-5)
        assert (other[1] - in_place[1]).abs().max() <= 1e-5 * in_place[1].abs().max()


def test_eager_probs_match_sdpa_with_empty_rows():
    """A query row that may see no key: SDPA returns zeros there; the eager path must agree (no NaN)."""
    m = small_model()
    S = 9
    ids = ids_for(301, 2, S, seed=6)
    mask = torch.ones(S, S, dtype=torch.bool).tril().expand(2, 1, S, S).clone()
    mask[1, :, 3] = False  # query 3 of row 1 sees nothing
    pos = torch.arange(S).expand(2, S)
    with torch.no_grad():
        h0 = m.embed(ids)
        rope = m.rope(pos, h0.dtype)
        plain = m.run_layers(h0, rope, mask)
        probs = {i: None for i in range(3)}
        eager = m.run_layers(h0, rope, mask, attn_probs=probs)
    assert torch.isfinite(eager).all() and torch.isfinite(plain).all()
    torch.testing.assert_close(eager, plain, rtol=0, atol=1e-5)
    assert probs[0][1, :, 3].abs().max() == 0


# -----------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("tied", [False, True])
def test_our_checkpoint_loads_in_transformers(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    ours = small_model(tie_word_embeddings=tied, rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                                "original_max_position_embeddings": 128})
    ours.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    assert cfg["dtype"] == "float32"
    from safetensors import safe_open

    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tied)
        assert f.metadata() == {"format": "pt"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == tied
    assert hf.model.rotary_emb.attention_scaling == pytest.approx(ours._rope_factor)
    ids = ids_for(301, 2, 29)
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= ATOL


def test_sharded_round_trip(tmp_path):
    ours = small_model()
    ours.save_pretrained(tmp_path / "s", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (tmp_path / "s" / "model.safetensors").exists()
    assert files == sorted(p.name for p in (tmp_path / "s").glob("model-*-of-*.safetensors"))
    state = ours.state_dict()
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    back = Qwen2.from_pretrained(tmp_path / "s")
    for k, v in back.state_dict().items():
        assert torch.equal(v, state[k]), k
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32).eval()
    ids = ids_for(301, 1, 17)
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= ATOL


def test_tied_checkpoint_round_trip(tmp_path):
    ours = small_model(tie_word_embeddings=True)
    ours.save_pretrained(tmp_path / "t")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "t" / "model.safetensors")
    assert "lm_head.weight" not in saved
    back = Qwen2.from_pretrained(tmp_path / "t")
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert len(list(back.parameters())) == len(list(ours.parameters()))
    ids = ids_for(301, 1, 19)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), ours(ids), rtol=0, atol=0)
    # a stray rotary inv_freq buffer (older exports carry one) is ignored
    saved["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    from safetensors.torch import save_file

    save_file(saved, tmp_path / "t" / "model.safetensors")
    assert torch.equal(Qwen2.from_pretrained(tmp_path / "t").model.norm.weight, ours.model.norm.weight)


def test_from_pretrained_dtype(tmp_path):
    small_model().save_pretrained(tmp_path / "c")
    m = Qwen2.from_pretrained(tmp_path / "c", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.config.torch_dtype == "bfloat16"
    assert m._inv_freq.dtype == torch.float32  # rope frequencies are never rounded with the weights
    m.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"
    assert Qwen2.from_pretrained(tmp_path / "b").lm_head.weight.dtype == torch.bfloat16


def test_save_extra_files_and_tokenizer_copy(tmp_path):
    src = tmp_path / "src"
    small_model().save_pretrained(src, extra_files={"tokenizer.json": '{"tok": 1}',
                                                     "tokenizer_config.json": '{"cfg": 1}'})
    m = Qwen2.from_pretrained(src)
    m.save_pretrained(tmp_path / "dst", extra_files={
        "notes.txt": "text",
        "blob.bin": b"\x00\x01\xff",
        "state.pt": lambda p: torch.save({"step": 3}, p),
        "tokenizer_config.json": '{"cfg": 2}',  # overrides the copied one
    })
    dst = tmp_path / "dst"
    assert (dst / "notes.txt").read_text() == "text"
    assert (dst / "blob.bin").read_bytes() == b"\x00\x01\xff"
    assert torch.load(dst / "state.pt") == {"step": 3}
    assert (dst / "tokenizer.json").read_text() == '{"tok": 1}'  # copied from the source checkpoint
    assert (dst / "tokenizer_config.json").read_text() == '{"cfg": 2}'


def test_save_is_atomic(tmp_path):
    out = tmp_path / "ckpt"
    a, b = small_model(seed=0), small_model(seed=1)
    a.save_pretrained(out, extra_files={"stale.txt": "old"})
    b.save_pretrained(out)  # overwrite: the directory is replaced as a whole
    assert not (out / "stale.txt").exists()
    assert torch.equal(Qwen2.from_pretrained(out).lm_head.weight, b.lm_head.weight)

    def crash(path):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        a.save_pretrained(out, extra_files={"boom": crash})
    # the previous checkpoint is intact, and no temporary directory is left behind
    assert torch.equal(Qwen2.from_pretrained(out).lm_head.weight, b.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# -----------------------------------------------------------------------------
# Fast weights and checkpointing


def random_fast_weights(cfg, layers, r=3, zero_B=False, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    D, I = cfg.hidden_size, cfg.intermediate_size
    shapes = {"gate_proj": (D, I), "up_proj": (D, I), "down_proj": (I, D)}
    fw = {}
    for layer in layers:
        fw[layer] = {}
        for name, (fan_in, fan_out) in shapes.items():
            A = torch.randn(r, fan_in, generator=g) / fan_in ** 0.5
            B = torch.zeros(fan_out, r) if zero_B else 0.3 * torch.randn(fan_out, r, generator=g)
            fw[layer][name] = (A.requires_grad_(requires_grad), B.requires_grad_(requires_grad))
    return fw


def test_lora_with_zero_B_leaves_logits_unchanged():
    m = small_model()
    ids = ids_for(301, 2, 23)
    fw = random_fast_weights(m.config, [0, 1, 2], zero_B=True)
    with torch.no_grad():
        torch.testing.assert_close(m(ids, fast_weights=fw, fast_scale=2.0), m(ids), rtol=0, atol=1e-6)


def test_fast_weights_by_hand():
    m = small_model()
    s = 0.7
    fw = random_fast_weights(m.config, [1])
    mlp = m.model.layers[1].mlp
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(9))
    (Ag, Bg), (Au, Bu), (Ad, Bd) = (fw[1][k] for k in ("gate_proj", "up_proj", "down_proj"))
    with torch.no_grad():
        gate = x @ mlp.gate_proj.weight.T + s * (x @ Ag.T) @ Bg.T
        up = x @ mlp.up_proj.weight.T + s * (x @ Au.T) @ Bu.T
        mid = torch.nn.functional.silu(gate) * up
        ref = mid @ mlp.down_proj.weight.T + s * (mid @ Ad.T) @ Bd.T
        torch.testing.assert_close(mlp(x, fw[1], s), ref, rtol=1e-5, atol=1e-5)
        assert (mlp(x) - ref).abs().max() > 1e-2  # the fast weights matter
        # whole model: the same as a copy whose weights are merged, W' = W + s * B A
        merged = small_model()
        for name, (A, B) in fw[1].items():
            getattr(merged.model.layers[1].mlp, name).weight += s * B @ A
        ids = ids_for(301, 2, 17)
        torch.testing.assert_close(m(ids, fast_weights=fw, fast_scale=s), merged(ids), rtol=0, atol=1e-5)


def test_gradient_checkpointing_gives_equal_gradients():
    m = small_model().train()
    ids = ids_for(301, 2, 19)
    S = 19
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    mask = ((j <= i) | (j < 4)).expand(2, 1, S, S)
    calls = []
    m.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def grads(ckpt):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        fw = random_fast_weights(m.config, [1, 2], requires_grad=True)
        calls.clear()
        loss = m(ids, attn_mask=mask, fast_weights=fw, fast_scale=0.5).logsumexp(-1).mean()
        loss.backward()
        out = {n: p.grad.clone() for n, p in m.named_parameters()}
        for layer, d in fw.items():
            for name, (A, B) in d.items():
                out[f"fast.{layer}.{name}.A"], out[f"fast.{layer}.{name}.B"] = A.grad, B.grad
        return out, len(calls)

    ref, n_plain = grads(False)
    got, n_ckpt = grads(True)
    assert (n_plain, n_ckpt) == (1, 2)  # the block really was recomputed in backward
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)
    assert ref["fast.1.down_proj.A"].abs().max() > 0


# -----------------------------------------------------------------------------
# Generation


def test_kv_cache_generation_matches_brute_force():
    m = small_model()
    prompts = [ids_for(301, 13, seed=10).tolist(), ids_for(301, 5, seed=11).tolist(),
               ids_for(301, 9, seed=12).tolist()]
    n = 8
    refs = [brute_force_greedy(m, p, n) for p in prompts]
    assert len({tuple(r) for r in refs}) == 3  # different prompts, different continuations
    for p, ref in zip(prompts, refs):
        assert G.generate(m, [p], n, stop_ids=[]) == [ref]
    # batched with left padding == one by one
    assert G.generate(m, prompts, n, stop_ids=[], pad_id=7) == refs


def test_generation_stops_per_sequence():
    m = small_model()
    prompts = [ids_for(301, 11, seed=20).tolist(), ids_for(301, 6, seed=21).tolist()]
    n = 10
    refs = [brute_force_greedy(m, p, n) for p in prompts]
    stop = refs[0][3]  # a token that the first row produces at step 3
    expect = [r[:r.index(stop)] if stop in r else r for r in refs]
    assert len(expect[0]) == 3
    assert G.generate(m, prompts, n, stop_ids=[stop, 300]) == expect
    assert G.generate(m, [prompts[1]], n, stop_ids=[stop, 300]) == [expect[1]]


def test_generation_matches_transformers_generate(hf_checkpoint):
    hf, _, path = hf_checkpoint("tied-yarn")
    ours = Qwen2.from_pretrained(path)
    prompts = [ids_for(301, 12, seed=30).tolist(), ids_for(301, 7, seed=31).tolist(),
               ids_for(301, 3, seed=32).tolist()]
    n, pad = 9, 0
    free = G.generate(ours, prompts, n, stop_ids=[])
    stop = free[1][4]  # make one row stop early
    P = max(map(len, prompts))
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=attn, max_new_tokens=n, do_sample=False, eos_token_id=stop,
                          pad_token_id=pad)
    ref = []
    for row in out[:, P:].tolist():
        ref.append(row[:row.index(stop)] if stop in row else row)
    assert G.generate(ours, prompts, n, stop_ids=[stop], pad_id=pad) == ref
    assert len(ref[1]) == 4 and max(map(len, ref)) == n


def test_chunked_prefill_keeps_score_matrix_chunk_sized(monkeypatch):
    m = small_model()
    prompts = [ids_for(301, 70, seed=40).tolist(), ids_for(301, 45, seed=41).tolist()]
    n, chunk = 5, 16
    full = G.generate(m, prompts, n, stop_ids=[], prefill_chunk=4096)
    assert full == [brute_force_greedy(m, p, n) for p in prompts]
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, *args, **kw):
        seen.append((q.shape[-2], k.shape[-2], None if attn_mask is None else tuple(attn_mask.shape)))
        return sdpa(q, k, v, attn_mask, *args, **kw)

    monkeypatch.setattr(M.F, "scaled_dot_product_attention", recording_sdpa)
    chunked = G.generate(m, prompts, n, stop_ids=[], prefill_chunk=chunk)
    assert chunked == full
    L = m.config.num_hidden_layers
    assert len(seen) == L * (math.ceil(70 / chunk) + n - 1)
    # the (queries x keys) block per head is at most chunk x T, never 70 x 70: decoding steps fold
    # the query heads into the query axis, so read the block size from the mask, not from q
    for q, k, mask in seen:
        assert mask is not None and mask[-1] == k <= 70 + n and mask[-2] <= chunk
    assert max(mask[-2] for _, _, mask in seen) == chunk


def brute_force_nucleus(probs, top_p):
    """The definition, one token at a time in float64: take tokens from the most likely down until
    their mass reaches top_p; the rest get 0."""
    out = [0.0] * len(probs)
    mass = 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if mass >= top_p:
            break
        out[i] = probs[i]
        mass += probs[i]
    return out


@pytest.mark.parametrize("top_p", [1e-9, 0.05, 0.3, 0.6, 0.9, 0.999, 1.0])
def test_top_p_filter_matches_brute_force(top_p):
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(4, 50, generator=g, dtype=torch.float64) * 2, dim=-1)
    got = G.top_p_filter(probs, top_p)
    for row, got_row in zip(probs.tolist(), got.tolist()):
        assert got_row == pytest.approx(brute_force_nucleus(row, top_p), abs=0)
    assert (got > 0).sum(-1).min() >= 1  # the most likely token always stays


def test_sampled_frequencies_follow_the_nucleus():
    # one row repeated 40,000 times: the draws' frequencies against the renormalised nucleus
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -5.0]])
    temperature, top_p, n = 0.7, 0.8, 40_000
    probs = torch.softmax(logits.double() / temperature, -1)[0].tolist()
    kept = brute_force_nucleus(probs, top_p)
    expect = [p / sum(kept) for p in kept]
    draws = G.sample_next(logits.expand(n, -1), temperature, top_p, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=8).double() / n
    for f, e in zip(freq.tolist(), expect):
        assert abs(f - e) < 4 * math.sqrt(e * (1 - e) / n) + 1e-9, (freq, expect)  # 4 sigma; 0 outside the nucleus


def test_sampling_limits_equal_greedy():
    m = small_model()
    prompts = [ids_for(301, 9, seed=50).tolist(), ids_for(301, 5, seed=51).tolist()]
    greedy = G.generate(m, prompts, 8, stop_ids=[])
    cold = G.generate(m, prompts, 8, stop_ids=[], temperature=1e-6, generator=torch.Generator().manual_seed(1))
    narrow = G.generate(m, prompts, 8, stop_ids=[], temperature=1.0, top_p=1e-9,
                        generator=torch.Generator().manual_seed(2))
    assert cold == greedy and narrow == greedy
    hot = G.generate(m, prompts, 8, stop_ids=[], temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert hot != greedy  # it does sample
    with pytest.raises(ValueError, match="Generator"):
        G.generate(m, prompts, 8, stop_ids=[], temperature=1.0)


def test_seeded_sampling_is_reproducible_and_per_prompt():
    m = small_model()
    prompts = [ids_for(301, 11, seed=60).tolist(), ids_for(301, 6, seed=61).tolist(), ids_for(301, 8, seed=62).tolist()]

    def run(rows, seeds, **kw):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return G.generate(m, [prompts[i] for i in rows], 12, stop_ids=[], temperature=1.0, top_p=0.9,
                          generator=gens, **kw)

    a = run([0, 1, 2], [7, 8, 9])
    assert a == run([0, 1, 2], [7, 8, 9])  # same seeds, same samples
    assert a != run([0, 1, 2], [17, 18, 19])
    # one generator per prompt: a prompt's samples do not depend on its batch
    assert run([1], [8]) == [a[1]] and run([2, 0], [9, 7]) == [a[2], a[0]]
    # ... nor on when the others stop: a row that stops draws no more numbers
    stop = a[0][3]
    stopped = G.generate(m, prompts, 12, stop_ids=[stop], temperature=1.0, top_p=0.9, keep_stop=True,
                         generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    assert stopped[0] == a[0][:a[0].index(stop) + 1]  # keep_stop: the stop token ends the row
    for row, full in zip(stopped[1:], a[1:]):
        assert row == (full[:full.index(stop) + 1] if stop in full else full)


def test_bf16_smoke(tmp_path):
    m = small_model()
    ids = ids_for(301, 2, 21)
    with torch.no_grad():
        ref = m(ids)
    m = m.to(torch.bfloat16)
    assert m._inv_freq.dtype == torch.float32
    out = m(ids)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.15 * ref.abs().max()
    out.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    gen = G.generate(m, [ids[0].tolist(), ids[1, :7].tolist()], 4, stop_ids=[])
    assert [len(g) for g in gen] == [4, 4] and all(0 <= t < 301 for g in gen for t in g)
    transformers = pytest.importorskip("transformers")
    m.save_pretrained(tmp_path / "bf16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    assert hf.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(m(ids), hf(ids).logits, rtol=0, atol=0.02)  # same op order: ~bitwise
