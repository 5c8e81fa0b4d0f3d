"""The documentation site: `mkdocs build --strict` passes and makes every page, offline.

One strict build (about 15 s of CPU) into a temporary folder, with two tutorial notebooks made
here, so the test does not depend on which tutorials exist. The repository's own `tutorials/` is
built by the docs step of CI. Skipped when the `docs` extra is not installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

for _requirement in ("mkdocs", "material", "mkdocstrings_handlers.python", "mkdocs_jupyter"):
    pytest.importorskip(_requirement, reason="the docs extra is not installed (pip install -e '.[docs]')")

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

# A cell whose stored output differs from what running it would print: the page shows which one ran.
STORED_OUTPUT = "stored-output-42"
FRESH_OUTPUT = "fresh" + "-run-output"


def load_hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_docs_hooks_under_test", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_notebook(path: Path, title: str, cells: list[dict[str, Any]]) -> None:
    """A minimal nbformat-4 notebook: a Markdown title cell, then `cells`."""
    heading = {"cell_type": "markdown", "metadata": {}, "source": [f"# {title}\n", "\n", "Some prose."]}
    notebook = {
        "cells": [heading, *cells],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(notebook))


def code_cell(source: str, stdout: str) -> dict[str, Any]:
    return {
        "cell_type": "code",
        "execution_count": 1,
        "metadata": {},
        "source": [source],
        "outputs": [{"output_type": "stream", "name": "stdout", "text": [stdout]}],
    }


def digests(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs_site")
    tutorials = root / "tutorials"
    tutorials.mkdir()
    write_notebook(
        tutorials / "01_first.ipynb",
        "First tutorial",
        # Run, it would print FRESH_OUTPUT, which its source does not contain as one string.
        [code_cell("print('fresh' + '-run-output')", STORED_OUTPUT + "\n")],
    )
    write_notebook(tutorials / "02_second.ipynb", "Second tutorial", [code_cell("1 + 1", "2\n")])
    watched = [DOCS / name for name in load_hooks().GENERATED_PAGES]
    before = digests(watched)
    out = root / "site"
    env = {**os.environ, "SAE_LENS_DOCS_TUTORIALS": str(tutorials), "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout}\n{build.stderr}"
    # The generated pages are made in memory: a build leaves docs/ as it found it.
    assert digests(watched) == before
    assert not (DOCS / "api").exists() and not (REPO / ".cache" / "mkdocs-jupyter").exists()
    return out


def page(site: Path, path: str) -> str:
    file = site / path / "index.html" if path else site / "index.html"
    assert file.is_file(), f"no page {path or 'index'} in the built site"
    return file.read_text()


def article(html: str) -> str:
    """The page's main content, without the nav and the search index."""
    return html[html.index("<article") : html.index("</article>")]


MAIN_PAGES = (
    *("", "getting_started", "training", "configuration", "architectures", "loading", "pretrained_saes"),
    *("splicing", "metrics", "dashboards", "benchmarks", "caching", "tutorials", "api"),
)


@pytest.mark.parametrize("path", MAIN_PAGES)
def test_every_main_page_is_built(site: Path, path: str) -> None:
    html = page(site, path)
    assert "<h1" in article(html)


def test_api_pages_document_their_modules(site: Path) -> None:
    pages = load_hooks().present_api_pages()
    assert {p.slug for p, _ in pages} >= {"sae", "config", "training", "runner", "evals", "loading"}
    for api_page, modules in pages:
        html = article(page(site, f"api/{api_page.slug}"))
        for module in modules:
            assert f'id="{module}"' in html, f"{module} is not rendered on api/{api_page.slug}"
    sae = article(page(site, "api/sae"))
    assert 'id="sae_lens.saes.sae.SparseAutoencoder"' in sae
    assert 'id="sae_lens.saes.sae.SparseAutoencoder.encode"' in sae


def test_api_index_links_every_top_level_export(site: Path) -> None:
    html = article(page(site, "api"))
    for name in ("SparseAutoencoder", "LanguageModelSAERunnerConfig", "SAETrainer", "ActivationsStore"):
        assert re.search(rf'href="[^"]+#sae_lens\.[\w.]*{name}"', html), f"{name} has no link"


def test_generated_pages_have_their_tables(site: Path) -> None:
    # libyaml's safe loader when present: the registry is ~1 MB (2.5 s with the pure-Python one).
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    registry = yaml.load((REPO / "sae_lens" / "pretrained_saes.yaml").read_text(), Loader=loader)
    releases = list(registry)
    html = article(page(site, "pretrained_saes"))
    # The releases table links each release to its section, and every section exists.
    for release in (releases[0], releases[-1]):
        assert f'href="#{release}"' in html and f'id="{release}"' in html
    assert html.count("<table>") == len(releases) + 1
    configuration = article(page(site, "configuration"))
    for field in ("model_name", "hook_point", "total_training_tokens", "train_batch_size"):
        assert f"<code>{field}</code>" in configuration


def test_notebooks_are_rendered_from_stored_outputs(site: Path) -> None:
    first = article(page(site, "tutorials/01_first"))
    assert STORED_OUTPUT in first
    assert FRESH_OUTPUT not in first
    assert "First tutorial" in first
    index = article(page(site, "tutorials"))
    assert 'href="01_first/"' in index and 'href="02_second/"' in index
    # Both notebooks are in the nav, by their titles.
    nav = page(site, "")
    assert "First tutorial" in nav and "Second tutorial" in nav


def test_site_needs_no_network_to_view(site: Path) -> None:
    html = page(site, "")
    for host in ("fonts.googleapis.com", "fonts.gstatic.com"):
        assert host not in html


# -- the hook's pieces, without a build -----------------------------------------------------------


def test_no_notebooks_gives_an_index_page_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hooks = load_hooks()
    (tmp_path / "tutorials").mkdir()
    monkeypatch.setenv("SAE_LENS_DOCS_TUTORIALS", str(tmp_path / "tutorials"))
    assert hooks.notebooks() == []
    assert "No tutorial notebooks yet." in hooks.tutorials_index_markdown([])
    nav = hooks._fill_nav([{"Tutorials": "tutorials/index.md"}], api=[], tutorials=["tutorials/index.md"])
    assert nav == [{"Tutorials": ["tutorials/index.md"]}]


def test_tutorials_override_must_be_a_tutorials_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAE_LENS_DOCS_TUTORIALS", str(tmp_path))
    with pytest.raises(ValueError, match="called `tutorials`"):
        load_hooks().tutorials_folder()


def test_missing_modules_and_optional_pages_are_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    hooks = load_hooks()
    pages = (
        hooks.ApiPage("mixed", "Mixed", "", ("sae_lens.errors", "sae_lens.not_written_yet")),
        hooks.ApiPage("absent", "Absent", "", ("sae_lens.not_written_either",)),
    )
    monkeypatch.setattr(hooks, "API_PAGES", pages)
    present = hooks.present_api_pages()
    assert [(p.slug, modules) for p, modules in present] == [("mixed", ["sae_lens.errors"])]
    monkeypatch.setattr(hooks, "OPTIONAL_PAGES", {"never_written.md"})
    nav = hooks._fill_nav(
        [{"Guide": [{"Gone": "never_written.md"}, {"Kept": "training.md"}]}, {"API": "api/index.md"}],
        api=["api/index.md", {"Mixed": "api/mixed.md"}],
        tutorials=[],
    )
    assert nav == [{"Guide": [{"Kept": "training.md"}]}, {"API": ["api/index.md", {"Mixed": "api/mixed.md"}]}]


def test_generated_page_never_writes_into_docs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A generator without render(): main() writes beside its __file__, which the hook redirects.
    hooks = load_hooks()
    script = tmp_path / "gen_demo.py"
    script.write_text(
        "from pathlib import Path\n"
        "def main():\n"
        "    Path(__file__).with_name('demo.md').write_text('# Demo\\n')\n"
    )
    monkeypatch.setattr(hooks, "DOCS", tmp_path)
    assert hooks.generated_page("gen_demo.py") == "# Demo\n"
    assert not (tmp_path / "demo.md").exists()
    assert hooks.generated_page("gen_missing.py") is None
