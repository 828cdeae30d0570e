"""Does the instruction change the forecast, and could it? Two measurements on a split with branch groups.

* **Could it:** for every ordered pair of one branch group (same frame 0, two instructions), how far apart the two
  TRUE futures are over the points moving in either (per-coordinate MSE, px^2), by pair of task modes (the first
  word of each instruction). A pair whose futures coincide within the horizon cannot tell its instructions apart.
* **Does it:** for the first pair of each of ``--groups`` groups whose futures differ, the mean distance (px)
  between the model's K forecasts of the same image and noise under the two instructions, beside the distance
  between two noise seeds under the same instruction.
* **Does the denoiser read it** (``--flow-pairs N``): for the first N usable pairs whose futures part, the flow
  error of the denoiser on sample i's encoded true future, noised at each of ``--flow-times``, under i's own
  instruction and under j's (same noise): the mean errors, the share of pairs where the own one is lower, and the
  mean squared velocity difference; and how far apart the pair's two encoded futures are (mean squared difference
  per scaled latent element). Near t = 0 only the instruction can tell the two futures apart.
* **Can the text encoder tell them apart** (``--embedding-pairs N``): the cosine similarity of the model's
  instruction embeddings over the pairs (mean and max), and the N most similar pairs. Siblings that embed to one
  vector cannot be told apart by anything after the encoder.

    .venv/bin/python bench/instruction_probe.py --model models/sim-manipulation --data runs/sim2/test --groups 8
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from traj_forecast_ros.data.dataset import TrajectoryDataset  # noqa: E402
from traj_forecast_ros.forecaster import Forecaster  # noqa: E402
from traj_forecast_ros.geometry import normalise_points, static_tracks_norm  # noqa: E402
from traj_forecast_ros.model.checkpoint import load_model_dir  # noqa: E402
from traj_forecast_ros.model.flow import latents_to_grid  # noqa: E402
from traj_forecast_ros.train.data import (  # noqa: E402
    build_image_encoder,
    build_text_encoder,
    encoder_fingerprint,
    image_features,
    usable_samples,
)
from traj_forecast_ros.metrics import MOVING_THRESHOLD_PX, moving_mask  # noqa: E402
from traj_forecast_ros.paired_metrics import branch_pairs  # noqa: E402


def future_distances(dataset: TrajectoryDataset, pairs: Sequence[tuple], groups: np.ndarray,
                     instruction_ids: np.ndarray) -> List[Dict]:
    """Per ordered pair: its branch group, the two instructions and their true futures' MSE over the points moving
    in either (each sample's tracks read once)."""
    texts = [dataset.meta.instructions[int(k)] for k in instruction_ids]
    members = sorted({int(k) for pair in pairs for k in pair})
    tracks = dict(zip(members, dataset.gather("tracks", members)[:, 0].astype(np.float64)))  # [T, H, W, 2] each
    rows = []
    for i, j in pairs:
        region = moving_mask(tracks[i]) | moving_mask(tracks[j])  # [H, W]
        if not region.any():
            continue
        diff = tracks[i][:, region] - tracks[j][:, region]  # [T, M, 2]
        rows.append({"pair": (int(i), int(j)), "group": int(groups[i]), "mse_px2": float((diff ** 2).mean()),
                     "parting_px": float(np.linalg.norm(diff, axis=-1).mean()),
                     "instructions": (texts[i], texts[j])})
    return rows


def forecast_sensitivity(forecaster: Forecaster, dataset: TrajectoryDataset, rows: List[Dict], groups: int,
                         samples: int) -> List[Dict]:
    """Forecast distance between the two instructions (same noise) and between two seeds (same instruction)."""
    out, seen = [], set()
    for row in rows:
        if row["group"] in seen or row["parting_px"] <= MOVING_THRESHOLD_PX:
            continue
        seen.add(row["group"])
        image = dataset.gather("images", [row["pair"][0]])[0]
        own = forecaster.forecast(image, row["instructions"][0], num_samples=samples, seed=0).tracks
        other = forecaster.forecast(image, row["instructions"][1], num_samples=samples, seed=0).tracks
        reseeded = forecaster.forecast(image, row["instructions"][0], num_samples=samples, seed=1).tracks
        out.append({**row, "instruction_effect_px": float(np.linalg.norm(own - other, axis=-1).mean()),
                    "seed_effect_px": float(np.linalg.norm(own - reseeded, axis=-1).mean())})
        if len(out) == groups:
            break
    return out


@torch.no_grad()
def flow_gaps(model_dir: str, dataset: TrajectoryDataset, rows: List[Dict], pairs: int,
              times: Sequence[float]) -> Tuple[Dict[str, float], Dict[str, Dict[str, float]]]:
    """``(futures, per time)``: how far apart each pair's two encoded futures are, and per flow time the denoiser's
    error on sample i's true future under i's and j's instruction (see above)."""
    config, denoiser, vae = load_model_dir(model_dir)
    text_encoder = build_text_encoder(config, model_dir=model_dir)
    image_encoder = build_image_encoder(config, model_dir=model_dir)
    features = image_features(dataset, image_encoder, dataset.root, torch.device("cpu"),
                              fingerprint=encoder_fingerprint(image_encoder, dataset.meta.image_size))
    inv_scale = 1.0 / torch.tensor(config.latent_scale)
    usable = set(usable_samples(dataset).tolist())  # as training and evaluation: no off-screen projections
    chosen = [row for row in rows if row["parting_px"] > MOVING_THRESHOLD_PX and set(row["pair"]) <= usable][:pairs]
    results: Dict[float, List[tuple]] = {t: [] for t in times}

    def scaled_future(index: int, image: torch.Tensor) -> torch.Tensor:
        """Sample ``index``'s true future as the denoiser's scaled latent grid (1, T, C, h, w)."""
        tracks = torch.from_numpy(dataset.gather("tracks", [index])[0, 0].astype(np.float32))[None]  # (1, T, H, W, 2)
        future, _ = vae.encode(normalise_points(tracks, tuple(config.image_size)).permute(0, 1, 4, 2, 3), image)
        return latents_to_grid(future * inv_scale, vae.latent_grid)

    future_gaps = []
    for row in chosen:
        i, j = row["pair"]
        image = torch.from_numpy(np.array(features[i], dtype=np.float32))[None]  # (1, N, D), a writable copy
        x1 = scaled_future(i, image)  # (1, T, C, h, w)
        future_gaps.append(float(((x1 - scaled_future(j, image))[:, 1:] ** 2).mean()))  # the two branches' latents
        static, _ = vae.encode(torch.from_numpy(static_tracks_norm(config, 1)), image)
        cond = latents_to_grid(static[:, :1] * inv_scale, vae.latent_grid)  # (1, 1, C, h, w)
        texts = text_encoder(list(row["instructions"]))  # (2, E): own, partner's
        noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(int(i)))
        for t in times:
            x_t = torch.cat([cond, (t * x1 + (1 - t) * noise)[:, 1:]], dim=1)
            velocity = denoiser(x_t.expand(2, -1, -1, -1, -1), torch.full((2,), float(t)), image.expand(2, -1, -1),
                                texts)[:, 1:]  # (2, T-1, C, h, w)
            target = (x1 - noise)[:, 1:]
            own, other = ((velocity - target) ** 2).flatten(1).mean(1).tolist()
            results[t].append((own, other, float(((velocity[0] - velocity[1]) ** 2).mean())))
    futures = {"pairs": len(future_gaps),
               "latent_gap_mean": float(np.mean(future_gaps)) if future_gaps else float("nan"),
               "latent_gap_median": float(np.median(future_gaps)) if future_gaps else float("nan")}
    report = {}
    for t, values in results.items():
        table = np.array(values).reshape(-1, 3)
        report[f"{t:g}"] = {"pairs": len(table), "own_error": float(table[:, 0].mean()),
                            "partner_error": float(table[:, 1].mean()),
                            "own_lower_share": float((table[:, 0] < table[:, 1]).mean()),
                            "velocity_gap": float(table[:, 2].mean())}
    return futures, report


def embedding_similarity(model_dir: str, rows: List[Dict], shown: int) -> Dict:
    """Cosine similarity of the instruction embeddings of every pair in ``rows``: mean, max and the ``shown`` most
    similar distinct instruction pairs."""
    config = load_model_dir(model_dir)[0]
    encoder = build_text_encoder(config, model_dir=model_dir)
    texts = sorted({text for row in rows for text in row["instructions"]})
    with torch.no_grad():
        embeddings = torch.nn.functional.normalize(encoder(texts).float(), dim=-1)
    index = {text: k for k, text in enumerate(texts)}
    similarity = {tuple(sorted(row["instructions"])): float(embeddings[index[row["instructions"][0]]]
                                                            @ embeddings[index[row["instructions"][1]]])
                  for row in rows}
    values = np.array(list(similarity.values()))
    closest = sorted(similarity.items(), key=lambda item: -item[1])[:shown]
    return {"pairs": len(values), "cosine_mean": float(values.mean()), "cosine_max": float(values.max()),
            "closest": [{"instructions": list(pair), "cosine": value} for pair, value in closest]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory or registry name (omit: data only)")
    parser.add_argument("--data", type=Path, required=True, help="split with branch groups and instructions")
    parser.add_argument("--groups", type=int, default=8, help="branch groups whose forecasts to compare (0: none)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--flow-pairs", type=int, default=0, help="pairs for the denoiser's error gap (0: skip)")
    parser.add_argument("--flow-times", default="0,0.1,0.25,0.5", help="flow times of the error gap")
    parser.add_argument("--embedding-pairs", type=int, default=0,
                        help="show the N sibling instruction pairs whose embeddings are most alike (0: skip)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = TrajectoryDataset(args.data)
    if not (dataset.has("branch_groups") and dataset.has("instructions")):
        parser.error(f"{args.data} has no branch groups or instructions")
    branch_groups, instruction_ids = dataset.load("branch_groups"), dataset.load("instructions")
    pairs = branch_pairs(branch_groups, instruction_ids)
    rows = future_distances(dataset, pairs, branch_groups, instruction_ids)
    mse = np.array([row["mse_px2"] for row in rows])
    by_modes = collections.defaultdict(list)
    for row in rows:
        by_modes[" / ".join(sorted(text.split()[0] for text in row["instructions"]))].append(row["mse_px2"])
    report = {"pairs": len(rows), "future_mse_median_px2": float(np.median(mse)),
              "share_under_20_px2": float((mse < 20).mean()),
              "share_parting_over_5_px": float(np.mean([row["parting_px"] > MOVING_THRESHOLD_PX for row in rows])),
              "future_mse_median_by_modes": {k: float(np.median(v)) for k, v in sorted(by_modes.items())}}
    print(f"{report['pairs']} ordered pairs: true futures differ by a median {report['future_mse_median_px2']:.1f} "
          f"px^2; {report['share_under_20_px2']:.0%} under 20 px^2; {report['share_parting_over_5_px']:.0%} part "
          f"by more than {MOVING_THRESHOLD_PX:.0f} px")
    for modes, value in report["future_mse_median_by_modes"].items():
        print(f"  {modes}: {value:.1f} px^2 ({len(by_modes[modes])} pairs)")
    if args.model and args.groups > 0:
        sensitivity = forecast_sensitivity(Forecaster.from_pretrained(args.model), dataset, rows, args.groups,
                                           args.samples)
        report["sensitivity"] = sensitivity
        for row in sensitivity:
            print(f"  {row['instructions'][0]!r} vs {row['instructions'][1]!r}: futures part {row['parting_px']:.1f} "
                  f"px; forecasts move {row['instruction_effect_px']:.2f} px between the instructions, "
                  f"{row['seed_effect_px']:.2f} px between two seeds")
    if args.model and args.flow_pairs > 0:
        if not Path(args.model).is_dir():
            parser.error("--flow-pairs needs --model as a model directory")
        times = [float(t) for t in args.flow_times.split(",")]
        futures, report["flow_gap"] = flow_gaps(args.model, dataset, rows, args.flow_pairs, times)
        report["flow_future_gap"] = futures
        print(f"  the pairs' two encoded futures differ by {futures['latent_gap_mean']:.4f} (median "
              f"{futures['latent_gap_median']:.4f}) per scaled latent element")
        for t, gap in report["flow_gap"].items():
            print(f"  flow error at t = {t} over {gap['pairs']} pairs: own instruction {gap['own_error']:.4f}, "
                  f"the partner's {gap['partner_error']:.4f}; own lower in {gap['own_lower_share']:.0%}; velocity "
                  f"gap {gap['velocity_gap']:.5f}")
    if args.model and args.embedding_pairs > 0:
        if not Path(args.model).is_dir():
            parser.error("--embedding-pairs needs --model as a model directory")
        report["embeddings"] = similarity = embedding_similarity(args.model, rows, args.embedding_pairs)
        print(f"  instruction embeddings of {similarity['pairs']} sibling pairs: cosine mean "
              f"{similarity['cosine_mean']:.3f}, max {similarity['cosine_max']:.4f}; the most alike:")
        for row in similarity["closest"]:
            print(f"    {row['cosine']:.4f}  {row['instructions'][0]!r} / {row['instructions'][1]!r}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
