"""Rollout generation with megatron-core's KV cache across TP/PP, and forward-only scoring for PPO.

Generation (`generate`): B left-padded prompts (B, P) go through the model once (prefill, filling
a `StaticInferenceContext` KV cache of P + max_new_tokens positions), then one token per step.

    step t:  logits (B, V) at the newest position -> mask padded-vocabulary ids (>= vocab_size)
             and EOD while t < min_new_tokens -> greedy argmax, or temperature / top-k / top-p
             sampling with a torch.Generator seeded by (seed, dp_rank) -> token (B,)
             -> fed back as the (B, 1) input of step t + 1.
    A row stops at its EOD: response_mask is 1 up to and including EOD, 0 after, and the ids
    after it are `pad_id`. The loop ends when every row has stopped or after max_new_tokens.

Parallelism:
  * TP: inference-mode logits are gathered over TP (megatron requires `runtime_gather_output`),
    so every TP rank holds the same (B, V) row; the token is sampled on TP rank 0 of the last
    stage only and broadcast over the TP group, so every TP rank feeds the same token (guaranteed
    by the broadcast, not by matching generators).
  * PP: each step, a non-first stage receives the previous stage's hidden states (s, B, h) with
    `dist.recv` over the PP group, runs its layers, and sends its output on with `dist.send`; the
    last stage samples, and the tokens are broadcast over the PP group, so every rank of the
    model-parallel group returns the same (response_ids, response_mask).
  * DP: each DP rank generates its own prompts; generators differ by dp_rank.
  * One model chunk per rank: virtual pipeline stages (vpp) are refused for generation.

Left padding: position ids count real tokens (`position_ids_from_mask`), and an attention mask
hides every padding key from every query (`attention_mask_for`). RoPE in megatron-core is applied
by absolute slot, not by position id, but q.k under RoPE depends only on the slot difference,
which padding shifts equally for query and key: a padded row computes the same attention as the
row alone, up to float rounding.

Scoring (forward-only, no grad, whole sequences, megatron's pipeline schedule, results broadcast
from the last stage to the whole PP group). Positions, for sequences = cat(prompt_ids,
response_ids) of shape (B, L), L = P + T (the `Rollout` layout):

    output position P - 1 + t predicts response token t = sequences[:, P + t], t = 0 .. T-1
    sequence_logprobs: log p(sequences[:, P+t] | sequences[:, :P+t]) from logits[:, P-1+t]
    sequence_values:   value head output at position P - 1 + t       (V_t, state before token t)
    score_at_eod:      scalar head output at position eod_index (B,) (the EOD token itself,
                       `Rollout.last_token_positions()`)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from alfred_train.errors import ConfigError
from alfred_train.kernels.logprobs import vocab_parallel_logprobs_and_entropy
from alfred_train.models.build import unwrap

PADDED_VOCAB_LOGIT = -1e9  # finite "minus infinity" for the log-prob kernel (exp -> 0, no NaN)


@dataclass(frozen=True)
class SamplingParams:
    """How each next token is chosen (the `ppo.*` sampling keys, or `generate` flags)."""

    max_new_tokens: int = 16  # response length cap
    min_new_tokens: int = 0  # EOD is masked out before this many tokens
    temperature: float = 1.0  # logits / temperature before top-k / top-p
    top_p: float = 1.0  # nucleus: keep the smallest set of ids whose probability reaches top_p
    top_k: int = 0  # keep the k most likely ids; 0 = off
    greedy: bool = False  # argmax (temperature, top-k and top-p unused)

    def __post_init__(self):
        checks = [(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
                  (0 <= self.min_new_tokens <= self.max_new_tokens,
                   f"min_new_tokens ({self.min_new_tokens}) must be in [0, max_new_tokens={self.max_new_tokens}]"),
                  (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
                  (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
                  (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"sampling: {msg}")

    @classmethod
    def from_ppo(cls, ppo_cfg, greedy: bool = False) -> "SamplingParams":
        p = ppo_cfg
        return cls(p.max_new_tokens, p.min_new_tokens, p.temperature, p.top_p, p.top_k, greedy)


# --------------------------------------------------------------------------- pure helpers

def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token; padding gets 0. mask (B, S) -> (B, S)."""
    return (mask.long().cumsum(dim=1) - 1).clamp_min(0)


def attention_mask_for(key_is_real: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Causal + padding mask for the last `num_queries` positions: (B, 1, sq, sk) bool, True = hidden.

    key_is_real (B, sk): 1 on real tokens. Query i sits at slot sk - sq + i and sees key j iff
    j <= its slot and (key j is real or j is the query's own slot): a padding query sees only
    itself, so no softmax row is empty (an empty row gives NaN, which would leak through 0 * NaN).
    """
    sk = key_is_real.shape[1]
    device = key_is_real.device
    q_slot = torch.arange(sk - num_queries, sk, device=device)[:, None]  # (sq, 1)
    k_slot = torch.arange(sk, device=device)[None, :]  # (1, sk)
    visible = (k_slot <= q_slot) & (key_is_real.bool()[:, None, :] | (k_slot == q_slot))  # (B, sq, sk)
    return ~visible[:, None]  # (B, 1, sq, sk)


def mask_logits(logits: torch.Tensor, *, vocab_size: int, eod_id: int, block_eod: bool) -> torch.Tensor:
    """float32 copy of logits (B, V) with padded-vocabulary ids (>= vocab_size), and EOD if asked, at -inf."""
    out = logits.float().clone()  # (B, V)
    out[:, vocab_size:] = float("-inf")
    if block_eod:
        out[:, eod_id] = float("-inf")
    return out


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th kept), the rest -inf. (B, V) -> (B, V)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep, by descending probability, ids until their mass reaches top_p. (B, V)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) mass of the more likely ids
    drop = torch.zeros_like(mass_before, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
    return logits.masked_fill(drop, float("-inf"))  # the most likely id always stays


def sample_next(logits: torch.Tensor, params: SamplingParams, *, step: int, vocab_size: int, eod_id: int,
                generator: torch.Generator | None) -> torch.Tensor:
    """Choose token `step` of each row from its logits (B, V): (B,) long."""
    z = mask_logits(logits, vocab_size=vocab_size, eod_id=eod_id, block_eod=step < params.min_new_tokens)
    if params.greedy:
        return z.argmax(dim=-1)
    z = filter_top_p(filter_top_k(z / params.temperature, params.top_k), params.top_p)
    return torch.multinomial(z.softmax(dim=-1), 1, generator=generator)[:, 0]


# --------------------------------------------------------------------------- pipeline stage I/O

def _single_chunk(chunks) -> torch.nn.Module:
    if len(chunks) != 1:
        raise ConfigError(f"generation runs one model chunk per rank, got {len(chunks)} (virtual pipeline "
                          "stages): set parallel.vpp to null for generation")
    model = unwrap(chunks[0])
    if model.config.sequence_parallel:
        raise ConfigError("generation does not support sequence parallelism: set parallel.sequence_parallel=false")
    return model


def _stage_rank(runtime, pp_rank: int) -> int:
    return dist.get_global_rank(runtime.pp_group, pp_rank)


def stage_forward(model, runtime, input_ids, position_ids, attention_mask, *, inference_context=None):
    """This stage's forward of one micro-batch, hidden states passed stage to stage with send/recv.

    input_ids, position_ids (B, s); attention_mask (B, 1, s, sk). Returns the gathered logits
    (B, s', V) on the last stage (s' = 1 with a KV cache: only the newest position), else None.
    """
    batch, seq = input_ids.shape
    if not runtime.is_first_stage:
        cfg = model.config
        hidden = torch.empty(seq, batch, cfg.hidden_size, dtype=cfg.params_dtype, device=runtime.device)
        dist.recv(hidden, src=_stage_rank(runtime, runtime.pp_rank - 1), group=runtime.pp_group)  # (s, B, h)
        model.set_input_tensor(hidden)
    out = model(input_ids, position_ids, attention_mask, inference_context=inference_context,
                runtime_gather_output=True)
    if runtime.is_last_stage:
        return out  # (B, s', V)
    dist.send(out.contiguous(), dst=_stage_rank(runtime, runtime.pp_rank + 1), group=runtime.pp_group)
    return None


class KVCacheForward:
    """Prefill the prompt into a static KV cache, then one (B, 1) token per step."""

    def __init__(self, model, runtime, prompt_ids, prompt_mask, max_new_tokens: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        batch, prompt_len = prompt_ids.shape
        self.model, self.runtime = model, runtime
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask
        self.ctx = StaticInferenceContext(batch, prompt_len + max_new_tokens)
        new = torch.ones(batch, max_new_tokens, dtype=torch.bool, device=prompt_ids.device)
        self.key_is_real = torch.cat([prompt_mask.bool(), new], dim=1)  # (B, P + N)
        self.next_position = prompt_mask.long().sum(dim=1, keepdim=True)  # (B, 1)

    def prefill(self):
        prompt_len = self.prompt_ids.shape[1]
        mask = attention_mask_for(self.key_is_real[:, :prompt_len], prompt_len)  # (B, 1, P, P)
        out = stage_forward(self.model, self.runtime, self.prompt_ids, position_ids_from_mask(self.prompt_mask),
                            mask, inference_context=self.ctx)
        self.ctx.increment_sequence_len_offset(prompt_len)
        self.ctx.enable_decode_mode()
        return None if out is None else out[:, -1]  # (B, V)

    def step(self, tokens):
        filled = self.ctx.sequence_len_offset
        mask = attention_mask_for(self.key_is_real[:, :filled + 1], 1)  # (B, 1, 1, filled + 1)
        out = stage_forward(self.model, self.runtime, tokens[:, None], self.next_position, mask,
                            inference_context=self.ctx)
        self.ctx.increment_sequence_len_offset(1)
        self.next_position = self.next_position + 1
        return None if out is None else out[:, -1]  # (B, V)


class FullReforward:
    """Reference decoder without a cache: every step re-runs the whole sequence so far."""

    def __init__(self, model, runtime, prompt_ids, prompt_mask, max_new_tokens: int):
        self.model, self.runtime = model, runtime
        self.ids, self.real = prompt_ids, prompt_mask.bool()  # (B, S) growing

    def _run(self):
        seq = self.ids.shape[1]
        out = stage_forward(self.model, self.runtime, self.ids, position_ids_from_mask(self.real),
                            attention_mask_for(self.real, seq))
        return None if out is None else out[:, -1]  # (B, V)

    def prefill(self):
        return self._run()

    def step(self, tokens):
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.real = torch.cat([self.real, torch.ones_like(self.real[:, :1])], dim=1)
        return self._run()


def _share_tokens(tokens, runtime, batch: int) -> torch.Tensor:
    """The sampled tokens (B,) from (last stage, TP rank 0) to every rank of its TP and PP groups."""
    if tokens is None:
        tokens = torch.empty(batch, dtype=torch.long, device=runtime.device)
    if runtime.dims.tp > 1 and runtime.is_last_stage:
        dist.broadcast(tokens, src=dist.get_global_rank(runtime.tp_group, 0), group=runtime.tp_group)
    if runtime.dims.pp > 1:
        dist.broadcast(tokens, src=_stage_rank(runtime, runtime.dims.pp - 1), group=runtime.pp_group)
    return tokens


def sampling_generator(seed: int, dp_rank: int, device) -> torch.Generator:
    """Generator seeded by (seed, dp_rank): DP replicas differ, reruns reproduce."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + dp_rank) % (2 ** 63))


def _check_attention_backend(model) -> None:
    layers = model.decoder.layers
    if len(layers) and type(layers[0].self_attention.core_attention).__name__ == "FlashAttention":
        raise ConfigError("generation needs padding masks, which the flash attention backend does not take: "
                          "set model.attention_backend=sdpa")


@torch.no_grad()
def _generate(decoder_cls, chunks, runtime, prompt_ids, prompt_mask, params: SamplingParams, *, eod_id: int,
              vocab_size: int, seed: int, pad_id: int | None):
    model = _single_chunk(chunks)
    _check_attention_backend(model)
    pad_id = eod_id if pad_id is None else pad_id
    prompt_ids = prompt_ids.to(runtime.device)  # (B, P)
    prompt_mask = prompt_mask.to(runtime.device)  # (B, P)
    batch = prompt_ids.shape[0]
    source = runtime.is_last_stage and runtime.tp_rank == 0
    generator = sampling_generator(seed, runtime.dp_rank, runtime.device) if source else None
    was_training = model.training
    model.eval()  # megatron uses the inference context only in eval mode
    try:
        decoder = decoder_cls(model, runtime, prompt_ids, prompt_mask, params.max_new_tokens)
        response = torch.full((batch, params.max_new_tokens), pad_id, dtype=torch.long, device=runtime.device)
        response_mask = torch.zeros_like(response)  # (B, N)
        done = torch.zeros(batch, dtype=torch.bool, device=runtime.device)  # (B,)
        logits = decoder.prefill()
        for step in range(params.max_new_tokens):
            tokens = sample_next(logits, params, step=step, vocab_size=vocab_size, eod_id=eod_id,
                                 generator=generator) if source else None
            tokens = torch.where(done, pad_id, _share_tokens(tokens, runtime, batch))  # (B,)
            response[:, step] = tokens
            response_mask[:, step] = (~done).long()
            done |= tokens == eod_id
            if bool(done.all()) or step == params.max_new_tokens - 1:
                break
            logits = decoder.step(tokens)
    finally:
        model.set_input_tensor(None)
        model.train(was_training)
    return response[:, :step + 1], response_mask[:, :step + 1]


def generate(chunks, runtime, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams, *,
             eod_id: int, vocab_size: int, seed: int, pad_id: int | None = None):
    """Sample responses with the KV cache: (response_ids (B, T), response_mask (B, T)), T <= max_new_tokens.

    chunks: this rank's model chunk (one; unwrapped or not); prompt_ids (B, P) left-padded,
    prompt_mask (B, P) 1 on prompt tokens. vocab_size: the tokenizer's (ids >= it never sampled).
    pad_id fills the ids after EOD (default eod_id). Collective over the TP and PP groups; every
    rank of them returns the same tensors. Deterministic given (seed, dp_rank).
    """
    return _generate(KVCacheForward, chunks, runtime, prompt_ids, prompt_mask, params, eod_id=eod_id,
                     vocab_size=vocab_size, seed=seed, pad_id=pad_id)


def generate_full_reforward(chunks, runtime, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                            params: SamplingParams, *, eod_id: int, vocab_size: int, seed: int,
                            pad_id: int | None = None):
    """`generate` without a KV cache (the whole sequence re-run every step): slow, for tests and benches."""
    return _generate(FullReforward, chunks, runtime, prompt_ids, prompt_mask, params, eod_id=eod_id,
                     vocab_size=vocab_size, seed=seed, pad_id=pad_id)


# --------------------------------------------------------------------------- scoring

def _score(chunks, runtime, sequences, attention_mask, reduce, out_shape, micro_batch_size: int | None):
    """Forward-only pass of (B, L) sequences through the pipeline; `reduce(output, rows)` on the last
    stage maps each micro-batch's output (b, L, ...) to a float32 (b, ...) tensor. Returns the
    concatenated (B, ...) result on every rank of the PP group."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = sequences.shape
    mbs = micro_batch_size or batch
    if batch % mbs:
        raise ConfigError(f"scoring: {batch} rows do not split into micro-batches of {mbs}; "
                          "make the rollout batch a multiple of the scoring micro-batch size")
    sequences = sequences.to(runtime.device)
    attention_mask = attention_mask.to(runtime.device)
    positions = position_ids_from_mask(attention_mask)  # (B, L)
    rows = [slice(i, i + mbs) for i in range(0, batch, mbs)]

    def forward_step(data_iterator, model):
        r = next(data_iterator)
        mask = attention_mask_for(attention_mask[r], seq)  # (b, 1, L, L)
        out = model(sequences[r], positions[r], mask)  # (b, L, V/tp) or (b, L, 1)
        return out, partial(_collect, reduce, r)

    models = [unwrap(c) for c in chunks]
    with torch.no_grad():
        data = [iter(rows) for _ in models] if len(models) > 1 else iter(rows)
        collected = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=models if len(models) > 1 else models[0],
            num_microbatches=len(rows), seq_length=seq, micro_batch_size=mbs, forward_only=True,
            collect_non_loss_data=True)
    result = torch.cat(collected) if runtime.is_last_stage else \
        torch.empty(out_shape, dtype=torch.float32, device=runtime.device)
    if runtime.dims.pp > 1:
        dist.broadcast(result, src=_stage_rank(runtime, runtime.dims.pp - 1), group=runtime.pp_group)
    return result


def _collect(reduce, rows, output, non_loss_data=True):
    return reduce(output, rows)


def response_logprobs(logits: torch.Tensor, targets: torch.Tensor, prompt_len: int, runtime, vocab_size: int,
                      temperature: float = 1.0):
    """(logprobs, entropy), each (b, T) float32, of the response tokens `targets` (b, T) under
    softmax(logits / temperature) (the sampling distribution before top-k / top-p) from this rank's
    vocab-parallel logits (b, P + T, V/tp); differentiable. Logits at P-1+t predict token t;
    padded-vocabulary ids (>= vocab_size) get probability 0."""
    seq = logits.shape[1]
    shard = logits[:, prompt_len - 1:seq - 1]  # (b, T, Vs)
    if temperature != 1.0:
        shard = shard / temperature
    start = runtime.tp_rank * shard.shape[-1]
    if start + shard.shape[-1] > vocab_size:
        padded = torch.arange(start, start + shard.shape[-1], device=shard.device) >= vocab_size  # (Vs,)
        shard = shard.masked_fill(padded, PADDED_VOCAB_LOGIT)
    return vocab_parallel_logprobs_and_entropy(shard, targets, runtime.tp_group, start)


def sequence_logprobs(chunks, runtime, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                      *, vocab_size: int, micro_batch_size: int | None = None, temperature: float = 1.0):
    """log p(response token t) and the entropy of the distribution it was drawn from: (B, T) each.

    sequences (B, L) = cat(prompt_ids, response_ids), attention_mask (B, L) 1 on real tokens,
    T = L - prompt_len. Uses the vocab-parallel logits at positions P-1 .. L-2 (no full-vocabulary
    gather); ids >= vocab_size (vocabulary padding) get probability 0, as in sampling; logits are
    divided by `temperature` (the sampling temperature: PPO's ratio and KL use that distribution). float32.
    """
    batch, seq = sequences.shape
    targets_all = sequences.to(runtime.device)[:, prompt_len:]  # (B, T)

    def reduce(logits, rows):  # logits (b, L, V/tp)
        logprobs, entropy = response_logprobs(logits, targets_all[rows], prompt_len, runtime, vocab_size,
                                              temperature)
        return torch.stack([logprobs, entropy], dim=-1)  # (b, T, 2)

    out = _score(chunks, runtime, sequences, attention_mask, reduce, (batch, seq - prompt_len, 2), micro_batch_size)
    return out[..., 0], out[..., 1]


def sequence_values(chunks, runtime, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    *, micro_batch_size: int | None = None) -> torch.Tensor:
    """Scalar-head outputs at positions P-1 .. L-2 (V_t: the state before response token t): (B, T)."""
    batch, seq = sequences.shape

    def reduce(scores, rows):  # (b, L, 1)
        return scores[:, prompt_len - 1:seq - 1, 0].float()  # (b, T)

    return _score(chunks, runtime, sequences, attention_mask, reduce, (batch, seq - prompt_len), micro_batch_size)


def score_at_eod(chunks, runtime, sequences: torch.Tensor, attention_mask: torch.Tensor, eod_index: torch.Tensor,
                 *, micro_batch_size: int | None = None) -> torch.Tensor:
    """Scalar-head output at sequence position eod_index (B,) of each row (its EOD token): (B,)."""
    index = eod_index.to(runtime.device).long()  # (B,)

    def reduce(scores, rows):  # (b, L, 1)
        return scores[..., 0].float().gather(1, index[rows, None])[:, 0]  # (b,)

    return _score(chunks, runtime, sequences, attention_mask, reduce, (sequences.shape[0],), micro_batch_size)
