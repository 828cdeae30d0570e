"""The launch file: parse-checked everywhere, executed where launch_ros is installed (a ROS 2 install)."""

from __future__ import annotations

import ast
import importlib.util

import pytest

from ros_helpers import REPO

LAUNCH_FILE = REPO / "launch" / "forecast.launch.py"
REQUIRED_ARGUMENTS = {"params_file", "image_topic", "camera_frame", "model", "namespace", "autostart", "rviz",
                      "planner", "libero_two_views"}


def declared_arguments(tree: ast.AST) -> set:
    """Names passed to DeclareLaunchArgument(...) in the file."""
    names = set()
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "DeclareLaunchArgument":
            names.add(call.args[0].value)
    return names


def test_launch_file_parses_and_declares_the_arguments():
    tree = ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    assert REQUIRED_ARGUMENTS <= declared_arguments(tree)
    source = LAUNCH_FILE.read_text()
    assert 'executable="forecast_node"' in source and "LifecycleNode" in source
    assert "fastdds_large_data.xml" in source and "forecast.yaml" in source
    assert 'executable="example_planner"' in source and 'IfCondition(LaunchConfiguration("planner"))' in source


def test_rviz_comes_before_the_forecast_node():
    """With rviz:=true and no rviz2 installed the launch must fail before the node starts (no orphaned node)."""
    tree = ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))
    generate = next(node for node in tree.body if isinstance(node, ast.FunctionDef)
                    and node.name == "generate_launch_description")
    order = []
    for call in ast.walk(generate):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) in ("Node", "OpaqueFunction"):
            order.append((call.lineno, call.func.id))
    names = [name for _, name in sorted(order)]
    assert names == ["Node", "Node", "OpaqueFunction"], names  # rviz2, then example_planner, then the forecast node
    assert "KillSignal=SIGINT" in LAUNCH_FILE.read_text()


def test_launch_description_builds_where_launch_ros_is_installed():
    if importlib.util.find_spec("launch_ros") is None:
        pytest.skip("launch_ros is not installable from PyPI (needs a ROS 2 install); the file is parse-checked above")
    from launch.actions import DeclareLaunchArgument

    spec = importlib.util.spec_from_file_location("forecast_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    names = {entity.name for entity in description.entities if isinstance(entity, DeclareLaunchArgument)}
    assert REQUIRED_ARGUMENTS <= names


def test_the_libero_two_view_argument_sets_the_cameras_from_the_shared_table():
    """libero_two_views:=true adds camera_overrides(LIBERO_CAMERAS) to the node's parameters (the same table bag
    replay and the README use), and only when the argument is true."""
    tree = ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "_forecast_node")
    branch = next(node for node in ast.walk(function) if isinstance(node, ast.If)
                  and "libero_two_views" in ast.unparse(node.test))
    assert "TRUE_VALUES" in ast.unparse(branch.test)
    assert [ast.unparse(statement) for statement in branch.body] == [
        "overrides.update(camera_overrides(LIBERO_CAMERAS))"]
    imports = {alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
               and node.module == "traj_forecast_ros.ros.cameras" for alias in node.names}
    assert {"LIBERO_CAMERAS", "camera_overrides"} <= imports


def test_the_libero_overrides_give_a_node_with_both_views(context):
    """The overrides the launch file passes are accepted by the node: two cameras, the bag's topics, outputs under
    each camera's name."""
    from rclpy.parameter import Parameter

    from traj_forecast_ros.ros.cameras import LIBERO_CAMERAS, camera_overrides
    from traj_forecast_ros.ros.forecast_node import ForecastNode

    overrides = [Parameter(name, value=value) for name, value in camera_overrides(LIBERO_CAMERAS).items()]
    node = ForecastNode(forecaster_factory=lambda *a, **k: None, context=context, parameter_overrides=overrides)
    try:
        cameras = {camera.name: camera for camera in node.cameras}
        assert list(cameras) == ["agentview", "robot0_eye_in_hand"]
        assert cameras["robot0_eye_in_hand"].subscribed_topic == "/eye_in_hand/image_raw"
        assert cameras["agentview"].camera_info_topic == "/agentview/camera_info"
        assert node.get_parameter("robot0_eye_in_hand.transport").value == "raw"
    finally:
        node.destroy_node()
