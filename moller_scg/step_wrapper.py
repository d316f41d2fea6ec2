"""``SCG.step`` behind torch.optim's step wrapper only when something listens to it.

``torch.optim.Optimizer`` wraps every optimizer's ``step`` (``Optimizer.profile_hook_step``): the wrapper opens a
profiler range named ``Optimizer.step#SCG.step`` and calls the step pre- and post-hooks, the optimizer's own
(``register_step_pre_hook``) and the global ones (``torch.optim.optimizer.register_optimizer_step_pre_hook``). With
no profiler running and no hook registered it does nothing a caller can observe, yet it costs 36 µs a call warm
(23 µs of it the profiler range, which dispatches an operator whether or not a profiler listens) and about 100 µs
with the CPU's caches cold, as between two gradient passes. ``torch.optim.LBFGS`` pays it once per 20 iterations of
its step; SCG, one evaluation per step, paid it at every one — on the logistic problem of
``benchmarks/peers.py``, whose gradient pass takes about a millisecond, a tenth of a pass each time (lever 37 in
docs/performance.md).

:func:`profile_hook_step_when_needed` is SCG's ``profile_hook_step``: torch's wrapper whenever a profiler runs
(``torch.autograd._profiler_enabled()``) or any step hook is registered, and the step itself otherwise. Should torch
rename the hook registries it reads, every call goes through torch's wrapper, as before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import torch
import torch.optim.optimizer as torch_optimizer

_P = ParamSpec("_P")
_R = TypeVar("_R")


def profile_hook_step_when_needed(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """``func`` (``step``) wrapped so that it runs behind ``torch.optim.Optimizer.profile_hook_step``'s wrapper only
    when a profiler or a step hook would see it (module docstring)."""
    hooked = torch.optim.Optimizer.profile_hook_step(func)

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        optimizer, *_ = args
        if _listened_to(optimizer):
            return hooked(*args, **kwargs)
        return func(*args, **kwargs)

    return wrapper


def _listened_to(optimizer: Any) -> bool:
    """Whether a profiler runs or a step hook is registered, for this optimizer or globally (true when torch no longer
    has a registry this reads)."""
    profiler_enabled = getattr(torch.autograd, "_profiler_enabled", None)
    return (
        profiler_enabled is None
        or profiler_enabled()
        or bool(getattr(optimizer, "_optimizer_step_pre_hooks", True))
        or bool(getattr(optimizer, "_optimizer_step_post_hooks", True))
        or bool(getattr(torch_optimizer, "_global_optimizer_pre_hooks", True))
        or bool(getattr(torch_optimizer, "_global_optimizer_post_hooks", True))
    )
