"""Attention backends and vocab-parallel log-probs/entropy against plain PyTorch references.

CPU: sdpa and eager (megatron's DotProductAttention) parity in fp32, a tiny GPTModel with KV-cache
decoding per backend, log-probs/entropy at TP=1 and at TP=2 over gloo (2 spawned processes).
GPU (`-m gpu`, skipped without CUDA): bf16 sdpa/flash against an fp32 reference, and the memory
bound of the chunked log-probs.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alfred_train.errors import ConfigError
from alfred_train.kernels.logprobs import (
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
    vocab_parallel_logprobs_and_entropy,
)

HAS_CUDA = torch.cuda.is_available()
HAS_TE = importlib.util.find_spec("transformer_engine") is not None
HAS_FLASH = importlib.util.find_spec("flash_attn") is not None and HAS_CUDA
# megatron places its buffers (and GPTModel its weights) on the GPU when there is one
DEVICE = "cuda" if HAS_CUDA else "cpu"


# ----------------------------------------------------------------------------- references


def reference_attention(q, k, v, scale, causal, masked=None):
    """softmax(q k^T * scale + mask) v with GQA head expansion, in float64.

    q (sq, b, np, hn), k/v (sk, b, ng, hn), masked: bool (b, 1, sq, sk) True = hidden.
    Causal is aligned bottom-right: query i sees keys j <= sk - sq + i. Returns (sq, b, np*hn).
    """
    q, k, v = q.double(), k.double(), v.double()
    sq, b, np_, hn = q.shape
    sk, ng = k.shape[0], k.shape[2]
    k = k.repeat_interleave(np_ // ng, dim=2)  # (sk, b, np, hn)
    v = v.repeat_interleave(np_ // ng, dim=2)  # (sk, b, np, hn)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) * scale  # (b, np, sq, sk)
    hidden = torch.zeros(sq, sk, dtype=torch.bool)
    if causal:
        hidden = ~torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
    hidden = hidden.to(q.device)
    if masked is not None:
        hidden = hidden | masked
    scores = scores.masked_fill(hidden, float("-inf"))
    probs = scores.softmax(dim=-1)  # (b, np, sq, sk)
    return torch.einsum("bhqk,kbhd->qbhd", probs, v).reshape(sq, b, np_ * hn)


def reference_logprobs_entropy(logits, targets):
    """log_softmax gather and -sum p log p over the full vocabulary, float64."""
    log_p = torch.log_softmax(logits.double(), dim=-1)  # (..., V)
    return log_p.gather(-1, targets[..., None])[..., 0], -(log_p.exp() * log_p).sum(-1)


# ----------------------------------------------------------------------------- attention


def build_core_attention(
    backend, *, heads=4, groups=2, head_dim=8, layer=1, qk_scaling=False, dtype=torch.float32
):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=4,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        apply_query_key_layer_scaling=qk_scaling,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
    )
    return backend.core_attention(
        config=config, layer_number=layer, attn_mask_type=AttnMaskType.causal, attention_type="self"
    )


def attention_inputs(sq, sk, b, heads, groups, head_dim, device=DEVICE, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, heads, head_dim, generator=gen)  # (sq, b, np, hn)
    k = torch.randn(sk, b, groups, head_dim, generator=gen)  # (sk, b, ng, hn)
    v = torch.randn(sk, b, groups, head_dim, generator=gen)  # (sk, b, ng, hn)
    grad_out = torch.randn(sq, b, heads * head_dim, generator=gen)  # (sq, b, np*hn)
    return [t.to(device, dtype) for t in (q, k, v, grad_out)]


def run_forward_backward(module, q, k, v, grad_out, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, kwargs.pop("attention_mask", None), **kwargs)
    out.backward(grad_out)
    return out, q.grad, k.grad, v.grad


def reference_forward_backward(q, k, v, grad_out, scale, causal, masked=None):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference_attention(q, k, v, scale, causal, masked)
    out.backward(grad_out.double())
    return out, q.grad, k.grad, v.grad


CPU_BACKENDS = ["sdpa", "eager"] + (["te"] if HAS_TE and HAS_CUDA else [])
CPU_BACKENDS += ["flash"] if HAS_FLASH else []

# (sq, sk, heads, groups, mask type passed at call time, description)
ATTENTION_CASES = [
    (16, 16, 4, 2, None, "train causal GQA"),
    (12, 12, 4, 4, None, "train causal MHA"),
    (1, 9, 4, 2, "no_mask", "decode 1 token, as megatron passes it after the prompt"),
    (3, 9, 4, 2, "no_mask", "decode 3 tokens against a 9-token cache"),
]


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("sq,sk,heads,groups,call_mask_type,_desc", ATTENTION_CASES)
def test_attention_matches_reference(
    megatron_world, backend_name, sq, sk, heads, groups, call_mask_type, _desc
):
    from megatron.core.transformer.enums import AttnMaskType

    from alfred_train.kernels.backends import choose_backend

    if backend_name == "eager" and 1 < sq < sk:
        pytest.skip("megatron DotProductAttention asserts sq == sk for causal masks with sq > 1")
    dtype = torch.bfloat16 if backend_name in ("te", "flash") else torch.float32
    module = build_core_attention(choose_backend(backend_name), heads=heads, groups=groups, dtype=dtype)
    q, k, v, grad_out = attention_inputs(sq, sk, 2, heads, groups, 8, dtype=dtype)
    mask_type = None if call_mask_type is None else AttnMaskType[call_mask_type]
    got = run_forward_backward(module, q, k, v, grad_out, attn_mask_type=mask_type)
    want = reference_forward_backward(q, k, v, grad_out, 8**-0.5, causal=True)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w, atol=tol, rtol=tol, msg=f"{backend_name} {name}")


@pytest.mark.parametrize("backend_name", ["sdpa", "eager"])
def test_attention_padding_mask_and_qk_layer_scaling(megatron_world, backend_name):
    """A caller's bool mask (True = hidden) is applied; layer scaling leaves the product unchanged."""
    from alfred_train.kernels.backends import choose_backend

    module = build_core_attention(choose_backend(backend_name), layer=3, qk_scaling=True)
    q, k, v, grad_out = attention_inputs(8, 8, 2, 4, 2, 8, seed=1)
    masked = ~torch.ones(8, 8, dtype=torch.bool).tril()  # (sq, sk) causal part
    masked = masked.expand(2, 1, 8, 8).clone().to(DEVICE)  # (b, 1, sq, sk)
    masked[1, :, 3:, :2] = True  # sample 1: first two keys are left padding for later queries
    got = run_forward_backward(module, q, k, v, grad_out, attention_mask=masked)
    want = reference_forward_backward(q, k, v, grad_out, 8**-0.5, causal=True, masked=masked)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5, msg=f"{backend_name} {name}")
    assert (got[0][3:, 1] - want[0][3:, 1]).abs().max() < 1e-5  # the padded sample really differs
    unpadded = reference_attention(q, k, v, 8**-0.5, causal=True)
    assert (unpadded[3:, 1] - want[0][3:, 1]).abs().max() > 1e-2


def _masked_gqa_inputs(device, dtype, b=2, heads=8, groups=2, s=24, d=16):
    """q (b, np, s, hn), k, v (b, ng, s, hn), a causal + left-padding bool mask (b, 1, s, s) True = attend."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, n, s, d, generator=gen) for n in (heads, groups, groups))
    allowed = torch.ones(s, s, dtype=torch.bool).tril().expand(b, 1, s, s).clone()
    allowed[1, :, :, :4] = False  # sample 1: four padding keys
    allowed[1, 0].diagonal().fill_(True)  # a padding query sees itself (no empty softmax row)
    return [t.to(device, dtype) for t in (q, k, v)] + [allowed.to(device)]


@pytest.mark.parametrize("masked", [True, False])
def test_sdpa_expanded_kv_heads_equal_grouped_ones(masked):
    """kernels.sdpa expands grouped KV heads for a masked call on CUDA (so the memory-efficient kernel
    takes it); expanded or grouped, the output and the gradients are the same."""
    from alfred_train.kernels.sdpa import sdpa

    q, k, v, allowed = _masked_gqa_inputs("cpu", torch.float32)
    mask = allowed if masked else None
    results = []
    for expand in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = sdpa(*leaves, mask, is_causal=mask is None, scale=0.25, expand_kv=expand)
        out.square().sum().backward()
        results.append([out] + [t.grad for t in leaves])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    want = reference_attention(*(t.permute(2, 0, 1, 3) for t in (q, k, v)), 0.25, causal=True,
                               masked=None if mask is None else ~mask)  # (s, b, np * hn)
    torch.testing.assert_close(results[0][0].permute(2, 0, 1, 3).reshape(want.shape).double(), want,
                               atol=1e-5, rtol=1e-5)


def tiny_gpt(backend, seed=0):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        attention_dropout=0.0, hidden_dropout=0.0,
    )
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = backend.core_attention
    torch.manual_seed(seed)
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=64, max_sequence_length=32,
        position_embedding_type="rope",
    ).to(DEVICE).eval()


def test_gpt_kv_cache_decoding_per_backend(megatron_world):
    """Plugged into a GPTModel: sdpa logits equal eager's, and KV-cache decoding (sq=1 < sk, as
    megatron's Attention passes it) reproduces the full re-forward's last-token logits."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from alfred_train.kernels.backends import choose_backend

    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)  # (B, T)
    positions = torch.arange(12, device=DEVICE).expand(2, 12)  # (B, T)
    full_logits = {}
    with torch.no_grad():
        for name in ("eager", "sdpa"):
            model = tiny_gpt(choose_backend(name))
            full_logits[name] = model(tokens, positions, attention_mask=None)  # (B, T, V)
            ctx = StaticInferenceContext(2, 12)
            prompt = 8
            step = dict(inference_context=ctx, runtime_gather_output=True)
            last = model(tokens[:, :prompt], positions[:, :prompt], None, **step)  # prefill
            steps = [last[:, -1]]
            for t in range(prompt, 12):
                ctx.sequence_len_offset = t
                out = model(tokens[:, t : t + 1], positions[:, t : t + 1], None, **step)
                steps.append(out[:, -1])  # (B, V)
            cached = torch.stack(steps, dim=1)  # (B, 5, V): logits at positions 7..11
            torch.testing.assert_close(cached, full_logits[name][:, prompt - 1 :], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full_logits["sdpa"], full_logits["eager"], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- backend choice


def test_requesting_missing_backend_is_config_error():
    from alfred_train.kernels.backends import choose_backend

    if not HAS_TE:
        with pytest.raises(ConfigError, match=r"transformer_engine is not installed.*alfred-train\[gpu\]"):
            choose_backend("te")
    if not HAS_FLASH:
        with pytest.raises(ConfigError, match=r"model.attention_backend=flash.*alfred-train\[gpu\]"):
            choose_backend("flash")
    with pytest.raises(ConfigError, match="model.attention_backend='fused' is unknown"):
        choose_backend("fused")


def test_auto_choice_is_logged(caplog):
    from alfred_train.kernels.backends import choose_backend

    with caplog.at_level(logging.INFO, logger="alfred_train"):
        backend = choose_backend("auto")
    expected = "te" if HAS_TE else ("flash" if HAS_FLASH else "sdpa")
    assert backend.name == expected
    assert backend.uses_te_spec == (expected == "te")
    assert f"attention backend: {expected} (auto" in caplog.text


# ----------------------------------------------------------------------------- log-probs, TP=1


@pytest.mark.parametrize("chunk_tokens", [1024, 5])
def test_logprobs_entropy_full_logits(chunk_tokens):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 7, 50, generator=gen)).requires_grad_()  # (B, T, V)
    targets = torch.randint(0, 50, (3, 7), generator=gen)  # (B, T)
    g_lp, g_ent = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)

    logprobs, entropy = vocab_parallel_logprobs_and_entropy(logits, targets, chunk_tokens=chunk_tokens)
    want_lp, want_ent = reference_logprobs_entropy(logits, targets)
    assert logprobs.dtype == entropy.dtype == torch.float32 and logprobs.shape == (3, 7)
    torch.testing.assert_close(logprobs.double(), want_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), want_ent, atol=1e-5, rtol=0)

    (grad,) = torch.autograd.grad((logprobs * g_lp + entropy * g_ent).sum(), logits)
    (want_grad,) = torch.autograd.grad((want_lp * g_lp + want_ent * g_ent).sum(), logits, retain_graph=True)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=0)
    (grad_lp_only,) = torch.autograd.grad(vocab_parallel_logprobs(logits, targets).sum(), logits)
    (want_lp_only,) = torch.autograd.grad(want_lp.sum(), logits)
    torch.testing.assert_close(grad_lp_only, want_lp_only, atol=1e-6, rtol=0)
    torch.testing.assert_close(vocab_parallel_entropy(logits).double(), want_ent, atol=1e-5, rtol=0)


def test_logprobs_hand_computed_and_bad_targets():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])  # (2, V=4)
    logprobs, entropy = vocab_parallel_logprobs_and_entropy(logits, torch.tensor([1, 0]))
    z = 3 + math.e**2  # second row's partition function; p = (e^2, 1, 1, 1) / z
    assert logprobs.tolist() == pytest.approx([-math.log(4), 2 - math.log(z)], abs=1e-6)
    ent1 = -(math.e**2 / z) * (2 - math.log(z)) + 3 * math.log(z) / z
    assert entropy.tolist() == pytest.approx([math.log(4), ent1], abs=1e-6)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab_parallel_logprobs(logits, torch.tensor([1, -100]))


# ----------------------------------------------------------------------------- log-probs, TP=2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp2_inputs():
    gen = torch.Generator().manual_seed(7)
    logits = 4 * torch.randn(2, 9, 22, generator=gen)  # (B, T, V), V/tp = 11
    targets = torch.randint(0, 22, (2, 9), generator=gen)  # (B, T), both halves of the vocab
    return logits, targets, torch.randn(2, 9, generator=gen), torch.randn(2, 9, generator=gen)


def _tp2_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        tp_group = dist.new_group([0, 1])
        logits, targets, g_lp, g_ent = _tp2_inputs()
        results = {}
        # default split (rank r holds ids [11r, 11r + 11)) and a swapped one via vocab_start
        for split, owned in (("default", rank), ("swapped", 1 - rank)):
            shard = logits[..., 11 * owned : 11 * owned + 11].clone().requires_grad_()  # (B, T, 11)
            start = None if split == "default" else 11 * owned
            lp, ent = vocab_parallel_logprobs_and_entropy(shard, targets, tp_group, start, chunk_tokens=4)
            (lp * g_lp + ent * g_ent).sum().backward()
            results[split] = (lp.detach(), ent.detach(), shard.grad, owned)
        try:
            bad = targets.clone()
            bad[0, 0] = 22
            vocab_parallel_logprobs(logits[..., 11 * rank : 11 * rank + 11], bad, tp_group)
            results["bad_target_error"] = ""
        except ValueError as err:
            results["bad_target_error"] = str(err)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_logprobs_entropy_tp2_gloo_equals_full_logits(tmp_path):
    mp.spawn(_tp2_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    logits, targets, g_lp, g_ent = _tp2_inputs()
    logits.requires_grad_()
    lp1, ent1 = vocab_parallel_logprobs_and_entropy(logits, targets)  # TP=1 on the full logits
    (grad1,) = torch.autograd.grad((lp1 * g_lp + ent1 * g_ent).sum(), logits)
    want_lp, want_ent = reference_logprobs_entropy(logits, targets)
    (want_grad,) = torch.autograd.grad((want_lp * g_lp + want_ent * g_ent).sum(), logits)
    torch.testing.assert_close(lp1.double(), want_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent1.double(), want_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad1, want_grad, atol=1e-6, rtol=0)
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for split in ("default", "swapped"):
            lp, ent, grad, owned = results[split]
            torch.testing.assert_close(lp, lp1.detach(), atol=1e-6, rtol=0)
            torch.testing.assert_close(ent, ent1.detach(), atol=1e-6, rtol=0)
            torch.testing.assert_close(grad, grad1[..., 11 * owned : 11 * owned + 11], atol=1e-6, rtol=0)
        assert "1 target ids lie outside the vocabulary [0, 22)" in results["bad_target_error"]


# ----------------------------------------------------------------------------- GPU


gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend_name", ["sdpa"] + (["flash"] if HAS_FLASH else []))
@pytest.mark.parametrize("sq,sk", [(512, 512), (1, 300), (4, 300)])
def test_gpu_bf16_attention_vs_fp32_reference(megatron_world, backend_name, sq, sk):
    from alfred_train.kernels.backends import choose_backend

    backend = choose_backend(backend_name)
    module = build_core_attention(backend, heads=8, groups=2, head_dim=64, dtype=torch.bfloat16)
    q, k, v, grad_out = attention_inputs(sq, sk, 2, 8, 2, 64, "cuda", torch.float32)
    got = run_forward_backward(module, *(t.bfloat16() for t in (q, k, v, grad_out)))
    want = reference_forward_backward(q, k, v, grad_out, 64**-0.5, causal=True)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = (g.double() - w).abs().max().item()
        assert err < 2e-2 * max(1.0, w.abs().max().item()), f"{backend_name} {name}: max error {err}"


@pytest.mark.gpu
@gpu
def test_gpu_masked_gqa_attention_runs_on_the_memory_efficient_kernel():
    """A padding mask with grouped KV heads (PPO's training and prefill on a GQA model): with only the
    memory-efficient kernel allowed, kernels.sdpa runs forward and backward (passed grouped heads, that
    kernel would refuse and SDPA would need its O(s^2) math kernel) and matches the grouped call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from alfred_train.kernels.sdpa import sdpa

    q, k, v, allowed = _masked_gqa_inputs("cuda", torch.bfloat16, s=256, d=64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        out = sdpa(*leaves, allowed, is_causal=False, scale=0.125)
        out.float().square().sum().backward()
    with sdpa_kernel([SDPBackend.MATH]):
        want = sdpa(q, k, v, allowed, is_causal=False, scale=0.125, expand_kv=False)
    assert (out.float() - want.float()).abs().max() < 2e-2
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.gpu
@gpu
def test_gpu_logprobs_bf16_and_memory_bound():
    """bf16 logits: values vs fp32 reference, and peak memory below grad + a few chunk buffers."""
    n, vocab, chunk = 8192, 32000, 512
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (3 * torch.randn(n, vocab, device="cuda", generator=gen)).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, ent = vocab_parallel_logprobs_and_entropy(logits, targets, chunk_tokens=chunk)
    (lp.sum() + ent.sum()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grad_bytes = n * vocab * 2  # the bf16 gradient itself
    chunk_bytes = chunk * vocab * 4
    # the documented bound: the gradient + 2 float32 chunk temporaries + O(N) vectors
    assert extra <= grad_bytes + 2 * chunk_bytes + 64 * n, f"peak extra {extra / 2**20:.0f} MiB"
    want_lp, want_ent = reference_logprobs_entropy(logits.detach().float(), targets)
    assert (lp.double() - want_lp).abs().max() < 1e-3
    assert (ent.double() - want_ent).abs().max() < 1e-3
