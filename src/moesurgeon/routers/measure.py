"""Moved: `measure` / `Measurement` live in moesurgeon.measure, `role_share` in routers/role_share.py."""
from ..measure import Measurement, measure  # noqa: F401
from .role_share import role_share  # noqa: F401
