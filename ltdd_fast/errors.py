"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""


class LTDDError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""


class DataError(LTDDError):
    """A data directory or file is missing, malformed, or does not fit the request."""


class ConfigError(LTDDError):
    """A setting is out of range or unknown (imbalance factor, IPC, model or data set name)."""


class TrajectoryError(LTDDError):
    """An expert trajectory is truncated, corrupt, or does not match the data or model."""
