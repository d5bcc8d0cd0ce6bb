"""Exceptions raised by the stage trainer, all before any training step unless stated otherwise."""

from __future__ import annotations


class TrainConfigError(ValueError):
    """A training option is unknown, ill-typed, out of range, or does not fit the data/model."""


class OutputDirError(FileExistsError):
    """The output directory holds something the run would overwrite (and overwriting was not
    requested), or it does not look like a trainer output directory that may be replaced."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume (missing pieces, or a different configuration)."""
