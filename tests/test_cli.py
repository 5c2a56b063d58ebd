"""The `m3jax` command line: real subparsers, one flag name per thing (former names still work),
one-line user errors, the persistent compilation cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from m3jax import cli

REPO = Path(__file__).resolve().parents[1]


def _parse(argv):
    return cli.build_parser().parse_args(argv)


def test_every_subcommand_has_its_own_parser_and_help(capsys):
    for sub in ("demo", "presets", "train", "convert", "build-memory", "generate", "eval"):
        with pytest.raises(SystemExit) as e:
            cli.main([sub, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith(f"usage: m3jax {sub}"), sub
        assert "--compile-cache" in out and "--no-compile-cache" in out
        for former in ("--checkpoint", "--bank ", "--init"):  # hidden former names
            assert former not in out.replace("--bank BANK", ""), (sub, former)
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--help"])
    assert "--model" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["presets", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # no REMAINDER: an unknown flag of eval is refused by eval
        cli.main(["eval", "--model", "m", "--bogus"])
    assert e.value.code == 2 and "error: unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize("argv,dest,value", [
    (["eval", "--checkpoint", "M", "--bank", "K"], "model", "M"),
    (["eval", "--checkpoint", "M", "--bank", "K"], "kb", "K"),
    (["generate", "--checkpoint", "M", "--prompt", "x"], "model", "M"),
    (["kb", "add", "--bank", "K", "--checkpoint", "M", "--corpus", "c"], "kb", "K"),
    (["build-memory", "--checkpoint", "M", "--out", "o"], "model", "M"),
    (["train", "--stage", "continual", "--init", "R", "--out", "o"], "init", "R"),
    (["train", "--stage", "continual", "--model", "R", "--out", "o"], "init", "R"),
])
def test_former_flag_names_are_aliases(argv, dest, value, capsys):
    assert getattr(_parse(argv), dest) == value
    err = capsys.readouterr().err
    assert ("is a former name of" in err) == any(a in argv for a in ("--checkpoint", "--bank", "--init"))


def test_required_flags_accept_their_former_names(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--prompt", "x"])
    assert e.value.code == 2 and "m3jax generate: error: the following arguments are required: --model" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["kb", "info"])
    assert e.value.code == 2 and "m3jax kb info: error: the following arguments are required: --kb" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # given under its former name: the model is looked for
        cli.main(["generate", "--checkpoint", "/nonexistent/model", "--prompt", "x", "--mode", "none"])
    assert "m3jax generate: error: /nonexistent/model: no such directory" in str(e.value.code)


def test_usage_errors_and_user_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # a flag combination: argparse's usage error, exit status 2
        cli.main(["generate", "--model", "m", "--prompt", "x", "--mode", "memory"])
    assert e.value.code == 2 and "--mode memory needs --kb" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--model", "m", "--modes", "none", "--tasks", "ppl,bogus"])
    assert e.value.code == 2 and "--tasks must be a comma-separated subset of ppl,qa,fanoutqa,mc" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--model", "m", "--modes", "none", "--tasks", "mc"])
    assert e.value.code == 2 and "--tasks mc needs --mc FILE" in capsys.readouterr().err
    # a bad file: one line naming it, exit status 1 (before any model is loaded)
    bad = tmp_path / "mc.jsonl"
    bad.write_text('{"context": "x"}\n')
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--model", "m", "--modes", "none", "--mc", str(bad)])
    msg = str(e.value.code)
    assert msg.startswith("m3jax eval: error: ") and str(bad) in msg and "\n" not in msg
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"question": 1}\n')
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--model", "m", "--prompts-file", str(prompts), "--mode", "none"])
    assert f"{prompts}:1: expected a JSON object with a 'prompt' or 'text' field" in str(e.value.code)
    # a directory that is not a model, and a training run without its model
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for path, needle in ((tmp_path, "is not a model directory"), (tmp_path / "run", "without a finished model")):
        with pytest.raises(SystemExit) as e:
            cli.main(["generate", "--model", str(path), "--prompt", "x", "--mode", "none"])
        assert needle in str(e.value.code)


def test_convert_is_a_real_subcommand(tmp_path, monkeypatch, capsys):
    from m3jax import convert

    seen = {}

    def fake(source, path, out, **kw):
        seen.update(source=source, path=path, out=out, **kw)
        return f"wrote {out}"

    assert cli._FLOAT_DTYPES == convert._FLOAT_DTYPES
    monkeypatch.setattr(convert, "convert_checkpoint", fake)
    assert cli.main(["convert", "--from", "gguf", "m.gguf", "--out", "o", "--reference-prefix", "1,5,6",
                     "--memory-layers", "2", "--debug"]) == 0
    assert seen == {"source": "gguf", "path": "m.gguf", "out": "o", "target": "m3jax", "memory_layers": 2,
                    "reference_prefix": (1, 5, 6), "dtype": None, "param_dtype": None, "name": None,
                    "max_len": None}
    assert capsys.readouterr().out.strip() == "wrote o"
    assert cli.main(["convert", "--from", "hf", "d", "--out", "o", "--reference-prefix", "none"]) == 0
    assert seen["reference_prefix"] == ()
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "--from", "hf", "d", "--out", "o", "--reference-prefix", "x,y"])
    assert "m3jax convert: error: --reference-prefix must be 'auto', 'none'" in str(e.value.code)


def test_compile_cache_flags_and_environment(tmp_path, monkeypatch):
    from m3jax import runtime

    monkeypatch.setenv("M3JAX_COMPILE_CACHE", "off")
    assert runtime.default_compile_cache_dir() is None
    monkeypatch.setenv("M3JAX_COMPILE_CACHE", str(tmp_path / "c"))
    assert runtime.default_compile_cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("M3JAX_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runtime.default_compile_cache_dir() == str(tmp_path / "xdg" / "m3jax" / "jax-compile")
    args = _parse(["presets", "--compile-cache", str(tmp_path / "d")])
    assert args.compile_cache == str(tmp_path / "d") and not args.no_compile_cache
    assert _parse(["presets", "--no-compile-cache"]).no_compile_cache


_CACHE_SCRIPT = """
import json, sys
from m3jax import runtime
runtime.MIN_COMPILE_TIME_S = 0.0  # cache even the fast compilation below
assert runtime.enable_compile_cache(sys.argv[1]) == sys.argv[1]
import jax, jax.numpy as jnp
with runtime.CompileMeter() as m:
    y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((64, 64)))
    y.block_until_ready()
print(json.dumps({"seconds": m.seconds, "compilations": m.compilations, "hits": m.cache_hits}))
"""


def test_persistent_compile_cache_is_used_by_a_second_process(tmp_path):
    """Two processes compile the same function: the first writes the cache, the second loads it
    (counted by `CompileMeter` from JAX's own monitoring events)."""
    cache = str(tmp_path / "cache")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    runs = []
    for _ in range(2):
        p = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, cache], capture_output=True, text=True,
                           env=env, timeout=300, cwd=str(tmp_path))
        assert p.returncode == 0, p.stderr
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    assert runs[0]["hits"] == 0 and runs[0]["compilations"] >= 1 and runs[0]["seconds"] > 0
    assert os.listdir(cache), "nothing written to the cache"
    assert runs[1]["hits"] >= 1


def test_generate_names_the_references_it_read(tmp_path, monkeypatch, capsys):
    """`m3jax generate` on a tiny model and knowledge base: the streamed answer is followed by the
    compile time apart from tokens/s and by each retrieved reference's id, title and text snippet;
    a prompts file's JSON lines carry the same references."""
    import numpy as np

    import test_kb_updates as tk
    from m3jax.convert import save_checkpoint_dir
    from m3jax.memory import build as B

    rng = np.random.default_rng(3)
    docs = [(10 + i, tk._text(rng, 30), f"Title {10 + i}") for i in range(6)]
    tok, cfg, params = tk.tiny_model(docs)
    save_checkpoint_dir(str(tmp_path / "model"), cfg, params, tok)
    kb = B.build_knowledge_base(str(tmp_path / "kb"), params, cfg, tok, docs, embedder=tk.EMB, codec="bf16",
                                batch_size=8, show_progress=False, log=lambda *a: None)
    monkeypatch.setattr(B, "default_embedder", lambda name=None, **kw: tk.EMB)
    common = ["generate", "--model", str(tmp_path / "model"), "--kb", str(tmp_path / "kb"), "--max-new-tokens", "4"]
    prompt = docs[2][1][:60]
    capsys.readouterr()
    assert cli.main(common + ["--prompt", prompt]) == 0
    err = capsys.readouterr().err
    assert "compile " in err and "tokens/s without compilation" in err
    lines = err.split("[references read")[1].strip().splitlines()[1:]
    assert lines, err
    texts = {f"Title {d}": t for d, t, _ in docs}
    for line in lines:  # "  #id Title N: snippet"
        rid, rest = line.strip()[1:].split(" ", 1)
        title, snippet = rest.split(": ", 1)
        assert kb.titles([int(rid)])[0] == title
        words = snippet.rstrip(".").split()
        assert " ".join(words[:3]) in texts[title]  # the snippet is the reference's own text
    assert any(line.split(": ", 1)[0].endswith("Title 12") for line in lines)  # its own document

    pf = tmp_path / "p.txt"
    pf.write_text(docs[4][1][:50] + "\n")  # one prompt: the shapes compiled above
    out = tmp_path / "a.jsonl"
    assert cli.main(common + ["--prompts-file", str(pf), "--out", str(out)]) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    for rec in recs:
        ids = list(dict.fromkeys(i for chunk in rec["retrieved"] for i in chunk))
        assert [r["id"] for r in rec["references"]] == ids
        for r in rec["references"]:
            assert r["title"] == kb.titles([r["id"]])[0] and r["doc_id"] == int(kb.doc_ids([r["id"]])[0])
            assert r["snippet"] and len(r["snippet"]) <= 160
    assert "tokens/s without compilation" in capsys.readouterr().err


def test_build_memory_without_limit_says_how_many_and_how_long(monkeypatch, capsys):
    from m3jax import convert
    from m3jax.assets import wiki_leads
    from m3jax.config import preset
    from m3jax.memory import build as B

    seen = {}

    def fake_build(directory, params, config, tok, docs, **kw):
        seen["docs"] = len(docs)
        raise KeyboardInterrupt  # stop before any work: only the announcement is checked

    monkeypatch.setattr(convert, "load_model", lambda m: (preset("smollm2-135m"), None, None))
    monkeypatch.setattr(B, "build_knowledge_base", fake_build)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["build-memory", "--model", "m", "--out", "kb"])
    err = capsys.readouterr().err
    n = len(wiki_leads())
    assert seen["docs"] == n and f"all {n:,} shipped Wikipedia leads (no --limit): roughly" in err
    assert "--limit N" in err
    with pytest.raises(KeyboardInterrupt):
        cli.main(["build-memory", "--model", "m", "--out", "kb", "--limit", "7"])
    assert seen["docs"] == 7 and "build-memory: 7 documents" in capsys.readouterr().err


def test_preparing_a_local_corpus_prints_no_download_lines(tmp_path, capfd):
    """TFDS prints "Downloading and preparing dataset ..." for every builder; m3jax's builder
    downloads nothing and says nothing on stdout or stderr (its own "data: ..." line does)."""
    from m3jax.train import data as D

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document number {i} about things", "title": f"T{i}"}) + "\n"
                              for i in range(30)))
    name = D.prepare(D.DataConfig(data_dir=str(tmp_path / "data"), corpus=str(corpus)))
    out, err = capfd.readouterr()
    assert name.startswith("m3jax_text/") and "Downloading" not in out + err and "downloaded" not in out + err
