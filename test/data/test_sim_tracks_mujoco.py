"""sim_tracks against real MuJoCo: a scene built here from an XML string (a floor, a static pillar, a free box moved
through a scripted translation + rotation, a fixed camera).

* Ray casting (``mj_ray``, no OpenGL, runs wherever mujoco is installed): frame-0 maps from rays through the pixel
  centres; every tracked box point, re-cast through its predicted pixel in a later frame, hits the same material
  point of the box (exact), and the predicted visibility agrees with what the ray hits.
* Offscreen rendering (OSMesa, in a subprocess): MuJoCo's own segmentation and depth renders, with the depth buffer
  converted by ``depth_buffer_to_metres``, reproduce the ray-cast maps and give the same tracks within 0.05 px.
  Skipped, with the reason, where libOSMesa is not installed (``apt-get install -y libosmesa6``).
"""

from __future__ import annotations

import ctypes.util
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from traj_forecast_ros.data import sim_tracks as st

mujoco = pytest.importorskip("mujoco", reason="mujoco (requirements-dev.txt, mujoco==3.3.7) is not installed")

SIZE = 48
FOVY = 50.0
XML = """
<mujoco>
  <visual><map znear="0.01" zfar="50"/></visual>
  <worldbody>
    <light pos="0 0 4" dir="0 0 -1"/>
    <geom name="floor" type="plane" size="3 3 0.1" rgba=".6 .6 .6 1"/>
    <geom name="pillar" type="box" pos="0.1 -0.3 0.25" size="0.04 0.04 0.25" rgba=".2 .2 .8 1"/>
    <camera name="cam" pos="0 -0.75 0.95" xyaxes="1 0 0 0 0.6 0.8" fovy="50"/>
    <body name="box" pos="0 0 0.15">
      <freejoint/>
      <geom name="box" type="box" size="0.2 0.15 0.1" rgba=".9 .3 .2 1"/>
    </body>
  </worldbody>
</mujoco>
"""
BOX_HALF = np.array([0.2, 0.15, 0.1])


def quat_z(angle: float) -> np.ndarray:
    return np.array([math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2)])


def quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


def scripted_qpos(num_frames: int = 6) -> np.ndarray:
    """Free-joint qpos [T, 7] of the box: slides +x behind the pillar while turning and tilting."""
    frames = []
    for t in range(num_frames):
        tilt = np.array([math.cos(0.05 * t), math.sin(0.05 * t), 0.0, 0.0])  # about x
        quat = quat_mul(quat_z(0.15 * t), tilt)
        frames.append(np.concatenate([[-0.15 + 0.09 * t, 0.12 + 0.01 * t, 0.15 + 0.02 * t], quat]))
    return np.stack(frames)


def query_grid() -> np.ndarray:
    centres = np.arange(1, SIZE, 2) + 0.5  # every other pixel centre
    xs, ys = np.meshgrid(centres, centres, indexing="xy")
    return np.stack([xs, ys], axis=-1)  # [24, 24, 2]


def scene_states(model, qpos: np.ndarray):
    """Per-frame camera pose [T, 4, 4], body poses [T, B, 3] / [T, B, 3, 3]."""
    data = mujoco.MjData(model)
    cam = model.camera("cam").id
    cameras, body_pos, body_rot = [], [], []
    for q in qpos:
        data.qpos[:] = q
        mujoco.mj_forward(model, data)
        cameras.append(st.extrinsic_matrix(data.cam_xpos[cam], data.cam_xmat[cam]))
        body_pos.append(data.xpos.copy())
        body_rot.append(data.xmat.reshape(-1, 3, 3).copy())
    return data, np.stack(cameras), np.stack(body_pos), np.stack(body_rot)


def cast(model, data, camera: np.ndarray, K: np.ndarray, pixels: np.ndarray):
    """Ray through each pixel [N, 2]: (camera depth [N] (inf on a miss), body id [N] (NO_BODY on a miss))."""
    rays = np.concatenate([pixels, np.ones((len(pixels), 1))], 1) @ np.linalg.inv(K).T  # camera z = 1
    directions = rays @ camera[:3, :3].T
    geom = np.zeros(1, dtype=np.int32)
    depth = np.full(len(pixels), np.inf)
    body = np.full(len(pixels), st.NO_BODY)
    for i, direction in enumerate(directions):
        distance = mujoco.mj_ray(model, data, camera[:3, 3], direction, None, 1, -1, geom)
        if distance >= 0:  # distance is in units of |direction|, whose camera z is 1: the camera depth
            depth[i] = distance
            body[i] = model.geom_bodyid[geom[0]]
    return depth, body


def ray_maps(model, data, camera, K):
    centres = np.arange(SIZE) + 0.5
    xs, ys = np.meshgrid(centres, centres, indexing="xy")
    depth, body = cast(model, data, camera, K, np.stack([xs, ys], -1).reshape(-1, 2))
    return depth.reshape(SIZE, SIZE), body.reshape(SIZE, SIZE)


@pytest.fixture(scope="module")
def raycast_clip():
    model = mujoco.MjModel.from_xml_string(XML)
    qpos = scripted_qpos()
    data, cameras, body_pos, body_rot = scene_states(model, qpos)
    K = st.intrinsic_matrix(float(model.cam_fovy[model.camera("cam").id]), SIZE, SIZE)
    maps = []
    for q, camera in zip(qpos, cameras):
        data.qpos[:] = q
        mujoco.mj_forward(model, data)
        maps.append(ray_maps(model, data, camera, K))
    depth_maps = np.stack([m[0] for m in maps])
    body_maps = np.stack([m[1] for m in maps])
    clip = st.clip_tracks(query_grid(), body_maps[0], depth_maps[0], K, cameras, body_pos, body_rot,
                          depth_maps=depth_maps)
    return dict(model=model, data=data, qpos=qpos, K=K, cameras=cameras, body_pos=body_pos, body_rot=body_rot,
                depth_maps=depth_maps, body_maps=body_maps, clip=clip)


def test_raycast_lift_lands_on_the_box_surface(raycast_clip):
    r = raycast_clip
    box = r["model"].body("box").id
    clip = r["clip"]
    on_box = clip.body_ids == box
    assert on_box.sum() > 30
    query = query_grid().reshape(-1, 2)
    lifted = st.lift_points(query, clip.body_ids, st.lookup(r["depth_maps"][0], query), r["K"], r["cameras"][0],
                            r["body_pos"][0], r["body_rot"][0])
    local = lifted.local[on_box]
    # every lifted point lies on a face of the box: its largest |coordinate / half size| is exactly 1
    assert np.abs(np.abs(local / BOX_HALF).max(axis=1) - 1.0).max() < 1e-6


def test_raycast_tracks_hit_the_same_material_point(raycast_clip):
    r = raycast_clip
    model, data, clip = r["model"], r["data"], r["clip"]
    box = model.body("box").id
    query = query_grid().reshape(-1, 2)
    lifted = st.lift_points(query, clip.body_ids, st.lookup(r["depth_maps"][0], query), r["K"], r["cameras"][0],
                            r["body_pos"][0], r["body_rot"][0])
    checked = 0
    for t in range(1, len(r["qpos"])):
        data.qpos[:] = r["qpos"][t]
        mujoco.mj_forward(model, data)
        visible_box = clip.visible[t] & (clip.body_ids == box)
        depth, body = cast(model, data, r["cameras"][t], r["K"], clip.tracks[t][visible_box])
        predicted = clip.depth[t][visible_box]
        # the ray through a predicted pixel passes through the predicted point, so it can only stop there or sooner
        assert (depth <= predicted + 1e-6).all()
        # where nothing covers the point (no hit more than 1 mm sooner), the ray hits the box at the same material
        # point: body-frame error below a micrometre, i.e. far below 0.05 px (1 px is about 2 cm here)
        hit = (depth > predicted - 1e-3) & (body == box)
        assert hit.mean() > 0.9  # the rest: covered within half a pixel of a silhouette, called visible by the raster
        world = st.unproject(clip.tracks[t][visible_box][hit], depth[hit], r["K"], r["cameras"][t])
        local = np.einsum("ji,nj->ni", r["body_rot"][t][box], world - r["body_pos"][t][box])
        assert np.abs(local - lifted.local[visible_box][hit]).max() < 1e-6
        hit_box = hit
        checked += int(hit_box.sum())
    assert checked > 100
    # the box really moved (tens of pixels), and static points did not move at all
    moved = np.linalg.norm(clip.tracks[-1] - clip.tracks[0], axis=-1)
    assert moved[clip.body_ids == box].mean() > 5.0
    assert np.array_equal(clip.tracks[:, clip.body_ids == 0], np.broadcast_to(query[clip.body_ids == 0],
                                                                             (len(r["qpos"]), *query[clip.body_ids == 0].shape)))


def test_raycast_visibility_matches_what_the_rays_hit(raycast_clip):
    r = raycast_clip
    model, data, clip = r["model"], r["data"], r["clip"]
    box = model.body("box").id
    agree, total, occluded = 0, 0, 0
    for t in range(1, len(r["qpos"])):
        data.qpos[:] = r["qpos"][t]
        mujoco.mj_forward(model, data)
        inside = ((clip.tracks[t] >= 0) & (clip.tracks[t] < SIZE)).all(-1)
        points = np.flatnonzero(inside & (clip.body_ids == box))
        depth, _ = cast(model, data, r["cameras"][t], r["K"], clip.tracks[t][points])
        truly_visible = depth >= clip.depth[t][points] - 1e-4  # nothing closer along the exact ray
        agree += int((truly_visible == clip.visible[t][points]).sum())
        total += len(points)
        occluded += int((~truly_visible).sum())
    assert occluded > 10, "the scripted motion should hide part of the box (behind the pillar or itself)"
    assert agree / total > 0.95


RENDER_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import mujoco
    spec = json.loads(open(sys.argv[1]).read())
    model = mujoco.MjModel.from_xml_string(spec["xml"])
    data = mujoco.MjData(model)
    renderer = mujoco.Renderer(model, spec["size"], spec["size"])
    out = {}
    for t, q in enumerate(spec["qpos"]):
        data.qpos[:] = q
        mujoco.mj_forward(model, data)
        renderer.update_scene(data, "cam")
        renderer.enable_segmentation_rendering()
        out[f"seg{t}"] = renderer.render().copy()  # [H, W, 2] (object id, object type), top row first
        renderer.enable_depth_rendering()
        out[f"metric{t}"] = renderer.render().copy()
        raw = np.empty((spec["size"], spec["size"]), np.float32)  # MuJoCo's reversed-Z buffer, bottom row first
        mujoco.mjr_readPixels(None, raw, renderer._rect, renderer._mjr_context)
        out[f"raw{t}"] = raw
        renderer.disable_depth_rendering()
    np.savez(sys.argv[2], **out)
""")


@pytest.fixture(scope="module")
def renders(tmp_path_factory, raycast_clip):
    if ctypes.util.find_library("OSMesa") is None:
        pytest.skip("offscreen rendering needs libOSMesa (apt-get install -y libosmesa6); the ray-cast tests cover "
                    "the geometry without it")
    folder = tmp_path_factory.mktemp("mujoco_render")
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"xml": XML, "size": SIZE, "qpos": raycast_clip["qpos"].tolist()}))
    script = folder / "render.py"
    script.write_text(RENDER_SCRIPT)
    out = folder / "renders.npz"
    env = {**os.environ, "MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}
    result = subprocess.run([sys.executable, str(script), str(spec), str(out)], env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    return dict(np.load(out))


def rendered_maps(renders, model, t: int):
    seg = renders[f"seg{t}"]
    geom_type = int(mujoco.mjtObj.mjOBJ_GEOM)
    is_geom = seg[..., 1] == geom_type
    body = np.where(is_geom, model.geom_bodyid[np.where(is_geom, seg[..., 0], 0)], st.NO_BODY)
    near, far = st.clip_planes(model)
    depth = st.depth_buffer_to_metres(renders[f"raw{t}"][::-1], near, far, zero_far=True)  # flip rows: top first
    return body, depth


def test_render_depth_and_segmentation_match_the_rays(renders, raycast_clip):
    r = raycast_clip
    model = r["model"]
    for t in range(len(r["qpos"])):
        body, depth = rendered_maps(renders, model, t)
        assert (body == r["body_maps"][t]).mean() > 0.98  # disagreements only on silhouette pixels
        same = (body == r["body_maps"][t]) & (body != st.NO_BODY)
        assert np.allclose(depth[same], r["depth_maps"][t][same], rtol=1e-4, atol=1e-4)
        sky = r["body_maps"][t] == st.NO_BODY
        assert sky.any() and np.allclose(depth[sky], st.clip_planes(model)[1], rtol=1e-4)  # nothing: the far plane
        # our conversion of the raw buffer equals mujoco.Renderer's own metric depth
        assert np.allclose(depth, renders[f"metric{t}"], rtol=1e-4)  # (mujoco converts in float32)


def test_render_based_tracks_equal_ray_tracks(renders, raycast_clip):
    r = raycast_clip
    model = r["model"]
    maps = [rendered_maps(renders, model, t) for t in range(len(r["qpos"]))]
    clip = st.clip_tracks(query_grid(), maps[0][0], maps[0][1], r["K"], r["cameras"], r["body_pos"], r["body_rot"],
                          depth_maps=np.stack([m[1] for m in maps]), sky_depth=st.clip_planes(model)[1])
    same = clip.body_ids == r["clip"].body_ids
    assert same.mean() > 0.98
    assert np.abs(clip.tracks[:, same] - r["clip"].tracks[:, same]).max() < 0.05
    assert (clip.visible[:, same] == r["clip"].visible[:, same]).mean() > 0.97
    # rendered segmentation at the predicted pixel of visible box points shows the box
    box = model.body("box").id
    for t in range(1, len(r["qpos"])):
        points = clip.visible[t] & (clip.body_ids == box)
        assert (st.lookup(maps[t][0], clip.tracks[t][points]) == box).mean() > 0.9  # the rest: on the silhouette
