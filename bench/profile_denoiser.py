"""Where one denoiser evaluation spends its time: the measured bound behind the efficiency figure.

Builds the same model as ``bench/forecast_bench.py`` (LIBERO size, random weights unless ``--model`` has real ones),
records the arguments of one denoiser call inside a real forecast, then times ``--evals`` evaluations without the
profiler and profiles one with ``torch.profiler``. Self CPU time is grouped into linear GEMMs (oneDNN), attention
(score/value GEMMs and softmax), layout copies and casts, norms, element-wise work and the rest; the timed
evaluation minus the profiled op time is the work between ops (Python, dispatch). It prints the time an evaluation would need for
an efficiency of ``--target`` against the same-run matmul figure, and how much of the non-GEMM work that leaves.

    .venv/bin/python bench/profile_denoiser.py --dtype bfloat16 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forecast_bench import (  # noqa: E402  (the benchmark's model, image and matmul reference)
    DEFAULT_IMAGE,
    build_forecaster,
    load_image,
    matmul_reference,
    measure_flops,
)

CATEGORIES = {
    "linear GEMMs (oneDNN/addmm)": ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::addmv_",
                                    "aten::linear"),
    "attention (bmm, softmax, SDPA)": ("aten::bmm", "aten::_softmax", "aten::_scaled_dot_product"),
    "layout copies and casts": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous"),
    "norms": ("aten::linalg_vector_norm", "aten::native_layer_norm", "aten::rsqrt", "aten::_fused_rms_norm"),
    "element-wise (mul, add, gelu)": ("aten::mul", "aten::add", "aten::gelu", "aten::silu", "aten::div",
                                      "aten::square", "aten::pow"),
}


def category(op_name: str) -> str:
    """The group of a profiler op name (prefix match), else "other"."""
    for group, prefixes in CATEGORIES.items():
        if op_name.startswith(prefixes):
            return group
    return "other"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (default bfloat16)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="registry name or model dir (default: random weights)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--evals", type=int, default=5, help="unprofiled evaluations to time (default 5)")
    parser.add_argument("--samples", type=int, default=1, help="K of the recorded forecast (default 1)")
    parser.add_argument("--target", type=float, default=0.7, help="efficiency target (default 0.7)")
    parser.add_argument("--matmul-seconds", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="tiny model: checks the script")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile

    base = build_forecaster(argparse.Namespace(device=args.device, quick=args.quick, model=args.model))
    forecaster = base.sibling(dtype=args.dtype, plan_probe=True)
    image = load_image(args.image)
    recorded: Dict[str, tuple] = {}
    denoise = forecaster.runtime.denoise_fn

    class Recorder:
        """Stands in for the forecaster's denoise function and keeps the bound step and one call's inputs."""

        def bind(self, features, text):
            if hasattr(denoise, "bind"):
                step = denoise.bind(features, text)
            else:
                def step(x, t):
                    return denoise(x, t, features.expand(x.shape[0], -1, -1),
                                   text.expand(x.shape[0], -1) if text is not None else None)

            def recording(x, t):
                recorded["call"] = (step, x.clone(), t.clone(), features, text)
                return step(x, t)

            return recording

    forecaster.runtime.denoise_fn = Recorder()
    forecaster.forecast(image, num_samples=args.samples, steps=2, seed=0)  # one evaluation; also warms the caches
    forecaster.runtime.denoise_fn = denoise
    step, x, t, features, text = recorded["call"]
    batch = x.shape[0]
    dtype = forecaster.dtype
    peak = matmul_reference(dtype, forecaster.device, args.matmul_seconds)["best"]
    flops = measure_flops(lambda: forecaster.denoiser(x, t, features.expand(batch, -1, -1),
                                                      text.expand(batch, -1) if text is not None else None))
    with torch.inference_mode(), forecaster.runtime.autocast():
        for _ in range(2):
            step(x, t)
        started = time.perf_counter()
        for _ in range(args.evals):
            step(x, t)
        seconds = (time.perf_counter() - started) / args.evals
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(x, t)
    groups: Dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        groups[category(event.key)] += event.self_cpu_time_total / 1e6
    profiled = sum(groups.values())
    needed = flops / (args.target * peak * 1e9)

    print(f"model {forecaster.model_id}, {forecaster.device}, {str(dtype).replace('torch.', '')}, "
          f"{torch.get_num_threads()} threads; matmul reference {peak:.1f} GFLOP/s (same run)")
    print(f"plan: {forecaster.plan.summary()}; one evaluation of {batch} sample(s)")
    print(f"denoiser evaluation: {seconds * 1e3:.1f} ms ({args.evals} timed), {flops / 1e9:.1f} GFLOP, "
          f"{flops / seconds / 1e9:.1f} GFLOP/s = efficiency {flops / seconds / 1e9 / peak:.3f}")
    print(f"   {'group (profiled self CPU time)':40s} {'ms':>8s} {'share':>6s}")
    for group, value in sorted(groups.items(), key=lambda item: -item[1]):
        print(f"   {group:40s} {value * 1e3:8.1f} {value / seconds:6.1%}")
    gap = seconds - profiled
    print(f"   {'between ops (Python, dispatch; timed - profiled)':40s} {gap * 1e3:8.1f} {gap / seconds:6.1%}")
    gemm = groups.get("linear GEMMs (oneDNN/addmm)", 0.0)
    print(f"linear GEMMs alone: {gemm * 1e3:.1f} ms = efficiency {flops / max(gemm, 1e-9) / 1e9 / peak:.3f} "
          f"if everything else took no time")
    print(f"efficiency {args.target}: an evaluation must take {needed * 1e3:.1f} ms; with the GEMMs as they are, "
          f"everything else ({(seconds - gemm) * 1e3:.1f} ms now) would have to fit in "
          f"{max(needed - gemm, 0.0) * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
