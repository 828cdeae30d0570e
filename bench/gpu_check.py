"""Device check of the half-precision GPU path, in one command: writes ``gpu_check.json`` and ``gpu_check.md`` and
exits non-zero when a check fails.

    python3 bench/gpu_check.py --out gpu_check_out                 # a CUDA GPU: the full check (< 8 min on H100/H200)
    .venv/bin/python bench/gpu_check.py --device cpu --quick        # CI: the script itself on a tiny model (< 1 min)

What it runs (LIBERO-size model with random weights and random-weight DINOv2-L / CLIP-L encoders; ``--quick``: the
tiny test model, fewer samples and repeats):

1. ``policy``: what ``dtype="auto"`` resolves to on the device (bfloat16 on GPUs with native bfloat16, float16 on
   older GPUs, float32 on CPU) and the device's name, capability and count.
2. ``accuracy``: the same noise (seed) through float32, float16 and bfloat16; max / mean / p99 track difference in
   pixels against float32. Pass: mean and p99 within :data:`TRACK_TOLERANCE` (see there for the justification),
   and no float32 fallback (a fallback would hide the half-precision result).
3. ``stress``: non-finite samples among 64 with the residual stream's MLP updates scaled by 1..2^16 (forward hooks),
   per dtype, counted on the raw sampler output; then the same stress through ``Forecaster.forecast``: no
   non-finite track may come out (the float32 rerun must catch them) and ``fp32_fallbacks`` must count them.
4. ``timing``: forecast time for K = 1, 8, 32 in each dtype, with CUDA graphs and ``torch.compile`` off / on:
   median of 20 after warm-up, ``torch.cuda.synchronize`` around every call; peak memory; achieved TFLOP/s
   (FLOPs counted once with ``torch.utils.flop_counter``) against the device's dense peak (:data:`PEAK_TFLOPS`,
   by device name). Graph and compile runs must give the plain run's tracks (same dtype) within
   :data:`MODE_TOLERANCE_PX`. Runs that do not fit ``--budget-s`` are reported as skipped, never dropped silently
   (``torch.compile`` runs come last: each compile takes tens of seconds).
5. ``second_device``: when more than one GPU is present, a forecaster on ``cuda:1`` with CUDA graphs, called from a
   thread whose current device is ``cuda:0``, must match the ``cuda:0`` result and allocate nothing on ``cuda:0``.
6. ``node``: the sample bag replayed through ``forecast_node`` (a separate process, over DDS, via
   :func:`traj_forecast_ros.bag.replay.replay_through_node`) with ``device`` set to the checked device: every frame
   answered or counted as dropped, p50/p95 latency, ``fp32_fallbacks`` in ``/diagnostics``. Skipped (with the
   reason) where rclpy or the message package cannot be imported; ``--strict`` turns every skip into a failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from traj_forecast_ros.errors import TrajForecastError  # noqa: E402
from traj_forecast_ros.forecaster import Forecaster  # noqa: E402
from traj_forecast_ros.sampling_plan import dtype_name, resolve_device, resolve_dtype  # noqa: E402

# Dense (no sparsity) peak TFLOP/s from the vendors' datasheets: (bfloat16, float16, float32 without tensor cores).
# Matched by substring of ``torch.cuda.get_device_name`` in this order (GH200 before H200, L40S before L40 and L4).
PEAK_TFLOPS: Tuple[Tuple[str, Dict[str, Optional[float]]], ...] = (
    ("GH200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("H100 NVL", {"bfloat16": 835.0, "float16": 835.0, "float32": 60.0}),
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 51.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),  # SXM
    ("H800", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    ("L40S", {"bfloat16": 362.0, "float16": 362.0, "float32": 91.6}),
    ("L40", {"bfloat16": 181.0, "float16": 181.0, "float32": 90.5}),
    ("L4", {"bfloat16": 121.0, "float16": 121.0, "float32": 30.3}),
    ("A10", {"bfloat16": 125.0, "float16": 125.0, "float32": 31.2}),
    ("RTX 4090", {"bfloat16": 165.0, "float16": 165.0, "float32": 82.6}),
    ("V100", {"bfloat16": None, "float16": 125.0, "float32": 15.7}),
    ("T4", {"bfloat16": None, "float16": 65.0, "float32": 8.1}),
)

# Track difference against float32 on the same noise, in pixels of the 128x128 LIBERO image (query grid spacing
# 2 px). Rounding alone: the VAE decoder's last layer writes normalised coordinates in the compute dtype, a unit
# roundoff of 2^-8 (bfloat16) / 2^-11 (float16) of coordinates up to 64 px from the centre, i.e. up to 0.25 / 0.03 px
# before any propagation through the 9 Euler steps. The limits: mean within a quarter (bfloat16) / an eighth
# (float16) of the 2 px grid spacing, so the dtype never moves a point by a grid cell on average; p99 within one
# grid spacing (bfloat16) / half of it (float16). The CPU emulation of the CUDA path stays far inside them (see the
# README's performance section for the measured figures and test/perf/test_gpu_path.py for the CI test).
TRACK_TOLERANCE: Dict[str, Dict[str, float]] = {
    "bfloat16": {"mean_px": 0.5, "p99_px": 2.0},
    "float16": {"mean_px": 0.25, "p99_px": 1.0},
}
# CUDA graphs replay the same kernels; torch.compile may fuse and reorder (within the dtype's rounding).
MODE_TOLERANCE_PX = {"graphs": 1e-3, "compile": 0.5, "graphs+compile": 0.5}
STRESS_SCALES = (1.0, 16.0, 256.0, 4096.0, 65536.0)
INSTRUCTION = "put the black bowl in the bottom drawer of the cabinet and close it"
DTYPES = ("float32", "float16", "bfloat16")
MODES = ("plain", "graphs", "compile", "graphs+compile")
SECTIONS = ("policy", "accuracy", "stress", "timing", "node", "second_device")


# ---------------------------------------------------------------------------------------------- helpers
class Budget:
    """Wall-clock budget of the whole check: later parts are skipped (and reported) once it is spent."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peaks_for_name(name: str) -> Tuple[Optional[str], Dict[str, Optional[float]]]:
    """(matched table key, peaks) for a device name such as ``"NVIDIA H200"``; (None, {}) when not in the table."""
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return key, peaks
    return None, {}


def peak_table_entry(device: torch.device) -> Tuple[Optional[str], Dict[str, Optional[float]]]:
    """(matched table key, peaks) for a CUDA device; (None, {}) when unknown or on CPU."""
    if device.type != "cuda":
        return None, {}
    return peaks_for_name(torch.cuda.get_device_name(device))


def scene_image(size: Tuple[int, int]) -> np.ndarray:
    """A deterministic scene (gradient, a box and a disc) of ``size`` (h, w): the same input on every machine."""
    height, width = size
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1),
                      np.full_like(xs, 96)], axis=-1).astype(np.uint8)
    image[height // 4: height // 2, width // 5: width // 2] = (200, 40, 40)
    disc = (ys - 2 * height // 3) ** 2 + (xs - 2 * width // 3) ** 2 < (min(height, width) // 8) ** 2
    image[disc] = (30, 180, 60)
    return image


def mode_settings(mode: str) -> Dict[str, bool]:
    """``Forecaster.sibling`` flags of a run mode ("plain", "graphs", "compile", "compile+graphs")."""
    return {"use_cuda_graph": "graphs" in mode, "use_compile": "compile" in mode}


def instruction_for(forecaster: Forecaster) -> Optional[str]:
    return INSTRUCTION if forecaster.text_encoder is not None else None


def supported_dtypes(device: torch.device) -> Dict[str, Optional[str]]:
    """dtype name -> None when the policy allows it on ``device``, else why not."""
    reasons: Dict[str, Optional[str]] = {}
    for name in DTYPES:
        try:
            resolve_dtype(name, device)
            reasons[name] = None
        except Exception as exc:  # noqa: BLE001 - DeviceError: the policy refuses it here
            reasons[name] = str(exc)
    return reasons


def track_difference(tracks: np.ndarray, reference: np.ndarray) -> Dict[str, Any]:
    """max / mean / p99 of |tracks - reference| in pixels, and the non-finite count."""
    finite = np.isfinite(tracks)
    diff = np.abs(np.where(finite, tracks, np.nan) - reference)
    valid = diff[np.isfinite(diff)]
    return {"max_px": float(valid.max()) if valid.size else None,
            "mean_px": float(valid.mean()) if valid.size else None,
            "p99_px": float(np.percentile(valid, 99)) if valid.size else None,
            "non_finite": int((~finite).sum())}


@contextmanager
def stressed(denoiser: torch.nn.Module, scale: float) -> Iterator[None]:
    """Multiply every block's MLP update by ``scale`` (forward hooks): activations that overflow float16 first."""
    handles = [block.mlp.register_forward_hook(lambda module, inputs, output: output * scale)
               for block in denoiser.blocks] if scale != 1.0 else []
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check(status: str, **details: Any) -> Dict[str, Any]:
    return {"status": status, **details}


# ---------------------------------------------------------------------------------------------- sections
def policy_section(device: torch.device) -> Dict[str, Any]:
    auto = dtype_name(resolve_dtype("auto", device))
    details: Dict[str, Any] = {"device": str(device), "auto_dtype": auto, "torch": torch.__version__,
                               "cuda": torch.version.cuda, "python": platform.python_version(),
                               "dtypes": supported_dtypes(device)}
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        details.update(name=torch.cuda.get_device_name(device), capability=list(capability),
                       device_count=torch.cuda.device_count(), peak_key=peak_table_entry(device)[0])
        expected = "bfloat16" if capability[0] >= 8 else "float16"
    else:
        expected = "float32"
    details["expected_auto_dtype"] = expected
    return check("pass" if auto == expected else "fail", **details)


def accuracy_section(base: Forecaster, image: np.ndarray, samples: int, steps: int,
                     dtypes: Dict[str, Optional[str]]) -> Dict[str, Any]:
    reference = base.forecast(image, instruction_for(base), num_samples=samples, steps=steps, seed=0).tracks
    rows, failed = {}, []
    for name in ("float16", "bfloat16"):
        if dtypes[name] is not None:
            rows[name] = {"status": "skipped", "reason": dtypes[name]}
            continue
        low = base.sibling(dtype=name, sample_batch_size=0)
        result = low.forecast(image, instruction_for(base), num_samples=samples, steps=steps, seed=0)
        row = track_difference(result.tracks, reference)
        limits = TRACK_TOLERANCE[name]
        row.update(limits=limits, fp32_fallbacks=low.fp32_fallbacks, result_dtype=result.dtype)
        ok = (low.fp32_fallbacks == 0 and row["non_finite"] == 0 and row["mean_px"] <= limits["mean_px"]
              and row["p99_px"] <= limits["p99_px"])
        row["status"] = "pass" if ok else "fail"
        if not ok:
            failed.append(name)
        rows[name] = row
    return check("fail" if failed else "pass", samples=samples, steps=steps, against="float32", dtypes=rows)


def stress_section(base: Forecaster, image: np.ndarray, samples: int, steps: int,
                   dtypes: Dict[str, Optional[str]], scales: Sequence[float] = STRESS_SCALES) -> Dict[str, Any]:
    """Raw non-finite samples per dtype and scale, then the forecaster's fallback under the strongest stress."""
    from traj_forecast_ros.geometry import prepare_image
    from traj_forecast_ros.model.flow import euler_sample

    device = base.device
    model_image, _ = prepare_image(image, tuple(base.config.image_size))
    with torch.inference_mode():
        features = base.encode_image(model_image)  # [1, N, D] float32
        text = base.embed_instruction(INSTRUCTION) if base.text_encoder is not None else None  # [1, E]
        mean, _ = base.condition_posterior(features)  # [1, 1, C, h, w]
    frames, channels, rows_, cols = base.latent_shape
    noise = torch.randn((samples, frames - 1, channels, rows_, cols),
                        generator=torch.Generator().manual_seed(0)).to(device)  # [S, T-1, C, h, w]
    counts: Dict[str, Dict[str, int]] = {}
    for name in DTYPES:
        if dtypes[name] is not None:
            continue
        dtype = resolve_dtype(name, device)
        counts[name] = {}
        for scale in scales:
            autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                        else torch.autocast(device.type, enabled=False))
            with torch.inference_mode(), stressed(base.denoiser, scale), autocast:
                state = euler_sample(base.denoiser, mean.expand(samples, -1, -1, -1, -1), noise,
                                     features.expand(samples, -1, -1),
                                     text.expand(samples, -1) if text is not None else None, steps=steps)
            bad = ~torch.isfinite(state.float()).flatten(1).all(dim=1)  # [S]
            counts[name][f"{scale:g}"] = int(bad.sum())
    # Through the API: the strongest stress at which half precision broke must still give finite tracks.
    fallback: Dict[str, Any] = {}
    failed = []
    for name in ("float16", "bfloat16"):
        if name not in counts:
            continue
        broken = [float(s) for s, n in counts[name].items() if n > 0 and counts["float32"][s] == 0]
        if not broken:
            fallback[name] = {"status": "info", "reason": "no scale broke this dtype while float32 held"}
            continue
        scale = max(broken)
        low = base.sibling(dtype=name, sample_batch_size=0)
        with stressed(base.denoiser, scale):
            try:
                result = low.forecast(image, instruction_for(base), num_samples=min(samples, 8), steps=steps,
                                      seed=0)
                finite = bool(np.isfinite(result.tracks).all())
                outcome = {"scale": scale, "finite": finite, "result_dtype": result.dtype,
                           "fp32_fallbacks": low.fp32_fallbacks}
                ok = finite and low.fp32_fallbacks == 1 and result.dtype == "float32"
            except TrajForecastError as exc:
                outcome, ok = {"scale": scale, "error": str(exc)}, False
        outcome["status"] = "pass" if ok else "fail"
        if not ok:
            failed.append(name)
        fallback[name] = outcome
    return check("fail" if failed else "pass", samples=samples, scales=list(scales),
                 non_finite_samples=counts, fallback=fallback)


def count_forecast_flops(base: Forecaster, image: np.ndarray, steps: int) -> Callable[[int], int]:
    """FLOPs of a forecast as a function of K: counted with ``torch.utils.flop_counter`` over whole forecasts of
    K = 1 and 2 on the reference modules (the code CUDA runs; attention included), linear in K beyond."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value)}
    counter_model = base.sibling(dtype="float32", sample_batch_size=0)
    counter_model.plan = dataclasses.replace(counter_model.plan, fast_cpu_kernels=False)
    counted = {}
    for samples in (1, 2):
        with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
            counter_model.forecast(image, instruction_for(base), num_samples=samples, steps=steps, seed=0)
        counted[samples] = int(counter.get_total_flops())
    per_sample = counted[2] - counted[1]
    if per_sample <= 0:
        raise RuntimeError(f"FLOP count did not grow with K: {counted}")

    def total(samples: int) -> int:
        return counted[1] + (samples - 1) * per_sample

    return total


def timing_section(base: Forecaster, image: np.ndarray, sample_counts: Sequence[int], steps: int, repeats: int,
                   warmup: int, modes: Sequence[str], dtypes: Dict[str, Optional[str]], budget: Budget,
                   flops_of: Optional[Callable[[int], int]], first_modes: bool) -> List[Dict[str, Any]]:
    """One row per (dtype, K, mode); ``first_modes`` runs plain + graphs, else the compile modes."""
    device = base.device
    _, peaks = peak_table_entry(device)
    rows: List[Dict[str, Any]] = []
    wanted = [m for m in modes if ("compile" in m) != first_modes]
    auto = dtype_name(resolve_dtype("auto", device))
    by_importance = [auto] + [name for name in DTYPES if name != auto]  # the default dtype first
    for name in by_importance:
        for mode in wanted:
            for samples in sample_counts:
                row: Dict[str, Any] = {"dtype": name, "samples": samples, "mode": mode}
                rows.append(row)
                if dtypes[name] is not None:
                    row.update(status="skipped", reason=f"{name} refused on {device.type} by the dtype policy")
                    continue
                if "graphs" in mode and device.type != "cuda":
                    row.update(status="skipped", reason="CUDA graphs need a CUDA device")
                    continue
                estimate = 90.0 if "compile" in mode else 10.0
                if not budget.allows(estimate):
                    row.update(status="skipped", reason=f"time budget (--budget-s): {budget.left():.0f} s left")
                    continue
                try:
                    row.update(time_one(base, image, name, mode, samples, steps, repeats, warmup))
                except Exception as exc:  # noqa: BLE001 - a broken mode is a failed row, the check goes on
                    row.update(status="fail", error=f"{type(exc).__name__}: {exc}",
                               traceback=traceback.format_exc(limit=4))
                    continue
                if flops_of is not None:
                    tflops = flops_of(samples) / row["median_s"] / 1e12
                    row["achieved_tflops"] = tflops
                    peak = peaks.get(name)
                    row["peak_tflops"] = peak
                    row["fraction_of_peak"] = tflops / peak if peak else None
    # Graph / compile runs against the plain run of the same dtype and K.
    plain = {(r["dtype"], r["samples"]): r for r in rows if r["mode"] == "plain" and "tracks" in r}
    for row in rows:
        if row["mode"] == "plain" or "tracks" not in row:
            continue
        reference = plain.get((row["dtype"], row["samples"])) or base_plain_tracks(base, image, row, steps)
        diff = track_difference(row["tracks"], reference["tracks"])
        row["vs_plain"] = diff
        limit = MODE_TOLERANCE_PX[row["mode"]]
        if diff["non_finite"] or diff["max_px"] is None or diff["mean_px"] > limit:
            row["status"] = "fail"
            row["error"] = f"differs from the plain run: mean {diff['mean_px']} px > {limit} px"
    return rows


def base_plain_tracks(base: Forecaster, image: np.ndarray, row: Dict[str, Any], steps: int) -> Dict[str, Any]:
    """The plain run's tracks for a row whose plain run is in the other half of the timing section."""
    plain = base.sibling(dtype=row["dtype"], sample_batch_size=0)
    result = plain.forecast(image, instruction_for(base), num_samples=row["samples"], steps=steps, seed=0)
    return {"tracks": result.tracks}


def time_one(base: Forecaster, image: np.ndarray, name: str, mode: str, samples: int, steps: int, repeats: int,
             warmup: int) -> Dict[str, Any]:
    """Median of ``repeats`` synchronised forecasts after ``warmup`` untimed ones; peak memory; the tracks."""
    device = base.device
    forecaster = base.sibling(dtype=name, sample_batch_size=0, **mode_settings(mode))
    instruction = instruction_for(base)
    started = time.perf_counter()
    result = forecaster.forecast(image, instruction, num_samples=samples, steps=steps, seed=0)  # compiles/captures
    first_s = time.perf_counter() - started
    for _ in range(max(warmup - 1, 0)):
        forecaster.forecast(image, instruction, num_samples=samples, steps=steps, seed=0)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    durations = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        forecaster.forecast(image, instruction, num_samples=samples, steps=steps, seed=0)
        sync(device)
        durations.append(time.perf_counter() - start)
    row: Dict[str, Any] = {
        "status": "pass", "first_call_s": first_s, "median_s": statistics.median(durations),
        "p90_s": float(np.percentile(durations, 90)), "min_s": min(durations), "repeats": repeats,
        "fp32_fallbacks": forecaster.fp32_fallbacks, "tracks": result.tracks,
    }
    if device.type == "cuda":
        row["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    denoise = forecaster.runtime.denoise_fn
    if hasattr(denoise, "captures"):
        row["graphs_captured"] = denoise.captures
    if mode != "plain":
        forecaster.release()  # graphs hold memory pools; the shared modules stay with base
    return row


def second_device_section(base: Forecaster, image: np.ndarray, samples: int, steps: int) -> Dict[str, Any]:
    if base.device.type != "cuda" or torch.cuda.device_count() < 2:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return check("skipped", reason=f"{count} CUDA device(s): needs 2")
    first, second = torch.device("cuda", 0), torch.device("cuda", 1)
    dtype = dtype_name(resolve_dtype("auto", second))
    on_first = base.sibling(device=first, dtype=dtype, sample_batch_size=0)
    reference = on_first.forecast(image, instruction_for(base), num_samples=samples, steps=steps, seed=0).tracks
    # moves the shared modules: base is done with them
    on_second = base.sibling(device=second, dtype=dtype, sample_batch_size=0, use_cuda_graph=True)
    outcome: Dict[str, Any] = {}

    def worker() -> None:
        try:
            torch.cuda.set_device(first)  # the calling thread's current device is the other GPU
            allocated = torch.cuda.memory_allocated(first)
            result = on_second.forecast(image, instruction_for(base), num_samples=samples, steps=steps, seed=0)
            result = on_second.forecast(image, instruction_for(base), num_samples=samples, steps=steps, seed=0)
            outcome.update(tracks=result.tracks, first_device_growth_bytes=torch.cuda.memory_allocated(first)
                           - allocated, current_device_after=torch.cuda.current_device())
        except Exception as exc:  # noqa: BLE001
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    if "error" in outcome:
        return check("fail", error=outcome["error"])
    diff = track_difference(outcome.pop("tracks"), reference)
    ok = (diff["non_finite"] == 0 and diff["mean_px"] <= MODE_TOLERANCE_PX["compile"]
          and outcome["first_device_growth_bytes"] == 0 and outcome["current_device_after"] == 0)
    return check("pass" if ok else "fail", dtype=dtype, vs_cuda0=diff, **outcome)


def node_section(device: torch.device, model_dir: Callable[[], str], work_dir: Path, samples: int, steps: int,
                 budget: Budget, estimate_s: float, frames: Optional[int] = None) -> Dict[str, Any]:
    """The sample bag through the node process on ``device``; the recording stays in ``work_dir`` (temporary).
    ``frames``: replay only the first N frames of each camera (a bag written into ``work_dir``; --quick)."""
    try:
        import rclpy  # noqa: F401
        import traj_forecast_msgs.msg  # noqa: F401
        from traj_forecast_ros.bag.replay import replay_through_node
        from traj_forecast_ros.bag.sample import SAMPLE_BAG
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken ROS install
        return check("skipped", reason=f"the node needs rclpy and traj_forecast_msgs ({type(exc).__name__}: {exc})")
    if not budget.allows(estimate_s):
        return check("skipped", reason=f"time budget (--budget-s): {budget.left():.0f} s left")
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    device_param = "cuda" if device.type == "cuda" else str(device)
    bag = SAMPLE_BAG
    if frames is not None:
        from traj_forecast_ros.bag.sample import SHARED_IMAGES, make_sample_bag

        if SHARED_IMAGES.is_dir():  # else the shipped 8-frame bag
            bag = make_sample_bag(work_dir / "short_bag", num_frames=frames)
    summary = replay_through_node(
        bag, work_dir / "replay", model=model_dir(), rate=1.0, print_summary=False, timeout_s=240,
        extra_params=[f"device:={device_param}", f"num_samples:={samples}", f"steps:={steps}"])
    diagnostics = summary.get("node_diagnostics", {})
    details = {key: summary.get(key) for key in ("frames_in", "frames_received_by_node", "forecasts_out", "dropped",
                                                  "rejected", "frames_unaccounted", "all_frames_accounted", "latency_ms",
                                                  "node_exit_code", "wall_s")}
    details["node_device"] = diagnostics.get("device")
    details["node_dtype"] = diagnostics.get("dtype")
    details["fp32_fallbacks"] = diagnostics.get("fp32_fallbacks")
    details["inference_p50_ms"] = diagnostics.get("inference_p50_ms")
    ok = (summary["all_frames_accounted"] and summary["frames_unaccounted"] == 0 and summary["forecasts_out"] >= 1
          and str(details["node_device"]).startswith(device.type) and details["fp32_fallbacks"] is not None)
    return check("pass" if ok else "fail", samples=samples, steps=steps, **details)


# ---------------------------------------------------------------------------------------------- report
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _sig(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}"


def markdown(report: Dict[str, Any]) -> str:
    """The report as markdown: the checks, then one table per section."""
    policy = report["sections"].get("policy", {})
    lines = [f"# gpu_check: {report['result'].upper()}", "",
             f"{policy.get('name', report['device'])} ({report['device']}), torch {policy.get('torch')}, "
             f"CUDA {policy.get('cuda')}, dtype auto = {policy.get('auto_dtype')}; "
             f"{'quick (CI) run' if report['quick'] else 'full run'}, {report['wall_s']:.0f} s", "",
             "| check | status | note |", "|---|---|---|"]
    for name, section in report["sections"].items():
        if isinstance(section, dict):
            note = section.get("reason") or section.get("error") or ""
            lines.append(f"| {name} | {section.get('status')} | {note} |")
    timing = report["sections"].get("timing", {}).get("rows", [])
    if timing:
        lines += ["", "## Forecast time (median of the timed runs, synchronised)", "",
                  "| dtype | K | mode | median ms | p90 ms | first call s | TFLOP/s | % of peak | peak MiB | status |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in timing:
            fraction = row.get("fraction_of_peak")
            lines.append(
                f"| {row['dtype']} | {row['samples']} | {row['mode']} | "
                f"{_fmt(row['median_s'] * 1e3, 1) if 'median_s' in row else '-'} | "
                f"{_fmt(row['p90_s'] * 1e3, 1) if 'p90_s' in row else '-'} | {_fmt(row.get('first_call_s'))} | "
                f"{_sig(row.get('achieved_tflops'))} | {_fmt(fraction * 100 if fraction else None, 1)} | "
                f"{_fmt(row.get('peak_memory_mib'), 0)} | {row['status']}"
                f"{': ' + row.get('reason', row.get('error', '')) if row['status'] != 'pass' else ''} |")
    accuracy = report["sections"].get("accuracy", {})
    if accuracy.get("dtypes"):
        lines += ["", f"## Tracks against float32 (same noise, K={accuracy.get('samples')}, px)", "",
                  "| dtype | mean | p99 | max | limits (mean / p99) | non-finite | status |",
                  "|---|---|---|---|---|---|---|"]
        for name, row in accuracy["dtypes"].items():
            limits = row.get("limits", {})
            lines.append(f"| {name} | {_fmt(row.get('mean_px'), 4)} | {_fmt(row.get('p99_px'), 4)} | "
                         f"{_fmt(row.get('max_px'), 4)} | {_fmt(limits.get('mean_px'))} / {_fmt(limits.get('p99_px'))}"
                         f" | {_fmt(row.get('non_finite'))} | {row.get('status')} |")
    stress = report["sections"].get("stress", {})
    if stress.get("non_finite_samples"):
        scales = [f"{s:g}" for s in stress["scales"]]
        lines += ["", f"## Non-finite samples of {stress['samples']} under stressed activations (MLP updates x scale)",
                  "", "| dtype | " + " | ".join(f"x{s}" for s in scales) + " |",
                  "|---|" + "---|" * len(scales)]
        for name, counts in stress["non_finite_samples"].items():
            lines.append(f"| {name} | " + " | ".join(str(counts.get(s, "-")) for s in scales) + " |")
        for name, outcome in stress.get("fallback", {}).items():
            lines.append(f"\nfallback {name}: {json.dumps(outcome)}")
    node = report["sections"].get("node", {})
    if node.get("status") in ("pass", "fail"):
        latency = node.get("latency_ms") or {}
        lines += ["", "## Node end to end (sample bag, forecast_node over DDS)", "",
                  f"frames in {node.get('frames_in')}, forecasts out {node.get('forecasts_out')}, dropped "
                  f"{node.get('dropped')}, rejected {node.get('rejected')}, unaccounted {node.get('frames_unaccounted')}; latency p50 "
                  f"{_fmt(latency.get('p50'), 1)} ms, p95 {_fmt(latency.get('p95'), 1)} ms; node device "
                  f"{node.get('node_device')} {node.get('node_dtype')}, fp32_fallbacks {node.get('fp32_fallbacks')}"]
    return "\n".join(lines) + "\n"


def jsonable(value: Any) -> Any:
    """Drop arrays (tracks) and make the report JSON-serialisable."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items() if not isinstance(v, np.ndarray)}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


# ---------------------------------------------------------------------------------------------- main
def build_model(quick: bool, device: torch.device) -> Forecaster:
    from traj_forecast_ros.model.presets import libero_random_config, tiny_config

    if quick:
        return Forecaster.from_config(tiny_config(), device=device, dtype="float32", sample_batch_size=0)
    config = libero_random_config()
    return Forecaster.from_config(config, device=device, dtype="float32", seed=0, sample_batch_size=0)


def save_node_model(base: Forecaster, directory: Path) -> str:
    """The checked model as a model directory the node process can load (random weights)."""
    from traj_forecast_ros.model.checkpoint import save_model_dir

    return str(save_model_dir(directory, base.config, base.denoiser, base.vae, base.image_encoder,
                              base.text_encoder))


def run_section(report: Dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    """Run one section; an exception is a failed section with its traceback, and the check goes on."""
    started = time.perf_counter()
    try:
        section = fn()
    except Exception as exc:  # noqa: BLE001
        section = check("fail", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=6))
    if isinstance(section, dict):
        section["seconds"] = round(time.perf_counter() - started, 2)
    report["sections"][name] = section
    print(f"[gpu_check] {name}: {section.get('status') if isinstance(section, dict) else section} "
          f"({time.perf_counter() - started:.1f} s)", flush=True)
    return section


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few samples and repeats (CI)")
    parser.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json / gpu_check.md")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget in s: timing runs and the node replay that no longer fit are "
                             "skipped and reported (default 360: the whole check stays under 8 min; quick 120)")
    parser.add_argument("--node-model", default=None,
                        help="model directory for the node run (default: the checked random-weight model)")
    parser.add_argument("--skip-node", action="store_true", help="no node replay")
    parser.add_argument("--strict", action="store_true", help="a skipped check fails too")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--samples", default=None, help="K values to time, e.g. 1,8,32 (default; quick 1,2); the "
                        "largest is also the accuracy check's K")
    args = parser.parse_args(argv)
    selected = {name.strip() for name in args.sections.split(",") if name.strip()}
    if not selected <= set(SECTIONS):
        parser.error(f"unknown section(s) {sorted(selected - set(SECTIONS))}: choose from {', '.join(SECTIONS)}")

    started = time.monotonic()
    device = resolve_device(args.device)
    quick = args.quick
    budget = Budget(args.budget_s if args.budget_s is not None else (120.0 if quick else 360.0))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sample_counts = tuple(int(k) for k in args.samples.split(",")) if args.samples else ((1, 2) if quick
                                                                                          else (1, 8, 32))
    steps = 3 if quick else 10
    repeats, warmup = (3, 1) if quick else (20, 3)
    stress_samples = 4 if quick else 64
    stress_scales = (1.0, STRESS_SCALES[-1]) if quick else STRESS_SCALES
    modes = ("plain",) if (quick and device.type == "cpu") else MODES

    report: Dict[str, Any] = {"device": str(device), "quick": quick, "sections": {}, "argv": sys.argv[1:]}
    print(f"[gpu_check] building the {'tiny' if quick else 'LIBERO-size random-weight'} model on {device}",
          flush=True)
    base = build_model(quick, device)
    image = scene_image(tuple(base.config.image_size))
    dtypes = supported_dtypes(device)

    def section(name: str, fn: Callable[[], Any]) -> None:
        if name in selected:
            run_section(report, name, fn)
        else:
            report["sections"].setdefault(name, check("skipped", reason="not selected (--sections)"))

    section("policy", lambda: policy_section(device))
    section("accuracy", lambda: accuracy_section(base, image, sample_counts[-1], steps, dtypes))
    section("stress", lambda: stress_section(base, image, stress_samples, steps, dtypes, stress_scales))
    flops_of = None
    if "timing" in selected:
        try:
            flops_of = count_forecast_flops(base, image, steps)
            report["flops_per_forecast"] = {str(k): flops_of(k) for k in sample_counts}
        except Exception as exc:  # noqa: BLE001 - timings stay valid without FLOPs
            report["flops_error"] = f"{type(exc).__name__}: {exc}"

    timing: Dict[str, Any] = {"rows": [], "steps": steps, "repeats": repeats, "warmup": warmup}

    def timing_part(first: bool) -> Dict[str, Any]:
        timing["rows"] += timing_section(base, image, sample_counts, steps, repeats, warmup, modes, dtypes, budget,
                                         flops_of, first_modes=first)
        statuses = {row["status"] for row in timing["rows"]}
        timing["status"] = "fail" if "fail" in statuses else "pass"
        timing["skipped_rows"] = sum(row["status"] == "skipped" for row in timing["rows"])
        return timing

    section("timing", lambda: timing_part(True))  # plain and CUDA graphs
    if args.skip_node:
        report["sections"]["node"] = check("skipped", reason="--skip-node")
    else:
        with tempfile.TemporaryDirectory(prefix="gpu_check_model_") as tmp:
            model_dir = lambda: args.node_model or save_node_model(base, Path(tmp) / "model")  # noqa: E731
            section("node", lambda: node_section(device, model_dir, Path(tmp), 2 if quick else 8, steps, budget,
                                                 30.0 if quick else 90.0, frames=2 if quick else None))
    section("timing", lambda: timing_part(False))  # torch.compile last: each compile takes tens of seconds
    section("second_device", lambda: second_device_section(base, image, 2 if quick else 8, steps))

    statuses = [s.get("status") for s in report["sections"].values() if isinstance(s, dict)]
    failed = "fail" in statuses or (args.strict and "skipped" in statuses)
    report["result"] = "fail" if failed else "pass"
    report["wall_s"] = time.monotonic() - started
    (out_dir / "gpu_check.json").write_text(json.dumps(jsonable(report), indent=2) + "\n")
    (out_dir / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"[gpu_check] {report['result']}: {out_dir / 'gpu_check.json'}, {out_dir / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
