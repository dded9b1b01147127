"""The documentation's references resolve, and the docs say what the code is, not its history.

- Every reference of the form docs/FILE.md#anchor in the repository's .py, .toml and .md files
  names a file under docs/ and, in it, a heading whose GitHub slug is the anchor.
- Every relative link in a Markdown file ([text](path#anchor)) names a file or folder that
  exists and, for a Markdown file, a heading of it.
- Nothing refers to the opening brief's section numbers or to a notes folder outside the
  repository: a reader who clones the repository has neither.
- README.md, docs/ and the results READMEs carry no commit hashes and no process words
  (sessions, issue numbers, lent machines); code and pyproject.toml no issue numbers or lent
  machines.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = (".py", ".toml", ".md")
SKIP_DIRS = {"__pycache__", "runs", "build", "dist", "node_modules"}
THIS = Path(__file__).resolve()

DOCS_REF = re.compile(r"docs/([\w./-]+?\.md)(?:#([\w-]+))?")
MD_LINK = re.compile(r"\]\(([^()\s]+)\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
FENCE = re.compile(r"^ {0,3}(```|~~~)")
# The brief's section sign and a notes folder, spelt so that this file does not match itself.
BRIEF_REF = re.compile("DESIGN" + r"\s*" + "\u00a7")
NOTES_REF = re.compile(r"(?<![\w./~-])" + "notes" + r"/")
COMMIT_HASH = re.compile(r"(?<![0-9A-Za-z_])(?<!0x)(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])"
                         r"[0-9a-f]{7,40}(?![0-9A-Za-z_])")
ISSUE_NUMBER = re.compile(r"\bissue[\s-]*#?\d", re.IGNORECASE)
LENT = re.compile(r"\blent\b", re.IGNORECASE)
SESSION = re.compile(r"\bsessions?\b", re.IGNORECASE)


def repository_files(suffixes=SUFFIXES):
    """The repository's text files of these suffixes: hidden folders (.git, a .venv),
    caches, run folders and build outputs left out."""
    found = []
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if any(p.startswith(".") or p in SKIP_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
            continue
        if path.is_file() and path.suffix in suffixes and not parts[-1].startswith("."):
            found.append(path)
    return sorted(found)


def github_slug(text: str) -> str:
    """The anchor GitHub gives a heading: its text without Markdown markup, lowercased,
    punctuation other than '-' and '_' dropped, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)   # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)                        # inline HTML tags
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    """The anchors of a Markdown file: its headings' slugs (repeats numbered -1, -2, ... as
    GitHub numbers them) and explicit <a id="..."> anchors; fenced code is skipped."""
    seen, found, fenced = {}, set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        found.update(HTML_ANCHOR.findall(line))
        m = HEADING.match(line)
        if m:
            slug = github_slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def _lines(path: Path):
    return enumerate(path.read_text(encoding="utf-8").splitlines(), 1)


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_slugs_follow_github():
    assert github_slug("State bytes") == "state-bytes"
    assert github_slug("NumPy 2.5 guard") == "numpy-25-guard"
    assert github_slug("`TritFlip`: the update rule") == "tritflip-the-update-rule"
    assert github_slug("Code memory (CodeMemoryLM)") == "code-memory-codememorylm"
    assert github_slug("flip_carry and accum_init") == "flip_carry-and-accum_init"


def test_docs_references_name_existing_sections():
    """docs/FILE.md#anchor in code, comments, pyproject.toml and Markdown: the file exists
    under docs/ and has a heading with that slug (e.g. docs/design.md#state-bytes); a plain
    docs/FILE.md names a file that exists."""
    problems, cache = [], {}
    for path in repository_files():
        for n, line in _lines(path):
            for name, anchor in DOCS_REF.findall(line):
                if name == "FILE.md":   # the form itself, as this file and the docs spell it
                    continue
                target = ROOT / "docs" / name
                if not target.is_file():
                    problems.append(f"{_where(path, n)}: docs/{name} does not exist")
                    continue
                if not anchor:
                    continue
                if target not in cache:
                    cache[target] = anchors(target)
                if anchor not in cache[target]:
                    problems.append(f"{_where(path, n)}: docs/{name} has no heading "
                                    f"#{anchor} (its anchors: {', '.join(sorted(cache[target]))})")
    assert not problems, "\n".join(problems)


def test_markdown_links_resolve():
    """Relative links in Markdown files name files or folders that exist, and headings that
    exist in the Markdown files they name."""
    problems, cache = [], {}
    for path in repository_files((".md",)):
        fenced = False
        for n, line in _lines(path):
            if FENCE.match(line):
                fenced = not fenced
            if fenced:
                continue
            for link in MD_LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", link):   # http:, https:, mailto:
                    continue
                file, _, anchor = link.partition("#")
                target = (path.parent / file).resolve() if file else path
                if not target.exists():
                    problems.append(f"{_where(path, n)}: link to {file}, which does not exist")
                    continue
                if anchor and target.suffix == ".md":
                    if target not in cache:
                        cache[target] = anchors(target)
                    if anchor not in cache[target]:
                        problems.append(f"{_where(path, n)}: {link}: no heading #{anchor}")
    assert not problems, "\n".join(problems)


def test_no_references_outside_the_repository():
    """The opening brief's section numbers and a notes folder are not in the repository:
    refer to a docs/ section instead."""
    problems = []
    for path in repository_files():
        if path == THIS:
            continue
        for n, line in _lines(path):
            for pattern, what in ((BRIEF_REF, "the brief's section numbers"),
                                  (NOTES_REF, "a notes folder")):
                if pattern.search(line):
                    problems.append(f"{_where(path, n)}: refers to {what}: {line.strip()}")
    assert not problems, "\n".join(problems)


def _prose_files():
    """README.md, every file under docs/ and the results folders' Markdown."""
    files = [ROOT / "README.md"]
    files += [p for p in repository_files((".md",)) if p.relative_to(ROOT).parts[0] == "docs"]
    results = ROOT / "benchmarks" / "results"
    files += [p for p in repository_files((".md",)) if results in p.parents]
    return files


def test_docs_and_readmes_state_the_present():
    """No commit hashes and no process words (sessions, issue numbers, lent machines) in the
    README, docs/ and the results READMEs: they say what is, with device and date; history
    is in git."""
    problems = []
    for path in _prose_files():
        for n, line in _lines(path):
            for pattern, what in ((COMMIT_HASH, "a commit hash"), (SESSION, "a session"),
                                  (ISSUE_NUMBER, "an issue number"), (LENT, "a lent machine")):
                m = pattern.search(line)
                if m:
                    problems.append(f"{_where(path, n)}: {what} ({m.group(0)!r}): "
                                    f"{line.strip()[:120]}")
    assert not problems, "\n".join(problems)


def test_code_states_the_present():
    """Module docstrings and comments say what the code is, not which issue made it or on
    which lent machine it was measured."""
    problems = []
    for path in repository_files((".py", ".toml")):
        if path == THIS:
            continue
        for n, line in _lines(path):
            for pattern, what in ((ISSUE_NUMBER, "an issue number"), (LENT, "a lent machine")):
                m = pattern.search(line)
                if m:
                    problems.append(f"{_where(path, n)}: {what} ({m.group(0)!r}): "
                                    f"{line.strip()[:120]}")
    assert not problems, "\n".join(problems)
