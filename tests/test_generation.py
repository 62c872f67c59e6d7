"""KV-cache generation, sampling options, scoring helpers and `alfred-train generate`.

In-process (1 rank): KV cache == full re-forward (greedy, left-padded batch == each prompt alone),
sampling filters against hand-computed cases, min length / EOD stop, and the scoring helpers
against a direct forward. Multi-process (`slow`): TP=2 and PP=2 workers (this file run as a
script) reproduce the TP=1 numbers; `alfred-train generate` on a 3-step SFT checkpoint at TP=1
and TP=2 x PP=2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VOCAB = 500  # tokenizer ids; the model's vocabulary is padded to 512: ids 500..511 must never appear
EOD = 2
PROMPT_LENGTHS = (10, 6, 3)  # left-padded to 10
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where init_runtime puts the model


def tiny_shape(init_std: float = 0.2):
    """4 layers, GQA 4 heads / 2 groups; init_std 0.2 makes greedy choices decisive (margins >> fp32 noise)."""
    from alfred_train.models.build import ModelShape

    return ModelShape(arch="llama", num_layers=4, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                      num_query_groups=2, vocab_size=VOCAB, padded_vocab_size=512, max_seq_len=64,
                      rotary_base=10000, norm_eps=1e-5, parallel_layernorms=2, init_std=init_std)


def build(runtime, kind: str, seed: int):
    from alfred_train.config import ParallelConfig
    from alfred_train.kernels.backends import choose_backend
    from alfred_train.models.build import build_model

    parallel = ParallelConfig(tp=runtime.dims.tp, pp=runtime.dims.pp)
    return build_model(tiny_shape(), parallel, kind=kind, bf16=False, backend=choose_backend("sdpa"),
                       device=runtime.device, seed=seed)


def padded_prompts():
    """(ids (3, 10), mask (3, 10)) on DEVICE: rows of PROMPT_LENGTHS real tokens, left padding id 0."""
    gen = torch.Generator().manual_seed(0)
    width = max(PROMPT_LENGTHS)
    ids = torch.randint(3, VOCAB, (len(PROMPT_LENGTHS), width), generator=gen)  # (B, P)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(PROMPT_LENGTHS):
        mask[row, width - n:] = 1
    return (ids * mask).to(DEVICE), mask.to(DEVICE)


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def lora_policy(runtime):
    """The policy with rank-4 adapters on every target, B random (not PEFT's zero init) and the same
    global matrices at any layout: the fast decoder must add each delta where megatron's hook does."""
    from alfred_train.models import lora
    from alfred_train.models.build import unwrap

    chunks = build(runtime, "lm", seed=3)
    spec = lora.AdapterSpec({t: {"rank": 4, "scale": 2.0} for t in LORA_TARGETS})
    lora.attach(chunks, spec, kind="lm")
    lora.init_adapters(chunks, seed=1)
    tp, rank = runtime.dims.tp, runtime.tp_rank
    with torch.no_grad():
        for layer in unwrap(chunks[0]).decoder.layers:
            for parent in (layer.self_attention, layer.mlp):
                for name, adapter in parent.named_children():
                    if not name.startswith("lora_"):
                        continue
                    b = adapter.lora_B  # (n_out / tp, r) column-parallel, (n_out, r) row-parallel
                    seed = 100 * layer.layer_number + LORA_TARGETS.index(name[len("lora_"):])
                    full = torch.randn(b.shape[0] * (tp if adapter.column else 1), b.shape[1],
                                       generator=torch.Generator().manual_seed(seed)) * 0.3
                    if adapter.column:  # this rank's rows; SwiGLU's fc1: its share of [gate; up] each
                        full = torch.cat([part.chunk(tp)[rank] for part in (full.chunk(2) if adapter.gated else (full,))])
                    b.copy_(full.to(b.device))
    return chunks


def layout_results(runtime) -> dict:
    """Everything the layout tests compare, computed at this rank's TP/PP layout."""
    from alfred_train.ppo.generation import (MegatronKVCache, SamplingParams, generate, generate_all,
                                             generate_full_reforward, score_at_eod, sequence_logprobs, sequence_values)

    policy, scalar = build(runtime, "lm", seed=3), build(runtime, "scalar", seed=5)
    ids, mask = padded_prompts()
    greedy = SamplingParams(max_new_tokens=12, greedy=True)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.9)
    kw = dict(eod_id=EOD, vocab_size=VOCAB, seed=11)
    out = {"greedy": generate(policy, runtime, ids, mask, greedy, **kw),
           "greedy_full": generate_full_reforward(policy, runtime, ids, mask, greedy, **kw),
           "greedy_megatron": generate(policy, runtime, ids, mask, greedy, decoder=MegatronKVCache, **kw),
           "sampled": generate(policy, runtime, ids, mask, sampled, with_logprobs=True, **kw)}
    # continuous batching: 3 prompts through 2 rows; EOD := a token row 0 emits at step 2, so row 0
    # frees its slot early and prompt 2 starts there while row 1 goes on. At PP=2,
    # "pipe": pipelined (row groups in flight across the stages; "cb_pipe" refills them from the queue).
    eod = int(out["greedy"][0][0, 2])
    for name, params in (("greedy", greedy), ("sampled", sampled)):
        for tag, extra in (("static", {}), ("cb", {"slots": 2}), ("static_pipe", {"pipelined": True}),
                           ("cb_pipe", {"slots": 2, "pipelined": True}),
                           ("cb_megatron", {"slots": 2, "decoder": MegatronKVCache})):
            gen = generate_all(policy, runtime, ids, mask, params, eod_id=eod, vocab_size=VOCAB, seed=11, **extra)
            out[f"{name}_{tag}"] = (gen.response_ids, gen.response_mask, gen.logprobs)
            out[f"{name}_{tag}_utilisation"] = gen.slot_utilisation
    # the decode step compiled by torch.compile (ppo.compile_decode): continuously batched, pipelined
    # at PP=2, TP all-reduces inside the compiled step at TP=2
    for name, params in (("greedy", greedy), ("sampled", sampled)):
        gen = generate_all(policy, runtime, ids, mask, params, eod_id=eod, vocab_size=VOCAB, seed=11, slots=2,
                           pipelined=True, compiled=True)
        out[f"{name}_compiled"] = (gen.response_ids, gen.response_mask, gen.logprobs)
    # every row ends early (the same prompt twice): the loop stops before max_new_tokens (pipelined at PP=2)
    twice = generate_all(policy, runtime, ids[[0, 0]], mask[[0, 0]], greedy, eod_id=eod, vocab_size=VOCAB, seed=11,
                         pipelined=True)
    out["early_stop"] = (twice.response_ids, twice.response_mask)
    response, response_mask = out["greedy"]
    sequences, seq_mask = torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1)  # (B, L)
    eod_index = ids.shape[1] + response_mask.sum(1) - 1  # (B,)
    out["logprobs"] = sequence_logprobs(policy, runtime, sequences, seq_mask, ids.shape[1], vocab_size=VOCAB,
                                        micro_batch_size=1)
    out["values"] = sequence_values(scalar, runtime, sequences, seq_mask, ids.shape[1])
    out["scores"] = score_at_eod(scalar, runtime, sequences, seq_mask, eod_index)
    adapted = lora_policy(runtime)  # LoRA: the fast decoder and scoring vs megatron's forward with its hooks
    out["lora_greedy"] = generate(adapted, runtime, ids, mask, greedy, **kw)
    out["lora_greedy_megatron"] = generate(adapted, runtime, ids, mask, greedy, decoder=MegatronKVCache, **kw)
    lora_seq = torch.cat([ids, out["lora_greedy"][0]], 1)
    lora_mask = torch.cat([mask, out["lora_greedy"][1]], 1)
    out["lora_logprobs"] = sequence_logprobs(adapted, runtime, lora_seq, lora_mask, ids.shape[1], vocab_size=VOCAB)
    return out


# ----------------------------------------------------------------------------- pure helpers


def test_position_ids_and_attention_mask_hand_computed():
    from alfred_train.ppo.generation import attention_mask_for, position_ids_from_mask

    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    hidden = attention_mask_for(mask, 4)  # (2, 1, 4, 4)
    visible = (~hidden[0, 0]).int().tolist()
    # padding queries see only themselves; real queries see real keys up to themselves
    assert visible == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert (~hidden[1, 0]).int().tolist() == torch.ones(4, 4).tril().int().tolist()
    decode = attention_mask_for(torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), 1)  # (2, 1, 1, 5)
    assert (~decode[:, 0, 0]).int().tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_sampling_filters_hand_computed():
    from alfred_train.ppo.generation import (SamplingParams, filter_top_k, filter_top_p, mask_logits, sample_next,
                                             uniform_draws)

    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda z: torch.isfinite(z)[0].tolist()  # noqa: E731
    # mass before each id (by rank): 0, .5, .8, .95 -> top_p keeps ids while that mass is < top_p
    assert kept(filter_top_p(logits, 0.8)) == [True, True, False, False]
    assert kept(filter_top_p(logits, 0.81)) == [True, True, True, False]
    assert kept(filter_top_p(logits, 0.1)) == [True, False, False, False]
    assert kept(filter_top_k(logits, 3)) == [True, True, True, False]
    shuffled = logits[:, [2, 0, 3, 1]]  # order must not matter
    assert kept(filter_top_p(shuffled, 0.8)) == [False, True, False, True]
    # padded-vocabulary ids (>= vocab_size) and EOD (before min length) are never chosen
    big = torch.tensor([[1.0, 2.0, 3.0, 9.0, 8.0]])  # ids 3, 4 are vocabulary padding
    z = mask_logits(big, vocab_size=3, eod_id=2, block_eod=True)
    assert z[0].tolist()[:2] == [1.0, 2.0] and torch.isinf(z[0, 2:]).all()
    params = SamplingParams(max_new_tokens=4, min_new_tokens=2, greedy=True)
    assert sample_next(big, params, step=0, vocab_size=3, eod_id=2)[0].item() == 1
    token, logprob = sample_next(big, params, step=2, vocab_size=3, eod_id=2)
    assert token.item() == 2  # the sampler's log-prob: over the real vocabulary, before filters
    assert logprob.item() == pytest.approx(torch.tensor([1.0, 2.0, 3.0]).log_softmax(0)[2].item(), abs=1e-6)
    draws = torch.stack([sample_next(big.expand(64, 5), SamplingParams(top_k=2), step=s, vocab_size=3,
                                     eod_id=2, seed=0)[0] for s in range(10)])
    assert set(draws.unique().tolist()) == {1, 2}  # top-2 of the real vocabulary
    # draws are keyed by (seed, row key, step): a row's token does not depend on where it sits
    hot = SamplingParams(temperature=3.0)
    wide = torch.randn(8, 40, generator=torch.Generator().manual_seed(1))
    keys = torch.arange(100, 108)
    a = sample_next(wide, hot, step=3, vocab_size=40, eod_id=2, seed=7, keys=keys)[0]
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(2))
    b = sample_next(wide[perm], hot, step=3, vocab_size=40, eod_id=2, seed=7, keys=keys[perm])[0]
    assert torch.equal(a[perm], b)
    c = sample_next(wide, hot, step=3, vocab_size=40, eod_id=2, seed=8, keys=keys)[0]
    assert not torch.equal(a, c)
    # the draws are uniform: 4000 of them over 4 equal bins
    u = uniform_draws(3, torch.arange(4000), 5)
    assert 0 <= u.min() and u.max() < 1 and ((u * 4).long().bincount() - 1000).abs().max() < 120


def test_sampling_params_are_checked():
    from alfred_train.errors import ConfigError
    from alfred_train.ppo.generation import SamplingParams

    for bad in (dict(max_new_tokens=0), dict(min_new_tokens=5, max_new_tokens=4), dict(temperature=0.0),
                dict(top_p=0.0), dict(top_k=-1)):
        with pytest.raises(ConfigError, match="sampling:"):
            SamplingParams(**bad)


# ----------------------------------------------------------------------------- one rank, in process


@pytest.fixture(scope="module")
def runtime():
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, seed_everything, shutdown

    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    threads = torch.get_num_threads()
    rt = init_runtime(ParallelDims(1, 1, 1))
    seed_everything(0, rt)  # on GPU: megatron's model-parallel RNG tracker
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and robust on a loaded machine
    yield rt
    shutdown()
    torch.set_num_threads(threads)
    os.environ.update(env)


@pytest.fixture(scope="module")
def reference(runtime):
    return layout_results(runtime)


@pytest.fixture(scope="module")
def policy(runtime):
    return build(runtime, "lm", seed=3)


def test_kv_cache_greedy_equals_full_reforward_and_each_prompt_alone(runtime, policy, reference):
    from alfred_train.ppo.generation import SamplingParams, generate

    ids, mask = padded_prompts()
    response, response_mask = reference["greedy"]
    assert response.shape == (3, 12) and response_mask.bool().all()  # EOD never chosen by this model
    assert torch.equal(response, reference["greedy_full"][0])
    assert torch.equal(response, reference["greedy_megatron"][0])  # the loop before issue 10
    assert ((response >= 3) & (response < VOCAB)).all()
    width = ids.shape[1]
    for row, n in enumerate(PROMPT_LENGTHS):
        alone, _ = generate(policy, runtime, ids[row:row + 1, width - n:], mask[row:row + 1, width - n:],
                            SamplingParams(max_new_tokens=12, greedy=True), eod_id=EOD, vocab_size=VOCAB, seed=0)
        assert alone[0].tolist() == response[row].tolist(), f"row {row} differs when generated alone"
    assert len({tuple(r) for r in response.tolist()}) == 3  # rows really differ: the test can fail


def test_lora_policy_decodes_fast_with_its_adapters(runtime, reference):
    """The fast decoder adds each adapter's delta itself: the same tokens as megatron's forward with
    the adapters' hooks, not the base model's; scoring likewise (its log-probs of those tokens)."""
    from alfred_train.ppo import generation
    from alfred_train.models.build import unwrap
    from alfred_train.ppo.decode import CudaGraphDecode, KVCacheForward, choose_decoder

    adapted = lora_policy(runtime)
    fast_decoders = (KVCacheForward, CudaGraphDecode)  # CudaGraphDecode on one GPU
    assert choose_decoder(unwrap(adapted[0]), runtime) in fast_decoders and generation._fast_scoring(adapted, runtime)
    fast, megatron = reference["lora_greedy"], reference["lora_greedy_megatron"]
    assert torch.equal(fast[0], megatron[0]) and torch.equal(fast[1], megatron[1])
    assert not torch.equal(fast[0], reference["greedy"][0])  # the adapters change the tokens: the test can fail
    ids, mask = padded_prompts()
    seq, seq_mask = torch.cat([ids, fast[0]], 1), torch.cat([mask, fast[1]], 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generation, "_fast_scoring", lambda chunks, rt: False)  # megatron's forward, hooks and all
        slow = generation.sequence_logprobs(adapted, runtime, seq, seq_mask, ids.shape[1], vocab_size=VOCAB)
    for got, want in zip(reference["lora_logprobs"], slow):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_continuous_batching_gives_each_prompt_its_static_tokens(reference):
    for name in ("greedy", "sampled"):
        static = reference[f"{name}_static"]
        for tag in ("cb", "static_pipe", "cb_pipe", "cb_megatron"):  # megatron's: static batches
            got = reference[f"{name}_{tag}"]
            assert torch.equal(got[0], static[0]) and torch.equal(got[1], static[1]), (name, tag)
            torch.testing.assert_close(got[2], static[2], atol=1e-5, rtol=0)
    early, early_mask = reference["early_stop"]
    assert early.shape == (2, 3) and early_mask.bool().all() and (early == reference["greedy"][0][0, :3]).all()
    lengths = reference["greedy_static"][1].sum(1).tolist()
    assert lengths[0] == 3 and max(lengths) > 3, lengths  # row 0 really ended early: the test can fail
    # utilisation = useful tokens / slot-steps: the static batch idles row 0 after its EOD
    assert reference["greedy_cb_utilisation"] > reference["greedy_static_utilisation"]
    lengths = reference["greedy_static"][1].sum(1)
    assert reference["greedy_static_utilisation"] == pytest.approx(float(lengths.sum()) / (3 * float(lengths.max())))


def test_finished_check_every_n_steps_gives_the_same_tokens(runtime, policy, reference, monkeypatch):
    """On a GPU "which rows ended?" is asked every 16 steps, not every token: the same results."""
    from alfred_train.ppo import generation
    from alfred_train.ppo.generation import MegatronKVCache, SamplingParams, generate_all

    monkeypatch.setitem(generation.FINISHED_CHECK_EVERY, "cpu", 5)
    monkeypatch.setattr(generation, "IDLE_SHARE", 1)  # every 5 steps, though max_new_tokens is short
    ids, mask = padded_prompts()
    eod = int(reference["greedy"][0][0, 2])
    greedy = SamplingParams(max_new_tokens=12, greedy=True)
    for tag, extra in (("static", {}), ("cb", {"slots": 2}), ("cb_megatron", {"slots": 2, "decoder": MegatronKVCache})):
        got = generate_all(policy, runtime, ids, mask, greedy, eod_id=eod, vocab_size=VOCAB, seed=11, **extra)
        want = reference[f"greedy_{tag}"]
        assert torch.equal(got.response_ids, want[0]) and torch.equal(got.response_mask, want[1]), tag
    early = generate_all(policy, runtime, ids[[0, 0]], mask[[0, 0]], greedy, eod_id=eod, vocab_size=VOCAB, seed=11)
    assert torch.equal(early.response_ids, reference["early_stop"][0])  # 3 tokens, though checked at step 5


def test_short_generations_check_often_enough_to_refill_rows(runtime, policy, reference, monkeypatch):
    """The GPU's 16-step interval on a 12-token generation would check only at its end: continuous
    batching would never refill a row (an H100 measured utilisation 0.42 against static's 0.75).
    The interval shrinks with max_new_tokens, so short generations refill as on CPU."""
    from alfred_train.ppo import generation
    from alfred_train.ppo.generation import SamplingParams, generate_all

    monkeypatch.setitem(generation.FINISHED_CHECK_EVERY, "cpu", 16)  # the GPU's rule, on this CPU
    ids, mask = padded_prompts()
    eod = int(reference["greedy"][0][0, 2])
    greedy = SamplingParams(max_new_tokens=12, greedy=True)
    got = generate_all(policy, runtime, ids, mask, greedy, eod_id=eod, vocab_size=VOCAB, seed=11, slots=2)
    assert torch.equal(got.response_ids, reference["greedy_cb"][0])
    assert got.slot_utilisation == reference["greedy_cb_utilisation"] > reference["greedy_static_utilisation"]
    assert generation.finished_check_interval("cuda", 512) == 16
    assert generation.finished_check_interval("cuda", 128) == 4
    assert generation.finished_check_interval("cuda", 12) == 1


def test_greedy_margins_are_decisive(runtime, policy, reference):
    """The parity tests are meaningful only if top-1 beats top-2 by far more than fp32 noise."""
    from alfred_train.ppo.generation import attention_mask_for, position_ids_from_mask

    ids, mask = padded_prompts()
    response, response_mask = reference["greedy"]
    seq, seq_mask = torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1)
    with torch.no_grad():
        logits = policy[0](seq, position_ids_from_mask(seq_mask), attention_mask_for(seq_mask, seq.shape[1]))
    top2 = logits[:, ids.shape[1] - 1:-1, :VOCAB].topk(2, dim=-1).values  # (B, T, 2)
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-3
    assert torch.equal(logits[:, ids.shape[1] - 1:-1, :VOCAB].argmax(-1), response)


def test_sampling_options_top_k1_min_length_eod_stop_and_seeds(runtime, policy, reference):
    from alfred_train.ppo.generation import SamplingParams, generate

    ids, mask = padded_prompts()
    greedy = reference["greedy"][0]
    kw = dict(vocab_size=VOCAB, seed=5)
    top1, _ = generate(policy, runtime, ids, mask, SamplingParams(max_new_tokens=12, temperature=0.7, top_k=1),
                       eod_id=EOD, **kw)
    assert torch.equal(top1, greedy)
    # sampling is reproducible from the seed, and the seed matters
    sampled = SamplingParams(max_new_tokens=12, temperature=1.5)
    a, b, c = (generate(policy, runtime, ids, mask, sampled, eod_id=EOD, vocab_size=VOCAB, seed=s)[0]
               for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # EOD := the token row 0 picks greedily at step 2: row 0 stops there, mask 0 and pad after it
    eod = int(greedy[0, 2])
    resp, resp_mask = generate(policy, runtime, ids, mask, SamplingParams(max_new_tokens=12, greedy=True),
                               eod_id=eod, pad_id=0, **kw)
    assert resp[0, :3].tolist() == greedy[0, :3].tolist()
    assert resp_mask[0].tolist() == [1, 1, 1] + [0] * (resp.shape[1] - 3)
    assert (resp[0, 3:] == 0).all()
    # a batch whose rows have all stopped ends early
    alone, alone_mask = generate(policy, runtime, ids[:1], mask[:1], SamplingParams(max_new_tokens=12, greedy=True),
                                 eod_id=eod, **kw)
    assert alone.shape == (1, 3) and alone_mask.tolist() == [[1, 1, 1]]
    # min_new_tokens=5 masks that EOD until step 5: row 0 goes on past step 2
    longer, longer_mask = generate(policy, runtime, ids[:1], mask[:1],
                                   SamplingParams(max_new_tokens=12, min_new_tokens=5, greedy=True), eod_id=eod, **kw)
    assert int(longer_mask.sum()) >= 5 and eod not in longer[0, :5].tolist()
    assert longer[0, :2].tolist() == greedy[0, :2].tolist()


def test_scoring_helpers_equal_direct_forward(runtime, policy, reference):
    from alfred_train.ppo.generation import attention_mask_for, position_ids_from_mask

    ids, mask = padded_prompts()
    prompt_len = ids.shape[1]
    response, response_mask = reference["greedy"]
    seq, seq_mask = torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1)
    args = (seq, position_ids_from_mask(seq_mask), attention_mask_for(seq_mask, seq.shape[1]))
    with torch.no_grad():
        logits = policy[0](*args).double()  # (B, L, 512)
        scalar = build(runtime, "scalar", seed=5)[0](*args)[..., 0]  # (B, L)
    log_p = logits[:, prompt_len - 1:-1, :VOCAB].log_softmax(-1)  # (B, T, VOCAB): padded ids excluded
    want_lp = log_p.gather(-1, response[..., None])[..., 0]
    want_ent = -(log_p.exp() * log_p).sum(-1)
    logprobs, entropy = reference["logprobs"]
    assert logprobs.shape == entropy.shape == response.shape
    torch.testing.assert_close(logprobs.double(), want_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), want_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(reference["values"], scalar[:, prompt_len - 1:-1], atol=1e-6, rtol=0)
    last = seq.shape[1] - 1  # no row stopped: EOD index = last position
    torch.testing.assert_close(reference["scores"], scalar[:, last], atol=1e-6, rtol=0)
    assert reference["values"].std() > 1e-3  # not a constant head


def test_generate_refuses_virtual_pipeline_chunks(runtime, policy):
    from alfred_train.errors import ConfigError
    from alfred_train.ppo.generation import SamplingParams, generate

    ids, mask = padded_prompts()
    with pytest.raises(ConfigError, match="parallel.vpp"):
        generate(policy * 2, runtime, ids, mask, SamplingParams(), eod_id=EOD, vocab_size=VOCAB, seed=0)


def test_sampler_logprobs_equal_the_scoring_pass(runtime, policy):
    """One set of log-probs: at temperature 1 the sampler's log-prob of each token is the scoring
    pass's (same distribution, computed from the decode step's logits instead of a re-forward)."""
    from alfred_train.ppo.generation import SamplingParams, generate, sequence_logprobs

    ids, mask = padded_prompts()
    ids_out, out_mask, sampler_lp = generate(policy, runtime, ids, mask, SamplingParams(max_new_tokens=12, top_k=40),
                                             eod_id=EOD, vocab_size=VOCAB, seed=4, with_logprobs=True)
    seq, seq_mask = torch.cat([ids, ids_out], 1), torch.cat([mask, out_mask], 1)
    scored, _ = sequence_logprobs(policy, runtime, seq, seq_mask, ids.shape[1], vocab_size=VOCAB)
    torch.testing.assert_close(sampler_lp * out_mask, scored * out_mask, atol=1e-4, rtol=0)
    assert sampler_lp[out_mask.bool()].std() > 0.1  # real, varied log-probs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_equals_eager_and_is_released(runtime, policy, reference, caplog):
    import logging

    from alfred_train.models.build import unwrap
    from alfred_train.ppo import decode
    from alfred_train.ppo.generation import SamplingParams, generate

    ids, mask = padded_prompts()
    assert decode.choose_decoder(unwrap(policy[0]), runtime) is decode.CudaGraphDecode
    params = SamplingParams(max_new_tokens=12, greedy=True)
    kw = dict(eod_id=EOD, vocab_size=VOCAB, seed=0, with_logprobs=True)
    with caplog.at_level(logging.WARNING, logger="alfred_train"):
        graphed = generate(policy, runtime, ids, mask, params, **kw)
    assert "CUDA-graph capture" not in caplog.text  # captured, not fallen back
    eager = generate(policy, runtime, ids, mask, params, decoder=decode.KVCacheForward, **kw)
    assert torch.equal(graphed[0], eager[0]) and torch.equal(graphed[0], reference["greedy"][0])
    torch.testing.assert_close(graphed[2], eager[2], atol=1e-5, rtol=0)
    # a sampled run with a graph reproduces itself, and the graph's pool is gone afterwards
    sampled = SamplingParams(max_new_tokens=12, temperature=1.3)
    a, b = (generate(policy, runtime, ids, mask, sampled, **kw)[0] for _ in range(2))
    assert torch.equal(a, b)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    generate(policy, runtime, ids, mask, sampled, **kw)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before  # nothing of the graph outlives the call


def test_a_failed_capture_makes_later_generations_choose_the_plain_eager_decoder(runtime, policy, monkeypatch):
    """The choice for one GPU rank: CUDA graphs, until a capture has failed in the process; then the plain
    eager step (it reads only the filled cache, the graph's fallback all of it). The choice reads the
    runtime's device and layout, so a CPU model with a GPU rank's runtime shows it."""
    from types import SimpleNamespace

    from alfred_train.models.build import unwrap
    from alfred_train.ppo import decode

    model = unwrap(policy[0])
    gpu_rank = SimpleNamespace(device=torch.device("cuda"), dims=runtime.dims)
    assert decode.choose_decoder(model, gpu_rank) is decode.CudaGraphDecode
    monkeypatch.setattr(decode.CudaGraphDecode, "capture_failed", True)
    assert decode.choose_decoder(model, gpu_rank) is decode.KVCacheForward
    assert decode.choose_decoder(model, runtime) is decode.KVCacheForward  # the CPU rank: never graphs


@pytest.mark.skipif(torch.cuda.is_available(), reason="ppo.compile_decode is a CPU option (a GPU captures the "
                    "decode step in a CUDA graph instead)")
def test_compiled_decode_equals_eager_and_falls_back_when_compilation_fails(runtime, policy, reference, monkeypatch,
                                                                            caplog):
    """ppo.compile_decode at TP=1: the compiled decode step (continuously batched) gives the eager
    loop's tokens and, to rounding, its log-probs. A backend that cannot compile (as inductor without
    a C++ compiler) costs one warning: the same tokens, eagerly."""
    import logging

    from alfred_train.ppo import compiled
    from alfred_train.ppo.generation import SamplingParams, generate
    from alfred_train.ppo.stage_decoder import StageDecoder

    for name in ("greedy", "sampled"):
        got, ref = reference[f"{name}_compiled"], reference[f"{name}_cb"]
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), name
        torch.testing.assert_close(got[2], ref[2], atol=1e-5, rtol=0)
    assert compiled.decode_step.compiled is not None and not compiled.decode_step.failed  # it really compiled

    def cannot_compile(graph, example_inputs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled, "BACKEND", cannot_compile)
    monkeypatch.setattr(compiled, "decode_step", compiled._Compiled(StageDecoder.forward, "decode step"))
    ids, mask = padded_prompts()
    params = SamplingParams(max_new_tokens=12, greedy=True)
    with caplog.at_level(logging.WARNING, logger="alfred_train"):
        first = generate(policy, runtime, ids, mask, params, eod_id=EOD, vocab_size=VOCAB, seed=11, compiled=True)
        again = generate(policy, runtime, ids, mask, params, eod_id=EOD, vocab_size=VOCAB, seed=11, compiled=True)
    assert compiled.decode_step.failed
    assert caplog.text.count("torch.compile of the decode step failed") == 1, caplog.text
    assert torch.equal(first[0], reference["greedy"][0]) and torch.equal(again[0], reference["greedy"][0])


# ----------------------------------------------------------------------------- TP / PP workers


def _worker(out_dir: str, tp: int, pp: int, compute=None) -> None:
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, seed_everything, shutdown

    rt = init_runtime(ParallelDims(tp, pp, 1))
    seed_everything(0, rt)
    try:
        results = (compute or layout_results)(rt)
        results["coords"] = (rt.tp_rank, rt.pp_rank)
        torch.save(results, Path(out_dir) / f"rank{rt.rank}.pt")
    finally:
        shutdown()


def pipelined_results(runtime) -> dict:
    """A length mix through the pipelined loop at this rank's PP, continuously batched or not, and
    through the plain loop: 11 left-padded prompts, sampled hot so that EOD (the token sampled most
    often) ends responses early and rows refill; min_new_tokens 0 lets a response end at once."""
    from alfred_train.ppo.generation import SamplingParams, generate_all

    policy = build(runtime, "lm", seed=3)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 11, (11,), generator=gen)
    ids = torch.randint(3, VOCAB, (11, 10), generator=gen)
    mask = (torch.arange(10)[None, :] >= 10 - lengths[:, None]).long()
    ids, mask = (ids * mask).to(DEVICE), mask.to(DEVICE)
    params = SamplingParams(max_new_tokens=12, temperature=1.5)
    kw = dict(vocab_size=VOCAB, seed=3)
    probe = generate_all(policy, runtime, ids, mask, params, eod_id=1, **kw).response_ids  # 1 is never sampled
    eod = int(torch.bincount(probe.flatten().cpu(), minlength=VOCAB).argmax())
    out = {"eod": eod}
    for slots in (runtime.dims.pp, 7, 11):
        for pipelined in (False, True):
            g = generate_all(policy, runtime, ids, mask, params, eod_id=eod, slots=slots, pipelined=pipelined, **kw)
            out[(slots, pipelined)] = (g.response_ids, g.response_mask, g.logprobs, g.slot_utilisation)
    return out


def _launch_workers(out_dir: Path, tp: int, pp: int, mode: str = "--worker") -> None:
    from alfred_train.parallel.init import _free_port

    world, port = tp * pp, _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", ALFRED_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, mode, str(out_dir), str(tp), str(pp)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2pp2"])
def test_tp_pp_layouts_match_tp1(tmp_path, reference, tp, pp):
    _launch_workers(tmp_path, tp, pp)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(tp * pp)]
    for got in ranks:
        where = f"tp_rank,pp_rank={got['coords']}"
        for key in ("greedy", "greedy_full", "greedy_megatron", "lora_greedy", "lora_greedy_megatron"):
            # ids and masks, every rank, token for token
            for mine, ref in zip(got[key], reference[key]):
                assert torch.equal(mine, ref), f"{key} differs from TP=1 on {where}"
        for name in ("greedy", "sampled"):
            for tag in ("static", "cb", "static_pipe", "cb_pipe", "cb_megatron"):  # PP=2: pipelined or not
                mine, ref = got[f"{name}_{tag}"], reference[f"{name}_{tag}"]
                assert torch.equal(mine[0], ref[0]) and torch.equal(mine[1], ref[1]), f"{name}_{tag} on {where}"
            compiled, ref = got[f"{name}_compiled"], reference[f"{name}_cb"]  # the compiled step: the eager loop's
            assert torch.equal(compiled[0], ref[0]) and torch.equal(compiled[1], ref[1]), f"{name}_compiled on {where}"
            torch.testing.assert_close(compiled[2], ref[2], atol=1e-5, rtol=0)
        assert all(torch.equal(a, b) for a, b in zip(got["early_stop"], reference["early_stop"])), where
        if pp > 1:  # the pipelined loop batched continuously: prompt 2 took row 0 when it ended
            assert got["greedy_cb_pipe_utilisation"] > got["greedy_static_pipe_utilisation"], where
        ids, ids_mask, sampler_logprobs = got["sampled"]
        assert torch.equal(ids, reference["sampled"][0]) and torch.equal(ids_mask, reference["sampled"][1]), where
        torch.testing.assert_close(sampler_logprobs, reference["sampled"][2], atol=1e-5, rtol=0)
        for key in ("logprobs", "lora_logprobs"):
            for mine, ref in zip(got[key], reference[key]):
                torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(got["values"], reference["values"], atol=1e-5, rtol=0)
        torch.testing.assert_close(got["scores"], reference["scores"], atol=1e-5, rtol=0)
    assert not torch.equal(reference["sampled"][0], reference["greedy"][0])  # sampling really sampled


@pytest.mark.slow
def test_pipelined_decode_at_pp4_refills_rows_with_the_plain_loops_tokens(tmp_path):
    """Four stages, one layer each, four row groups in flight: with 4 or 7 rows for 11 prompts the
    groups refill from the queue as responses end (a prompt never refilled would have no tokens);
    every rank returns the plain loop's tokens and log-probs."""
    _launch_workers(tmp_path, 1, 4, mode="--pipelined-worker")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    reference = ranks[0][(11, False)]  # one static batch, plain loop
    lengths = reference[1].sum(1)
    assert 1 <= int(lengths.min()) and int(lengths.min()) < 12 and int((lengths < 12).sum()) >= 2  # EOD ends some
    for got in ranks:
        where = f"pp_rank={got['coords'][1]}"
        for slots in (4, 7, 11):
            for pipelined in (False, True):
                ids, ids_mask, logprobs, _ = got[(slots, pipelined)]
                assert torch.equal(ids, reference[0]) and torch.equal(ids_mask, reference[1]), (slots, pipelined, where)
                torch.testing.assert_close(logprobs, reference[2], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the CLI


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["ALFRED_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "alfred_train", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft")
    done = _cli("sft", "configs/tiny-sft.yaml", f"run.dir={run_dir}", "train.max_steps=3", "parallel.tp=1",
                "checkpoint.interval=0", "logging.tensorboard=false")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_generate_cli_rejects_bad_flags_before_loading(tmp_path):
    from alfred_train.cli import main

    assert main(["generate", str(tmp_path), "--prompts", "x", "--output", "y", "--greedy", "--top-k", "3"]) == 2
    assert main(["generate", str(tmp_path), "optim.lr=1", "--prompts", "x", "--output", "y"]) == 2
    assert main(["generate", str(tmp_path), "--prompts", "x", "--output", "y", "--batch-size", "0"]) == 2
    assert main(["generate", str(tmp_path), "--prompts", "x", "--output", "y"]) == 2  # no checkpoint there



def test_generate_refuses_to_overwrite_its_prompts(tmp_path, capsys):
    from alfred_train.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    (tmp_path / "link.jsonl").symlink_to(prompts)
    for output in (prompts, tmp_path / "link.jsonl", tmp_path / "." / "prompts.jsonl"):
        assert main(["generate", str(tmp_path), "--prompts", str(prompts), "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert err == (f"alfred-train: error: --output {output} is the --prompts file and would overwrite it; "
                       "write the completions to another path\n")
    assert main(["generate", str(tmp_path), "--prompts", str(prompts), "--output", str(prompts / "out.jsonl")]) == 2
    assert f"{prompts} is a file, not a directory" in capsys.readouterr().err
    assert prompts.read_text() == '{"prompt": "hi"}\n'



@pytest.mark.parametrize("damage,words", [("corrupt", "does not match its sha256 (corrupted)"),
                                         ("truncate", "bytes, the manifest says"),
                                         ("meta", "meta.json does not match its sha256")])
def test_generate_refuses_a_damaged_checkpoint(sft_run, tmp_path, capsys, damage, words):
    """A corrupted shard generated wrong text with exit 0; a truncated one died in a DCP traceback."""
    from alfred_train.cli import main

    run = tmp_path / "run"
    shutil.copytree(sft_run / "checkpoints", run / "checkpoints")
    ckpt = sorted((run / "checkpoints").glob("iter_*"))[-1]
    target = ckpt / "meta.json" if damage == "meta" else sorted(ckpt.glob("*.distcp"))[0]
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    target.write_bytes(bytes(data))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    assert main(["generate", str(run), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"alfred-train: error: {ckpt} is damaged: ") and words in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "o.jsonl").exists()


def test_generate_names_a_missing_model_and_an_unusable_output(sft_run, tmp_path, capsys):
    from alfred_train.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt_ids": [true, 5]}\n')
    assert main(["generate", str(sft_run), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                 "--model", "value"]) == 2
    assert "--model value: " in (err := capsys.readouterr().err) and "holds ['policy']" in err, err
    long = tmp_path / ("x" * 300) / "o.jsonl"
    assert main(["generate", str(sft_run), "--prompts", str(prompts), "--output", str(long)]) == 2
    assert "File name too long; name another path" in capsys.readouterr().err


def test_generate_checks_its_inputs_before_any_process_or_model(sft_run, tmp_path, capsys):
    """A missing prompt file, a bad line or an unknown template was found only after the TP/PP workers
    had started and built the model (and the template's error named data.template, not --template)."""
    from alfred_train.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"prompt": 3}\n')
    base = ["generate", str(sft_run), "parallel.tp=2", "--output", str(tmp_path / "o.jsonl")]
    for extra, said in ((["--prompts", str(tmp_path / "none.jsonl")], "none.jsonl: no such file"),
                        (["--prompts", str(prompts)], f"{prompts}:2"),
                        (["--prompts", str(prompts), "--template", "nope"], "set data.template / --template to one of"),
                        (["--prompts", str(prompts), "--tokenizer", str(prompts)],
                         "point model.tokenizer / --tokenizer")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err  # one line: no worker, no model log
    assert not (tmp_path / "o.jsonl").exists()


def test_read_prompts_refuses_booleans_as_token_ids(tmp_path):
    from alfred_train.data.corpus import TINY_SP_MODEL_PATH
    from alfred_train.data.templates import get_template
    from alfred_train.data.tokenizer import load_tokenizer
    from alfred_train.errors import ConfigError
    from alfred_train.generate import read_prompts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_ids": [1, 5]}\n{"prompt_ids": [true, 5]}\n')
    with pytest.raises(ConfigError, match=r"prompts.jsonl:2: prompt_ids must be a non-empty list of token ids"):
        read_prompts(prompts, load_tokenizer(TINY_SP_MODEL_PATH), get_template("plain"), 32)


def test_read_prompts_names_an_undecodable_line(tmp_path):
    from alfred_train.data.corpus import TINY_SP_MODEL_PATH
    from alfred_train.data.templates import get_template
    from alfred_train.data.tokenizer import load_tokenizer
    from alfred_train.errors import ConfigError
    from alfred_train.generate import read_prompts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"prompt": "hi"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=r"prompts.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        read_prompts(prompts, load_tokenizer(TINY_SP_MODEL_PATH), get_template("plain"), 32)


@pytest.mark.slow
def test_generate_cli_end_to_end_tp1_and_tp2_pp2(sft_run, tmp_path):
    from alfred_train.data.tokenizer import load_tokenizer
    from alfred_train.stages.common import TINY_TOKENIZER

    prompts = tmp_path / "prompts.jsonl"
    records = [{"prompt": "Name a cheerful word."}, {"prompt": "List three happy things"},
               {"prompt_ids": [1, 50, 60, 70]}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    outputs = {}
    # 3 prompts through 2 rows: the row that ends first takes the third prompt (continuous batching);
    # --compile-decode: the decode step compiled, the same greedy tokens
    for name, layout, flags in (("tp1", [], []), ("tp2pp2", ["parallel.tp=2", "parallel.pp=2"], []),
                                ("compiled", [], ["--compile-decode"]), ("one_row", [], ["--batch-size", "1"])):
        out = tmp_path / f"{name}.jsonl"
        done = _cli("generate", str(sft_run), *layout, "--prompts", str(prompts), "--output", str(out),
                    "--max-new-tokens", "10", "--min-new-tokens", "4", "--greedy", "--batch-size", "2", *flags)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "3 completions written" in done.stdout and "slot utilisation" in done.stdout, done.stdout
        outputs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    tok = load_tokenizer(TINY_TOKENIZER)
    rows = outputs["tp1"]
    want_prompts = ["Name a cheerful word.", "List three happy things", tok.decode([1, 50, 60, 70])]
    assert [r["prompt"] for r in rows] == want_prompts
    for row in rows:
        assert set(row) == {"prompt", "completion", "completion_ids", "finish_reason"}
        ids = row["completion_ids"]
        assert 4 <= len(ids) <= 10 and all(0 <= i < tok.vocab_size and i != tok.eod_id for i in ids)
        assert row["completion"] == tok.decode(ids)
        assert row["finish_reason"] == ("length" if len(ids) == 10 else "eod")
    assert outputs["tp2pp2"] == rows  # resharded TP=2 x PP=2 greedy == TP=1, token for token
    assert outputs["compiled"] == rows and outputs["one_row"] == rows


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
if __name__ == "__main__" and sys.argv[1:2] == ["--pipelined-worker"]:
    _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), compute=pipelined_results)
