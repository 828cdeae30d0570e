"""Forecaster.forecast_batch: several images' K samples in one denoiser call per step and one VAE decode per chunk,
equal to the separate forecasts with the same seeds; the caller's max_pixels; cancel and the float32 rerun."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from traj_forecast_ros.errors import ForecastCancelled, InvalidImageError, TrajForecastError
from traj_forecast_ros.forecast import ForecastRequest
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.geometry import DEFAULT_MAX_PIXELS
from traj_forecast_ros.model.presets import tiny_config
from traj_forecast_ros.sampling_plan import choose_sampling_plan

FAST_PLAN_TOLERANCE_PX = 5e-5  # the fp32 fast plan against the reference (issue 20)


@pytest.fixture(scope="module")
def base() -> Forecaster:
    config = tiny_config()
    config.null_instruction = ""  # trained with instruction dropout: guidance allowed
    return Forecaster.from_config(config, seed=0)


@pytest.fixture(scope="module")
def images(shared_images) -> list:
    return [np.asarray(Image.open(shared_images / name).convert("RGB"))
            for name in ("libero_agent_0.jpg", "physics101_0.jpg", "kubric_0.png")]


def plan(dtype: str = "float32", sample_batch_size: int = 0, fast: bool = True):
    return choose_sampling_plan("cpu", dtype, sample_batch_size=sample_batch_size, fast_cpu_kernels=fast)


def requests_of(images: list) -> list:
    instructions = ["open the drawer", "push the block", None]  # None: the model's default instruction
    return [ForecastRequest(image, instruction=text, seed=10 + index)
            for index, (image, text) in enumerate(zip(images, instructions))]


def separately(forecaster: Forecaster, requests: list, **options) -> list:
    return [forecaster.forecast(r.image, r.instruction, seed=r.seed, color_order=r.color_order, **options)
            for r in requests]


@contextmanager
def counting_calls(module: torch.nn.Module, method: str = "forward"):
    """Record the batch size of every call of ``module.<method>``."""
    original = getattr(module, method)
    batches = []

    def recording(x, *args, **kwargs):
        batches.append(x.shape[0])
        return original(x, *args, **kwargs)

    setattr(module, method, recording)
    try:
        yield batches
    finally:
        delattr(module, method)  # the class's method again


@pytest.mark.parametrize("sample_batch_size", [0, 2], ids=["all rows in one call", "chunks across requests"])
def test_batch_equals_separate_forecasts_on_the_fast_plan(base, images, sample_batch_size):
    forecaster = base.sibling(plan=plan(sample_batch_size=sample_batch_size))
    requests = requests_of(images)
    batched = forecaster.forecast_batch(requests, num_samples=3, steps=4)
    alone = separately(forecaster, requests, num_samples=3, steps=4)
    assert len(batched) == 3
    for one, other, request in zip(batched, alone, requests):
        assert one.seed == other.seed == request.seed and one.instruction == other.instruction
        assert one.image_size == other.image_size and one.crop_box == other.crop_box
        np.testing.assert_array_equal(one.query_points, other.query_points)
        assert np.abs(one.tracks - other.tracks).max() <= FAST_PLAN_TOLERANCE_PX
    assert batched[2].instruction == base.config.default_instruction


def test_batch_on_the_reference_plan_is_one_call_per_step_and_one_decode(base, images):
    forecaster = base.sibling(plan=plan(fast=False))
    requests = requests_of(images[:2])
    with counting_calls(forecaster.denoiser) as denoiser_batches, counting_calls(forecaster.vae, "decode") as decodes:
        batched = forecaster.forecast_batch(requests, num_samples=3, steps=4)
    assert denoiser_batches == [6, 6, 6]  # one call per Euler step for both requests' 3 samples
    assert decodes == [6]  # one VAE decode
    for one, other in zip(batched, separately(forecaster, requests, num_samples=3, steps=4)):
        # Not bit-equal: a GEMM over 6 rows may sum in another order than over 3 (measured: 1.5e-5 px).
        np.testing.assert_allclose(one.tracks, other.tracks, rtol=0, atol=FAST_PLAN_TOLERANCE_PX)


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_batch_is_exact_where_no_chunk_mixes_requests(base, images, fast):
    """One request per chunk (sample batch = K): each chunk computes what the single forecast computes."""
    forecaster = base.sibling(plan=plan(sample_batch_size=3, fast=fast))
    requests = requests_of(images)
    batched = forecaster.forecast_batch(requests, num_samples=3, steps=4)
    for one, other in zip(batched, separately(forecaster, requests, num_samples=3, steps=4)):
        np.testing.assert_array_equal(one.tracks, other.tracks)


def test_chunks_follow_the_plans_sample_batch_size(base, images):
    forecaster = base.sibling(plan=plan(sample_batch_size=4, fast=False))
    with counting_calls(forecaster.denoiser) as batches, counting_calls(forecaster.vae, "decode") as decodes:
        forecaster.forecast_batch(requests_of(images[:2]), num_samples=3, steps=3)
    assert batches == [4, 4, 2, 2] and decodes == [4, 2]  # 6 rows in chunks of 4: two Euler steps each


def test_guidance_in_a_batch(base, images):
    forecaster = base.sibling(plan=plan())
    requests = requests_of(images[:2])
    batched = forecaster.forecast_batch(requests, num_samples=2, steps=3, guidance_scale=3.0)
    alone = separately(forecaster, requests, num_samples=2, steps=3, guidance_scale=3.0)
    plain = forecaster.forecast_batch(requests, num_samples=2, steps=3)
    for one, other, unguided in zip(batched, alone, plain):
        assert one.guidance_scale == 3.0 and unguided.guidance_scale == 1.0
        assert np.abs(one.tracks - other.tracks).max() <= FAST_PLAN_TOLERANCE_PX
        assert np.abs(one.tracks - unguided.tracks).max() > 1e-3  # guidance changed the samples
    reference = base.sibling(plan=plan(fast=False))
    for one, other in zip(reference.forecast_batch(requests, num_samples=2, steps=3, guidance_scale=3.0),
                          separately(reference, requests, num_samples=2, steps=3, guidance_scale=3.0)):
        np.testing.assert_allclose(one.tracks, other.tracks, rtol=0, atol=FAST_PLAN_TOLERANCE_PX)


def test_max_pixels_is_the_callers_limit(base):
    big = np.zeros((4100, 4100, 3), np.uint8)
    big[1000:3000, 1500:2500] = 200  # a bright block
    assert big.shape[0] * big.shape[1] > DEFAULT_MAX_PIXELS
    with pytest.raises(InvalidImageError, match="max_pixels"):
        base.forecast(big, "push", num_samples=1, steps=2, seed=0)
    with pytest.raises(InvalidImageError, match="max_pixels"):  # one too-large image refuses the whole batch
        base.forecast_batch([ForecastRequest(big[:64, :64], "push", 0), ForecastRequest(big, "push", 0)],
                            num_samples=1, steps=2)
    result = base.forecast(big, "push", num_samples=1, steps=2, seed=0, max_pixels=2 ** 28)
    assert result.image_size == (4100, 4100) and np.isfinite(result.tracks).all()
    batched = base.forecast_batch([ForecastRequest(big, "push", 0)], num_samples=1, steps=2, max_pixels=2 ** 28)
    np.testing.assert_array_equal(batched[0].tracks, result.tracks)
    with pytest.raises(InvalidImageError, match="max_pixels"):
        base.forecast(np.zeros((40, 40, 3), np.uint8), "push", num_samples=1, max_pixels=1000)
    assert not hasattr(base, "max_pixels")  # no forecaster-wide limit any more


def test_cancel_mid_batch(base, images):
    forecaster = base.sibling(plan=plan(sample_batch_size=2))
    requests = requests_of(images[:2])
    polls = []

    def cancel_in_the_second_chunk() -> bool:
        polls.append(1)
        return len(polls) > 4  # 3 steps per chunk: stops at the second step of chunk 2

    with pytest.raises(ForecastCancelled, match="step 2 of 3"):
        forecaster.forecast_batch(requests, num_samples=2, steps=4, cancel=cancel_in_the_second_chunk)
    assert len(polls) == 5
    after = forecaster.forecast_batch(requests, num_samples=2, steps=4)  # the forecaster is still usable
    for one, other in zip(after, separately(forecaster, requests, num_samples=2, steps=4)):
        assert np.abs(one.tracks - other.tracks).max() <= FAST_PLAN_TOLERANCE_PX


@contextmanager
def non_finite_outputs(denoiser: torch.nn.Module, under_autocast: bool = True, calls: int = None):
    """The denoiser returns Inf (what a float16 overflow does): under autocast only (default), and only in its
    first ``calls`` such calls when given."""
    hits = []

    def hook(module, inputs, output):
        if (under_autocast and not torch.is_autocast_enabled("cpu")) or (calls is not None and len(hits) >= calls):
            return output
        hits.append(output.shape[0])
        return output * float("inf")

    handle = denoiser.register_forward_hook(hook)
    try:
        yield hits
    finally:
        handle.remove()


def test_non_finite_requests_of_a_batch_are_rerun_in_float32(base, images):
    requests = requests_of(images[:2])
    full = base.sibling(plan=plan(fast=False))
    expected = full.forecast_batch(requests, num_samples=2, steps=3)
    low = base.sibling(plan=plan("bfloat16", fast=False))
    with non_finite_outputs(low.denoiser):
        results = low.forecast_batch(requests, num_samples=2, steps=3)
    assert low.fp32_fallbacks == 2
    for result, reference, request in zip(results, expected, requests):
        assert result.dtype == "float32" and result.seed == request.seed
        assert result.timings["total"] >= result.timings["fp32_rerun"] > 0
        np.testing.assert_allclose(result.tracks, reference.tracks, atol=1e-3)  # the same noise, in float32
    # Only the request that failed is rerun: the first request's chunk (its 2 Euler steps) fails, the second's not.
    chunked = base.sibling(plan=plan("bfloat16", sample_batch_size=2, fast=False))
    with non_finite_outputs(chunked.denoiser, calls=2) as hits:
        mixed = chunked.forecast_batch(requests, num_samples=2, steps=3)
    assert hits == [2, 2] and chunked.fp32_fallbacks == 1 and [r.dtype for r in mixed] == ["float32", "bfloat16"]
    np.testing.assert_allclose(mixed[0].tracks, expected[0].tracks, atol=1e-3)
    assert np.isfinite(mixed[1].tracks).all() and "fp32_rerun" not in mixed[1].timings
    with non_finite_outputs(full.denoiser, under_autocast=False):
        with pytest.raises(TrajForecastError, match="even in float32"):  # a float32 plan has nothing to fall to
            full.forecast_batch(requests, num_samples=1, steps=2)
    assert full.fp32_fallbacks == 0


def test_empty_batch_and_bad_requests(base, images):
    assert base.forecast_batch([]) == []
    with pytest.raises(TypeError, match="ForecastRequest"):
        base.forecast_batch([images[0]])
    with pytest.raises(ValueError, match="seed"):
        base.forecast_batch([ForecastRequest(images[0], "push", seed=-5)])
