"""Errors that mean "the user asked for something we cannot do".

The CLI turns a :class:`UserError` into one line on stderr and exit code 2, with no
traceback; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: config, data file, model path, output folder.

    The message must be one line that names the file, line or field and says what was
    expected, e.g. ``config.yaml: perturb.kl_penalty: expected a number >= 0, got -1``.
    """


class TrainingDiverged(UserError):
    """A training stage produced a non-finite loss; the stage is stopped and nothing
    of it is written (earlier artifacts stay as they were)."""
