"""Exceptions raised by mixtral-offload.

Every error a user can cause derives from `MixtralOffloadError`; messages say what is wrong and how to fix it.
"""

from __future__ import annotations


class MixtralOffloadError(Exception):
    """Base class of every error raised on purpose by mixtral-offload."""


class ConfigError(MixtralOffloadError, ValueError):
    """An option has an invalid value. The message names the option and the allowed values."""


class CheckpointError(MixtralOffloadError):
    """A checkpoint directory is missing files, corrupt, or not a supported mixture-of-experts model."""


class ChecksumError(CheckpointError):
    """Expert bytes read from disk do not match the checksum recorded in the manifest."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint is valid but its model family is not supported (or has no experts)."""


class MemoryPlanError(MixtralOffloadError):
    """The requested configuration cannot fit in the memory available (or the budget given)."""


class PluginError(MixtralOffloadError):
    """A plugin is broken: duplicate name, unknown hook, or a factory that raised."""


class BackendUnavailableError(MixtralOffloadError):
    """An optional dependency or device needed by the chosen configuration is not available."""


class GenerationError(MixtralOffloadError):
    """A generation request is invalid or failed; the runtime stays usable."""


class ConstraintError(GenerationError, ValueError):
    """A JSON schema, regex or grammar given as a constraint on generation is invalid, unsupported, unsatisfiable, or
    cannot be followed with the other generation options; raised before generation where it can be known then."""


class ExpertLoadError(MixtralOffloadError):
    """Reading an expert from its store failed (I/O error, missing file); that request fails, the runtime survives."""


class ModelUnloadedError(MixtralOffloadError):
    """The model was unloaded; load it again to use it."""
