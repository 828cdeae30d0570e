"""A picture of held-out forecasts against what really happened (``traj-forecast evaluate --figure``).

One row per chosen scene (the first scene of every task kind x view); columns: the true future, the model's sample
closest to it (best of K), the model's sample farthest from it (worst of K), and each other method's first sample
(the regressor, which is deterministic). Tracks run blue (now) to yellow (last frame), about 16 x 16 per panel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from traj_forecast_ros.viz import draw_tracks, enlarged, readable_stride

PathLike = Union[str, Path]
HEADER_PX = 14


def pick_scenes(kinds: Optional[Sequence[Optional[str]]], views: Optional[Sequence[Optional[str]]],
                limit: int = 10) -> List[int]:
    """Positions of the first scene of every (kind, view) pair, in order of appearance (at most ``limit``)."""
    count = len(kinds) if kinds is not None else len(views) if views is not None else 0
    seen, chosen = set(), []
    for i in range(count):
        key = (None if kinds is None else kinds[i], None if views is None else views[i])
        if key not in seen:
            seen.add(key)
            chosen.append(i)
    return chosen[:limit]


def _panel(image: np.ndarray, tracks: np.ndarray, title: str, scale: int) -> np.ndarray:
    """``image`` enlarged ``scale`` x with ``tracks [T, Hq, Wq, 2]`` drawn on it, under a one-line title."""
    drawn = draw_tracks(enlarged(image, scale), tracks * scale, stride=readable_stride(tracks.shape[1:3]),
                        thickness=max(1, scale - 1))
    canvas = Image.new("RGB", (drawn.shape[1], drawn.shape[0] + HEADER_PX), (255, 255, 255))
    canvas.paste(Image.fromarray(drawn), (0, HEADER_PX))
    ImageDraw.Draw(canvas).text((2, 1), title, fill=(0, 0, 0))
    return np.asarray(canvas)


def comparison_figure(images: np.ndarray, truth: np.ndarray, predictions: Dict[str, np.ndarray],
                      labels: Sequence[str], out: PathLike, scale: int = 2, gap: int = 4) -> Path:
    """Write the figure as a PNG.

    ``images [N, H, W, 3]`` uint8, ``truth [N, T, Hq, Wq, 2]`` (one rollout), ``predictions[method] [N, K, T, Hq,
    Wq, 2]`` (``"ours"`` gets best and worst of K), ``labels`` one caption per row (task kind, view)."""
    rows = []
    for n in range(len(images)):
        panels = [_panel(images[n], truth[n], f"truth: {labels[n]}", scale)]
        for method, pred in predictions.items():
            if method == "ours":
                errors = ((pred[n] - truth[n][None]) ** 2).mean(axis=tuple(range(1, pred[n].ndim)))  # [K]
                best, worst = int(errors.argmin()), int(errors.argmax())
                panels.append(_panel(images[n], pred[n, best], f"ours, best of {len(errors)}", scale))
                panels.append(_panel(images[n], pred[n, worst], f"ours, worst of {len(errors)}", scale))
            else:
                panels.append(_panel(images[n], pred[n, 0], method.replace("_", " "), scale))
        spacer = np.full((panels[0].shape[0], gap, 3), 255, dtype=np.uint8)
        rows.append(np.concatenate([part for panel in panels for part in (panel, spacer)][:-1], axis=1))
    spacer = np.full((gap, rows[0].shape[1], 3), 255, dtype=np.uint8)
    figure = np.concatenate([part for row in rows for part in (row, spacer)][:-1], axis=0)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(figure).save(out, optimize=True)
    return out
