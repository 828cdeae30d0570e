"""RViz markers: DELETEALL first, one LINE_LIST per sample, colours ramp over time, pixels on the image plane."""

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("visualization_msgs", reason="needs the ROS 2 message wheels (requirements-ros.txt)")

from std_msgs.msg import Header  # noqa: E402
from visualization_msgs.msg import Marker  # noqa: E402

from traj_forecast_ros.ros.markers import (  # noqa: E402
    ImagePlane,
    forecast_markers,
    lifetime_from_period,
    line_list_vertices,
    subsample_grid,
    time_ramp,
)


def straight_tracks(k=2, t=4, h=6, w=8, velocity=(3.0, -1.0)):
    ys, xs = np.meshgrid(np.arange(h) * 10 + 5.0, np.arange(w) * 10 + 5.0, indexing="ij")
    query = np.stack([xs, ys], axis=-1)
    steps = np.arange(t)[:, None, None, None] * np.asarray(velocity)
    tracks = query[None, None] + steps[None] * (1 + np.arange(k))[:, None, None, None, None]
    return tracks.astype(np.float32)  # [K, T, H, W, 2]


def test_pixel_plane_lifts_centre_and_corners():
    plane = ImagePlane.from_pixel_size((480, 640), pixel_size=0.001, depth=2.0)
    points = plane.lift(np.array([[320.0, 240.0], [0.0, 0.0], [640.0, 480.0]]))
    np.testing.assert_allclose(points[0], [0, 0, 2.0])
    np.testing.assert_allclose(points[1], [-0.32, -0.24, 2.0])  # optical frame: x right, y down
    np.testing.assert_allclose(points[2], [0.32, 0.24, 2.0])


def test_camera_info_plane_rescales_to_the_image_size():
    info = SimpleNamespace(k=[500.0, 0, 320.0, 0, 500.0, 240.0, 0, 0, 1], width=640, height=480)
    plane = ImagePlane.from_camera_info(info, image_size=(240, 320), depth=1.0)
    assert (plane.fx, plane.cx, plane.cy) == (250.0, 160.0, 120.0)
    np.testing.assert_allclose(plane.lift(np.array([410.0, 120.0])), [1.0, 0.0, 1.0])
    with pytest.raises(ValueError):
        ImagePlane.from_camera_info(SimpleNamespace(k=[0.0] * 9, width=0, height=0), (240, 320), 1.0)


def test_line_list_pairs_consecutive_frames():
    track = np.arange(3 * 2 * 3, dtype=float).reshape(3, 2, 3)  # T=3, N=2
    vertices, frames = line_list_vertices(track)
    assert vertices.shape == (2 * 2 * 2, 3)
    np.testing.assert_array_equal(frames, [0, 1, 0, 1, 1, 2, 1, 2])
    np.testing.assert_array_equal(vertices[0], track[0, 0])
    np.testing.assert_array_equal(vertices[1], track[1, 0])
    np.testing.assert_array_equal(vertices[2], track[0, 1])


def test_marker_array_structure_and_geometry():
    tracks = straight_tracks()
    header = Header(frame_id="camera_optical")
    header.stamp.sec = 42
    plane = ImagePlane.from_pixel_size((60, 80), pixel_size=0.01, depth=1.5)
    array_msg = forecast_markers(tracks, header, plane, stride=2, lifetime_s=1.25)
    markers = array_msg.markers
    assert markers[0].action == Marker.DELETEALL
    assert len(markers) == 1 + tracks.shape[0]
    expected_vertices = 3 * 4 * 3 * 2  # 3 x 4 points kept (6 x 8 grid, stride 2) x 3 segments (T = 4) x 2 vertices
    ramp = time_ramp(4)
    for sample, marker in enumerate(markers[1:]):
        assert marker.type == Marker.LINE_LIST and marker.action == Marker.ADD and marker.id == sample
        assert marker.header.frame_id == "camera_optical" and marker.header.stamp.sec == 42
        assert (marker.lifetime.sec, marker.lifetime.nanosec) == (1, 250_000_000)
        assert len(marker.points) == len(marker.colors) == expected_vertices
        assert all(p.z == pytest.approx(1.5) for p in marker.points)
        # first segment of the first kept point (grid index 1,1 -> pixel (15, 15)) starts on the plane there
        assert (marker.points[0].x, marker.points[0].y) == pytest.approx(((15 - 40) * 0.01, (15 - 30) * 0.01))
        # colours ramp over time: first vertex has the frame-0 colour, second the frame-1 colour
        assert marker.colors[0].b == pytest.approx(ramp[0, 2]) and marker.colors[1].g == pytest.approx(ramp[1, 1])
        assert marker.colors[-1].r == pytest.approx(ramp[-1, 0])
    # later samples move faster (straight_tracks scales velocity by k+1): check the displacement on the plane
    seg0 = markers[1].points[1].x - markers[1].points[0].x
    seg1 = markers[2].points[1].x - markers[2].points[0].x
    assert seg1 == pytest.approx(2 * seg0) and seg0 == pytest.approx(3.0 * 0.01)


def test_max_samples_and_bad_input():
    tracks = straight_tracks(k=5)
    plane = ImagePlane.from_pixel_size((60, 80), 0.01, 1.0)
    assert len(forecast_markers(tracks, Header(), plane, stride=4, max_samples=2).markers) == 3
    with pytest.raises(ValueError):
        forecast_markers(tracks[0], Header(), plane)
    with pytest.raises(ValueError):
        subsample_grid(tracks, 0)


def test_time_ramp_goes_from_blue_to_yellow():
    ramp = time_ramp(16)
    assert ramp.shape == (16, 4)
    assert ramp[0, 2] > ramp[0, 0] and ramp[-1, 0] > ramp[-1, 2]
    assert ((ramp >= 0) & (ramp <= 1)).all()


def test_lifetime_from_period():
    assert lifetime_from_period(0.5, 3) == pytest.approx(1.5)
    assert lifetime_from_period(None, 3, fallback_s=2.0) == pytest.approx(6.0)
    assert lifetime_from_period(0.5, 0) == 0.0


def test_marker_lifetime_carries_rounding_into_whole_seconds():
    tracks = straight_tracks(k=1)
    plane = ImagePlane.from_pixel_size((60, 80), pixel_size=0.01, depth=1.5)
    lifetime_s = lifetime_from_period(0.33333333327, 3.0)  # 0.99999999981 s: rounds to 1 s, not to 0 s (forever)
    marker = forecast_markers(tracks, Header(), plane, stride=2, lifetime_s=lifetime_s).markers[1]
    assert (marker.lifetime.sec, marker.lifetime.nanosec) == (1, 0)
    marker = forecast_markers(tracks, Header(), plane, stride=2, lifetime_s=2.0000000004).markers[1]
    assert (marker.lifetime.sec, marker.lifetime.nanosec) == (2, 0)
