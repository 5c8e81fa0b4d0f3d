"""The tutorial notebooks: committed without outputs, built from `tutorials/src/`, and run top to bottom.

Each notebook runs in a fresh `python3` kernel (nbclient + ipykernel; jupyter_client starts this
interpreter for the kernel spec's `python`), offline, in a temporary working folder, and must finish
without a cell error. The executed copy is written to `build/tutorials/<name>.ipynb` (or under
`$SAE_LENS_TUTORIALS_BUILD`) for the documentation site to render. The CPU time of each kernel is
printed (`pytest -s`) and stored in the executed copy's metadata (`sae_lens.cpu_seconds`).

    pytest -q tests/test_tutorials.py                        # all five, a few minutes on 2 cores
    pytest -q tests/test_tutorials.py -k 03_training         # one
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import resource
import time
from pathlib import Path
from types import ModuleType

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = REPO / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
EXPECTED = [
    "01_loading_and_analysing_a_pretrained_sae",
    "02_logit_lens",
    "03_training_an_sae",
    "04_splicing_with_hooked_sae_transformer",
    "05_evaluating_saes",
]
COLAB = "https://colab.research.google.com/github/sae-lens-dev/sae_lens/blob/main/tutorials/{}.ipynb"

# One notebook's limit; together they take a few minutes of CPU (see tutorials/README.md).
CELL_TIMEOUT_S = 600

# The kernel inherits the environment: no Hub and no wandb upload (tests/conftest.py also points the
# sae_lens, datasets and wandb caches at the session's temporary folder, built once for all five).
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "2",
}


def load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_tutorials_build", TUTORIALS / "_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_folder() -> Path:
    return Path(os.environ.get("SAE_LENS_TUTORIALS_BUILD", REPO / "build")) / "tutorials"


def test_the_five_tutorials_exist() -> None:
    assert [path.stem for path in NOTEBOOKS] == EXPECTED


def test_notebooks_are_built_from_their_sources() -> None:
    builder = load_builder()
    assert [p.stem for p in builder.sources()] == EXPECTED
    stale = builder.stale_notebooks()
    assert not stale, f"rebuild with `python tutorials/_build.py`: {[p.name for p in stale]}"


def test_build_round_trip_keeps_markdown_and_code(tmp_path: Path) -> None:
    builder = load_builder()
    source = tmp_path / "09_example.py"
    source.write_text(
        "# ruff: noqa: E402\n\n# %% [markdown]\n# # Title\n#\n#     indented code\n\n"
        "# %%\nx = 1\n\nprint(x)\n\n\n# %%\ny = 2\n"
    )
    cells = builder.build_notebook(source)["cells"]
    assert [(c["cell_type"], "".join(c["source"])) for c in cells] == [
        ("markdown", "# Title\n\n    indented code"),
        ("code", "x = 1\n\nprint(x)"),
        ("code", "y = 2"),
    ]
    assert [c["id"] for c in cells] == ["09-000", "09-001", "09-002"]
    source.write_text("# %% [markdown]\nnot a comment\n")
    with pytest.raises(ValueError, match="must be a comment"):
        builder.build_notebook(source)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_clean(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "a tutorial without code"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, "strip the outputs before committing"
    first = notebook.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), "the first cell is the title"
    assert f"]({COLAB.format(path.stem)})" in first.source, "the Colab badge links to this notebook"
    assert notebook.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_offline_top_to_bottom(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MPLBACKEND", "Agg")  # where matplotlib is installed: no window
    # The notebooks write under tempfile.mkdtemp(): inside this test's folder, which pytest prunes.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    notebook = nbformat.read(path, as_version=4)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    try:
        client.execute()
    finally:
        # The kernel has exited and been reaped here, so its CPU time is in RUSAGE_CHILDREN.
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        wall = time.perf_counter() - started
        notebook.metadata["sae_lens"] = {"cpu_seconds": round(cpu, 1), "wall_seconds": round(wall, 1)}
        out = build_folder()
        out.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, out / path.name)
        print(f"\n{path.name}: {cpu:.0f} s CPU (user+sys), {wall:.0f} s wall -> {out / path.name}")
    assert not list(workdir.iterdir()), "a notebook wrote into its working folder; use a temporary folder"
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors  # nbclient raises on the first error already; this guards allow_errors changes
    text = json.dumps([cell.get("outputs", []) for cell in notebook.cells])
    assert not re.search(r"Traceback \(most recent call last\)", text), "a cell printed a traceback"
