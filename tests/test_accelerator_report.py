"""experiments/accelerator_report.py on the CPU: a smoke run with tiny sizes that says so, and the
pieces that only matter on an accelerator (MFU against the peak table, HBM statistics, the
README table) on made-up device facts."""

from __future__ import annotations

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import accelerator_report as R  # noqa: E402


def test_mfu_hbm_and_markdown_from_device_facts():
    assert R.decode_mfu(1000.0, 2_000_000_000, 989e12, 1) == pytest.approx(2 * 2e9 * 1000 / 989e12)
    assert R.decode_mfu(1000.0, 10, None, 1) is None
    assert R.hbm_use() is None  # the CPU keeps no allocator statistics

    class Dev:
        def memory_stats(self):
            return {"peak_bytes_in_use": 3 * 2**30, "bytes_in_use": 2**30, "bytes_limit": 12 * 2**30}

    assert R.hbm_use(Dev()) == {"peak_bytes_in_use": 3 * 2**30, "bytes_in_use": 2**30,
                                "bytes_limit": 12 * 2**30, "peak_fraction": 0.25}
    report = {"device": "gpu:NVIDIA H100", "device_info": {"count": 1, "peak_flops": 989e12}, "jax": "0",
              "sizes": dict(R.ACCELERATOR_SIZES), "remat": "dots",
              "decode": {"tokens_per_s": {"none": 1100.0, "memory": 700.0}, "mfu_lower_bound": {"none": 0.01,
                                                                                          "memory": 0.005},
                         "hbm": {"peak_bytes_in_use": 8 * 2**30}},
              "train": {"results": {"warmup": {"tokens_per_s": 20000.0, "mfu": 0.41}}, "hbm": None}}
    md = R.markdown(report).splitlines()
    assert md[0].startswith("gpu:NVIDIA H100 (1 device(s), peak 989 TFLOP/s bf16)")
    assert md[4] == "| decode | none | 1,100 | 1.0% | 8.0 |"
    assert md[6] == "| train | warmup | 20,000 | 41.0% | - |"


@pytest.mark.slow
def test_smoke_run_on_cpu(tmp_path, capsys):
    """The one command runs end to end on the CPU with tiny sizes, says it is a smoke run, and
    writes decode and train figures (tokens/s > 0 for every mode) to its JSON."""
    out = tmp_path / "report.json"
    R.main(["--work", str(tmp_path / "work"), "--out", str(out), "--repeats", "1"])
    printed = capsys.readouterr()
    assert "SMOKE RUN" in printed.out
    rep = json.loads(out.read_text())
    assert rep["smoke"] and rep["sizes"]["decode_preset"] == R.SMOKE_SIZES["decode_preset"]
    assert set(rep["decode"]["tokens_per_s"]) == {"none", "memory", "rag"}
    assert all(v > 0 for v in rep["decode"]["tokens_per_s"].values())
    assert set(rep["train"]["results"]) == {"warmup", "continual_nograd", "continual_grad"}
    assert all(r["tokens_per_s"] > 0 for r in rep["train"]["results"].values())
    assert rep["train"]["model_config"]["remat"] == "dots"
