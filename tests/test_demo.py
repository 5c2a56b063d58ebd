"""`m3jax demo --quick` end to end, and resuming a demo that was stopped."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from m3jax.demo_scratch import ScratchConfig as DemoConfig, run_from_scratch as run


def _finite(x):
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quick_demo_end_to_end_and_resume(tmp_path, capsys):
    out = str(tmp_path / "demo")
    m = run(out, DemoConfig.quick())
    for f in ("report.md", "metrics.json", "loss_curves.png", "modes.png", "stages.json",
              "model/config.json", "kb/kb.json", "stage1_warmup/metrics.jsonl", "stage2_continual/metrics.jsonl"):
        assert os.path.exists(os.path.join(out, f)), f
    for key in ("ppl", "qa_exact_match", "decode_tokens_per_s"):
        assert set(m[key]) == {"memory", "rag", "none"} and _finite(m[key]), (key, m[key])
    assert m["wall_s"] > 0 and all(v > 1 for v in m["ppl"].values())
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["ppl"] == m["ppl"]
    report = open(os.path.join(out, "report.md")).read()
    assert "| memory |" in report and "Does memory help" in report
    _check_generate_cli(out, tmp_path, capsys)
    # a second run skips every finished stage; a stage that did not finish is redone
    with open(os.path.join(out, "stages.json")) as f:
        st = json.load(f)
    del st["stages"]["samples"]
    with open(os.path.join(out, "stages.json"), "w") as f:
        json.dump(st, f)
    capsys.readouterr()
    run(out, DemoConfig.quick())
    log = capsys.readouterr().out
    for stage in ("warmup", "pairs", "continual", "memory", "eval"):
        assert f"[{stage}]" in log and "skipped" in log.split(f"[{stage}]")[1].split("\n")[0], stage
    assert "[samples] sample answers" in log and "[samples] done" in log
    with pytest.raises(ValueError, match="other settings"):
        run(out, dataclasses.replace(DemoConfig.quick(), warmup_steps=99))


def _check_generate_cli(out, tmp_path, capsys):
    """`m3jax generate` on the demo's model and knowledge base: one streamed prompt, and a prompts
    file generated in pipelined batches that gives the same answers as one prompt at a time."""
    from m3jax import cli

    common = ["generate", "--model", os.path.join(out, "model"), "--kb", os.path.join(out, "kb"),
              "--max-new-tokens", "8", "--mode", "memory"]
    capsys.readouterr()
    assert cli.main(common + ["--prompt", "The river"]) == 0
    got = capsys.readouterr()
    assert got.out.startswith("The river") and "[memory: " in got.err
    streamed = got.out[len("The river"):].rstrip("\n")
    pf = tmp_path / "prompts.jsonl"
    pf.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Paris is", "The river", "A city", "An old"]) + "\n")
    res = tmp_path / "answers.jsonl"
    assert cli.main(common + ["--prompts-file", str(pf), "--batch-size", "2", "--out", str(res)]) == 0
    recs = [json.loads(line) for line in res.read_text().splitlines()]
    assert [r["prompt"] for r in recs] == ["Paris is", "The river", "A city", "An old"]
    assert recs[1]["text"] == streamed and all(0 < len(r["tokens"]) <= 8 for r in recs)
    assert all(len(r["retrieved"]) >= 1 for r in recs)  # the memories each used chunk read
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(SystemExit, match="'prompt' or 'text'"):
        cli.main(common + ["--prompts-file", str(bad)])


@pytest.mark.slow
def test_killed_demo_resumes(tmp_path):
    out = str(tmp_path / "demo")
    cmd = [sys.executable, "-m", "m3jax.cli", "demo", "--quick", "--out", out]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    for line in p.stdout:
        if line.startswith("[continual] stage 2") or time.time() > deadline:
            break
    time.sleep(3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    st = json.load(open(os.path.join(out, "stages.json")))["stages"]
    assert "warmup" in st and "continual" not in st
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[warmup] stage 1: warmup pretraining without memory: done" in r.stdout
    assert os.path.exists(os.path.join(out, "report.md"))
