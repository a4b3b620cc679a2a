"""The bundled model's text encoder: a fixed vocabulary and a learned embedding table.

Words outside the vocabulary map to <unk>; the rows past the prompt's words are zero and
masked out, like a padded T5 output. Trained jointly with the transformer.
"""

from __future__ import annotations

import torch
from torch import nn

from .data import vocabulary

SPECIALS = ("<pad>", "<unk>")


class TextEncoder(nn.Module):
    def __init__(self, dim: int, length: int, words: list[str] | None = None):
        super().__init__()
        self.words = list(SPECIALS) + (words or vocabulary())
        self.index = {w: i for i, w in enumerate(self.words)}
        self.length = length
        self.embed = nn.Embedding(len(self.words), dim)
        self.position = nn.Parameter(torch.zeros(length, dim))
        nn.init.normal_(self.embed.weight, std=1.0)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.length, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            words = prompt.lower().replace(",", " ").split()[: self.length]
            ids[i, : len(words)] = torch.tensor([self.index.get(w, 1) for w in words], dtype=torch.long)
        return ids

    def forward(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenize(prompts).to(self.embed.weight.device)
        mask = (ids != 0).unsqueeze(-1)
        return (self.embed(ids) + self.position) * mask  # (B, L, D), zero past the words
