"""The project documents itself: shipped files point only inside the repository, and doc links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["bilalora", "cli", "export", "runtime"]
DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
#: Documents that live outside the repository (the project's private notes) and must never be cited.
OUTSIDE = re.compile(r"METHOD\.md|SPEC\.md|\.\./shared|shared/docs|shared/metrics")


def _shipped_files():
    for folder in SHIPPED:
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".md", ".json", ".txt") and "__pycache__" not in path.parts:
                yield path
    for name in DOCS:
        yield REPO / name


def test_no_shipped_file_cites_a_document_outside_the_repository():
    offenders = []
    for path in _shipped_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)


def test_the_docs_exist():
    for name in ("method.md", "metrics.md", "model-json.md", "weights.md", "architecture.md"):
        assert (REPO / "docs" / name).is_file(), name


def _anchors(markdown: str) -> set[str]:
    """GitHub-style heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in markdown.splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            text = re.sub(r"[`*_]", "", match.group(1)).strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text)))
    return anchors


@pytest.mark.parametrize("name", DOCS)
def test_relative_links_resolve(name):
    source = REPO / name
    text = source.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file_part, _, anchor = target.partition("#")
        path = (source.parent / file_part).resolve() if file_part else source
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path.read_text(encoding="utf-8")):
            broken.append(target)
    assert not broken, f"{name}: broken links {broken}"
