"""A parameter's specification (:class:`ParamSpec`: default, range, choices, descriptor) and an immutable snapshot
of the node's parameter values (:class:`Settings`), taken when a frame arrives.

The worker forecasts and publishes a frame with the snapshot it carries, so it never calls back into the node for a
parameter, and a parameter change never lands half-way through a frame. No rclpy here except the descriptor
messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor


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


@dataclass(frozen=True)
class ParamSpec:
    """One node parameter: default, description, and the allowed range or choices (checked on every set)."""

    name: str
    default: Any
    description: str
    low: Optional[float] = None
    high: Optional[float] = None
    choices: Optional[Tuple[str, ...]] = None
    pattern: Optional[str] = None  # regular expression a string value must match in full
    model_default: Optional[Any] = None  # a value outside [low, high] meaning "the model's own setting"

    def descriptor(self) -> ParameterDescriptor:
        """The ROS descriptor (description, range, constraints) shown by ``ros2 param describe``."""
        constraints = ""
        if self.choices:
            constraints = "one of: " + ", ".join(self.choices)
        elif self.pattern:
            constraints = f"matches: {self.pattern}"
        descriptor = ParameterDescriptor(name=self.name, description=self.description,
                                         additional_constraints=constraints)
        if self.low is not None and isinstance(self.default, bool):
            raise TypeError(f"{self.name}: a bool parameter has no range")
        low = self.low if self.model_default is None else min(self.low, self.model_default)
        if self.low is not None and isinstance(self.default, int):
            descriptor.integer_range = [IntegerRange(from_value=int(low), to_value=int(self.high), step=1)]
        elif self.low is not None:
            descriptor.floating_point_range = [FloatingPointRange(from_value=float(low),
                                                                  to_value=float(self.high), step=0.0)]
        return descriptor

    def check(self, value: Any) -> Optional[str]:
        """Why ``value`` is not allowed, or None when it is."""
        if self.choices and value not in self.choices:
            return f"'{self.name}' must be one of {list(self.choices)}, got '{value}'"
        if self.pattern and not re.fullmatch(self.pattern, str(value)):
            return f"'{self.name}' must match {self.pattern}, got '{value}'"
        if self.model_default is not None and value == self.model_default:
            return None
        if self.low is not None and not (self.low <= value <= self.high):
            alternative = "" if self.model_default is None else f" (or {self.model_default}: the model's own)"
            return f"'{self.name}' must be in [{self.low}, {self.high}]{alternative}, got {value}"
        return None
