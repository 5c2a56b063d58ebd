"""`m3jax train`: warmup then continual on a small JSONL corpus, the model directory it writes,
resuming after kill -9, and its one-line errors.

Runs use the `tiny` preset on one device (`--devices 1`) with a few steps of 4 x 64 tokens; the
warmup run is shared by the tests of this module (it is also the uninterrupted run that a killed
and resumed run must reproduce).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from m3jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega river mountain city music science history").split()
STEPS = 6


def _write_corpus(path: str, n_docs: int = 36) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            text = " ".join(rng.choice(WORDS, size=int(rng.integers(20, 45)))) + "."
            f.write(json.dumps({"doc_id": 100 + i, "title": f"Doc {i}", "text": text}) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("corpus") / "docs.jsonl")
    _write_corpus(path)
    return path


def _warmup_args(corpus: str, out: str) -> list[str]:
    return ["train", "--stage", "warmup", "--preset", "tiny", "--corpus", corpus, "--out", out,
            "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2", "--devices", "1",
            "--train-set", "checkpoint_every=2", "--train-set", "log_every=1", "--no-progress"]


@pytest.fixture(scope="module")
def warmup(corpus, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("runs") / "warmup")
    assert cli.main(_warmup_args(corpus, out)) == 0
    return out


def _params(model_dir: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(os.path.join(model_dir, "params.safetensors"))


def _steps(out: str) -> list[int]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def _mtimes(*dirs: str) -> dict[str, int]:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for top in dirs for d, _, files in os.walk(top) for f in files}


def test_warmup_then_continual_writes_a_usable_model_dir(warmup, corpus, tmp_path, capsys):
    from m3jax import load_model

    for f in ("metrics.jsonl", "loss.png", "checkpoints", "model/config.json", "model/params.safetensors",
              "model/tokenizer/tokenizer.json", "tokenizer/tokenizer.json", "data"):
        assert os.path.exists(os.path.join(warmup, f)), f
    assert _steps(warmup) == list(range(1, STEPS + 1))
    cfg1, _, tok1 = load_model(os.path.join(warmup, "model"))
    assert cfg1.vocab_size == tok1.vocab_size and cfg1.reference_prefix == tok1.reference_prefix()

    # stage 2 from the warmup run's directory: pairs the corpus with its references itself
    out = str(tmp_path / "continual")
    args = ["train", "--stage", "continual", "--init", warmup, "--corpus", corpus, "--out", out, "--steps", "3",
            "--batch-size", "4", "--seq-len", "64", "--devices", "1", "--train-set", "log_every=1", "--no-progress"]
    capsys.readouterr()
    assert cli.main(args) == 0
    log = capsys.readouterr().out
    summary = json.loads([line for line in log.splitlines() if line.startswith("{")][-1])
    assert summary["stage"] == "continual" and summary["model"] == os.path.join(out, "model")
    assert "pairs:" in log and "references" in log
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["stage"] for r in recs] == ["continual"] * 3 and all(np.isfinite(r["loss"]) for r in recs)
    cfg2, params2, tok2 = load_model(os.path.join(out, "model"))
    assert cfg2 == cfg1 and tok2.vocab_size == tok1.vocab_size
    p1, p2 = _params(os.path.join(warmup, "model")), _params(os.path.join(out, "model"))
    assert p1.keys() == p2.keys() and any(not np.array_equal(p1[k], p2[k]) for k in p1)
    pairs_dir = os.path.join(out, "data", "m3jax_pairs")
    assert any(f.startswith("pairs-") for f in os.listdir(pairs_dir))

    # the model directory is what `m3jax generate --model` reads
    assert cli.main(["generate", "--model", os.path.join(out, "model"), "--prompt", "alpha beta", "--mode", "none",
                     "--max-new-tokens", "4"]) == 0
    got = capsys.readouterr()
    assert got.out.startswith("alpha beta") and "[none: " in got.err

    # the same command again: nothing is prepared or paired anew, the model stays the same
    before = _mtimes(os.path.join(out, "data"))
    assert cli.main(args) == 0
    assert "resuming continual from step 3" in capsys.readouterr().out
    assert _mtimes(os.path.join(out, "data")) == before
    p3 = _params(os.path.join(out, "model"))
    assert all(np.array_equal(p2[k], p3[k]) for k in p2)


_KILLABLE = """
import sys, time
import jax
jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
from m3jax.train import loop
save = loop._save
def save_then_stall(*args, **kwargs):  # the test kills the process while it stalls here
    save(*args, **kwargs)
    time.sleep(600)
loop._save = save_then_stall
from m3jax import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_killed_run_resumes_to_the_params_of_an_uninterrupted_run(warmup, corpus, tmp_path, capsys):
    out = str(tmp_path / "killed")
    args = _warmup_args(corpus, out)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-c", _KILLABLE] + args, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    ckpt = os.path.join(out, "checkpoints", "2")
    deadline = time.time() + 300
    try:
        while not os.path.isdir(ckpt) and p.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert os.path.isdir(ckpt), f"no checkpoint (rc {p.poll()}):\n{p.stdout.read() if p.poll() is not None else ''}"
        assert p.poll() is None, "the run ended before it was killed"
        time.sleep(0.5)
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "model"))
    prepared = _mtimes(os.path.join(out, "data"), os.path.join(out, "tokenizer"))

    capsys.readouterr()
    assert cli.main(args) == 0  # the same command again: resumes at step 2
    assert "resuming warmup from step 2" in capsys.readouterr().out
    assert _mtimes(os.path.join(out, "data"), os.path.join(out, "tokenizer")) == prepared
    assert _steps(out) == list(range(1, STEPS + 1))
    want, got = _params(os.path.join(warmup, "model")), _params(os.path.join(out, "model"))
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _error(args: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    msg = str(e.value.code)
    assert msg.startswith("m3jax train: error: ") and "\n" not in msg, msg
    return msg


def test_errors_are_one_line(warmup, corpus, tmp_path):
    base = ["train", "--steps", "2", "--batch-size", "4", "--seq-len", "64", "--devices", "1", "--no-progress"]
    missing = str(tmp_path / "missing.jsonl")
    assert "no such file" in _error(base + ["--stage", "warmup", "--preset", "tiny", "--corpus", missing,
                                            "--out", str(tmp_path / "a")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": unquoted}\n')
    assert f"{bad}:3: not valid JSON" in _error(base + ["--stage", "warmup", "--preset", "tiny", "--corpus",
                                                        str(bad), "--out", str(tmp_path / "b")])
    os.makedirs(tmp_path / "not_a_model")
    assert "is not a model directory" in _error(base + ["--stage", "continual", "--init",
                                                        str(tmp_path / "not_a_model"), "--out", str(tmp_path / "c")])
    assert "no such directory" in _error(base + ["--stage", "continual", "--init", str(tmp_path / "nowhere"),
                                                 "--out", str(tmp_path / "c")])
    assert "starts from trained weights" in _error(base + ["--stage", "continual", "--preset", "tiny",
                                                           "--out", str(tmp_path / "d")])
    # a warmup run directory cannot be continued as the continual stage
    assert "holds a warmup run" in _error(base + ["--stage", "continual", "--init", warmup, "--corpus", corpus,
                                                  "--out", warmup])
    assert "TrainConfig has no field 'nope'" in _error(base + ["--stage", "warmup", "--preset", "tiny", "--out",
                                                               str(tmp_path / "e"), "--train-set", "nope=1"])


def test_paired_rows_concatenate_sources():
    """A second source (e.g. synthetic QA rows with their own references) joins the corpus rows:
    its reference ids are renumbered after the corpus references."""
    from m3jax.train.pairs import PairedRows

    a = PairedRows({"tokens": np.ones((2, 8), np.int32), "loss_mask": np.ones((2, 8), bool),
                    "ref_ids": np.array([[0, 1], [-1, 2]], np.int32)}, [[5], [6, 7], [8]])
    b = PairedRows({"tokens": np.full((1, 8), 2, np.int32), "loss_mask": np.ones((1, 8), bool),
                    "ref_ids": np.array([[1, -1]], np.int32)}, [[9], [10, 11]])
    c = a.concat(b)
    assert len(c) == 3 and c.reference_tokens == [[5], [6, 7], [8], [9], [10, 11]]
    np.testing.assert_array_equal(c.rows["ref_ids"], [[0, 1], [-1, 2], [4, -1]])
    batch = c.reference_fn(reference_len=4, pad_id=0)({"ref_ids": c.rows["ref_ids"][2:]})
    np.testing.assert_array_equal(batch["ref_tokens"][0, 0], [10, 11, 0, 0])
    assert not batch["ref_mask"][0, 1].any()
    with pytest.raises(ValueError, match="past the 3 references"):
        PairedRows({"tokens": np.ones((1, 8), np.int32), "loss_mask": np.ones((1, 8), bool),
                    "ref_ids": np.array([[3, 0]], np.int32)}, [[5], [6], [7]])
