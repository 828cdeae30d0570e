"""RViz markers: DELETEALL first, one LINE_LIST per sample, colours ramp over time, pixels on the image plane; the
serialised shortcut reads back as exactly the same message."""

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("visualization_msgs", reason="needs the ROS 2 message wheels (requirements-ros.txt)")

from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from visualization_msgs.msg import Marker, MarkerArray  # noqa: E402

from traj_forecast_ros.ros import markers as markers_module  # noqa: E402
from traj_forecast_ros.ros.markers import (  # noqa: E402
    ImagePlane,
    MarkerSerializer,
    forecast_markers,
    frames_drawn,
    lifetime_from_period,
    line_list_vertices,
    serialized_forecast_markers,
    subsample_grid,
    time_ramp,
)
from traj_forecast_ros.ros.params import PARAMETER_SPECS  # noqa: E402


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
    # ROS principal point 319.5, 239.5 (pixel centres at integers) = 320, 240 in forecast pixels (centres at + 0.5)
    info = SimpleNamespace(k=[500.0, 0, 319.5, 0, 500.0, 239.5, 0, 0, 1], width=640, height=480)
    plane = ImagePlane.from_camera_info(info, image_size=(240, 320), depth=1.0)
    assert (plane.fx, plane.cx, plane.cy) == (250.0, 160.0, 120.0)
    np.testing.assert_allclose(plane.lift(np.array([410.0, 120.0])), [1.0, 0.0, 1.0])
    # the same camera from its pixel size: one convention for both planes
    same = ImagePlane.from_pixel_size((480, 640), pixel_size=1 / 500.0, depth=1.0)
    assert (same.cx, same.cy) == (2 * plane.cx, 2 * plane.cy)
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


def random_tracks(k=3, t=16, h=16, w=16, seed=0, image_size=(480, 640)):
    """[K, T, H, W, 2] random walks from a pixel grid, some leaving the image."""
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.linspace(5, image_size[0] - 5, h), np.linspace(5, image_size[1] - 5, w), indexing="ij")
    query = np.stack([xs, ys], axis=-1)
    steps = rng.normal(0.0, 4.0, (k, t - 1, h, w, 2))
    return np.concatenate([np.broadcast_to(query, (k, 1, h, w, 2)), query + np.cumsum(steps, 1)], 1).astype(np.float32)


def read_back(data: bytes) -> MarkerArray:
    return deserialize_message(data, MarkerArray)


def test_frames_drawn_keeps_first_and_last_evenly_spaced():
    np.testing.assert_array_equal(frames_drawn(16, 0), np.arange(16))
    np.testing.assert_array_equal(frames_drawn(16, 16), np.arange(16))
    np.testing.assert_array_equal(frames_drawn(4, 100), np.arange(4))
    np.testing.assert_array_equal(frames_drawn(16, 6), [0, 3, 6, 9, 12, 15])
    np.testing.assert_array_equal(frames_drawn(16, 1), [0, 15])  # first and last always among them
    drawn = frames_drawn(16, 8)
    assert drawn[0] == 0 and drawn[-1] == 15 and len(drawn) == 8 and set(np.diff(drawn)) <= {2, 3}
    np.testing.assert_array_equal(frames_drawn(1, 5), [0])
    with pytest.raises(ValueError):
        frames_drawn(16, -1)
    with pytest.raises(ValueError):
        frames_drawn(0, 0)


def test_max_frames_cuts_vertices_and_keeps_each_frame_colour():
    tracks = straight_tracks(k=2, t=16, h=4, w=4)
    plane = ImagePlane.from_pixel_size((60, 80), pixel_size=0.01, depth=1.0)
    ramp = time_ramp(16)
    marker = forecast_markers(tracks, Header(), plane, stride=1, max_frames=6).markers[1]
    assert len(marker.points) == len(marker.colors) == (6 - 1) * 16 * 2
    # first segment of the first point: frame 0 -> frame 3, coloured with those frames' ramp colours (of T = 16)
    assert marker.points[1].x - marker.points[0].x == pytest.approx(3 * 3.0 * 0.01)
    assert (marker.colors[0].r, marker.colors[0].b) == pytest.approx((ramp[0, 0], ramp[0, 2]))
    assert (marker.colors[1].r, marker.colors[1].g) == pytest.approx((ramp[3, 0], ramp[3, 1]))
    assert (marker.colors[-1].r, marker.colors[-1].g) == pytest.approx((ramp[15, 0], ramp[15, 1]))
    assert marker.color.r == pytest.approx(ramp[-1, 0])


def test_a_position_shared_by_two_segments_is_one_point_object():
    tracks = random_tracks(k=1, t=5, h=3, w=3)
    plane = ImagePlane.from_pixel_size((480, 640), 0.002, 1.0)
    points = forecast_markers(tracks, Header(), plane, stride=1).markers[1].points
    num_points = 9
    # LINE_LIST order: segment (t -> t+1) of every point, then t+1 -> t+2; a segment's end is the next one's start.
    for t in range(3):
        for n in range(num_points):
            end = points[(t * num_points + n) * 2 + 1]
            start = points[((t + 1) * num_points + n) * 2]
            assert end is start
    assert len({id(p) for p in points}) == 5 * num_points


@pytest.mark.parametrize("frame_id", ["", "c", "ab", "cam", "camera", "camera_o", "camera_optical", "x" * 33])
def test_serialised_markers_read_back_as_the_message(frame_id):
    """Every header length (CDR alignment), several namespaces, strides and frame caps: same message."""
    header = Header(frame_id=frame_id)
    header.stamp.sec, header.stamp.nanosec = 1_700_000_123, 987_654_321
    plane = ImagePlane.from_pixel_size((480, 640), 0.002, 1.5)
    tracks = random_tracks(k=3, t=7, seed=len(frame_id))
    for namespace in ("trajectory_forecast", "n", "abc"):
        for stride, max_samples, max_frames in ((4, 0, 0), (3, 2, 3), (16, 1, 0), (1, 0, 2)):
            options = dict(stride=stride, lifetime_s=0.75, line_width=0.005, max_samples=max_samples,
                           max_frames=max_frames, namespace=namespace)
            expected = read_back(serialize_message(forecast_markers(tracks, header, plane, **options)))
            data = serialized_forecast_markers(tracks, header, plane, **options)
            assert len(data) == len(serialize_message(forecast_markers(tracks, header, plane, **options)))
            got = read_back(data)
            assert got == expected, (namespace, stride, max_samples, max_frames)
    # and the content is what RViz needs: header equal to the source's, vertex counts, colours on the ramp
    got = read_back(serialized_forecast_markers(tracks, header, plane, stride=4, max_frames=0))
    assert len(got.markers) == 1 + 3 and got.markers[0].action == Marker.DELETEALL
    ramp = time_ramp(7).astype(np.float32)
    for sample, marker in enumerate(got.markers[1:]):
        assert marker.header == header and marker.id == sample and marker.type == Marker.LINE_LIST
        assert len(marker.points) == len(marker.colors) == 4 * 4 * 6 * 2
        colors = np.array([[c.r, c.g, c.b, c.a] for c in marker.colors], np.float32)
        np.testing.assert_array_equal(colors[0], ramp[0])
        np.testing.assert_array_equal(colors[-1], ramp[-1])
        np.testing.assert_array_equal(colors[1::2][:16], np.broadcast_to(ramp[1], (16, 4)))  # segment ends: frame 1
        lifted = plane.lift(np.asarray(tracks[sample, 0, 2, 2], np.float64))  # grid point (2, 2) is the first kept
        assert (marker.points[0].x, marker.points[0].y, marker.points[0].z) == tuple(lifted)


def test_serialised_markers_with_nothing_to_draw_and_camera_planes():
    plane = ImagePlane(fx=500.0, fy=480.0, cx=321.5, cy=239.25, depth=0.8)
    header = Header(frame_id="cam")
    single_frame = random_tracks(k=2, t=1)
    got = read_back(serialized_forecast_markers(single_frame, header, plane, stride=4))
    assert [len(m.points) for m in got.markers[1:]] == [0, 0]
    coarse = read_back(serialized_forecast_markers(random_tracks(k=2, t=4, h=4, w=4), header, plane, stride=8))
    assert [len(m.points) for m in coarse.markers[1:]] == [0, 0]  # stride wider than the grid: no point kept
    assert len(read_back(serialized_forecast_markers(random_tracks(k=2)[:0], header, plane)).markers) == 1
    tracks = random_tracks(k=2, t=4, h=5, w=3) * 1e4  # far outside the image: still drawn where they are
    expected = read_back(serialize_message(forecast_markers(tracks, header, plane, stride=2)))
    assert read_back(serialized_forecast_markers(tracks, header, plane, stride=2)) == expected
    with pytest.raises(ValueError):
        serialized_forecast_markers(tracks[0], header, plane)


def test_serializer_uses_the_direct_path_after_checking_it():
    warnings = []
    serializer = MarkerSerializer(warn=warnings.append)
    plane = ImagePlane.from_pixel_size((480, 640), 0.002, 1.0)
    tracks = random_tracks(k=2, t=6)
    header = Header(frame_id="cam")
    data = serializer(tracks, header, plane, stride=4)
    assert serializer.fast is True and not warnings
    assert read_back(data) == read_back(serialize_message(forecast_markers(tracks, header, plane, stride=4)))


def test_serializer_falls_back_when_the_direct_path_is_wrong(monkeypatch):
    plane = ImagePlane.from_pixel_size((480, 640), 0.002, 1.0)
    tracks = random_tracks(k=2, t=6)
    header = Header(frame_id="cam")
    expected = read_back(serialize_message(forecast_markers(tracks, header, plane, stride=4)))

    def wrong_bytes(tracks, header, plane, **options):  # e.g. another middleware encoding: a different message
        return serialize_message(forecast_markers(tracks + 1.0, header, plane, **options))

    def refuses(*args, **options):
        raise ValueError("not a little-endian CDR encapsulation")

    for broken in (wrong_bytes, refuses):
        monkeypatch.setattr(markers_module, "serialized_forecast_markers", broken)
        warnings = []
        serializer = MarkerSerializer(warn=warnings.append)
        assert read_back(serializer(tracks, header, plane, stride=4)) == expected
        assert serializer.fast is False and len(warnings) == 1 and "message objects" in warnings[0]
        assert read_back(serializer(tracks, header, plane, stride=4)) == expected  # and stays on the safe path
        assert len(warnings) == 1


def test_marker_max_frames_parameter_is_validated():
    spec = PARAMETER_SPECS["marker_max_frames"]
    assert spec.default == 0  # all frames: what RViz showed before the parameter existed
    assert spec.check(0) is None and spec.check(1) is None and spec.check(1000) is None
    assert "marker_max_frames" in spec.check(-1) and spec.check(1001) is not None
    (allowed,) = spec.descriptor().integer_range
    assert (allowed.from_value, allowed.to_value) == (0, 1000)
