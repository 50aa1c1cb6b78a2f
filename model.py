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

The file reads top to bottom: config, RoPE, the network (RMSNorm, LoRA-able linear, MLP,
Attention, Block, Qwen2), then, as functions beside the network rather than methods on it,
KV-cache generation (`generate(model, ...)`) and HF checkpoint I/O (`load_pretrained`,
`save_pretrained`; `Qwen2.from_pretrained` / `model.save_pretrained` call them).

Notation used in the shape comments:
  B batch, S query length, T key length (S, or the KV-cache length while generating),
  D hidden size, H query heads, KVH key/value heads, hd head dim, V vocabulary size, r LoRA rank.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

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
        """Run decoder blocks start..end-1 on hidden states h (B, S, D)."""
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

    # --- checkpoints: the familiar entry points (the work is done by the functions below the class)

    @classmethod
    def from_pretrained(cls, path_or_hub_id, dtype=None, device=None) -> "Qwen2":
        """Load an HF checkpoint directory or hub id: see `load_pretrained`."""
        return load_pretrained(path_or_hub_id, dtype, device)

    def save_pretrained(self, out_dir, extra_files=None, max_shard_bytes: int = 5 * 10**9):
        """Write an HF-layout checkpoint atomically: see `save_pretrained`."""
        save_pretrained(self, out_dir, extra_files, max_shard_bytes)


# -----------------------------------------------------------------------------
# Generation (beside the network, not on it: the model only runs layers)


class KVCache:
    """Preallocated keys/values for generation: per layer (B, KVH, T_max, hd)."""

    def __init__(self, cfg: Qwen2Config, batch: int, max_len: int, dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.pos = 0  # where the tokens of the current forward go

    def update(self, layer, k, v):
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of (..., V) probabilities: zero every token outside the smallest set of most
    likely tokens whose mass reaches top_p. A token stays iff the mass ranked above it is < top_p,
    so the most likely token always stays (the rule of vLLM's and HF's top-p; not renormalised)."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    above = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked before each one
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(above >= top_p, 0.0))


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None,
                rows: list[bool] | None = None) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, V): argmax when temperature is 0, else a draw
    from softmax(logits / temperature) restricted to the top-p nucleus.

    generator: one torch.Generator for the batch, or a list of one per row; rows: which rows draw
    (default all). With a list, row b consumes exactly one number of its own generator per token it
    samples, so its samples do not depend on the other rows or on when the batch ends.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    probs = top_p_filter(torch.softmax(logits.float() / temperature, dim=-1), top_p)  # (B, V)
    cdf = probs.cumsum(-1)
    B = logits.shape[0]
    if isinstance(generator, (list, tuple)):
        u = torch.zeros(B, device=logits.device)
        for b, g in enumerate(generator):
            if rows is None or rows[b]:
                u[b] = torch.rand((), generator=g, device=g.device).to(logits.device)
    else:
        u = torch.rand(B, generator=generator, device=logits.device)
    # inverse CDF: the first token whose cumulative mass exceeds u (zero-mass tokens never do)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return idx.clamp_(max=logits.shape[-1] - 1)


@torch.no_grad()
def generate(model: Qwen2, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int = 0,
             prefill_chunk: int = 1024, fast_weights=None, fast_scale=1.0, temperature: float = 0.0,
             top_p: float = 1.0, generator=None, keep_stop: bool = False) -> list[list[int]]:
    """Decoding with a KV cache for a batch of prompts (left-padded internally): greedy by default,
    sampled (see `sample_next`) when temperature > 0, which needs `generator` (one torch.Generator,
    or a list with one per prompt for per-prompt reproducible streams).

    Returns the new tokens of each prompt, without the stop token (with it if keep_stop). The prompt
    is prefilled in chunks of `prefill_chunk` queries, so a 32K prompt never needs a 32K x 32K score
    matrix."""
    if temperature > 0 and generator is None:
        raise ValueError("generate(temperature > 0) needs a seeded torch.Generator (or one per prompt)")
    device = model.model.embed_tokens.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    T = P + max_new_tokens
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, T, dtype=torch.bool, device=device)  # real (non-pad) key slots
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError("generate() got an empty prompt")
        ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        valid[b, P - len(p):] = True  # generated slots count as real from the start
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding shifts positions
    cache = KVCache(model.config, B, T, model.model.embed_tokens.weight.dtype, device)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)

    def step(tokens, start):  # run tokens (B, n) at cache slots start..start+n-1 -> last logits (B, V)
        n = tokens.shape[1]
        q_pos = torch.arange(start, start + n, device=device)
        k_pos = torch.arange(start + n, device=device)
        mask = valid[:, None, None, :start + n] & (k_pos[None, :] <= q_pos[:, None])  # (B, 1, n, start+n)
        # a padding query sees no real key: let it see itself, or SDPA returns NaN for the row
        mask = mask | (k_pos[None, :] == q_pos[:, None])
        cache.pos = start
        h = model.embed(tokens)
        h = model.run_layers(h, model.rope(positions[:, start:start + n], h.dtype), mask,
                             fast_weights=fast_weights, fast_scale=fast_scale, cache=cache)
        return model.logits(model.model.norm(h[:, -1]))

    for s in range(0, P, prefill_chunk):
        logits = step(ids[:, s:s + prefill_chunk], s)
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n_new, active = 0, [True] * B
    for t in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator, rows=active)
        out[:, t] = nxt
        n_new = t + 1
        done |= torch.isin(nxt, stop)
        active = (~done).tolist()  # finished rows draw no more random numbers
        if t == max_new_tokens - 1 or not any(active):
            break
        logits = step(nxt[:, None], P + t)
    result = []
    for row in out[:, :n_new].tolist():
        cut = next((i for i, tok in enumerate(row) if tok in stop_ids), len(row))
        result.append(row[:cut + 1] if keep_stop and cut < len(row) else row[:cut])
    return result


# -----------------------------------------------------------------------------
# Checkpoints in Hugging Face layout


def load_pretrained(path_or_hub_id, dtype=None, device=None) -> Qwen2:
    """Load an HF Qwen2/Qwen2.5 checkpoint: a local directory or a hub id.

    dtype=None keeps the checkpoint's stored dtype (config `dtype`/`torch_dtype`). The model
    is built on the meta device and the tensors are assigned, so it never exists twice."""
    path = resolve_checkpoint(path_or_hub_id)
    try:
        cfg = Qwen2Config.from_hf(json.loads((path / "config.json").read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path / 'config.json'}: {e}") from None
    dtype = dtype or cfg.torch_dtype
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Qwen2(cfg)
    state = read_safetensors(path, device)
    for k in list(state):  # convert one tensor at a time: peak memory stays ~one model
        state[k] = state.pop(k).to(dtype) if not k.endswith("rotary_emb.inv_freq") else state.pop(k)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    expected = set(model.state_dict())
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ModelError(f"{path}: checkpoint does not match the Qwen2 layout; missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:  # assign=True created two Parameters; make them one again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.config.torch_dtype = str(dtype).replace("torch.", "")
    model.source_dir = path
    return model

def save_pretrained(model: Qwen2, out_dir, extra_files: dict[str, str | bytes | Callable[[Path], None]] | None = None,
                    max_shard_bytes: int = 5 * 10**9):
    """Write an HF-layout checkpoint atomically (temp dir, then rename).

    extra_files: name -> str | bytes | callable(path) written into the same directory (e.g.
    tokenizer files, train_state.pt). Tokenizer files of the source checkpoint are copied
    when known and not overridden."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_checkpoint(model, tmp, extra_files, max_shard_bytes)
    except BaseException:  # a failed save leaves the previous checkpoint and no debris
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Swap in the new directory. A crash before the rename leaves the old one intact.
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)

def _write_checkpoint(model: Qwen2, tmp: Path, extra_files: dict | None, max_shard_bytes: int):
    from safetensors.torch import save_file

    cfg = model.config.to_hf()
    cfg["torch_dtype"] = cfg["dtype"] = str(model.lm_head.weight.dtype).replace("torch.", "")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # HF convention: tied checkpoints carry no lm_head
    shards, size = [{}], 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k], size = v, size + n
    if len(shards) == 1:
        save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    extra = dict(extra_files or {})
    if model.source_dir is not None:
        for name in TOKENIZER_FILES:
            if name not in extra and (model.source_dir / name).is_file():
                shutil.copy(model.source_dir / name, tmp / name)
    for name, content in extra.items():
        if callable(content):
            content(tmp / name)
        elif isinstance(content, bytes):
            (tmp / name).write_bytes(content)
        else:
            (tmp / name).write_text(content)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json")


def resolve_checkpoint(path_or_hub_id) -> Path:
    """A local directory as is; otherwise a hub id fetched with huggingface_hub (config, weights
    and tokenizer files only)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        return path
    if path.exists() or str(path_or_hub_id).count("/") != 1:
        raise ModelError(f"{path_or_hub_id!r} is neither a checkpoint directory nor a hub id like 'Qwen/Qwen2.5-7B'")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(str(path_or_hub_id),
                                  allow_patterns=["*.json", "*.safetensors", "merges.txt", "vocab.json"])
    except Exception as e:  # network errors come in many types; all mean "could not fetch"
        raise ModelError(f"could not download {path_or_hub_id!r} from the Hugging Face hub "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                         "Without network access, download it elsewhere and pass the local directory, "
                         "e.g. --model /path/to/Qwen2.5-7B") from None
    return Path(local)


def read_safetensors(path: Path, device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ModelError(f"{path} has no model.safetensors or model.safetensors.index.json")
    state = {}
    for f in files:
        state.update(load_file(path / f, device=str(device)))
    return state
