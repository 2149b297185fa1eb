"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class FrugalError(Exception):
    """Base class: anything raised from user input (config, corpus, checkpoint, request)."""


class ConfigError(FrugalError, ValueError):
    """A configuration field is missing, mistyped or out of range."""


class CheckpointError(FrugalError):
    """A checkpoint directory or tensor is missing, mis-shaped or incompatible."""


class DataError(FrugalError):
    """A corpus is missing, empty or unreadable."""


class ResourceError(FrugalError):
    """A run or request does not fit the memory or device it was given."""


class DeviceError(FrugalError):
    """A backend or device was asked for that this machine does not have."""
