"""A tiny sim-manipulation-like dataset built without robosuite (tiny-sim geometry: 128 px, 8 x 8 grid, T = 4).

Each image is a textured table with a red square "cube". Two samples share each image (one scene id) with the two
instructions "push the red cube to the left / right": the cube's points move 6 px per frame that way, everything
else stays put. So the future is ambiguous from the image alone and resolved by the instruction. Dense labels:
depth 1.5 m on the table and 1.0 m on the cube (the top 8 rows show nothing: depth 0, class empty), segmentation
classes empty / static / robot / object 1. Views alternate between the two cameras per scene.
"""

from pathlib import Path
from typing import Tuple

import numpy as np

from traj_forecast_ros.data.dataset import DatasetMeta
from traj_forecast_ros.data.dataset_writer import DatasetWriter
from traj_forecast_ros.model.presets import preset_config
from traj_forecast_ros.train.common import TrainSettings

INSTRUCTIONS = ["push the red cube to the left", "push the red cube to the right"]
VIEWS = ["agentview", "robot0_eye_in_hand"]
CLASSES = ["empty", "static", "robot", "object 1"]
STEP_PX = 6.0


def tiny_sim_meta() -> DatasetMeta:
    config = preset_config("tiny-sim")
    return DatasetMeta(image_size=tuple(config.image_size), query_grid=tuple(config.query_grid),
                       query_stride=config.query_stride, query_offset=config.query_offset,
                       num_frames=config.num_frames, frame_interval_s=0.1, kinds=["push", "reach"],
                       views=list(VIEWS), instructions=list(INSTRUCTIONS), segmentation_classes=list(CLASSES))


def tiny_sim_scene(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Tuple[int, int, int]]:
    """``(image [H, W, 3] uint8, depth [H, W], segmentation [H, W], (x0, y0, size))`` of one random scene."""
    size = 128
    base = rng.integers(60, 200, 3)
    image = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    side = int(rng.integers(32, 56))
    x0, y0 = (int(v) for v in rng.integers(16, size - side - 8, 2))
    image[y0:y0 + side, x0:x0 + side] = (220, 30, 30)
    depth = np.full((size, size), 1.5, np.float32)
    depth[y0:y0 + side, x0:x0 + side] = 1.0
    segmentation = np.ones((size, size), np.uint8)
    segmentation[y0:y0 + side, x0:x0 + side] = 3
    image[:8] = 0
    depth[:8] = 0.0
    segmentation[:8] = 0
    return image, depth, segmentation, (x0, y0, side)


def write_tiny_sim(root: Path, scenes: int = 6, seed: int = 0, branch_groups: bool = False) -> Path:
    """Write ``2 * scenes`` samples (every image with both instructions; ``branch_groups``: the two are stored as
    one branch group, numbered by scene); returns ``root``."""
    meta = tiny_sim_meta()
    rng = np.random.default_rng(seed)
    grid = meta.query_points()  # [Hq, Wq, 2]
    with DatasetWriter(root, meta, shard_size=5) as writer:
        for scene in range(scenes):
            image, depth, segmentation, (x0, y0, side) = tiny_sim_scene(rng)
            inside = ((grid[..., 0] >= x0) & (grid[..., 0] < x0 + side) & (grid[..., 1] >= y0)
                      & (grid[..., 1] < y0 + side))  # [Hq, Wq]
            for direction, instruction in zip((-1.0, 1.0), INSTRUCTIONS):
                tracks = np.repeat(grid[None], meta.num_frames, axis=0).astype(np.float32)  # [T, Hq, Wq, 2]
                steps = np.arange(meta.num_frames, dtype=np.float32)[:, None]
                tracks[:, inside, 0] += direction * STEP_PX * steps
                writer.add(image, tracks, object_ids=inside.astype(np.int16), kind="push",
                           visibility=np.ones(tracks.shape[:-1], bool), view=VIEWS[scene % 2],
                           instruction=instruction, scene_id=scene, depth=depth, segmentation=segmentation,
                           branch_group=scene if branch_groups else None)
    return root


def quick_settings(**overrides) -> TrainSettings:
    """A few quiet, deterministic CPU steps."""
    values = dict(steps=4, batch_size=4, lr=2e-3, warmup_steps=0, log_every=1, checkpoint_every=100, seed=0,
                  device="cpu", progress=False)
    values.update(overrides)
    return TrainSettings(**values)
