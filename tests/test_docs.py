"""The documentation stands on its own and describes the software, not its history.

README.md and docs/ must not cite files outside the repository (the team's design reference)
nor speak of work sessions or issue numbers; every relative link, every repository path in
backticks and every cited section ("docs/mathematics.md §3") must exist.
"""

from __future__ import annotations

import pathlib
import re
import unicodedata

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
CODE = sorted(p for folder in ("hodlr", "fenwick", "kernels", "tests") for p in (ROOT / folder).glob("**/*.py")
              if p.resolve() != pathlib.Path(__file__).resolve()) + [ROOT / "pyproject.toml"]
OUTSIDE_REFERENCE = "DESIGN" + ".md"  # spelt in two parts so that this file does not cite it

FORBIDDEN = {
    "the design reference outside the repository": re.compile(re.escape(OUTSIDE_REFERENCE)),
    "a work session": re.compile(r"\bsessions?\b", re.I),
    "an issue number": re.compile(r"\bissues?\s*#?\s*\d+", re.I),
}
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
TICKED_PATH = re.compile(r"`([A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)+\.(?:md|py|json|png|ipynb|toml))`")
SECTION_REF = re.compile(r"([\w-]+\.md)[`)\]]*\s+(?:§\s?|section\s+)(\d+(?:\.\d+)?[a-z]?)")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)?)[.\s]", re.M)


def _rel(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


def _lines(path: pathlib.Path):
    return enumerate(path.read_text(encoding="utf-8").splitlines(), 1)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def _anchors(path: pathlib.Path) -> set:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#{1,6}\s+(.*?)\s*#*$", text, re.M)}


def _sections(path: pathlib.Path) -> set:
    return set(HEADING.findall(path.read_text(encoding="utf-8")))


def _doc_named(name: str) -> pathlib.Path:
    """The cited page: a file of docs/ (or README.md), whatever prefix the citation used."""
    return ROOT / name if name == "README.md" else ROOT / "docs" / name


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_docs_describe_the_software_not_its_history(path):
    found = [f"{_rel(path)}:{n}: {what}: {line.strip()[:120]}"
             for n, line in _lines(path) for what, pattern in FORBIDDEN.items() if pattern.search(line)]
    assert not found, "\n".join(found)


def test_code_does_not_cite_the_outside_reference():
    found = [f"{_rel(path)}:{n}: {line.strip()[:120]}"
             for path in CODE for n, line in _lines(path) if OUTSIDE_REFERENCE in line]
    assert not found, "cite docs/mathematics.md sections instead:\n" + "\n".join(found)


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_relative_links_point_to_existing_files(path):
    broken = []
    for n, line in _lines(path):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{_rel(path)}:{n}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{_rel(path)}:{n}: {target} (no heading with that anchor)")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_paths_in_backticks_exist(path):
    missing = [f"{_rel(path)}:{n}: {name}" for n, line in _lines(path) for name in TICKED_PATH.findall(line)
               if not (ROOT / name).exists()]
    assert not missing, "\n".join(missing)


def test_cited_sections_exist():
    bad = []
    for path in DOCS + CODE:
        for n, line in _lines(path):
            for name, number in SECTION_REF.findall(line):
                page = _doc_named(name)
                if not page.exists():
                    bad.append(f"{_rel(path)}:{n}: {name} (no such page)")
                elif number not in _sections(page):
                    bad.append(f"{_rel(path)}:{n}: {name} §{number} (no such section)")
    assert not bad, "\n".join(bad)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The patterns flag the words they are meant to, and leave ordinary prose alone."""
    def flagged(text):
        return {what for what, pattern in FORBIDDEN.items() if pattern.search(text)}

    assert flagged("see " + OUTSIDE_REFERENCE) == {"the design reference outside the repository"}
    assert flagged("measured in the third session") == {"a work session"}
    assert flagged("Targets (issue 4)") == flagged("fixed in issue #12") == {"an issue number"}
    assert not flagged("the possession of issue-free text; issues of rounding in 2 steps")
    assert LINK.findall("![x](img/a.png) and [y](b.md#c) and [z](https://e.org)") == ["img/a.png", "b.md#c",
                                                                                       "https://e.org"]
    assert SECTION_REF.findall("`docs/mathematics.md` §12, [kernels.md](kernels.md) §5.1, "
                               "mathematics.md section 8") == [("mathematics.md", "12"), ("kernels.md", "5.1"),
                                                                ("mathematics.md", "8")]
    assert _slug("2. Speed: `hodlr bench`, 04:13 UTC") == "2-speed-hodlr-bench-0413-utc"
