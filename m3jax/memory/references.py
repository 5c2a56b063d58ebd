"""References: the knowledge-base text units that become explicit memories.

A document is cut into **references** of at most `max_tokens` tokens (the model's
`reference_len`, 128 in the paper; MEMORY3.md, "What one explicit memory is"). Cuts fall on token
boundaries, and every reference keeps its document id and the exact character span it covers, so it
can be shown as text: `doc_text[ref.char_start:ref.char_end]`.

Break rule (greedy, left to right). From the first token `s` not yet covered, if the rest of the
document fits in `max_tokens` it becomes the last reference. Otherwise the reference ends before
token `b`, the largest `b` in `(s, hi]` among, in this order of preference, where
`hi = s + max_tokens`, lowered to `n - max_tokens // 8` when the `n - s` tokens left fit in two
references (so that the last reference of a document is not a tiny tail):

1. a **sentence break** with at least `max_tokens // 2` tokens in the reference: whitespace
   separates tokens `b-1` and `b`, and the text before that whitespace ends with `.`, `!`, `?`,
   `;` or `:` (optionally followed by closing quotes or brackets), or the whitespace holds a
   newline (a paragraph break);
2. a **word break**: whitespace separates tokens `b-1` and `b` (in a byte-level BPE the space
   usually starts token `b`, e.g. "Ġworld");
3. a **character break**: tokens `b-1` and `b` cover disjoint characters (a character that the
   byte-level BPE writes as several byte tokens is never split between two references);
4. otherwise `s + max_tokens` (only possible for a single character longer than `max_tokens`
   tokens, which cannot happen with byte-level BPE).

Reference spans use the tokens' own offsets, so consecutive references of a document are
contiguous: `refs[k].char_end == refs[k + 1].char_start`, the first starts at the first token and
the last ends at the last token. The whitespace at a word break is inside the next reference (in
its first token), not dropped. Re-tokenizing a reference's text gives back its tokens exactly
when the reference ends on a word or sentence break (the pre-tokenizer splits at whitespace, so a
BPE merge never crosses such a break); after a character break inside a long word it may differ.
A document with no tokens (empty text) gives no reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np

_SENTENCE_END = re.compile(r"[.!?;:][\"'\)\]\u201d\u2019»]*$")


@dataclass(frozen=True)
class Reference:
    """One reference: `tokens` encode `doc_text[char_start:char_end]` of document `doc_id`."""

    ref_id: int
    doc_id: int
    char_start: int
    char_end: int
    tokens: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.tokens)

    def text(self, doc_text: str) -> str:
        """This reference's text, given the text of its document."""
        return doc_text[self.char_start:self.char_end]


def _break_kind(text: str, prev_end: int, next_start: int) -> int:
    """Quality of a break between a token ending at `prev_end` and one starting at `next_start`:
    0 none (the tokens share a character), 1 character, 2 word, 3 sentence."""
    if prev_end > next_start:
        return 0
    # Whitespace around the break: the gap between the tokens (normally empty), the tail of the
    # previous token and the head of the next one.
    lo = prev_end
    while lo > 0 and text[lo - 1].isspace():
        lo -= 1
    hi = next_start
    while hi < len(text) and text[hi].isspace():
        hi += 1
    if lo == prev_end and hi == next_start:
        return 1
    space = text[lo:hi]
    if "\n" in space or _SENTENCE_END.search(text[max(0, lo - 8):lo]):
        return 3
    return 2


def _best_break(text: str, offsets: list[tuple[int, int]], s: int, hi: int, min_sentence: int) -> int:
    """The break `b` in (s, hi] preferred by the module's rule, or 0 when there is none."""
    best = {1: 0, 2: 0, 3: 0}
    for b in range(hi, s, -1):
        if b < min_sentence and best[2]:
            break  # only word breaks are left to find, and the largest one is known
        kind = _break_kind(text, offsets[b - 1][1], offsets[b][0])
        if kind == 3 and b < min_sentence:
            kind = 2  # a sentence break too early to be worth a short reference
        if kind and not best[kind]:
            best[kind] = b
            if kind == 3:
                break
    return best[3] or best[2] or best[1]


def _split_one(text: str, offsets: list[tuple[int, int]], max_tokens: int) -> list[tuple[int, int]]:
    """Token index ranges [s, e) of the references of one document."""
    n = len(offsets)
    out = []
    s = 0
    while s < n:
        if n - s <= max_tokens:
            out.append((s, n))
            break
        min_sentence = s + max(1, max_tokens // 2)
        e = 0
        if n - s <= 2 * max_tokens:  # two references left: keep the last one from being tiny
            hi = max(s + 1, min(s + max_tokens, n - max_tokens // 8))
            e = _best_break(text, offsets, s, hi, min_sentence)
        e = e or _best_break(text, offsets, s, s + max_tokens, min_sentence) or s + max_tokens
        out.append((s, e))
        s = e
    return out


def split_references(docs: Iterable[tuple[int, str]], tokenizer, max_tokens: int = 128, *,
                     batch_size: int = 4096) -> list[Reference]:
    """Cut documents `(doc_id, text)` into references of at most `max_tokens` tokens.

    tokenizer: an `m3jax.tokenizer.Tokenizer` (its `tk` is a `tokenizers.Tokenizer` that reports
    character offsets). References are numbered `ref_id = 0, 1, ...` in document order. See the
    module docstring for the break rule.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    refs: list[Reference] = []
    batch: list[tuple[int, str]] = []

    def flush() -> None:
        encs = tokenizer.tk.encode_batch([t for _, t in batch], add_special_tokens=False)
        for (doc_id, text), enc in zip(batch, encs):
            ids, offsets = enc.ids, enc.offsets
            for s, e in _split_one(text, offsets, max_tokens):
                refs.append(Reference(len(refs), int(doc_id), offsets[s][0], offsets[e - 1][1],
                                      tuple(ids[s:e])))
        batch.clear()

    for doc_id, text in docs:
        batch.append((doc_id, text))
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return refs


def pad_references(refs: Iterable[Reference], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stack references into `tokens` int32 [n, length] (valid tokens first, then `pad_id`) and
    `mask` bool [n, length] (True on valid tokens), the input of the memory write path."""
    refs = list(refs)
    tokens = np.full((len(refs), length), pad_id, np.int32)
    mask = np.zeros((len(refs), length), bool)
    for i, r in enumerate(refs):
        if len(r.tokens) > length:
            raise ValueError(f"reference {r.ref_id} has {len(r.tokens)} tokens, more than length={length}")
        tokens[i, :len(r.tokens)] = r.tokens
        mask[i, :len(r.tokens)] = True
    return tokens, mask
