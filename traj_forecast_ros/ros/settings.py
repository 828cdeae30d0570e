"""An immutable snapshot of the node's parameter values, taken when a frame arrives.

The worker forecasts and publishes a frame with the snapshot it carries, so it never calls back into the node for a
parameter, and a parameter change never lands half-way through a frame. No rclpy here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, Iterator, Mapping, Optional


@dataclass(frozen=True)
class Settings:
    """Parameter name -> value (per-camera ones, ``<camera>.<field>``, included); read-only."""

    values: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def __contains__(self, name: object) -> bool:
        return name in self.values

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def get(self, name: str, default: Optional[Any] = None) -> Any:
        """The value of ``name``, or ``default`` when it is not a parameter."""
        return self.values.get(name, default)

    def updated(self, changes: Mapping[str, Any]) -> "Settings":
        """A new snapshot with ``changes`` applied (this one is left as it is)."""
        merged: Dict[str, Any] = dict(self.values)
        merged.update(changes)
        return Settings(merged)
