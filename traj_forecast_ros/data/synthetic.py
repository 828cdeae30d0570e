"""Physics-based synthetic scenes with exact dense ground-truth point trajectories.

Every scene is a 2-D rigid-body world simulated with pymunk and rendered to an RGB image (light texture and shading,
supersampled for anti-aliasing). The image shows the *visible* state (shapes, colours, positions, angles, the motion
blur of fast bodies); a *hidden* state (initial velocity perturbations, the sign of a blurred body's velocity,
friction, restitution, density) is drawn per rollout, so one image has several possible futures.

Scene kinds (:data:`SCENE_KINDS`):

``fall``    1-3 bodies released in the air (plus 0-2 resting on the ground): they fall, bounce, topple, collide.
``stack``   a stack of 2-3 boxes with random overhangs: it stands or falls (near the tipping point the hidden
            perturbation decides).
``topple``  a tall box standing tilted on one corner: it falls back onto its base or topples over.
``ramp``    a ball or box on a fixed wedge: it rolls or slides down (or, a box with enough friction, stays).
``slide``   bodies on the ground with visible motion blur: speed and axis are visible, the direction and friction
            are not.
``rest``    everything rests on the ground (flat boxes, balls, well-centred stacks): nothing moves.

Coordinates are image pixels with ``y`` pointing down (gravity is ``+y``), a pixel's centre at ``index + 0.5``. The
ground truth for a query point is the body under it at frame 0 (static background and ramps: id 0, the point stays);
a body point follows its body's rigid transform, ``p_t = c_t + R(theta_t) R(theta_0)^T (p_0 - c_0)``, so body points
move exactly rigidly. Generation is deterministic per ``(seed, index)``.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pymunk

SCENE_KINDS: Tuple[str, ...] = ("fall", "stack", "topple", "ramp", "slide", "rest")
DEFAULT_KIND_WEIGHTS: Dict[str, float] = {
    "fall": 0.22, "stack": 0.16, "topple": 0.12, "ramp": 0.16, "slide": 0.14, "rest": 0.20,
}
STATIC_ID = 0  # object id of the static background (ground, walls, ramps)


# ------------------------------------------------------------------------------------------------ configuration
@dataclass
class GeneratorConfig:
    """Geometry, timing and scene mix of the generator (defaults: the ``demo-blocks`` model)."""

    image_size: int = 128  # square images, pixels
    num_frames: int = 12  # T, including frame 0
    frame_interval_s: float = 0.06  # simulated seconds between frames
    substeps: int = 24  # physics steps per frame
    query_grid: Tuple[int, int] = (32, 32)  # (rows, cols)
    query_stride: float = 4.0
    query_offset: float = 1.5
    rollouts: int = 1  # ground-truth futures per image (different hidden state)
    gravity: float = 400.0  # pixels / s^2
    supersample: int = 2  # render at this factor, then box-filter down
    exposure_s: float = 0.06  # shutter time of the motion blur
    kind_weights: Dict[str, float] = field(default_factory=lambda: dict(DEFAULT_KIND_WEIGHTS))

    def __post_init__(self) -> None:
        unknown = set(self.kind_weights) - set(SCENE_KINDS)
        if unknown:
            raise ValueError(f"unknown scene kinds {sorted(unknown)}; choose from {SCENE_KINDS}")
        if sum(self.kind_weights.values()) <= 0:
            raise ValueError("kind_weights must contain a positive weight")
        if self.num_frames < 2 or self.rollouts < 1 or self.substeps < 1 or self.supersample < 1:
            raise ValueError("num_frames >= 2, rollouts >= 1, substeps >= 1 and supersample >= 1 are required")
        self.query_grid = (int(self.query_grid[0]), int(self.query_grid[1]))

    def query_points(self) -> np.ndarray:
        """``[Hq, Wq, 2]`` float32 query grid (x, y): ``offset + stride * index``."""
        from traj_forecast_ros.geometry import query_grid

        return query_grid(self)


# ------------------------------------------------------------------------------------------------ scene state
@dataclass
class BodySpec:
    """The visible state of one dynamic body."""

    shape: str  # "box" or "ball"
    size: Tuple[float, float]  # box: (width, height); ball: (radius, radius)
    position: Tuple[float, float]  # centre of mass (x, y)
    angle: float  # radians (pymunk convention: rotation of body axes into world axes)
    color: Tuple[float, float, float]  # RGB in [0, 1]
    pattern: int  # texture variant (0 stripe, 1 two-tone, 2 quadrants)
    blur_velocity: Tuple[float, float] = (0.0, 0.0)  # visible speed and axis (direction hidden)


@dataclass
class SceneLayout:
    """Everything the image shows: bodies, static wedges, ground height, background look."""

    kind: str
    bodies: List[BodySpec]
    ramps: List[np.ndarray]  # static convex polygons [n, 2] (x, y), counter-clockwise on screen irrelevant
    ground_y: float
    sky_colors: Tuple[Tuple[float, float, float], Tuple[float, float, float]]
    ground_color: Tuple[float, float, float]
    texture_seed: int


@dataclass
class HiddenState:
    """Per-rollout quantities the image does not show."""

    velocities: np.ndarray  # [n, 2] px/s
    angular_velocities: np.ndarray  # [n] rad/s
    friction: np.ndarray  # [n]
    elasticity: np.ndarray  # [n]
    density: np.ndarray  # [n]


@dataclass
class SyntheticSample:
    """One generated scene: the image, ``R`` ground-truth futures of the query grid and per-point object ids."""

    image: np.ndarray  # [H, W, 3] uint8, frame 0
    tracks: np.ndarray  # [R, T, Hq, Wq, 2] float32 pixels (x, y)
    object_ids: np.ndarray  # [Hq, Wq] int16, 0 = static background, k = k-th body
    kind: str
    poses: np.ndarray  # [R, T, n, 3] (x, y, angle) of every body
    frames: Optional[np.ndarray] = None  # [T, H, W, 3] uint8 of rollout 0 (only when asked)


# ------------------------------------------------------------------------------------------------ sampling
def _random_color(rng: np.random.Generator) -> Tuple[float, float, float]:
    hue = rng.uniform(0.0, 1.0)
    return colorsys.hsv_to_rgb(hue, rng.uniform(0.45, 0.9), rng.uniform(0.55, 0.95))


def _random_body(rng: np.random.Generator, shape: Optional[str] = None) -> BodySpec:
    shape = shape or ("box" if rng.uniform() < 0.65 else "ball")
    if shape == "box":
        size = (float(rng.uniform(22, 40)), float(rng.uniform(18, 36)))
    else:
        radius = float(rng.uniform(11, 18))
        size = (radius, radius)
    return BodySpec(shape, size, (0.0, 0.0), 0.0, _random_color(rng), int(rng.integers(0, 3)))


def _bounding_radius(body: BodySpec) -> float:
    if body.shape == "ball":
        return body.size[0]
    return 0.5 * math.hypot(*body.size)


def _free_x(rng: np.random.Generator, half_width: float, taken: List[Tuple[float, float]], size: int,
            gap: float = 2.0, tries: int = 50) -> Optional[float]:
    """A centre x whose interval ``[x - half_width, x + half_width]`` avoids ``taken`` intervals, or None."""
    for _ in range(tries):
        x = float(rng.uniform(half_width + 2, size - half_width - 2))
        if all(x + half_width + gap < lo or x - half_width - gap > hi for lo, hi in taken):
            taken.append((x - half_width, x + half_width))
            return x
    return None


def _place_on_ground(rng: np.random.Generator, ground_y: float, size: int, taken: List[Tuple[float, float]],
                     count: int) -> List[BodySpec]:
    """Up to ``count`` bodies resting flat on the ground at free x positions."""
    bodies = []
    for _ in range(count):
        body = _random_body(rng)
        if body.shape == "box" and rng.uniform() < 0.3:
            body.angle = math.pi / 2  # lying on its other side: swap the visual extents
            width, height = body.size[1], body.size[0]
        else:
            width, height = (2 * body.size[0],) * 2 if body.shape == "ball" else body.size
        x = _free_x(rng, 0.5 * width, taken, size)
        if x is None:
            continue
        body.position = (x, ground_y - 0.5 * height)
        bodies.append(body)
    return bodies


def _scene_fall(rng: np.random.Generator, size: int, ground_y: float) -> Tuple[List[BodySpec], List[np.ndarray]]:
    """Bodies released in the air above 0-2 resting ones."""
    taken: List[Tuple[float, float]] = []
    bodies = _place_on_ground(rng, ground_y, size, taken, int(rng.integers(0, 3)))
    airborne: List[BodySpec] = []
    for _ in range(int(rng.integers(1, 3))):
        body = _random_body(rng)
        radius = _bounding_radius(body)
        for _ in range(50):
            x = rng.uniform(radius + 2, size - radius - 2)
            y = rng.uniform(radius + 4, ground_y - radius - 25)
            if all(math.hypot(x - o.position[0], y - o.position[1]) > radius + _bounding_radius(o) + 2
                   for o in bodies + airborne):
                body.position = (float(x), float(y))
                body.angle = float(rng.uniform(-math.pi, math.pi))
                airborne.append(body)
                break
    return bodies + airborne, []


def _scene_stack(rng: np.random.Generator, size: int, ground_y: float, max_overhang: float = 0.65
                 ) -> Tuple[List[BodySpec], List[np.ndarray]]:
    """A stack of 2-3 boxes with random overhangs, plus maybe a resting body beside it."""
    levels = int(rng.integers(2, 4))
    bodies: List[BodySpec] = []
    x = float(rng.uniform(30, size - 30))
    top = ground_y
    below_width = None
    for _ in range(levels):
        body = _random_body(rng, "box")
        width, height = body.size
        if top - height < 8:  # keep the whole stack in view
            break
        if below_width is not None:
            x = x + float(rng.uniform(-max_overhang, max_overhang)) * below_width
        x = min(max(x, 0.5 * width + 2), size - 0.5 * width - 2)
        body.position = (x, top - 0.5 * height)
        bodies.append(body)
        top -= height
        below_width = width
    taken = [(b.position[0] - 0.5 * b.size[0], b.position[0] + 0.5 * b.size[0]) for b in bodies]
    bodies += _place_on_ground(rng, ground_y, size, taken, int(rng.integers(0, 2)))
    return bodies, []


def _scene_topple(rng: np.random.Generator, size: int, ground_y: float) -> Tuple[List[BodySpec], List[np.ndarray]]:
    """A tall box standing tilted on one corner (plus maybe a resting body)."""
    body = _random_body(rng, "box")
    width, height = float(rng.uniform(12, 20)), float(rng.uniform(36, 52))
    body.size = (width, height)
    tilt = float(rng.uniform(-0.5, 0.5))
    body.angle = tilt
    # Rest the lowest corner on the ground: centre sits at the max corner depth above it.
    corners = _box_corners(width, height, tilt)  # [4, 2] relative to the centre
    x = float(rng.uniform(25, size - 25))
    body.position = (x, ground_y - float(corners[:, 1].max()))
    taken = [(x - 0.5 * height, x + 0.5 * height)]
    others = _place_on_ground(rng, ground_y, size, taken, int(rng.integers(0, 2)))
    return [body] + others, []


def _scene_ramp(rng: np.random.Generator, size: int, ground_y: float) -> Tuple[List[BodySpec], List[np.ndarray]]:
    """A ball or box near the top of a fixed wedge."""
    height = float(rng.uniform(25, 55))
    length = float(rng.uniform(45, 80))
    left = rng.uniform() < 0.5
    if left:  # high side at the left wall
        ramp = np.array([[0.0, ground_y], [length, ground_y], [0.0, ground_y - height]])
        down = np.array([length, height]) / math.hypot(length, height)
    else:
        ramp = np.array([[size - length, ground_y], [float(size), ground_y], [float(size), ground_y - height]])
        down = np.array([-length, height]) / math.hypot(length, height)
    top = ramp[2]
    normal = np.array([down[1], -down[0]]) if left else np.array([-down[1], down[0]])  # points away from the wedge
    if normal[1] > 0:
        normal = -normal
    body = _random_body(rng, "ball" if rng.uniform() < 0.65 else "box")
    along = float(rng.uniform(0.15, 0.45)) * math.hypot(length, height)
    contact = top + down * along
    if body.shape == "ball":
        centre = contact + normal * body.size[0]
    else:
        body.size = (float(rng.uniform(16, 26)), float(rng.uniform(16, 26)))
        centre = contact + normal * 0.5 * body.size[1]
        body.angle = math.atan2(down[1], down[0]) if left else math.atan2(-down[1], -down[0])
    body.position = (float(centre[0]), float(centre[1]))
    taken = [(min(ramp[:, 0]), max(ramp[:, 0]))]
    others = _place_on_ground(rng, ground_y, size, taken, int(rng.integers(0, 2)))
    return [body] + others, [ramp]


def _scene_slide(rng: np.random.Generator, size: int, ground_y: float) -> Tuple[List[BodySpec], List[np.ndarray]]:
    """Bodies on the ground with visible motion blur (speed shown, direction hidden)."""
    taken: List[Tuple[float, float]] = []
    bodies = _place_on_ground(rng, ground_y, size, taken, int(rng.integers(1, 3)))
    for body in bodies:
        speed = float(rng.uniform(40, 120))
        body.blur_velocity = (speed, 0.0)
    bodies += _place_on_ground(rng, ground_y, size, taken, int(rng.integers(0, 2)))
    return bodies, []


def _scene_rest(rng: np.random.Generator, size: int, ground_y: float) -> Tuple[List[BodySpec], List[np.ndarray]]:
    """Bodies resting flat on the ground, maybe a well-centred stack: nothing can move."""
    taken: List[Tuple[float, float]] = []
    bodies = _place_on_ground(rng, ground_y, size, taken, int(rng.integers(1, 4)))
    if rng.uniform() < 0.35:  # a stable two-box stack
        base, top = _random_body(rng, "box"), _random_body(rng, "box")
        x = _free_x(rng, 0.5 * max(base.size[0], top.size[0]), taken, size)
        if x is not None:
            base.position = (x, ground_y - 0.5 * base.size[1])
            offset = float(rng.uniform(-0.12, 0.12)) * base.size[0]
            top.position = (x + offset, ground_y - base.size[1] - 0.5 * top.size[1])
            bodies += [base, top]
    return bodies, []


_SCENE_BUILDERS = {
    "fall": _scene_fall, "stack": _scene_stack, "topple": _scene_topple,
    "ramp": _scene_ramp, "slide": _scene_slide, "rest": _scene_rest,
}


def sample_layout(rng: np.random.Generator, config: GeneratorConfig, kind: Optional[str] = None) -> SceneLayout:
    """Draw the visible state of a scene (kind drawn from ``config.kind_weights`` unless given)."""
    if kind is None:
        kinds = [k for k in SCENE_KINDS if config.kind_weights.get(k, 0) > 0]
        weights = np.array([config.kind_weights[k] for k in kinds], dtype=np.float64)
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    if kind not in _SCENE_BUILDERS:
        raise ValueError(f"unknown scene kind '{kind}'; choose from {SCENE_KINDS}")
    size = config.image_size
    ground_y = float(size - rng.uniform(0.09, 0.17) * size)
    bodies, ramps = _SCENE_BUILDERS[kind](rng, size, ground_y)
    sky_top = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.05, 0.25), rng.uniform(0.8, 0.97))
    sky_bottom = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.05, 0.25), rng.uniform(0.7, 0.92))
    ground_color = colorsys.hsv_to_rgb(rng.uniform(0.05, 0.15), rng.uniform(0.2, 0.5), rng.uniform(0.3, 0.55))
    return SceneLayout(kind, bodies, ramps, ground_y, (sky_top, sky_bottom), ground_color,
                       int(rng.integers(0, 2**31 - 1)))


def sample_hidden(rng: np.random.Generator, layout: SceneLayout) -> HiddenState:
    """Draw one rollout's hidden state for ``layout`` (resting scenes get no velocities)."""
    n = len(layout.bodies)
    velocities = np.zeros((n, 2))
    angular = np.zeros(n)
    if layout.kind == "fall":
        velocities = rng.normal(0.0, 15.0, size=(n, 2))
        angular = rng.uniform(-2.0, 2.0, size=n)
        for i, body in enumerate(layout.bodies):  # bodies already on the ground start at rest
            if body.position[1] + _bounding_radius(body) >= layout.ground_y - 1.0 and body.angle in (0.0, math.pi / 2):
                velocities[i] = 0.0
                angular[i] = 0.0
    elif layout.kind in ("stack", "topple"):
        mover = 0 if layout.kind == "topple" else int(np.argmin([b.position[1] for b in layout.bodies]))
        velocities[mover] = rng.normal(0.0, 8.0 if layout.kind == "stack" else 4.0, size=2)
        velocities[mover, 1] = min(velocities[mover, 1], 0.0)  # never push into the support
        angular[mover] = rng.normal(0.0, 0.4 if layout.kind == "stack" else 0.8)
    elif layout.kind == "ramp":
        body = layout.bodies[0]
        slope = layout.ramps[0]
        left = slope[2, 0] < 1.0
        down = np.array([slope[1, 0] - slope[2, 0], slope[1, 1] - slope[2, 1]]) if left else \
            np.array([slope[0, 0] - slope[2, 0], slope[0, 1] - slope[2, 1]])
        down = down / np.linalg.norm(down)
        velocities[0] = down * rng.uniform(0.0, 40.0)
        if body.shape == "ball":
            angular[0] = 0.0
    elif layout.kind == "slide":
        for i, body in enumerate(layout.bodies):
            if body.blur_velocity != (0.0, 0.0):
                velocities[i] = np.asarray(body.blur_velocity) * (1.0 if rng.uniform() < 0.5 else -1.0)
    return HiddenState(
        velocities=velocities,
        angular_velocities=angular,
        friction=rng.uniform(0.1, 1.0, size=n),
        elasticity=rng.uniform(0.0, 0.4, size=n),
        density=rng.uniform(0.5, 2.0, size=n),
    )


# ------------------------------------------------------------------------------------------------ physics
def _box_corners(width: float, height: float, angle: float) -> np.ndarray:
    """``[4, 2]`` corners of a centred box rotated by ``angle`` (pymunk rotation)."""
    local = np.array([[-width, -height], [width, -height], [width, height], [-width, height]]) * 0.5
    return local @ _rotation(angle).T


def _rotation(angle: float) -> np.ndarray:
    """2x2 matrix of pymunk's ``local_to_world`` rotation."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def simulate(layout: SceneLayout, hidden: HiddenState, config: GeneratorConfig) -> Tuple[np.ndarray, np.ndarray]:
    """Run the physics; return ``(poses [T, n, 3] (x, y, angle), velocities [T, n, 2])`` at every frame."""
    space = pymunk.Space()
    space.gravity = (0.0, config.gravity)
    space.iterations = 30
    size = float(config.image_size)
    static = space.static_body
    ground = pymunk.Poly(static, [(-size, layout.ground_y), (2 * size, layout.ground_y),
                                  (2 * size, layout.ground_y + size), (-size, layout.ground_y + size)])
    walls = [pymunk.Poly(static, [(-size, -4 * size), (0.0, -4 * size), (0.0, 2 * size), (-size, 2 * size)]),
             pymunk.Poly(static, [(size, -4 * size), (2 * size, -4 * size), (2 * size, 2 * size), (size, 2 * size)])]
    statics = [ground, *walls] + [pymunk.Poly(static, [tuple(p) for p in ramp]) for ramp in layout.ramps]
    for shape in statics:
        shape.friction = 0.9
        shape.elasticity = 0.3
    space.add(*statics)

    bodies = []
    for i, spec in enumerate(layout.bodies):
        body = pymunk.Body()
        if spec.shape == "box":
            shape = pymunk.Poly.create_box(body, spec.size)
        else:
            shape = pymunk.Circle(body, spec.size[0])
        shape.density = float(hidden.density[i])
        shape.friction = float(hidden.friction[i])
        shape.elasticity = float(hidden.elasticity[i])
        body.position = spec.position
        body.angle = spec.angle
        body.velocity = tuple(float(v) for v in hidden.velocities[i])
        body.angular_velocity = float(hidden.angular_velocities[i])
        space.add(body, shape)
        bodies.append(body)

    n = len(bodies)
    poses = np.zeros((config.num_frames, n, 3))
    velocities = np.zeros((config.num_frames, n, 2))
    dt = config.frame_interval_s / config.substeps
    for frame in range(config.num_frames):
        if frame > 0:
            for _ in range(config.substeps):
                space.step(dt)
        for i, body in enumerate(bodies):
            poses[frame, i] = (body.position.x, body.position.y, body.angle)
            velocities[frame, i] = (body.velocity.x, body.velocity.y)
    return poses, velocities


def body_local_coordinates(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """World points ``[..., 2]`` into the frame of a body at ``pose`` (x, y, angle)."""
    rotation = _rotation(float(pose[2]))
    return (points - pose[:2]) @ rotation  # R^T (p - c), row-vector form


def body_contains(body: BodySpec, local: np.ndarray) -> np.ndarray:
    """Boolean mask: which body-local points ``[..., 2]`` lie inside the body."""
    if body.shape == "ball":
        return (local**2).sum(-1) <= body.size[0] ** 2
    return (np.abs(local[..., 0]) <= 0.5 * body.size[0]) & (np.abs(local[..., 1]) <= 0.5 * body.size[1])


def object_ids_at(points: np.ndarray, layout: SceneLayout, poses: np.ndarray) -> np.ndarray:
    """``[...]`` int16 id of the body under each point (``k`` = body ``k - 1``, drawn last wins; 0 = static)."""
    ids = np.zeros(points.shape[:-1], dtype=np.int16)
    for k, body in enumerate(layout.bodies):
        inside = body_contains(body, body_local_coordinates(points, poses[k]))
        ids[inside] = k + 1
    return ids


def rigid_tracks(query_points: np.ndarray, object_ids: np.ndarray, poses: np.ndarray) -> np.ndarray:
    """``[T, Hq, Wq, 2]``: each point follows its body's transform; static points (id 0) stay.

    ``p_t = c_t + R(theta_t) R(theta_0)^T (p_0 - c_0)`` with body poses ``[T, n, 3]``.
    """
    num_frames = poses.shape[0]
    tracks = np.broadcast_to(query_points, (num_frames, *query_points.shape)).astype(np.float64).copy()
    for k in range(poses.shape[1]):
        mask = object_ids == k + 1
        if not mask.any():
            continue
        local = body_local_coordinates(query_points[mask], poses[0, k])  # [m, 2]
        for t in range(num_frames):
            tracks[t][mask] = poses[t, k, :2] + local @ _rotation(float(poses[t, k, 2])).T
    return tracks.astype(np.float32)


# ------------------------------------------------------------------------------------------------ rendering
def _value_noise(rng: np.random.Generator, shape: Tuple[int, int], cells: int) -> np.ndarray:
    """Smooth noise in [-1, 1] of ``shape``: a coarse random grid bilinearly upsampled."""
    coarse = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1))
    ys = np.linspace(0, cells, shape[0])
    xs = np.linspace(0, cells, shape[1])
    y0 = np.minimum(ys.astype(int), cells - 1)
    x0 = np.minimum(xs.astype(int), cells - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _body_color(body: BodySpec, local: np.ndarray, world_y: np.ndarray, center_y: float) -> np.ndarray:
    """``[m, 3]`` shaded colour of body pixels: texture in the body frame, light from above in the world frame."""
    base = np.asarray(body.color)
    extent = max(body.size)
    shade = 1.0 - 0.18 * (world_y - center_y) / extent  # brighter towards the top of the screen
    if body.shape == "ball":
        radius = body.size[0]
        r2 = (local**2).sum(-1) / radius**2
        shade = shade * (1.05 - 0.35 * r2)
        edge = r2 > (1.0 - 1.6 / radius) ** 2
    else:
        half_w, half_h = 0.5 * body.size[0], 0.5 * body.size[1]
        edge = (np.abs(local[:, 0]) > half_w - 1.0) | (np.abs(local[:, 1]) > half_h - 1.0)
    if body.pattern == 0:  # a stripe through the centre
        texture = np.where(np.abs(local[:, 1]) < 0.18 * extent, 1.25, 1.0)
    elif body.pattern == 1:  # two tones split along the body x axis
        texture = np.where(local[:, 0] > 0, 1.18, 0.9)
    else:  # quadrants
        texture = np.where((local[:, 0] > 0) ^ (local[:, 1] > 0), 1.15, 0.92)
    color = base[None, :] * (shade * texture)[:, None]
    color[edge] = base * 0.45
    return np.clip(color, 0.0, 1.0)


def render(layout: SceneLayout, pose: np.ndarray, config: GeneratorConfig,
           blur_velocities: Optional[np.ndarray] = None) -> np.ndarray:
    """Render the scene with bodies at ``pose [n, 3]`` to ``[H, W, 3]`` uint8.

    ``blur_velocities [n, 2]`` (px/s) smears each body over ``config.exposure_s`` centred on its pose (symmetric,
    so the image shows a body's speed and axis of motion but not its direction).
    """
    size, ss = config.image_size, config.supersample
    full = size * ss
    centres = (np.arange(full) + 0.5) / ss  # pixel centres in image coordinates
    grid_x, grid_y = np.meshgrid(centres, centres, indexing="xy")  # [F, F] each
    points = np.stack([grid_x, grid_y], axis=-1)  # [F, F, 2]
    texture_rng = np.random.default_rng(layout.texture_seed)

    top, bottom = (np.asarray(c) for c in layout.sky_colors)
    mix = (grid_y / size)[..., None]
    image = top * (1 - mix) + bottom * mix  # [F, F, 3]
    image = image * (1.0 + 0.05 * _value_noise(texture_rng, (full, full), 6))[..., None]
    ground = grid_y >= layout.ground_y
    ground_texture = 1.0 + 0.08 * _value_noise(texture_rng, (full, full), 24) + 0.05 * np.sin(grid_x * 0.9)
    ground_shade = np.asarray(layout.ground_color) * ground_texture[..., None]
    ground_shade[grid_y < layout.ground_y + 1.0] *= 0.7  # darker edge line at the surface
    image = np.where(ground[..., None], ground_shade, image)

    for ramp in layout.ramps:
        inside = _inside_convex(points, ramp)
        grain = 1.0 + 0.06 * _value_noise(texture_rng, (full, full), 10)
        ramp_color = np.array([0.55, 0.52, 0.48]) * grain[..., None]
        image = np.where(inside[..., None], ramp_color, image)

    for k, body in enumerate(layout.bodies):
        velocity = np.zeros(2) if blur_velocities is None else np.asarray(blur_velocities[k], dtype=np.float64)
        blur_px = float(np.linalg.norm(velocity)) * config.exposure_s
        copies = 1 if blur_px < 0.5 else int(min(15, math.ceil(blur_px * ss)) + 1)
        offsets = np.linspace(-0.5, 0.5, copies) if copies > 1 else np.zeros(1)
        coverage = np.zeros((full, full))
        color_sum = np.zeros((full, full, 3))
        for offset in offsets:
            pose_k = pose[k].copy()
            pose_k[:2] += velocity * config.exposure_s * offset
            local = body_local_coordinates(points, pose_k)  # [F, F, 2]
            inside = body_contains(body, local)
            if not inside.any():
                continue
            coverage[inside] += 1.0
            color_sum[inside] += _body_color(body, local[inside], grid_y[inside], pose_k[1])
        alpha = (coverage / len(offsets))[..., None]
        color = np.where(coverage[..., None] > 0, color_sum / np.maximum(coverage, 1.0)[..., None], 0.0)
        image = image * (1 - alpha) + color * alpha

    image = image.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))  # box filter to the output size
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _inside_convex(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Which points ``[..., 2]`` lie inside a convex polygon ``[n, 2]`` (either winding)."""
    signs = []
    for a, b in zip(polygon, np.roll(polygon, -1, axis=0)):
        edge = b - a
        rel = points - a
        signs.append(edge[0] * rel[..., 1] - edge[1] * rel[..., 0])
    signs = np.stack(signs)
    return (signs >= 0).all(0) | (signs <= 0).all(0)


# ------------------------------------------------------------------------------------------------ public API
def generate_sample(seed: int, index: int, config: GeneratorConfig, kind: Optional[str] = None,
                    render_frames: bool = False) -> SyntheticSample:
    """Generate scene ``index`` of the stream ``seed`` (deterministic), with ``config.rollouts`` futures."""
    layout_rng = np.random.default_rng([seed, index, 0])
    layout = sample_layout(layout_rng, config, kind)
    query = config.query_points()
    rest_pose = np.array([[*b.position, b.angle] for b in layout.bodies]).reshape(-1, 3)
    blur = np.array([b.blur_velocity for b in layout.bodies], dtype=np.float64).reshape(-1, 2)
    image = render(layout, rest_pose, config, blur_velocities=blur)
    object_ids = object_ids_at(query.astype(np.float64), layout, rest_pose)

    all_tracks, all_poses, frames = [], [], None
    for rollout in range(config.rollouts):
        hidden = sample_hidden(np.random.default_rng([seed, index, rollout + 1]), layout)
        poses, velocities = simulate(layout, hidden, config)
        all_poses.append(poses)
        all_tracks.append(rigid_tracks(query.astype(np.float64), object_ids, poses))
        if render_frames and rollout == 0:
            frames = np.stack([image] + [render(layout, poses[t], config, velocities[t])
                                         for t in range(1, config.num_frames)])
    return SyntheticSample(
        image=image,
        tracks=np.stack(all_tracks),
        object_ids=object_ids,
        kind=layout.kind,
        poses=np.stack(all_poses),
        frames=frames,
    )


def generate_samples(seed: int, count: int, config: GeneratorConfig, start: int = 0,
                     kinds: Optional[Sequence[str]] = None) -> List[SyntheticSample]:
    """``count`` consecutive scenes ``start .. start + count - 1`` of stream ``seed`` (``kinds`` cycles if given)."""
    return [
        generate_sample(seed, start + i, config, kind=None if not kinds else kinds[(start + i) % len(kinds)])
        for i in range(count)
    ]


def write_dataset(root, num_scenes: int, seed: int, config: GeneratorConfig, shard_size: int = 256,
                  render_frames: bool = False, kinds: Optional[Sequence[str]] = None, progress: bool = False,
                  overwrite: bool = False):
    """Generate scenes ``0 .. num_scenes - 1`` of stream ``seed`` into a sharded dataset at ``root``.

    ``kinds`` (optional) cycles through the given scene kinds instead of drawing them. Returns the index path.
    """
    from dataclasses import asdict

    from traj_forecast_ros.data.dataset import DatasetMeta, DatasetWriter

    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    meta = DatasetMeta(
        image_size=(config.image_size, config.image_size),
        query_grid=config.query_grid,
        query_stride=config.query_stride,
        query_offset=config.query_offset,
        num_frames=config.num_frames,
        num_rollouts=config.rollouts,
        frame_interval_s=config.frame_interval_s,
        kinds=list(SCENE_KINDS),
        source={"generator": "traj_forecast_ros.data.synthetic", "seed": int(seed), "config": asdict(config),
                "kinds_cycled": list(kinds) if kinds else None},
    )
    indices = range(num_scenes)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="scenes", unit="scene")
    with DatasetWriter(root, meta, shard_size=shard_size, overwrite=overwrite) as writer:
        for index in indices:
            kind = kinds[index % len(kinds)] if kinds else None
            sample = generate_sample(seed, index, config, kind=kind, render_frames=render_frames)
            writer.add(sample.image, sample.tracks, object_ids=sample.object_ids, kind=sample.kind,
                       frames=sample.frames)
    return writer.close()
