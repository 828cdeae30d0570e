"""The model's forward with the CPU inference ops (model/kernels.py FastCPUOps) against the official-style reference
forward: float32 results equal within 1e-5 relative, bfloat16 within its rounding; the default ops (plain torch)
never take a fast path."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from traj_forecast_ros.model.denoiser import LatteDenoiser
from traj_forecast_ros.model.kernels import (
    LFF_ROWS_PER_CHUNK,
    ONEDNN_BFLOAT16,
    ONEDNN_LINEAR,
    FastCPUOps,
    KernelOptions,
    OneDNNLinearMode,
    explicit_attention,
    folded,
    rms_normalize,
)
from traj_forecast_ros.model.layers import Attention, LearnableFourierFeatures, Mlp
from traj_forecast_ros.model.presets import tiny_config
from traj_forecast_ros.model.vae import TrajectoryVAE

FP32_TOLERANCE = 1e-5  # max |ours - reference| / max |reference|
FIXED_TABLES = ("pos_embed", "temp_embed", "frame_embed")
KERNEL_CHOICES = [KernelOptions(fold_modulation=fold, attention=attention)
                  for fold in (True, False) for attention in ("sdpa", "explicit")]


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



def oneDNN_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.count for event in prof.key_averages() if event.key == "mkldnn::_linear_pointwise")


@pytest.mark.parametrize("options", KERNEL_CHOICES, ids=lambda o: f"fold={o.fold_modulation}-{o.attention}")
@pytest.mark.parametrize("batch", [1, 3])  # 3 distinct samples: modulation per sequence, contexts per sample
def test_denoiser_kernels_equal_reference_forward(denoiser, reference, batch, options,
                                                  denoiser_inputs) -> None:
    inputs = denoiser_inputs(denoiser, batch)
    with torch.inference_mode():
        expected = reference.official_denoiser_forward(denoiser, *inputs)
        fast = denoiser(*inputs, ops=FastCPUOps(options))
        plain = denoiser(*inputs)
    assert expected.abs().max() > 0.1  # every path active
    assert fast.dtype == torch.float32
    assert reference.relative_difference(fast, expected) < FP32_TOLERANCE
    assert reference.relative_difference(plain, expected) < FP32_TOLERANCE


@pytest.mark.parametrize("options", KERNEL_CHOICES, ids=lambda o: f"fold={o.fold_modulation}-{o.attention}")
def test_shared_conditioning_of_a_forecast_step(denoiser, reference, options, denoiser_inputs) -> None:
    """K samples of one step share t, image and text: one row each (or an expanded batch) folds for all K."""
    x, _, features, text = denoiser_inputs(denoiser, 4, seed=3)
    t = torch.full((4,), 0.37)
    one_features, one_text = features[:1], text[:1]
    with torch.inference_mode():
        expected = reference.official_denoiser_forward(denoiser, x, t, one_features.expand(4, -1, -1),
                                                       one_text.expand(4, -1))
        kernels = denoiser.with_ops(FastCPUOps(options))
        bound = kernels.bind(one_features, one_text)(x, t)  # one row, bound once
        expanded = kernels(x, t, one_features.expand(4, -1, -1), one_text.expand(4, -1))  # stride-0 batch
    assert reference.relative_difference(bound, expected) < FP32_TOLERANCE
    assert reference.relative_difference(expanded, expected) < FP32_TOLERANCE


def test_bound_denoiser_rejects_mismatched_inputs(denoiser, denoiser_inputs) -> None:
    x, t, features, text = denoiser_inputs(denoiser, 3)
    kernels = denoiser.with_ops(FastCPUOps())
    with torch.inference_mode():
        with pytest.raises(ValueError, match="3 samples"):
            kernels.bind(features[:2], text[:2])(x, t)  # two contexts for three samples
        with pytest.raises(ValueError, match="frame_features"):
            kernels.bind(features[..., :5], text)
        with pytest.raises(ValueError, match="text_embeds"):
            kernels.bind(features, None)
        with pytest.raises(ValueError, match="denoiser expects x"):
            kernels.bind(features, text)(x[:, :2], t)


@pytest.mark.parametrize("bad", [dict(attention="flash"), dict(dtype=torch.float16)])
def test_kernel_options_are_validated(bad) -> None:
    with pytest.raises(ValueError):
        KernelOptions(**bad)


@pytest.mark.skipif(not ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")
def test_reference_modules_never_take_the_fast_path(denoiser, denoiser_inputs) -> None:
    """The kernels are chosen explicitly: the modules' default ops stay plain PyTorch, also in inference mode."""
    inputs = denoiser_inputs(denoiser, 1)
    with torch.inference_mode():
        assert oneDNN_calls(lambda: denoiser(*inputs, ops=FastCPUOps())) > 0
        assert oneDNN_calls(lambda: denoiser(*inputs)) == 0
        assert oneDNN_calls(lambda: denoiser(*inputs, ops=FastCPUOps(KernelOptions(onednn=False)))) == 0
    assert oneDNN_calls(lambda: denoiser(*inputs)) == 0  # autograd on: training keeps F.linear


def test_vae_kernels_equal_reference_forward(vae, reference) -> None:
    generator = torch.Generator().manual_seed(3)
    tracks = torch.rand(2, vae.num_frames, 2, *vae.input_size, generator=generator) * 2 - 1
    features = torch.randn(2, vae.num_frame_tokens, vae.frame_features_dim, generator=generator)
    latents = torch.randn(2, vae.num_frames, vae.num_latent_tokens, vae.latent_channels, generator=generator)
    ops = FastCPUOps()
    with torch.inference_mode():
        mean, std = vae.encode_tokens(vae.embed_tracks(tracks, ops), features, ops)
        mean_ref, std_ref = reference.official_vae_encode(vae, tracks, features)
        decoded, decoded_ref = vae.decode(latents, features, ops), reference.official_vae_decode(vae, latents, features)
        shared = vae.decode(latents, features[:1], ops)  # one image for both samples
        shared_ref = reference.official_vae_decode(vae, latents, features[:1].expand(2, -1, -1))
        module_mean, _ = vae.encode(tracks, features)
    assert reference.relative_difference(mean, mean_ref) < FP32_TOLERANCE
    assert reference.relative_difference(std, std_ref) < FP32_TOLERANCE
    assert reference.relative_difference(decoded, decoded_ref) < FP32_TOLERANCE
    assert reference.relative_difference(shared, shared_ref) < FP32_TOLERANCE
    assert reference.relative_difference(module_mean, mean_ref) < FP32_TOLERANCE


def test_training_gradients_match_reference(denoiser, reference, denoiser_inputs) -> None:
    inputs = denoiser_inputs(denoiser, 2)
    ours = denoiser(*inputs).square().mean()
    expected = reference.official_denoiser_forward(denoiser, *inputs).square().mean()
    grad_ours = torch.autograd.grad(ours, denoiser.blocks[0].mlp.fc1.weight)[0]
    grad_expected = torch.autograd.grad(expected, denoiser.blocks[0].mlp.fc1.weight)[0]
    assert reference.relative_difference(grad_ours, grad_expected) < FP32_TOLERANCE


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_bfloat16_kernels_stay_close(denoiser, vae, reference, attention, denoiser_inputs) -> None:
    inputs = denoiser_inputs(denoiser, 1)
    with torch.inference_mode():
        expected = reference.official_denoiser_forward(denoiser, *inputs)
        low = denoiser(*inputs, ops=FastCPUOps(KernelOptions(dtype=torch.bfloat16, attention=attention)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = denoiser(*inputs)  # the reference modules under autocast (the GPU / fp32-rerun path)
    assert low.dtype == torch.bfloat16 and autocast.dtype == torch.bfloat16
    assert reference.relative_difference(low.float(), expected) < 0.05  # bfloat16 rounding only
    assert reference.relative_difference(autocast.float(), expected) < 0.05


def test_folded_linear_equals_modulate_then_gate() -> None:
    torch.manual_seed(0)
    mlp = randomize_parameters(Mlp(16, 32), seed=5)
    x = torch.randn(4, 5, 16)
    scale, shift, gate = torch.randn(16), torch.randn(16), torch.randn(32)
    weight, bias = folded((mlp.fc1.weight, mlp.fc1.bias), torch.float32, scale, shift, gate)
    with torch.no_grad():
        torch.testing.assert_close(x @ weight.T + bias, gate * mlp.fc1(x * scale + shift), rtol=1e-5, atol=1e-5)


def test_rms_normalize_and_chunked_fourier_features() -> None:
    x = torch.randn(3, 7, 24)
    weight = torch.rand(24) + 0.5
    with torch.inference_mode():
        expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
        torch.testing.assert_close(rms_normalize(x, 1e-6, weight), expected, rtol=1e-6, atol=1e-6)
        strided = torch.randn(3, 7, 2, 24)[:, :, 1]  # a non-contiguous view, as in the fused q|k norm
        torch.testing.assert_close(rms_normalize(strided, 1e-6), strided * torch.rsqrt(
            strided.pow(2).mean(-1, keepdim=True) + 1e-6), rtol=1e-6, atol=1e-6)
    for raw in (False, True):
        lff = randomize_parameters(LearnableFourierFeatures(8, 16, raw=raw), seed=6)
        points = torch.rand(3, 2000, 2) * 2 - 1  # 6,000 points: more than one chunk
        assert points[..., 0].numel() > LFF_ROWS_PER_CHUNK
        with torch.no_grad():
            expected = lff(points)
        with torch.inference_mode():
            chunked = lff(points, FastCPUOps())
        torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")
def test_linear_mode_routes_third_party_linears() -> None:
    """Encoders built by transformers use nn.Linear: the mode sends them through oneDNN with the same result."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 6))
    x = torch.randn(3, 5, 12)
    with torch.inference_mode():
        expected = layer(x)
        assert oneDNN_calls(lambda: layer(x)) == 0
        with OneDNNLinearMode():
            assert oneDNN_calls(lambda: layer(x)) == 2
            routed = layer(x)
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-6)
    with OneDNNLinearMode():
        assert oneDNN_calls(lambda: layer(x)) == 0  # autograd on: untouched


@pytest.mark.skipif(not ONEDNN_BFLOAT16, reason="no oneDNN bfloat16 GEMMs on this CPU: the encoders keep F.linear")
def test_bfloat16_encoder_weights_are_cast_once_per_forecaster() -> None:
    """bfloat16 on CPU: the encoders' linear weights are cast on the first frame only; later frames reuse them
    with identical outputs, and a plan change or release drops the cast copies."""
    import numpy as np

    from traj_forecast_ros.forecaster import Forecaster

    forecaster = Forecaster.from_config(tiny_config(), dtype="bfloat16", seed=0)
    height, width = forecaster.config.image_size
    frame = np.random.default_rng(0).integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    first = forecaster.encode_image(frame)
    weights = forecaster.runtime.encoder_weights
    casts = weights.casts
    linears = [m for m in forecaster.image_encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert casts >= len(linears) > 0  # every linear weight (and bias) cast once
    second = forecaster.encode_image(frame)
    assert weights.casts == casts  # no re-cast on the second frame
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), OneDNNLinearMode():
        uncached = forecaster.image_encoder(torch.from_numpy(frame).unsqueeze(0)).float()  # cast on every call
    torch.testing.assert_close(first, uncached, rtol=0, atol=0)
    forecaster.embed_instruction("push the cube")
    assert weights.casts > casts  # the text encoder's weights: cast once too
    forecaster.sample_batch_size = 1  # a new plan: the cache starts over
    assert len(weights) == 0
    forecaster.encode_image(frame)
    assert len(weights) > 0
    forecaster.release()
    assert len(weights) == 0 and forecaster.runtime.encoder_weights is None
    other = Forecaster.from_config(tiny_config(), dtype="bfloat16", seed=0)
    other.encode_image(frame)
    assert other.runtime.encoder_weights is not weights  # owned per forecaster, not shared through the module


def test_bfloat16_encoders_work_for_a_model_built_in_inference_mode() -> None:
    """Weights created under ``torch.inference_mode()`` are inference tensors without a version counter: the cast
    cache must cast them (every call) instead of failing every forecast."""
    import numpy as np

    from traj_forecast_ros.forecaster import Forecaster

    with torch.inference_mode():
        forecaster = Forecaster.from_config(tiny_config(), dtype="bfloat16", seed=0)
    height, width = forecaster.config.image_size
    frame = np.random.default_rng(1).integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    forecast = forecaster.forecast(frame, num_samples=2, steps=3, seed=0)
    assert np.isfinite(forecast.tracks).all() and forecast.tracks.shape[0] == 2


def test_shared_context_attention_equals_repeated_context() -> None:
    torch.manual_seed(0)
    attention = randomize_parameters(Attention(16, num_heads=2), seed=4)
    x, context = torch.randn(6, 5, 16), torch.randn(2, 7, 16)  # 3 sequences per context
    with torch.inference_mode():
        torch.testing.assert_close(attention(x, context), attention(x, context.repeat_interleave(3, dim=0)),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 9])  # 1 x 2 heads: per-head GEMMs; 9 x 2 heads: chunked batched GEMMs
def test_explicit_attention_equals_sdpa(batch) -> None:
    generator = torch.Generator().manual_seed(batch)
    q, k, v = (torch.randn(batch, 2, length, 8, generator=generator) for length in (40, 7, 7))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, L, H, d)
    with torch.inference_mode():
        out = explicit_attention(q * 8**-0.5, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", KERNEL_CHOICES, ids=lambda o: f"fold={o.fold_modulation}-{o.attention}")
def test_fast_ops_run_each_layer_of_the_one_forward(denoiser, vae, options) -> None:
    """The fast path is chosen per layer: a single denoiser block (one shared conditioning row, so its modulation
    folds) and a single VAE block give their plain forward's result with the fast ops, and each layer's weights
    are prepared once per ops object, not once per call."""
    generator = torch.Generator().manual_seed(7)
    block, vae_block = denoiser.blocks[0], vae.decoder_blocks[1]
    width = block.attn.q.weight.shape[0]
    x, cond, context = (torch.randn(*shape, generator=generator) for shape in ((4, 5, width), (1, width),
                                                                               (1, 7, width)))
    vae_width = vae_block.attn.q.weight.shape[0]
    y, vae_context = torch.randn(4, 5, vae_width, generator=generator), torch.randn(2, 7, vae_width,
                                                                                    generator=generator)
    ops = FastCPUOps(options)
    with torch.inference_mode():
        expected, vae_expected = block(x, cond, context), vae_block(y, vae_context)
        fast, vae_fast = block(x, cond, context, ops), vae_block(y, vae_context, ops)
        prepared = ops.prepared
        assert prepared > 0
        again = block(x, cond, block.xattn.context_kv(context, ops), ops)  # prepared keys/values: same result
        vae_block(y, vae_context, ops)
        assert ops.prepared == prepared
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, fast, rtol=0, atol=0)
    torch.testing.assert_close(vae_fast, vae_expected, rtol=1e-5, atol=1e-5)
