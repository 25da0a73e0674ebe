"""mkdocs hook: links from a page to repository files outside docs/ (examples, deploy, benchmarks).

mkdocs only knows the files under docs/, so ``[server](../examples/serving/server.py)`` would be a broken link.
This hook checks that the target exists in the repository (a missing one fails the build, like any broken link
under ``--strict``) and rewrites the link to ``repo_url/blob/main/PATH`` when ``repo_url`` is configured, or to
the repository path in code formatting otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.exceptions import PluginError

_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\((\.\./[^)#\s]+)(#[^)\s]*)?\)")


def on_page_markdown(markdown, page, config, files):
    docs = Path(config["docs_dir"]).resolve()
    root = docs.parent
    src_dir = (docs / page.file.src_path).parent
    repo_url = (config.get("repo_url") or "").rstrip("/")

    def rewrite(m: re.Match) -> str:
        text, target, anchor = m.group(1), m.group(2), m.group(3) or ""
        path = (src_dir / target).resolve()
        if docs in path.parents or path == docs:
            return m.group(0)  # a page of the site: mkdocs checks it
        if root not in path.parents or not path.exists():
            raise PluginError(f"{page.file.src_path}: link to {target!r}, which is not a file of the repository")
        rel = path.relative_to(root).as_posix()
        if repo_url:
            kind = "tree" if path.is_dir() else "blob"
            return f"[{text}]({repo_url}/{kind}/main/{rel}{anchor})"
        return text if text.strip("`") == rel else f"{text} (`{rel}`)"

    return _LINK.sub(rewrite, markdown)
