"""Deterministic per-tensor initialization (models/build.py): drawn from (seed, global name), scaled
as megatron scales output layers, and on a GPU drawn there (the CPU draw took minutes for 1.2B)."""

from __future__ import annotations

import math

import pytest
import torch


def _shape():
    from alfred_train.models.build import ModelShape

    return ModelShape(arch="llama", num_layers=8, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                      num_query_groups=2, vocab_size=500, padded_vocab_size=512, max_seq_len=64,
                      rotary_base=10000, norm_eps=1e-5, parallel_layernorms=2, init_std=0.02)


def _check(device_type):
    from alfred_train.models.build import _global_init

    ms, device = _shape(), torch.device(device_type)
    fc1, fc2 = "decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc2.weight"
    a = _global_init(fc1, (512, 512), 1, ms, device)
    assert a.device.type == device_type and a.dtype == torch.float32
    assert torch.equal(a, _global_init(fc1, (512, 512), 1, ms, device))  # the same seed and name
    assert not torch.equal(a, _global_init(fc1, (512, 512), 2, ms, device))  # another seed
    assert not torch.equal(a, _global_init("decoder.layers.1.mlp.linear_fc1.weight", (512, 512), 1, ms,
                                           device))  # another tensor
    assert a.std().item() == pytest.approx(0.02, rel=0.02) and abs(a.mean().item()) < 1e-3
    out = _global_init(fc2, (512, 512), 1, ms, device)  # output layers: std / sqrt(2 L)
    assert out.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.02)
    norm = _global_init("decoder.final_layernorm.weight", (64,), 1, ms, device)
    assert norm.device.type == device_type and bool((norm == 1).all())


def test_global_init_is_seeded_per_tensor_and_scaled():
    _check("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_global_init_draws_on_the_gpu():
    _check("cuda")
