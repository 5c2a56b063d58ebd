"""The README's Python code runs as written.

Every ```python block of README.md is executed in order in one namespace (as a reader would paste
them into one notebook), in a temporary working directory. The fast test swaps the one
model-loading line's shipped model for a tiny random model saved as a model directory (the only
change: every other line runs as written, the MiniLM embedder and ScaNN/exact index included);
the slow test (`make test-slow`) runs the blocks exactly as written, with the shipped
smollm2-135m-memory. Client code that needs a running server (`m3jax serve`) is fenced ```py and
is not run here (tests/test_serve.py runs the same calls against a server).
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHIPPED = 'm3jax.load_model("smollm2-135m-memory")'


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of a Markdown text, in order."""
    return [m.group(1) for m in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S)]


def _run(blocks: list[str], cwd: Path, monkeypatch) -> tuple[dict, str]:
    monkeypatch.chdir(cwd)
    ns: dict = {"__name__": "__readme__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for i, code in enumerate(blocks):
            exec(compile(code, f"README.md python block {i + 1}", "exec"), ns)  # noqa: S102 - our own README
    return ns, out.getvalue()


def _check(ns: dict, printed: str) -> None:
    """What the README's blocks claim: an answer, the references it read (titles of the documents
    given), the knowledge update, the batched generation and the model-level calls."""
    titles = {t for _, _, t in ns["documents"]}
    refs = [line for line in printed.splitlines() if line.startswith("#")]
    assert refs and all(line.split(": ", 1)[0].split(" ", 1)[1] in titles for line in refs), printed
    assert "3 documents" in printed  # 3 built, 1 added, 1 deleted
    assert len(ns["results"]) == 2 and all(r.texts[0] is not None for r in ns["results"])
    kb = ns["kb"]
    live = {r.doc_id for r in kb.documents()}
    assert live == {1, 3, 4}
    cfg = ns["cfg"]
    assert ns["logits"].shape == (2, ns["tokens"].shape[1], cfg.vocab_size)
    assert ns["logits_mem"].shape == ns["logits"].shape
    assert float(abs(ns["logits_mem"] - ns["logits"]).max()) > 0  # the memories were read
    assert ns["cfg_hf"] == cfg and ns["chat"].texts[0] is not None  # export round trip; a chat in RAG mode


def test_readme_has_the_blocks_this_test_runs():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3
    assert sum(SHIPPED in b for b in blocks) == 1, "one model-loading line, in the first block"
    assert SHIPPED in blocks[0]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random `tiny` model with a BPE trained on the README's documents, as a model directory."""
    import jax

    from m3jax import model as M
    from m3jax.config import preset
    from m3jax.convert import save_checkpoint_dir
    from m3jax.tokenizer import train_bpe

    text = README.read_text()
    tok = train_bpe([text], vocab_size=400)
    cfg = preset("tiny", max_len=1024, vocab_size=tok.vocab_size, reference_prefix=tok.reference_prefix(),
                 bos_id=tok.bos_id,
                 eos_id=tok.eos_id, pad_id=tok.pad_id)
    d = str(tmp_path_factory.mktemp("readme") / "tiny_model")
    save_checkpoint_dir(d, cfg, M.init(cfg, jax.random.PRNGKey(0)), tok)
    return d


def test_readme_python_runs_with_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    blocks[0] = blocks[0].replace(SHIPPED, f"m3jax.load_model({tiny_model_dir!r})")
    ns, printed = _run(blocks, tmp_path, monkeypatch)
    _check(ns, printed)


@pytest.mark.slow
def test_readme_python_runs_as_written(tmp_path, monkeypatch):
    ns, printed = _run(python_blocks(README.read_text()), tmp_path, monkeypatch)
    _check(ns, printed)
    assert ns["cfg"].name and ns["cfg"].num_layers == 30  # the shipped SmolLM2-135M
