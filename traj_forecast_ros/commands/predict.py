"""``traj-forecast predict IMAGE``: forecast point trajectories for one image file, save them (and a picture)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from traj_forecast_ros.commands import command_help
from traj_forecast_ros.errors import TrajForecastError
from traj_forecast_ros.forecast import DEFAULT_NUM_SAMPLES, Forecast
from traj_forecast_ros.forecaster import Forecaster
from traj_forecast_ros.geometry import to_rgb
from traj_forecast_ros.registry import default_model_name
from traj_forecast_ros.viz import draw_forecast, forecast_frames, save_animation


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``predict`` command."""
    parser = subparsers.add_parser(
        "predict", help=command_help("predict"),
        description="Samples K futures of the model's query grid for IMAGE and writes them to an .npz file "
                    "(tracks [K, T, Hq, Wq, 2] in IMAGE pixels, frame 0 exactly at query_points unless --raw; "
                    "query_points, metadata); optionally draws them.")
    parser.add_argument("image", type=Path, help="image file (any format Pillow reads; mono, RGB or RGBA)")
    parser.add_argument("--model", default=None,
                        help="registry name or model directory (default: the registry default, libero-atm)")
    parser.add_argument("--instruction", default=None, help="task instruction for language-conditioned models")
    parser.add_argument("--samples", type=int, default=DEFAULT_NUM_SAMPLES, metavar="K",
                        help=f"sampled futures per image (default {DEFAULT_NUM_SAMPLES})")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="Euler time points, N-1 denoiser evaluations (default: the model's default_steps)")
    parser.add_argument("--guidance-scale", type=float, default=None, metavar="S",
                        help="classifier-free guidance (default: the model's guidance_scale; 1 = none)")
    parser.add_argument("--seed", type=int, default=None, help="noise seed (default: random, saved in the output)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default="auto",
                        help="float32, bfloat16, float16 (CUDA only) or auto "
                             "(default: bfloat16 on GPUs with native bfloat16, else float16; float32 on CPU)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache root (default: $TRAJ_FORECAST_HOME)")
    parser.add_argument("--raw", action="store_true",
                        help="save the raw decoder output (frame 0 is the query grid only up to VAE error) instead "
                             "of tracks re-anchored so frame 0 is exactly each query point")
    parser.add_argument("--out", type=Path, required=True, help="output .npz file")
    parser.add_argument("--viz", type=Path, default=None,
                        help="also draw the tracks: .png (still, trails over the image) or .gif (animation)")
    parser.add_argument("--viz-sample", type=int, default=0, help="which sample to draw (default 0)")
    parser.add_argument("--viz-stride", type=int, default=4, help="draw every N-th grid point per axis (default 4)")
    parser.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"traj-forecast predict: {message}", file=sys.stderr)
    return 2


def load_image(path: Path):
    """Read an image file as a uint8 numpy array (mono stays HxW, RGBA keeps alpha, everything else RGB)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("L", "RGB", "RGBA"):
                image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
            return np.asarray(image)
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def save_forecast_npz(forecast: Forecast, path: Path) -> Path:
    """Write a :class:`Forecast` to ``.npz``: arrays ``tracks``, ``query_points``, ``image_size``, ``frame_interval``
    (seconds between forecast frames, 0 = unknown), ``crop_box`` (x_min, y_min, x_max, y_max: the image region the
    query grid covers) and JSON metadata."""
    metadata = {"model_id": forecast.model_id, "instruction": forecast.instruction, "device": forecast.device,
                "dtype": forecast.dtype, "seed": forecast.seed, "guidance_scale": forecast.guidance_scale,
                "timings": forecast.timings}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as stream:  # a file object keeps numpy from appending .npz to other suffixes
        np.savez(stream, tracks=forecast.tracks, query_points=forecast.query_points,
                 image_size=np.asarray(forecast.image_size, dtype=np.int64),
                 frame_interval=np.asarray(forecast.frame_interval, dtype=np.float64),
                 crop_box=np.asarray(forecast.grid_region(), dtype=np.float64), metadata=np.asarray(json.dumps(metadata)))
    return path


def run(args: argparse.Namespace) -> int:
    """Handler of ``traj-forecast predict``."""
    if args.viz is not None and args.viz.suffix.lower() not in (".png", ".gif", ".jpg", ".jpeg"):
        return _fail(f"--viz must end in .png, .jpg or .gif, got {args.viz}")
    try:
        image = load_image(args.image)
        model = args.model or default_model_name()
        forecaster = Forecaster.from_pretrained(model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
        forecast = forecaster.forecast(image, instruction=args.instruction, num_samples=args.samples,
                                       steps=args.steps, seed=args.seed, anchor=not args.raw,
                                       guidance_scale=args.guidance_scale)
    except (TrajForecastError, ValueError, TypeError) as exc:
        return _fail(str(exc))
    save_forecast_npz(forecast, args.out)
    timings = ", ".join(f"{stage} {seconds:.2f}s" for stage, seconds in forecast.timings.items())
    print(f"{forecast.model_id}: {forecast.num_samples} samples x {forecast.num_frames} frames x "
          f"{forecast.grid_shape[0]}x{forecast.grid_shape[1]} points on {forecast.device} ({forecast.dtype}), "
          f"seed {forecast.seed}; {timings}")
    print(f"wrote {args.out}")
    if args.viz is not None:
        if not 0 <= args.viz_sample < forecast.num_samples:
            return _fail(f"--viz-sample {args.viz_sample} out of range (0..{forecast.num_samples - 1})")
        rgb = to_rgb(image)
        if args.viz.suffix.lower() == ".gif":
            frames = forecast_frames(rgb, forecast.tracks[args.viz_sample], stride=args.viz_stride)
        else:
            frames = [draw_forecast(rgb, forecast, sample=args.viz_sample, stride=args.viz_stride)]
        save_animation(frames, args.viz)
        print(f"wrote {args.viz}")
    return 0
