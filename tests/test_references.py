"""References: <= max tokens, exact contiguous character spans, text round trip, padding."""

import numpy as np
import pytest

from m3jax.memory.errors import BankError
from m3jax.memory.references import Reference, ReferenceBatch, pad_references, split_references
from m3jax.tokenizer import train_bpe

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and largest city of France, with 2,102,650 residents in 2023.",
    "Its café culture (and the Seine!) attract millions of visitors every year.",
    "Emoji such as 😀 and 🎉 are written as several byte-level tokens.",
    "Mathematics includes the study of numbers, formulas, shapes and quantities; it is old.",
    "\"Quoted sentences end here.\" Then a new one starts.",
    "Numbers like 3.14159 and 1,000,000 are split into digits.",
]


def _doc(rng: np.random.Generator, n_sentences: int) -> str:
    parts = []
    for i in range(n_sentences):
        parts.append(_SENTENCES[rng.integers(len(_SENTENCES))])
        parts.append("\n\n" if rng.random() < 0.1 else ("  " if rng.random() < 0.05 else " "))
    return "".join(parts).strip()


@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng(0)
    return train_bpe([_doc(rng, 20) for _ in range(50)], vocab_size=400)


@pytest.fixture(scope="module")
def docs():
    rng = np.random.default_rng(1)
    out = [(i, _doc(rng, int(rng.integers(1, 40)))) for i in range(60)]
    out.append((60, "Short."))
    out.append((61, ""))  # no tokens: no reference
    out.append((62, "x" * 700))  # one long word: only character breaks
    out.append((63, "😀" * 100))  # multi-byte characters, no whitespace
    return out


def _check_doc_refs(doc_id, text, refs, tok, max_tokens):
    """Spans are contiguous, in order, and cover the whole tokenized text."""
    ids = tok.encode(text)
    if not ids:
        assert refs == []
        return
    enc = tok.tk.encode(text, add_special_tokens=False)
    assert refs[0].char_start == enc.offsets[0][0]
    assert refs[-1].char_end == enc.offsets[-1][1]
    for a, b in zip(refs, refs[1:]):
        assert a.char_end == b.char_start, (doc_id, a, b)
    assert [t for r in refs for t in r.tokens] == ids  # concatenated tokens = the document's
    for r in refs:
        assert r.doc_id == doc_id
        assert 1 <= len(r.tokens) <= max_tokens
        assert r.char_start < r.char_end


@pytest.mark.parametrize("max_tokens", [128, 32, 7])
def test_references_cover_documents(tok, docs, max_tokens):
    refs = split_references(docs, tok, max_tokens=max_tokens)
    assert [r.ref_id for r in refs] == list(range(len(refs)))
    by_doc: dict[int, list[Reference]] = {}
    for r in refs:
        by_doc.setdefault(r.doc_id, []).append(r)
    assert list(by_doc) == sorted(by_doc)  # document order
    for doc_id, text in docs:
        _check_doc_refs(doc_id, text, by_doc.get(doc_id, []), tok, max_tokens)
    assert 61 not in by_doc


def test_text_round_trip(tok, docs):
    """Re-tokenizing a reference's text gives back its tokens at word/sentence breaks; a cut
    inside a word (documents 62, 63) may not. Decoding always gives back the text."""
    refs = split_references(docs, tok, max_tokens=32)
    texts = dict(docs)
    for r in refs:
        t = r.text(texts[r.doc_id])
        assert tok.decode(r.tokens) == t
        if r.doc_id < 60:
            assert tuple(tok.encode(t)) == r.tokens


def test_breaks_prefer_sentences_and_words(tok, docs):
    refs = split_references(docs[:60], tok, max_tokens=128)  # several sentences per reference
    texts = dict(docs)
    ends = [r for r in refs if r.char_end < len(texts[r.doc_id])]  # references followed by more
    assert ends
    for r in ends:  # every break is at whitespace (usually the next reference starts with it)
        t = texts[r.doc_id]
        assert t[r.char_end].isspace() or t[r.char_end - 1].isspace()
    sentence = sum(texts[r.doc_id][:r.char_end].rstrip()[-1] in ".!?;:\"" for r in ends)
    assert sentence / len(ends) > 0.9


def test_no_character_split(tok, docs):
    """Multi-byte characters written as several tokens are never cut between references."""
    refs = split_references([docs[-1]], tok, max_tokens=7)
    assert len(refs) > 1
    text = docs[-1][1]
    for r in refs:
        assert r.char_end - r.char_start >= 1
        assert tok.decode(r.tokens) == r.text(text)  # whole emoji only
    assert "".join(r.text(text) for r in refs) == text


def test_short_docs_are_one_reference(tok):
    docs = [(5, "Hello world."), (9, "A lead about one reference. It has two sentences.")]
    refs = split_references(docs, tok, max_tokens=128)
    assert [(r.ref_id, r.doc_id) for r in refs] == [(0, 5), (1, 9)]
    for r, (_, text) in zip(refs, docs):
        assert r.text(text) == text
        assert list(r.tokens) == tok.encode(text)


def test_no_tiny_tail(tok):
    """A document a little longer than max_tokens is cut so its last reference is not tiny."""
    rng = np.random.default_rng(3)
    tested = 0
    for _ in range(40):
        text = _doc(rng, int(rng.integers(1, 4)))
        n = len(tok.encode(text))
        if not 32 < n <= 64:
            continue
        refs = split_references([(0, text)], tok, max_tokens=32)
        assert len(refs) >= 2 and len(refs[-1].tokens) >= 32 // 8
        tested += 1
    assert tested >= 5


def test_pad_references(tok, docs):
    refs = split_references(docs[:10], tok, max_tokens=32)
    tokens, mask = pad_references(refs, 40, pad_id=0)
    assert tokens.shape == mask.shape == (len(refs), 40)
    assert tokens.dtype == np.int32 and mask.dtype == bool
    for i, r in enumerate(refs):
        n = len(r.tokens)
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert tuple(tokens[i, :n]) == r.tokens and (tokens[i, n:] == 0).all()
    empty_t, empty_m = pad_references([], 16)
    assert empty_t.shape == empty_m.shape == (0, 16)
    with pytest.raises(ValueError, match="more than length"):
        pad_references(refs, 4)


def test_reference_batch_is_the_columns_of_references(tok, docs):
    """One reference type: `ReferenceBatch.of` turns `Reference`s into the bank's columns and
    `references` gives the same `Reference`s back; anything else is refused."""
    refs = split_references(docs[:6], tok, max_tokens=32)
    batch = ReferenceBatch.of(refs, 40, pad_id=0)
    tokens, _ = pad_references(refs, 40)
    np.testing.assert_array_equal(batch.tokens, tokens)
    assert batch.lengths.tolist() == [len(r) for r in refs]
    assert batch.info().tolist() == [[len(r), r.doc_id, r.char_start, r.char_end] for r in refs]
    assert batch.references([r.ref_id for r in refs]) == refs
    assert batch.take(slice(2, 4)).references([2, 3]) == refs[2:4]
    with pytest.raises(BankError, match="reference 0 is a dict, not an m3jax.memory.references.Reference"):
        ReferenceBatch.of([{"tokens": [5], "doc_id": 0, "char_start": 0, "char_end": 1}], 40)
    with pytest.raises(BankError, match="more than reference_len=4"):
        ReferenceBatch.of(refs, 4)


def test_wiki_leads_speed_and_size():
    """The shipped leads: about one reference each, split quickly (tokenizer trained on a sample)."""
    import time

    from m3jax.assets import wiki_leads

    arts = wiki_leads()
    tok = train_bpe([a.text for a in arts[:1500]], vocab_size=4096)
    docs = [(a.doc_id, a.text) for a in arts]
    t = time.perf_counter()
    refs = split_references(docs, tok, max_tokens=128)
    elapsed = time.perf_counter() - t
    assert all(len(r.tokens) <= 128 for r in refs)
    assert len(arts) <= len(refs) < 2 * len(arts)
    assert {r.doc_id for r in refs} == {a.doc_id for a in arts if a.text}
    assert elapsed < 30, elapsed
