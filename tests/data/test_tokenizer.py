import json
import pickle

import pytest
import sentencepiece
from tokenizers import Tokenizer as NativeTokenizer

from nextstep_jax.data.sequence import area_prefix_ids
from nextstep_jax.data.tokenizer import BYTE_LEVEL, SPECIAL_TOKENS, HFTokenizer, SentencePieceTokenizer, load_tokenizer


def test_special_ids_match_golden(tokenizer, golden_special_ids):
    for name, token in SPECIAL_TOKENS.items():
        assert getattr(tokenizer.special, name) == golden_special_ids[token]


def test_area_prefix_matches_the_official_string(tokenizer, golden_dir):
    native = NativeTokenizer.from_file(str(golden_dir / "tokenizer" / "tokenizer.json"))
    for grid in ((16, 16), (8, 32), (4, 4), (123, 7)):
        expected = native.encode(f"<|image_area|>{grid[0]}*{grid[1]}", add_special_tokens=False).ids
        assert area_prefix_ids(grid, tokenizer) == expected
    # Digits are split one by one, as Qwen2's tokenizer does: "16*16" is five tokens.
    assert len(area_prefix_ids((16, 16), tokenizer)) == 6


def test_special_strings_in_text_stay_text(tokenizer):
    ids = tokenizer.encode("see <|image_placeholder|> and <|endoftext|>")
    assert not tokenizer.special.structural().intersection(ids)
    assert tokenizer.decode(ids) == "see <|image_placeholder|> and <|endoftext|>"


def test_pickle_keeps_behaviour(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    text = "a red circle <|begin_of_image|>"
    assert clone.encode(text) == tokenizer.encode(text)
    assert clone.special == tokenizer.special


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(f"a {c} {s} on the left of a square {i}" for i in range(50)
                                for c in ("red", "blue") for s in ("circle", "triangle")))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "tokenizer"), vocab_size=60, model_type="bpe",
        user_defined_symbols=list(SPECIAL_TOKENS.values()), minloglevel=2)
    return root


def test_sentencepiece_tokenizer(sp_model):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    proc = sentencepiece.SentencePieceProcessor(model_file=str(sp_model / "tokenizer.model"))
    assert tok.special.boi == proc.piece_to_id("<|begin_of_image|>")
    assert len(set(tok.special.structural())) == 6
    ids = tok.encode("a red circle")
    assert ids == proc.encode("a red circle") and tok.decode(ids) == "a red circle"
    assert pickle.loads(pickle.dumps(tok)).encode("a blue square") == proc.encode("a blue square")


def test_sentencepiece_without_special_tokens_is_rejected(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 20)
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"), vocab_size=12,
                                             minloglevel=2)
    with pytest.raises(ValueError, match="lacks special token"):
        SentencePieceTokenizer(tmp_path / "m.model")


def test_load_tokenizer_dispatch(tmp_path, golden_dir):
    assert isinstance(load_tokenizer(golden_dir / "tokenizer" / "tokenizer.json"), HFTokenizer)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="unrecognised"):
        load_tokenizer(tmp_path / "x.txt")


def test_added_tokens(sp_model, golden_dir):
    hf = load_tokenizer(golden_dir / "tokenizer")
    listed = json.loads((golden_dir / "tokenizer" / "tokenizer.json").read_text())["added_tokens"]
    assert hf.added_tokens() == {t["content"]: t["id"] for t in listed}
    sp = load_tokenizer(sp_model)
    proc = sentencepiece.SentencePieceProcessor(model_file=str(sp_model / "tokenizer.model"))
    # The model defines only the structural symbols; the thinking/refinement ones are absent, not unk.
    assert sp.added_tokens() == {name: proc.piece_to_id(name) for name in SPECIAL_TOKENS.values()}


def test_builtin_byte_level_tokenizer():
    tok = load_tokenizer(BYTE_LEVEL)
    assert [getattr(tok.special, name) for name in SPECIAL_TOKENS] == list(range(256, 256 + len(SPECIAL_TOKENS)))
    assert tok.vocab_size == 256 + len(SPECIAL_TOKENS)
    text = "a red circle, héllo 12*3 <|image_placeholder|>"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256  # one token per byte, specials stay text
    assert tok.decode(ids) == text
    assert len(set(tok.encode(bytes(range(128)).decode("ascii")))) == 128
    assert pickle.loads(pickle.dumps(tok)).encode(text) == ids
