"""Errors of `ascend-v4 quantize` (input-checkpoint problems are `ascend_v4.checkpoint.CheckpointError` /
`ConfigError`, raised by the reader before anything is written)."""

from __future__ import annotations


class QuantizeError(ValueError):
    """Base class: a conversion that cannot start or cannot finish."""


class DestinationConflictError(QuantizeError):
    """The output directory holds something else (another conversion, an unfinished one, unrelated files)."""


class InsufficientDiskSpaceError(QuantizeError):
    """Not enough free space for the planned output (checked before writing)."""


class SourceReadError(QuantizeError):
    """A source shard could not be read as its header promised (truncated or modified during the run)."""


class OutputWriteError(QuantizeError):
    """The output could not be written mid-run (disk full, quota, I/O error); finished files are kept for --resume."""


class NonFiniteSourceError(QuantizeError):
    """A source tensor holds a non-finite value (NaN / inf, an FP8 NaN byte, a NaN or overflowing UE8M0 scale)."""


class UnsupportedConversionError(QuantizeError):
    """The requested format / options do not apply to this checkpoint (e.g. --ep not dividing the experts)."""


class ResumeMismatchError(DestinationConflictError):
    """--resume on a destination whose unfinished conversion used another source or other arguments."""


class InjectedFailure(RuntimeError):
    """Raised by the test hook `fail_after_files` to simulate a crash at a chosen point."""


__all__ = ["QuantizeError", "DestinationConflictError", "InsufficientDiskSpaceError", "SourceReadError",
           "UnsupportedConversionError", "ResumeMismatchError", "InjectedFailure", "OutputWriteError",
           "NonFiniteSourceError"]
