"""CPU cores this process may use (affinity mask, cgroup CPU quota) and the thread-count policy built on them.

Used for torch's intra-op threads (the node's and CLIs' ``threads: 0``, for which the CPU sampling plan is chosen)
and for worker-process counts (``traj-forecast data --workers``). No ROS imports here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read_first_line(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="ascii").strip().splitlines()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> Optional[float]:
    """The CPU quota of this process's cgroup in cores (e.g. 1.5), or None when unlimited or unreadable.

    cgroup v2: ``<root>/cpu.max`` = ``"<quota> <period>"`` (``"max ..."`` = no limit); cgroup v1:
    ``<root>/cpu[,cpuacct]/cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1 = no limit).
    """
    line = _read_first_line(root / "cpu.max")
    if line is not None:
        fields = line.split()
        if len(fields) == 2 and fields[0] != "max":
            try:
                quota, period = int(fields[0]), int(fields[1])
            except ValueError:
                return None
            return quota / period if quota > 0 and period > 0 else None
        return None
    for controller in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        quota_line = _read_first_line(root / controller / "cpu.cfs_quota_us")
        period_line = _read_first_line(root / controller / "cpu.cfs_period_us")
        if quota_line is None or period_line is None:
            continue
        try:
            quota, period = int(quota_line), int(period_line)
        except ValueError:
            return None
        return quota / period if quota > 0 and period > 0 else None
    return None


def available_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPU cores this process may run on: its affinity mask (else the CPU count), capped by the cgroup CPU quota
    (containers: ``docker --cpus``, Kubernetes limits) rounded up."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cores = max(1, os.cpu_count() or 1)
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return cores


def resolve_threads(requested: int = 0) -> int:
    """Torch intra-op threads for a node or CLI: ``requested`` when positive, else (0 = auto) the cores available."""
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ValueError(f"threads must be 0 (auto: the cores available) or a positive int, got {requested!r}")
    return requested or available_cores()
