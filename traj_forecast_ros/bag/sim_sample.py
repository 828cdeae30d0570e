"""The scored sample bag: held-out simulated manipulation episodes with the true future of every frame.

``traj-forecast bag make-sim-sample`` renders episodes of the held-out stream
(:func:`traj_forecast_ros.data.sim_streams.stream_episode`, needs the sim extra) and writes, per frame at the
clip rate (10 Hz):

* ``/agentview/image_raw`` and ``/eye_in_hand/image_raw`` (``sensor_msgs/Image``, rgb8 128 x 128) with their
  ``camera_info`` (the simulator's pinhole, principal point in the ROS convention: pixel centres at integers);
* ``/instruction`` (``std_msgs/String``), the episode's task, half a frame period before each frame, so a node
  has it before the frame (a node binds the instruction in force to each frame it receives) and after the last
  frame of the previous episode;
* ``/agentview/true_future`` and ``/eye_in_hand/true_future`` (``traj_forecast_msgs/TrajectoryForecast``, K = 1):
  the exact tracks of the query grid over the next 15 frames, built by the node's own
  :func:`~traj_forecast_ros.ros.conversions.forecast_to_msg` so they compare with its forecasts field by field.

``traj-forecast bag replay`` finds the truth topic and scores every forecast (summary ``accuracy``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Sequence

import numpy as np
from builtin_interfaces.msg import Time
from rclpy.serialization import serialize_message
from std_msgs.msg import Header, String

from traj_forecast_ros.bag.io import BagWriter, PathLike, bag_topics
from traj_forecast_ros.bag.sample import REPO_ROOT, SAMPLE_CAMERAS, SAMPLE_START_NS, pinhole_camera_info, rosbags_header
from traj_forecast_ros.data import sim_manipulation as sim
from traj_forecast_ros.data.sim_streams import stream_episode
from traj_forecast_ros.errors import BagError
from traj_forecast_ros.forecast import Forecast
from traj_forecast_ros.ros.conversions import forecast_to_msg, rgb_to_image_msg

SIM_SAMPLE_BAG = REPO_ROOT / "data" / "sample_bag" / "sim_heldout"
INSTRUCTION_TOPIC = "/instruction"
TRUTH_TOPIC_NAME = "true_future"
TRUTH_MODEL_ID = "ground_truth"
# simulator view -> the sample bag's camera (namespace and optical frame shared with the LIBERO sample bag)
VIEW_CAMERAS = {"agentview": SAMPLE_CAMERAS[0], "robot0_eye_in_hand": SAMPLE_CAMERAS[1]}


def truth_topic(view: str) -> str:
    """The ground-truth topic of a simulator view (``/agentview/true_future``)."""
    return f"{VIEW_CAMERAS[view].namespace}/{TRUTH_TOPIC_NAME}"


def camera_info(store, stamp_ns: int, frame_id: str, intrinsics: np.ndarray, height: int, width: int) -> object:
    """``sensor_msgs/CameraInfo`` (rosbags object) of an undistorted pinhole. ``intrinsics`` uses the forecasts'
    continuous pixel convention (a pixel's centre at index + 0.5); CameraInfo's principal point is half a pixel less
    (ROS)."""
    header = rosbags_header(store, stamp_ns, frame_id)
    return pinhole_camera_info(store, header, int(width), int(height), float(intrinsics[0, 0]),
                               float(intrinsics[1, 1]), float(intrinsics[0, 2]) - 0.5, float(intrinsics[1, 2]) - 0.5)


def write_episodes(out: PathLike, episodes: Iterable, query_points: np.ndarray, start_ns: int = SAMPLE_START_NS,
                   overwrite: bool = True) -> Dict[str, int]:
    """Write :class:`~traj_forecast_ros.data.sim_streams.StreamEpisode` s back to back as one camera stream
    (stamps continue across episodes at the clip rate). Returns messages written per topic."""
    stamp_ns = int(start_ns)

    def put(writer: BagWriter, topic: str, msgtype: str, at_ns: int, message) -> None:
        """Append an rclpy message."""
        writer.write(topic, msgtype, at_ns, serialize_message(message))

    with BagWriter(out, "mcap", overwrite=overwrite, compress=True) as writer:
        for episode in episodes:
            period_ns = int(round(episode.frame_interval_s * 1e9))
            for images, tracks in zip(episode.images, episode.tracks):
                stamp = Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
                put(writer, INSTRUCTION_TOPIC, "std_msgs/msg/String", stamp_ns - period_ns // 2,
                    String(data=episode.instruction))
                for view, camera in VIEW_CAMERAS.items():
                    header = Header(stamp=stamp, frame_id=camera.frame_id)
                    height, width = images[view].shape[:2]
                    put(writer, f"{camera.namespace}/image_raw", "sensor_msgs/msg/Image", stamp_ns,
                        rgb_to_image_msg(images[view], header))
                    info = camera_info(writer.typestore, stamp_ns, camera.frame_id, episode.intrinsics[view], height,
                                       width)
                    writer.write_message(f"{camera.namespace}/camera_info", "sensor_msgs/msg/CameraInfo", stamp_ns,
                                         info)
                    truth = Forecast(tracks=tracks[view][None].astype(np.float32), query_points=query_points,
                                     image_size=(height, width), model_id=TRUTH_MODEL_ID,
                                     instruction=episode.instruction)
                    put(writer, truth_topic(view), "traj_forecast_msgs/msg/TrajectoryForecast", stamp_ns,
                        forecast_to_msg(truth, header, frame_interval=episode.frame_interval_s,
                                        camera_info=info))
                stamp_ns += period_ns
    counts = {topic: info.count for topic, info in bag_topics(out).items()}
    if not counts:
        raise BagError("no episode frames to write")
    return counts


def make_sim_sample_bag(out: PathLike = SIM_SAMPLE_BAG, seed: int = 0, episodes: Sequence[int] = (0, 2, 10),
                        frames_per_episode: int = 12, overwrite: bool = True) -> Path:
    """Render held-out stream episodes ``episodes`` of ``seed`` (``frames_per_episode`` frames each) and write the
    scored sample bag. Needs the sim extra (``bash scripts/setup_sim.sh``)."""
    sim.ensure_offscreen_gl()
    config = sim.SimConfig()
    envs: Dict[str, object] = {}
    rendered = [stream_episode(seed, index, config, envs=envs, max_frames=frames_per_episode)
                for index in episodes]
    write_episodes(out, rendered, config.query_points().astype(np.float32), overwrite=overwrite)
    return Path(out)
