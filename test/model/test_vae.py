"""Trajectory VAE: shapes, posterior, decoder layout, where the fixed tables enter, loss and training."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from traj_forecast_ros.model.config import ModelConfig
from traj_forecast_ros.model.layers import sincos_1d_table, sincos_2d_table
from traj_forecast_ros.model.vae import TrajectoryVAE


def inputs(cfg, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows, cols = (cfg.input_size, cfg.input_size) if isinstance(cfg.input_size, int) else cfg.input_size
    tokens = cfg.num_frame_tokens if isinstance(cfg.num_frame_tokens, int) else (
        cfg.num_frame_tokens[0] * cfg.num_frame_tokens[1])
    tracks = torch.rand(batch, cfg.num_frames, 2, rows, cols, generator=gen) * 2 - 1
    features = torch.randn(batch, tokens, cfg.frame_features_dim, generator=gen)
    return tracks, features


@pytest.fixture
def vae(tiny: ModelConfig, randomize) -> TrajectoryVAE:
    torch.manual_seed(0)
    return randomize(TrajectoryVAE(tiny.vae)).eval()


def test_encode_decode_shapes_and_posterior(vae: TrajectoryVAE) -> None:
    tracks, features = inputs(vae.cfg)
    captured = {}
    vae.to_latents.register_forward_hook(lambda _m, _i, out: captured.setdefault("raw", out))
    with torch.no_grad():
        mean, std = vae.encode(tracks, features)
        recon = vae.decode(mean, features)
    assert mean.shape == std.shape == (2, 4, 16, 4)  # [B, T, L=(8/2)^2, C]
    assert recon.shape == tracks.shape
    raw_mean, raw_logvar = captured["raw"].chunk(2, dim=-1)
    torch.testing.assert_close(mean, raw_mean)
    torch.testing.assert_close(std, F.softplus(0.5 * raw_logvar))  # softplus, not exp
    assert bool((std > 0).all())


def test_fresh_vae_has_fixed_tables_and_zero_head(tiny: ModelConfig) -> None:
    vae = TrajectoryVAE(tiny.vae)
    for name in ("pos_embed", "temp_embed", "frame_embed"):
        param = getattr(vae, name)
        assert isinstance(param, torch.nn.Parameter) and not param.requires_grad
    torch.testing.assert_close(vae.pos_embed[0], sincos_2d_table(64, 4))
    torch.testing.assert_close(vae.temp_embed[0], sincos_1d_table(64, 4))
    torch.testing.assert_close(vae.frame_embed[0], sincos_2d_table(64, 4))
    assert not vae.x_encoder.lff.w.requires_grad
    tracks, features = inputs(tiny.vae)
    with torch.no_grad():
        assert torch.count_nonzero(vae.decode(torch.randn(2, 4, 16, 4), features)) == 0


def test_unpatchify_order_is_row_col_channel(vae: TrajectoryVAE) -> None:
    p = vae.patch_size
    with torch.no_grad():
        vae.final_layer.linear.weight.zero_()
        vae.final_layer.linear.bias.copy_(torch.arange(p * p * 2, dtype=torch.float32))
        out = vae.decode(torch.randn(1, 4, 16, 4), inputs(vae.cfg, batch=1)[1])
    for row in range(8):
        for col in range(8):
            for c in range(2):
                assert out[0, 0, c, row, col].item() == ((row % p) * p + col % p) * 2 + c


def test_temp_embed_only_in_encoder_pos_embed_not_in_decoder(vae: TrajectoryVAE) -> None:
    tracks, features = inputs(vae.cfg)
    z = torch.randn(2, 4, 16, 4)
    with torch.no_grad():
        mean_before = vae.encode(tracks, features)[0]
        decoded_before = vae.decode(z, features)
        vae.temp_embed.add_(1.0)
        vae.pos_embed.add_(1.0)
        mean_after = vae.encode(tracks, features)[0]
        decoded_after = vae.decode(z, features)
        vae.frame_embed.add_(1.0)
        decoded_frame_changed = vae.decode(z, features)
    assert not torch.allclose(mean_before, mean_after)
    torch.testing.assert_close(decoded_before, decoded_after)  # decoder adds no positional/temporal embedding
    assert not torch.allclose(decoded_after, decoded_frame_changed)  # image context enters the decoder


def test_frames_interact_only_through_temporal_blocks(vae: TrajectoryVAE) -> None:
    tracks, features = inputs(vae.cfg, batch=1)
    changed = tracks.clone()
    changed[:, 2] += 0.5
    with torch.no_grad():
        a, _ = vae.encode(tracks, features)
        b, _ = vae.encode(changed, features)
    assert not torch.allclose(a[:, 0], b[:, 0])  # temporal attention mixes frames


def test_loss_terms(vae: TrajectoryVAE) -> None:
    tracks, features = inputs(vae.cfg)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    with torch.no_grad():
        out = vae.loss(tracks, features, beta=0.25, generator=gen_a)
        mean, std = vae.encode(tracks, features)
        z = mean + std * torch.randn(mean.shape, generator=gen_b)
        recon = F.huber_loss(vae.decode(z, features), tracks, delta=1.0)
        posterior = torch.distributions.Normal(mean, std)
        prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(std))
        kl = torch.distributions.kl_divergence(posterior, prior).mean(dim=[1, 2, 3]).mean()
    torch.testing.assert_close(out["recon"], recon)
    torch.testing.assert_close(out["kl"], kl)
    torch.testing.assert_close(out["loss"], recon + 0.25 * kl)
    default = vae.loss(tracks, features, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(default["loss"], recon + vae.cfg.beta * kl)


def test_loss_and_gradients_stay_finite_when_the_posterior_std_underflows(vae: TrajectoryVAE) -> None:
    """std = softplus(logvar / 2) is exactly 0 in float32 for logvar below about -210: the KL term must not become
    inf (it did, about once in 25 steps late in a sim-manipulation VAE run, and zeroed those steps' gradients)."""
    tracks, features = inputs(vae.cfg)
    layer = vae.to_latents
    with torch.no_grad():
        layer.bias[layer.bias.shape[0] // 2:] = -400.0  # logvar half of the projection
        assert float(vae.encode(tracks, features)[1].min()) == 0.0
    out = vae.loss(tracks, features, beta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["kl"]) and float(out["kl"]) > 0
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in vae.parameters() if p.grad is not None)


def test_training_reduces_loss(tiny: ModelConfig) -> None:
    torch.manual_seed(0)
    vae = TrajectoryVAE(dataclasses.replace(tiny.vae, beta=1e-3))
    _, features = inputs(tiny.vae)
    ys, xs = torch.meshgrid(torch.linspace(-0.9, 0.9, 8), torch.linspace(-0.9, 0.9, 8), indexing="ij")
    grid = torch.stack([xs, ys])  # (2, 8, 8) static query grid, channels (x, y)
    drift = torch.tensor([0.1, -0.05]).view(2, 1, 1)
    tracks = torch.stack([grid + k * drift for k in range(4)]).expand(2, -1, -1, -1, -1)  # moving grid
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for step in range(20):
        out = vae.loss(tracks, features, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in (vae.pos_embed, vae.temp_embed, vae.frame_embed, vae.x_encoder.lff.w))


def test_rectangular_grid_and_token_grid(tiny: ModelConfig, randomize) -> None:
    cfg = dataclasses.replace(tiny.vae, input_size=(8, 12), num_frame_tokens=(2, 3))
    vae = randomize(TrajectoryVAE(cfg)).eval()
    tracks, features = inputs(cfg)
    with torch.no_grad():
        mean, std = vae.encode(tracks, features)
        recon = vae.decode(mean, features)
    assert mean.shape == (2, 4, 24, 4)  # 4 x 6 latent tokens
    assert recon.shape == (2, 4, 2, 8, 12)
    assert vae.latent_grid == (4, 6)
    torch.testing.assert_close(vae.pos_embed[0], sincos_2d_table(64, (4, 6)))
    torch.testing.assert_close(vae.frame_embed[0], sincos_2d_table(64, (2, 3)))


def test_bad_shapes_raise(vae: TrajectoryVAE) -> None:
    tracks, features = inputs(vae.cfg)
    with pytest.raises(ValueError, match="tracks"):
        vae.encode(tracks[:, :3], features)
    with pytest.raises(ValueError, match="frame_features"):
        vae.encode(tracks, features[:, :5])
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(2, 4, 15, 4), features)


def test_bfloat16_weights_accept_float32_inputs(vae: TrajectoryVAE) -> None:
    tracks, features = inputs(vae.cfg)
    with torch.no_grad():
        mean, _ = vae.encode(tracks, features)
        reference = vae.decode(mean, features)
        vae.to(torch.bfloat16)
        low_mean, _ = vae.encode(tracks, features)
        low = vae.decode(mean, features)
    assert low_mean.dtype == low.dtype == torch.bfloat16
    assert ((low_mean.float() - mean).norm() / mean.norm()).item() < 0.05
    assert ((low.float() - reference).norm() / reference.norm()).item() < 0.05


def test_invalid_configs_raise(tiny: ModelConfig) -> None:
    with pytest.raises(ValueError, match="in_channels must be 2"):
        TrajectoryVAE(dataclasses.replace(tiny.vae, in_channels=3))
    with pytest.raises(ValueError, match="depths must be even"):
        TrajectoryVAE(dataclasses.replace(tiny.vae, encoder_depth=3))
    with pytest.raises(ValueError, match="not a square number"):
        TrajectoryVAE(dataclasses.replace(tiny.vae, num_frame_tokens=15))


def test_loss_recon_delta_and_latent_noise(vae: TrajectoryVAE) -> None:
    """``recon_delta`` is the Huber delta; ``latent_noise`` [C] adds per-channel noise to the draw before decoding,
    from the same generator right after the posterior draw; ``mse`` is the plain squared error."""
    tracks, features = inputs(vae.cfg)
    noise_std = torch.linspace(0.1, 0.4, vae.latent_channels)
    with torch.no_grad():
        out = vae.loss(tracks, features, generator=torch.Generator().manual_seed(5), recon_delta=0.01,
                       latent_noise=noise_std)
        gen = torch.Generator().manual_seed(5)
        mean, std = vae.encode(tracks, features)
        z = mean + std * torch.randn(mean.shape, generator=gen)
        z = z + torch.randn(mean.shape, generator=gen) * noise_std
        decoded = vae.decode(z, features)
    torch.testing.assert_close(out["recon"], F.huber_loss(decoded, tracks, delta=0.01))
    torch.testing.assert_close(out["mse"], (decoded - tracks).square().mean())


def test_latent_noise_on_still_tokens_only(vae: TrajectoryVAE) -> None:
    """``noise_still_tokens_only``: the extra latent noise reaches exactly the latent tokens whose patch holds no
    moving point (row-major, as the patch embedding orders them); moving tokens decode the plain posterior draw."""
    tracks, features = inputs(vae.cfg)
    patch = vae.patch_size
    tracks[:, :, :, :patch] = tracks[:, :1, :, :patch]  # the first row of patches stays still
    tracks[1, :, :, patch:, :patch] = tracks[1, :1, :, patch:, :patch]  # and, in sample 1, the first column too
    noise_std = torch.linspace(0.1, 0.4, vae.latent_channels)
    decoded_latents = []
    decode = vae.decode
    vae.decode = lambda z, context: decoded_latents.append(z) or decode(z, context)  # type: ignore[method-assign]
    with torch.no_grad():
        vae.loss(tracks, features, generator=torch.Generator().manual_seed(5), latent_noise=noise_std,
                 moving_threshold=0.05, noise_still_tokens_only=True)
        gen = torch.Generator().manual_seed(5)
        mean, std = vae.encode(tracks, features)
        draw = mean + std * torch.randn(mean.shape, generator=gen)  # (B, T, L, C)
        noise = torch.randn(mean.shape, generator=gen) * noise_std
    rows, cols = vae.latent_grid
    still = torch.zeros(2, rows, cols, dtype=torch.bool)
    still[:, 0] = True
    still[1, :, 0] = True
    still = still.reshape(2, 1, rows * cols, 1)
    torch.testing.assert_close(decoded_latents[0], draw + noise * still)
    assert 0 < still.sum() < still.numel()
    assert not vae.still_tokens(torch.ones(1, *tracks.shape[-2:], dtype=torch.bool)).any()  # all moving: none still


def test_loss_moving_weight_matches_a_hand_computation(vae: TrajectoryVAE) -> None:
    """With ``moving_weight`` w, each point whose true track peaks more than ``moving_threshold`` from frame 0 weighs
    1 + w in the reconstruction mean (normalised by the mean weight); w = 0 is the plain mean, bit for bit."""
    tracks, features = inputs(vae.cfg)
    tracks[:, :, :, :2] = tracks[:, :1, :, :2]  # the first two rows of points stay still
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731 - the same posterior draw each call
    with torch.no_grad():
        plain = vae.loss(tracks, features, generator=generator())
        zero = vae.loss(tracks, features, generator=generator(), moving_weight=0.0, moving_threshold=0.1)
        weighted = vae.loss(tracks, features, generator=generator(), moving_weight=4.0, moving_threshold=0.1)
        mean, std = vae.encode(tracks, features)
        decoded = vae.decode(mean + std * torch.randn(mean.shape, generator=generator()), features)
    assert torch.equal(plain["recon"], zero["recon"])
    peak = (tracks - tracks[:, :1]).norm(dim=2).amax(dim=1)  # (B, H, W)
    moving = peak > 0.1
    assert moving[:, 2:].any() and not moving[:, :2].any()
    error = F.huber_loss(decoded, tracks, reduction="none").mean(dim=(1, 2))  # (B, H, W) per point
    weight = 1.0 + 4.0 * moving.float()
    torch.testing.assert_close(weighted["recon"], (error * weight).sum() / weight.sum())
    assert not torch.allclose(weighted["recon"], plain["recon"])


def test_freeze_all_but_decoder_keeps_the_latent_space(vae: TrajectoryVAE) -> None:
    """Only from_latents, the decoder blocks and the final layer train: after steps of the loss the posterior of
    every input is bit-identical, and decoding has changed."""
    tracks, features = inputs(vae.cfg)
    vae.freeze_all_but_decoder()
    trainable = {name.split(".", 1)[0] for name, p in vae.named_parameters() if p.requires_grad}
    assert trainable == {"from_latents", "decoder_blocks", "final_layer"}
    assert not vae.frame_proj.weight.requires_grad  # the image context is shared with the encoder
    with torch.no_grad():
        mean_before, std_before = vae.encode(tracks, features)
        decoded_before = vae.decode(mean_before, features)
    optimizer = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        out = vae.loss(tracks, features, generator=torch.Generator().manual_seed(step), recon_delta=0.05,
                       latent_noise=torch.full((vae.latent_channels,), 0.1))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert all(p.grad is None for p in vae.parameters() if not p.requires_grad)
    with torch.no_grad():
        mean_after, std_after = vae.encode(tracks, features)
        decoded_after = vae.decode(mean_after, features)
    assert torch.equal(mean_before, mean_after) and torch.equal(std_before, std_after)
    assert not torch.allclose(decoded_before, decoded_after)
