"""``traj-forecast evaluate``: score a model against zero motion (and the regressor baseline) on a dataset.

Prints the results table (where the motion is: best-of-K MSE, ADE and FDE over the points whose true track moves
more than 5 px, and motion calibration; then over the whole grid: best-of-K and mean-of-K MSE in px^2, FVMD, LRTL,
diversity, motion predicted on resting scenes), the paired-instruction test on datasets with branch groups, and
writes every number to JSON::

    traj-forecast evaluate --model models/demo-blocks --data runs/test --regressor runs/regressor \
        --samples 8 --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Union

import torch

from traj_forecast_ros.commands import command_help
from traj_forecast_ros.errors import TrajForecastError
from traj_forecast_ros.forecast import DEFAULT_NUM_SAMPLES
from traj_forecast_ros.train.evaluate import evaluate, format_kind_table, format_paired, format_table


def sample_batch_size_arg(text: str) -> Union[int, str]:
    """``--sample-batch-size``: ``auto`` or a non-negative int (0 = all K at once)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected auto or a non-negative integer, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` command."""
    parser = subparsers.add_parser("evaluate", help=command_help("evaluate"),
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory or registry name (omit: baselines only)")
    parser.add_argument("--data", type=Path, required=True, help="dataset directory (held-out scenes)")
    parser.add_argument("--regressor", type=Path, default=None, help="regressor run directory (optional)")
    parser.add_argument("--samples", type=int, default=DEFAULT_NUM_SAMPLES, metavar="K",
                        help=f"sampled futures per image (default {DEFAULT_NUM_SAMPLES})")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="Euler time points, N-1 denoiser evaluations (default: the model's default_steps)")
    parser.add_argument("--guidance-scale", type=float, default=None, metavar="S",
                        help="classifier-free guidance (default: the model's guidance_scale; 1 = none)")
    parser.add_argument("--max-scenes", type=int, default=None, help="only the first N scenes")
    parser.add_argument("--seed", type=int, default=0, help="scene i is sampled with seed + i")
    parser.add_argument("--sample-batch-size", type=sample_batch_size_arg, default="auto",
                        help="samples per forward pass: auto (default: the sampling plan chosen at load), N, or "
                             "0 (all K at once)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-instructions", action="store_true",
                        help="do not give a language-conditioned model each sample's instruction (its default "
                             "instruction instead: the forecast without a task)")
    parser.add_argument("--out", type=Path, default=None, help="write the full report as JSON here")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument("--vae-bound", action="store_true",
                        help="also score the model's VAE reconstructing each true future (what its generator can reach)")
    parser.add_argument("--figure", type=Path, default=None,
                        help="write a PNG of one scene per task kind x view: truth beside the predictions")
    parser.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    if args.samples < 1:
        raise SystemExit("error: --samples must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = evaluate(args.data, model=args.model, regressor=args.regressor, num_samples=args.samples,
                          max_scenes=args.max_scenes, seed=args.seed, steps=args.steps,
                          sample_batch_size=args.sample_batch_size, device=args.device, progress=True,
                          use_instructions=not args.no_instructions, figure=args.figure, vae_bound=args.vae_bound,
                          guidance_scale=args.guidance_scale)
    except (TrajForecastError, ValueError) as exc:  # a broken dataset or model, bad options: one line
        print(f"traj-forecast evaluate: {exc}", file=sys.stderr)
        return 2
    print(f"{report['scenes']} scenes x {report['rollouts']} ground-truth rollouts, K = {report['samples']} samples")
    print(format_table(report, markdown=args.markdown))
    if report.get("paired_instructions"):
        print(format_paired(report))
    for group in ("per_kind", "per_view"):
        if report.get(group):
            print()
            print(format_kind_table(report, group))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    if report.get("figure"):
        print(f"wrote {report['figure']}")
    return 0
