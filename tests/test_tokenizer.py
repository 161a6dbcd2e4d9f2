"""Tokenizers: round trips, type inference, describe/rebuild, and errors that name the field."""

import json

import pytest

from megatron_minitron.config.data import TokenizerConfig
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.data.tokenizer import (ByteTokenizer, HuggingFaceTokenizer,
                                              SentencePieceTokenizer, build_tokenizer,
                                              tokenizer_from_description)

LINES = [
    "Shall I compare thee to a summer's day?",
    "Thou art more lovely and more temperate:",
    "Rough winds do shake the darling buds of May,",
    "And summer's lease hath all too short a date;",
    "Sometime too hot the eye of heaven shines,",
    "And often is his gold complexion dimm'd;",
] * 4
TEXT = "Rough winds do shake the darling buds of May"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece

    prefix = tmp_path_factory.mktemp("sp") / "tiny"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(LINES), model_prefix=str(prefix), vocab_size=64,
        model_type="bpe", character_coverage=1.0, minloglevel=2)
    return str(prefix) + ".model"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(LINES, trainer)
    folder = tmp_path_factory.mktemp("hf")
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_byte_round_trip_and_default():
    tok = build_tokenizer(TokenizerConfig())
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eod) == (257, 256)
    text = "O brave new world — ünïcode ✓"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids + [tok.eod]) == text


def test_sentencepiece_round_trip(sp_model):
    tok = build_tokenizer(TokenizerConfig(path=sp_model))  # auto: .model -> sentencepiece
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 64 and 0 <= tok.eod < 64
    ids = tok.encode(TEXT)
    assert tok.eod not in ids and tok.decode(ids) == TEXT


def test_huggingface_round_trip_file_and_folder(hf_folder):
    for path in (hf_folder, hf_folder / "tokenizer.json"):
        tok = build_tokenizer(TokenizerConfig(path=str(path)))
        assert isinstance(tok, HuggingFaceTokenizer)
        assert tok.eod == 0  # <|endoftext|>, the only special token
        ids = tok.encode(TEXT)
        assert tok.eod not in ids and tok.decode(ids) == TEXT
        assert tok.vocab_size == 300


def test_huggingface_eos_from_tokenizer_config(hf_folder, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "e"}))
    tok = build_tokenizer(TokenizerConfig(type="huggingface", path=str(tmp_path)))
    assert tok.eod == tok._tok.token_to_id("e")


def test_describe_rebuilds_the_same_tokenizer(sp_model, hf_folder):
    for cfg in (TokenizerConfig(), TokenizerConfig(path=sp_model),
                TokenizerConfig(path=str(hf_folder))):
        tok = build_tokenizer(cfg)
        desc = json.loads(json.dumps(tok.describe()))  # survives a JSON checkpoint header
        again = tokenizer_from_description(desc)
        assert type(again) is type(tok) and again.identity() == tok.identity()
        assert again.encode(TEXT) == tok.encode(TEXT)


def test_identity_guards_a_changed_tokenizer_file(hf_folder, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
    desc = build_tokenizer(TokenizerConfig(path=str(tmp_path))).describe()
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["added_tokens"][0]["content"] = "</s>"
    data["model"]["vocab"]["</s>"] = data["model"]["vocab"].pop("<|endoftext|>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError) as e:
        tokenizer_from_description(desc)
    assert e.value.field == "data.tokenizer.path"


@pytest.mark.parametrize("cfg", [
    TokenizerConfig(path="/no/such/tokenizer.model"),
    TokenizerConfig(type="sentencepiece"),
    TokenizerConfig(type="huggingface", path="/no/such/dir"),
])
def test_bad_tokenizer_paths_name_the_field(cfg):
    with pytest.raises(ConfigError) as e:
        build_tokenizer(cfg)
    assert e.value.field == "data.tokenizer.path"


def test_unknown_file_kind_and_bad_files(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\n")
    (tmp_path / "broken.model").write_text("not a model")
    (tmp_path / "tokenizer.json").write_text("{}")
    for path in ("vocab.txt", "broken.model", "tokenizer.json"):
        with pytest.raises(ConfigError) as e:
            build_tokenizer(TokenizerConfig(path=str(tmp_path / path)))
        assert e.value.field == "data.tokenizer.path"
    with pytest.raises(ConfigError) as e:
        TokenizerConfig(type="tiktoken")
    assert e.value.field == "data.tokenizer.type"


def test_huggingface_without_eos_token_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match="end-of-text"):
        build_tokenizer(TokenizerConfig(path=str(tmp_path)))


def test_tokenizer_serves_megatron_dataset_config():
    """GPTDatasetConfig reads vocab_size/eod and hashes unique_identifiers into cache keys."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    cfg = GPTDatasetConfig(random_seed=1, sequence_length=8, tokenizer=ByteTokenizer(),
                           reset_position_ids=False, reset_attention_mask=False,
                           eod_mask_loss=False, blend=(["x"], None), split="1,0,0")
    assert cfg.token_dtype_code == 8  # uint16, what preprocess writes for this vocab
    assert json.dumps(cfg.tokenizer, default=lambda o: o.unique_identifiers)
