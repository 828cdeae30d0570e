"""Checks of the node's parameter values made when a value is set (so a bad value never reaches a transition),
and the escaping used for any user text written to the log."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from rclpy.exceptions import InvalidTopicNameException
from rclpy.expand_topic_name import expand_topic_name
from rclpy.validate_full_topic_name import validate_full_topic_name

from traj_forecast_ros import registry
from traj_forecast_ros.bag.model_choice import SIM_MODEL  # the model shipped in models/: runs offline
from traj_forecast_ros.model.config import CONFIG_FILE
from traj_forecast_ros.ros.cameras import (CAMERAS_PARAMETER, TOPIC_FIELDS, camera_names_problem,
                                           split_camera_parameter)

TOPIC_PARAMETERS = TOPIC_FIELDS  # the node-level topic parameters, validated as ROS names on every set
OPTIONAL_TOPIC_PARAMETERS = frozenset({"camera_info_topic"})  # '' = not used
OPTIONAL_CAMERA_TOPICS = frozenset({"camera_info_topic", "instruction_topic"})  # a camera's: '' = not used
INSTRUCTION_LOG_CHARS = 120  # instructions are logged escaped and cut to this length


def loggable_text(text: str, limit: int = INSTRUCTION_LOG_CHARS) -> str:
    """``text`` for one log line: cut to ``limit`` characters, control and non-ASCII characters escaped, quoted."""
    shown = text[:limit].encode("unicode_escape").decode("ascii").replace("'", "\\'")
    more = f" (+{len(text) - limit} more characters)" if len(text) > limit else ""
    return f"'{shown}'{more}"


def topic_name_problem(parameter: str, topic: str, node_name: str, namespace: str,
                       optional: frozenset = OPTIONAL_TOPIC_PARAMETERS) -> Optional[str]:
    """Why ``topic`` cannot be subscribed to from this node (None when it can): checked when the parameter is set,
    so an invalid name never reaches ``activate``. ``parameter`` may be a camera's ``<camera>.<field>``; the
    fields in ``optional`` may be ''."""
    field = parameter.rpartition(".")[2]
    if not topic and field in optional:
        return None
    names = [topic, f"{topic.rstrip('/')}/compressed"] if field == "image_topic" else [topic]
    try:
        for name in names:
            validate_full_topic_name(expand_topic_name(name, node_name, namespace))
    except (InvalidTopicNameException, ValueError) as exc:
        return f"'{parameter}' is not a valid topic name: {loggable_text(topic, 80)} ({str(exc).splitlines()[0]})"
    return None


def model_problem(model: str) -> Optional[str]:
    """Why ``model`` names no model (None when it is a registry name or a directory holding config.yaml). Nothing is
    loaded here: weights are read at configure, and only from safetensors."""
    path = Path(model).expanduser()
    if path.is_dir():
        return None if (path / CONFIG_FILE).is_file() else f"'model': {model} holds no {CONFIG_FILE}"
    try:
        names = sorted(registry.load_registry())
    except Exception as exc:  # noqa: BLE001 - an unreadable registry: say so rather than accept blindly
        return f"'model': '{model}' is not a directory and the registry cannot be read ({exc})"
    if model in names:
        return None
    return (f"'model' must be a registry name ({', '.join(names)}) or a model directory holding {CONFIG_FILE}; "
            f"got {loggable_text(model, 200)}")


def device_problem(device: str) -> Optional[str]:
    """Why ``device`` does not exist on this machine (None when it does, or is 'auto'/'cpu')."""
    if not device.startswith("cuda"):
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= count:
        return f"'device': {device} does not exist here ({count} CUDA device(s) visible)"
    return None




def guidance_problem(forecaster: Any, guidance_scale: float) -> Optional[str]:
    """Why ``guidance_scale`` (the node parameter: -1 = the model's own) cannot be used with the loaded
    ``forecaster``, or None (also when no model is loaded yet: it is checked again at configure)."""
    config = getattr(forecaster, "config", None)
    if guidance_scale in (-1.0, 1.0) or config is None or getattr(config, "supports_guidance", True):
        return None
    return (f"guidance_scale {guidance_scale:g} needs a model trained with instruction dropout; model "
            f"'{getattr(config, 'name', '?')}' has no unconditional embedding (set guidance_scale to 1 or -1)")


def missing_model_message(model: str, detail: str) -> str:
    """One error for a model whose weights are not on this machine: what is missing, how to download it, and the
    shipped model that works offline. ``detail``: the loader's message (only its first line is kept; the
    hand-install steps are what ``traj-forecast download`` prints)."""
    try:
        is_registry_name = model in registry.load_registry()
    except Exception:  # noqa: BLE001 - an unreadable registry changes only the advice
        is_registry_name = False
    first_line = (detail.strip().splitlines() or ["not found"])[0][:300]
    lines = [f"cannot load model '{model}': {first_line}"]
    if is_registry_name:
        lines.append(f"  Its weights are not on this machine. Download them once, with network access: "
                     f"traj-forecast download {model}")
    else:
        lines.append("  Set 'model' to a model directory (config.yaml + weights) or a registry name "
                     "(`traj-forecast download NAME` fetches one once, with network access).")
    lines.append(f"  Or run offline with the model shipped in the package: model:={SIM_MODEL} "
                 "(trained on simulated LIBERO-like scenes), then trigger configure again.")
    return "\n".join(lines)


def parameter_problem(name: str, value: Any, cameras: Sequence[str], node_name: str, namespace: str, state: str,
                      forecaster: Any = None) -> Optional[str]:
    """Checks beyond the parameter tables, None when ``value`` is acceptable: topic names and camera names (always),
    and once the node is up (``state`` non-empty: its lifecycle state) that ``model`` names a registry model or a
    model directory, that ``device`` exists here, that ``guidance_scale`` suits the loaded ``forecaster`` and that
    ``cameras`` changes only while unconfigured."""
    if name in TOPIC_PARAMETERS:
        return topic_name_problem(name, str(value), node_name, namespace)
    if name.rpartition(".")[2] in TOPIC_FIELDS and split_camera_parameter(name, cameras):
        return topic_name_problem(name, str(value), node_name, namespace, optional=OPTIONAL_CAMERA_TOPICS)
    if name == CAMERAS_PARAMETER:
        if state and state != "unconfigured":
            return (f"'cameras' can change only while the node is unconfigured (it is {state}): deactivate and "
                    "clean up first; it applies at the next configure")
        return camera_names_problem(list(value), lambda camera: topic_name_problem(
            "camera output", f"~/{camera}/forecast", node_name, namespace))
    if not state:  # startup values: a bad model fails configure with the download instructions
        return None
    if name == "model":
        return model_problem(str(value))
    if name == "device":
        return device_problem(str(value))
    if name == "guidance_scale":
        return guidance_problem(forecaster, float(value))
    return None
