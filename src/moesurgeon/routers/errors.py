"""The one error type of custom routers: a configuration that cannot be honoured, with the fix in the message."""

from __future__ import annotations


class RouterConfigError(ValueError):
    """A custom-router, role or export setting is invalid; the message names the value, what was
    expected and how to fix it. Raised before any forward pass, so a bad config never runs."""
