"""Forecast benchmark: time per stage, FLOPs, achieved GFLOP/s and peak memory of the LIBERO-size model.

Runs ``Forecaster.forecast`` (the API's own sampling plan) on a real LIBERO frame for each compute dtype and each K,
and prints, per run: the time of every stage (DINOv2, text, VAE encode of the query grid, each denoiser evaluation,
VAE decode), the total, the FLOPs of a forecast (counted once with ``torch.utils.flop_counter``; attention included)
and the GFLOP/s achieved per stage and overall, and the peak memory (process RSS high-water mark; CUDA peak
allocation on GPU). Without real weights the architecture is built with random weights (DINOv2-L and CLIP-L text
configs included), which costs the same time.

Examples (2-core CPU: ``--samples 1`` takes a few minutes for both dtypes; K=8 in fp32 about 4 more)::

    .venv/bin/python bench/forecast_bench.py --samples 1
    .venv/bin/python bench/forecast_bench.py --samples 1,8 --dtype float32,bfloat16 --json bench.json
    .venv/bin/python bench/forecast_bench.py --quick          # tiny model, seconds: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count  # noqa: E402

from traj_forecast_ros.errors import WeightsNotFoundError  # noqa: E402
from traj_forecast_ros.forecaster import Forecaster, dtype_name, resolve_device  # noqa: E402
from traj_forecast_ros.geometry import prepare_image  # noqa: E402
from traj_forecast_ros.model.config import ImageEncoderConfig, ModelConfig, TextEncoderConfig  # noqa: E402
from traj_forecast_ros.model.config import libero_config, tiny_config  # noqa: E402
from traj_forecast_ros.model.encoders import CLIP_L14_TEXT, DINOV2_LARGE  # noqa: E402

INSTRUCTION = "put the black bowl in the bottom drawer of the cabinet and close it"
DEFAULT_IMAGE = REPO.parent / "shared" / "data" / "images" / "libero_agent_0.jpg"
STAGES = ("image_encoder", "text_encoder", "vae_encode", "denoise", "vae_decode")


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU fused attention kernel (not in torch's FLOP registry)."""
    return sdpa_flop_count(query, key, value)


FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


# ---------------------------------------------------------------------------------------------- model
def libero_random_config() -> ModelConfig:
    """The LIBERO-ATM architecture with random-weight DINOv2-L and CLIP-L text encoders of the real sizes."""
    config = libero_config("atm")
    config.name = "libero-atm (random weights)"
    config.image_encoder = ImageEncoderConfig(model_id=None, config=dict(DINOV2_LARGE))
    config.text_encoder = TextEncoderConfig(model_id=None, config=dict(CLIP_L14_TEXT))
    return config


def build_forecaster(args: argparse.Namespace) -> Forecaster:
    """The model to benchmark: ``--model`` when its weights are present, else random weights."""
    device = resolve_device(args.device)
    if args.quick:
        return Forecaster.from_config(tiny_config(), device=device, dtype="float32")
    if args.model:
        try:
            return Forecaster.from_pretrained(args.model, device=device, dtype="float32", download=False)
        except WeightsNotFoundError as exc:
            print(f"note: {args.model} not available ({str(exc).splitlines()[0]}); using random weights")
    return Forecaster.from_config(libero_random_config(), device=device, dtype="float32", seed=0)


def with_dtype(base: Forecaster, dtype: str, sample_batch_size: Optional[int]) -> Forecaster:
    """A forecaster sharing ``base``'s modules with another compute dtype."""
    forecaster = Forecaster(base.config, base.denoiser, base.vae, base.image_encoder, base.text_encoder,
                            base.model_id, device=base.device, dtype=dtype)
    if sample_batch_size is not None:
        forecaster.sample_batch_size = sample_batch_size or None
    return forecaster


# ---------------------------------------------------------------------------------------------- measurements
class CallTimer:
    """Wall time of every forward call of a module (forward pre/post hooks)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.device = device
        self.durations: List[float] = []
        self._start = 0.0
        self._handles = [module.register_forward_pre_hook(self._before), module.register_forward_hook(self._after)]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _before(self, module, inputs) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _after(self, module, inputs, output) -> None:
        self._sync()
        self.durations.append(time.perf_counter() - self._start)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def count_flops(forecaster: Forecaster, model_image: np.ndarray) -> Dict[str, int]:
    """FLOPs per stage: per image (image/text encoders, VAE encode) and per sample (one denoiser evaluation,
    one VAE decode)."""
    from traj_forecast_ros.model.flow import grid_to_latents

    def measure(fn) -> int:
        with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter, torch.inference_mode():
            fn()
        return int(counter.get_total_flops())

    features = forecaster.encode_image(model_image)  # [1, N, D]
    text = forecaster.embed_instruction(INSTRUCTION) if forecaster.text_encoder is not None else None
    forecaster.text_cache.clear()
    mean, _ = forecaster.condition_posterior(features)  # [1, 1, C, h, w]
    state = mean.expand(-1, forecaster.latent_shape[0], -1, -1, -1).contiguous()  # [1, T, C, h, w]
    t = torch.full((1,), 0.5, device=forecaster.device)
    flops = {
        "image_encoder": measure(lambda: forecaster.encode_image(model_image)),
        "text_encoder": measure(lambda: forecaster.text_encoder([INSTRUCTION])) if text is not None else 0,
        "vae_encode": measure(lambda: forecaster.condition_posterior(features)),
        "denoiser_eval": measure(lambda: forecaster.denoiser(state, t, features, text)),
        "vae_decode": (measure(lambda: forecaster.vae.decode(grid_to_latents(state), features))
                       if forecaster.vae is not None else 0),
    }
    return flops


def forecast_flops(flops: Dict[str, int], samples: int, steps: int) -> Dict[str, int]:
    """FLOPs per stage of one forecast with K samples and ``steps`` time points."""
    return {
        "image_encoder": flops["image_encoder"],
        "text_encoder": flops["text_encoder"],
        "vae_encode": flops["vae_encode"],
        "denoise": samples * (steps - 1) * flops["denoiser_eval"],
        "vae_decode": samples * flops["vae_decode"],
    }


def reset_peak_rss() -> bool:
    """Reset the process RSS high-water mark (Linux ``clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (since the last reset where supported)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    scale = 1.0 if sys.platform == "darwin" else 1024.0  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale / 1024.0


def run_once(forecaster: Forecaster, image: np.ndarray, samples: int, steps: int) -> Dict[str, Any]:
    """One timed forecast (cold text cache); stage timings, every denoiser evaluation, peak memory."""
    forecaster.text_cache.clear()
    device = forecaster.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()
    timer = CallTimer(forecaster.denoiser, device)
    try:
        instruction = INSTRUCTION if forecaster.text_encoder is not None else None
        result = forecaster.forecast(image, instruction, num_samples=samples, steps=steps, seed=0)
    finally:
        timer.remove()
    record = {"timings": result.timings, "denoiser_evals": timer.durations, "peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        record["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return record


# ---------------------------------------------------------------------------------------------- report
def print_run(dtype: str, samples: int, steps: int, batch: Optional[int], record: Dict[str, Any],
              flops: Dict[str, int]) -> Dict[str, Any]:
    timings = record["timings"]
    per_stage = forecast_flops(flops, samples, steps)
    total_flops = sum(per_stage.values())
    print(f"\n== dtype {dtype}, K={samples}, steps={steps} ({steps - 1} denoiser evaluations per sample), "
          f"sample batch {batch or samples}")
    print(f"   {'stage':<14}{'time s':>9}{'GFLOP':>11}{'GFLOP/s':>10}")
    for stage in ("preprocess",) + STAGES:
        seconds = timings.get(stage, 0.0)
        gflop = per_stage.get(stage, 0) / 1e9
        rate = f"{gflop / seconds:10.1f}" if gflop and seconds > 0 else f"{'':>10}"
        print(f"   {stage:<14}{seconds:9.3f}{gflop:11.3g}{rate}")
    evals = record["denoiser_evals"]
    if evals:
        print(f"   denoiser evaluations: {len(evals)} calls, median {statistics.median(evals):.3f} s, "
              f"min {min(evals):.3f} s, max {max(evals):.3f} s "
              f"({flops['denoiser_eval'] / 1e9 * (samples if batch is None else min(batch, samples)):.1f} GFLOP "
              "each)")
        print("   each: " + " ".join(f"{d:.3f}" for d in evals))
    total = timings["total"]
    print(f"   total {total:.2f} s = {total / samples:.2f} s per sample; {total_flops / 1e9:.1f} GFLOP per forecast, "
          f"{total_flops / 1e9 / total:.1f} GFLOP/s overall")
    if evals:  # on a shared machine the spread of evaluation times is other processes' load
        steady = total - timings["denoise"] + len(evals) * min(evals)
        print(f"   with every denoiser evaluation at the fastest one measured: {steady:.2f} s "
              f"({total_flops / 1e9 / steady:.1f} GFLOP/s)")
    memory = f"peak RSS {record['peak_rss_mb']:.0f} MB"
    if "peak_cuda_mb" in record:
        memory += f", peak CUDA allocation {record['peak_cuda_mb']:.0f} MB"
    print(f"   {memory}")
    return {"dtype": dtype, "samples": samples, "steps": steps, "sample_batch_size": batch or samples,
            "flops": per_stage, "total_flops": total_flops, "gflops_per_s": total_flops / 1e9 / total, **record}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="1,8", help="comma-separated K values (default 1,8)")
    parser.add_argument("--steps", type=int, default=10, help="Euler time points (default 10 = 9 evaluations)")
    parser.add_argument("--dtype", default="float32,bfloat16", help="comma-separated compute dtypes")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--model", default=None, help="registry name or model dir (default: random weights)")
    parser.add_argument("--sample-batch-size", type=int, default=None,
                        help="samples per denoiser/decoder call (0 = all K; default: the forecaster's per-device "
                             "default, 1 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="input image (default: a LIBERO frame)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="forecasts per configuration; the fastest is reported (the machine may be shared)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up forecast per dtype")
    parser.add_argument("--quick", action="store_true", help="tiny model, K=1,2, 3 steps: checks the script")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.steps = "1,2", 3
    return args


def load_image(path: Path) -> np.ndarray:
    from PIL import Image

    if path.is_file():
        return np.asarray(Image.open(path).convert("RGB")).copy()
    print(f"note: {path} not found; using a synthetic 128x128 image")
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(128, 128, 3), dtype=np.uint8)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sample_counts = [int(k) for k in args.samples.split(",") if k.strip()]
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    image = load_image(args.image)

    start = time.perf_counter()
    base = build_forecaster(args)
    build_s = time.perf_counter() - start
    device = base.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"model {base.model_id}: denoiser {sum(p.numel() for p in base.denoiser.parameters()):,} params, "
          f"VAE {sum(p.numel() for p in base.vae.parameters()) if base.vae is not None else 0:,}, "
          f"image encoder {sum(p.numel() for p in base.image_encoder.parameters()):,}, "
          f"text encoder {sum(p.numel() for p in base.text_encoder.parameters()) if base.text_encoder else 0:,} "
          f"(built in {build_s:.1f} s)")
    print(f"device {device}{f' ({gpu})' if gpu else ''}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {platform.processor() or platform.machine()}, image {image.shape[1]}x{image.shape[0]}")

    model_image, _ = prepare_image(image, tuple(base.config.image_size))
    start = time.perf_counter()
    flops = count_flops(base, model_image)
    print("FLOPs (counted in %.1f s): " % (time.perf_counter() - start)
          + ", ".join(f"{stage} {value / 1e9:.4g} G" for stage, value in flops.items()))

    results = []
    for dtype in dtypes:
        forecaster = with_dtype(base, dtype, args.sample_batch_size)
        if not args.no_warmup:
            warm = forecaster.warmup()
            print(f"\n[{dtype_name(forecaster.dtype)}] warm-up (K=1, 1 evaluation): {warm['total']:.2f} s")
        for samples in sample_counts:
            runs = [run_once(forecaster, image, samples, args.steps) for _ in range(max(1, args.repeat))]
            record = min(runs, key=lambda run: run["timings"]["total"])
            results.append(print_run(dtype_name(forecaster.dtype), samples, args.steps,
                                     forecaster.sample_batch_size, record, flops))

    print("\nsummary (total seconds per forecast):")
    for row in results:
        print(f"   {row['dtype']:<9} K={row['samples']:<3} {row['timings']['total']:8.2f} s   "
              f"{row['gflops_per_s']:7.1f} GFLOP/s")
    if args.json:
        args.json.write_text(json.dumps({"model": base.model_id, "device": str(device), "gpu": gpu,
                                         "threads": torch.get_num_threads(), "flops_per_call": flops,
                                         "runs": results}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
