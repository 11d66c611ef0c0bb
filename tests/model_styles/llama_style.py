"""A model whose constructor takes one annotated config dataclass (Llama/Mistral reference
style), with its layers in the file beside it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layers import RMSNorm, TransformerBlock


@dataclass
class ModelArgs:
    dim: int = 32
    n_layers: int = 1
    n_heads: int = 2
    vocab_size: int = -1
    max_seq_len: int = 64


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(params.dim, params.n_heads)
                                    for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h)).float()
