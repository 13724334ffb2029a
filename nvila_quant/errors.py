"""Exception types. Every error names the file or field at fault and, where one exists, a fix."""

__all__ = ["CheckpointError", "ConfigError", "DecodeError", "MediaError", "NVILAError", "OutputExistsError",
           "PromptError"]


class NVILAError(Exception):
    """Base class of every error this package raises on purpose."""


class CheckpointError(NVILAError, ValueError):
    """A checkpoint folder or file is missing, corrupt, or inconsistent with its config."""


class ConfigError(NVILAError, ValueError):
    """A config field has a value this package cannot use."""


class MediaError(NVILAError, ValueError):
    """An image or video cannot be read or has an unusable shape."""


class PromptError(NVILAError, ValueError):
    """A prompt's media tokens do not match the media given, or a prompt part has the wrong type."""


class OutputExistsError(NVILAError, FileExistsError):
    """The output folder exists and --overwrite was not given."""


class DecodeError(NVILAError, RuntimeError):
    """A decode mode asked for explicitly (NVILA_QUANT_DECODE=graph|compiled) cannot run here."""
