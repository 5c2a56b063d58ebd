"""Multi-host training simulated on one CPU machine.

Two processes, each with 2 fake CPU devices, joined by `jax.distributed.initialize` on a local
coordinator, run `m3jax train` (continual stage of a tiny model from a model directory: per-host
data shards, references read from a file:// TensorStore memory bank, Orbax checkpoints, the
model directory gathered from both hosts) on one global (1, 2, 2) mesh. A single process with 4
devices runs the same global batches through the former launcher's command line (`python -m
m3jax.launch`, an alias). Losses and final parameters must agree: the two-process global batch
holds the same rows (in another order), so only the order of floating-point sums differs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = 1e-2
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega river mountain city music science history").split()


def _corpus(path: str, n_docs: int = 60, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            text = " ".join(rng.choice(WORDS, size=int(rng.integers(30, 80))))
            texts.append(text)
            f.write(json.dumps({"doc_id": i, "title": f"doc {i}", "text": text}) + "\n")
    return texts


def _setup(tmp: str) -> dict:
    """Corpus, tokenizer, a model dir (random init), prepared TFDS data, a memory bank of
    references and the pairs file."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from m3jax.config import preset
    from m3jax.convert import save_checkpoint_dir
    from m3jax.model import init
    from m3jax.memory.bank import MemoryBank
    from m3jax.memory.references import ReferenceBatch
    from m3jax.model.memory import MemoryKV
    from m3jax.tokenizer import train_bpe
    from m3jax.train import data as D

    corpus = os.path.join(tmp, "corpus.jsonl")
    texts = _corpus(corpus)
    tok = train_bpe(texts, vocab_size=300)
    tok_dir = os.path.join(tmp, "tokenizer")
    tok.save(tok_dir)
    cfg = dataclasses.replace(preset("tiny"), vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id,
                              pad_id=tok.pad_id, reference_prefix=tok.reference_prefix())
    model_dir = os.path.join(tmp, "model0")
    save_checkpoint_dir(model_dir, cfg, jax.device_get(init(cfg, jax.random.key(0))), tok)
    seq_len = 64
    data_dir = os.path.join(tmp, "tfds")
    dcfg = D.DataConfig(data_dir=data_dir, corpus=corpus, seq_len=seq_len, batch_size=8, shard_index=0, shard_count=1)
    rows = D.pack_rows(D.token_stream(dcfg, tok, "train"), seq_len, tok.pad_id)
    n_rows, C = rows["tokens"].shape[0], seq_len // cfg.chunk_size

    # The bank: references are token pieces of the corpus; the memories themselves are not read
    # in training (the step encodes references with the current weights), so zeros do.
    n_refs = 40
    rng = np.random.default_rng(1)
    lengths = rng.integers(4, cfg.reference_len + 1, n_refs).astype(np.int32)
    ref_tokens = np.full((n_refs, cfg.reference_len), tok.pad_id, np.int32)
    for i, L in enumerate(lengths):
        piece = tok.encode(texts[i % len(texts)])[:L]
        ref_tokens[i, : len(piece)], lengths[i] = piece, len(piece)
    kv = jnp.zeros((n_refs, cfg.memory_layers, 2, cfg.num_kv_heads, cfg.tokens_per_memory, cfg.head_dim))
    bank_dir = os.path.join(tmp, "bank")
    bank = MemoryBank.create("file://" + bank_dir, cfg, "bf16", "test")
    bank.append(MemoryKV(kv, jnp.ones((n_refs, cfg.tokens_per_memory), bool)),
                ReferenceBatch(ref_tokens, lengths, np.arange(n_refs), np.zeros(n_refs, np.int64),
                              np.zeros(n_refs, np.int64)))
    pairs = rng.integers(-1, n_refs, (n_rows, C)).astype(np.int32)
    pairs_path = os.path.join(tmp, "pairs.npy")
    np.save(pairs_path, pairs)
    return {"cfg": cfg, "corpus": corpus, "model_dir": model_dir, "data_dir": data_dir, "bank": "file://" + bank_dir,
            "pairs": pairs_path, "seq_len": seq_len, "ref_tokens": ref_tokens, "lengths": lengths}


def _train_cmd(s: dict, out: str, steps: int) -> list[str]:
    return [sys.executable, "-m", "m3jax.cli", "train", "--model", s["model_dir"],
            "--data-dir", "file://" + s["data_dir"], "--corpus", s["corpus"], "--stage", "continual",
            "--bank", s["bank"], "--pairs", s["pairs"], "--steps", str(steps), "--batch-size", "8",
            "--seq-len", str(s["seq_len"]), "--mesh", "1,2,2", "--lr", str(LR), "--train-set", "warmup_steps=1",
            "--train-set", "log_every=1", "--train-set", f"checkpoint_every={steps}", "--out", out]


def _launch_cmd(s: dict, out: str, steps: int) -> list[str]:
    """The same run with the former launcher's flags."""
    return [sys.executable, "-m", "m3jax.launch", "--init-params", s["model_dir"],
            "--data-dir", "file://" + s["data_dir"], "--corpus", s["corpus"], "--stage", "continual",
            "--bank", s["bank"], "--pairs", s["pairs"], "--steps", str(steps), "--global-batch", "8",
            "--seq-len", str(s["seq_len"]), "--mesh", "1,2,2", "--lr", str(LR), "--warmup-steps", "1",
            "--log-every", "1", "--checkpoint-every", str(steps), "--out", out]


def test_launch_flags_map_onto_train():
    from m3jax.launch import translate

    assert translate(["--global-batch", "8", "--init-params=R", "--warmup-steps", "1", "--log-every=2"]) == [
        "train", "--stage", "warmup", "--batch-size", "8", "--model=R", "--train-set", "warmup_steps=1",
        "--train-set", "log_every=2"]
    assert translate(["--stage", "warmup", "--out", "X"]) == ["train", "--preset", "demo", "--stage", "warmup",
                                                             "--out", "X"]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _losses(out: str) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if line.strip()]


def test_bank_reference_fn_reads_memory_kvstore():
    """References come from a TensorStore bank at any kvstore URL (here memory://)."""
    import jax.numpy as jnp

    from m3jax.config import preset
    from m3jax.train.pairs import bank_reference_fn
    from m3jax.memory.bank import MemoryBank
    from m3jax.memory.references import ReferenceBatch
    from m3jax.model.memory import MemoryKV

    cfg = preset("tiny")
    n, R = 5, cfg.reference_len
    tokens = np.arange(n * R, dtype=np.int32).reshape(n, R) % 200 + 3
    lengths = np.array([1, 5, R, 7, 2], np.int32)
    bank = MemoryBank.create("memory://m3jax_test_launch_bank/", cfg, "bf16", "fp")
    kv = jnp.zeros((n, cfg.memory_layers, 2, cfg.num_kv_heads, cfg.tokens_per_memory, cfg.head_dim))
    bank.append(MemoryKV(kv, jnp.ones((n, cfg.tokens_per_memory), bool)),
                ReferenceBatch(tokens, lengths, np.arange(n), np.zeros(n, np.int64), np.zeros(n, np.int64)))
    add = bank_reference_fn("memory://m3jax_test_launch_bank/", R, cfg.pad_id, cfg.vocab_size)
    ids = np.array([[0, -1, 2], [4, 4, 1]], np.int32)
    out = add({"tokens": np.zeros((2, 48), np.int32), "ref_ids": ids})
    assert out["ref_tokens"].shape == (2, 3, R) and out["ref_mask"].shape == (2, 3, R)
    for b in range(2):
        for c in range(3):
            i = ids[b, c]
            if i < 0:
                assert not out["ref_mask"][b, c].any()
                assert (out["ref_tokens"][b, c] == cfg.pad_id).all()
            else:
                assert out["ref_mask"][b, c].sum() == lengths[i]
                np.testing.assert_array_equal(out["ref_tokens"][b, c][: lengths[i]], tokens[i, : lengths[i]])
    with pytest.raises(ValueError, match="past the 5 memories"):
        add({"ref_ids": np.array([[5]])})
    with pytest.raises(ValueError, match="tokenizer"):
        bank_reference_fn("memory://m3jax_test_launch_bank/", R, cfg.pad_id, cfg.vocab_size + 1)


def test_local_path_rules():
    from m3jax.train.run import TrainError, local_path

    assert local_path("file:///a/b", "--out") == "/a/b"
    assert local_path("rel/dir", "--out") == "rel/dir"
    assert local_path("gs://bucket/tfds", "--data-dir", allow_gcs=True) == "gs://bucket/tfds"
    with pytest.raises(TrainError, match="gcsfuse"):
        local_path("gs://bucket/run", "--out")


# Three JAX processes on the CPU: ~35 s on an idle 2-core machine, 70-90 s (more) under load.
def test_two_processes_match_one(tmp_path):
    """2 processes x 2 CPU devices (jax.distributed on localhost) == 1 process x 4 devices."""
    import portpicker

    from m3jax.train.checkpoint import load_params

    t0 = time.perf_counter()
    s = _setup(str(tmp_path))
    steps = 3
    port = portpicker.pick_unused_port()
    multi_out, single_out = str(tmp_path / "run_2proc"), str(tmp_path / "run_1proc")
    procs = []
    for i in range(2):
        cmd = _train_cmd(s, multi_out, steps) + ["--coordinator", f"localhost:{port}", "--num-processes", "2",
                                                 "--process-id", str(i)]
        procs.append(subprocess.Popen(cmd, env=_env(2), cwd=str(tmp_path), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    procs.append(subprocess.Popen(_launch_cmd(s, single_out, steps), env=_env(4), cwd=str(tmp_path),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, o in zip(procs, outputs):
        assert p.returncode == 0, f"launch failed (rc {p.returncode}):\n{o[-4000:]}"
    summary = json.loads([line for line in outputs[0].splitlines() if line.startswith("{")][-1])
    assert summary["processes"] == 2 and summary["devices"] == 4 and summary["stage"] == "continual"
    single_summary = json.loads([line for line in outputs[2].splitlines() if line.startswith("{")][-1])
    assert single_summary["processes"] == 1 and single_summary["devices"] == 4
    assert not any(line.startswith("{") for line in outputs[1].splitlines()), "only process 0 reports"

    multi, single = _losses(multi_out), _losses(single_out)
    assert len(multi) == len(single) == steps
    np.testing.assert_allclose(multi, single, rtol=2e-5, atol=2e-5)
    assert np.all(np.isfinite(multi))

    # Checkpoints written by 2 processes restore in this process onto an 8-device mesh.
    p_multi = load_params(multi_out, s["cfg"])
    p_single = load_params(single_out, s["cfg"])
    import jax

    # Adam moves a parameter by up to ~lr per step whatever its gradient's size, so a gradient
    # element near zero whose rounding differs (other summation order) can move differently:
    # nearly all elements must agree to 1e-5, every element to a small fraction of lr x steps.
    lr = LR
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p_multi)[0], jax.tree.leaves(p_single)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        name = jax.tree_util.keystr(path)
        np.testing.assert_allclose(a, b, rtol=0, atol=0.05 * lr, err_msg=name)
        assert np.mean(np.abs(a - b) > 1e-5) < 1e-3, f"{name}: {np.mean(np.abs(a - b) > 1e-5):.2%} of elements differ"
    # The model directory holds the final params, gathered from both hosts.
    from m3jax.convert import load_checkpoint_dir

    cfg, p_dir, tok = load_checkpoint_dir(os.path.join(multi_out, "model"))
    assert cfg == s["cfg"] and tok is not None
    for a, b in zip(jax.tree.leaves(p_dir), jax.tree.leaves(p_multi)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print(f"two-process run == one-process run, losses {multi}; {time.perf_counter() - t0:.1f} s")
