"""Shared test helpers: where the reference material lives, and the real Qwen2.5 tokenizer.

The team's machines keep reference material in ../shared beside the checkout (the real Qwen2.5
tokenizer with its chat template, RULER's essay haystack). Everyone else gets the tokenizer from
the Hugging Face hub, cached like any hub file; tests that need it skip, saying how to get it,
only when neither is available.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Any Qwen2.5 instruct repository carries the same tokenizer.json and chat template.
QWEN_TOKENIZER_REPO = "Qwen/Qwen2.5-7B-Instruct"
QWEN_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@functools.lru_cache(maxsize=None)
def _qwen_tokenizer_dir() -> tuple[Path | None, str]:
    local = SHARED / "qwen2.5-tokenizer"
    if all((local / f).is_file() for f in QWEN_TOKENIZER_FILES):
        return local, ""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None, "huggingface_hub is not installed"
    paths, why = [], ""
    # the cache first (no network, no waiting), then the hub unless HF_HUB_OFFLINE is set
    for local_only in (True, False):
        if not local_only and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            break
        try:
            paths = [Path(hf_hub_download(QWEN_TOKENIZER_REPO, f, local_files_only=local_only))
                     for f in QWEN_TOKENIZER_FILES]
            return paths[0].parent, ""
        except Exception as e:  # offline, no cache, hub errors: all mean "not available here"
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None, why


def qwen_tokenizer_dir() -> Path:
    """A directory with the real Qwen2.5 tokenizer.json and tokenizer_config.json, or skip."""
    path, why = _qwen_tokenizer_dir()
    if path is None:
        pytest.skip(f"the real Qwen2.5 tokenizer is not available: not in {SHARED / 'qwen2.5-tokenizer'}, and "
                    f"fetching {QWEN_TOKENIZER_REPO} from the Hugging Face hub failed ({why}). With network access "
                    f"run once: huggingface-cli download {QWEN_TOKENIZER_REPO} {' '.join(QWEN_TOKENIZER_FILES)}")
    return path


def shared_file(rel: str) -> Path:
    """A file of the reference material in ../shared, or skip with the reason."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"{p} not found: the reference material (../shared) is not beside this checkout")
    return p


def make_hub_cache(cache_dir: Path, repo_id: str, files: dict[str, bytes | str], repo_type: str = "model",
                   commit: str = "0" * 40) -> Path:
    """Lay out `files` as huggingface_hub's cache holds a downloaded snapshot of `repo_id`, so that
    hub code can be tested offline (HF_HUB_OFFLINE=1 / local_files_only=True) without a network."""
    root = Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / commit
    for name, content in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(content.encode() if isinstance(content, str) else content)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture
def sandbox_available():
    """Skip, saying how to get it, when the code tool's sandbox (bubblewrap) is not available here;
    under CI (CI=true) fail instead: .ci/run installs it, so there a missing sandbox is a defect."""
    from evals.sandbox import sandbox_check

    why = sandbox_check()
    if why and not os.environ.get("CI"):
        pytest.skip(f"the code tool's sandbox is not available here: {why}")
