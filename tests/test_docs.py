"""The README and docs/ are what a reader has: every relative link in them must resolve, to a file
of the repository and, where it names one, to a heading of that file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def strip_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)  # a link inside a code block is not a link


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.*)$", strip_code(path.read_text(encoding="utf-8")), flags=re.M)}


def broken_links(md: Path, root: Path = ROOT) -> list[str]:
    bad = []
    for target in LINK.findall(strip_code(md.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, frag = target.partition("#")
        full = (md.parent / path).resolve() if path else md
        if not full.exists():
            bad.append(f"{md.relative_to(root)}: {target} (no such file)")
        elif frag and full.suffix == ".md" and frag not in anchors(full):
            bad.append(f"{md.relative_to(root)}: {target} (no heading #{frag})")
    return bad


def test_every_relative_link_resolves():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(files) > 1
    bad = [b for f in files for b in broken_links(f)]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_broken_link(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("[a](missing.py) [b](x.md#nowhere) [c](x.md#title)\n```\n[d](in-code.py)\n```\n# Title\n")
    assert broken_links(md, tmp_path) == ["x.md: missing.py (no such file)", "x.md: x.md#nowhere (no heading #nowhere)"]


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200
