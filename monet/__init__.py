"""monet: train a PyTorch model within a memory budget at the least added time.

    >>> import monet
    >>> opt = monet.optimize(model, budget="6GiB", example_inputs=(x,))
    >>> loss_fn(opt(x), y).backward(); optimizer.step()
    >>> print(opt.report())
"""

from monet.api import OptimizedModule, Report, optimize, parse_budget
from monet.capture import CaptureError
from monet.config import Config
from monet.runtime import ddp_bucket_bytes
from monet.solver.schedule import InfeasibleBudgetError

__all__ = [
    "CaptureError",
    "Config",
    "InfeasibleBudgetError",
    "OptimizedModule",
    "Report",
    "ddp_bucket_bytes",
    "optimize",
    "parse_budget",
]
__version__ = "0.1.0"
