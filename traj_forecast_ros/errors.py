"""Exception types shared by the core, the CLI and the node (each carries a message a user can act on)."""


class TrajForecastError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidImageError(TrajForecastError, ValueError):
    """The input image cannot be forecast (empty, too large, wrong dtype/shape, NaN, unsupported encoding)."""


class CheckpointError(TrajForecastError):
    """A checkpoint is missing, truncated, of the wrong architecture, or holds non-finite weights."""


class WeightsNotFoundError(CheckpointError, FileNotFoundError):
    """Model weights are not on disk (and could not be downloaded); the message says how to get them."""


class DeviceError(TrajForecastError):
    """The requested device or dtype is not available on this machine."""


class BagError(TrajForecastError):
    """A bag cannot be read or written (missing, wrong format, unknown message type, no image topics)."""


class DatasetError(TrajForecastError, ValueError):
    """A trajectory dataset cannot be read or written (missing index, wrong shapes, NaN tracks, geometry mismatch)."""


class ForecastCancelled(TrajForecastError):
    """A forecast was stopped between denoiser steps because its caller asked (``Forecaster.forecast(cancel=...)``)."""
