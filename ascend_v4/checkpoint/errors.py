"""Errors raised while resolving, reading, validating and loading checkpoints."""

from __future__ import annotations

from collections.abc import Sequence

# How many individual problems a `CheckpointError` message lists before summarising the rest.
MAX_LISTED_PROBLEMS = 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: malformed file, missing/unexpected tensor, wrong shape or dtype.

    `problems` holds every problem found (each a line naming the file and the tensor); the message lists the
    first `MAX_LISTED_PROBLEMS` and counts the rest, so one run shows everything that is wrong.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        self.problems = list(problems)
        super().__init__(message)

    @classmethod
    def from_problems(cls, where: str, problems: Sequence[str]) -> "CheckpointError":
        n = len(problems)
        lines = [f"{where}: {n} problem{'s' if n != 1 else ''} found:"]
        lines += [f"  - {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
        if n > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {n - MAX_LISTED_PROBLEMS} more")
        return cls("\n".join(lines), problems)


class ModelNotFoundError(CheckpointError):
    """`resolve_model` found no checkpoint for the requested model; the message lists every place looked."""


__all__ = ["CheckpointError", "ModelNotFoundError", "MAX_LISTED_PROBLEMS"]
