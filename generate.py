"""
KV-cache generation for the Qwen2 of model.py: greedy or sampled (temperature, top-p) decoding of a
batch of prompts, with optional fast weights (FocuSFT's inference-time adaptation).

These are functions beside the network rather than methods on it (as in gpt-fast's generate.py):
the model only runs layers. `generate(model, ...)` left-pads the batch, prefills the prompts in
chunks and decodes one token at a time through a preallocated `KVCache`, which the attention
layers fill through `cache.update(layer, k, v)`.

Notation as in model.py: B batch, T key length (the KV-cache length), KVH key/value heads,
hd head dim, V vocabulary size.
"""

from __future__ import annotations

import torch

from model import Qwen2, Qwen2Config


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
