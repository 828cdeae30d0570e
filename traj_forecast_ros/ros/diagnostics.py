"""The node's ``/diagnostics`` status: level, message and key/values from :class:`PipelineStats` snapshots, for the
node and (with several cameras) for each camera under ``<camera>/<key>``."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from traj_forecast_ros.ros.stats import reason_category


def _fmt_ms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000.0:.1f}"


def frame_counts(snapshot: Dict[str, Any], prefix: str = "") -> Dict[str, str]:
    """Every frame received is published, dropped or rejected: ``frames_received = forecasts_published +
    dropped_total + rejected_total``. dropped_total: good frames not forecast, for lack of time (superseded,
    too_old, stopped) or by the node's own failure (model or publishing; failed_total is that part of
    dropped_total). rejected_total: bad input. Per reason: dropped.<reason> sum to dropped_total, rejected.<reason>
    to rejected_total. ``prefix`` goes before every key."""
    values = {f"{prefix}frames_received": str(snapshot["received"]),
              f"{prefix}forecasts_published": str(snapshot["published"])}
    totals = {"dropped_total": 0, "rejected_total": 0, "failed_total": 0}
    per_reason: Dict[str, str] = {}
    for reason, count in sorted(snapshot["not_forecast"].items()):
        category = reason_category(reason)
        kind = "rejected" if category == "rejected" else "dropped"
        totals[f"{kind}_total"] += count
        if category == "failed":
            totals["failed_total"] += count
        per_reason[f"{prefix}{kind}.{reason}"] = str(count)
    values.update({f"{prefix}{key}": str(count) for key, count in totals.items()})
    values.update(per_reason)
    return values


def camera_values(camera: str, snapshot: Dict[str, Any]) -> Dict[str, str]:
    """One camera's counters and rates, each key prefixed with ``<camera>/``."""
    values = frame_counts(snapshot, prefix=f"{camera}/")
    values[f"{camera}/input_rate_hz"] = f"{snapshot['input_rate_hz']:.2f}"
    values[f"{camera}/forecast_rate_hz"] = f"{snapshot['forecast_rate_hz']:.2f}"
    values[f"{camera}/processing_latency_p50_ms"] = _fmt_ms(snapshot["processing_p50_s"])
    return values


def diagnostic_status(name: str, state: str, snapshot: Dict[str, Any], model: Dict[str, str],
                      consecutive_failures: int, fp32_fallbacks: int = 0, transition_error: str = "",
                      instruction_ignored: bool = False,
                      cameras: Optional[Dict[str, Dict[str, Any]]] = None, models_loaded: int = 0,
                      batch_sizes: Sequence[int] = ()) -> DiagnosticStatus:
    """One ``DiagnosticStatus`` summarising the node: level, message and key/values from a stats snapshot.

    ``fp32_fallbacks``: forecasts of the loaded model rerun in float32 after a non-finite half-precision result.
    ``transition_error``: why the last lifecycle transition failed ('' = it succeeded); the level is then ERROR.
    ``instruction_ignored``: an instruction is set but the model has no language input (WARN while active).
    ``cameras``: camera name -> its own snapshot; each adds ``<camera>/frames_received``, ``<camera>/
    forecasts_published``, ``<camera>/dropped_total``, ``<camera>/rejected_total``, ``<camera>/failed_total``, its
    ``<camera>/dropped.<reason>`` and ``<camera>/rejected.<reason>`` (summing like the node's) and its rates.
    ``models_loaded``: models loaded since the node started (one per configure/activate, whatever the number of
    cameras); ``batch_sizes``: frames per forecaster call, the recent ones (``batch_size_max``: cameras batched).
    Rates and ``processing_latency`` use the wall clock; ``stamp_age`` the node clock (simulated time under
    ``use_sim_time``).
    """
    values = {
        "state": state,
        "model": model.get("model_id", ""),
        "device": model.get("device", ""),
        "dtype": model.get("dtype", ""),
        "threads": model.get("threads", ""),
        "sampling_plan": model.get("plan", ""),
        "fp32_fallbacks": str(fp32_fallbacks),
        "input_rate_hz": f"{snapshot['input_rate_hz']:.2f}",
        "forecast_rate_hz": f"{snapshot['forecast_rate_hz']:.2f}",
        # Two clocks, named: processing = frame received -> forecast published on the wall clock (what the node
        # costs); stamp_age = header stamp -> published on the node clock (simulated time under use_sim_time).
        "processing_latency_p50_ms": _fmt_ms(snapshot["processing_p50_s"]),
        "processing_latency_p95_ms": _fmt_ms(snapshot["processing_p95_s"]),
        "stamp_age_p50_ms": _fmt_ms(snapshot["stamp_age_p50_s"]),
        "stamp_age_p95_ms": _fmt_ms(snapshot["stamp_age_p95_s"]),
        "inference_p50_ms": _fmt_ms(snapshot["inference_p50_s"]),
        "inference_p95_ms": _fmt_ms(snapshot["inference_p95_s"]),
        "overhead_p50_ms": _fmt_ms(snapshot["overhead_p50_s"]),
        "overhead_p95_ms": _fmt_ms(snapshot["overhead_p95_s"]),
    }
    values["models_loaded"] = str(models_loaded)
    values["batch_size_max"] = str(max(batch_sizes, default=0))
    values.update(frame_counts(snapshot))
    for camera, camera_snapshot in (cameras or {}).items():
        values.update(camera_values(camera, camera_snapshot))
    values["instruction_ignored"] = str(instruction_ignored).lower()
    values["last_transition_error"] = transition_error

    if transition_error:
        level, message = DiagnosticStatus.ERROR, transition_error
    elif state != "active":
        level, message = DiagnosticStatus.OK, f"{state}: not forecasting"
    elif consecutive_failures >= 3:
        level, message = DiagnosticStatus.ERROR, f"the last {consecutive_failures} forecasts failed"
    elif snapshot["input_rate_hz"] == 0.0 and snapshot["received"] == 0:
        level, message = DiagnosticStatus.WARN, "no images received yet"
    elif snapshot["input_rate_hz"] > 0.0 and snapshot["forecast_rate_hz"] == 0.0 and snapshot["published"] == 0:
        level, message = DiagnosticStatus.WARN, "images arrive but no forecast has been published"
    elif instruction_ignored:
        level, message = DiagnosticStatus.WARN, ("the model has no language input: the instruction is ignored "
                                                 f"(forecasting at {snapshot['forecast_rate_hz']:.2f} Hz)")
    else:
        level, message = DiagnosticStatus.OK, f"forecasting at {snapshot['forecast_rate_hz']:.2f} Hz"
    status = DiagnosticStatus(level=level, name=name, message=message, hardware_id=model.get("device", ""))
    status.values = [KeyValue(key=key, value=value) for key, value in values.items()]
    return status
