"""Tokenizers: a byte-level BPE trained on a corpus, any `tokenizer.json`, or a GGUF vocab.

All are wrapped by `Tokenizer`, which knows its special ids and the reference prefix
("BOS Reference:") that Memory3 prepends to references and to every context.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

REFERENCE_TEXT = "Reference:"
_META = "m3jax_tokenizer.json"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids m3jax needs."""

    def __init__(self, tk: HFTokenizer, *, bos_id: int, eos_id: int, pad_id: int,
                 chat_template: str | None = None, add_bos: bool = True):
        self.tk = tk
        self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
        self.chat_template = chat_template
        self.add_bos = add_bos
        # Files shipped with other tools (e.g. MiniLM's) can carry padding/truncation: never here.
        self.tk.no_padding()
        self.tk.no_truncation()

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if bos else ids

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False) -> list[list[int]]:
        out = [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]
        return [[self.bos_id] + ids for ids in out] if bos else out

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def reference_prefix(self) -> tuple[int, ...]:
        """BOS followed by the tokens of "Reference:" (MEMORY3.md, "Writing a memory")."""
        return (self.bos_id, *self.encode(REFERENCE_TEXT))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.tk.save(os.path.join(directory, "tokenizer.json"))
        meta = {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "chat_template": self.chat_template, "add_bos": self.add_bos}
        with open(os.path.join(directory, _META), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """Load a directory written by `save`, or any directory / file with a `tokenizer.json`
        (special ids then read from its added tokens: <s>/<bos>, </s>/<eos>, <pad>)."""
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"no tokenizer.json at {path!r}")
        tk = HFTokenizer.from_file(file)
        meta_path = os.path.join(directory, _META)
        if os.path.exists(meta_path):
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            return cls(tk, **meta)
        vocab = tk.get_vocab(with_added_tokens=True)
        def find(*names: str, default: int | None = None) -> int:
            for n in names:
                if n in vocab:
                    return vocab[n]
            if default is None:
                raise ValueError(f"{file}: cannot find any of the special tokens {names}")
            return default
        bos = find("<s>", "<bos>", "<|begin_of_text|>", "[CLS]", "<|endoftext|>")
        eos = find("</s>", "<eos>", "<|end_of_text|>", "[SEP]", "<|endoftext|>")
        pad = find("<pad>", "[PAD]", default=eos)
        return cls(tk, bos_id=bos, eos_id=eos, pad_id=pad)


SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2 (ModelConfig defaults)


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, *, min_frequency: int = 2,
              show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style, digits split) on `texts`; <pad>=0, <bos>=1, <eos>=2."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tk.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tk, bos_id=0 + 1, eos_id=2, pad_id=0)
