"""
A self-contained Qwen2 / Qwen2.5 decoder in plain PyTorch.

It computes what Hugging Face's `Qwen2ForCausalLM` computes, operation for operation and in the
same dtype order, loads and saves the same checkpoints (parameter names verbatim), and adds the
two hooks FocuSFT needs:

  * fast weights: the MLP projections take optional LoRA factors as forward arguments,
        y = x W^T + scale * (x A^T) B^T,
    so the inner loop can differentiate with respect to them while they never become module state;
  * explicit attention masks: `attn_mask=None` is causal, otherwise a boolean (B, 1, S, S)
    "query i may attend to key j" mask (the GLM-style mask of focusft.build_mask).

The file is the network only and reads top to bottom: config, RoPE, the network (RMSNorm,
LoRA-able linear, MLP, Attention, Block, Qwen2). Beside it, as functions rather than methods:
generate.py (KV-cache decoding, `generate(model, ...)`) and checkpoint.py (HF checkpoint I/O,
`load_pretrained` / `save_pretrained`, which `Qwen2.from_pretrained` / `model.save_pretrained` call).

Notation used in the shape comments:
  B batch, S query length, T key length (S, or the KV-cache length while generating),
  D hidden size, H query heads, KVH key/value heads, hd head dim, V vocabulary size, r LoRA rank.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# F.scaled_dot_product_attention(..., enable_gqa=True) exists from torch 2.5 on.
SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class ModelError(Exception):
    """A user-facing problem with a checkpoint or model id (printed without a traceback)."""


# -----------------------------------------------------------------------------
# Configuration


@dataclass
class Qwen2Config:
    # defaults: Qwen2.5-7B (the paper's base model)
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None  # None (default rope) or {"rope_type": "yarn", "factor": ..., ...}
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151643

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("default", "yarn"):
                raise ModelError(f"rope type {kind!r} is not supported (supported: default, yarn)")
            self.rope_scaling = None if kind == "default" else {**self.rope_scaling, "rope_type": kind}

    @classmethod
    def from_hf(cls, d: dict) -> "Qwen2Config":
        """Read an HF config.json dict, old form (rope_theta/rope_scaling/torch_dtype) or new
        (rope_parameters/dtype, transformers >= 5)."""
        model_type = d.get("model_type")
        archs = d.get("architectures") or ["Qwen2ForCausalLM"]
        if model_type != "qwen2" or "Qwen2ForCausalLM" not in archs:
            raise ModelError(f"unsupported model: model_type={model_type!r}, architectures={archs}; "
                             "this implementation covers Qwen2 / Qwen2.5 (model_type 'qwen2') only")
        if d.get("use_sliding_window", False):
            raise ModelError("use_sliding_window=true is not supported (no released Qwen2.5 config uses it)")
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (rope if rope else None)
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            scaling = None
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and k not in ("rope_theta", "rope_scaling", "torch_dtype")}
        kw["rope_theta"] = float(theta)
        kw["rope_scaling"] = scaling
        kw["torch_dtype"] = str(d.get("dtype") or d.get("torch_dtype") or "bfloat16").replace("torch.", "")
        return cls(**kw)

    def to_hf(self) -> dict:
        """An HF config.json dict (old-style rope fields, which every transformers version reads)."""
        d = asdict(self)
        d.update({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "attention_dropout": 0.0, "use_cache": True, "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": self.num_hidden_layers,
            "dtype": self.torch_dtype,
        })
        if d["rope_scaling"] is None:
            del d["rope_scaling"]
        return d


# A small random model for the CPU demo and tests. Its vocabulary holds the embedded byte-level
# tokenizer of data.py (256 bytes + 5 ChatML tokens = 261 ids, padded to 272).
TINY = dict(vocab_size=272, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="float32",
            bos_token_id=None, eos_token_id=258)

# The other random model (train.py --model tiny-words): a word-level tokenizer fitted on the training
# data (data.word_tokenizer), and a model small and fast enough for the CPU demo to learn its
# retrieval task in minutes: 2 layers (the fewest that can look a name up: one attention layer
# moves each value onto the name next to it, the next matches the question's name), hidden 64,
# 0.1M parameters. Its vocab_size and eos_token_id come from the tokenizer (train.random_config).
# NOTE: initializer_range 0.1, not HF's 0.02: at width 64, 0.02 makes q.k ~100x
# smaller than 1/sqrt(d)-scaled weights would, and attention learns nothing for hundreds of steps
# (measured on the demo task: no lookup at all after 500 steps at 0.02; at 0.1 it starts by step 200).
TINY_WORDS = dict(TINY, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.1)

# The dtypes train.py builds and trains a model in, by the name its --dtype flag takes.
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def param_groups(model: nn.Module, weight_decay: float):
    """AdamW's parameter groups: weight decay on matrices only; none on biases and RMSNorm weights
    (HF Trainer's rule). train.build_optimizer uses them, and the memory estimate counts them."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, RMSNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied weights appear once
        (no_decay if name.endswith(".bias") or id(p) in norm_params else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def rope_inv_freq(cfg: Qwen2Config) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies (fp32, (hd/2,)) and the factor that multiplies cos and sin.
    Always computed on the CPU (also when the model is being built on the meta device)."""
    d, theta = cfg.head_dim, cfg.rope_theta
    theta_pow = theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d)  # (hd/2,) theta^(2i/d)
    inv_freq = 1.0 / theta_pow
    if cfg.rope_scaling is None:
        return inv_freq, 1.0
    # YaRN: per frequency, blend the original (extrapolated) frequency with the interpolated one
    # (divided by `factor`); a linear ramp between two "number of rotations" boundaries decides.
    rs = cfg.rope_scaling
    orig = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = rs.get("factor") or cfg.max_position_embeddings / orig  # HF's rule when factor is absent
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    attn_factor = rs.get("attention_factor")
    if attn_factor is None:
        mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
        get = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0  # noqa: E731
        attn_factor = get(factor, mscale) / get(factor, mscale_all) if mscale and mscale_all else get(factor)

    def corr(rotations):  # the dimension whose wavelength fits `rotations` times in `orig` positions
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr(beta_fast), corr(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 keeps the original frequency, 0 fully interpolates
    # 1 / (factor * theta^(2i/d)) rather than inv_freq / factor: the same rounding as HF, bit for bit
    inv_freq = (1.0 / (factor * theta_pow)) * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, float(attn_factor)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# -----------------------------------------------------------------------------
# The network


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # HF order: normalise in fp32, cast back to the input dtype, THEN scale by the weight.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def linear_with_lora(x, weight, lora, scale):
    """y = x W^T (+ scale * (x A^T) B^T when LoRA factors (A (r, in), B (out, r)) are given)."""
    y = F.linear(x, weight)
    if lora is not None:
        A, B = lora
        xa = F.linear(x, A.to(x.dtype))  # (..., r)
        # y + scale * xa B^T as one GEMM: no full-size temporaries for the product and the sum
        y = torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), B.to(x.dtype).t(),
                        alpha=scale).view(y.shape)
    return y


class MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, fast=None, scale=1.0):
        fast = fast or {}
        gate = linear_with_lora(x, self.gate_proj.weight, fast.get("gate_proj"), scale)
        up = linear_with_lora(x, self.up_proj.weight, fast.get("up_proj"), scale)
        return linear_with_lora(F.silu(gate) * up, self.down_proj.weight, fast.get("down_proj"), scale)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, probs_out=None):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_head, self.hd).transpose(1, 2)  # (B, H, S, hd)
        k = self.k_proj(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)  # (B, KVH, S, hd)
        v = self.v_proj(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)  # (B, KVH, S, hd)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, S, hd): broadcast over heads
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, KVH, T, hd)
        # GQA: kv head j serves query heads j*g .. j*g+g-1 (repeat_interleave order). Which way is
        # fastest depends on the case; all three give the same numbers (tests/test_model.py checks).
        g = self.n_head // self.n_kv
        if probs_out is not None:  # eager path: same math, but the probabilities are kept for analysis
            k = k.repeat_interleave(g, dim=1)  # (B, H, T, hd)
            v = v.repeat_interleave(g, dim=1)
            scores = (q @ k.transpose(-2, -1)) * self.hd ** -0.5  # (B, H, S, T)
            if mask is None:
                mask = torch.ones(S, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - S)
            # NOTE: a query that may see no key at all (a fully masked row) gets zero output from
            # SDPA; -inf here would give NaN instead. Fill with the dtype's minimum (exp() of it is
            # exactly 0 in any row that has a real key), then zero the masked entries.
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype).masked_fill(~mask, 0.0)
            probs_out[self.layer] = probs
            y = probs @ v
        elif S == 1:
            # Decoding one token: fold each kv head's g query heads into the query axis instead of
            # copying the whole KV cache g times every step (5-20x faster attention on CPU). The
            # (B, 1, 1, T) mask broadcasts over the folded axis. Without a mask the one query sees
            # every key, which is right for the newest token (is_causal would align top-left).
            q = q.reshape(B, self.n_kv, g, self.hd)  # (B, KVH, g, hd): the g heads of kv head j, as g queries
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, KVH, g, hd)
            y = y.reshape(B, self.n_head, 1, self.hd)  # (B, H, 1, hd)
        else:
            # enable_gqa reads the kv heads in place (on CPU ~10% faster than expanding them). NOTE: on
            # CUDA only the flash kernel (no mask) supports it; with a mask SDPA would fall back to the
            # math kernel, which materialises the (B, H, S, T) scores, so there we expand k/v instead.
            in_place = g > 1 and SDPA_HAS_GQA and (mask is None or x.device.type == "cpu")
            if g > 1 and not in_place:
                k = k.repeat_interleave(g, dim=1)  # (B, H, T, hd)
                v = v.repeat_interleave(g, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               **({"enable_gqa": True} if in_place else {}))
        y = y.transpose(1, 2).reshape(B, S, self.n_head * self.hd)  # (B, S, D)
        return self.o_proj(y)


class Block(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, mask, fast=None, scale=1.0, cache=None, probs_out=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, probs_out)
        return h + self.mlp(self.post_attention_layernorm(h), fast, scale)


class Decoder(nn.Module):
    """Holds the parameters under HF's `model.` prefix."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        # RoPE frequencies are derived from the config, never saved or cast with the weights:
        # `model.to(torch.bfloat16)` would otherwise round them (a silent long-context accuracy loss).
        self._inv_freq, self._rope_factor = rope_inv_freq(config)
        self.source_dir: Path | None = None  # where from_pretrained read the checkpoint
        self.init_weights()

    def init_weights(self):
        """HF initialisation: normal(0, initializer_range) for Linear/Embedding, biases 0, norms 1."""
        if self.model.embed_tokens.weight.is_meta:
            return
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    # --- low-level pieces (focusft.py runs the bottom layers once and the top layers many times)

    def embed(self, input_ids):
        return self.model.embed_tokens(input_ids)  # (B, S, D)

    def rope(self, position_ids, dtype):
        """cos, sin of shape (B, S, hd) for integer positions (B, S), computed in fp32."""
        inv_freq = self._inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq  # (B, S, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, hd)
        return (emb.cos() * self._rope_factor).to(dtype), (emb.sin() * self._rope_factor).to(dtype)

    def run_layers(self, h, rope, attn_mask, start=0, end=None, fast_weights=None, fast_scale=1.0,
                   attn_probs=None, cache=None):
        """Run decoder blocks start..end-1 on hidden states h (B, S, D). cache: a generate.KVCache while
        decoding (any object whose `update(layer, k, v)` returns the keys and values so far), else None."""
        cos, sin = rope
        end = self.config.num_hidden_layers if end is None else end
        for i in range(start, end):
            block = self.model.layers[i]
            fast = fast_weights.get(i) if fast_weights else None
            probs_out = attn_probs if attn_probs is not None and i in attn_probs else None
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None and probs_out is None:
                # Recompute the block in backward instead of keeping its activations.
                h = checkpoint(block, h, cos, sin, attn_mask, fast, fast_scale, use_reentrant=False)
            else:
                h = block(h, cos, sin, attn_mask, fast, fast_scale, cache, probs_out)
        return h

    def logits(self, h_normed):
        """Logits for already final-normed hidden states of any leading shape (..., D) -> (..., V)."""
        return F.linear(h_normed, self.lm_head.weight)

    # --- convenience entry points

    def hidden_states(self, input_ids, attn_mask=None, position_ids=None, fast_weights=None, fast_scale=1.0,
                      attn_probs=None):
        """Final-normed hidden states (B, S, D); take logits only where you need them."""
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).expand(B, S)
        h = self.embed(input_ids)
        h = self.run_layers(h, self.rope(position_ids, h.dtype), attn_mask, fast_weights=fast_weights,
                            fast_scale=fast_scale, attn_probs=attn_probs)
        return self.model.norm(h)

    def forward(self, input_ids, attn_mask=None, position_ids=None, fast_weights=None, fast_scale=1.0):
        """(B, S, V) logits. Convenient, but V is 152K for Qwen: training code should call
        hidden_states() and take logits at the supervised positions only."""
        return self.logits(self.hidden_states(input_ids, attn_mask, position_ids, fast_weights, fast_scale))

    # --- checkpoints: the familiar entry points (the work is done in checkpoint.py). NOTE: the imports
    # are inside the methods on purpose: checkpoint.py imports this module, so a top-level import
    # here would be a cycle.

    @classmethod
    def from_pretrained(cls, path_or_hub_id, dtype=None, device=None) -> "Qwen2":
        """Load an HF checkpoint directory or hub id: see `checkpoint.load_pretrained`."""
        from checkpoint import load_pretrained

        return load_pretrained(path_or_hub_id, dtype, device)

    def save_pretrained(self, out_dir, extra_files=None, max_shard_bytes: int = 5 * 10**9):
        """Write an HF-layout checkpoint atomically: see `checkpoint.save_pretrained`."""
        from checkpoint import save_pretrained

        save_pretrained(self, out_dir, extra_files, max_shard_bytes)
