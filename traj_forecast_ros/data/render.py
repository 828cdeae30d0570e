"""Rendering of a synthetic scene to an RGB image: sky and ground gradients with light texture, shaded and textured
bodies, symmetric motion blur, supersampled and box-filtered for anti-aliasing."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from traj_forecast_ros.data.scenes import BodySpec, GeneratorConfig, SceneLayout, body_contains, body_local_coordinates

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
