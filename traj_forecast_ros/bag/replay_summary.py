"""What a replay through the node records, and its summary: every frame answered or counted, per camera view.

Filled by :func:`traj_forecast_ros.bag.replay.replay_through_node` from its player, recorder and diagnostics
callbacks; the summary is plain data (``summary.json``) plus a few human-readable lines.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from traj_forecast_ros.bag.io import bag_topics, deserialize, read_messages
from traj_forecast_ros.bag.report import format_accuracy, header_stamp_ns, percentiles_ms, stamp_ns
from traj_forecast_ros.bag.typestore import make_typestore


@dataclass(frozen=True)
class View:
    """One camera view replayed: its image topic in the bag, its camera name in the node ("" = the single-camera
    setup) and the node's output topics for it."""

    image_topic: str
    camera: str
    outputs: Dict[str, str]  # output name -> topic
    info_topic: Optional[str] = None  # the bag's CameraInfo beside the image topic, played too


@dataclass
class ReplayLog:
    """What happened during a replay, filled from the player, recorder and diagnostics callbacks."""

    published_ns: Dict[Tuple[str, int], int] = field(default_factory=dict)  # (image topic, stamp) -> wall time sent
    forecast_received_ns: Dict[Tuple[str, int], int] = field(default_factory=dict)  # (forecast topic, stamp) -> wall
    output_counts: Dict[str, int] = field(default_factory=dict)
    diagnostics: Dict[str, str] = field(default_factory=dict)  # the node's latest key/values
    lock: threading.Lock = field(default_factory=threading.Lock)

    def diagnostic_int(self, key: str) -> int:
        """An integer key of the node's latest diagnostics (0 when not reported yet)."""
        with self.lock:
            return int(self.diagnostics.get(key, "0") or 0)

    def counts_by_reason(self, category: str) -> Dict[str, int]:
        """The node's ``dropped`` (good frames not forecast, failures included) or ``rejected`` (bad input)
        counters by reason, over all cameras."""
        prefix = f"{category}."
        with self.lock:
            return {key[len(prefix):]: int(value) for key, value in self.diagnostics.items()
                    if key.startswith(prefix)}


def check_stamps(forecast_bag: Path, outputs: Dict[str, str], sent: Sequence[int]) -> Dict[str, Any]:
    """Every recorded output of one view must carry the stamp of a frame sent on it; forecasts one per frame."""
    store = None
    sent_set = set(sent)
    present = bag_topics(forecast_bag) if (forecast_bag / "metadata.yaml").exists() else {}
    result: Dict[str, Any] = {"unknown_stamps": 0, "duplicate_forecasts": 0}
    for name, topic in outputs.items():
        if topic not in present:
            continue
        stamps = []
        for message in read_messages(forecast_bag, [topic]):
            if name != "markers":  # forecast and overlay start with their header: no need to decode the rest
                stamps.append(header_stamp_ns(message.data))
                continue
            store = store or make_typestore()
            stamps += sorted({stamp_ns(m.header) for m in deserialize(message, store).markers})
        result["unknown_stamps"] += sum(1 for s in stamps if s not in sent_set)
        if name == "forecast":
            result["duplicate_forecasts"] = len(stamps) - len(set(stamps))
    result["ok"] = result["unknown_stamps"] == 0 and result["duplicate_forecasts"] == 0
    return result


def summarise(in_bag: Path, views: Sequence[View], model: str, model_note: Optional[str], rate: float,
              frames_in: Dict[str, int], log: ReplayLog, forecast_bag: Path, complete: bool,
              exit_code: Optional[int]) -> Dict[str, Any]:
    """The replay's summary: frames in and out, drops by reason, latency, stamps, per view and in total."""
    with log.lock:
        published_ns = dict(log.published_ns)
        received_ns = dict(log.forecast_received_ns)
        output_counts = dict(log.output_counts)
        diagnostics = dict(log.diagnostics)
    frames_received = log.diagnostic_int("frames_received")
    dropped, rejected = log.counts_by_reason("dropped"), log.counts_by_reason("rejected")
    by_camera = {view.camera or view.image_topic: output_counts.get(view.outputs["forecast"], 0) for view in views}
    forecasts_out = sum(by_camera.values())
    total_in = sum(frames_in.values())
    lost = max(0, total_in - frames_received)
    latencies: List[float] = []
    stamps: Dict[str, Any] = {"ok": True}
    for view in views:
        sent = {stamp: wall for (topic, stamp), wall in published_ns.items() if topic == view.image_topic}
        latencies += [(wall - sent[stamp]) / 1e9 for (topic, stamp), wall in received_ns.items()
                      if topic == view.outputs["forecast"] and stamp in sent]
        checked = check_stamps(forecast_bag, view.outputs, list(sent))
        stamps[view.camera or view.image_topic] = checked
        stamps["ok"] = stamps["ok"] and checked["ok"]
    unaccounted = total_in - forecasts_out - sum(dropped.values()) - sum(rejected.values()) - lost
    summary = {
        "bag": str(in_bag),
        "image_topic": views[0].image_topic,
        "image_topics": [view.image_topic for view in views],
        "model": model,
        "model_choice": model_note or "given with --model",
        "rate": rate,
        "frames_in": total_in,
        "frames_received_by_node": frames_received,
        "forecasts_out": forecasts_out,
        "forecasts_by_camera": by_camera,
        "dropped": {**dropped, **({"lost_in_transport": lost} if lost else {})},
        "rejected": rejected,
        "frames_unaccounted": unaccounted,
        "all_frames_accounted": complete and unaccounted == 0,
        "latency_ms": percentiles_ms(latencies),
        "stamps": stamps if len(views) > 1 else stamps[views[0].camera or views[0].image_topic],
        "outputs_recorded": output_counts,
        "node_diagnostics": diagnostics,
        "node_exit_code": exit_code,
        "outputs": {"forecast_bag": str(forecast_bag)},
    }
    return summary


def node_latency_line(diagnostics: Dict[str, str]) -> str:
    """The node's own latency figures from its /diagnostics, each with its clock."""
    if diagnostics.get("processing_latency_p50_ms", "n/a") == "n/a":
        return "no latency reported"
    return (f"processing p50 {diagnostics['processing_latency_p50_ms']} ms (wall clock: frame received -> forecast "
            f"published), stamp age p50 {diagnostics.get('stamp_age_p50_ms', 'n/a')} ms (node clock, simulated time "
            "in a replay)")


def format_summary(summary: Dict[str, Any]) -> str:
    """The summary as a few human-readable lines."""
    latency = summary["latency_ms"]
    dropped = ", ".join(f"{reason} {count}" for reason, count in sorted(summary["dropped"].items())) or "none"
    rejected = ", ".join(f"{reason} {count}" for reason, count in sorted(summary["rejected"].items())) or "none"
    topics = ", ".join(summary.get("image_topics", [summary["image_topic"]]))
    by_camera = summary.get("forecasts_by_camera", {})
    per_camera = f" ({', '.join(f'{c}: {n}' for c, n in by_camera.items())})" if len(by_camera) > 1 else ""
    lines = [
        f"replayed {summary['bag']} ({topics}, {summary['rate']}x) through forecast_node",
        f"  model:         {summary['model']} ({summary['model_choice']})",
        f"  frames in:     {summary['frames_in']}   received by the node: {summary['frames_received_by_node']}",
        f"  forecasts out: {summary['forecasts_out']}{per_camera}",
        f"  dropped:       {dropped}",
        f"  rejected:      {rejected}",
        f"  unaccounted:   {summary['frames_unaccounted']}",
        "  latency:       " + (f"p50 {latency['p50']:.0f} ms, p95 {latency['p95']:.0f} ms (wall clock: image published "
                              "-> forecast received)" if latency["count"] else "n/a (no forecasts)"),
        "  node:          " + node_latency_line(summary.get("node_diagnostics", {})),
        f"  stamps:        {'every output carries a source frame stamp' if summary['stamps']['ok'] else summary['stamps']}",
    ]
    if "accuracy" in summary:
        lines.append(f"  accuracy:      {format_accuracy(summary['accuracy'])}")
    for name, path in summary["outputs"].items():
        lines.append(f"  {name + ':':<14} {path}")
    return "\n".join(lines)
