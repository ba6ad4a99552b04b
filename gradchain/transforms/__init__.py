"""The small transforms, one file per family."""

from . import moments, momentum, regularization, scaling
from .moments import *  # noqa: F403
from .momentum import *  # noqa: F403
from .regularization import *  # noqa: F403
from .scaling import *  # noqa: F403

__all__ = [
    *momentum.__all__,
    *moments.__all__,
    *regularization.__all__,
    *scaling.__all__,
]
