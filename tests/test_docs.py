"""The README and docs/*.md: every relative link names a file that exists and every #anchor a heading of
its target, by GitHub's slug rules; the README lists every docs page and keeps the test command CI runs."""
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lowercased, punctuation but hyphens and
    underscores dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a page's headings; a repeated slug gets -1, -2, ..."""
    found, seen = set(), {}
    for _, line in prose_lines(text):
        match = _HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str):
    """(line number, target) of every Markdown link and image outside code."""
    for number, line in prose_lines(text):
        for match in _LINK.finditer(_CODE_SPAN.sub("", line)):
            yield number, match.group(1)


def broken_links(page: Path) -> list[str]:
    """What in `page` does not resolve: a relative link to a missing file, or an anchor that is no
    heading of its target."""
    problems = []
    for number, target in links(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        destination = (page.parent / unquote(path)).resolve() if path else page
        where = f"{page.name}:{number}: {target}"
        if not destination.exists():
            problems.append(f"{where}: no such file")
        elif anchor and destination.suffix == ".md" and unquote(anchor) not in anchors(destination.read_text()):
            problems.append(f"{where}: no heading with this anchor in {destination.name}")
    return problems


def test_slugs_follow_github():
    assert slug("Train: `f2d-train`") == "train-f2d-train"
    assert slug("Running the weights in PyTorch diffusers: `f2d_jax.torch`") == \
        "running-the-weights-in-pytorch-diffusers-f2d_jaxtorch"
    assert slug("MSID pretraining: `f2d-identities`, `f2d-verify`") == "msid-pretraining-f2d-identities-f2d-verify"
    assert slug("Does CGDR learn?") == "does-cgdr-learn"
    assert slug("`python -m f2d_jax.convert`") == "python--m-f2d_jaxconvert"
    text = "# Notes\n## Notes\n```\n# not a heading\n```\n## Notes\n"
    assert anchors(text) == {"notes", "notes-1", "notes-2"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    assert broken_links(page) == []


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Its part\n")
    page = tmp_path / "README.md"
    page.write_text("# Title\n\n[good](docs/a.md#its-part) [here](#title) `[code](nowhere.md)`\n\n"
                    "```\n[fenced](nowhere.md)\n```\n\n"
                    "[no file](docs/b.md) [no anchor](docs/a.md#its-parts) [no local anchor](#titles)\n"
                    "![no image](docs/app.png)\n")
    assert [p.split(": ", 1)[1] for p in broken_links(page)] == [
        "docs/b.md: no such file", "docs/a.md#its-parts: no heading with this anchor in a.md",
        "#titles: no heading with this anchor in README.md", "docs/app.png: no such file"]


def test_readme_lists_every_docs_page():
    targets = {target.partition("#")[0] for _, target in links((ROOT / "README.md").read_text())}
    assert {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} <= targets


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^make test\b", quickstart, re.M)
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)


def test_readme_commands_table_has_every_console_script():
    scripts = re.findall(r"^(f2d-[a-z-]+) = ", (ROOT / "pyproject.toml").read_text(), re.M)
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| \[`([^`]+)`\]\((docs/[^)]+)\) \|", readme, re.M)
    assert scripts and set(scripts) <= {name for name, _ in rows}
