"""Exact track geometry (traj_forecast_ros.data.sim_tracks) on analytic scenes: known rigid motions, static points,
occlusion by a depth render, a moving camera and the depth-buffer conversions. Pure numpy, always runs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from traj_forecast_ros.data import sim_tracks as st

SIZE = 64  # image side, pixels
FOVY = 60.0
TOL_PX = 0.05


def rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rot_x(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def grid(step: int = 4) -> np.ndarray:
    """Query pixel centres (x, y) ``[n, n, 2]``."""
    centres = np.arange(step // 2, SIZE, step) + 0.5
    xs, ys = np.meshgrid(centres, centres, indexing="xy")
    return np.stack([xs, ys], axis=-1)


class PlateScene:
    """World = camera frame (identity extrinsics, OpenCV axes). Body 0: a wall at z = 5. Body 1: a square plate
    facing the camera, centred on the optical axis at z = 2 with half-size 0.4 m (in its own frame, z = 0 plane).
    Depth and body-id maps are rendered analytically (ray-plane intersection per pixel centre)."""

    wall_z = 5.0

    def __init__(self) -> None:
        self.K = st.intrinsic_matrix(FOVY, SIZE, SIZE)
        self.camera = np.eye(4)
        self.half = 0.4

    def poses(self, plate_pos: np.ndarray, plate_rot: np.ndarray):
        pos = np.stack([np.zeros(3), plate_pos])  # [B=2, 3]
        rot = np.stack([np.eye(3), plate_rot])
        return pos, rot

    def render(self, plate_pos: np.ndarray, plate_rot: np.ndarray, camera: np.ndarray | None = None):
        """Depth [H, W] (camera z) and body ids [H, W] with the plate at this pose."""
        camera = self.camera if camera is None else camera
        centres = np.arange(SIZE) + 0.5
        xs, ys = np.meshgrid(centres, centres, indexing="xy")
        rays_cam = np.stack([xs, ys, np.ones_like(xs)], -1) @ np.linalg.inv(self.K).T  # [H, W, 3], z = 1
        rays = rays_cam @ camera[:3, :3].T
        origin = camera[:3, 3]
        # wall: world z = wall_z
        t_wall = (self.wall_z - origin[2]) / rays[..., 2]
        # plate: plane through plate_pos with normal plate_rot[:, 2]
        normal = plate_rot[:, 2]
        t_plate = ((plate_pos - origin) @ normal) / (rays @ normal)
        hit = origin + rays * t_plate[..., None]
        local = (hit - plate_pos) @ plate_rot
        on_plate = (np.abs(local[..., 0]) <= self.half) & (np.abs(local[..., 1]) <= self.half) & (t_plate > 0)
        on_plate &= t_plate < t_wall
        t = np.where(on_plate, t_plate, t_wall)
        depth = t  # rays_cam has z = 1, so the ray parameter is the camera-frame depth
        ids = np.where(on_plate, 1, 0)
        return depth, ids


def run_clip(scene: PlateScene, positions, rotations, cameras=None, with_depth=True):
    num = len(positions)
    cameras = np.stack([scene.camera] * num) if cameras is None else np.asarray(cameras)
    body_pos = np.stack([scene.poses(p, r)[0] for p, r in zip(positions, rotations)])
    body_rot = np.stack([scene.poses(p, r)[1] for p, r in zip(positions, rotations)])
    renders = [scene.render(p, r, c) for p, r, c in zip(positions, rotations, cameras)]
    depth0, ids0 = renders[0]
    depth_maps = np.stack([d for d, _ in renders]) if with_depth else None
    query = grid()
    clip = st.clip_tracks(query, ids0, depth0, scene.K, cameras, body_pos, body_rot, depth_maps=depth_maps)
    return query.reshape(-1, 2), clip


def test_translation_gives_known_pixel_shift():
    scene = PlateScene()
    start = np.array([0.0, 0.0, 2.0])
    steps = [np.array([0.02 * t, -0.015 * t, 0.0]) for t in range(6)]
    query, clip = run_clip(scene, [start + s for s in steps], [np.eye(3)] * 6)
    focal = scene.K[0, 0]
    on_plate = clip.body_ids == 1
    assert on_plate.sum() > 20 and (~on_plate).sum() > 20
    for t, step in enumerate(steps):
        expected = query[on_plate] + focal * step[:2] / 2.0  # a plane at z = 2 shifts by f * d / z
        assert np.abs(clip.tracks[t][on_plate] - expected).max() < TOL_PX
        assert np.array_equal(clip.tracks[t][~on_plate], query[~on_plate])  # the wall stays exactly


def test_rotation_about_the_optical_axis_rotates_pixels():
    scene = PlateScene()
    centre = np.array([0.1, 0.05, 2.0])
    angles = [0.0, 0.1, 0.25, 0.5]
    _, clip0 = run_clip(scene, [centre] * 4, [rot_z(a) for a in angles])
    query = grid().reshape(-1, 2)
    pc = scene.K[:2, :2] @ (centre[:2] / centre[2]) + scene.K[:2, 2]  # the plate centre's pixel
    on_plate = clip0.body_ids == 1
    for t, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        expected = pc + (query[on_plate] - pc) @ np.array([[c, -s], [s, c]]).T
        assert np.abs(clip0.tracks[t][on_plate] - expected).max() < TOL_PX


def test_general_rigid_motion_matches_an_independent_projection_matrix():
    """Tilt + translation in depth: compare with P = K [R | t] applied to the analytic surface point."""
    scene = PlateScene()
    start = np.array([0.0, 0.0, 2.0])
    positions = [start, start + [0.05, 0.02, 0.3], start + [-0.1, 0.05, 0.6]]
    rotations = [np.eye(3), rot_x(0.3) @ rot_z(0.2), rot_x(-0.4)]
    query, clip = run_clip(scene, positions, rotations)
    on_plate = clip.body_ids == 1
    # independent path: frame-0 surface point of each query pixel = ray hit on the plane z = 2
    rays = np.concatenate([query[on_plate], np.ones((on_plate.sum(), 1))], 1) @ np.linalg.inv(scene.K).T
    local = rays * 2.0 - start  # plate frame (rotation identity at frame 0)
    for t, (pos, rot) in enumerate(zip(positions, rotations)):
        world = local @ rot.T + pos
        projection = scene.K @ np.eye(4)[:3]  # camera = world
        homogeneous = np.concatenate([world, np.ones((len(world), 1))], 1) @ projection.T
        expected = homogeneous[:, :2] / homogeneous[:, 2:]
        assert np.abs(clip.tracks[t][on_plate] - expected).max() < TOL_PX


def test_static_geometry_has_exactly_zero_motion_and_stays_visible():
    scene = PlateScene()
    pos = np.array([0.0, 0.0, 2.0])
    query, clip = run_clip(scene, [pos] * 5, [np.eye(3)] * 5)
    assert np.array_equal(clip.tracks, np.broadcast_to(query, clip.tracks.shape))
    assert clip.visible.all()


def test_points_behind_a_moving_body_become_occluded_and_reappear():
    scene = PlateScene()
    # the plate slides right by ~20 px and back: wall points it passes over are hidden, then visible again
    offsets = [0.0, 0.3, 0.6, 0.3, 0.0]
    query, clip = run_clip(scene, [np.array([d, 0.0, 2.0]) for d in offsets], [np.eye(3)] * 5)
    wall = clip.body_ids == 0
    _, ids_far = scene.render(np.array([0.6, 0.0, 2.0]), np.eye(3))
    covered = st.lookup(ids_far, query) == 1
    assert (wall & covered).sum() > 5
    assert not clip.visible[2][wall & covered].any()  # hidden behind the plate at frame 2
    assert clip.visible[2][wall & ~covered].all()
    assert clip.visible[4].all()  # back where it started: everything visible again
    assert clip.visible[:, clip.body_ids == 1].all()  # the plate itself is never occluded


def test_points_leaving_the_image_are_not_visible_but_keep_positions():
    scene = PlateScene()
    query, clip = run_clip(scene, [np.array([0.0, 0.0, 2.0]), np.array([3.0, 0.0, 2.0])], [np.eye(3)] * 2)
    plate = clip.body_ids == 1
    assert (clip.tracks[1][plate, 0] > SIZE).all()
    assert np.isfinite(clip.tracks[1]).all()
    assert not clip.visible[1][plate].any()


def test_moving_camera_moves_static_points_by_parallax_and_far_points_only_by_rotation():
    scene = PlateScene()
    cameras = np.stack([np.eye(4)] * 3)
    cameras[1][:3, 3] = [0.1, 0.0, 0.0]  # camera translates right: static points shift left by f * 0.1 / z
    cameras[2][:3, :3] = rot_z(0.2)  # camera rolls about its axis
    pos = np.array([0.0, 0.0, 2.0])
    query, clip = run_clip(scene, [pos] * 3, [np.eye(3)] * 3, cameras=cameras)
    focal = scene.K[0, 0]
    wall, plate = clip.body_ids == 0, clip.body_ids == 1
    assert np.abs(clip.tracks[1][wall] - (query[wall] - [focal * 0.1 / 5.0, 0])).max() < TOL_PX
    assert np.abs(clip.tracks[1][plate] - (query[plate] - [focal * 0.1 / 2.0, 0])).max() < TOL_PX
    centre = scene.K[:2, 2]
    c, s = math.cos(-0.2), math.sin(-0.2)  # the image turns opposite to the camera
    expected = centre + (query - centre) @ np.array([[c, -s], [s, c]]).T
    assert np.abs(clip.tracks[2] - expected).max() < TOL_PX


def test_points_at_infinity_ignore_camera_translation():
    K = st.intrinsic_matrix(FOVY, SIZE, SIZE)
    query = grid().reshape(-1, 2)
    ids = np.full(len(query), st.NO_BODY)
    lifted = st.lift_points(query, ids, np.full(len(query), np.inf), K, np.eye(4), np.zeros((1, 3)), np.eye(3)[None])
    moved = np.eye(4)
    moved[:3, 3] = [5.0, -2.0, 1.0]
    pixels, depth = st.move_points(lifted, K, moved, np.zeros((1, 3)), np.eye(3)[None])
    assert np.abs(pixels - query).max() < 1e-9 and np.isinf(depth).all()
    sky = np.full((SIZE, SIZE), np.inf)
    assert st.depth_visibility(pixels, depth, sky).all()
    assert not st.depth_visibility(pixels, depth, np.full((SIZE, SIZE), 3.0)).any()


@pytest.mark.parametrize("zero_far", [False, True])
def test_depth_buffer_round_trip(zero_far: bool):
    near, far = 0.03, 40.0
    z = np.array([0.03, 0.5, 1.0, 2.5, 39.0, 40.0])
    if zero_far:
        buffer = near * (far - z) / (z * (far - near))
    else:
        buffer = (1.0 / near - 1.0 / z) / (1.0 / near - 1.0 / far)
    assert np.allclose(st.depth_buffer_to_metres(buffer, near, far, zero_far=zero_far), z, rtol=1e-9)
    ends = st.depth_buffer_to_metres(np.array([0.0, 1.0]), near, far, zero_far=zero_far)
    assert np.allclose(ends, [far, near] if zero_far else [near, far])
    with pytest.raises(ValueError):
        st.depth_buffer_to_metres(buffer, far, near)


def test_mujoco_camera_conventions():
    """A MuJoCo camera with identity xmat looks down world -z with world +y up in the image."""
    K = st.intrinsic_matrix(45.0, 128, 96)
    assert K[0, 2] == 48.0 and K[1, 2] == 64.0 and np.isclose(K[0, 0], 64.0 / math.tan(math.radians(22.5)))
    pose = st.extrinsic_matrix(np.array([0.0, 0.0, 1.0]), np.eye(3).reshape(9))
    points = np.array([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.1, 0.0]])
    pixels, depth = st.project(points, K, pose)
    assert np.allclose(pixels[0], [48.0, 64.0]) and np.allclose(depth, 1.0)
    assert pixels[1, 0] > 48.0 and np.isclose(pixels[1, 1], 64.0)  # world +x -> right
    assert pixels[2, 1] < 64.0 and np.isclose(pixels[2, 0], 48.0)  # world +y -> up (smaller row)
    back = st.unproject(pixels, depth, K, pose)
    assert np.allclose(back, points)
    assert np.allclose(st.invert_pose(pose) @ pose, np.eye(4))


def test_lift_rejects_bad_inputs():
    K = st.intrinsic_matrix(FOVY, SIZE, SIZE)
    query = np.array([[10.5, 10.5]])
    with pytest.raises(ValueError, match="out of range"):
        st.lift_points(query, np.array([3]), np.array([1.0]), K, np.eye(4), np.zeros((2, 3)), np.stack([np.eye(3)] * 2))
    with pytest.raises(ValueError, match="positive depth"):
        st.lift_points(query, np.array([1]), np.array([0.0]), K, np.eye(4), np.zeros((2, 3)), np.stack([np.eye(3)] * 2))
    with pytest.raises(ValueError, match="depth maps"):
        st.clip_tracks(query, np.zeros((SIZE, SIZE), int), np.ones((SIZE, SIZE)), K, np.stack([np.eye(4)] * 2),
                       np.zeros((2, 1, 3)), np.stack([np.eye(3)[None]] * 2), depth_maps=np.ones((3, SIZE, SIZE)))
