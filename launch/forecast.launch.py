"""Launch the trajectory forecasting node (a lifecycle node that configures and activates itself).

    ros2 launch traj_forecast_ros forecast.launch.py image_topic:=/camera/image_raw camera_frame:=camera_optical \
        model:=libero-atm namespace:=arm autostart:=true rviz:=true planner:=true

LIBERO's two views in one node (one model in memory, the views' frames batched), cameras ``agentview``
(/agentview/image_raw) and ``robot0_eye_in_hand`` (/eye_in_hand/image_raw), outputs
``forecast_node/<camera>/{forecast,markers,overlay}``:

    ros2 launch traj_forecast_ros forecast.launch.py libero_two_views:=true

Arguments left empty keep the value from ``params_file`` (default: the package's config/forecast.yaml). The Fast DDS
large-data profile shipped in config/ is used unless FASTDDS_DEFAULT_PROFILES_FILE is already set.

Stop it with SIGINT (Ctrl-C): SIGTERM to ``ros2 launch`` itself can leave the node orphaned (under systemd set
``KillSignal=SIGINT``). The node alone exits cleanly on either signal.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node

from traj_forecast_ros.ros.cameras import LIBERO_CAMERAS, camera_overrides
from traj_forecast_ros.ros.io_tables import OUTPUTS, TRANSPORTS

PACKAGE = "traj_forecast_ros"
TRUE_VALUES = ("true", "1", "yes")


def _forecast_node(context, *args, **kwargs):
    """Build the node with only the overrides that were actually given on the command line."""
    overrides = {"autostart": LaunchConfiguration("autostart").perform(context).lower() in TRUE_VALUES}
    for name in ("image_topic", "camera_frame", "model"):
        value = LaunchConfiguration(name).perform(context)
        if value:
            overrides[name] = value
    if LaunchConfiguration("libero_two_views").perform(context).lower() in TRUE_VALUES:
        overrides.update(camera_overrides(LIBERO_CAMERAS))  # cameras + <camera>.image_topic, ...
    return [
        LifecycleNode(
            package=PACKAGE,
            executable="forecast_node",
            name="forecast_node",
            namespace=LaunchConfiguration("namespace"),
            parameters=[LaunchConfiguration("params_file"), overrides],
            output="screen",
            emulate_tty=True,
        )
    ]


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory(PACKAGE)
    arguments = [
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "forecast.yaml"),
                              description="Node parameter file."),
        DeclareLaunchArgument("image_topic", default_value="",
                              description=f"Camera topic of the single-camera setup (transports: {', '.join(TRANSPORTS)}"
                                          "; compressed subscribes to <topic>/compressed). Empty: the params file's."),
        DeclareLaunchArgument("libero_two_views", default_value="false",
                              description="One node, two cameras: LIBERO's " + " and ".join(
                                  f"{name} ({fields['image_topic']})" for name, fields in LIBERO_CAMERAS.items())
                              + "; outputs forecast_node/<camera>/{" + ",".join(spec.name for spec in OUTPUTS)
                              + "}. Replaces image_topic."),
        DeclareLaunchArgument("camera_frame", default_value="",
                              description="frame_id for images whose header has none. Empty: the params file's."),
        DeclareLaunchArgument("model", default_value="",
                              description="Registry name or model directory. Empty: the params file's value."),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node."),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="Configure and activate the lifecycle node at startup."),
        DeclareLaunchArgument("rviz", default_value="false", description="Also start RViz with rviz/forecast.rviz."),
        DeclareLaunchArgument("planner", default_value="false",
                              description="Also start example_planner (motion-probability and keep-out images)."),
    ]
    return LaunchDescription(arguments + [
        SetEnvironmentVariable(
            "FASTDDS_DEFAULT_PROFILES_FILE",
            EnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE",
                                default_value=os.path.join(share, "config", "fastdds_large_data.xml"))),
        # RViz first: when rviz2 is not installed the launch fails before the forecast node starts, instead of
        # exiting 1 and leaving the node running orphaned.
        Node(
            package="rviz2",
            executable="rviz2",
            arguments=["-d", os.path.join(share, "rviz", "forecast.rviz")],
            condition=IfCondition(LaunchConfiguration("rviz")),
            output="screen",
        ),
        # The example planner reads <namespace>/forecast_node/forecast (its relative default) in the same namespace:
        # the single-camera setup's forecast (with libero_two_views, remap it to a camera's forecast).
        Node(
            package=PACKAGE,
            executable="example_planner",
            name="example_planner",
            namespace=LaunchConfiguration("namespace"),
            condition=IfCondition(LaunchConfiguration("planner")),
            output="screen",
        ),
        OpaqueFunction(function=_forecast_node),
    ])
