"""The coordinator server (docs/design.md §1, §5): namespace ops, 2PC driver, membership, GC."""

from .config import CoordinatorConfig, add_coordinator_arguments, config_from_args
from .main import run
from .service import CoordinatorService

__all__ = [
    "CoordinatorConfig",
    "CoordinatorService",
    "add_coordinator_arguments",
    "config_from_args",
    "run",
]
