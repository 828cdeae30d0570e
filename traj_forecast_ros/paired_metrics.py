"""The paired-instruction test (issue 18): does the instruction move the forecast the way the truth moves?

Samples sharing a branch group (one frame-0 image and view, other instructions and true futures) give one case per
ordered pair (i, j) with different instructions: i's image forecast under its own instruction (matched) and under
j's (crossed), same noise, both scored against i's truth by best-of-K MSE over the points moving in i's or j's true
future. Reported: the mean matched and crossed errors, their ratio, the share of cases where matched < crossed (the
right instruction wins), the **instruction response** (distance between the matched and crossed sample means over
that region / distance between the two true futures there; 0: no effect, 1: as far as they part), and the
**instruction alignment** (the matched-minus-crossed mean forecast projected on the true futures' difference, summed
over all cases, / that difference's squared norm: the share of the true parting reproduced along it; 1: as the truth
parts, 0: no parting or one across it, < 0: the wrong way); over all cases, and over those whose true futures part
by more than 5 px on average (``paired_distinct_...``).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from traj_forecast_ros.metrics import MOVING_THRESHOLD_PX, flatten_points, moving_mask


def branch_pairs(branch_groups: Sequence[int], instruction_ids: Sequence[int]) -> List[Tuple[int, int]]:
    """Ordered pairs ``(i, j)``, ``i != j``, of positions whose branch group is the same value >= 0 and whose
    instructions differ: the paired-instruction cases (case (i, j): sample i forecast under j's instruction)."""
    members: Dict[int, List[int]] = {}
    for position, group in enumerate(branch_groups):
        if int(group) >= 0:
            members.setdefault(int(group), []).append(position)
    return [(i, j) for group in members.values() for i in group for j in group
            if i != j and int(instruction_ids[i]) != int(instruction_ids[j])]


def paired_instruction_metrics(matched: np.ndarray, crossed: np.ndarray, truth: np.ndarray,
                               partner_truth: np.ndarray, threshold_px: float = MOVING_THRESHOLD_PX
                               ) -> Dict[str, float]:
    """Paired-instruction test over C cases (see the module docstring).

    ``matched`` / ``crossed`` ``[C, K, T, *points, 2]``: case c's image forecast under its own / its partner's
    instruction (same noise); ``truth`` / ``partner_truth`` ``[C, T, *points, 2]``: the two true futures. Cases
    where neither future moves are left out. Returns ``paired_cases``, the mean matched / crossed errors (px^2),
    their ratio (< 1: the instruction helps), ``paired_right_instruction_wins``, the forecast and truth gaps (px),
    ``paired_instruction_response`` and ``paired_instruction_alignment``; the same under ``paired_distinct_...``
    for the cases whose true futures part by more than ``threshold_px`` on average over the region ("reach for" /
    "pick up" may not). NaN: no cases.
    """
    matched, crossed = flatten_points(matched, 2), flatten_points(crossed, 2)  # [C, K, T, P, 2]
    truth, partner_truth = flatten_points(truth, 1), flatten_points(partner_truth, 1)  # [C, T, P, 2]
    if not (matched.shape == crossed.shape and truth.shape == partner_truth.shape
            and matched.shape[:1] + matched.shape[2:] == truth.shape):
        raise ValueError(f"need matched and crossed [C, K, T, P, 2] and truths [C, T, P, 2]; got {matched.shape}, "
                         f"{crossed.shape}, {truth.shape}, {partner_truth.shape}")
    region = moving_mask(truth, threshold_px, 1) | moving_mask(partner_truth, threshold_px, 1)  # [C, P]
    errors, gaps = [], []
    for case in np.nonzero(region.any(axis=1))[0]:  # own, other [K, T, M, 2]; target, partner [T, M, 2]
        own, other, target, partner = (x[case][..., region[case], :] for x in (matched, crossed, truth, partner_truth))
        errors.append([float(((forecast - target) ** 2).mean(axis=(1, 2, 3)).min()) for forecast in (own, other)])
        parting, true_parting = own.mean(0) - other.mean(0), target - partner  # [T, M, 2] each
        gaps.append([float(np.linalg.norm(parting, axis=-1).mean()),
                     float(np.linalg.norm(true_parting, axis=-1).mean()),
                     float((parting * true_parting).sum()), float((true_parting ** 2).sum())])
    pairs, gaps = np.asarray(errors).reshape(-1, 2), np.asarray(gaps).reshape(-1, 4)  # [cases, 2], [cases, 4]
    distinct = gaps[:, 1] > threshold_px  # the true futures part
    return {**_paired_summary(pairs, gaps, "paired"),
            **_paired_summary(pairs[distinct], gaps[distinct], "paired_distinct")}


def _paired_summary(pairs: np.ndarray, gaps: np.ndarray, prefix: str) -> Dict[str, float]:
    """The paired figures of ``pairs [cases, 2]`` (matched, crossed errors) and ``gaps [cases, 4]`` (forecast, truth
    gaps; the partings' dot product, the true parting's squared norm) under ``<prefix>_...`` keys; NaN without cases."""
    nan = float("nan")
    aligned = float(gaps[:, 2].sum() / gaps[:, 3].sum()) if len(gaps) and gaps[:, 3].sum() > 0 else nan
    matched_mean, crossed_mean = (float(pairs[:, 0].mean()), float(pairs[:, 1].mean())) if len(pairs) else (nan, nan)
    forecast_gap, truth_gap = (float(gaps[:, 0].mean()), float(gaps[:, 1].mean())) if len(gaps) else (nan, nan)
    return {
        f"{prefix}_cases": float(len(pairs)),
        f"{prefix}_matched_moving_mse": matched_mean,
        f"{prefix}_crossed_moving_mse": crossed_mean,
        f"{prefix}_matched_crossed_ratio": matched_mean / crossed_mean if crossed_mean > 0 else nan,
        f"{prefix}_right_instruction_wins": float((pairs[:, 0] < pairs[:, 1]).mean()) if len(pairs) else nan,
        f"{prefix}_forecast_gap_px": forecast_gap,
        f"{prefix}_truth_gap_px": truth_gap,
        f"{prefix}_instruction_response": forecast_gap / truth_gap if truth_gap > 0 else nan,
        f"{prefix}_instruction_alignment": aligned,
    }
