"""The cameras' newest-frame mailboxes and the fair order the worker serves them in. No rclpy here.

Each camera has one slot: a new frame replaces the one still waiting (superseded). The worker takes the frames that
wait, at most one per camera, starting after the camera it served last: a camera whose topic floods only ever
replaces its own frame, so it cannot starve another, and a camera that has gone quiet has no frame to wait for.
"""

from __future__ import annotations

import threading
from typing import Dict, Generic, List, Optional, Sequence, TypeVar

Item = TypeVar("Item")


class CameraMailboxes(Generic[Item]):
    """One newest-item slot per camera, thread-safe; :meth:`take` hands out waiting items round-robin."""

    def __init__(self, cameras: Sequence[str] = ("",)) -> None:
        if len(set(cameras)) != len(cameras) or not cameras:
            raise ValueError(f"cameras must be distinct and at least one, got {list(cameras)}")
        self._order: List[str] = list(cameras)
        self._slots: Dict[str, Optional[Item]] = {camera: None for camera in cameras}
        self._next = 0  # index in _order where the next take starts (after the camera served last)
        self._cond = threading.Condition()
        self._closed = False

    @property
    def cameras(self) -> List[str]:
        """The cameras, in the order they were given."""
        return list(self._order)

    def put(self, camera: str, item: Item) -> bool:
        """Store ``camera``'s newest ``item``; True when it replaced one the worker never took (superseded)."""
        with self._cond:
            superseded = self._slots[camera] is not None
            self._slots[camera] = item
            self._cond.notify()
        return superseded

    def take(self, timeout: Optional[float] = None, limit: int = 0) -> List[Item]:
        """The waiting items, at most one per camera and at most ``limit`` (0 = no limit), in round-robin order
        from the camera after the last one served. Waits up to ``timeout`` s for one; [] on timeout or once
        closed."""
        with self._cond:
            if not self._closed and not any(item is not None for item in self._slots.values()):
                self._cond.wait(timeout)
            if self._closed:
                return []
            taken: List[Item] = []
            count, start = len(self._order), self._next
            for offset in range(count):
                index = (start + offset) % count
                item = self._slots[self._order[index]]
                if item is None:
                    continue
                taken.append(item)
                self._slots[self._order[index]] = None
                self._next = (index + 1) % count
                if limit and len(taken) >= limit:
                    break
            return taken

    def close(self) -> List[Item]:
        """Wake every waiter; later :meth:`take` calls return []. Returns the items nobody took."""
        with self._cond:
            self._closed = True
            left = [item for item in self._slots.values() if item is not None]
            self._slots = {camera: None for camera in self._order}
            self._cond.notify_all()
        return left

    def __len__(self) -> int:
        with self._cond:
            return sum(item is not None for item in self._slots.values())
