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
    "SquareNut": "the square nut", "RoundNut": "the round nut",
}
PUSH_DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "forward": (1.0, 0.0), "back": (-1.0, 0.0)}
BIN_CELLS = {"back left": (-1, -1), "back right": (-1, 1), "front left": (1, -1), "front right": (1, 1)}
PEGS = {"square": "peg1", "round": "peg2"}  # NutAssembly's peg bodies
GRIPPER_OPEN, GRIPPER_CLOSED = -1.0, 1.0
BIN_OBJECTS = ("the milk carton", "the bread", "the cereal box", "the can")


# ------------------------------------------------------------------------------------------------ instructions
def all_instructions() -> List[str]:
    """The closed instruction set (every string an episode can carry), in a fixed order.

    New instructions are appended at the end, so the ids of the older ones stay the same."""
    texts: List[str] = []
    for obj in ("the red cube", "the green cube", *BIN_OBJECTS):
        texts.append(f"reach for {obj}")
        texts.append(f"pick up {obj}")
        texts += [push_instruction(obj, d) for d in PUSH_DIRECTIONS]
    texts += ["put the red cube on the green cube", "put the green cube on the red cube"]
    for obj in BIN_OBJECTS:
        texts += [f"put {obj} in the {cell} of the right bin" for cell in BIN_CELLS]
    texts += ["reach for the door handle", "open the door"]
    for obj in ("the square nut", "the round nut"):
        texts.append(f"reach for {obj}")
        texts.append(f"pick up {obj}")
        texts += [push_instruction(obj, d) for d in PUSH_DIRECTIONS]
        texts += [f"put {obj} on the {peg} peg" for peg in PEGS]
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
    """What one episode does: the goal, drawn once (:func:`draw_goal`). The waypoints that reach it are computed
    from the state the robot starts from (:func:`goal_waypoints`), so one goal can be rolled out from any state."""

    scene: str
    kind: str
    instruction: str
    speed: float  # max |action| per axis (OSC delta: 1 = 5 cm per control step)
    target: str = ""  # object name (or "door")
    goal: str = ""  # direction / bin cell / other object / peg
    lift: float = 0.18  # pick_lift: how high the object is lifted (metres)
    distance: float = 0.12  # push: how far the object is pushed (metres)


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
    """World position of each movable task object still in the scene (a nut: its handle, where it is grasped)."""
    sim = env.sim
    positions = {}
    if hasattr(env, "nuts"):
        for nut, site in zip(env.nuts, env.object_site_ids):
            positions[nut.name] = np.array(sim.data.site_xpos[site])
        return positions
    in_use = getattr(env, "obj_to_use", None)  # PickPlace single-object mode: the others are cleared away
    for obj in getattr(env, "objects", None) or _scene_objects(env):
        if in_use is None or obj.name == in_use:
            positions[obj.name] = np.array(sim.data.body_xpos[sim.model.body_name2id(obj.root_body)])
    return positions


def _scene_objects(env) -> List[Any]:
    if hasattr(env, "cubeA"):
        return [env.cubeA, env.cubeB]
    if hasattr(env, "cube"):
        return [env.cube]
    return []


def _goal_kinds(scene: str) -> List[str]:
    """Task kinds a scene offers (a kind listed twice is drawn twice as often)."""
    if scene in ("pick_place", "pick_place_single"):
        return ["reach", "pick_lift", "pick_place", "pick_place"]  # no pushing inside a bin
    if scene in ("stack", "nut_assembly"):
        return ["reach", "pick_lift", "push", "pick_place"]
    return ["reach", "pick_lift", "push"]


def draw_goal(rng: np.random.Generator, scene: str, env) -> EpisodePlan:
    """Draw a task and goal for the scene's current state (every random choice of the episode is made here)."""
    speed = float(rng.uniform(0.3, 0.6))
    if scene == "door":
        if rng.random() < 0.3:
            return EpisodePlan(scene, "reach", "reach for the door handle", speed, "door")
        return EpisodePlan(scene, "door", "open the door", speed, "door")
    names = sorted(_object_positions(env))
    kind = str(rng.choice(_goal_kinds(scene)))
    name = str(rng.choice(names))
    word = OBJECT_WORDS.get(name, f"the {name.lower()}")
    if kind == "reach":
        return EpisodePlan(scene, kind, f"reach for {word}", speed, name)
    if kind == "pick_lift":
        return EpisodePlan(scene, kind, f"pick up {word}", speed, name, lift=float(rng.uniform(0.12, 0.25)))
    if kind == "push":
        direction = str(rng.choice(sorted(PUSH_DIRECTIONS)))
        return EpisodePlan(scene, kind, push_instruction(word, direction), speed, name, direction,
                           distance=float(rng.uniform(0.08, 0.15)))
    if scene == "stack":
        other = [n for n in names if n != name][0]
        return EpisodePlan(scene, kind, f"put {word} on {OBJECT_WORDS[other]}", speed, name, other)
    if scene == "nut_assembly":
        peg = str(rng.choice(sorted(PEGS)))
        return EpisodePlan(scene, kind, f"put {word} on the {peg} peg", speed, name, peg)
    cell = str(rng.choice(sorted(BIN_CELLS)))
    return EpisodePlan(scene, kind, f"put {word} in the {cell} of the right bin", speed, name, cell)


def draw_distinct_goals(rng: np.random.Generator, scene: str, env, count: int, parting_m: float = 0.0,
                        max_tries: int = 64) -> List[EpisodePlan]:
    """Up to ``count`` goals with pairwise different instructions for the scene's current state (fewer only when
    the scene offers fewer within ``max_tries`` draws).

    ``parting_m > 0`` asks for goals whose futures part at once: the first waypoint of each goal (where its arm
    heads first) lies at least ``parting_m`` metres from every other goal's, so "reach for", "pick up" and "put" the
    same object (one approach) never share a group, and every goal takes the first goal's speed, so that the
    instruction is the only difference between the futures of a group."""
    goals: List[EpisodePlan] = []
    heads: List[np.ndarray] = []
    for _ in range(max_tries):
        if len(goals) == count:
            break
        plan = draw_goal(rng, scene, env)
        if any(plan.instruction == chosen.instruction for chosen in goals):
            continue
        if parting_m > 0:
            if goals:
                plan.speed = goals[0].speed
            head = goal_waypoints(plan, env)[0].position
            if any(np.linalg.norm(head - other) < parting_m for other in heads):
                continue
            heads.append(head)
        goals.append(plan)
    return goals


def goal_waypoints(plan: EpisodePlan, env) -> List[Waypoint]:
    """Waypoints that reach ``plan``'s goal from the environment's current state."""
    above = 0.12
    if plan.scene == "door":
        handle = np.array(env.sim.data.site_xpos[env.door_handle_site_id])
        if plan.kind == "reach":
            return [Waypoint(handle + [-0.08, 0, 0.02], GRIPPER_OPEN), Waypoint(handle, GRIPPER_OPEN, hold=5)]
        return [Waypoint(handle + [-0.08, 0, 0], GRIPPER_OPEN), Waypoint(handle, GRIPPER_OPEN),
                Waypoint(handle, GRIPPER_CLOSED, hold=6)] + _door_arc(env, handle)
    objects = _object_positions(env)
    pos = objects[plan.target]
    grasp = pos + [0.0, 0.0, 0.005]
    if plan.kind == "reach":
        return [Waypoint(pos + [0, 0, above], GRIPPER_OPEN), Waypoint(pos + [0, 0, 0.03], GRIPPER_OPEN, hold=8)]
    pick = [Waypoint(grasp + [0, 0, above], GRIPPER_OPEN), Waypoint(grasp, GRIPPER_OPEN),
            Waypoint(grasp, GRIPPER_CLOSED, hold=8)]
    if plan.kind == "pick_lift":
        return pick + [Waypoint(grasp + [0, 0, plan.lift], GRIPPER_CLOSED, hold=6)]
    if plan.kind == "push":
        d = np.array([*PUSH_DIRECTIONS[plan.goal], 0.0])
        start = pos - d * 0.07
        end = pos + d * plan.distance - d * 0.03
        return [Waypoint(start + [0, 0, above], GRIPPER_CLOSED), Waypoint(start, GRIPPER_CLOSED),
                Waypoint(end, GRIPPER_CLOSED, hold=4), Waypoint(end + [0, 0, 0.1], GRIPPER_CLOSED)]
    destination = _place_destination(plan, env, objects, grasp)
    carry = max(float(destination[2]), float(grasp[2])) + 0.12
    return pick + [Waypoint(np.array([*grasp[:2], carry]), GRIPPER_CLOSED),
                   Waypoint(np.array([*destination[:2], carry]), GRIPPER_CLOSED),
                   Waypoint(destination, GRIPPER_CLOSED, hold=2),
                   Waypoint(destination, GRIPPER_OPEN, hold=6),
                   Waypoint(destination + [0, 0, 0.1], GRIPPER_OPEN)]


def _place_destination(plan: EpisodePlan, env, objects: Dict[str, np.ndarray], grasp: np.ndarray) -> np.ndarray:
    """Where the gripper releases a pick-and-place object."""
    if plan.scene == "stack":
        return objects[plan.goal] + [0, 0, 0.05]
    if plan.scene == "nut_assembly":
        sim = env.sim
        nut = next(n for n in env.nuts if n.name == plan.target)
        centre = np.array(sim.data.body_xpos[sim.model.body_name2id(nut.root_body)])
        peg = np.array(sim.data.body_xpos[sim.model.body_name2id(PEGS[plan.goal])])
        handle_to_centre = centre - objects[plan.target]
        destination = peg - handle_to_centre  # the handle's position that puts the nut's hole over the peg
        destination[2] = grasp[2] + 0.1  # release above the peg's top
        return destination
    sx, sy = BIN_CELLS[plan.goal]  # x: +1 front (towards agentview), y: +1 right in agentview
    destination = np.array(env.bin2_pos) + [sx * env.bin_size[0] / 4, sy * env.bin_size[1] / 4, 0.0]
    destination[2] = objects[plan.target][2] + 0.05  # 5 cm above the object's resting height (the bins are level)
    return destination


def plan_episode(rng: np.random.Generator, scene: str, env) -> Tuple[EpisodePlan, List[Waypoint]]:
    """Draw a task and goal for the scene's current state; returns the plan and its waypoints."""
    plan = draw_goal(rng, scene, env)
    return plan, goal_waypoints(plan, env)


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
