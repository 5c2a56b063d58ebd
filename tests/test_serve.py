"""The OpenAI-compatible server (m3jax serve), driven by the official `openai` client over HTTP on
127.0.0.1: completions and chat, streaming, the mode field, attribution, live knowledge, errors.
Greedy answers are checked against `Generator.generate` (an independent code path: one batch,
its own cache sizing and rounds)."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from m3jax.config import DecodeConfig  # noqa: E402
from m3jax.decode import Generator  # noqa: E402
from m3jax.memory.build import build_knowledge_base, open_knowledge_base  # noqa: E402
from m3jax.serve import ServeConfig, build_app  # noqa: E402
from m3jax.train.run import save_model_dir  # noqa: E402
from test_kb_updates import EMB, _text, tiny_model  # noqa: E402

MODEL = "tinymodel"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(0)
    docs = [(10 + i, _text(rng, int(rng.integers(20, 40))), f"Title {10 + i}") for i in range(10)]
    tok, cfg, params = tiny_model(docs)
    save_model_dir(str(tmp / MODEL), cfg, params, tok)
    build_knowledge_base(str(tmp / "kb"), params, cfg, tok, docs, embedder=EMB, codec="bf16", batch_size=8,
                         show_progress=False, log=lambda *a: None)
    # one cache size (256) and two slots per group: few shapes to compile
    app, engine = build_app(str(tmp / MODEL), str(tmp / "kb"), ServeConfig(slots=2, groups=2, cache_len=256,
                                                                           min_cache_len=256), embedder=EMB)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    gen = Generator(params, cfg, tok, open_knowledge_base(str(tmp / "kb"), cfg, params).retriever(EMB, tokenizer=tok),
                    DecodeConfig(max_cache_len=256, prompt_bucket=cfg.chunk_size))
    yield {"url": url, "client": client, "docs": docs, "tok": tok, "cfg": cfg, "gen": gen, "engine": engine,
           "kb": str(tmp / "kb"), "params": params}
    srv.should_exit = True
    th.join(timeout=60)
    assert not engine.alive  # graceful shutdown stopped the decode loop


def _http(url, method="GET", body: bytes | None = None):
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def _greedy(s, prompt, mode, n):
    return s["gen"].generate([prompt], mode=mode, max_new_tokens=n).texts[0]


def test_models_health_metrics(server):
    assert [m.id for m in server["client"].models.list().data] == [MODEL]
    code, body, _ = _http(server["url"] + "/health")
    assert code == 200 and json.loads(body)["status"] == "ok"
    server["client"].completions.create(model=MODEL, prompt="ka lo", max_tokens=3, temperature=0, extra_body={"mode": "none"})
    code, body, headers = _http(server["url"] + "/metrics")
    text = body.decode()
    assert code == 200 and headers["content-type"].startswith("text/plain")
    assert 'm3jax_requests_total{mode="none",outcome="length"}' in text
    for name in ("m3jax_generated_tokens_total", "m3jax_tokens_per_second", "m3jax_queue_depth",
                 "m3jax_retrieval_seconds_bucket", "m3jax_memory_cache_hits", "m3jax_time_to_first_token_seconds"):
        assert name in text


@pytest.mark.parametrize("mode", ["memory", pytest.param("rag", marks=pytest.mark.slow), "none"])
def test_completion_matches_generator_and_attributes(server, mode):
    """Greedy completions equal Generator.generate's, in every mode; the references read are listed
    for the prompt chunks and for every generated chunk (memory), or once for the prompt (rag)."""
    c, cs = server["client"], server["cfg"].chunk_size
    prompt = server["docs"][2][1][:90]
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, extra_body={"mode": mode})
    ch = r.choices[0]
    assert ch.text == _greedy(server, prompt, mode, 40)
    assert r.usage.completion_tokens == 40 and ch.finish_reason == "length"
    refs = ch.model_extra["references"]
    gen_chunks = [x for x in refs if isinstance(x["chunk"], int)]
    assert [x["chunk"] for x in gen_chunks] == list(range(-(-40 // cs)))
    if mode == "none":
        assert all(not x["references"] for x in refs)
        return
    read = [ref for x in refs for ref in x["references"]]
    assert read and all({"id", "doc_id", "title", "score"} <= set(ref) for ref in read)
    first = refs[0]["references"]  # the prompt's first chunk is a document's own text: it comes first
    assert first[0]["doc_id"] == 12 and first[0]["title"] == "Title 12" and first[0]["score"] > 0.5
    if mode == "memory":
        assert all(x["references"] for x in gen_chunks[:1])


def test_streaming_equals_non_streaming(server):
    c = server["client"]
    prompt = server["docs"][4][1][:70]
    full = c.completions.create(model=MODEL, prompt=prompt, max_tokens=50, temperature=0).choices[0].text
    parts, refs, finish = [], [], None
    for ev in c.completions.create(model=MODEL, prompt=prompt, max_tokens=50, temperature=0, stream=True):
        parts.append(ev.choices[0].text)
        refs += ev.choices[0].model_extra["references"]
        finish = ev.choices[0].finish_reason or finish
    assert "".join(parts) == full and finish == "length"
    assert len([x for x in refs if isinstance(x["chunk"], int)]) == -(-50 // server["cfg"].chunk_size)


def test_chat(server):
    c, tok = server["client"], server["tok"]
    msgs = [{"role": "user", "content": server["docs"][1][1][:60]}]
    text = tok.apply_chat_template(msgs)
    assert "<|im_start|>user" in text  # the tokenizer has no Jinja template: ChatML
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, temperature=0, extra_body={"mode": "rag"})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    same = c.completions.create(model=MODEL, prompt=[server["cfg"].bos_id] + tok.encode(text), max_tokens=20,
                                temperature=0, extra_body={"mode": "none"})
    plain = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, temperature=0,
                                      extra_body={"mode": "none"})
    assert plain.choices[0].message.content == same.choices[0].text  # the chat prompt is the rendered template
    # RAG puts the references inside the conversation (its user turn), as the Generator does
    assert r.choices[0].message.content == _greedy(server, msgs, "rag", 20)
    assert r.choices[0].model_extra["references"][0]["chunk"] == "prompt"
    deltas = [ev.choices[0].delta.content or "" for ev in c.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=20, temperature=0, extra_body={"mode": "rag"}, stream=True)
        if ev.choices]
    assert "".join(deltas) == r.choices[0].message.content


def test_sampling_seed_stop_n(server):
    c = server["client"]
    kw = dict(model=MODEL, prompt="ka lo mi", max_tokens=30, temperature=1.0, top_p=0.9, extra_body={"mode": "none"})
    a = c.completions.create(seed=7, n=2, **kw)
    b = c.completions.create(seed=7, n=2, **kw)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]  # seeded: reproducible
    assert len(a.choices) == 2 and a.usage.completion_tokens == 60
    # the engine decodes with the Generator's own round: a request with seed 7 samples as row 0 of
    # Generator.generate with seed 7 (choice j of n gets seed 7 + j)
    dc = DecodeConfig(max_cache_len=256, prompt_bucket=server["cfg"].chunk_size, temperature=1.0, top_p=0.9)
    with Generator(server["params"], server["cfg"], server["tok"], None, dc) as gen:
        assert [gen.generate(["ka lo mi"], mode="none", max_new_tokens=30, seed=7 + j).texts[0]
                for j in range(2)] == [x.text for x in a.choices]
    full = c.completions.create(model=MODEL, prompt="ka lo mi", max_tokens=30, temperature=0).choices[0].text
    stop = full[10:13]
    r = c.completions.create(model=MODEL, prompt="ka lo mi", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_add_then_ask_delete_then_ask(server):
    """Live knowledge through the API: a new document is read right after it is added, never after
    it is deleted, and the change is on disk (a restart serves the same knowledge)."""
    c, url = server["client"], server["url"]
    new_text = "zozo gaga dudu pepe riri vovo tata susu nene mimi lolo kaka zozo gaga dudu pepe."
    ask = dict(model=MODEL, prompt=new_text[:40], max_tokens=4, temperature=0)

    def read_docs():
        refs = c.completions.create(**ask).choices[0].model_extra["references"]
        return {ref["doc_id"] for x in refs for ref in x["references"]}

    code, body, _ = _http(url + "/v1/knowledge", "POST",
                          json.dumps({"documents": [{"text": new_text, "title": "New fact"}]}).encode())
    assert code == 200, body
    (doc,) = json.loads(body)["data"]
    assert doc["title"] == "New fact" and doc["references"] >= 1
    assert doc["id"] in read_docs()
    assert doc["id"] in {r.doc_id for r in open_knowledge_base(server["kb"]).documents()}  # on disk
    code, body, _ = _http(url + f"/v1/knowledge/{doc['id']}", "DELETE")
    assert code == 200 and json.loads(body)["deleted"] is True
    assert doc["id"] not in read_docs()
    assert doc["id"] not in {r.doc_id for r in open_knowledge_base(server["kb"]).documents()}
    code, body, _ = _http(url + f"/v1/knowledge/{doc['id']}", "DELETE")
    assert code == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_bad_requests(server):
    c, url = server["client"], server["url"]
    code, body, _ = _http(url + "/v1/completions", "POST", b'{"model": "tinymodel", "prompt": ')
    err = json.loads(body)["error"]
    assert code == 400 and err["code"] == "invalid_json" and err["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-nope", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="hi", max_tokens=-3)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="ka " * 400, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"mode": "telepathy"})
    assert e.value.body["param"] == "mode"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    code, body, _ = _http(url + "/v1/knowledge", "POST", b'{"documents": []}')
    assert code == 400 and "error" in json.loads(body)


def test_cancelled_stream_frees_its_slot(server):
    c, url = server["client"], server["url"]
    stream = c.completions.create(model=MODEL, prompt="ka lo", max_tokens=200, temperature=0, stream=True,
                                  extra_body={"mode": "memory"})
    next(iter(stream))
    stream.close()  # the client goes away mid-stream
    for _ in range(200):
        h = json.loads(_http(url + "/health")[1])
        if h["busy"] == 0:
            break
        time.sleep(0.05)
    assert h["busy"] == 0 and h["status"] == "ok"


def test_full_queue_answers_429(server):
    """With the queue full, a request is refused with 429 + Retry-After; the queued one still runs."""
    import dataclasses

    eng, c = server["engine"], server["client"]
    old = eng.serve_config
    eng._admit = lambda: None  # hold admissions: the first request stays queued
    eng.serve_config = dataclasses.replace(old, queue_size=1)
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("r", c.completions.create(
        model=MODEL, prompt="ka lo", max_tokens=3, temperature=0, extra_body={"mode": "none"})))
    try:
        th.start()
        for _ in range(200):
            if len(eng.queue) == 1:
                break
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="ka lo", max_tokens=3, extra_body={"mode": "none"})
        assert e.value.response.headers["retry-after"] == str(old.retry_after_s)
        assert e.value.body["type"] == "rate_limit_error"
    finally:
        eng.serve_config = old
        del eng._admit
    th.join(timeout=60)
    assert out["r"].usage.completion_tokens == 3


def test_cli_serve_flags(monkeypatch):
    import m3jax.serve
    from m3jax import cli

    got = {}
    monkeypatch.setattr(m3jax.serve, "run", lambda model, kb, **kw: got.update(model=model, kb=kb, **kw))
    assert cli.main(["serve", "--model", "M", "--kb", "K", "--port", "9001", "--slots", "4",
                     "--max-cache-len", "512", "--queue-size", "3"]) == 0
    sc = got["serve_config"]
    assert (got["model"], got["kb"], got["host"], got["port"]) == ("M", "K", "127.0.0.1", 9001)
    assert (sc.slots, sc.groups, sc.cache_len, sc.queue_size) == (4, 2, 512, 3)


def test_timed_out_request_is_ended(server):
    """A request past its timeout is ended (504, OpenAI error body) and holds no slot."""
    import dataclasses

    eng, c = server["engine"], server["client"]
    old = eng.serve_config
    eng.serve_config = dataclasses.replace(old, request_timeout_s=1e-6)
    try:
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model=MODEL, prompt="ka lo", max_tokens=3, extra_body={"mode": "none"})
    finally:
        eng.serve_config = old
    assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
    assert json.loads(_http(server["url"] + "/health")[1])["busy"] == 0
