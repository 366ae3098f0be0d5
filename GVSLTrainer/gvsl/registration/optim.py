"""The optimiser of instance optimisation, and when to stop it."""
from __future__ import annotations

import torch


class Adam:
    """Adam (Kingma & Ba, 2015) with ``torch.optim.Adam``'s defaults, for the few tensors of a registration.

    ``torch.optim`` imports ``torch._dynamo`` when its first optimiser is built: 1.7 s on two CPU
    cores, longer than a whole affine stage. The update here is the same arithmetic (a test checks it
    against ``torch.optim.Adam`` step by step).
    """

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, (v.sqrt() / c2 ** 0.5).add_(self.eps), value=-self.lr / c1)


class Stopper:
    """Early stopping: the loss improved by less than ``tolerance`` (relative) over ``patience`` steps."""

    def __init__(self, tolerance: float, patience: int):
        self.tolerance, self.patience, self.history = tolerance, patience, []

    def __call__(self, loss: float) -> bool:
        self.history.append(loss)
        if len(self.history) <= self.patience:
            return False
        old = self.history[-self.patience - 1]
        return (old - loss) / max(abs(old), 1e-8) < self.tolerance
