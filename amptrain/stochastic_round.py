"""AdamW for bf16 weights with stochastic rounding (`--compensation sr`), seeded per step.

A bf16 weight has 8 significant bits: an update smaller than half the spacing at the weight's
magnitude rounds back to the old value under round-to-nearest and is lost, every step.
Rounding up with probability equal to the fraction of the spacing the exact value covers
(stochastic rounding) keeps every update in expectation, with no buffer: bf16 weights,
gradients and moments, 8 bytes a parameter against Kahan summation's 10.

The update is computed in fp32 from the bf16 values and rounded once into each bf16 tensor
(the weight and both moments). The random bits come from a generator seeded from the run's
seed, the step and the parameter's index, so they are a function of where the run is, not of
what ran before: a resumed run, or another rank of a DDP run, draws the same bits. Parameters
kept in fp32 (embeddings, norms, biases) get plain AdamW.

torchao's AdamW has the same rounding (`bf16_stochastic_round`), but it draws from the global
generator inside a `torch.compile`d step: it needs a compiler, and it is seeded by whatever
else used the global generator. torch-optimi has Kahan summation, not stochastic rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

_LOW_16 = 0xFFFF
_HIGH_16 = -65536  # 0xFFFF0000 as an int32 mask


def round_stochastic(value: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """fp32 `value` rounded to bf16, up or down, with the probability of its distance.

    `noise` holds uniform integers in [0, 2**16) of `value`'s shape. Adding them to the 16
    bits that bf16 drops carries into the kept bits with probability (dropped bits) / 2**16,
    then the dropped bits are cleared; the sign bit is untouched, so magnitudes round alike
    for both signs. The result is exact in bf16, so the final cast does not round again.
    """
    bits = value.float().contiguous().view(torch.int32)
    return ((bits + noise) & _HIGH_16).view(torch.float32).to(torch.bfloat16)


def step_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for parameter `index` at optimizer step `step` of a run seeded `seed`."""
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + index) % (2**64)
    mixed ^= mixed >> 31
    return (mixed * 0x94D049BB133111EB) % (2**63)


class StochasticAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose bf16 tensors are updated by stochastic rounding.

    Its state per parameter is `step` (an int), `exp_avg` and `exp_avg_sq` in the parameter's
    dtype. There is no other state: the random bits depend on (`seed`, step, index).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        seed: int = 0,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group, index)
                index += 1
        return loss

    def _update(self, param: torch.Tensor, group: dict, index: int) -> None:
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        state["step"] += 1
        step, lr = state["step"], group["lr"]
        beta1, beta2 = group["betas"]
        grad = param.grad.float()
        exp_avg, exp_avg_sq = state["exp_avg"].float(), state["exp_avg_sq"].float()
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        weight = param.float()
        weight.mul_(1 - lr * group["weight_decay"])
        weight.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
        if param.dtype != torch.bfloat16:  # fp32: the state was updated in place
            if weight.data_ptr() != param.data_ptr():
                param.copy_(weight)
            return
        generator = self._generator(param.device)
        generator.manual_seed(step_seed(self.seed, step, index))
        bits = torch.randint(-(2**31), 2**31, (2, *param.shape), dtype=torch.int32,
                             device=param.device, generator=generator)  # fmt: skip
        param.copy_(round_stochastic(weight, bits[0] & _LOW_16))
        state["exp_avg"].copy_(round_stochastic(exp_avg, bits[1] & _LOW_16))
        state["exp_avg_sq"].copy_(round_stochastic(exp_avg_sq, (bits[1] >> 16) & _LOW_16))

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    def state_dict(self) -> dict:
        """The optimizer state torch saves, with the seed (a resume must draw the same bits)."""
        state = super().state_dict()
        for group in state["param_groups"]:
            group["sr_seed"] = self.seed
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as torch does, taking the saved seed back."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            self.seed = group.pop("sr_seed", self.seed)
