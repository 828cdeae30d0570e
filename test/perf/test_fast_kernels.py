"""CPU inference kernels (oneDNN GEMMs, folded modulation, shared-context attention, bf16 attention) against the
official-style reference forward: float32 results equal within 1e-5 relative, bfloat16 within its rounding."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from traj_forecast_ros.model.config import tiny_config
from traj_forecast_ros.model.denoiser import LatteDenoiser
from traj_forecast_ros.model.layers import (
    ONEDNN_LINEAR,
    Attention,
    LearnableFourierFeatures,
    Mlp,
    OneDNNLinearMode,
    explicit_attention,
    fast_kernels,
    folded_linear_params,
    rms_normalize,
)
from traj_forecast_ros.model.vae import TrajectoryVAE

FP32_TOLERANCE = 1e-5  # max |ours - reference| / max |reference|
FIXED_TABLES = ("pos_embed", "temp_embed", "frame_embed")


def randomize_parameters(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Every parameter except the fixed sin-cos tables N(0, std): zero-initialised gates would hide paths."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.split(".")[-1] not in FIXED_TABLES:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


@pytest.fixture(scope="module")
def denoiser() -> LatteDenoiser:
    return randomize_parameters(LatteDenoiser(tiny_config().denoiser), seed=1).eval()


@pytest.fixture(scope="module")
def vae() -> TrajectoryVAE:
    return randomize_parameters(TrajectoryVAE(tiny_config().vae), seed=2).eval()


def denoiser_inputs(model: LatteDenoiser, batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.num_frames, model.in_channels, *model.input_size, generator=generator)
    t = torch.rand(batch, generator=generator)
    features = torch.randn(batch, model.num_frame_tokens, model.frame_features_dim, generator=generator)
    text = torch.randn(batch, model.text_embed_dim, generator=generator)
    return x, t, features, text


def oneDNN_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.count for event in prof.key_averages() if event.key == "mkldnn::_linear_pointwise")


@pytest.mark.parametrize("batch", [1, 3])  # 1: modulation folded into the weights; 3: applied per sequence
def test_denoiser_fp32_equals_reference_forward(denoiser, reference, batch) -> None:
    inputs = denoiser_inputs(denoiser, batch)
    with torch.inference_mode():
        expected = reference.official_denoiser_forward(denoiser, *inputs)
        fast = denoiser(*inputs)
        with fast_kernels(False):
            plain = denoiser(*inputs)
    assert expected.abs().max() > 0.1  # every path active
    assert reference.relative_difference(fast, expected) < FP32_TOLERANCE
    assert reference.relative_difference(plain, expected) < FP32_TOLERANCE


@pytest.mark.skipif(not ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")
def test_fast_path_runs_only_for_cpu_inference(denoiser) -> None:
    inputs = denoiser_inputs(denoiser, 1)
    with torch.inference_mode():
        assert oneDNN_calls(lambda: denoiser(*inputs)) > 0
        with fast_kernels(False):
            assert oneDNN_calls(lambda: denoiser(*inputs)) == 0
    assert oneDNN_calls(lambda: denoiser(*inputs)) == 0  # autograd on: training keeps F.linear


def test_vae_fp32_equals_reference_forward(vae, reference) -> None:
    generator = torch.Generator().manual_seed(3)
    tracks = torch.rand(2, vae.num_frames, 2, *vae.input_size, generator=generator) * 2 - 1
    features = torch.randn(2, vae.num_frame_tokens, vae.frame_features_dim, generator=generator)
    latents = torch.randn(2, vae.num_frames, vae.num_latent_tokens, vae.latent_channels, generator=generator)
    with torch.inference_mode():
        mean, std = vae.encode(tracks, features)
        mean_ref, std_ref = reference.official_vae_encode(vae, tracks, features)
        decoded, decoded_ref = vae.decode(latents, features), reference.official_vae_decode(vae, latents, features)
        staged = vae.encode_tokens(vae.embed_tracks(tracks), features)
    assert reference.relative_difference(mean, mean_ref) < FP32_TOLERANCE
    assert reference.relative_difference(std, std_ref) < FP32_TOLERANCE
    assert reference.relative_difference(decoded, decoded_ref) < FP32_TOLERANCE
    torch.testing.assert_close(staged[0], mean, rtol=0, atol=0)  # encode == encode_tokens(embed_tracks(.))


def test_training_gradients_match_reference(denoiser, reference) -> None:
    inputs = denoiser_inputs(denoiser, 2)
    ours = denoiser(*inputs).square().mean()
    expected = reference.official_denoiser_forward(denoiser, *inputs).square().mean()
    grad_ours = torch.autograd.grad(ours, denoiser.blocks[0].mlp.fc1.weight)[0]
    grad_expected = torch.autograd.grad(expected, denoiser.blocks[0].mlp.fc1.weight)[0]
    assert reference.relative_difference(grad_ours, grad_expected) < FP32_TOLERANCE


def test_bfloat16_stays_close_and_keeps_the_fused_norm(denoiser, reference) -> None:
    inputs = denoiser_inputs(denoiser, 1)
    with torch.inference_mode():
        expected = reference.official_denoiser_forward(denoiser, *inputs)
        for enabled in (True, False):
            with warnings.catch_warnings(record=True) as caught, fast_kernels(enabled), \
                    torch.autocast("cpu", dtype=torch.bfloat16):
                warnings.simplefilter("always")
                low = denoiser(*inputs)
            assert low.dtype == torch.bfloat16
            assert not [w for w in caught if "Mismatch dtype" in str(w.message)]
            assert reference.relative_difference(low.float(), expected) < 0.05  # bfloat16 rounding only


def test_shared_context_attention_equals_repeated_context() -> None:
    torch.manual_seed(0)
    attention = randomize_parameters(Attention(16, num_heads=2), seed=4)
    x, context = torch.randn(6, 5, 16), torch.randn(2, 7, 16)  # 3 sequences per context
    repeated = context.repeat_interleave(3, dim=0)
    with torch.inference_mode():
        for enabled in (True, False):
            with fast_kernels(enabled):
                torch.testing.assert_close(attention(x, context), attention(x, repeated), rtol=1e-5, atol=1e-6)


def test_fused_forms_equal_explicit_modulation_gate_and_residual() -> None:
    torch.manual_seed(0)
    mlp = randomize_parameters(Mlp(16, 32), seed=5)
    x, residual = torch.randn(4, 5, 16), torch.randn(4, 5, 16)
    scale, shift, gate = torch.randn(1, 16), torch.randn(1, 16), torch.randn(1, 16)
    expected = residual + gate[:, None] * mlp(x * scale[:, None] + shift[:, None])
    weight, bias = folded_linear_params(mlp.fc1, scale[0], shift[0], gate[0, :1].expand(32))
    with torch.no_grad():
        torch.testing.assert_close(x @ weight.T + bias, gate[0, 0] * mlp.fc1(x * scale + shift), rtol=1e-5,
                                   atol=1e-5)
    with torch.inference_mode():
        fused = mlp(x, input_scale=scale, input_shift=shift, gate=gate, residual=residual)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_rms_normalize_and_chunked_fourier_features() -> None:
    x = torch.randn(3, 7, 24)
    weight = torch.rand(24) + 0.5
    with torch.inference_mode():
        expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
        torch.testing.assert_close(rms_normalize(x, 1e-6, weight), expected, rtol=1e-6, atol=1e-6)
    lff = randomize_parameters(LearnableFourierFeatures(8, 16), seed=6)
    points = torch.rand(3, 2000, 2) * 2 - 1  # 6,000 points: more than one chunk
    with torch.no_grad(), fast_kernels(False):
        expected = lff(points)
    with torch.inference_mode():
        chunked = lff(points)
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")
def test_linear_mode_routes_third_party_linears() -> None:
    """Encoders built by transformers use nn.Linear: the mode sends them through oneDNN with the same result."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 6))
    x = torch.randn(3, 5, 12)
    with torch.inference_mode():
        expected = layer(x)
        with OneDNNLinearMode():
            assert oneDNN_calls(lambda: layer(x)) == 2
            routed = layer(x)
            with fast_kernels(False):
                assert oneDNN_calls(lambda: layer(x)) == 0
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-6)
    with OneDNNLinearMode():
        assert oneDNN_calls(lambda: layer(x)) == 0  # autograd on: untouched


@pytest.mark.parametrize("batch", [1, 9])  # 1 x 2 heads: per-head GEMMs; 9 x 2 heads: chunked batched GEMMs
def test_explicit_attention_equals_sdpa(batch) -> None:
    generator = torch.Generator().manual_seed(batch)
    q, k, v = (torch.randn(batch, 2, length, 8, generator=generator) for length in (40, 7, 7))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, L, H, d)
    with torch.inference_mode():
        out = explicit_attention(q * 8**-0.5, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
