"""The documentation holds together: package citations point into docs/design.md, Markdown links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_globalres"
DESIGN = ROOT / "docs" / "design.md"
TEXT_SUFFIXES = {".py", ".md", ".txt"}

#: A section citation: ``docs/design.md §4`` or ``docs/design.md §4.3``.
DESIGN_CITATION = re.compile(r"docs/design\.md §(\d+(?:\.\d+)*)")
#: A section sign: allowed after ``docs/design.md `` or after a dated publication (``Sun et al. 2023, §4``).
SECTION_SIGN = re.compile(r"§\s*\d")
ALLOWED_BEFORE_SECTION = re.compile(r"(docs/design\.md |(?:19|20)\d\d[a-z]?, )$")
#: The maintainers' notes are not shipped; the package cites docs/design.md instead.
NOTES_WORD = re.compile(r"\bNOTES\b")
#: A path to a Markdown document that leaves the repository: absolute, or climbing out with ``..``.
OUTSIDE_DOCUMENT = re.compile(r"(?<![\w.])(?:/|~/|(?:\.\./)+)[\w./-]*\.md\b")
#: A heading that numbers a section: ``## 4. The optimal rule`` or ``### 4.3 The race law``.
NUMBERED_HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", re.MULTILINE)
#: An inline Markdown link or image target: ``[text](target)`` (an optional title after a space).
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def package_text_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def design_sections() -> set[str]:
    return set(NUMBERED_HEADING.findall(DESIGN.read_text(encoding="utf-8")))


def markdown_documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def outside_citations(text: str) -> list[str]:
    """Citations of the maintainers' notes, paths to documents outside the repository, unsourced ``§n``."""
    found = [m.group(0) for m in NOTES_WORD.finditer(text)]
    for match in OUTSIDE_DOCUMENT.finditer(text):
        target = match.group(0)
        resolved = (ROOT / target).resolve() if not target.startswith(("/", "~")) else Path(target)
        if ROOT not in resolved.parents:
            found.append(target)
    for match in SECTION_SIGN.finditer(text):
        before = text[max(0, match.start() - 40) : match.start()]
        if not ALLOWED_BEFORE_SECTION.search(before):
            found.append(text[max(0, match.start() - 30) : match.end() + 3])
    return found


def broken_links(document: Path) -> list[str]:
    """Relative link targets of ``document`` whose file does not exist (anchors and URLs are skipped)."""
    broken = []
    for target in MARKDOWN_LINK.findall(document.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # a URL (http:, mailto:, …) or an anchor on the same page
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (document.parent / path).exists():
            broken.append(target)
    return broken


def test_design_document_numbers_its_sections() -> None:
    sections = design_sections()
    top = sorted(int(s) for s in sections if "." not in s)
    assert top == list(range(1, len(top) + 1)), f"top-level sections of docs/design.md are not 1..N: {top}"
    assert len(top) >= 9


@pytest.mark.parametrize("path", package_text_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_package_cites_nothing_outside_the_repository(path: Path) -> None:
    found = outside_citations(path.read_text(encoding="utf-8"))
    assert not found, f"{path.relative_to(ROOT)} cites outside the repository: {found}; cite docs/design.md §n"


def test_design_citations_name_existing_sections() -> None:
    sections = design_sections()
    cited: dict[str, set[str]] = {}
    for path in package_text_files():
        for number in DESIGN_CITATION.findall(path.read_text(encoding="utf-8")):
            cited.setdefault(number, set()).add(str(path.relative_to(ROOT)))
    assert cited, "the package cites no section of docs/design.md"
    missing = {number: sorted(paths) for number, paths in cited.items() if number not in sections}
    assert not missing, f"docs/design.md has no section {missing}; sections: {sorted(sections)}"


@pytest.mark.parametrize("document", markdown_documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_markdown_links_resolve(document: Path) -> None:
    assert not broken_links(document), f"{document.relative_to(ROOT)} links to missing files: {broken_links(document)}"


def test_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    """Each check flags a bad input, so a passing run means something."""
    assert outside_citations("see NOTES §3 for the proof")
    assert outside_citations("as in ../shared/design/NOTES.md")
    assert outside_citations("derived in /srv/notes/design.md")
    assert outside_citations("the race law (§3)")
    assert not outside_citations("the race law (docs/design.md §4.3; Sun et al. 2023, §4)")
    assert not outside_citations("read ``../shared/data/gsm8k/test.jsonl`` if present")
    document = tmp_path / "page.md"
    document.write_text("[a](missing.md) [b](page.md#top) [c](#here) [d](https://example.org/x.md)\n")
    assert broken_links(document) == ["missing.md"]
    assert DESIGN_CITATION.findall("(docs/design.md §4.3), docs/design.md §7.") == ["4.3", "7"]
