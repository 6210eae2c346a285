"""Text tokenizers with the NextStep special tokens: HF ``tokenizer.json`` (tokenizers) or SentencePiece.

Both encode plain text only: structural special-token strings inside text (e.g. a caption that contains
"<|image_placeholder|>") are never turned into structural ids by the HF tokenizer, and sequence.py
rejects any text whose ids contain them anyway (SentencePiece user symbols always match). No BOS is
added: the NextStep-1 tokenizer has none.

Tokenizers are picklable for Grain worker processes: they carry their serialised model and rebuild the
native object lazily in each process.

``load_tokenizer("builtin:bytes")`` builds a byte-level tokenizer that needs no files and no training (every
UTF-8 byte is one token, the special tokens follow at ids 256...): small models trained from scratch use it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

SPECIAL_TOKENS = {
    "eos": "<|endoftext|>",
    "pad": "[PAD]",
    "image_area": "<|image_area|>",
    "boi": "<|begin_of_image|>",
    "eoi": "<|end_of_image|>",
    "placeholder": "<|image_placeholder|>",
}

# Special tokens of the NextStep vocabulary beyond the structural ones (prompt refinement, thinking).
EXTRA_SPECIAL_TOKENS = ("<|begin_of_prompt_refinement|>", "<|end_of_prompt_refinement|>", "<|begin_of_thinking|>",
                        "<|end_of_thinking|>")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    eos: int
    pad: int
    image_area: int
    boi: int
    eoi: int
    placeholder: int

    def structural(self) -> frozenset[int]:
        return frozenset(dataclasses.astuple(self))


class _LazyNative:
    """Pickles without its native object (``_native``), which each process rebuilds on first use."""

    _native = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_native"}


class HFTokenizer(_LazyNative):
    """A ``tokenizer.json`` (byte-level BPE as shipped with NextStep) via the ``tokenizers`` library."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        self._init(path.read_text())

    @classmethod
    def from_json(cls, text: str) -> "HFTokenizer":
        """From the text of a ``tokenizer.json``."""
        tokenizer = cls.__new__(cls)
        tokenizer._init(text)
        return tokenizer

    def to_json(self) -> str:
        """The text of this tokenizer's ``tokenizer.json`` (e.g. to ship a built-in tokenizer with a model)."""
        return self._json

    def _init(self, text: str) -> None:
        self._json = text
        self.special = SpecialIds(**{k: self._special_id(v) for k, v in SPECIAL_TOKENS.items()})

    def _tok(self):
        if self._native is None:
            from tokenizers import Tokenizer

            native = Tokenizer.from_str(self._json)
            native.encode_special_tokens = True  # special strings in text stay text
            self._native = native
        return self._native

    def _special_id(self, token: str) -> int:
        token_id = self._tok().token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no special token {token!r}; NextStep needs {list(SPECIAL_TOKENS.values())}")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tok().get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok().encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok().decode(list(ids), skip_special_tokens=False)

    def added_tokens(self) -> dict[str, int]:
        """Every added (special) token string -> id; the official tokenizer matches these inside text."""
        return {t.content: i for i, t in self._tok().get_added_tokens_decoder().items()}


class SentencePieceTokenizer(_LazyNative):
    """A SentencePiece model whose vocabulary contains the NextStep special tokens as user symbols."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        self._proto = path.read_bytes()
        sp = self._sp()
        ids = {}
        for name, token in SPECIAL_TOKENS.items():
            token_id = sp.piece_to_id(token)
            # encode() may prepend the "▁" dummy prefix; the token itself must stay one piece.
            if token_id == sp.unk_id() or token_id not in sp.encode(token):
                raise ValueError(f"SentencePiece model {path} lacks special token {token!r} as a single piece "
                                 "(train it with user_defined_symbols)")
            ids[name] = token_id
        self.special = SpecialIds(**ids)

    def _sp(self):
        if self._native is None:
            import sentencepiece

            self._native = sentencepiece.SentencePieceProcessor(model_proto=self._proto)
        return self._native

    @property
    def vocab_size(self) -> int:
        return self._sp().get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp().encode(text)

    def decode(self, ids) -> str:
        return self._sp().decode([int(i) for i in ids])

    def added_tokens(self) -> dict[str, int]:
        """The NextStep special-token strings this model defines (as user symbols) -> id."""
        sp = self._sp()
        names = (*SPECIAL_TOKENS.values(), *EXTRA_SPECIAL_TOKENS)
        return {n: sp.piece_to_id(n) for n in names if sp.piece_to_id(n) != sp.unk_id()}


Tokenizer = HFTokenizer | SentencePieceTokenizer
BYTE_LEVEL = "builtin:bytes"


def byte_level_tokenizer() -> HFTokenizer:
    """Byte-level BPE without merges: ids 0-255 are the 256 byte symbols, the special tokens follow (256...) in
    ``SPECIAL_TOKENS`` order."""
    from tokenizers import Tokenizer as Native
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    native = Native(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    native.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    native.decoder = decoders.ByteLevel()
    native.add_special_tokens(list(SPECIAL_TOKENS.values()))
    return HFTokenizer.from_json(native.to_str())


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A directory with tokenizer.json or tokenizer.model, the file itself, or ``BYTE_LEVEL``."""
    if str(path) == BYTE_LEVEL:
        return byte_level_tokenizer()
    path = Path(path)
    if path.is_dir():
        for name, cls in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
            if (path / name).is_file():
                return cls(path / name)
        raise FileNotFoundError(f"{path} has neither tokenizer.json nor tokenizer.model")
    if path.suffix == ".json":
        return HFTokenizer(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise ValueError(f"unrecognised tokenizer file {path} (expected .json or .model)")
