"""mkdocs hook: links from a page to repository files outside docs/ (``../minild/hookspecs.py``).

The Markdown files are read on GitHub too, where such relative links work; the built site holds
only docs/. This hook checks that every such target exists in the repository (a missing one is a
warning, so ``mkdocs build --strict`` fails) and points the link at the file in ``repo_url``, or,
without a ``repo_url``, keeps the link's text and drops the link.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from mkdocs.plugins import get_plugin_logger

log = get_plugin_logger("repo_links")

LINK = re.compile(r"(?<!!)\[(?P<text>[^\]\n]*)\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^\s*(```+|~~~+)")


def outside_docs(target: str, page_dir: PurePosixPath) -> PurePosixPath | None:
    """The repository path a relative link reaches when it leaves docs/, else None."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or target.startswith(("/", "#")):
        return None
    resolved: list[str] = []
    for part in (page_dir / parts.path).parts:
        if part == "..":
            if not resolved:
                return None  # above the repository: not ours to judge
            resolved.pop()
        elif part != ".":
            resolved.append(part)
    if resolved and resolved[0] == "docs":
        return None
    return PurePosixPath(*resolved)


def rewrite(markdown: str, page_path: str, repo_root: Path, repo_url: str | None) -> str:
    page_dir = PurePosixPath("docs", page_path).parent
    lines, fence = markdown.split("\n"), None
    for i, line in enumerate(lines):
        opening = FENCE.match(line)
        if opening and (fence is None or opening[1].startswith(fence)):
            fence = opening[1] if fence is None else None
            continue
        if fence is not None:
            continue

        def replace(match: re.Match) -> str:
            path = outside_docs(match["target"], page_dir)
            if path is None:
                return match[0]
            if not (repo_root / path).exists():
                log.warning("%s links to %r, but %s is not in the repository", page_path, match["target"], path)
                return match[0]
            if repo_url is None:
                return match["text"]
            kind = "tree" if (repo_root / path).is_dir() else "blob"
            fragment = urlsplit(match["target"]).fragment
            url = f"{repo_url.rstrip('/')}/{kind}/HEAD/{path}" + (f"#{fragment}" if fragment else "")
            return f"[{match['text']}]({url})"

        lines[i] = LINK.sub(replace, line)
    return "\n".join(lines)


def on_page_markdown(markdown, page, config, files):
    repo_root = Path(config["config_file_path"]).parent
    return rewrite(markdown, page.file.src_uri, repo_root, config.get("repo_url"))
