"""
Hugging Face checkpoint I/O for the Qwen2 of model.py: read and write the HF layout (config.json,
safetensors, possibly sharded, parameter names verbatim), so a checkpoint loads with strict=True,
saves back unchanged and opens in transformers.

`load_pretrained(path_or_hub_id)` builds the model on the meta device and assigns the tensors, so
a 7B model never exists twice in memory; `save_pretrained(model, out_dir)` writes atomically (a
temporary directory, then a rename). `Qwen2.from_pretrained` and `model.save_pretrained` call them.

The end of the file holds what train.py needs of a run's output directory: its OUT/step-N/
checkpoints (the newest, published by atomic renames), every RNG state for an exact resume, and
OUT/log.jsonl cut back to the step a resumed run continues from.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from model import ModelError, Qwen2, Qwen2Config


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


# -----------------------------------------------------------------------------
# A training run's output directory (train.py): OUT/step-N/ directories, each an HF checkpoint
# plus train_state.pt (optimizer, schedule, position and every rank's RNG state), and OUT/log.jsonl


def newest_checkpoint(out: Path) -> Path | None:
    """The newest complete out/step-N/ (directories appear by atomic rename, so complete = present)."""
    steps = [(int(p.name[5:]), p) for p in out.glob("step-*") if p.name[5:].isdigit() and (p / "train_state.pt").is_file()]
    return max(steps)[1] if steps else None


def publish(src: Path, out: Path):
    """Move a finished checkpoint's files into `out`, one atomic rename each, config.json last
    (a directory without config.json is not a loadable checkpoint), then drop `src`."""
    names = sorted(p.name for p in src.iterdir())
    for name in [n for n in names if n != "config.json"] + ["config.json"]:
        os.replace(src / name, out / name)
    src.rmdir()


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
             "fast_weights": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    generator.set_state(state["fast_weights"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def last_saved(out: Path | None) -> str:
    """What an error says about what the run has written so far."""
    if out and (out / "config.json").is_file():  # published last by finish
        return f"The final model is in {out}/."
    last = newest_checkpoint(out) if out else None
    return f"Last checkpoint: {last}" if last else "No checkpoint was written yet."


def read_log(log_path: Path, last_step: int) -> list[dict]:
    """The records of OUT/log.jsonl up to step `last_step`, skipping a line cut short by an interruption."""
    if not log_path.is_file():
        return []
    records = []
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return [r for r in records if r["step"] <= last_step]


def trim_log(log_path: Path, last_step: int):
    """Drop the log lines of steps after `last_step` (they run again after a resume)."""
    if log_path.is_file():
        log_path.write_text("".join(json.dumps(r) + "\n" for r in read_log(log_path, last_step)))
