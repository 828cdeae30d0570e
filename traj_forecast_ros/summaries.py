"""What a planner asks of a forecast, computed once from its tracks: will each point move, when, and how surely.

The K samples of a forecast are independent draws from the model and equally likely, so every probability here is
a share of samples. All displacements are measured from each sample's frame 0 (``tracks[:, 0]``, the query point).
:func:`planner_summaries` shares its intermediate arrays between the summaries; at K = 8, T = 16 and a 64 x 64
grid they cost about 1.2 ms on this project's CPU (``bench/summaries_bench.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NOT_EXPECTED_TO_MOVE = -1  # first_move_frame of a point that fewer than half of the samples move
DEFAULT_MOVING_THRESHOLD_PX = 2.0  # pixels from frame 0 that count as moving: the API's, the message's, the node's


@dataclass
class PlannerSummaries:
    """Per-point summaries of a forecast ``[K, T, H, W, 2]``.

    Attributes:
        moving_threshold: pixels a point must move from frame 0 (in one sample, at some frame) to count as moving.
        motion_probability: ``[H, W]`` share of the samples in which the point moves more than the threshold at
            any frame of the horizon.
        first_move_frame: ``[H, W]`` the earliest frame by which at least half of the samples have moved the point
            more than the threshold; :data:`NOT_EXPECTED_TO_MOVE` (-1) when fewer than half ever do.
        spread_per_frame: ``[T, H, W]`` RMS distance, in pixels, of the samples' positions from their mean at each
            frame (0 = the samples agree).
        mean_displacement: ``[H, W, 2]`` mean over the samples of the (x, y) displacement from frame 0 to the last
            frame, pixels.
        sample_weights: ``[K]`` the probability of each sample: 1 / K each (the samples are equally likely).
    """

    moving_threshold: float
    motion_probability: np.ndarray
    first_move_frame: np.ndarray
    spread_per_frame: np.ndarray
    mean_displacement: np.ndarray
    sample_weights: np.ndarray

    @property
    def spread(self) -> np.ndarray:
        """``[H, W]`` the spread at the last frame."""
        return self.spread_per_frame[-1]


def planner_summaries(tracks: np.ndarray, moving_threshold: float) -> PlannerSummaries:
    """The :class:`PlannerSummaries` of ``tracks`` ``[K, T, H, W, 2]`` (pixels) for ``moving_threshold`` pixels."""
    tracks = np.asarray(tracks, dtype=np.float32)
    if tracks.ndim != 5 or tracks.shape[-1] != 2 or 0 in tracks.shape:
        raise ValueError(f"tracks must be a non-empty [K, T, H, W, 2] array, got {tracks.shape}")
    num_samples, num_frames, rows, cols = tracks.shape[:4]
    offsets = tracks - tracks[:, :1]  # [K, T, H, W, 2] displacement from frame 0
    offsets *= offsets
    moved = (offsets[..., 0] + offsets[..., 1]) > np.float32(moving_threshold) ** 2  # [K, T, H, W]

    # Frame by frame, which samples have moved by then; the first frame at which at least half have is the point's
    # first_move_frame (the ceil(K/2)-th smallest of the samples' first moving frames). 16 steps over [K, H*W]
    # bytes cost less than one argmax over the frame axis.
    half = (num_samples + 1) // 2
    moved_flat = moved.view(np.uint8).reshape(num_samples, num_frames, rows * cols)  # [K, T, H*W] 0/1
    moved_by = np.zeros((num_samples, rows * cols), dtype=np.uint8)  # [K, H*W]
    counter = np.uint8 if num_samples <= 255 else np.uint32  # bytes are fastest; wider only for a large K
    count = np.empty(rows * cols, dtype=counter)  # [H*W] samples moved by this frame
    first_move_frame = np.full(rows * cols, NOT_EXPECTED_TO_MOVE, dtype=np.float32)  # [H*W]
    for frame in range(1, num_frames):
        np.bitwise_or(moved_by, moved_flat[:, frame], out=moved_by)
        np.add.reduce(moved_by, axis=0, out=count, dtype=counter)
        first_move_frame[(first_move_frame < 0) & (count >= half)] = frame
    motion_probability = moved_by.sum(axis=0, dtype=np.float32).reshape(rows, cols) / np.float32(num_samples)

    mean_position = tracks.sum(axis=0)  # [T, H, W, 2]
    mean_position *= np.float32(1.0 / num_samples)
    centred = tracks - mean_position  # [K, T, H, W, 2]
    centred *= centred
    squared = centred.sum(axis=0)  # [T, H, W, 2]
    spread_per_frame = np.sqrt((squared[..., 0] + squared[..., 1]) / np.float32(num_samples))  # [T, H, W]
    mean_displacement = mean_position[-1] - mean_position[0]  # [H, W, 2]
    return PlannerSummaries(
        moving_threshold=float(moving_threshold),
        motion_probability=motion_probability,
        first_move_frame=first_move_frame.reshape(rows, cols),
        spread_per_frame=spread_per_frame.astype(np.float32, copy=False),
        mean_displacement=mean_displacement.astype(np.float32, copy=False),
        sample_weights=np.full(num_samples, 1.0 / num_samples, dtype=np.float32),
    )
