"""Every place in the code that cites the docs names a page and a section that exist, and every
dotted name of the code a comment names exists (issue 21: comments pointed at sections of the
wrong page, and at a constant in the wrong module; a reader following them found nothing).

A citation is `docs/PAGE.md`, optionally followed (after a comma, a colon or a line break of
the comment) by a quoted section title, which must begin a heading of that page, or by `§N`,
a numbered section of it."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = ("dfs", "storage_node", "fuse_mount", "tests", "scripts")
#: `dfs.coordinator.outbox.MAX_COMMIT_BATCH`, not the tail of another name (`user.dfs.version`).
DOTTED = re.compile(r"(?<![\w.])((?:dfs|storage_node|fuse_mount)(?:\.[A-Za-z_]\w*)+)")
CITE = re.compile(r'docs/([a-z_-]+\.md)(?:[,:]?\s*(?:#\s*)?(?:"([^"\n]+)"|§\s?(\d+(?:\.\d+)?)))?')


def _headings(page: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in page.read_text().splitlines()
            if line.startswith("#")]


def _broken(source: Path) -> list[str]:
    text = source.read_text()
    out = []
    for m in CITE.finditer(text):
        name, section, number = m.groups()
        page = ROOT / "docs" / name
        shown = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source.name
        where = f"{shown}:{text.count(chr(10), 0, m.start()) + 1}"
        if not page.exists():
            out.append(f"{where}: docs/{name} does not exist")
            continue
        titles = _headings(page)
        if section and not any(t.startswith(section) for t in titles):
            out.append(f"{where}: docs/{name} has no section {section!r}")
        if number and not any(re.match(rf"{re.escape(number)}[. ]", t) for t in titles):
            out.append(f"{where}: docs/{name} has no §{number}")
    return out


def _sources() -> list[Path]:
    return sorted(p for d in CODE for p in (ROOT / d).rglob("*.py")
                  if p != Path(__file__).resolve())  # its probes below name wrong places


def _resolves(dotted: str) -> bool:
    """The longest importable module prefix of `dotted`, then attributes, all exist."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_every_cited_page_and_section_exists() -> None:
    sources = _sources()
    assert len(sources) > 100
    broken = [b for source in sources for b in _broken(source)]
    assert not broken, "\n".join(broken)


def test_every_dotted_name_the_code_mentions_exists() -> None:
    missing = sorted({f"{source.relative_to(ROOT)}: {m.group(1)}"
                      for source in _sources()
                      for m in DOTTED.finditer(source.read_text())
                      if not _resolves(m.group(1).rstrip("."))})
    assert not missing, "\n".join(missing)
    assert _resolves("dfs.coordinator.outbox.MAX_COMMIT_BATCH")
    assert not _resolves("dfs.coordinator.delivery.MAX_COMMIT_BATCH")


def test_a_citation_of_a_missing_section_is_found(tmp_path: Path) -> None:
    """The check itself: a wrong page, a wrong title and a wrong number are each caught."""
    source = tmp_path / "probe.py"
    source.write_text('# docs/mount.md, "No such section"; docs/design.md §99; docs/nope.md\n'
                      '# docs/mount.md,\n# "Page cache" is there\n')
    found = _broken(source)
    assert [f.split(": ", 1)[1] for f in found] == [
        "docs/mount.md has no section 'No such section'", "docs/design.md has no §99",
        "docs/nope.md does not exist"]
