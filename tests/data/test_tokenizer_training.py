import pytest
import sentencepiece

from nextstep_jax.data.sequence import area_prefix_ids
from nextstep_jax.data.shapes import ShapesConfig, generate
from nextstep_jax.data.tokenizer import EXTRA_SPECIAL_TOKENS, SPECIAL_TOKENS, SentencePieceTokenizer, load_tokenizer
from nextstep_jax.data.tokenizer_training import MODEL_FILE, train_sentencepiece

VOCAB = 128


def _captions(split: str, count: int) -> list[str]:
    return [generate(ShapesConfig(split=split), i).caption for i in range(count)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    path = train_sentencepiece(_captions("train", 2000), folder, vocab_size=VOCAB)
    return folder, path


def test_special_tokens_are_single_pieces(trained):
    folder, path = trained
    assert path == folder / MODEL_FILE
    tok = load_tokenizer(folder)
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == VOCAB
    proc = sentencepiece.SentencePieceProcessor(model_file=str(path))
    for name in (*SPECIAL_TOKENS.values(), *EXTRA_SPECIAL_TOKENS):
        piece = proc.piece_to_id(name)
        assert piece != proc.unk_id() and proc.encode(name)[-1] == piece and proc.id_to_piece(piece) == name
    assert (proc.bos_id(), proc.eos_id(), proc.pad_id()) == (-1, -1, -1)  # NextStep's own EOS and PAD instead
    assert tok.special.eos == proc.piece_to_id("<|endoftext|>") and tok.special.pad == proc.piece_to_id("[PAD]")


def test_held_out_captions_and_area_prefixes_encode_without_unknowns(trained):
    folder, _ = trained
    tok = load_tokenizer(folder)
    proc = sentencepiece.SentencePieceProcessor(model_file=str(folder / MODEL_FILE))
    for caption in _captions("novel", 100) + _captions("eval", 100):
        ids = tok.encode(caption)
        assert proc.unk_id() not in ids and tok.decode(ids) == caption
        assert not tok.special.structural().intersection(ids)
    for grid in ((4, 4), (16, 32), (90, 7)):
        ids = area_prefix_ids(grid, tok)
        assert ids[0] == tok.special.image_area and proc.unk_id() not in ids
        assert tok.decode(ids[1:]).strip() == f"{grid[0]}*{grid[1]}"


def test_same_captions_give_the_same_model(trained, tmp_path):
    _, path = trained
    again = train_sentencepiece(_captions("train", 2000), tmp_path, vocab_size=VOCAB)
    assert again.read_bytes() == path.read_bytes()


def test_bad_requests_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no texts"):
        train_sentencepiece(["", "  "], tmp_path, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="vocab_size=100000"):
        train_sentencepiece(_captions("train", 50), tmp_path, vocab_size=100_000)
    assert not (tmp_path / MODEL_FILE).exists()
