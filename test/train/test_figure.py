"""The held-out comparison figure: which scenes it shows and which samples it picks."""

from __future__ import annotations

import numpy as np
from PIL import Image

from traj_forecast_ros.train.figure import HEADER_PX, comparison_figure, pick_scenes


def test_first_scene_of_every_kind_and_view_in_order():
    kinds = ["push", "push", "reach", "push", "reach"]
    views = ["agent", "wrist", "agent", "wrist", "agent"]
    assert pick_scenes(kinds, views) == [0, 1, 2]
    assert pick_scenes(kinds, None) == [0, 2]
    assert pick_scenes(None, views) == [0, 1]
    assert pick_scenes(kinds, views, limit=2) == [0, 1]
    assert pick_scenes(None, None) == []


def test_best_and_worst_samples_are_the_closest_and_farthest_from_the_truth(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)
    grid = np.stack(np.meshgrid(np.arange(4) * 8 + 4.0, np.arange(4) * 8 + 4.0, indexing="xy"), -1)
    truth = np.stack([grid + [t * 2.0, 0.0] for t in range(5)])[None]  # [1, T, 4, 4, 2]: moving right
    far = np.stack([grid + [0.0, t * 4.0] for t in range(5)])  # moving down
    ours = np.stack([far, truth[0], grid[None].repeat(5, 0)])[None]  # [1, K=3, T, 4, 4, 2]: sample 1 is the truth
    out = comparison_figure(image, truth, {"ours": ours}, ["push, agentview"], tmp_path / "f.png", scale=2, gap=4)
    figure = np.asarray(Image.open(out).convert("RGB"))
    panel = 64  # 32 px x scale 2
    assert figure.shape == (panel + HEADER_PX, 3 * panel + 2 * 4, 3)
    truth_panel, best, worst = (figure[HEADER_PX:, i * (panel + 4):i * (panel + 4) + panel] for i in range(3))
    np.testing.assert_array_equal(best, truth_panel)  # best of K = the sample equal to the truth
    assert np.abs(worst.astype(int) - truth_panel.astype(int)).sum() > 0  # worst = the downward sample
