"""Fuzz the files m3jax reads from others: a bank manifest, a JSONL corpus, a HF config, a GGUF header.

    python experiments/fuzz_inputs.py --cases 150 --out fuzz.json
    python experiments/fuzz_inputs.py --targets corpus,gguf --cases 500 --seed 3

Hypothesis generates the mutations (random JSON values in place of fields, removed fields,
truncated files, flipped bytes, numbers at the edges: 0, -1, 2**31, 2**44, 2**64, true, 1e308).
Each target runs in its own worker process with an address-space cap (an allocation sized by a
hostile number fails there instead of exhausting the machine) and a per-case timeout. A case ends
in one of:

    ok        a result, checked to be the right one (the bank's memories equal the ones written,
              every corpus document equals its line, the model config equals the file's values)
    clear     an m3jax error: raised by m3jax code, of its user-error kinds (m3jax's own classes,
              ValueError, OSError), one line, naming the file
    unclear   raised by m3jax, but the message is several lines or does not name the file
    crash     any other exception, or one raised from inside a library
    wrong     a result that is not the right one
    hang      no answer within the per-case timeout
    changed   the bank's committed memories changed (every file but the manifest is compared)

The table of counts is printed and written as JSON (`--out`); a healthy run has only ok and
clear. Public API only, on tiny files made here (no download).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from typing import Any, Callable

TARGETS = ("manifest", "corpus", "hf_config", "gguf")
OUTCOMES = ("ok", "clear", "unclear", "crash", "wrong", "hang", "changed")
EDGE_INTS = [0, -1, 1, 2, 3, 255, 2**31 - 1, 2**31, 2**32, 2**44, 2**63 - 1, 2**63, 2**64, -2**63, 10**30]
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Hang(BaseException):
    """Raised by the per-case alarm (a BaseException: code under test never catches it)."""


# ---------------------------------------------------------------------------- classification
def _user_error(e: BaseException) -> bool:
    """The kinds `m3jax` reports as user errors (as `m3jax.cli` does)."""
    if isinstance(e, (ValueError, OSError)):
        return True
    return any(c.__module__.split(".")[0] == "m3jax" for c in type(e).__mro__)


def classify(e: BaseException, names: tuple[str, ...]) -> str:
    """clear / unclear / crash for an exception of a case whose file is known by `names`."""
    tb = traceback.extract_tb(e.__traceback__)
    last = tb[-1].filename if tb else ""
    ours = os.sep + "m3jax" + os.sep in last and "site-packages" not in last
    if not ours or not _user_error(e):
        return "crash"
    msg = str(e)
    return "clear" if "\n" not in msg and any(n in msg for n in names) else "unclear"


# ---------------------------------------------------------------------------- strategies
def _json_values():
    from hypothesis import strategies as st

    leaf = (st.none() | st.booleans() | st.sampled_from(EDGE_INTS) | st.integers()
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
    return st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                        max_leaves=6)


def _byte_edits(size: int):
    """("truncate", n) | ("flip", [(pos, byte), ...]) | ("int", pos, width, value) on a file of `size` bytes."""
    from hypothesis import strategies as st

    pos = st.integers(0, max(0, size - 1))
    return st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, size - 1)),
        st.tuples(st.just("flip"), st.lists(st.tuples(pos, st.integers(0, 255)), min_size=1, max_size=6)),
        st.tuples(st.just("int"), pos, st.sampled_from([1, 2, 4, 8]), st.sampled_from(EDGE_INTS)),
    )


def _apply_bytes(data: bytes, edit: tuple) -> bytes:
    if edit[0] == "truncate":
        return data[: edit[1]]
    b = bytearray(data)
    if edit[0] == "flip":
        for p, v in edit[1]:
            b[p] = v
        return bytes(b)
    _, p, width, value = edit
    raw = (value % (1 << (8 * width))).to_bytes(width, "little")
    b[p:p + width] = raw[: len(b) - p]
    return bytes(b)


def _json_edits(keys: list[str]):
    """A list of ("set", dotted key, value) / ("del", dotted key) edits of a JSON object."""
    from hypothesis import strategies as st

    key = st.sampled_from(keys) | st.text(max_size=8)
    edit = st.one_of(st.tuples(st.just("set"), key, _json_values()), st.tuples(st.just("del"), key))
    return st.lists(edit, min_size=1, max_size=4)


def _apply_json(obj: dict, edits: list) -> dict:
    obj = json.loads(json.dumps(obj))
    for e in edits:
        parts = e[1].split(".")
        d = obj
        for p in parts[:-1]:
            d = d.get(p) if isinstance(d, dict) else None
        if not isinstance(d, dict):
            continue
        if e[0] == "set":
            d[parts[-1]] = e[2]
        else:
            d.pop(parts[-1], None)
    return obj


def _dump_json(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


# ---------------------------------------------------------------------------- targets
def _digest_tree(path: str, skip: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, path)
            if rel not in skip:
                with open(p, "rb") as fh:
                    out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


class ManifestTarget:
    """A bank's manifest.json mutated; open it, gather every committed memory it claims."""

    def __init__(self, work: str):
        import numpy as np

        from m3jax.config import preset
        from m3jax.memory.bank import MemoryBank
        from m3jax.memory.populate import build_bank
        from m3jax.memory.references import Reference
        from m3jax.model.memory import MemoryKV

        cfg = preset("tiny")
        self.path = os.path.join(work, "bank")

        def enc(tokens, mask):
            n = tokens.shape[0]
            kv = np.sin(tokens[:, :cfg.tokens_per_memory].astype(np.float32)[:, None, None, None, :, None] * 0.1
                        + np.arange(cfg.head_dim) * 0.01)
            kv = np.broadcast_to(kv, (n, cfg.memory_layers, 2, cfg.num_kv_heads, cfg.tokens_per_memory,
                                      cfg.head_dim)).astype(np.float32)
            return MemoryKV(kv, mask[:, :cfg.tokens_per_memory])

        rng = np.random.default_rng(0)
        refs = [Reference(i, i, 0, 5, tuple(rng.integers(7, 200, 12).tolist())) for i in range(24)]
        build_bank(self.path, cfg, "fp", refs, enc, codec="int8", batch_size=8, shard_size=8, show_progress=False)
        self.bank_cls = MemoryBank
        self.count = 24
        self.codes = MemoryBank.open(self.path).gather_codes(np.arange(24))[0]
        self.manifest_path = os.path.join(self.path, "manifest.json")
        self.raw = open(self.manifest_path, "rb").read()
        self.manifest = json.loads(self.raw)
        self.before = _digest_tree(self.path, ("manifest.json",))
        self.names = (self.path.rstrip("/") + "/", "manifest.json", "codec.npz")

    def strategy(self):
        from hypothesis import strategies as st

        keys = list(self.manifest) + [f"config.{k}" for k in self.manifest["config"]] + \
            [f"codec.{k}" for k in self.manifest["codec"]]
        return st.one_of(st.tuples(st.just("json"), _json_edits(keys)),
                         st.tuples(st.just("bytes"), _byte_edits(len(self.raw))))

    def run(self, case) -> str:
        import numpy as np

        kind, edit = case
        data = _dump_json(_apply_json(self.manifest, edit)) if kind == "json" else _apply_bytes(self.raw, edit)
        with open(self.manifest_path, "wb") as f:
            f.write(data)
        try:
            bank = self.bank_cls.open(self.path)
            n = min(len(bank), self.count)
            codes = bank.gather_codes(np.arange(n))[0] if n else self.codes[:0]
            return "ok" if np.array_equal(codes, self.codes[:n]) else "wrong"
        finally:
            with open(self.manifest_path, "wb") as f:
                f.write(self.raw)

    def check(self) -> bool:
        """The committed memories (every file but the manifest) are as written."""
        return _digest_tree(self.path, ("manifest.json",)) == self.before


class CorpusTarget:
    """A JSONL corpus of random lines; read it as every m3jax command does."""

    def __init__(self, work: str):
        self.path = os.path.join(work, "corpus.jsonl")
        self.names = (self.path,)

    def strategy(self):
        from hypothesis import strategies as st

        record = st.fixed_dictionaries({"text": st.text(max_size=20)},
                                       optional={"doc_id": st.sampled_from(EDGE_INTS + [5, 5, 6]) | _json_values(),
                                                 "title": st.text(max_size=5) | _json_values(),
                                                 "topic": _json_values()})
        line = st.one_of(record.map(lambda r: json.dumps(r).encode()), _json_values().map(_dump_json),
                         st.binary(max_size=30), st.just(b""), st.just(b"  "),
                         record.map(lambda r: json.dumps(r).encode()[:-3]))
        return st.tuples(st.lists(line, max_size=8), st.sampled_from(["line", "ordinal", "hash"]))

    def run(self, case) -> str:
        from m3jax.memory.references import read_jsonl_corpus

        lines, missing = case
        data = b"\n".join(lines) + b"\n"
        with open(self.path, "wb") as f:
            f.write(data)
        docs = read_jsonl_corpus(self.path, missing_id=missing)
        # the right result: every non-blank line is a document with its own text, ids unique
        want = [(n + 1, json.loads(raw)) for n, raw in enumerate(data.split(b"\n")[:-1]) if raw.strip()]
        ok = len(docs) == len(want) and len({d.doc_id for d in docs}) == len(docs) and all(
            d.line == n and d.text == r["text"] and (r.get("doc_id", d.doc_id) == d.doc_id)
            for d, (n, r) in zip(docs, want))
        return "ok" if ok else "wrong"


class HFConfigTarget:
    """A HF Llama directory whose config.json is mutated; import it."""

    def __init__(self, work: str):
        sys.path.insert(0, os.path.join(_REPO, "tests"))
        import test_convert as tc

        self.cfg = tc.hf_config(**tc.CASES["untied"])
        self.dir = tc.write_hf(os.path.join(work, "hf"), self.cfg, tc.random_tensors(self.cfg))
        self.config_path = os.path.join(self.dir, "config.json")
        self.raw = open(self.config_path, "rb").read()
        self.names = (self.dir,)

    def strategy(self):
        from hypothesis import strategies as st

        return st.one_of(st.tuples(st.just("json"), _json_edits(list(self.cfg) + ["m3jax.memory_layers",
                                                                                   "m3jax.reference_prefix"])),
                         st.tuples(st.just("bytes"), _byte_edits(len(self.raw))))

    def run(self, case) -> str:
        from m3jax.convert import load_hf

        kind, edit = case
        hf = _apply_json(self.cfg, edit) if kind == "json" else None
        data = _dump_json(hf) if kind == "json" else _apply_bytes(self.raw, edit)
        with open(self.config_path, "wb") as f:
            f.write(data)
        config, _ = load_hf(self.dir)  # the params are checked against the config inside
        hf = hf if hf is not None else json.loads(data)
        same = (config.hidden, config.num_layers, config.vocab_size, config.mlp_dim, config.num_heads) == tuple(
            hf[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
                            "num_attention_heads"))
        return "ok" if same else "wrong"


class GGUFTarget:
    """A tiny llama GGUF whose header bytes are mutated; import it."""

    def __init__(self, work: str):
        import gguf

        sys.path.insert(0, os.path.join(_REPO, "tests"))
        import test_convert as tc

        tokens, _, _ = tc.tiny_gguf_vocab()
        cfg = tc.hf_config(**dict(tc.CASES["untied"], vocab_size=len(tokens)))
        self.good = os.path.join(work, "good.gguf")
        tc.write_tiny_gguf(self.good, cfg, tc.random_tensors(cfg))
        self.raw = open(self.good, "rb").read()
        self.header = int(gguf.GGUFReader(self.good).data_offset)  # metadata + tensor infos
        self.path = os.path.join(work, "m.gguf")
        self.names = (self.path,)

    def strategy(self):
        from hypothesis import strategies as st

        return st.one_of(_byte_edits(self.header),
                         st.tuples(st.just("truncate"), st.integers(0, len(self.raw) - 1)))

    def run(self, case) -> str:
        from m3jax.convert import load_gguf

        with open(self.path, "wb") as f:
            f.write(_apply_bytes(self.raw, case))
        config, params, tok = load_gguf(self.path)  # params checked against the config inside
        return "ok" if tok.vocab_size <= config.vocab_size else "wrong"


_TARGET_CLASSES = {"manifest": ManifestTarget, "corpus": CorpusTarget, "hf_config": HFConfigTarget,
                   "gguf": GGUFTarget}


# ---------------------------------------------------------------------------- worker
def _worker(target: str, cases: int, seed: int, timeout: float, log: str, mem_gib: float) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, _REPO)
    lim = int(mem_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    work = tempfile.mkdtemp(prefix=f"m3jax-fuzz-{target}-")
    t = _TARGET_CLASSES[target](work)
    out = open(log, "a", encoding="utf-8")

    def on_alarm(signum, frame):
        raise _Hang()

    signal.signal(signal.SIGALRM, on_alarm)
    counter = [0]

    @hseed(seed)
    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(t.strategy())
    def one(case):
        i = counter[0]
        counter[0] += 1
        out.write(json.dumps({"start": i, "case": repr(case)[:300]}) + "\n")
        out.flush()
        t0 = time.perf_counter()
        detail = ""
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            outcome = t.run(case)
        except _Hang:
            outcome, detail = "hang", f"over {timeout} s"
        except BaseException as e:  # noqa: BLE001 - classified, never raised: the fuzz goes on
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            outcome = classify(e, t.names)
            detail = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            if outcome == "crash":
                tb = traceback.extract_tb(e.__traceback__)
                detail += f" @ {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if getattr(t, "check", None) is not None and not t.check():
            outcome, detail = "changed", "committed memories changed"
        out.write(json.dumps({"case": i, "outcome": outcome, "detail": detail,
                              "s": round(time.perf_counter() - t0, 3)}) + "\n")
        out.flush()

    one()
    out.write(json.dumps({"done": counter[0]}) + "\n")
    out.close()
    shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------- driver
def _run_target(target: str, a: argparse.Namespace, log: str) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", target, "--cases", str(a.cases), "--seed",
           str(a.seed), "--timeout", str(a.timeout), "--log", log, "--mem-gib", str(a.mem_gib)]
    t0 = time.perf_counter()
    budget = 120 + a.cases * (a.timeout + 2)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    counts: Counter = Counter()
    examples: dict[str, list[dict[str, Any]]] = {}
    started, done, finished = {}, set(), False
    with open(log, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if "start" in r:
                started[r["start"]] = r["case"]
            elif "outcome" in r:
                done.add(r["case"])
                counts[r["outcome"]] += 1
                if r["outcome"] not in ("ok", "clear") or len(examples.get(r["outcome"], [])) < 2:
                    examples.setdefault(r["outcome"], []).append(
                        {"case": started.get(r["case"]), "detail": r["detail"]})
            elif "done" in r:
                finished = True
    lost = [i for i in started if i not in done]
    for i in lost:  # the worker died in this case (killed, out of memory, a native crash)
        kind = "hang" if proc.returncode in (-signal.SIGKILL, None) and not finished else "crash"
        counts[kind] += 1
        examples.setdefault(kind, []).append({"case": started[i], "detail": f"worker died, status {proc.returncode}"})
    if not finished and not lost:
        counts["crash"] += 1
        examples.setdefault("crash", []).append({"case": None, "detail": f"worker failed: {err[-1500:]}"})
    return {"target": target, "cases": sum(counts.values()), "counts": {k: counts.get(k, 0) for k in OUTCOMES},
            "seconds": round(time.perf_counter() - t0, 1), "examples": {k: v[:8] for k, v in examples.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--cases", type=int, default=100, help="cases per target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    p.add_argument("--mem-gib", type=float, default=4.0, help="address-space cap of a worker")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--log", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker, a.cases, a.seed, a.timeout, a.log, a.mem_gib)
        return 0
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad or a.cases < 1:
        p.error(f"unknown targets {bad}" if bad else "--cases must be >= 1")
    logs = tempfile.mkdtemp(prefix="m3jax-fuzz-logs-")
    results = [_run_target(t, a, os.path.join(logs, f"{t}.jsonl")) for t in targets]
    head = f"{'target':<10} {'cases':>6} " + " ".join(f"{o:>8}" for o in OUTCOMES) + f" {'seconds':>8}"
    print(head)
    for r in results:
        print(f"{r['target']:<10} {r['cases']:>6} " + " ".join(f"{r['counts'][o]:>8}" for o in OUTCOMES)
              + f" {r['seconds']:>8}")
    for r in results:
        for kind, ex in r["examples"].items():
            if kind not in ("ok", "clear"):
                for e in ex[:3]:
                    print(f"  {r['target']} {kind}: {e['detail']}\n      case {e['case']}")
    healthy = all(r["counts"][o] == 0 for r in results for o in OUTCOMES if o not in ("ok", "clear"))
    summary = {"seed": a.seed, "cases_per_target": a.cases, "timeout_s": a.timeout, "healthy": healthy,
               "results": results}
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    print("healthy: only ok and clear" if healthy else "NOT healthy: see above")
    shutil.rmtree(logs, ignore_errors=True)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
