"""The documentation site builds with ``mkdocs build --strict``: every page is in the nav, every link
and anchor resolves, every API reference name is found, and links out of docs/ reach real files."""

from __future__ import annotations

import html
import importlib.util
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason='the docs site needs pip install -e ".[docs]"')

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")


def repo_links_hook():
    spec = importlib.util.spec_from_file_location("repo_links", ROOT / "docs" / "hooks" / "repo_links.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return out


def test_the_site_builds_strict_with_every_page(site):
    pages = {path.relative_to(ROOT / "docs").with_suffix("").as_posix() for path in (ROOT / "docs").rglob("*.md")
             if "hooks" not in path.parts}
    built = {path.parent.relative_to(site).as_posix() for path in site.rglob("index.html")}
    assert {page for page in pages if page != "index"} <= built
    assert not (site / "hooks").exists()


def test_the_reference_documents_the_public_names(site):
    html = (site / "reference" / "index.html").read_text()
    for name in ("minild.Pipeline", "minild.Pipeline.generate", "minild.create", "minild.available",
                 "minild.register_plugin", "minild.NoiseSchedule", "minild.hookspecs.register_samplers",
                 "minild.testing.SamplerConformance", "minild.testing.GuidanceConformance"):
        assert f'id="{name}"' in html, name


def test_the_home_page_includes_the_readme_commands(site):
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("python3 -m venv") and "[test]" in line)
    text = html.unescape(re.sub(r"<[^>]+>", "", (site / "index.html").read_text()))  # code is split into spans
    assert command in text and "minild experiment cfg-digits runs/digits" in text and "--8<--" not in text


def test_the_readme_links_reach_files():
    for target in LINK.findall((ROOT / "README.md").read_text()):
        if "://" not in target:
            assert (ROOT / target.partition("#")[0]).exists(), target


def test_a_link_out_of_docs_points_into_the_repository(tmp_path):
    hook = repo_links_hook()
    (tmp_path / "docs").mkdir()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "README.md").write_text("# numbers\n")
    page = "See [the numbers](../benchmarks/README.md#cpu), [a page](cli.md) and [a site](https://example.org).\n"
    assert hook.rewrite(page, "guide.md", tmp_path, None) == (
        "See the numbers, [a page](cli.md) and [a site](https://example.org).\n")
    assert hook.rewrite(page, "guide.md", tmp_path, "https://github.com/o/minild/") == (
        "See [the numbers](https://github.com/o/minild/blob/HEAD/benchmarks/README.md#cpu), [a page](cli.md) and "
        "[a site](https://example.org).\n")
    assert "tree/HEAD/benchmarks" in hook.rewrite("[all](../benchmarks)", "guide.md", tmp_path, "https://h/r")
    fenced = "```python\nx = [a](../benchmarks/README.md)\n```\n"
    assert hook.rewrite(fenced, "guide.md", tmp_path, None) == fenced


def test_a_link_out_of_docs_to_a_missing_file_is_a_warning(tmp_path, caplog):
    hook = repo_links_hook()
    with caplog.at_level(logging.WARNING):
        text = hook.rewrite("[gone](../benchmarks/gone.md)", "guide.md", tmp_path, None)
    assert text == "[gone](../benchmarks/gone.md)"
    assert "guide.md links to '../benchmarks/gone.md', but benchmarks/gone.md is not in the repository" in caplog.text
