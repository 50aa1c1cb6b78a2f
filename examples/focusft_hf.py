"""
FocuSFT on a Hugging Face causal LM, in one file: a `focusft_loss` for any transformers decoder whose
FFNs are `model.model.layers[i].mlp.{gate,up,down}_proj` (Qwen2/Qwen2.5, Qwen3, Llama, Mistral), and
a `transformers.Trainer` subclass that trains with it.

FocuSFT is supervised fine-tuning with a two-level step. For each micro-batch:

  1. fresh LoRA "fast weights" phi go on the FFN projections of the top 35 % of the decoder
     layers (A random, B = 0, so the model starts out unchanged);
  2. inner loop (Eq. 3 of the paper): k = 2 SGD steps on phi alone (lr 1.0, each gradient clipped
     to norm 1) on the response-token loss: the model briefly specialises to THIS context;
  3. outer loss (Eq. 4): the ordinary response-token cross-entropy of the model with the adapted
     phi held constant (first-order); its backward gives the gradient of the base weights;
  4. phi is thrown away. The trained model is a plain model: inference needs nothing special.

Both loops use one attention mask (Eq. 5): context turns (system, user, tool output) attend
bidirectionally within themselves, responses stay causal, and nothing sees a later turn.

Use it in your own loop (the batch is three (B, S) tensors, see `focusft_loss`):

    from focusft import FocusConfig
    from examples.focusft_hf import focusft_loss
    loss, stats = focusft_loss(hf_model, batch, FocusConfig())
    loss.backward()

or pass `FocusFTTrainer` where you used `transformers.Trainer`. The demo trains a tiny random Qwen2
for 8 steps on CPU:  python -m examples.focusft_hf

The pieces that do not depend on the model come from focusft.py of this repository: the mask
(build_mask), which layers are adapted, the fast-weight initialisation, the clipping rule and the
settings (FocusConfig, the paper's defaults); data.py renders and collates chat data. Everything
that touches the Hugging Face model is below. focusft.py itself runs this repository's own Qwen2
(model.py), which shares the bottom layers between the loops; tests/test_focusft_hf.py checks that
both give the same loss and gradients.
"""

from __future__ import annotations

import sys
import tempfile
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

import data
from focusft import (FocusConfig, adapted_layers, build_mask, clip_fast_grads, init_fast_weights,
                     supervised_positions)

# -----------------------------------------------------------------------------
# What the model needs: fast weights on its FFNs, the mask, no checkpointing inside torch.func


@contextmanager
def fast_weights_applied(hf_model, fast, scale: float):
    """Inside the `with` block, every adapted projection returns W x + scale * B (A x) (LoRA).

    fast: {layer index: {"gate_proj": (A (r, in), B (out, r)), ...}}, plain tensors.
    Why forward hooks: a transformers model takes no extra forward arguments, and a hook adds the
    low-rank term to a projection's output without putting anything into the module (nothing
    transient can reach a state_dict or an optimizer). torch.func sees A and B as inputs of the
    function it differentiates, because the hooks are registered inside that function.
    torch.func.functional_call would also work, but it REPLACES parameters: LoRA would then need
    the merged W + scale * B A, a full (out, in) tensor per projection (and its gradient), where
    the hook costs r * (in + out) per token."""
    def hook_for(A, B):
        def hook(module, args, out):
            x = args[0]  # (B, S, in)
            return out + scale * F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype))  # (B, S, r) -> (B, S, out)
        return hook

    handles = [getattr(hf_model.model.layers[i].mlp, name).register_forward_hook(hook_for(A, B))
               for i, layer in fast.items() for name, (A, B) in layer.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def hf_attention_mask(hf_model, batch, cfg: FocusConfig):
    """The mask of both loops, in the form transformers attention takes.

    Bidirectional methods: Eq. 5's mask (build_mask: bool (B, 1, S, S), True = may attend) as an
    ADDITIVE float mask, 0 where visible and the dtype's minimum where not.
    NOTE: transformers hands a 4-D mask to the attention function unchanged. SDPA would take the
    bool mask, but eager attention ADDS the mask to the scores: a bool mask becomes +1 / +0 and
    masks nothing, without an error. The additive mask is right for both. Other implementations
    (flash_attention_2, flex_attention) take no such mask, so we refuse them.
    NOTE: the mask is B * S^2 elements of the model dtype (2 GiB for one 32k-token bf16 sample).
    Causal methods: the 2-D padding mask; transformers builds the causal mask itself."""
    if not cfg.bidirectional:
        return batch["attention_mask"]
    impl = getattr(hf_model.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"method {cfg.method!r} needs a custom 4-D attention mask, which attn_implementation "
                         f"{impl!r} does not take: load the model with attn_implementation='sdpa' or 'eager'")
    visible = build_mask(batch["loss_mask"], batch["attention_mask"], bidirectional=True)  # (B, 1, S, S)
    dtype = hf_model.dtype
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)


@contextmanager
def checkpointing_off(layers):
    """Run these decoder layers without activation checkpointing inside the `with` block.
    NOTE: torch.func refuses the saved-tensor hooks activation checkpointing is built on, so the
    inner loop runs without it. transformers keeps a `gradient_checkpointing` flag per layer."""
    saved = [getattr(layer, "gradient_checkpointing", False) for layer in layers]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer, was in zip(layers, saved):
            layer.gradient_checkpointing = was


# -----------------------------------------------------------------------------
# The method


def response_loss(hf_model, inputs: dict, mask, position_ids, sel, targets):
    """Eq. 4: mean next-token cross-entropy over the response tokens of the micro-batch.

    inputs: {"input_ids": (B, S)} or {"inputs_embeds": (B, S, D)}; mask, position_ids: as the
    model takes them; sel (B, S-1) and targets (N,): see focusft.supervised_positions.
    The base model returns hidden states after its final norm; the vocabulary projection runs on
    the N supervised positions only, never on all (B, S) of them (V = 152k for Qwen). With N = 0
    the loss is 0 (an empty sum) and its backward still reaches every parameter with zeros, which
    DistributedDataParallel needs to finish its all-reduce."""
    h = hf_model.model(**inputs, attention_mask=mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state  # (B, S, D)
    h_sel = h[:, :-1][sel]  # (N, D): position t predicts token t+1
    logits = hf_model.lm_head(h_sel)  # (N, V)
    return F.cross_entropy(logits.float(), targets, reduction="sum") / max(targets.numel(), 1)


def inner_loop(hf_model, loss_with, fast, cfg: FocusConfig):
    """Eq. 3: phi <- phi - eta * clip(grad_phi L_inner(theta, phi)), k times.

    loss_with(phi) is the response loss of Eq. 4 with fast weights phi, under the same mask as the
    outer loss. torch.func.grad_and_value differentiates it w.r.t. phi only, and the surrounding
    no_grad keeps autograd from recording a graph to the base weights. A step whose loss is not
    finite is skipped, without a host sync. Returns (adapted phi, (k,) losses before each step).
    NOTE: each inner step runs the whole model, the bottom 65 % of the layers (which do not
    depend on phi) included, under no_grad; focusft.py runs them once per batch, which needs
    calling the decoder layers one by one."""
    losses = []
    with torch.no_grad(), checkpointing_off(hf_model.model.layers):
        for _ in range(cfg.inner_steps):
            grads, loss = torch.func.grad_and_value(loss_with)(fast)
            grads = clip_fast_grads(grads, cfg.inner_clip, cfg.clip_mode)
            ok = torch.isfinite(loss)
            fast = {i: {n: tuple(torch.where(ok, p - cfg.inner_lr * g, p) for p, g in zip(factors, grads[i][n]))
                        for n, factors in layer.items()} for i, layer in fast.items()}  # p: A or B
            losses.append(loss)
    return fast, torch.stack(losses)


def focusft_loss(hf_model, batch, cfg: FocusConfig, generator: torch.Generator | None = None):
    """Outer loss of one micro-batch (Eq. 2) and inner-loop stats: the function to port.

    batch: input_ids (B, S) long, attention_mask (B, S) bool (True = real token), loss_mask (B, S)
    bool (True = supervised response token), as data.collate makes them. cfg.method picks the
    paper's ablation: "sft", "sft-bidir", "causal-bilevel" or "focusft". generator seeds the
    fast-weight initialisation (None: torch's default generator). Returns (loss, stats);
    loss.backward() gives the first-order FocuSFT gradient of the base weights.
    stats: {"inner_losses": (k,) tensor or None, "n_targets": N}."""
    sel, targets = supervised_positions(batch)  # (B, S-1) bool, (N,)
    mask = hf_attention_mask(hf_model, batch, cfg)
    # NOTE: with a 4-D mask transformers cannot infer positions from padding: pass them. cumsum
    # is right for left padding too (and equals arange for right padding).
    position_ids = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)

    def loss_with(fast, **inputs):  # inputs: input_ids=, or inputs_embeds= (the inner loop)
        with fast_weights_applied(hf_model, fast, cfg.fast_scale):
            return response_loss(hf_model, inputs, mask, position_ids, sel, targets)

    stats = {"inner_losses": None, "n_targets": targets.numel()}
    if not cfg.bilevel:
        return loss_with({}, input_ids=batch["input_ids"]), stats
    fast = init_fast_weights(hf_model, cfg, generator)
    # NOTE: the inner loop starts from the token embeddings, looked up here, outside torch.func:
    # with activation checkpointing on, transformers hooks the embedding layer to call
    # requires_grad_() on its output, which torch.func refuses.
    with torch.no_grad():
        embeds = hf_model.get_input_embeddings()(batch["input_ids"])  # (B, S, D)
    fast, stats["inner_losses"] = inner_loop(hf_model, partial(loss_with, inputs_embeds=embeds), fast, cfg)
    # First-order: the adapted fast weights carry no graph, so this backward reaches the base
    # weights only. NOTE: the adapted layers run without activation checkpointing here: a
    # checkpointed layer is recomputed in backward, after the hooks are gone, i.e. without phi
    # (torch.utils.checkpoint then raises a CheckpointError). The inner loop has just held the
    # same activations, so the peak memory barely moves.
    with checkpointing_off([hf_model.model.layers[i] for i in adapted_layers(hf_model, cfg)]):
        return loss_with(fast, input_ids=batch["input_ids"]), stats


# -----------------------------------------------------------------------------
# transformers.Trainer


@contextmanager
def forward_replaced(module, step):
    """Inside the `with` block, module(...) runs step(...) instead of module.forward(...).
    An instance attribute shadows the class's forward (and is restored: accelerate may have put
    its own wrapper there)."""
    had, saved = "forward" in vars(module), vars(module).get("forward")
    module.forward = step
    try:
        yield
    finally:
        if had:
            module.forward = saved
        else:
            del module.forward


class FocusFTTrainer(transformers.Trainer):
    """transformers.Trainer whose training loss is focusft_loss (training only: its evaluation
    loop calls the model's own forward; evaluate with eval.py or your generation code).

    Batches are data.collate's dicts: data_collator=functools.partial(data.collate, pad_id=...).
    The fast-weight initialisation draws from torch's default generator, which Trainer seeds
    (args.seed) and saves in its checkpoints. Tested in one process and under DDP; FSDP and
    DeepSpeed ZeRO-3, which shard the weights, are untested."""

    loss_is_scaled_for_ga = False  # a mean per micro-batch: Trainer divides by the accumulation steps

    def __init__(self, *args, focus: FocusConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.focus = focus or FocusConfig()
        if self.args.remove_unused_columns:
            # NOTE: Trainer would drop `loss_mask` from a datasets.Dataset: no argument of forward has that name
            raise ValueError("FocusFTTrainer needs TrainingArguments(remove_unused_columns=False)")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        hf_model = self.accelerator.unwrap_model(model)

        def step(batch):
            with self.accelerator.autocast():  # what accelerate's forward wrapper would do (mixed precision)
                return focusft_loss(hf_model, batch, self.focus)

        # NOTE: DistributedDataParallel all-reduces only the gradients of a backward that follows
        # ITS forward; calling focusft_loss(hf_model, ...) directly would train every GPU on its
        # own gradients without an error. So the step runs as the wrapped model's forward.
        with forward_replaced(hf_model, step):
            loss, stats = model(inputs)
        return (loss, stats) if return_outputs else loss


# -----------------------------------------------------------------------------
# Demo: a tiny random Qwen2 on examples/agentic.jsonl with a byte-level tokenizer


def demo(steps: int = 8):
    torch.manual_seed(0)
    tokenizer = data.byte_tokenizer()
    samples = data.load_dataset(Path(__file__).with_name("agentic.jsonl"), tokenizer, max_length=384)[:2 * steps]
    config = transformers.Qwen2Config(vocab_size=data.BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=True)
    hf_model = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    print(f"model: {sum(p.numel() for p in hf_model.parameters()):,} parameters, layers "
          f"{list(adapted_layers(hf_model, FocusConfig()))} adapted; {len(samples)} samples")
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=2,
                                              learning_rate=3e-3, warmup_steps=2,
                                              logging_steps=1, save_strategy="no", report_to="none",
                                              remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
        trainer = FocusFTTrainer(model=hf_model, args=args, train_dataset=samples,
                                 data_collator=partial(data.collate, pad_id=tokenizer.pad_token_id),
                                 focus=FocusConfig())
        trainer.train()


if __name__ == "__main__":
    demo(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
