"""Scripted manipulation tasks for the simulated dataset: goals, instructions and an OSC waypoint policy.

Used by :mod:`traj_forecast_ros.data.sim_manipulation`. Nothing here imports robosuite: the planners read the
positions they need from the environment object they are given. The instruction set is closed
(:func:`all_instructions`), so a small text encoder can be trained on it offline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

# Words for the objects of each scene (robosuite object name -> phrase). Lift's cube is red; Stack: A red, B green.
OBJECT_WORDS = {
    "cube": "the red cube", "cubeA": "the red cube", "cubeB": "the green cube",
    "Milk": "the milk carton", "Bread": "the bread", "Cereal": "the cereal box", "Can": "the can",
}
PUSH_DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "forward": (1.0, 0.0), "back": (-1.0, 0.0)}
BIN_CELLS = {"back left": (-1, -1), "back right": (-1, 1), "front left": (1, -1), "front right": (1, 1)}
GRIPPER_OPEN, GRIPPER_CLOSED = -1.0, 1.0


# ------------------------------------------------------------------------------------------------ instructions
def all_instructions() -> List[str]:
    """The closed instruction set (every string an episode can carry), in a fixed order."""
    texts: List[str] = []
    for obj in ("the red cube", "the green cube", "the milk carton", "the bread", "the cereal box", "the can"):
        texts.append(f"reach for {obj}")
        texts.append(f"pick up {obj}")
        texts += [f"push {obj} {'to the ' + d if d in ('left', 'right') else d}" for d in PUSH_DIRECTIONS]
    texts += ["put the red cube on the green cube", "put the green cube on the red cube"]
    for obj in ("the milk carton", "the bread", "the cereal box", "the can"):
        texts += [f"put {obj} in the {cell} of the right bin" for cell in BIN_CELLS]
    texts += ["reach for the door handle", "open the door"]
    return texts


def push_instruction(obj_word: str, direction: str) -> str:
    """"push the can to the left" / "push the can forward"."""
    return f"push {obj_word} {'to the ' + direction if direction in ('left', 'right') else direction}"


# ------------------------------------------------------------------------------------------------ scripted policy
@dataclass
class Waypoint:
    """Move the end effector to ``position`` with the gripper command ``gripper``, then wait ``hold`` steps."""

    position: np.ndarray  # [3] world metres
    gripper: float
    hold: int = 0
    tolerance: float = 0.012  # metres


@dataclass
class EpisodePlan:
    """What one episode does."""

    scene: str
    kind: str
    instruction: str
    speed: float  # max |action| per axis (OSC delta: 1 = 5 cm per control step)
    target: str = ""  # object name (or "door")
    goal: str = ""  # direction / bin cell / other object


class ScriptedPolicy:
    """Proportional OSC_POSE delta actions through a list of waypoints (orientation held, gripper per waypoint)."""

    def __init__(self, waypoints: Sequence[Waypoint], speed: float, max_steps_per_waypoint: int = 60) -> None:
        self.waypoints = list(waypoints)
        self.speed = float(speed)
        self.max_steps = max_steps_per_waypoint
        self.index = 0
        self._steps_here = 0
        self._held = 0

    @property
    def done(self) -> bool:
        return self.index >= len(self.waypoints)

    def act(self, eef_pos: np.ndarray) -> np.ndarray:
        """The 7-D action (dx, dy, dz, dax, day, daz, gripper) for the current end-effector position."""
        action = np.zeros(7)
        if self.done:
            action[6] = self.waypoints[-1].gripper if self.waypoints else GRIPPER_OPEN
            return action
        waypoint = self.waypoints[self.index]
        error = waypoint.position - eef_pos
        action[:3] = np.clip(error / 0.05, -self.speed, self.speed)
        action[6] = waypoint.gripper
        self._steps_here += 1
        if np.linalg.norm(error) < waypoint.tolerance or self._steps_here >= self.max_steps:
            self._held += 1
            if self._held > waypoint.hold:
                self.index += 1
                self._steps_here = 0
                self._held = 0
        return action


def _object_positions(env) -> Dict[str, np.ndarray]:
    """World position of each movable task object's root body."""
    sim = env.sim
    positions = {}
    for obj in getattr(env, "objects", None) or _scene_objects(env):
        positions[obj.name] = np.array(sim.data.body_xpos[sim.model.body_name2id(obj.root_body)])
    return positions


def _scene_objects(env) -> List[Any]:
    if hasattr(env, "cubeA"):
        return [env.cubeA, env.cubeB]
    if hasattr(env, "cube"):
        return [env.cube]
    return []


def plan_episode(rng: np.random.Generator, scene: str, env) -> Tuple[EpisodePlan, List[Waypoint]]:
    """Draw a task and goal for the scene's current state; returns the plan and its waypoints."""
    speed = float(rng.uniform(0.3, 0.6))
    above = 0.12
    if scene == "door":
        handle = np.array(env.sim.data.site_xpos[env.door_handle_site_id])
        if rng.random() < 0.3:
            plan = EpisodePlan(scene, "reach", "reach for the door handle", speed, "door")
            return plan, [Waypoint(handle + [-0.08, 0, 0.02], GRIPPER_OPEN), Waypoint(handle, GRIPPER_OPEN, hold=5)]
        plan = EpisodePlan(scene, "door", "open the door", speed, "door")
        return plan, [Waypoint(handle + [-0.08, 0, 0], GRIPPER_OPEN), Waypoint(handle, GRIPPER_OPEN),
                      Waypoint(handle, GRIPPER_CLOSED, hold=6)] + _door_arc(env, handle)
    objects = _object_positions(env)
    names = sorted(objects)
    kinds = ["reach", "pick_lift", "push"] + (["pick_place"] if scene in ("stack", "pick_place") else [])
    if scene == "pick_place":
        kinds = ["reach", "pick_lift", "pick_place", "pick_place"]  # no pushing inside a bin
    kind = str(rng.choice(kinds))
    name = str(rng.choice(names))
    pos = objects[name]
    word = OBJECT_WORDS.get(name, f"the {name.lower()}")
    grasp = pos + [0.0, 0.0, 0.005]
    if kind == "reach":
        plan = EpisodePlan(scene, kind, f"reach for {word}", speed, name)
        return plan, [Waypoint(pos + [0, 0, above], GRIPPER_OPEN), Waypoint(pos + [0, 0, 0.03], GRIPPER_OPEN, hold=8)]
    pick = [Waypoint(grasp + [0, 0, above], GRIPPER_OPEN), Waypoint(grasp, GRIPPER_OPEN),
            Waypoint(grasp, GRIPPER_CLOSED, hold=8)]
    if kind == "pick_lift":
        lift = float(rng.uniform(0.12, 0.25))
        plan = EpisodePlan(scene, kind, f"pick up {word}", speed, name)
        return plan, pick + [Waypoint(grasp + [0, 0, lift], GRIPPER_CLOSED, hold=6)]
    if kind == "push":
        direction = str(rng.choice(sorted(PUSH_DIRECTIONS)))
        d = np.array([*PUSH_DIRECTIONS[direction], 0.0])
        distance = float(rng.uniform(0.08, 0.15))
        start = pos - d * 0.07 + [0, 0, 0.0]
        plan = EpisodePlan(scene, kind, push_instruction(word, direction), speed, name, direction)
        return plan, [Waypoint(start + [0, 0, above], GRIPPER_CLOSED), Waypoint(start, GRIPPER_CLOSED),
                      Waypoint(pos + d * distance - d * 0.03, GRIPPER_CLOSED, hold=4),
                      Waypoint(pos + d * distance - d * 0.03 + [0, 0, 0.1], GRIPPER_CLOSED)]
    # pick and place
    if scene == "stack":
        other = [n for n in names if n != name][0]
        destination = objects[other] + [0, 0, 0.05]
        plan = EpisodePlan(scene, kind, f"put {word} on {OBJECT_WORDS[other]}", speed, name, other)
    else:
        cell = str(rng.choice(sorted(BIN_CELLS)))
        bin_centre = np.array(env.bin2_pos)
        sx, sy = BIN_CELLS[cell]  # x: +1 front (towards agentview), y: +1 right in agentview
        destination = bin_centre + [sx * env.bin_size[0] / 4, sy * env.bin_size[1] / 4, 0.0]
        destination[2] = pos[2] + 0.05  # release 5 cm above the object's resting height (the bins are level)
        plan = EpisodePlan(scene, kind, f"put {word} in the {cell} of the right bin", speed, name, cell)
    carry = max(float(destination[2]), float(grasp[2])) + 0.12
    return plan, pick + [Waypoint(np.array([*grasp[:2], carry]), GRIPPER_CLOSED),
                         Waypoint(np.array([*destination[:2], carry]), GRIPPER_CLOSED),
                         Waypoint(destination, GRIPPER_CLOSED, hold=2),
                         Waypoint(destination, GRIPPER_OPEN, hold=6),
                         Waypoint(destination + [0, 0, 0.1], GRIPPER_OPEN)]


def _door_arc(env, handle: np.ndarray, steps: int = 8) -> List[Waypoint]:
    """Waypoints that swing the handle about the door's hinge by up to 40 degrees, towards the robot."""
    sim = env.sim
    joint = sim.model.joint_name2id(env.door.joints[0])
    anchor = np.array(sim.data.xanchor[joint])
    axis = np.array(sim.data.xaxis[joint])
    base = np.array(env.robots[0].base_pos)
    radial = handle - anchor

    def rotate(angle: float) -> np.ndarray:
        # Rodrigues rotation of the handle about the hinge axis
        c, s = math.cos(angle), math.sin(angle)
        return anchor + radial * c + np.cross(axis, radial) * s + axis * (axis @ radial) * (1 - c)

    sign = 1.0 if np.linalg.norm(rotate(0.2) - base) < np.linalg.norm(rotate(-0.2) - base) else -1.0
    return [Waypoint(rotate(sign * math.radians(40.0) * (i + 1) / steps), GRIPPER_CLOSED) for i in range(steps)]


def eef_position(env) -> np.ndarray:
    """World position of the Panda's end-effector site."""
    robot = env.robots[0]
    site = robot.eef_site_id["right"] if isinstance(robot.eef_site_id, dict) else robot.eef_site_id
    return np.array(env.sim.data.site_xpos[site])
