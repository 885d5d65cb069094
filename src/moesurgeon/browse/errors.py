"""The one exception type of the checkpoint browser: bad input, said in one line.

`BrowseError` subclasses the project's `ConfigError`, so the command line prints its message alone
(status 2) like every other user mistake: a directory that is not a checkpoint, a usage file from
another model, a setting out of range.
"""

from __future__ import annotations

from ..errors import ConfigError


class BrowseError(ConfigError):
    """Input the browser cannot use: the message names the value, what was expected and the fix."""
