"""A plain Adam for the engine: the update of ``torch.optim.Adam`` (its single-tensor CPU path, bit for
bit; ``tests/test_greedy_update.py`` checks it against the reference), without its cost at start.

Why: constructing the first ``torch.optim`` optimiser of a process imports ``torch._dynamo``
(``Optimizer.add_param_group`` is wrapped by ``torch._disable_dynamo``): measured 1.3 s with torch
2.13 on this project's CPU machine, paid by every command-line registration and every benchmark
worker -- a tenth of a 2 mm brain registration. The engine uses no feature that needs the wrapper
(no compile, no capturable or fused steps, no weight decay, no AMSGrad).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


class PlainAdam:
    """Adam (Kingma and Ba, "Adam: A Method for Stochastic Optimization") with ``torch.optim.Adam``'s
    defaults and arithmetic. Exposes what the engine touches: ``param_groups`` (a list with one dict
    whose ``"lr"`` may be changed between steps), :meth:`zero_grad` and :meth:`step`."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = list(params)
        self.param_groups: list[dict[str, Any]] = [{"params": self.params, "lr": float(lr), "betas": betas, "eps": eps}]
        # the state torch keeps per parameter: the step count (a float32 scalar, as torch stores it)
        # and the two moment estimates
        self._steps = [torch.zeros((), dtype=torch.float32) for _ in self.params]
        self._first = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self._second = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        for param, step_t, exp_avg, exp_avg_sq in zip(self.params, self._steps, self._first, self._second):
            grad = param.grad
            if grad is None:
                continue
            step_t += 1
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = step_t.item()
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = lr / bias_correction1
            denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)
