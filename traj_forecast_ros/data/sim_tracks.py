"""Exact point tracks from simulator state (pure numpy; no MuJoCo or robosuite import).

Kubric-style ground truth for a rendered scene. At frame 0 every query pixel is lifted to a 3-D point fixed in the
frame of the body it shows (from the per-pixel body id and metric depth, the camera intrinsics and extrinsics); in
every later frame the point moves rigidly with its body's pose and is projected with that frame's camera. A point is
visible in frame ``t`` when it projects inside the image, in front of the camera, and no closer surface covers it in
that frame's depth render. Points whose body and camera have not moved keep their query position exactly.

Conventions (the MuJoCo / robosuite ones, checked against real renders in ``test/data/test_sim_tracks_mujoco.py``):

* Pixels: continuous ``(x, y)`` with pixel ``(row i, col j)`` centred at ``(j + 0.5, i + 0.5)``, row 0 at the top
  (MuJoCo's offscreen buffers come bottom row first: flip them with ``image[::-1]`` before use).
* Camera frame: OpenCV (``x`` right, ``y`` down, ``z`` forward). A MuJoCo camera looks down its ``-z`` axis with ``y``
  up, so ``R_world_from_cam = cam_xmat @ diag(1, -1, -1)`` (robosuite's ``camera_axis_correction``).
* Intrinsics: square pixels, ``f = (H / 2) / tan(fovy / 2)``, principal point at the image centre ``(W / 2, H / 2)``.
* Depth: the camera-frame ``z`` of the surface (not the ray length). MuJoCo writes a normalised depth buffer;
  :func:`depth_buffer_to_metres` converts it for both of MuJoCo's depth maps (``zero_far=False``: 0 at the near
  plane, what robosuite's ``MjRenderContext`` reads; ``zero_far=True``: reversed Z, what ``mujoco.Renderer`` reads).
* Body ids: ``NO_BODY`` (-1) where a pixel shows nothing (the sky); the point is then at infinity and only turns
  with the camera. Body 0 is MuJoCo's world body, which never moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

NO_BODY = -1  # body id of pixels that show no geometry
OPENCV_FROM_MUJOCO_CAMERA = np.diag([1.0, -1.0, -1.0])  # MuJoCo camera axes (-z forward, y up) -> OpenCV axes


# ------------------------------------------------------------------------------------------------ camera helpers
def clip_planes(model) -> Tuple[float, float]:
    """``(near, far)`` clipping distances in metres of a MuJoCo model (``vis.map.znear/zfar`` times ``stat.extent``)."""
    extent = float(model.stat.extent)
    return float(model.vis.map.znear) * extent, float(model.vis.map.zfar) * extent


def depth_buffer_to_metres(buffer: np.ndarray, near: float, far: float, zero_far: bool = False) -> np.ndarray:
    """Normalised depth buffer ``[H, W]`` in [0, 1] -> camera-frame depth in metres (float64).

    ``zero_far=False``: the classic map (0 at the near plane, 1 at the far plane),
    ``z = near / (1 - d (1 - near / far))``. ``zero_far=True``: MuJoCo's reversed Z (1 at the near plane, 0 at the
    far plane), ``z = near far / (d (far - near) + near)``.
    """
    if not 0.0 < near < far:
        raise ValueError(f"need 0 < near < far, got near={near}, far={far}")
    d = np.asarray(buffer, dtype=np.float64)
    if zero_far:
        return near * far / (d * (far - near) + near)
    return near / (1.0 - d * (1.0 - near / far))


def intrinsic_matrix(fovy_deg: float, height: int, width: int) -> np.ndarray:
    """``[3, 3]`` pinhole intrinsics of a MuJoCo camera with vertical field of view ``fovy_deg``."""
    focal = 0.5 * height / math.tan(math.radians(fovy_deg) / 2.0)
    return np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])


def extrinsic_matrix(cam_pos: np.ndarray, cam_xmat: np.ndarray) -> np.ndarray:
    """``[4, 4]`` world-from-camera pose (OpenCV axes) from MuJoCo's ``cam_xpos`` ``[3]`` and ``cam_xmat`` ``[9]``."""
    pose = np.eye(4)
    pose[:3, :3] = np.asarray(cam_xmat, dtype=np.float64).reshape(3, 3) @ OPENCV_FROM_MUJOCO_CAMERA
    pose[:3, 3] = np.asarray(cam_pos, dtype=np.float64)
    return pose


def invert_pose(pose: np.ndarray) -> np.ndarray:
    """Inverse of rigid transforms ``[..., 4, 4]``."""
    rotation = pose[..., :3, :3]
    inverse = np.zeros_like(pose)
    inverse[..., :3, :3] = np.swapaxes(rotation, -1, -2)
    inverse[..., :3, 3] = -np.einsum("...ji,...j->...i", rotation, pose[..., :3, 3])
    inverse[..., 3, 3] = 1.0
    return inverse


def unproject(pixels: np.ndarray, depth: np.ndarray, intrinsics: np.ndarray,
              world_from_camera: np.ndarray) -> np.ndarray:
    """World points ``[N, 3]`` of pixels ``[N, 2]`` (x, y) at camera-frame depths ``[N]`` (metres)."""
    pixels = np.asarray(pixels, dtype=np.float64)
    rays = np.linalg.solve(intrinsics, np.concatenate([pixels, np.ones((len(pixels), 1))], axis=1).T).T  # [N, 3]
    camera_points = rays * np.asarray(depth, dtype=np.float64)[:, None]  # [N, 3], z = depth
    return camera_points @ world_from_camera[:3, :3].T + world_from_camera[:3, 3]


def project(points: np.ndarray, intrinsics: np.ndarray, world_from_camera: np.ndarray
            ) -> Tuple[np.ndarray, np.ndarray]:
    """Pixels ``[N, 2]`` (x, y) and camera-frame depth ``[N]`` of world points ``[N, 3]`` (not rounded)."""
    camera_from_world = invert_pose(world_from_camera)
    camera_points = points @ camera_from_world[:3, :3].T + camera_from_world[:3, 3]  # [N, 3]
    depth = camera_points[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        homogeneous = camera_points @ intrinsics.T  # [N, 3]
        pixels = homogeneous[:, :2] / homogeneous[:, 2:3]
    return pixels, depth


def lookup(image: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Values of ``image [H, W, ...]`` at the pixels containing ``pixels [..., 2]`` (x, y); out of range -> clamped."""
    height, width = image.shape[:2]
    cols = np.clip(np.floor(pixels[..., 0]).astype(np.int64), 0, width - 1)
    rows = np.clip(np.floor(pixels[..., 1]).astype(np.int64), 0, height - 1)
    return image[rows, cols]


# ------------------------------------------------------------------------------------------------ tracks
@dataclass
class LiftedPoints:
    """Query points fixed in their bodies' frames (the frame-0 lift)."""

    query: np.ndarray  # [N, 2] float64 pixels (x, y) at frame 0
    body_ids: np.ndarray  # [N] int, NO_BODY for points at infinity
    local: np.ndarray  # [N, 3] point in its body's frame (body points) or world direction (points at infinity)


def lift_points(query: np.ndarray, body_ids: np.ndarray, depth: np.ndarray, intrinsics: np.ndarray,
                world_from_camera: np.ndarray, body_pos: np.ndarray, body_rot: np.ndarray) -> LiftedPoints:
    """Lift query pixels ``[N, 2]`` to body-frame points.

    ``body_ids [N]`` and ``depth [N]`` (metres) are the frame-0 values at the query pixels; ``body_pos [B, 3]`` and
    ``body_rot [B, 3, 3]`` are the frame-0 body poses (MuJoCo ``xpos`` and ``xmat``). Points with ``NO_BODY`` keep a
    world direction instead (``local`` is then a unit vector).
    """
    query = np.asarray(query, dtype=np.float64).reshape(-1, 2)
    body_ids = np.asarray(body_ids).reshape(-1).astype(np.int64)
    depth = np.asarray(depth, dtype=np.float64).reshape(-1)
    on_body = body_ids != NO_BODY
    if on_body.any() and body_ids[on_body].max() >= len(body_pos):
        raise ValueError(f"body id {int(body_ids[on_body].max())} out of range for {len(body_pos)} body poses")
    if not np.isfinite(depth[on_body]).all() or (depth[on_body] <= 0).any():
        raise ValueError("points on a body need a finite, positive depth")
    local = np.zeros((len(query), 3))
    if on_body.any():
        world = unproject(query[on_body], depth[on_body], intrinsics, world_from_camera)  # [m, 3]
        ids = body_ids[on_body]
        # local = R_b^T (p - c_b)
        local[on_body] = np.einsum("nji,nj->ni", body_rot[ids], world - body_pos[ids])
    if (~on_body).any():
        rays = np.linalg.solve(intrinsics, np.concatenate([query[~on_body], np.ones(((~on_body).sum(), 1))], 1).T).T
        directions = rays @ world_from_camera[:3, :3].T
        local[~on_body] = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    return LiftedPoints(query=query, body_ids=body_ids, local=local)


def move_points(lifted: LiftedPoints, intrinsics: np.ndarray, world_from_camera: np.ndarray,
                body_pos: np.ndarray, body_rot: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Pixels ``[N, 2]`` and camera depth ``[N]`` of lifted points for one frame's camera and body poses.

    Points at infinity get depth ``inf`` (they are behind everything).
    """
    count = len(lifted.query)
    pixels = np.zeros((count, 2))
    depth = np.full(count, np.inf)
    on_body = lifted.body_ids != NO_BODY
    if on_body.any():
        ids = lifted.body_ids[on_body]
        world = body_pos[ids] + np.einsum("nij,nj->ni", body_rot[ids], lifted.local[on_body])  # [m, 3]
        pixels[on_body], depth[on_body] = project(world, intrinsics, world_from_camera)
    if (~on_body).any():
        camera_dirs = lifted.local[~on_body] @ world_from_camera[:3, :3]  # R^T d, [k, 3]
        with np.errstate(divide="ignore", invalid="ignore"):
            homogeneous = camera_dirs @ intrinsics.T
            pixels[~on_body] = homogeneous[:, :2] / homogeneous[:, 2:3]
        behind = camera_dirs[:, 2] <= 0
        depth_far = depth[~on_body]
        depth_far[behind] = -np.inf  # behind the camera: never visible
        depth[~on_body] = depth_far
    return pixels, depth


def depth_visibility(pixels: np.ndarray, point_depth: np.ndarray, depth_map: np.ndarray,
                     abs_tolerance: float = 0.01, rel_tolerance: float = 0.02,
                     sky_depth: float = np.inf) -> np.ndarray:
    """``[N]`` bool: inside the image, in front of the camera and not behind the rendered surface.

    Points at infinity (depth ``inf``) are visible where the render shows nothing (depth >= ``sky_depth``, e.g.
    the far clipping distance).

    A point is occluded when the depth render at its pixel is closer than ``point_depth - tol`` with
    ``tol = max(abs_tolerance, rel_tolerance * point_depth)`` (metres): the render samples the pixel centre, not the
    point, so a tilted surface differs from the point by up to half a pixel's footprint.
    """
    height, width = depth_map.shape[:2]
    inside = ((pixels[:, 0] >= 0) & (pixels[:, 0] < width) & (pixels[:, 1] >= 0) & (pixels[:, 1] < height)
              & np.isfinite(pixels).all(axis=1))
    in_front = point_depth > 0
    surface = lookup(np.asarray(depth_map, dtype=np.float64), np.where(np.isfinite(pixels), pixels, 0.0))
    finite = np.isfinite(point_depth)
    tolerance = np.maximum(abs_tolerance, rel_tolerance * np.where(finite, point_depth, 0.0))
    sky = surface >= sky_depth * (1.0 - 1e-4)  # the render shows nothing there (depth at or beyond the far plane)
    unoccluded = np.where(finite, surface >= point_depth - tolerance, sky)
    return inside & in_front & unoccluded


def static_mask(body_ids: np.ndarray, body_pos: np.ndarray, body_rot: np.ndarray,
                cameras: np.ndarray) -> np.ndarray:
    """``[T, N]`` bool: the point's body pose and the camera equal frame 0's exactly in frame ``t``."""
    camera_still = np.array([np.array_equal(cameras[t], cameras[0]) for t in range(len(cameras))])  # [T]
    pose_still = (np.all(body_pos == body_pos[:1], axis=-1)
                  & np.all(body_rot == body_rot[:1], axis=(-2, -1)))  # [T, B]
    ids = np.asarray(body_ids).reshape(-1)
    point_still = np.where(ids[None, :] == NO_BODY, True, pose_still[:, np.maximum(ids, 0)])  # [T, N]
    return point_still & camera_still[:, None]


@dataclass
class ClipTracks:
    """Tracks of one clip in one view."""

    tracks: np.ndarray  # [T, N, 2] float64 pixels (x, y) in the frame-0 image's pixels
    visible: np.ndarray  # [T, N] bool
    depth: np.ndarray  # [T, N] float64 camera-frame depth of each point (inf: at infinity)
    body_ids: np.ndarray  # [N] int


def clip_tracks(query: np.ndarray, body_id_map: np.ndarray, depth_map0: np.ndarray, intrinsics: np.ndarray,
                cameras: np.ndarray, body_pos: np.ndarray, body_rot: np.ndarray,
                depth_maps: Optional[np.ndarray] = None, abs_tolerance: float = 0.01,
                rel_tolerance: float = 0.02, sky_depth: float = np.inf) -> ClipTracks:
    """Exact tracks of query pixels through a clip.

    Args:
        query: ``[..., 2]`` pixels (x, y) at frame 0, e.g. the ``[Hq, Wq, 2]`` query grid.
        body_id_map: ``[H, W]`` int body id per pixel at frame 0 (``NO_BODY`` for empty pixels; element/geom ids must
            already be mapped to bodies, e.g. with MuJoCo's ``geom_bodyid``).
        depth_map0: ``[H, W]`` metres at frame 0 (row 0 at the top).
        intrinsics: ``[3, 3]``.
        cameras: ``[T, 4, 4]`` world-from-camera per frame (a fixed camera repeats the same matrix).
        body_pos: ``[T, B, 3]`` and ``body_rot``: ``[T, B, 3, 3]`` body poses per frame.
        depth_maps: ``[T, H, W]`` metres per frame for the visibility test; ``None``: visibility is only "in front
            and inside the image".
        abs_tolerance, rel_tolerance, sky_depth: see :func:`depth_visibility`.
    Returns:
        :class:`ClipTracks` with ``N = prod(query.shape[:-1])`` points in row-major order.
    """
    query = np.asarray(query, dtype=np.float64).reshape(-1, 2)
    num_frames = len(cameras)
    if body_pos.shape[0] != num_frames or body_rot.shape[0] != num_frames:
        raise ValueError(f"{num_frames} camera poses but {body_pos.shape[0]} / {body_rot.shape[0]} body pose frames")
    if depth_maps is not None and len(depth_maps) != num_frames:
        raise ValueError(f"{num_frames} camera poses but {len(depth_maps)} depth maps")
    body_ids = lookup(np.asarray(body_id_map), query).astype(np.int64)
    depth0 = lookup(np.asarray(depth_map0, dtype=np.float64), query)
    lifted = lift_points(query, body_ids, depth0, intrinsics, cameras[0], body_pos[0], body_rot[0])
    still = static_mask(body_ids, body_pos, body_rot, cameras)  # [T, N]
    tracks = np.zeros((num_frames, len(query), 2))
    depths = np.zeros((num_frames, len(query)))
    visible = np.zeros((num_frames, len(query)), dtype=bool)
    for t in range(num_frames):
        pixels, depth = move_points(lifted, intrinsics, cameras[t], body_pos[t], body_rot[t])
        pixels[still[t]] = query[still[t]]  # unmoved body and camera: exactly the query, no round-off
        tracks[t], depths[t] = pixels, depth
        if depth_maps is None:
            height, width = depth_map0.shape[:2]
            visible[t] = ((pixels[:, 0] >= 0) & (pixels[:, 0] < width) & (pixels[:, 1] >= 0)
                          & (pixels[:, 1] < height) & (depth > 0))
        else:
            visible[t] = depth_visibility(pixels, depth, depth_maps[t], abs_tolerance, rel_tolerance, sky_depth)
    return ClipTracks(tracks=tracks, visible=visible, depth=depths, body_ids=body_ids)
