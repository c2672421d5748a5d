"""Every link, image and repository path the README and docs/ name exists: relative Markdown
links (the figures of docs/results.md included) and paths in backticks under the repository's
top-level folders, so a moved or renamed file cannot leave a dead reference."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")
_PATH = re.compile(
    r"`((?:bench|configs|data|docs|megatron_mhc|scripts|tests|tools)/[\w./-]*[\w/])`"
)
# Files the README's custom-data example tells the user to write.
WRITTEN_BY_THE_USER = {"data/my_corpus.bin", "data/my_corpus.idx"}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_repository_paths_exist(document):
    text = document.read_text()
    links = [t for t in _LINK.findall(text) if "://" not in t]
    missing = [t for t in links if not (document.parent / t).exists()]
    missing += [
        t for t in _PATH.findall(text) if t not in WRITTEN_BY_THE_USER and not (REPO / t).exists()
    ]
    assert not missing, f"{document.name} names what does not exist: {missing}"
