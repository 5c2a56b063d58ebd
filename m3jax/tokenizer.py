"""Tokenizers: a byte-level BPE trained on a corpus, any `tokenizer.json`, or a GGUF vocab (a
byte-level BPE or a SentencePiece BPE); chat templates, and RAG references inside a conversation.

All are wrapped by `Tokenizer`, which knows its special ids and the reference prefix
("BOS Reference:") that Memory3 prepends to references and to every context.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers

REFERENCE_TEXT = "Reference:"
_META = "m3jax_tokenizer.json"
_META_FIELDS = {"bos_id", "eos_id", "pad_id", "chat_template", "add_bos", "stop_ids"}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids m3jax needs. `stop_ids`: more ids that end a
    generated sequence besides `eos_id` (Llama 3 Instruct's <|eot_id|>, <|eom_id|>)."""

    def __init__(self, tk: HFTokenizer, *, bos_id: int, eos_id: int, pad_id: int,
                 chat_template: str | None = None, add_bos: bool = True, stop_ids: Iterable[int] = ()):
        self.tk = tk
        self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
        self.stop_ids = tuple(dict.fromkeys(int(t) for t in stop_ids if int(t) != self.eos_id))
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

    def token_text(self, token_id: int) -> str | None:
        """The text of one token id (special tokens included), None outside the vocabulary."""
        return self.tk.id_to_token(int(token_id))

    def document_start_id(self) -> int:
        """The id that starts a document for this model. A base model's BOS; but a chat model whose
        BOS is a chat-turn marker (its text appears in the chat template, as SmolLM2-Instruct's
        `<|im_start|>`) was pretrained on documents separated by `<|endoftext|>`: that id when the
        vocabulary has it (SmolLM2: Wikipedia perplexity 14.5 against 16.8 with `<|im_start|>`)."""
        bos = self.token_text(self.bos_id)
        if not self.chat_template or not bos or bos not in self.chat_template:
            return self.bos_id
        sep = self.tk.token_to_id(_DOCUMENT_SEPARATOR)
        return self.bos_id if sep is None else int(sep)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                            *, system_prompt: str | None = None) -> str:
        """`messages` ([{"role": ..., "content": ...}]) rendered by the model's own chat template
        (`chat_template`, from tokenizer_config.json or the GGUF's `tokenizer.chat_template`) in
        Jinja's sandbox (`render_chat_template`). `system_prompt` prepends a system message when
        the conversation has none. A tokenizer without a template renders ChatML
        (`<|im_start|>role\ncontent<|im_end|>\n`, then `<|im_start|>assistant\n`)."""
        messages = [dict(m) for m in messages]
        for i, m in enumerate(messages):
            if "role" not in m or "content" not in m:
                raise ValueError(f"chat message {i} needs 'role' and 'content' keys, got {sorted(m)}")
        if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            messages.insert(0, {"role": "system", "content": system_prompt})
        special = {"bos_token": self.token_text(self.bos_id) or "", "eos_token": self.token_text(self.eos_id) or ""}
        return render_chat_template(self.chat_template or CHATML_TEMPLATE, messages,
                                    add_generation_prompt=add_generation_prompt, **special)

    def encode_chat(self, messages: Sequence[Mapping[str, str]], *, system_prompt: str | None = None,
                    references: Sequence[str] = ()) -> list[int]:
        """Token ids of a conversation with the generation prompt, without a leading document
        start: `Generator` puts the model's own `bos_id` first, so a BOS that the template writes
        itself (`{{ bos_token }}`, as Llama 3's does) is dropped rather than doubled.
        `references` (RAG): reference texts put inside the conversation (`with_references`)."""
        if references:
            messages = with_references(messages, references)
        text = self.apply_chat_template(messages, system_prompt=system_prompt)
        bos = self.token_text(self.bos_id)
        if bos and "bos_token" in (self.chat_template or "") and text.startswith(bos):
            text = text[len(bos):]
        return self.encode(text)

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def from_gguf(cls, path_or_reader: Any) -> "Tokenizer":
        """The tokenizer stored in a GGUF file (see `load_gguf_tokenizer`)."""
        return load_gguf_tokenizer(path_or_reader)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.tk.save(os.path.join(directory, "tokenizer.json"))
        meta = {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "chat_template": self.chat_template, "add_bos": self.add_bos, "stop_ids": list(self.stop_ids)}
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
        try:
            tk = HFTokenizer.from_file(file)
        except Exception as e:  # noqa: BLE001 - the Rust library raises its own type on bad files
            raise ValueError(f"{file}: not a readable tokenizer.json ({' '.join(str(e).split())})") from None
        meta_path = os.path.join(directory, _META)
        if os.path.exists(meta_path):
            try:
                with open(meta_path, encoding="utf-8") as f:
                    meta = json.load(f)
                if not isinstance(meta, dict) or set(meta) - _META_FIELDS:
                    raise ValueError(f"expected an object with {sorted(_META_FIELDS)}")
                for k in ("bos_id", "eos_id", "pad_id"):
                    if isinstance(meta.get(k), bool) or not isinstance(meta.get(k), int) or meta[k] < 0:
                        raise ValueError(f"{k} is {meta.get(k)!r}, not a token id")
                stops = meta.get("stop_ids", [])
                if not isinstance(stops, list) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0
                                                      for t in stops):
                    raise ValueError(f"stop_ids is {stops!r}, not a list of token ids")
                return cls(tk, **meta)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError, TypeError) as e:
                raise ValueError(f"{meta_path}: damaged ({e})") from None
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


# ---------------------------------------------------------------------- chat templates
_DOCUMENT_SEPARATOR = "<|endoftext|>"
# The template used when a tokenizer has none (ChatML, the format of SmolLM2 and Qwen).
CHATML_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


class ChatTemplateError(ValueError):
    """A chat template that does not parse or fails while rendering."""


def _last_user_turn(messages: Sequence[Mapping[str, Any]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    raise ValueError("RAG in a conversation needs a user turn (the question the references are retrieved for)")


def chat_question(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text that RAG retrieves with for a conversation: its last user turn (not the system
    turn a template may put first)."""
    return str(messages[_last_user_turn(messages)]["content"])


def with_references(messages: Sequence[Mapping[str, Any]], references: Sequence[str]) -> list[dict[str, Any]]:
    """The conversation with RAG's reference texts inside it, as chat RAG is done: in the last user
    turn, before the question, one paragraph "Reference: TEXT" each. The system turn and the
    earlier turns stay as they are, so the model's own template frames everything as it was
    trained to. ValueError when the conversation has no user turn."""
    out = [dict(m) for m in messages]
    last = _last_user_turn(out)
    refs = "".join(f"{REFERENCE_TEXT} {r.strip()}\n\n" for r in references)
    out[last]["content"] = refs + str(out[last]["content"])
    return out


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool = True, **variables: Any) -> str:
    """Render a Hugging Face chat template (Jinja) in `jinja2.sandbox.ImmutableSandboxedEnvironment`:
    a template from a model file cannot call arbitrary Python, reach attributes outside the
    sandbox's safe set, or mutate the messages. `raise_exception(msg)` (used by templates to refuse a
    conversation) raises ChatTemplateError; `strftime_now(fmt)` gives today's date (Llama 3.1)."""
    import datetime

    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str) -> None:
        raise ChatTemplateError(f"the chat template refused the conversation: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    try:
        return env.from_string(template).render(messages=list(messages),
                                                add_generation_prompt=add_generation_prompt, **variables)
    except ChatTemplateError:
        raise
    except TemplateError as e:
        raise ChatTemplateError(f"chat template error: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------- GGUF vocab

# gguf.TokenType values
_GGUF_NORMAL, _GGUF_UNKNOWN, _GGUF_CONTROL, _GGUF_USER_DEFINED = 1, 2, 3, 4


def gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    """The value of GGUF metadata `key` (`default` when absent). A value whose bytes do not
    decode (a string that is not UTF-8, a damaged array) raises ValueError naming the file."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:  # noqa: BLE001 - the reader decodes lazily and fails in several ways
        raise ValueError(f"{getattr(reader, 'path', 'GGUF file')}: metadata {key!r} is damaged "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def open_gguf(path: str) -> Any:
    """A `gguf.GGUFReader` of `path`. A file that is missing, truncated, damaged or not GGUF raises
    FileNotFoundError / ValueError naming it (never the reader's own low-level errors)."""
    import gguf  # local: only GGUF users need it

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader fails with numpy / struct / key errors on bad bytes
        raise ValueError(f"{path}: not a readable GGUF file (truncated or damaged: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    reader.path = path  # for the messages of gguf_field and of the importers
    return reader


def _string_list(v: Any, key: str, where: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
        raise ValueError(f"{where}: {key} must be a list of strings")
    return v


# The text splits of the byte-level BPEs that llama.cpp names in tokenizer.ggml.pre, as the models'
# own tokenizers define them (a Split regex, isolated, then GPT-2 byte level without its own regex):
# Llama 3's ("llama-bpe": the pattern of transformers' TikTokenConverter and of llama.cpp's LLAMA3
# split, numbers in groups of up to 3) and Qwen2's ("qwen2": transformers' Qwen2Tokenizer
# PRETOKENIZE_REGEX, digits one by one). tests/fixtures/make_tokenizer_fixtures.py records what
# transformers' own tokenizers make of tricky text with them.
_LETTERS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GGUF_PRE_SPLIT = {"llama-bpe": _LETTERS + r"\p{N}{1,3}" + _REST,  # Llama 3: numbers in groups of 3
                   "qwen2": _LETTERS + r"\p{N}" + _REST}  # Qwen2/2.5/3: digits one by one
# The rest of those tokenizers: Qwen2's normalizes text to NFC first; Llama 3's takes a piece that
# is in the vocabulary whole, before any merge (BPE `ignore_merges`, tiktoken's rule; llama.cpp
# does the same for LLAMA3).
_GGUF_PRE_NFC = ("qwen2",)
_GGUF_PRE_IGNORE_MERGES = ("llama-bpe",)


def gguf_pre_tokenizer(pre: Any, where: str) -> Any:
    """The `tokenizers` pre-tokenizer of a GGUF's tokenizer.ggml.pre: SmolLM's ("smollm", or
    absent: digits one by one, then GPT-2 byte level), Llama 3's ("llama-bpe") or Qwen2's ("qwen2").
    Others are refused: a wrong split would tokenize text silently differently from the model."""
    if pre in (None, "smollm"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    if pre in _GGUF_PRE_SPLIT:
        from tokenizers import Regex

        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_GGUF_PRE_SPLIT[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(f"{where}: tokenizer.ggml.pre={pre!r} is not supported (m3jax rebuilds "
                     f"{['smollm', *_GGUF_PRE_SPLIT]})")


def _byte_level_bpe(reader: Any, vocab: dict[str, int], where: str) -> HFTokenizer:
    """The byte-level BPE of a GGUF (tokenizer.ggml.model "gpt2"): its vocab and merges, the text
    split of its tokenizer.ggml.pre (`gguf_pre_tokenizer`), a ByteLevel decoder."""
    merges = gguf_field(reader, "tokenizer.ggml.merges")
    if merges is None:
        raise ValueError(f"{where}: tokenizer.ggml.merges is missing")
    pairs = []
    for m in _string_list(merges, "tokenizer.ggml.merges", where):
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{where}: malformed merge {m!r}")
        pairs.append((parts[0], parts[1]))
    pre = gguf_field(reader, "tokenizer.ggml.pre")
    try:
        tk = HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False, ignore_merges=pre in _GGUF_PRE_IGNORE_MERGES))
    except Exception as e:  # noqa: BLE001 - the Rust library raises its own type (e.g. a merge of unknown tokens)
        raise ValueError(f"{where}: the GGUF vocabulary does not form a BPE ({e})") from None
    tk.pre_tokenizer = gguf_pre_tokenizer(pre, where)
    if pre in _GGUF_PRE_NFC:
        tk.normalizer = normalizers.NFC()
    tk.decoder = decoders.ByteLevel()
    return tk


_SPM_SPACE = "\u2581"  # SentencePiece's visible space


def _sentencepiece_bpe(reader: Any, tokens: list[str], types: list[int], where: str) -> HFTokenizer:
    """The SentencePiece BPE of a GGUF (tokenizer.ggml.model "llama": Llama 1/2, Mistral, TinyLlama)
    as a `tokenizers` BPE, from its pieces, scores and piece types.

    SentencePiece encodes by merging, again and again, the adjacent pair whose joined piece is in
    the vocabulary with the highest score. That is a BPE whose merges are every split (left, right)
    of a normal piece into two normal pieces, ranked by the joined piece's score. A character
    outside the vocabulary falls back to its UTF-8 bytes (<0xXX> pieces), else <unk>. A space is
    "▁", and with tokenizer.ggml.add_space_prefix (the default) one "▁" goes before the text, and,
    as llama.cpp does, before the text that follows a special token; decoding undoes both."""
    scores = gguf_field(reader, "tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens) or \
            not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores):
        raise ValueError(f"{where}: tokenizer.ggml.scores must list one finite score per token")
    if gguf_field(reader, "tokenizer.ggml.remove_extra_whitespaces", False):
        raise ValueError(f"{where}: tokenizer.ggml.remove_extra_whitespaces=true is not supported (SentencePiece "
                         "whitespace folding)")
    if gguf_field(reader, "tokenizer.ggml.precompiled_charsmap"):
        raise ValueError(f"{where}: tokenizer.ggml.precompiled_charsmap (SentencePiece normalization rules) is not "
                         "supported")
    unk = gguf_field(reader, "tokenizer.ggml.unknown_token_id", 0)
    if isinstance(unk, bool) or not isinstance(unk, int) or not 0 <= unk < len(tokens):
        raise ValueError(f"{where}: tokenizer.ggml.unknown_token_id={unk!r} is not a token id of its "
                         f"{len(tokens)} tokens")
    normal = {t for t, ty in zip(tokens, types) if ty in (_GGUF_NORMAL, _GGUF_USER_DEFINED)}
    merges = []
    for i in sorted(range(len(tokens)), key=lambda i: (-scores[i], i)):  # best first, then by id
        piece = tokens[i]
        if piece in normal:
            merges.extend((piece[:k], piece[k:]) for k in range(1, len(piece))
                          if piece[:k] in normal and piece[k:] in normal)
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = HFTokenizer(models.BPE(vocab, merges, unk_token=tokens[unk], fuse_unk=True, byte_fallback=True))
    prefix = bool(gguf_field(reader, "tokenizer.ggml.add_space_prefix", True))
    spaces = [normalizers.Replace(" ", _SPM_SPACE)]
    tk.normalizer = normalizers.Sequence(([normalizers.Prepend(_SPM_SPACE)] if prefix else []) + spaces)
    tk.decoder = decoders.Sequence([decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                   + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tk


def gguf_end_ids(reader: Any, n_tokens: int, where: str) -> tuple[int, ...]:
    """The ids that end a generation in a GGUF: tokenizer.ggml.eos_token_id first, then the end of
    turn and end of message ids (eot / eom: Llama 3 Instruct's <|eot_id|>, <|eom_id|>) when given."""
    out = []
    for key in ("eos", "eot", "eom"):
        v = gguf_field(reader, f"tokenizer.ggml.{key}_token_id")
        if v is None:
            if key == "eos":
                raise ValueError(f"{where}: tokenizer.ggml.eos_token_id is missing")
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n_tokens:
            raise ValueError(f"{where}: tokenizer.ggml.{key}_token_id={v!r} is not a token id of its "
                             f"{n_tokens} tokens")
        out.append(v)
    return tuple(dict.fromkeys(out))


def load_gguf_tokenizer(path_or_reader: Any) -> Tokenizer:
    """Rebuild the tokenizer of a GGUF file: a byte-level BPE (tokenizer.ggml.model "gpt2", from
    its vocab and merges: `_byte_level_bpe`) or a SentencePiece BPE ("llama", from its pieces and
    scores: `_sentencepiece_bpe`).

    Tokens of type CONTROL (3) (and UNKNOWN (2) of a SentencePiece vocab) become special tokens and
    USER_DEFINED (4) added tokens, so both encode as single ids. bos/eos/pad come from the
    `tokenizer.ggml.*_token_id` fields (pad defaults to eos), the further ids that end a generation
    from the eot / eom ids (`gguf_end_ids`), the chat template from `tokenizer.chat_template`.
    """
    import gguf  # local: only GGUF users need it

    reader = path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) else open_gguf(path_or_reader)
    where = getattr(reader, "path", path_or_reader)
    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"{where}: tokenizer.ggml.model={kind!r} is not supported (only 'gpt2', the byte-level "
                         "BPE, and 'llama', the SentencePiece BPE)")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{where}: tokenizer.ggml.tokens is missing")
    tokens = _string_list(tokens, "tokenizer.ggml.tokens", where)
    types = gguf_field(reader, "tokenizer.ggml.token_type") or [_GGUF_NORMAL] * len(tokens)
    if not isinstance(types, list) or len(types) != len(tokens):
        raise ValueError(f"{where}: tokenizer.ggml.token_type must list one type per token")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{where}: tokenizer.ggml.tokens holds duplicate tokens")
    tk = _byte_level_bpe(reader, vocab, where) if kind == "gpt2" else _sentencepiece_bpe(reader, tokens, types, where)
    special_types = (_GGUF_CONTROL,) if kind == "gpt2" else (_GGUF_CONTROL, _GGUF_UNKNOWN)
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in special_types]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == _GGUF_USER_DEFINED]
    if special:
        tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)
    ends = gguf_end_ids(reader, len(tokens), where)
    bos = gguf_field(reader, "tokenizer.ggml.bos_token_id", ends[0])
    pad = gguf_field(reader, "tokenizer.ggml.padding_token_id", ends[0])
    for key, v in (("bos", bos), ("padding", pad)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(tokens):
            raise ValueError(f"{where}: tokenizer.ggml.{key}_token_id={v!r} is not a token id of its "
                             f"{len(tokens)} tokens")
    template = gguf_field(reader, "tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{where}: tokenizer.chat_template must be a string")
    return Tokenizer(tk, bos_id=bos, eos_id=ends[0], pad_id=pad, chat_template=template, stop_ids=ends[1:],
                     add_bos=bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", True)))
