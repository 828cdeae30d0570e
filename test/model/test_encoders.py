"""DINOv2 and CLIP text encoders: token counts, preprocessing, frozen state, save/load, offline errors."""

import socket

import numpy as np
import pytest
import torch
from PIL import Image

from traj_forecast_ros.errors import InvalidImageError, WeightsNotFoundError
from traj_forecast_ros.model.config import ImageEncoderConfig, TextEncoderConfig
from traj_forecast_ros.model.presets import libero_config, tiny_config
from traj_forecast_ros.model.encoders import ImageEncoder, TextEncoder, basic_clip_tokenizer

# A narrow DINOv2 with the real patch size (14): exercises the LIBERO token arithmetic cheaply.
NARROW_DINO = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14,
                   image_size=224)


@pytest.fixture(scope="module")
def libero_frames(shared_images):
    frames = [np.asarray(Image.open(shared_images / f"libero_agent_{i}.jpg").convert("RGB")) for i in range(2)]
    return torch.from_numpy(np.stack(frames))  # [2, 128, 128, 3] uint8


def test_libero_recipe_gives_81_tokens_without_cls(libero_frames):
    torch.manual_seed(0)
    encoder = ImageEncoder.from_config(ImageEncoderConfig(model_id=None, config=NARROW_DINO))
    with torch.inference_mode():
        tokens = encoder(libero_frames)
        full = encoder.backbone(pixel_values=encoder.preprocess(libero_frames)).last_hidden_state
    assert tokens.shape == (2, 81, 32) and encoder.num_tokens((128, 128)) == 81
    torch.testing.assert_close(tokens, full[:, 1:])  # CLS dropped, nothing else changed
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training


def test_preprocessing_is_imagenet_normalisation(libero_frames):
    encoder = ImageEncoder.from_config(ImageEncoderConfig(model_id=None, config=NARROW_DINO))
    pixels = encoder.preprocess(libero_frames)
    assert pixels.shape == (2, 3, 128, 128)  # native resolution: no resize, no crop
    red = libero_frames[0, 5, 7, 0].item() / 255.0
    assert pixels[0, 0, 5, 7].item() == pytest.approx((red - 0.485) / 0.229, abs=1e-5)
    resized = ImageEncoder.from_config(ImageEncoderConfig(model_id=None, config=NARROW_DINO, resize=True))
    assert resized.preprocess(libero_frames).shape == (2, 3, 224, 224)
    with torch.inference_mode():
        assert resized(libero_frames).shape == (2, 256, 32) and resized.num_tokens((128, 128)) == 256
    with pytest.raises(InvalidImageError, match="uint8"):
        encoder(libero_frames.float())


def test_image_encoder_round_trip_through_a_model_dir(tmp_path, libero_frames):
    encoder = ImageEncoder.from_config(ImageEncoderConfig(model_id=None, config=NARROW_DINO))
    encoder.save_pretrained(tmp_path / "image_encoder")
    encoder.save_pretrained(tmp_path / "other" / "weights" / "dino")
    # 1) the model dir's image_encoder/ wins over the hub id; 2) a relative model_id resolves against the dir.
    from_dir = ImageEncoder.from_config(libero_config().image_encoder, model_dir=tmp_path)
    relative = ImageEncoder.from_config(ImageEncoderConfig(model_id="weights/dino"), model_dir=tmp_path / "other")
    with torch.inference_mode():
        expected = encoder(libero_frames)
        torch.testing.assert_close(from_dir(libero_frames), expected, rtol=0, atol=0)
        torch.testing.assert_close(relative(libero_frames), expected, rtol=0, atol=0)


def test_missing_hub_weights_fail_fast_with_instructions(tmp_path, monkeypatch):
    """Offline (HF_HUB_OFFLINE=1, test default) a missing encoder fails without any connection attempt."""
    connections = []

    def refuse(sock, address, *args):
        connections.append(address)
        raise OSError(f"test: network access attempted to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    with pytest.raises(WeightsNotFoundError) as info:
        ImageEncoder.from_config(ImageEncoderConfig(model_id="facebook/dinov2-large"), model_dir=tmp_path)
    assert connections == []
    message = str(info.value)
    assert "facebook/dinov2-large" in message and "traj-forecast download" in message
    with pytest.raises(WeightsNotFoundError, match="openai/clip-vit-large-patch14"):
        TextEncoder.from_config(TextEncoderConfig(), model_dir=tmp_path)
    with pytest.raises(WeightsNotFoundError, match="neither model_id nor config"):
        ImageEncoder.from_config(ImageEncoderConfig(model_id=None, config=None))
    assert connections == []


def test_basic_tokenizer_is_character_level():
    tokenizer = basic_clip_tokenizer()
    ids = tokenizer("Pick up")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 2 + len("pickup")  # lower-cased, one token per character, spaces split words
    assert tokenizer.decode(ids, skip_special_tokens=True) == "pick up"


def test_text_encoder_pooled_embeddings(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config().text_encoder
    encoder = TextEncoder.from_config(cfg)
    texts = ["open the top drawer", "pick up the black bowl and place it on the plate"]
    with torch.inference_mode():
        batch = encoder(texts)
        single = encoder(texts[:1])
    assert batch.shape == (2, 32) and encoder.embed_dim == 32
    torch.testing.assert_close(batch[:1], single, rtol=1e-5, atol=1e-5)  # padding does not leak into the pool
    assert not torch.allclose(batch[0], batch[1])
    encoder.save_pretrained(tmp_path / "text_encoder")
    loaded = TextEncoder.from_config(TextEncoderConfig(), model_dir=tmp_path)  # hub id ignored: dir ships it
    with torch.inference_mode():
        torch.testing.assert_close(loaded(texts), batch, rtol=0, atol=0)
    with pytest.raises(TypeError):
        encoder("not a list")


def test_one_encoder_fit_check_for_loading_and_training():
    """image_encoder_mismatch is the check both the forecaster (CheckpointError) and training (ValueError) use."""
    from traj_forecast_ros.errors import CheckpointError
    from traj_forecast_ros.forecaster import Forecaster
    from traj_forecast_ros.model.encoders import image_encoder_mismatch
    from traj_forecast_ros.train.vae import check_encoder_fits

    config = tiny_config()
    model = Forecaster.from_config(config, seed=0)
    encoder = model.image_encoder
    tokens = encoder.num_tokens(tuple(config.image_size))
    assert image_encoder_mismatch(encoder, config.image_size, tokens, encoder.hidden_size) is None
    side = int(round(tokens ** 0.5))
    assert image_encoder_mismatch(encoder, config.image_size, (side, tokens // side), encoder.hidden_size) is None
    message = image_encoder_mismatch(encoder, config.image_size, tokens + 1, encoder.hidden_size)
    assert f"{tokens} tokens" in message and f"{tokens + 1} x" in message
    check_encoder_fits(encoder, config)  # the config the encoder was built for: fits
    bigger = tiny_config()  # the same images, a model that reads twice the tokens
    bigger.vae.num_frame_tokens = bigger.denoiser.num_frame_tokens = (side, 2 * (tokens // side))
    with pytest.raises(ValueError, match="pretrain the encoder"):
        check_encoder_fits(encoder, bigger)
    with pytest.raises(CheckpointError, match="does not belong"):
        Forecaster(bigger, Forecaster.from_config(bigger, seed=0).denoiser, model.vae, encoder, model.text_encoder,
                   "mixed")
