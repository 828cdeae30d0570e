"""Latte denoiser: block formula, factorisation order, conditioning, init, raw and rectangular variants."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from einops import rearrange

from traj_forecast_ros.model.config import DenoiserConfig, ModelConfig
from traj_forecast_ros.model.denoiser import DenoiserBlock, DenoiserFinalLayer, LatteDenoiser
from traj_forecast_ros.model.layers import sincos_1d_table, sincos_2d_table


def rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def inputs(cfg: DenoiserConfig, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows, cols = (cfg.input_size, cfg.input_size) if isinstance(cfg.input_size, int) else cfg.input_size
    tokens = cfg.num_frame_tokens if isinstance(cfg.num_frame_tokens, int) else (
        cfg.num_frame_tokens[0] * cfg.num_frame_tokens[1])
    x = torch.randn(batch, cfg.num_frames, cfg.in_channels, rows, cols, generator=gen)
    t = torch.rand(batch, generator=gen)
    features = torch.randn(batch, tokens, cfg.frame_features_dim, generator=gen)
    text = torch.randn(batch, cfg.text_embed_dim, generator=gen) if cfg.text_embed_dim else None
    return x, t, features, text


@pytest.fixture
def denoiser(tiny: ModelConfig, randomize) -> LatteDenoiser:
    return randomize(LatteDenoiser(tiny.denoiser)).eval()


def test_block_follows_spec_formula(randomize) -> None:
    block = randomize(DenoiserBlock(16, num_heads=2), seed=3)
    x, cond, context = torch.randn(3, 5, 16), torch.randn(3, 16), torch.randn(3, 7, 16)
    with torch.no_grad():
        chunks = block.adaLN_modulation[1](torch.nn.functional.silu(cond)).chunk(7, dim=1)
        shift_msa, scale_msa, gate_msa, gate_mxa, shift_mlp, scale_mlp, gate_mlp = (c[:, None] for c in chunks)
        h = x + gate_msa * block.attn(rms(x) * (1 + scale_msa) + shift_msa)
        h = h + gate_mxa * block.xattn(h, context)  # query neither normalised nor modulated
        h = h + gate_mlp * block.mlp(rms(h) * (1 + scale_mlp) + shift_mlp)
        out = block(x, cond, context)
    torch.testing.assert_close(out, h, atol=1e-5, rtol=1e-5)
    assert not block.norm1.elementwise_affine and not block.norm2.elementwise_affine
    assert block.norm1.eps == 1e-6
    assert not any(k.startswith("norm") for k in block.state_dict())


def test_final_layer_follows_spec_formula(randomize) -> None:
    final = randomize(DenoiserFinalLayer(16, patch_size=2, out_channels=3))
    x, cond = torch.randn(2, 5, 16), torch.randn(2, 16)
    with torch.no_grad():
        shift, scale = final.adaLN_modulation[1](torch.nn.functional.silu(cond)).chunk(2, dim=1)
        expected = final.linear(rms(x) * (1 + scale[:, None]) + shift[:, None])
        torch.testing.assert_close(final(x, cond), expected, atol=1e-5, rtol=1e-5)
    assert final.linear.out_features == 12


def test_fresh_denoiser_outputs_zero_velocity(tiny: ModelConfig) -> None:
    model = LatteDenoiser(tiny.denoiser)
    x, t, features, text = inputs(tiny.denoiser)
    with torch.no_grad():
        out = model(x, t, features, text)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # adaLN-Zero and zero output layer
    assert model.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.2)
    torch.testing.assert_close(model.pos_embed[0], sincos_2d_table(64, 4))
    torch.testing.assert_close(model.temp_embed[0], sincos_1d_table(64, 4))
    torch.testing.assert_close(model.frame_embed[0], sincos_2d_table(64, 4))
    assert {"pos_embed", "temp_embed", "frame_embed"} <= set(model.state_dict())
    assert {"pos_embed", "temp_embed", "frame_embed"}.isdisjoint(dict(model.named_parameters()))


def test_spatial_temporal_order_and_temp_embed_once(denoiser: LatteDenoiser) -> None:
    x, t, features, text = inputs(denoiser.cfg)
    seen = {}

    def capture(index):
        def hook(_module, args, output):
            seen[index] = (args[0].clone(), output.clone())
        return hook

    for i, block in enumerate(denoiser.blocks):
        block.register_forward_hook(capture(i))
    with torch.no_grad():
        denoiser(x, t, features, text)
    frames, tokens = 4, 16
    assert seen[0][0].shape == (2 * frames, tokens, 64)  # spatial: sequences of the tokens of one frame
    assert seen[1][0].shape == (2 * tokens, frames, 64)  # temporal: sequences of the frames of one token
    block0_out = rearrange(seen[0][1], "(b f) l d -> (b l) f d", f=frames)
    torch.testing.assert_close(seen[1][0], block0_out + denoiser.temp_embed)  # added after block 0


def test_temp_embed_added_only_once(tiny: ModelConfig, randomize) -> None:
    model = randomize(LatteDenoiser(dataclasses.replace(tiny.denoiser, depth=4))).eval()
    seen = {}

    def keep_output(_module, _args, output) -> None:
        seen["block2_out"] = output.clone()

    def keep_input(_module, args) -> None:
        seen["block3_in"] = args[0].clone()

    model.blocks[2].register_forward_hook(keep_output)
    model.blocks[3].register_forward_pre_hook(keep_input)
    with torch.no_grad():
        model(*inputs(model.cfg))
    torch.testing.assert_close(seen["block3_in"], rearrange(seen["block2_out"], "(b f) l d -> (b l) f d", f=4))


def test_conditioning_inputs_all_matter(denoiser: LatteDenoiser) -> None:
    x, t, features, text = inputs(denoiser.cfg)
    with torch.no_grad():
        base = denoiser(x, t, features, text)
        assert not torch.allclose(base, denoiser(x, t + 0.3, features, text))
        assert not torch.allclose(base, denoiser(x, t, features + 1.0, text))
        assert not torch.allclose(base, denoiser(x, t, features, text + 1.0))
        scalar_t = denoiser(x, 0.25, features, text)
        torch.testing.assert_close(scalar_t, denoiser(x, torch.full((2,), 0.25), features, text))
        # samples of a batch are independent
        torch.testing.assert_close(denoiser(x[:1], t[:1], features[:1], text[:1]), base[:1], atol=1e-5, rtol=1e-5)


def test_text_conditioning_errors(tiny: ModelConfig) -> None:
    model = LatteDenoiser(tiny.denoiser)
    x, t, features, text = inputs(tiny.denoiser)
    with pytest.raises(ValueError, match="text_embeds"):
        model(x, t, features, None)
    plain = LatteDenoiser(dataclasses.replace(tiny.denoiser, text_embed_dim=None))
    assert not any(k.startswith("text_embeds_proj") for k in plain.state_dict())
    with pytest.raises(ValueError, match="no language conditioning"):
        plain(x, t, features, text)
    assert plain(x, t, features).shape == x.shape


def test_bad_shapes_raise(denoiser: LatteDenoiser) -> None:
    x, t, features, text = inputs(denoiser.cfg)
    with pytest.raises(ValueError, match=r"denoiser expects x"):
        denoiser(x[:, :3], t, features, text)
    with pytest.raises(ValueError, match=r"t \[B=2\]"):
        denoiser(x, t[:1], features, text)
    with pytest.raises(ValueError, match="frame_features"):
        denoiser(x, t, features[:, :4], text)


def test_unpatchify_order_with_patch_2(tiny: ModelConfig) -> None:
    cfg = dataclasses.replace(tiny.denoiser, input_size=8, patch_size=2, in_channels=3)
    model = LatteDenoiser(cfg)
    with torch.no_grad():
        model.final_layer.linear.bias.copy_(torch.arange(12, dtype=torch.float32))
        out = model(*inputs(cfg))
    assert out.shape == (2, 4, 3, 8, 8)
    for row in range(8):
        for col in range(8):
            for c in range(3):
                assert out[1, 2, c, row, col].item() == ((row % 2) * 2 + col % 2) * 3 + c


def test_raw_variant(tiny: ModelConfig, randomize) -> None:
    cfg = dataclasses.replace(tiny.denoiser, latent=False, in_channels=2, input_size=8, patch_size=2, pos_embed_dim=16)
    model = randomize(LatteDenoiser(cfg)).eval()
    state = model.state_dict()
    assert state["x_encoder.lff.scale"].shape == ()
    assert state["x_encoder.lff.w"].shape == (8, 2) and model.x_encoder.lff.w.requires_grad
    assert state["x_embedder.proj.weight"].shape == (64, 18, 2, 2)  # 2 + pos_embed_dim input channels
    assert state["final_layer.linear.weight"].shape == (8, 64)  # p*p*2 outputs
    x, t, features, text = inputs(cfg)
    with torch.no_grad():
        out = model(x, t, features, text)
    assert out.shape == (2, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="in_channels must be 2"):
        LatteDenoiser(dataclasses.replace(cfg, in_channels=4))


def test_rectangular_variant(tiny: ModelConfig, randomize) -> None:
    cfg = dataclasses.replace(tiny.denoiser, input_size=(4, 6), num_frame_tokens=(2, 3), text_embed_dim=None)
    model = randomize(LatteDenoiser(cfg)).eval()
    torch.testing.assert_close(model.pos_embed[0], sincos_2d_table(64, (4, 6)))
    torch.testing.assert_close(model.frame_embed[0], sincos_2d_table(64, (2, 3)))
    x, t, features, _ = inputs(cfg)
    with torch.no_grad():
        assert model(x, t, features).shape == (2, 4, 4, 4, 6)


def test_bfloat16_weights_accept_float32_inputs(denoiser: LatteDenoiser) -> None:
    x, t, features, text = inputs(denoiser.cfg)
    with torch.no_grad():
        reference = denoiser(x, t, features, text)
        low = denoiser.to(torch.bfloat16)(x, t, features, text)
    assert low.dtype == torch.bfloat16
    error = (low.float() - reference).norm() / reference.norm()
    assert error.item() < 0.05
