"""The attention analysis (paper §4.4, Figs. 2, 3, 6, Appendix C): sink mass and context
engagement of response-token queries, per layer, under the causal and the bidirectional mask."""

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import data
import focusft
from evals.common import EvalError, load_model, REPO

# -----------------------------------------------------------------------------
# Attention analysis (paper §4.4, Figs. 2, 3, 6, Appendix C)
#
# For the response-token queries of multi-turn agentic samples, attention probabilities averaged
# over heads: the sink mass (weight on key positions 0-4) per layer, the context engagement split
# into system/user prompt and tool responses (sink positions excluded, so the three parts do not
# overlap), the positional profile and a (query x key) heatmap of one layer (the paper: layer 14
# of 28). Each sample is read under the causal mask (sft, causal-bilevel, and inference) and under
# the GLM mask of Eq. 5 (sft-bidir, focusft).

SINK_POSITIONS = 5  # Appendix C: "sums attention weight on positions [0:5]"
ANALYSIS_MASKS = {"causal": False, "bidirectional": True}  # name -> focusft.build_mask(bidirectional=)


class LayerReducer(dict):
    """An `attn_probs` collector for model.hidden_states that reduces each layer's (1, H, S, S)
    probabilities the moment the layer produces them: a 4K-token sample of a 28-layer model keeps
    one S x S map alive at a time instead of 28 x H of them."""

    def __init__(self, layers, reduce: Callable[[int, torch.Tensor], dict]):
        super().__init__({i: None for i in layers})
        self.reduce = reduce

    def __setitem__(self, layer, probs):
        super().__setitem__(layer, self.reduce(layer, probs))


def attention_stats(model, sample, bidirectional: bool, heatmap_layer: int, bins: int = 64,
                    heatmap_size: int = 128) -> list[dict]:
    """Per-layer statistics of one data.Sample under one mask; see the section comment."""
    device = next(model.parameters()).device
    ids = torch.tensor([sample.input_ids], device=device)  # (1, S)
    loss_mask = torch.tensor([sample.loss_mask], device=device, dtype=torch.bool)
    mask = focusft.build_mask(loss_mask, torch.ones_like(loss_mask), bidirectional)  # (1, 1, S, S)
    S = ids.shape[1]
    seg = torch.tensor(sample.segments, device=device)
    content = torch.arange(S, device=device) >= SINK_POSITIONS
    keys = {"system_user": content & (seg == data.SEG_SYSTEM_USER), "tool": content & (seg == data.SEG_TOOL)}
    queries = loss_mask[0].nonzero().squeeze(1)  # response tokens
    bin_of = (torch.arange(S, device=device) * bins) // S  # key position -> relative-position bin

    def reduce(layer, probs):
        P = probs[0].float().mean(0)  # (S, S): averaged over heads
        Q = P[queries]  # (Nq, S): the response-token rows
        out = {"sink": Q[:, :SINK_POSITIONS].sum(-1).mean().item(),
               **{k: Q[:, m].sum(-1).mean().item() for k, m in keys.items()},
               "row_sum_error": (P.sum(-1) - 1).abs().max().item()}
        profile = torch.zeros(bins, device=device).index_add_(0, bin_of, Q.mean(0))
        out["profile"] = profile.tolist()
        if layer == heatmap_layer:  # average-pool to at most heatmap_size x heatmap_size
            k = max(1, math.ceil(S / heatmap_size))
            out["heatmap"] = torch.nn.functional.avg_pool2d(P[None, None], k, ceil_mode=True)[0, 0].tolist()
        return out

    collector = LayerReducer(range(model.config.num_hidden_layers), reduce)
    with torch.no_grad():
        model.hidden_states(ids, attn_mask=mask, attn_probs=collector)
    return [collector[i] for i in range(model.config.num_hidden_layers)]


def analyze(model, samples, heatmap_layer: int | None = None) -> dict:
    """Statistics averaged over samples, for each mask in ANALYSIS_MASKS."""
    L = model.config.num_hidden_layers
    heatmap_layer = L // 2 if heatmap_layer is None else heatmap_layer
    result = {"heatmap_layer": heatmap_layer, "samples": len(samples), "sink_positions": SINK_POSITIONS}
    for name, bidirectional in ANALYSIS_MASKS.items():
        per_sample = [attention_stats(model, s, bidirectional, heatmap_layer) for s in samples]
        layers = []
        for i in range(L):
            rows = [ps[i] for ps in per_sample]
            layers.append({k: float(np.mean([r[k] for r in rows])) for k in ("sink", "system_user", "tool")})
            layers[-1]["profile"] = np.mean([r["profile"] for r in rows], axis=0).tolist()
        mean = {k: float(np.mean([x[k] for x in layers])) for k in ("sink", "system_user", "tool")}
        mean["context"] = mean["system_user"] + mean["tool"]
        result[name] = {"layers": layers, "mean_over_layers": mean,
                        "row_sum_error": max(r["row_sum_error"] for ps in per_sample for r in ps),
                        "heatmap_sample0": per_sample[0][heatmap_layer]["heatmap"]}
    return result


def analysis_table(result: dict) -> str:
    names = list(ANALYSIS_MASKS)
    head = ["layer"] + [f"{what} ({n})" for what in ("sink", "sys/user", "tool") for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label, stats):
        cells = [f"{100 * stats[n][k]:.2f}" for k in ("sink", "system_user", "tool") for n in names]
        return f"| {label} | " + " | ".join(cells) + " |"

    for i in range(len(result[names[0]]["layers"])):
        lines.append(row(str(i), {n: result[n]["layers"][i] for n in names}))
    lines.append(row("mean", {n: result[n]["mean_over_layers"] for n in names}))
    return "\n".join(lines) + "\n(% of the attention of response-token queries, averaged over heads and samples)"


def analysis_plots(result: dict, out: Path) -> list[Path]:
    """PNG figures when matplotlib is installed (optional; never required)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names, files = list(ANALYSIS_MASKS), []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for n in names:  # Fig. 6: sink mass per layer
        axes[0].plot([100 * x["sink"] for x in result[n]["layers"]], marker="o", label=n)
    axes[0].set(xlabel="layer", ylabel="sink mass (%)", title="attention on positions 0-4")
    width = 0.35  # Fig. 2 (middle): where the attention budget goes
    for j, n in enumerate(names):
        m = result[n]["mean_over_layers"]
        axes[1].bar([x + j * width for x in range(3)], [100 * m["sink"], 100 * m["system_user"], 100 * m["tool"]],
                    width, label=n)
    axes[1].set_xticks([x + width / 2 for x in range(3)], ["sink", "system/user", "tool"])
    axes[1].set(ylabel="% of attention", title="attention budget (mean over layers)")
    h = result["heatmap_layer"]
    for n in names:  # Fig. 2 (right): positional profile
        axes[2].plot(result[n]["layers"][h]["profile"], label=n)
    axes[2].set(xlabel="key position (relative bins)", ylabel="attention", title=f"positional profile, layer {h}")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    files.append(out / "analysis.png")
    fig.savefig(files[-1], dpi=120)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 5))
    for ax, n in zip(axes, names):  # Fig. 3: heatmap of sample 0 (log scale shows the sink column)
        ax.imshow(np.log10(np.asarray(result[n]["heatmap_sample0"]) + 1e-6), cmap="viridis")
        ax.set(title=f"{n} mask, layer {h} (log10)", xlabel="key", ylabel="query")
    fig.tight_layout()
    files.append(out / "heatmap.png")
    fig.savefig(files[-1], dpi=120)
    plt.close("all")
    return files


def run_analyze(args, log=print) -> dict:
    model, tok, path = load_model(args.model, args.device, args.dtype)
    samples = data.load_dataset(args.data, tok, args.max_length, "right", log=log)
    try:
        chosen = [samples[i] for i in args.index]
    except IndexError:
        raise EvalError(f"--index {args.index}: {args.data} has {len(samples)} usable conversations") from None
    L = model.config.num_hidden_layers
    if args.layer is not None and not 0 <= args.layer < L:
        raise EvalError(f"--layer {args.layer}: the model has layers 0..{L - 1}")
    result = analyze(model, chosen, args.layer)
    result.update(model=str(path), data=str(args.data), index=args.index,
                  tokens=[len(s.input_ids) for s in chosen])
    out = Path(args.out or Path("eval_results") / Path(str(args.model).rstrip("/")).name) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(result) + "\n", encoding="utf-8")
    table = analysis_table(result)
    (out / "analysis.md").write_text(table + "\n", encoding="utf-8")
    log(table)
    for n in ANALYSIS_MASKS:
        m = result[n]["mean_over_layers"]
        log(f"{n} mask: sink {100 * m['sink']:.2f}% | context engagement {100 * m['context']:.2f}% "
            f"(system/user {100 * m['system_user']:.2f}%, tool {100 * m['tool']:.2f}%)")
    pngs = analysis_plots(result, out)
    log(f"results in {out}/ (analysis.json, analysis.md{''.join(', ' + p.name for p in pngs)})")
    return result


# -----------------------------------------------------------------------------
# Entry: the `analyze` sub-command (eval.py; not a benchmark: no engine, no summary)

HELP = "attention sinks and context engagement (paper §4.4, Figs. 2, 3, 6)"


def add_flags(an):
    an.add_argument("--model", required=True, help="checkpoint directory (HF layout) or hub id")
    an.add_argument("--data", default=str(REPO / "examples" / "agentic-heldout.jsonl"),
                    help="multi-turn agentic conversations: .jsonl/.parquet file, directory, glob or "
                         "hf:owner/name[:split]")
    an.add_argument("--index", nargs="+", type=int, default=[0], help="which conversations (0-based)")
    an.add_argument("--max-length", type=int, default=4096, help="truncate samples to this many tokens")
    an.add_argument("--layer", type=int, default=None, help="heatmap/profile layer (default: the middle one)")
    an.add_argument("--out", default=None, help="results directory (default: eval_results/<model name>)")
    an.add_argument("--device", default=None)
    an.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on cuda, fp32 on cpu)")
