"""The one exception type raised for unreadable, inconsistent or unsafe checkpoint files."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file or folder is malformed, inconsistent or unsafe to load.

    Messages always name the offending file and, where one is involved, the tensor key (plus the shapes,
    dtypes or offsets that disagree), so a user can tell which download or export to redo.
    """
