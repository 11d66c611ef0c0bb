"""The built-in model: a small GPT (pre-LayerNorm decoder, causal SDPA attention, tied embeddings).

It is the default for `amptrain demo` and the tests, and a readable reference for what a
custom model must look like: `forward(ids [B, T]) -> logits [B, T, V]`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from amptrain.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Size of the built-in GPT."""

    vocab_size: int = 256
    """Number of token ids; 256 for byte-level text."""
    n_layer: int = 4
    """Transformer blocks."""
    n_embd: int = 256
    """Width of the residual stream."""
    n_head: int = 4
    """Attention heads; must divide n_embd."""
    block_size: int = 128
    """Longest sequence (context) the position table covers."""
    dropout: float = 0.0
    """Dropout probability in attention and MLP outputs."""

    def __post_init__(self) -> None:
        for field in ("vocab_size", "n_layer", "n_embd", "n_head", "block_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"tiny-gpt {field}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"tiny-gpt width {self.n_embd} is not divisible by heads {self.n_head}; "
                "choose --width as a multiple of --heads"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"tiny-gpt dropout={self.dropout!r} must be a number in [0, 1)")

    @property
    def n_params(self) -> int:
        """Parameters of the model this config builds (the output head is tied to `wte`)."""
        d, per_block = self.n_embd, 12 * self.n_embd**2 + 13 * self.n_embd
        return (self.vocab_size + self.block_size) * d + self.n_layer * per_block + 2 * d


class Block(nn.Module):
    """One pre-LayerNorm transformer block: causal self-attention, then a 4x MLP."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual attention then residual MLP."""
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """A small GPT language model. Takes token ids `[B, T]`, returns logits `[B, T, V]`."""

    def __init__(self, config: GPTConfig | None = None, **kwargs: object) -> None:
        super().__init__()
        self.config = cfg = config or GPTConfig(**kwargs)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith(("proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits `[B, T, V]` for token ids `[B, T]`."""
        t = ids.size(1)
        if t > self.config.block_size:
            raise ValueError(
                f"sequence length {t} exceeds the model's context {self.config.block_size}"
            )
        pos = torch.arange(t, device=ids.device)
        x = self.drop(self.wte(ids) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
