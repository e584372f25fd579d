"""Every example in README.md, docs/**/*.md (the documentation site's pages) and
examples/minild-euler/README.md runs as written.

Each fenced block that names a language is one test, with the id FILE:LINE of its opening fence:

- ```python blocks of a file share one namespace and run in order, so a block may use what an
  earlier one defined. A block whose first line names a file (``# my_sampler/__init__.py``) is a
  file of a plugin package: it runs as a module of its own, registered with
  ``minild.register_plugin`` when it holds ``@hookimpl`` functions, as installing it would do.
- ```bash blocks run under ``bash -euo pipefail`` in a copy of the repository's configs/ and
  examples/, with ``.venv`` and PATH pointing at this interpreter's environment, offline, on one
  thread, and ``MINILD_CACHE`` holding a quickly trained digit classifier.
- ```yaml blocks are pipeline configs, validated by ``minild.config.load_config``; ```toml blocks
  must parse.
- A fence without a language (a command synopsis, an error message) is not an example.
- The site's own syntax is no example either: a ``--8<-- "README.md:SECTION"`` line includes a
  README section (whose blocks run as the README's), and a ``::: minild.NAME`` line is an API
  reference entry (``mkdocs build --strict`` in tests/test_docs_site.py checks both).

Selecting one block (``-k README.md:42``) first runs the blocks above it in its file.
A block that should not run as written carries an HTML comment just above its fence:

    <!-- example: skip REASON -->                        not run; REASON is the skip reason
    <!-- example: quick `OLD` -> `NEW`, `OLD` -> `NEW` -->  run with these replacements

Quick replacements shrink budgets (steps, images) or swap a hub model for ``TINY_SDXL``, a tiny
random SDXL pipeline directory (a str in python blocks, ``$TINY_SDXL`` in bash); each ``OLD``
must occur in the block. Any other block with a language fails until it runs or gets a marker.
Blocks that fail for a known, tracked reason are listed in EXPECTED_FAILURES (strict xfail).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import minild
from minild.evaluation import metrics
from minild.config import ConfigError, load_config
from tests.test_metrics import quick_classifier_cache

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "examples" / "minild-euler" / "README.md"]

# (file, text that occurs in exactly one of its blocks) → why that block fails today.
EXPECTED_FAILURES: dict[tuple[str, str], str] = {}

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
MARKER = "<!-- example:"
QUICK_PAIR = re.compile(r"`([^`]*)`\s*->\s*`([^`]*)`")
MODULE_FILE = re.compile(r"#\s*([\w./-]+)\.py\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    source: str
    marker: str | None  # the text of the `<!-- example: ... -->` comment just above the fence

    @property
    def file(self) -> str:
        return self.path.relative_to(ROOT).as_posix() if self.path.is_relative_to(ROOT) else self.path.name

    @property
    def name(self) -> str:
        return f"{self.file}:{self.line}"


def parse_blocks(path: Path) -> tuple[list[Block], int]:
    """The fenced blocks of a Markdown file and how many lines outside them start an example marker."""
    lines = path.read_text().splitlines()
    blocks, markers, i = [], 0, 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            markers += lines[i].lstrip().startswith(MARKER)
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        if end is None:
            raise ValueError(f"{path}:{i + 1}: the fence opened here is never closed")
        body = [line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:end]]
        above = "\n".join(lines[:i]).rstrip()
        start, marker = above.rfind(MARKER), None
        starts_a_line = not above[:start].rpartition("\n")[2].strip()
        if start >= 0 and starts_a_line and above.endswith("-->") and "-->" not in above[start:-3]:
            marker = above[start + len(MARKER):-3].strip()
        blocks.append(Block(path, i + 1, opening["lang"].lower(), "\n".join(body) + "\n", marker))
        i = end + 1
    return blocks, markers


PARSED = {path: parse_blocks(path) for path in DOCS}
EXAMPLES = [block for blocks, _ in PARSED.values() for block in blocks if block.lang]


def expected_failure(block: Block) -> str | None:
    for (file, text), reason in EXPECTED_FAILURES.items():
        if block.file == file and text in block.source:
            return reason
    return None


def example_params():
    for block in EXAMPLES:
        reason = expected_failure(block)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        yield pytest.param(block, id=block.name, marks=marks)


# ---------------------------------------------------------------------------- markers


def parse_marker(block: Block) -> tuple[str, object]:
    """("run", None), ("skip", reason) or ("quick", [(old, new), ...]); a bad marker fails the test."""
    if block.marker is None:
        return "run", None
    verb, rest = [*block.marker.split(None, 1), ""][:2]
    if verb == "skip" and rest.strip():
        return "skip", " ".join(rest.split())
    if verb == "quick":
        pairs = QUICK_PAIR.findall(rest)
        if pairs and not QUICK_PAIR.sub("", rest).replace(",", "").strip():
            return "quick", pairs
    pytest.fail(f"{block.name}: cannot read the marker <!-- example: {block.marker} -->; write "
                "<!-- example: skip REASON --> or <!-- example: quick `OLD` -> `NEW`, ... -->")


def source_to_run(block: Block) -> str | None:
    """The block's text with its quick replacements applied; None for a skipped block."""
    verb, argument = parse_marker(block)
    if verb == "skip":
        return None
    source = block.source
    for old, new in argument or []:
        if old not in source:
            pytest.fail(f"{block.name}: the quick replacement `{old}` does not occur in the block; update its marker")
        source = source.replace(old, new)
    return source


# ---------------------------------------------------------------------------- running blocks


class FileRun:
    """The state one Markdown file's examples share: a python namespace, a working copy of the
    repository, the plugins its blocks registered, and which blocks have run."""

    def __init__(self, path: Path, workdir: Path):
        self.path, self.workdir = path, workdir
        self.namespace: dict = {"__name__": "__main__"}
        self.plugins: list[str] = []
        self.done: set[int] = set()
        for folder in ("configs", "examples"):
            shutil.copytree(ROOT / folder, workdir / folder, ignore=shutil.ignore_patterns("build", "*.egg-info"))
        (workdir / ".venv").symlink_to(Path(sys.executable).parent.parent, target_is_directory=True)

    def close(self):
        for name in self.plugins:
            minild.unregister_plugin(name)

    def run_through(self, block: Block, resources: Resources):
        """Run the blocks above ``block`` that have not run yet, then ``block`` itself."""
        for earlier in (b for b in EXAMPLES if b.path == self.path and b.line < block.line):
            if earlier.line in self.done:
                continue
            try:
                self.run(earlier, resources, above=True)
            except Exception as err:
                if expected_failure(earlier) is None:
                    pytest.fail(f"{earlier.name}, above {block.name}, fails: {type(err).__name__}: {err}")
        self.run(block, resources)

    def run(self, block: Block, resources: Resources, *, above: bool = False):
        self.done.add(block.line)
        source = source_to_run(block)
        if source is None:
            if not above:
                pytest.skip(f"{block.name}: {parse_marker(block)[1]}")
            return
        if block.lang in ("python", "py"):
            self.run_python(block, source, resources)
        elif block.lang in ("bash", "sh", "shell"):
            run_bash(block, source, self.workdir, resources)
        elif block.lang in ("yaml", "yml"):
            try:
                load_config(yaml.safe_load(source))
            except ConfigError as err:
                pytest.fail(f"{block.name}: {err} (a fragment of a config needs <!-- example: skip REASON -->)")
        elif block.lang == "toml":
            pytest.importorskip("tomllib").loads(source)
        else:
            pytest.fail(f"{block.name}: no runner for ```{block.lang} blocks; mark it <!-- example: skip REASON -->")

    def run_python(self, block: Block, source: str, resources: Resources):
        code = compile("\n" * block.line + source, str(block.path), "exec")  # tracebacks give Markdown lines
        if "TINY_SDXL" in source:
            self.namespace["TINY_SDXL"] = str(resources.tiny_sdxl())
        module_file = MODULE_FILE.match(source.partition("\n")[0])
        if module_file is None:
            exec(code, self.namespace)
            return
        module = types.ModuleType(module_file[1].removesuffix("/__init__").replace("/", "."))
        exec(code, module.__dict__)
        if any(hasattr(value, "minild_impl") for value in vars(module).values()):
            self.plugins.append(minild.register_plugin(module))


def run_bash(block: Block, source: str, workdir: Path, resources: Resources):
    env = {
        **os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        "MINILD_CACHE": str(resources.classifier_cache()),
    }
    if "TINY_SDXL" in source:
        env["TINY_SDXL"] = str(resources.tiny_sdxl())
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", source], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"{block.name} exited with {result.returncode}:\n{source}\n--- stdout\n{result.stdout[-3000:]}"
                    f"\n--- stderr\n{result.stderr[-3000:]}", pytrace=False)


class Resources:
    """What examples need beyond the repository, built on first use and kept for the session."""

    def __init__(self, request, tmp_path_factory):
        self.request, self.tmp_path_factory = request, tmp_path_factory
        self._classifier_cache = None

    def tiny_sdxl(self) -> Path:
        return self.request.getfixturevalue("tiny_sdxl_dir")

    def classifier_cache(self) -> Path:
        """A MINILD_CACHE whose digit classifier is the quick one (seconds to train) recorded
        under the default recipe, so that `minild experiment` uses it instead of training
        the full one for a minute."""
        if self._classifier_cache is None:
            cache = self.tmp_path_factory.mktemp("docs_minild_cache")
            shutil.copytree(quick_classifier_cache(self.tmp_path_factory), cache, dirs_exist_ok=True)
            info_path = cache / f"{metrics.CLASSIFIER_NAME}.json"
            info = json.loads(info_path.read_text())
            info["recipe"]["train_steps"] = metrics.TRAIN_STEPS
            info_path.write_text(json.dumps(info))
            self._classifier_cache = cache
        return self._classifier_cache


@pytest.fixture(scope="module")
def file_runs(tmp_path_factory):
    runs: dict[Path, FileRun] = {}
    yield runs
    for run in runs.values():
        run.close()


@pytest.fixture(scope="module")
def resources(request, tmp_path_factory):
    return Resources(request, tmp_path_factory)


@pytest.mark.usefixtures("one_thread", "offline")
@pytest.mark.parametrize("block", list(example_params()))
def test_example_runs(block, file_runs, resources, tmp_path_factory, monkeypatch):
    for path in [path for path in file_runs if path != block.path]:  # one file's plugins at a time
        file_runs.pop(path).close()
    if block.path not in file_runs:
        file_runs[block.path] = FileRun(block.path, tmp_path_factory.mktemp(block.path.stem))
    run = file_runs[block.path]
    monkeypatch.chdir(run.workdir)
    monkeypatch.setenv("MINILD_CACHE", str(resources.classifier_cache()))
    run.run_through(block, resources)


# ---------------------------------------------------------------------------- the inventory


def test_the_readme_and_the_guides_have_examples():
    found = {path.relative_to(ROOT).as_posix(): sum(block.path == path for block in EXAMPLES) for path in DOCS}
    assert found["README.md"] >= 3 and found["docs/python-api.md"] >= 2 and found["docs/plugins.md"] >= 5, found


def test_every_marker_sits_just_above_a_fence():
    for path, (blocks, markers) in PARSED.items():
        assert markers == sum(block.marker is not None for block in blocks), (
            f"{path.name}: an `{MARKER} ... -->` comment must be the last thing above a fence")


def test_expected_failures_each_name_one_block():
    for (file, text), reason in EXPECTED_FAILURES.items():
        matches = [block.name for block in EXAMPLES if block.file == file and text in block.source]
        assert len(matches) == 1, f"{reason}: {text!r} matches {matches} in {file}"


# ---------------------------------------------------------------------------- the markers themselves

MARKED = """\
<!-- example: skip (needs a GPU) -->
```python
import this_needs_a_gpu
```

<!-- example: quick `--max-steps 2000` -> `--max-steps 2`,
     `--per-class 20` -> `--per-class 1` -->

```bash
minild train configs/digits_ddpm.yaml --max-steps 2000 && minild experiment cfg-digits runs/x --per-class 20
```

<!-- example: skip (a marker that is not just above a fence) -->
Some prose.

```
minild train CONFIG [--out RUN_DIR]
```

```json
{"a": 1}
```
"""


def test_markers_are_read_from_the_comment_just_above_a_fence(tmp_path):
    (tmp_path / "guide.md").write_text(MARKED)
    blocks, markers = parse_blocks(tmp_path / "guide.md")
    assert [(block.line, block.lang) for block in blocks] == [(2, "python"), (9, "bash"), (16, ""), (20, "json")]
    assert parse_marker(blocks[0]) == ("skip", "(needs a GPU)")
    assert source_to_run(blocks[1]) == ("minild train configs/digits_ddpm.yaml --max-steps 2 && "
                                        "minild experiment cfg-digits runs/x --per-class 1\n")
    assert markers == 3 and sum(block.marker is not None for block in blocks) == 2  # the orphan is counted


@pytest.mark.parametrize(("marker", "message"), [
    (None, "no runner for ```json blocks"),
    ("skipp (typo)", "cannot read the marker"),
    ("quick `{\"b\": 1}` -> `{}`", "does not occur in the block"),
    ("quick `{\"a\": 1}` => `{}`", "cannot read the marker"),
])
def test_a_block_that_neither_runs_nor_is_marked_skip_fails(marker, message, tmp_path):
    block = Block(tmp_path / "guide.md", 20, "json", '{"a": 1}\n', marker)
    run = FileRun.__new__(FileRun)
    run.done = set()
    with pytest.raises(pytest.fail.Exception, match=re.escape(message)):
        run.run(block, resources=None)


SITE_SYNTAX = """\
--8<-- "README.md:commands"

::: minild.create

!!! note "Inside an admonition"
    <!-- example: quick `max_steps=2000` -> `max_steps=2` -->
    ```python
    pipe.train(max_steps=2000)
    ```
"""


def test_site_syntax_is_no_example_and_hides_none(tmp_path):
    (tmp_path / "page.md").write_text(SITE_SYNTAX)
    blocks, markers = parse_blocks(tmp_path / "page.md")
    assert [(block.line, block.lang, block.source) for block in blocks] == [(7, "python", "pipe.train(max_steps=2000)\n")]
    assert markers == 1 and source_to_run(blocks[0]) == "pipe.train(max_steps=2)\n"
