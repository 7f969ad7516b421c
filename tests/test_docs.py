"""The README is a front door and the docs/ pages hold together.

Every relative link in README.md and in docs/ (pages under docs/results/ included) resolves to an
existing file or folder, and a `#anchor` to a heading of the linked Markdown page; every docs/ page
the README names exists; every benchmark directory has its results page; the README stays short.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", flags=re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", flags=re.MULTILINE)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$", flags=re.MULTILINE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code (links there are code, not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    body = prose(text)
    return LINK.findall(body) + REFERENCE.findall(body)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, markup and punctuation dropped, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, title in HEADING.findall(FENCE.sub("", page.read_text())):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of `page` that does not resolve, as 'page: link (why)'."""
    problems = []
    for link in links(page.read_text()):
        if SCHEME.match(link):
            continue  # http(s), mailto: not checked here
        path_part, _, anchor = link.partition("#")
        target = (page.parent / unquote(path_part)).resolve() if path_part else page
        where = f"{page.relative_to(root)}: {link}"
        if not target.exists():
            problems.append(f"{where} (no such file)")
        elif not target.resolve().is_relative_to(root.resolve()):
            problems.append(f"{where} (outside the repository)")
        elif anchor:
            if target.suffix != ".md":
                problems.append(f"{where} (anchor into a file that is not Markdown)")
            elif unquote(anchor) not in anchors(target):
                problems.append(f"{where} (no heading with this anchor in {target.name})")
    return problems


def test_every_relative_link_resolves():
    problems = [p for page in doc_pages() for p in broken_links(page)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_checker_catches_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Some section: here\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/page.md) [ok anchor](docs/page.md#some-section-here) [web](https://example.org/x)\n"
        "[missing](docs/gone.md) [bad anchor](docs/page.md#nowhere) [self](#no-heading)\n"
        "`[code](docs/not-a-link.md)`\n\n```\n[fenced](docs/not-a-link-either.md)\n```\n"
    )
    problems = broken_links(tmp_path / "README.md", root=tmp_path)
    assert [p.split(": ", 1)[1].split(" (")[0] for p in problems] == [
        "docs/gone.md",
        "docs/page.md#nowhere",
        "#no-heading",
    ]
    assert broken_links(tmp_path / "docs" / "page.md", root=tmp_path) == []


def test_every_docs_page_the_readme_names_exists():
    named = set(re.findall(r"docs/[\w./-]+?\.md", README.read_text()))
    assert named, "the README names no docs/ page"
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"README names missing docs pages: {missing}"


def test_every_benchmark_has_a_results_page_the_readme_reaches():
    benchmarks = sorted(p.name for p in (ROOT / "benchmarks").iterdir() if p.is_dir())
    assert benchmarks
    readme_links = set(links(README.read_text()))
    for name in benchmarks:
        page = ROOT / "docs" / "results" / f"{name}.md"
        assert page.is_file(), f"benchmarks/{name}/ has no results page docs/results/{name}.md"
        assert f"docs/results/{name}.md" in readme_links, f"the README does not link docs/results/{name}.md"


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"
