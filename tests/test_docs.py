"""README.md and docs/*.md: every relative link resolves to a file of the repository (and, with a ``#fragment``
into a Markdown file, to one of its headings), so moving or renaming a file or a section cannot leave dead links."""

from __future__ import annotations

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))

LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)


def _prose(text: str) -> str:
    """The text without code: fenced blocks dropped, each code span reduced to ``code`` (a link's text is often
    one, ``[`file.py`](file.py)``, while ``[x](y)`` inside a span is no link)."""
    return CODE_SPAN.sub("`code`", FENCE.sub("", text))


def links(text: str) -> list[str]:
    return LINK.findall(_prose(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", open(path, encoding="utf-8").read()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_the_docs_exist():
    for name in ("usage", "interop", "offloading", "lm-eval", "configuration", "architecture", "results"):
        assert f"docs/{name}.md" in DOCS


def test_link_parsing():
    text = "[a](x.md) [`b`](../y.py#L1) `[c](in-code-span)` [d](https://e.org)\n```\n[f](in-fence.md)\n```\n"
    assert links(text) == ["x.md", "../y.py#L1", "https://e.org"]
    assert slug("Offloading settings (`additional_config` keys)") == "offloading-settings-additional_config-keys"
    assert slug("`haq stats`") == "haq-stats"


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    path = os.path.join(REPO, doc)
    bad = []
    for target in links(open(path, encoding="utf-8").read()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, fragment = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(resolved):
            bad.append(f"{target}: no such file")
        elif not resolved.startswith(REPO + os.sep):
            bad.append(f"{target}: outside the repository")
        elif fragment and resolved.endswith(".md") and fragment not in anchors(resolved):
            bad.append(f"{target}: no heading #{fragment} in {os.path.relpath(resolved, REPO)}")
    assert not bad, f"{doc}: {bad}"
