"""Tokenizers: a byte-level BPE trained on a corpus, any `tokenizer.json`, or a GGUF vocab.

All are wrapped by `Tokenizer`, which knows its special ids and the reference prefix
("BOS Reference:") that Memory3 prepends to references and to every context.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

REFERENCE_TEXT = "Reference:"
_META = "m3jax_tokenizer.json"
_META_FIELDS = {"bos_id", "eos_id", "pad_id", "chat_template", "add_bos"}


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

    def encode_chat(self, messages: Sequence[Mapping[str, str]], *, system_prompt: str | None = None) -> list[int]:
        """Token ids of a conversation with the generation prompt, without a leading document
        start: `Generator` puts the model's own `bos_id` first, so a BOS that the template writes
        itself (`{{ bos_token }}`, as Llama 3's does) is dropped rather than doubled."""
        text = self.apply_chat_template(messages, system_prompt=system_prompt)
        bos = self.token_text(self.bos_id)
        if bos and "bos_token" in (self.chat_template or "") and text.startswith(bos):
            text = text[len(bos):]
        return self.encode(text)

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def from_gguf(cls, path_or_reader: Any) -> "Tokenizer":
        """The byte-level BPE stored in a GGUF file (see `load_gguf_tokenizer`)."""
        return load_gguf_tokenizer(path_or_reader)

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

_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # gguf.TokenType values


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
# own tokenizer.json files define them (then GPT-2 byte level without its own regex).
_LETTERS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GGUF_PRE_SPLIT = {"llama-bpe": _LETTERS + r"\p{N}{1,3}" + _REST,  # Llama 3: numbers in groups of 3
                   "qwen2": _LETTERS + r"\p{N}" + _REST}  # Qwen2/2.5/3: digits one by one


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


def load_gguf_tokenizer(path_or_reader: Any) -> Tokenizer:
    """Rebuild the byte-level BPE ("gpt2" tokenizer model) of a GGUF file from its vocab and merges.

    Pre-tokenizer: digits split one by one, then GPT-2 byte level; ByteLevel decoder. Tokens of
    type CONTROL (3) become special tokens and USER_DEFINED (4) added tokens, so both encode as
    single ids. bos/eos/pad come from the `tokenizer.ggml.*_token_id` fields (pad defaults to
    eos), the chat template from `tokenizer.chat_template`.
    """
    import gguf  # local: only GGUF users need it

    reader = path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) else open_gguf(path_or_reader)
    where = getattr(reader, "path", path_or_reader)
    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{where}: tokenizer.ggml.model={kind!r} is not supported (only 'gpt2', "
                         "the byte-level BPE)")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    merges = gguf_field(reader, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ValueError(f"{where}: tokenizer.ggml.tokens / tokenizer.ggml.merges are missing")
    tokens = _string_list(tokens, "tokenizer.ggml.tokens", where)
    merges = _string_list(merges, "tokenizer.ggml.merges", where)
    types = gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if not isinstance(types, list) or len(types) != len(tokens):
        raise ValueError(f"{where}: tokenizer.ggml.token_type must list one type per token")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{where}: tokenizer.ggml.tokens holds duplicate tokens")
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{where}: malformed merge {m!r}")
        pairs.append((parts[0], parts[1]))
    try:
        tk = HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False))
    except Exception as e:  # noqa: BLE001 - the Rust library raises its own type (e.g. a merge of unknown tokens)
        raise ValueError(f"{where}: the GGUF vocabulary does not form a BPE ({e})") from None
    tk.pre_tokenizer = gguf_pre_tokenizer(gguf_field(reader, "tokenizer.ggml.pre"), where)
    tk.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == _GGUF_CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == _GGUF_USER_DEFINED]
    if special:
        tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    bos = gguf_field(reader, "tokenizer.ggml.bos_token_id", eos)
    if bos is None or eos is None:
        raise ValueError(f"{where}: tokenizer.ggml.bos_token_id / eos_token_id are missing")
    pad = gguf_field(reader, "tokenizer.ggml.padding_token_id", eos)
    for key, v in (("bos", bos), ("eos", eos), ("padding", pad)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(tokens):
            raise ValueError(f"{where}: tokenizer.ggml.{key}_token_id={v!r} is not a token id of its "
                             f"{len(tokens)} tokens")
    template = gguf_field(reader, "tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{where}: tokenizer.chat_template must be a string")
    return Tokenizer(tk, bos_id=bos, eos_id=eos, pad_id=pad, chat_template=template,
                     add_bos=bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", True)))
