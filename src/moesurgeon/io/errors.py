"""The one exception type of `moesurgeon.io`.

Every problem with a checkpoint on disk, or with a patch that does not fit the
checkpoint, is raised as `CheckpointError`. Messages follow one pattern: which
file or tensor, what was expected, what was found, and what to do about it.
It subclasses ValueError so that callers that already catch bad input as
ValueError keep working.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint (or a patch for it) is unreadable, inconsistent or unwritable."""
