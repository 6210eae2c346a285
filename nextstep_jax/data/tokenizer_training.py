"""Train a SentencePiece text tokenizer that carries the NextStep special tokens (e.g. on the shapes captions).

    path = train_sentencepiece(captions, "out/tokenizer", vocab_size=128)   # out/tokenizer/tokenizer.model
    tokenizer = load_tokenizer(path.parent)                                 # a SentencePieceTokenizer

Every NextStep special token (the structural ones and the thinking / prompt-refinement ones) is a user symbol,
so it is one piece that always matches. Beyond the captions' own characters the digits and ``*`` are kept,
because every image block's area prefix spells its token grid as plain text ("4*4"). NextStep has no BOS and
its EOS is ``<|endoftext|>``, so SentencePiece's own BOS, EOS and PAD are off (``[PAD]`` is the pad); unknown
characters map to ``<unk>`` (id 0). Text is not normalised. Training runs on one thread, so the same captions
give the same model bytes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

from nextstep_jax.data.tokenizer import EXTRA_SPECIAL_TOKENS, SPECIAL_TOKENS
from nextstep_jax.io.atomic import write_file

MODEL_FILE = "tokenizer.model"
AREA_CHARS = "0123456789*"  # the area prefix "h*w" of every image block


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int,
                        model_type: str = "bpe") -> Path:
    """Train on ``texts`` (one sentence each) and write ``out_dir/tokenizer.model`` atomically; returns its path.

    ``vocab_size`` counts every piece, special tokens included; SentencePiece refuses a size the texts cannot
    fill (the message names the largest possible)."""
    import sentencepiece

    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no texts to train the tokenizer on")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            user_defined_symbols=[*SPECIAL_TOKENS.values(), *EXTRA_SPECIAL_TOKENS], required_chars=AREA_CHARS,
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, character_coverage=1.0, split_digits=True,
            normalization_rule_name="identity", num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training (vocab_size={vocab_size}, {len(texts)} texts): {e}") from None
    path = Path(out_dir) / MODEL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, model.getvalue())
    return path
