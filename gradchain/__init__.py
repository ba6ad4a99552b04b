"""gradchain: composable gradient transformations for PyTorch, in the style of optax."""

from . import combinators, diagnostics, losses, recipes, schedules, transforms
from .base import (
    Bucket,
    Chain,
    HostStep,
    Leaf,
    Transform,
    chain,
    compute_dtype,
    factory,
    scalar_state,
    transform,
    zeros_state,
)
from .combinators import *  # noqa: F403
from .evaluation import eval_params
from .hyperparams import Hyperparam
from .optimizer import ChainOptimizer, FusedGradientCopyWarning
from .transforms import *  # noqa: F403

__version__ = "0.1.0"

__all__ = [
    "Bucket",
    "Chain",
    "ChainOptimizer",
    "FusedGradientCopyWarning",
    "HostStep",
    "Hyperparam",
    "Leaf",
    "Transform",
    "chain",
    "compute_dtype",
    "factory",
    "diagnostics",
    "eval_params",
    "losses",
    "recipes",
    "scalar_state",
    "schedules",
    "transform",
    "transforms",
    "zeros_state",
    *combinators.__all__,
    *transforms.__all__,
]
