"""The synthetic scene world: the generator's configuration, what a scene holds, and how scenes are drawn at random.

Every scene is a 2-D rigid-body world (simulated with pymunk in :mod:`.synthetic`, rendered by :mod:`.render`). The
image shows the *visible* state (:class:`SceneLayout`: shapes, colours, positions, angles, the motion blur of fast
bodies); a *hidden* state (:class:`HiddenState`: initial velocity perturbations, the sign of a blurred body's
velocity, friction, restitution, density) is drawn per rollout, so one image has several possible futures.

Scene kinds (:data:`SCENE_KINDS`):

``fall``    1-3 bodies released in the air (plus 0-2 resting on the ground): they fall, bounce, topple, collide.
``stack``   a stack of 2-3 boxes with random overhangs: it stands or falls (near the tipping point the hidden
            perturbation decides).
``topple``  a tall box standing tilted on one corner: it falls back onto its base or topples over.
``ramp``    a ball or box on a fixed wedge: it rolls or slides down (or, a box with enough friction, stays).
``slide``   bodies on the ground with visible motion blur: speed and axis are visible, the direction and friction
            are not.
``rest``    everything rests on the ground (flat boxes, balls, well-centred stacks): nothing moves.

Coordinates are image pixels with ``y`` pointing down (gravity is ``+y``), a pixel's centre at ``index + 0.5``.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from traj_forecast_ros.geometry import query_grid

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


# ------------------------------------------------------------------------------------------------ body geometry
def _box_corners(width: float, height: float, angle: float) -> np.ndarray:
    """``[4, 2]`` corners of a centred box rotated by ``angle`` (pymunk rotation)."""
    local = np.array([[-width, -height], [width, -height], [width, height], [-width, height]]) * 0.5
    return local @ rotation_matrix(angle).T


def rotation_matrix(angle: float) -> np.ndarray:
    """2x2 matrix of pymunk's ``local_to_world`` rotation."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def body_local_coordinates(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """World points ``[..., 2]`` into the frame of a body at ``pose`` (x, y, angle)."""
    rotation = rotation_matrix(float(pose[2]))
    return (points - pose[:2]) @ rotation  # R^T (p - c), row-vector form


def body_contains(body: BodySpec, local: np.ndarray) -> np.ndarray:
    """Boolean mask: which body-local points ``[..., 2]`` lie inside the body."""
    if body.shape == "ball":
        return (local**2).sum(-1) <= body.size[0] ** 2
    return (np.abs(local[..., 0]) <= 0.5 * body.size[0]) & (np.abs(local[..., 1]) <= 0.5 * body.size[1])



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
