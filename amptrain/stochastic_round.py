"""AdamW for bf16 weights with stochastic rounding (`--compensation sr`), seeded per step.

A bf16 weight has 8 significant bits: an update smaller than half the spacing at the weight's
magnitude rounds back to the old value under round-to-nearest and is lost, every step.
Rounding up with probability equal to the fraction of the spacing the exact value covers
(stochastic rounding) keeps every update in expectation, with no buffer: bf16 weights,
gradients and moments, 8 bytes a parameter against Kahan summation's 10.

The update is computed in fp32 from the bf16 values and rounded once into each bf16 tensor
(the weight and both moments). The random bits come from a generator seeded from the run's
seed, the step and the parameter's index, so they are a function of where the run is, not of
what ran before: a resumed run, or another rank of a DDP run on the same kind of device,
draws the same bits (CUDA's generator lays its bits out by the GPU's size). Parameters
kept in fp32 (embeddings, norms) get plain AdamW.

With `moments="8bit"` the two moments of every matrix of at least `MIN_8BIT_SIZE` elements are
kept as bitsandbytes keeps them in its 8-bit AdamW: blocks of 256 values (128 or 64 where a
row holds no multiple of 256; a block never crosses a row), each an absolute maximum and
8-bit codes on bitsandbytes' dynamic map (signed for the first moment, unsigned for the
second), dequantized for the update and quantized again after it with bitsandbytes' own
functions. A bf16 weight then costs 6 bytes: weight, gradient, two 1-byte moments. fp32
parameters take the same 8-bit moments and a plain AdamW update: this is the 8-bit AdamW of
a sharded run, whose parameters bitsandbytes' optimizer cannot step.

Under FSDP2 each process steps its own shard (whole rows of dim 0) and holds its state as
DTensors laid out as the parameter, so torch's distributed checkpoint saves, gathers and
reshards it with the weights. A shard seeds its bits by its first row too.

torchao's AdamW has the same rounding (`bf16_stochastic_round`), but it draws from the global
generator inside a `torch.compile`d step: it needs a compiler, and it is seeded by whatever
else used the global generator. torch-optimi has Kahan summation, not stochastic rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from amptrain.blockwise8 import Codec, block_of
from amptrain.shards import first_row, local_part, shard_like

_LOW_16 = 0xFFFF
_HIGH_16 = -65536  # 0xFFFF0000 as an int32 mask
CHUNK = {"cpu": 1 << 18, "cuda": 1 << 24}
"""Elements (whole rows) an update works on at a time, by device type.

On CPU 2**18: each fp32 temporary is 1 MiB, not several times the largest tensor's size (the
step held the peak of a parameter-bound run), and a chunk stays in the caches while its dozen
element-wise passes run (`benchmarks/sr_chunk.py` times the sizes). On CUDA 2**24 (64 MiB
temporaries): fewer kernel launches; not measured."""
_KEPT = (torch.uint8, torch.float32)  # state dtypes a bf16 parameter's load must not cast


def round_stochastic(value: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """fp32 `value` rounded to bf16, up or down, with the probability of its distance.

    `noise` holds uniform integers in [0, 2**16) of `value`'s shape. Adding them to the 16
    bits that bf16 drops carries into the kept bits with probability (dropped bits) / 2**16,
    then the dropped bits are cleared; the sign bit is untouched, so magnitudes round alike
    for both signs. The result is exact in bf16, so the final cast does not round again.
    """
    bits = value.float().contiguous().view(torch.int32)
    return ((bits + noise) & _HIGH_16).view(torch.float32).to(torch.bfloat16)


def _round_into(target: torch.Tensor, value: torch.Tensor, noise: torch.Tensor) -> None:
    """`target` (bf16) set to fp32 `value` rounded as `round_stochastic` does.

    `value`, a temporary, is overwritten in place instead of copied.
    """
    bits = value.view(torch.int32)
    bits.add_(noise).bitwise_and_(_HIGH_16)
    target.copy_(value)  # exact: the dropped bits are zero


def step_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for parameter `index` at optimizer step `step` of a run seeded `seed`."""
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + index) % (2**64)
    mixed ^= mixed >> 31
    return (mixed * 0x94D049BB133111EB) % (2**63)


class StochasticAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose bf16 tensors are updated by stochastic rounding.

    Its state per parameter is `step` (an int), `exp_avg` and `exp_avg_sq` in the parameter's
    dtype, or with `moments="8bit"` their uint8 codes and per-block `exp_avg_absmax` and
    `exp_avg_sq_absmax`. There is no other state: the random bits depend on (`seed`, step,
    index).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        seed: int = 0,
        moments: str = "bf16",
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.seed = seed
        self.codec = Codec() if moments == "8bit" else None
        for group in self.param_groups:  # the state first, in one stretch of memory, before
            for param in group["params"]:  # the steps' temporaries come and go around it
                self._init_state(param)
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

    def _init_state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        state["step"] = 0
        block = self._block(param)
        for name in ("exp_avg", "exp_avg_sq"):
            if block:
                state[name] = torch.zeros_like(param, dtype=torch.uint8)
                per_row = param.numel() // param.shape[0] // block
                absmax = torch.zeros(local_part(param).shape[0], per_row, device=param.device)
                state[name + "_absmax"] = shard_like(param, absmax, (param.shape[0], per_row))
            else:
                state[name] = torch.zeros_like(param)
        return state

    def _block(self, param: torch.Tensor) -> int | None:
        return block_of(param) if self.codec is not None else None

    def _update(self, param: torch.Tensor, group: dict, index: int) -> None:
        held = self.state[param] or self._init_state(param)
        held["step"] += 1
        start_row, block = first_row(param), self._block(param)
        weight, grad = (
            _rows(local_part(param)),
            _rows(local_part(param.grad)),
        )  # this process's shard
        if weight.numel() == 0:  # a shard of no rows (more processes than rows)
            return
        state = {name: _rows(local_part(value)) for name, value in held.items() if name != "step"}
        generator = None
        if weight.dtype == torch.bfloat16:
            generator = self._generator(weight.device)
            # A shard (FSDP2) seeds by its first row too: its bits are its own, not one
            # process's. The chunks draw in turn from the one seeded generator.
            generator.manual_seed(step_seed(self.seed, held["step"], index + (start_row << 32)))
        chunk = CHUNK.get(weight.device.type, CHUNK["cuda"])
        per_chunk = max(1, chunk // weight[0].numel())  # whole rows: whole 8-bit blocks
        for start in range(0, weight.shape[0], per_chunk):
            rows = slice(start, start + per_chunk)
            self._update_rows(weight[rows], grad[rows],
                              {name: value[rows] for name, value in state.items()},
                              group, held["step"], block, generator)  # fmt: skip

    def _update_rows(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: dict,
        group: dict,
        step: int,
        block: int | None,
        generator: torch.Generator | None,
    ) -> None:
        """AdamW on some rows of a tensor: their fp32 temporaries are all the step holds."""
        lr, (beta1, beta2) = group["lr"], group["betas"]
        low = param.dtype == torch.bfloat16  # fp32 tensors are updated in place, as AdamW does
        grad = grad.float()
        if block:
            exp_avg = self.codec.decode(state, "exp_avg", block, signed=True)
            exp_avg_sq = self.codec.decode(state, "exp_avg_sq", block, signed=False)
        else:
            exp_avg, exp_avg_sq = state["exp_avg"].float(), state["exp_avg_sq"].float()
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # The denominator takes the gradient's fp32 copy (fewer temporaries), not a gradient.
        denom = torch.sqrt(exp_avg_sq, out=grad) if low else exp_avg_sq.sqrt()
        denom.div_(math.sqrt(1 - beta2**step)).add_(group["eps"])
        weight = param.float()
        weight.mul_(1 - lr * group["weight_decay"])
        weight.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
        del denom, grad
        if block:
            self.codec.encode(state, "exp_avg", exp_avg, block, signed=True)
            self.codec.encode(state, "exp_avg_sq", exp_avg_sq, block, signed=False)
        if not low:
            return
        # One draw of 31 random bits an element gives the three roundings 16 bits each: bits
        # 0-15, bits 15-30, and bits 0-15 xor 8-23 (a full-rank map of uniform bits). Each is
        # uniform, so each rounding is unbiased; they are not independent of one another.
        # A non-finite gradient never gets here (the step skips it).
        bits = torch.empty(param.shape, dtype=torch.int32, device=param.device)
        bits.random_(generator=generator)
        noise = torch.bitwise_and(bits, _LOW_16)
        _round_into(param, weight, noise)
        if block:
            return
        torch.bitwise_right_shift(bits, 15, out=noise).bitwise_and_(_LOW_16)
        _round_into(state["exp_avg"], exp_avg, noise)
        torch.bitwise_right_shift(bits, 8, out=noise).bitwise_xor_(bits).bitwise_and_(_LOW_16)
        _round_into(state["exp_avg_sq"], exp_avg_sq, noise)

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
        """Load as torch does, taking the saved seed back and each state tensor's dtype.

        torch casts every saved state tensor to its parameter's dtype, which would round the
        8-bit codes' fp32 maxima to bf16: the saved tensors are put back as they were.
        """
        saved = {key: {name: value for name, value in held.items()
                       if isinstance(value, torch.Tensor) and value.dtype in _KEPT}
                 for key, held in state_dict["state"].items()}  # fmt: skip
        keys = [key for group in state_dict["param_groups"] for key in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        by_key = dict(zip(keys, params))  # as torch matches them: by position (the keys are
        for key, held in saved.items():  # indices, or names under a distributed checkpoint)
            state = self.state[by_key[key]]
            for name, value in held.items():
                state[name] = value.to(by_key[key].device, copy=True)
        for group in self.param_groups:
            self.seed = group.pop("sr_seed", self.seed)


def _rows(value: torch.Tensor) -> torch.Tensor:
    """`value` with a dim 0 to take rows of (a 0-d tensor as one row of one)."""
    return value.view(1) if value.dim() == 0 else value
