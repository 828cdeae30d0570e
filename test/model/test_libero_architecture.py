"""Full-size architectures against the official state-dict tables (spec 4.1, 6.1, 6.2). No forward passes here.

The LIBERO modules are built once per module on the CPU (their fixed tables are checked by value); the larger
Kubric / Physics101 ones are built on the meta device (shapes and counts only, no memory).
"""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch

from traj_forecast_ros.model.config import VAEConfig
from traj_forecast_ros.model.denoiser import LatteDenoiser
from traj_forecast_ros.model.layers import sincos_1d_table, sincos_2d_table
from traj_forecast_ros.model.presets import denoiser_config, libero_config
from traj_forecast_ros.model.vae import TrajectoryVAE

pytestmark = pytest.mark.slow  # full-size builds (cheap: about 5 s, no forward passes)

Table = List[Tuple[str, Tuple[int, ...]]]


def attention_rows(prefix: str, width: int = 384) -> Table:
    return [
        (f"{prefix}.q.weight", (width, width)), (f"{prefix}.q.bias", (width,)),
        (f"{prefix}.kv.weight", (2 * width, width)), (f"{prefix}.kv.bias", (2 * width,)),
        (f"{prefix}.proj.weight", (width, width)), (f"{prefix}.proj.bias", (width,)),
        (f"{prefix}.q_norm.weight", (width,)), (f"{prefix}.k_norm.weight", (width,)),
    ]


def mlp_rows(prefix: str) -> Table:
    return [(f"{prefix}.fc1.weight", (1536, 384)), (f"{prefix}.fc1.bias", (1536,)),
            (f"{prefix}.fc2.weight", (384, 1536)), (f"{prefix}.fc2.bias", (384,))]


# Spec 6.1: LIBERO denoiser state dict, 283 float32 tensors in state_dict() order.
LIBERO_DENOISER_TABLE: Table = [
    ("pos_embed", (1, 256, 384)), ("temp_embed", (1, 16, 384)), ("frame_embed", (1, 81, 384)),
    ("x_embedder.proj.weight", (384, 8, 1, 1)), ("x_embedder.proj.bias", (384,)),
    ("t_embedder.mlp.0.weight", (384, 256)), ("t_embedder.mlp.0.bias", (384,)),
    ("t_embedder.mlp.2.weight", (384, 384)), ("t_embedder.mlp.2.bias", (384,)),
    ("frame_proj.weight", (384, 1024)), ("frame_proj.bias", (384,)),
    ("text_embeds_proj.fc1.weight", (1536, 768)), ("text_embeds_proj.fc1.bias", (1536,)),
    ("text_embeds_proj.fc2.weight", (384, 1536)), ("text_embeds_proj.fc2.bias", (384,)),
]
for _i in range(12):
    LIBERO_DENOISER_TABLE += attention_rows(f"blocks.{_i}.attn") + attention_rows(f"blocks.{_i}.xattn")
    LIBERO_DENOISER_TABLE += mlp_rows(f"blocks.{_i}.mlp")
    LIBERO_DENOISER_TABLE += [(f"blocks.{_i}.adaLN_modulation.1.weight", (2688, 384)),
                              (f"blocks.{_i}.adaLN_modulation.1.bias", (2688,))]
LIBERO_DENOISER_TABLE += [
    ("final_layer.linear.weight", (8, 384)), ("final_layer.linear.bias", (8,)),
    ("final_layer.adaLN_modulation.1.weight", (768, 384)), ("final_layer.adaLN_modulation.1.bias", (768,)),
]

# Spec 6.2: LIBERO VAE state dict, 642 float32 tensors in state_dict() order.
LIBERO_VAE_TABLE: Table = [
    ("pos_embed", (1, 256, 384)), ("temp_embed", (1, 16, 384)), ("frame_embed", (1, 81, 384)),
    ("x_encoder.lff.w", (64, 2)),
    ("x_encoder.lff.mlp.0.weight", (1536, 128)), ("x_encoder.lff.mlp.0.bias", (1536,)),
    ("x_encoder.lff.mlp.3.weight", (128, 1536)), ("x_encoder.lff.mlp.3.bias", (128,)),
    ("x_embedder.proj.weight", (384, 130, 4, 4)), ("x_embedder.proj.bias", (384,)),
    ("frame_proj.weight", (384, 1024)), ("frame_proj.bias", (384,)),
    ("to_latents.weight", (16, 384)), ("to_latents.bias", (16,)),
    ("from_latents.weight", (384, 8)), ("from_latents.bias", (384,)),
]
for _stack in ("encoder_blocks", "decoder_blocks"):
    for _i in range(12):
        _p = f"{_stack}.{_i}"
        LIBERO_VAE_TABLE += [(f"{_p}.gate_msa", (1, 1, 384)), (f"{_p}.gate_mxa", (1, 1, 384)),
                             (f"{_p}.gate_mlp", (1, 1, 384)), (f"{_p}.norm1.weight", (384,))]
        LIBERO_VAE_TABLE += attention_rows(f"{_p}.attn") + [(f"{_p}.norm2.weight", (384,))]
        LIBERO_VAE_TABLE += attention_rows(f"{_p}.xattn") + [(f"{_p}.norm3.weight", (384,))]
        LIBERO_VAE_TABLE += mlp_rows(f"{_p}.mlp")
LIBERO_VAE_TABLE += [("final_layer.linear.weight", (32, 384)), ("final_layer.linear.bias", (32,))]


def kubric_vae_config() -> VAEConfig:
    return VAEConfig(patch_size=2, input_size=32, num_frames=24, num_frame_tokens=256, frame_features_dim=384)


@pytest.fixture(scope="module")
def libero_denoiser() -> LatteDenoiser:
    return LatteDenoiser(libero_config("atm").denoiser)


@pytest.fixture(scope="module")
def libero_vae() -> TrajectoryVAE:
    return TrajectoryVAE(libero_config("atm").vae)


def state_table(module: torch.nn.Module) -> Table:
    return [(key, tuple(value.shape)) for key, value in module.state_dict().items()]


def test_libero_denoiser_matches_spec_table(libero_denoiser: LatteDenoiser) -> None:
    assert len(LIBERO_DENOISER_TABLE) == 283
    assert state_table(libero_denoiser) == LIBERO_DENOISER_TABLE
    assert all(value.dtype == torch.float32 for value in libero_denoiser.state_dict().values())
    assert sum(p.numel() for p in libero_denoiser.parameters()) == 43_522_184
    assert sum(b.numel() for b in libero_denoiser.buffers()) == 135_552
    block = libero_denoiser.blocks[0]
    assert sum(p.numel() for p in block.parameters()) == 3_400_704
    assert sum(p.numel() for p in block.attn.parameters()) == 592_128


def test_libero_vae_matches_spec_table(libero_vae: TrajectoryVAE) -> None:
    assert len(LIBERO_VAE_TABLE) == 642
    assert state_table(libero_vae) == LIBERO_VAE_TABLE
    assert sum(p.numel() for p in libero_vae.parameters()) == 58_580_272
    assert sum(p.numel() for p in libero_vae.parameters() if p.requires_grad) == 58_444_592
    frozen = {name for name, p in libero_vae.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_embed", "temp_embed", "frame_embed", "x_encoder.lff.w"}


def test_libero_fixed_tables(libero_denoiser: LatteDenoiser, libero_vae: TrajectoryVAE) -> None:
    for module in (libero_denoiser, libero_vae):
        torch.testing.assert_close(module.pos_embed[0], sincos_2d_table(384, 16))
        torch.testing.assert_close(module.temp_embed[0], sincos_1d_table(384, 16))
        torch.testing.assert_close(module.frame_embed[0], sincos_2d_table(384, 9))


def test_libero_configs_share_architecture() -> None:
    atm, tramoe = libero_config("atm"), libero_config("tramoe")
    assert atm.denoiser == tramoe.denoiser and atm.vae == tramoe.vae
    assert atm.latent_scale != tramoe.latent_scale


def test_kubric_large_denoiser_and_vae_counts() -> None:
    with torch.device("meta"):
        denoiser = LatteDenoiser(denoiser_config("L", input_size=16, in_channels=8, num_frames=24,
                                                 num_frame_tokens=256, frame_features_dim=384, text_embed_dim=None))
        vae = TrajectoryVAE(kubric_vae_config())
    assert sum(p.numel() for p in denoiser.parameters()) == 219_628_040
    shapes = dict(state_table(denoiser))
    assert shapes["blocks.15.adaLN_modulation.1.weight"] == (5376, 768)
    assert shapes["frame_proj.weight"] == (768, 384) and shapes["temp_embed"] == (1, 24, 768)
    assert not any(key.startswith("text_embeds_proj") for key in shapes)

    assert sum(p.numel() for p in vae.parameters()) == 57_796_504
    vae_shapes = dict(state_table(vae))
    libero_shapes = dict(LIBERO_VAE_TABLE)
    differing = {key for key in libero_shapes if vae_shapes[key] != libero_shapes[key]}
    assert set(vae_shapes) == set(libero_shapes)
    assert differing == {"x_embedder.proj.weight", "frame_proj.weight", "frame_embed", "temp_embed",
                         "final_layer.linear.weight", "final_layer.linear.bias"}
    assert vae_shapes["x_embedder.proj.weight"] == (384, 130, 2, 2)
    assert vae_shapes["final_layer.linear.weight"] == (8, 384)


def test_physics101_raw_rectangular_denoiser() -> None:
    cfg = denoiser_config("B", input_size=(32, 58), patch_size=2, in_channels=2, num_frames=30,
                          num_frame_tokens=(18, 33), frame_features_dim=1024, text_embed_dim=None, latent=False)
    with torch.device("meta"):
        denoiser = LatteDenoiser(cfg)
    assert round(sum(p.numel() for p in denoiser.parameters()) / 1e5) == 423  # 42.3 M (spec 8.3)
    shapes = dict(state_table(denoiser))
    assert shapes["pos_embed"] == (1, 16 * 29, 384) and shapes["frame_embed"] == (1, 594, 384)
    assert shapes["x_encoder.lff.scale"] == () and shapes["x_embedder.proj.weight"] == (384, 130, 2, 2)
    assert shapes["final_layer.linear.weight"] == (8, 384)
    assert denoiser.x_encoder is not None
