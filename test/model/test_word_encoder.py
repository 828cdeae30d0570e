"""The words text encoder: vocabulary round trip, unknown words, save/load, dispatch from TextEncoder."""

import pytest
import torch

from traj_forecast_ros.errors import CheckpointError, WeightsNotFoundError
from traj_forecast_ros.model.config import ModelConfig, TextEncoderConfig
from traj_forecast_ros.model.encoders import TextEncoder
from traj_forecast_ros.model.word_encoder import (
    PAD_ID,
    UNKNOWN_ID,
    WordTextEncoder,
    WordVocabulary,
    build_vocabulary,
    split_words,
)

INSTRUCTIONS = ["Put the can in the back left of the right bin", "push the red cube to the left",
                "pick up the red cube"]


def _config(vocab):
    return TextEncoderConfig(model_id=None, kind="words",
                             config=dict(vocab=vocab, embed_dim=8, width=16, layers=1, heads=2, max_words=12))


def test_vocabulary_is_deterministic_and_round_trips():
    vocab = build_vocabulary(INSTRUCTIONS)
    assert vocab[:2] == ["<pad>", "<unk>"] and vocab[2:] == sorted(set(vocab[2:]))
    assert vocab == build_vocabulary(reversed(INSTRUCTIONS))  # order of the instructions does not matter
    table = WordVocabulary(vocab)
    ids = table.encode(INSTRUCTIONS[0])
    assert table.decode(ids) == " ".join(split_words(INSTRUCTIONS[0]))
    assert UNKNOWN_ID not in ids and PAD_ID not in ids
    batch = table.encode_batch(INSTRUCTIONS, max_words=5)
    assert batch.shape == (3, 5) and batch.dtype == torch.long
    assert table.encode_batch([""], 4).tolist() == [[PAD_ID] * 4]
    # the vocabulary travels in the model config (YAML round trip)
    config = ModelConfig.from_dict({**ModelConfig().to_dict(), "text_encoder": vars(_config(vocab))})
    assert config.text_encoder.kind == "words" and config.text_encoder.config["vocab"] == vocab


def test_unknown_words_map_to_one_id_and_embed_deterministically():
    encoder = WordTextEncoder.from_config(_config(build_vocabulary(INSTRUCTIONS)))
    table = encoder.vocabulary
    assert table.encode("push the purple zebra") == [table.ids["push"], table.ids["the"], UNKNOWN_ID, UNKNOWN_ID]
    with torch.no_grad():
        a = encoder(["push the purple zebra", "push the orange giraffe", "", "push the red cube to the left"])
        again = encoder(["push the purple zebra"])
    assert a.shape == (4, 8) and torch.isfinite(a).all()
    torch.testing.assert_close(a[0], a[1])  # both unknown words are <unk>
    torch.testing.assert_close(a[:1], again)
    assert not torch.allclose(a[0], a[3]) and not torch.allclose(a[2], a[3])
    with pytest.raises(TypeError):
        encoder("a single string")


def test_saved_words_encoder_loads_frozen_through_text_encoder(tmp_path):
    cfg = _config(build_vocabulary(INSTRUCTIONS))
    torch.manual_seed(1)
    encoder = WordTextEncoder.from_config(cfg)
    encoder.save_pretrained(tmp_path / "text_encoder")
    loaded = TextEncoder.from_config(cfg, model_dir=tmp_path)  # dispatches on kind
    assert isinstance(loaded, WordTextEncoder) and loaded.embed_dim == 8
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(INSTRUCTIONS), encoder(INSTRUCTIONS))
    wrong = _config(build_vocabulary(INSTRUCTIONS + ["a brand new word"]))
    with pytest.raises(CheckpointError):
        WordTextEncoder.from_config(wrong, model_dir=tmp_path)  # another vocabulary: other embedding table


def test_model_dir_without_words_encoder_weights_is_refused(tmp_path):
    """A model directory missing text_encoder/model.safetensors must not load with random instruction weights."""
    cfg = _config(build_vocabulary(INSTRUCTIONS))
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        TextEncoder.from_config(cfg, model_dir=tmp_path)
    with pytest.raises(CheckpointError, match="missing"):
        WordTextEncoder.from_config(cfg, model_dir=tmp_path / "nowhere")
    assert WordTextEncoder.from_config(cfg).embed_dim == 8  # no model_dir: random weights, by intent


def test_words_encoder_needs_a_vocabulary_and_a_known_kind():
    with pytest.raises(WeightsNotFoundError, match="vocabulary"):
        WordTextEncoder.from_config(TextEncoderConfig(model_id=None, kind="words", config={"embed_dim": 8}))
    with pytest.raises(ValueError, match="starts with"):
        WordVocabulary(["the", "<pad>"])
    with pytest.raises(ValueError, match="kind"):
        TextEncoderConfig(kind="bert")


def _bag_config(vocab, pooling="cls+words"):
    config = _config(vocab)
    config.config["pooling"] = pooling
    return config


def test_the_word_bag_adds_the_mean_of_the_instructions_words():
    """With the CLS path silenced the embedding is exactly the mean of the words' rows; one word apart is one row
    apart, and an empty instruction keeps the CLS output alone (the learned "no instruction" vector)."""
    encoder = WordTextEncoder.from_config(_bag_config(build_vocabulary(INSTRUCTIONS))).eval()
    assert encoder.pooling == "cls+words" and encoder.config_dict()["pooling"] == "cls+words"
    with torch.no_grad():
        cls_only = encoder([""])
        encoder.proj.weight.zero_()
        encoder.proj.bias.zero_()
        pick, push, empty = encoder(["pick up the red cube", "push up the red cube", ""])
    rows, ids = encoder.word_bag.weight.detach(), encoder.vocabulary.ids
    expected = torch.stack([rows[ids[w]] for w in ("pick", "up", "the", "red", "cube")]).mean(0)
    torch.testing.assert_close(pick, expected)
    torch.testing.assert_close(pick - push, (rows[ids["pick"]] - rows[ids["push"]]) / 5)
    assert torch.equal(empty, torch.zeros_like(empty)) and cls_only.abs().sum() > 0
    with pytest.raises(ValueError, match="pooling"):
        WordTextEncoder(build_vocabulary(INSTRUCTIONS), pooling="max")


def test_an_encoder_gains_the_word_bag_with_every_weight_kept_and_round_trips(tmp_path):
    vocab = build_vocabulary(INSTRUCTIONS)
    torch.manual_seed(0)
    plain = WordTextEncoder.from_config(_config(vocab)).eval()
    assert plain.word_bag is None and "pooling" not in plain.config_dict()  # older configs: unchanged
    extended = plain.with_word_bag(seed=0).eval()
    assert extended.with_word_bag() is extended
    kept = extended.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in plain.state_dict().items())
    assert set(kept) - set(plain.state_dict()) == {"word_bag.weight"}
    with torch.no_grad():
        before, after = plain(INSTRUCTIONS + [""]), extended(INSTRUCTIONS + [""])
    assert torch.equal(before[-1], after[-1])  # the empty instruction: no words, nothing added
    assert 0 < ((after[:-1] - before[:-1]).norm() / before[:-1].norm()).item() < 0.2  # a small start
    extended.save_pretrained(tmp_path / "text_encoder")
    config = TextEncoderConfig(model_id=None, kind="words", config=extended.config_dict())
    loaded = TextEncoder.from_config(config, model_dir=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(INSTRUCTIONS), extended(INSTRUCTIONS))
    with pytest.raises(CheckpointError):  # the plain config against weights with a word table: refused
        WordTextEncoder.from_config(_config(vocab), model_dir=tmp_path)
