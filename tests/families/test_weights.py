"""Random weights: a hash RNG equal to a pure-Python reference, PyTorch's default scales."""

from __future__ import annotations

import math

import pytest
import torch

from astraea.families import get_family
from astraea.families.weights import hashed_uniform


def _reference(index: int, key: int) -> float:
    """murmur3 fmix32 over a Weyl sequence, in plain Python integers."""
    m = 0xFFFFFFFF
    x = (index * 0x9E3779B9 + (key & m)) & m
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & m
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & m
    x ^= x >> 16
    return (x >> 8) * (2.0 / (1 << 24)) - 1.0


def test_hash_matches_python_reference():
    key = 0xDEADBEEF12345
    values = hashed_uniform(5000, key, torch.device("cpu"))
    for i in (0, 1, 2, 777, 4999):
        assert values[i].item() == _reference(i, key)


def test_hash_distribution():
    v = hashed_uniform(1 << 20, 7, torch.device("cpu"))
    assert v.min() >= -1 and v.max() < 1
    assert abs(v.mean().item()) < 3e-3 and abs(v.std().item() - 1 / math.sqrt(3)) < 3e-3
    assert not torch.equal(v[:100], hashed_uniform(100, 8, torch.device("cpu")))


def test_tiny_weights_follow_pytorch_defaults():
    fam = get_family("wan")
    model = fam.build_random(fam.preset("tiny"), torch.device("cpu"), torch.bfloat16, 0)
    q = model.blocks[0].attn1.to_q
    bound = 1 / math.sqrt(q.in_features)
    w = q.weight.float()
    assert w.abs().max() <= bound * 1.01 and abs(w.std().item() - bound / math.sqrt(3)) < 0.2 * bound
    assert torch.all(model.blocks[0].attn1.norm_q.weight == 1)
    assert model.scale_shift_table.dtype == torch.float32 and q.weight.dtype == torch.bfloat16
    again = fam.build_random(fam.preset("tiny"), torch.device("cpu"), torch.bfloat16, 0)
    other = fam.build_random(fam.preset("tiny"), torch.device("cpu"), torch.bfloat16, 1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert not torch.equal(q.weight, other.blocks[0].attn1.to_q.weight)


@pytest.mark.gpu
def test_same_weights_on_cpu_and_gpu(family_preset):
    family, preset = family_preset
    fam = get_family(family)
    cpu = fam.build_random(fam.preset(preset), torch.device("cpu"), torch.float32, 3)
    gpu = fam.build_random(fam.preset(preset), torch.device("cuda"), torch.float32, 3)
    for (name, a), b in zip(cpu.state_dict().items(), gpu.state_dict().values()):
        assert torch.equal(a, b.cpu()), name
