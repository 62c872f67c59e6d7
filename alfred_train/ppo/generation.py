"""Rollout generation with a static KV cache across TP/PP, and forward-only scoring for PPO.

Generation (`generate`): B left-padded prompts (B, P) go through the model once (prefill, filling
a KV cache of S = P + max_new_tokens slots), then one token per step. The decoder
(`decode.choose_decoder`): `KVCacheForward` runs this stage's layers straight on their weights
(`stage_decoder.StageDecoder`; RoPE tables and the key mask built once per generation), captured in a
CUDA graph on one GPU (`CudaGraphDecode`, eager fallback) or, on CPU with `ppo.compile_decode`, compiled
by torch.compile (`CompiledDecode`, `compiled.py`; eager fallback); megatron's own forward with its
`StaticInferenceContext` (`MegatronKVCache`) for what the fast decoder does not support. The
CPU adapter's global function mode is suspended for the loop (`parallel.cpu.suspended`).

    step t:  logits (B, V) at the newest position -> `sampling.sample_next`: padded-vocabulary ids
             (>= vocab_size) never drawn, EOD blocked while t < min_new_tokens, greedy argmax or
             temperature / top-k / top-p on a uniform draw keyed by (seed, the row's prompt key, t)
             -> token (B,) and its log-prob under softmax(logits / temperature) (B,)
             -> fed back as the (B, 1) input of step t + 1.
    A row stops at its EOD: response_mask is 1 up to and including EOD, 0 after, and the ids
    after it are `pad_id`. The loop ends after max_new_tokens, or when every row has stopped;
    "which rows stopped?" is asked of the device every step on CPU and every 16 steps on a GPU (no
    host sync per token); steps past the end are dropped.

Continuous batching (`generate_all(..., slots=B)` with Q > B prompts): B rows decode together;
when a row stops, the next prompt of the queue is prefilled into that row (`KVCacheForward.refill`)
while the others go on, so a batch is not held by its longest response. Every row keeps its own
cache slot, so a prompt computes the same wherever and whenever it runs; its draws are keyed by
(seed, prompt key, token index): the same tokens with continuous batching on or off.
Slot utilisation = useful tokens / (rows x steps) is returned (`Generation.slot_utilisation`).

Parallelism:
  * TP: each TP rank computes its heads / its MLP shard; row-parallel outputs are all-reduced and
    the vocabulary-parallel logits all-gathered over TP, so every TP rank holds the same (B, V);
    the token is sampled on TP rank 0 of the last stage only and broadcast over the TP group
    (with its log-prob), so every TP rank feeds the same token (guaranteed by the broadcast).
  * PP: each step, a non-first stage receives the previous stage's hidden states (B, s, h)
    (megatron's fallback: (s, B, h)) with `dist.recv` over the PP group, runs its layers, and
    sends its output on with `dist.send`; the last stage samples, and the tokens are broadcast over
    the PP group, so every rank of the model-parallel group returns the same tensors. With the fast
    decoder and `pipelined=True` (`ppo.pipelined_decode`), the B rows go as pp groups in flight, stage s working on
    group (t - s) mod pp at tick t (`pipelined.py`: every stage busy; continuously batched too).
  * DP: each DP rank generates its own prompts; rows differ by their prompt keys (pass the global
    prompt index as `keys`), so a prompt's draws do not depend on its rank, row or layout.
  * One model chunk per rank: virtual pipeline stages (vpp) are refused for generation.

Left padding: position ids count real tokens (`position_ids_from_mask`), and an attention mask
hides every padding key from every query (`attention_mask_for`). RoPE is applied by absolute cache
slot, not by position id (megatron-core's rule, kept by the fast decoder), but q.k under RoPE
depends only on the slot difference, which padding shifts equally for query and key: a padded row
computes the same attention as the row alone, up to float rounding.

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

import contextlib
import itertools
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from alfred_train.errors import ConfigError
from alfred_train.kernels.logprobs import vocab_parallel_logprobs_and_entropy
from alfred_train.models.build import unwrap
from alfred_train.parallel import cpu as cpu_adapter
from alfred_train.ppo.decode import (CudaGraphDecode, FullReforward, KVCacheForward, MegatronKVCache,  # noqa: F401
                                     _check_attention_backend, _single_chunk, _stage_rank, attention_mask_for,
                                     choose_decoder, position_ids_from_mask, sdpa_mask, share_from_sampler,
                                     stage_forward)
from alfred_train.ppo.pipelined import can_pipeline, pipelined_decode
from alfred_train.ppo.sampling import (SamplingParams, draw_table, filter_top_k, filter_top_p, mask_logits,  # noqa: F401
                                       sample_next, uniform_draws)
from alfred_train.ppo.stage_decoder import StageDecoder, unsupported_reason

PADDED_VOCAB_LOGIT = -1e9  # finite "minus infinity" for the log-prob kernel (exp -> 0, no NaN)


# --------------------------------------------------------------------------- the decode loop

# "Which rows finished?" is asked of the device every step on CPU (free there) and on a GPU every 16
# steps (a host sync stalls the launch queue), or fewer for short responses: a row that finished
# between checks idles (its tokens dropped) for at most 1/IDLE_SHARE of max_new_tokens, so continuous
# batching still refills rows in a 12-token generation (checked every step there, as on CPU).
FINISHED_CHECK_EVERY = {"cpu": 1, "cuda": 16}
IDLE_SHARE = 32


def finished_check_interval(device, max_new_tokens: int) -> int:
    """Decode steps between two "which rows finished?" host syncs (see FINISHED_CHECK_EVERY)."""
    most = FINISHED_CHECK_EVERY.get(torch.device(device).type, 1)
    return max(1, min(most, max_new_tokens // IDLE_SHARE))


@dataclass
class Generation:
    """What one `generate_all` call produced, for Q prompts."""

    response_ids: torch.Tensor  # (Q, T) long, pad_id after a row's end
    response_mask: torch.Tensor  # (Q, T) 1 up to and including EOD
    logprobs: torch.Tensor  # (Q, T) float32 the sampler's log-prob of each token, 0 after the end
    slot_steps: int  # rows x decode steps: every token sampled, useful or not

    @property
    def slot_utilisation(self) -> float:
        """Useful tokens / slot-steps: 1.0 when no row ever waits for the batch's longest response."""
        return float(self.response_mask.sum()) / max(self.slot_steps, 1)


@torch.no_grad()
def generate_all(chunks, runtime, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams, *,
                 eod_id: int, vocab_size: int, seed: int, pad_id: int | None = None, keys: torch.Tensor | None = None,
                 slots: int | None = None, decoder=None, pipelined: bool = False, compiled: bool = False) -> Generation:
    """Responses to Q prompts (Q, P), `slots` rows decoded together (default Q: one static batch).

    With slots < Q and a decoder that can `refill` (the fast one), a row whose response ends takes
    the next prompt of the queue at once (continuous batching); other decoders run the queue in
    static batches of `slots`. At PP > 1 with `pipelined` (and the fast decoder), the `slots` rows
    are decoded as pp row groups in flight across the stages (`pipelined.py`), continuously batched
    as well. Each prompt's tokens depend only on (seed, its key) (keys (Q,), default 0 .. Q-1), not
    on its row, batch or layout. compiled: on CPU, the decode step compiled by torch.compile
    (`ppo.compile_decode`, `decode.CompiledDecode`). Collective over the TP and PP groups.
    """
    model = _single_chunk(chunks)
    _check_attention_backend(model)
    device = runtime.device
    pad_id = eod_id if pad_id is None else pad_id
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)  # (Q, P)
    queue_len, n_new = prompt_ids.shape[0], params.max_new_tokens
    keys = (torch.arange(queue_len) if keys is None else torch.as_tensor(keys)).to(device).long()  # (Q,)
    rows = min(slots or queue_len, queue_len)
    source = runtime.is_last_stage and runtime.tp_rank == 0
    check_every = finished_check_interval(device, n_new)
    decoder_cls = choose_decoder(model, runtime, compiled) if decoder is None else decoder
    draws = draw_table(seed, keys, n_new) if source and not params.greedy else None  # (Q, N) float64
    if pipelined and can_pipeline(runtime, rows, decoder_cls):
        return _generate_pipelined(model, runtime, prompt_ids, prompt_mask, params, rows, eod_id=eod_id,
                                   vocab_size=vocab_size, draws=draws, pad_id=pad_id, check_every=check_every,
                                   decoder_cls=decoder_cls)
    # one spill column (index N) takes the writes of idle rows, so no step needs to know which rows idle
    response = torch.full((queue_len, n_new + 1), pad_id, dtype=torch.long, device=device)  # (Q, N + 1)
    response_mask = torch.zeros_like(response)
    logprobs = torch.zeros(response.shape, dtype=torch.float32, device=device)
    dec, slot_steps, next_prompt, batch_start = None, 0, rows, 0
    try:
        with _inference(model, _decode_mode(decoder_cls)):
            owner = torch.arange(rows, device=device)  # (B,) the prompt each row decodes
            dec = decoder_cls(model, runtime, prompt_ids[:rows], prompt_mask[:rows], n_new)
            logits = dec.prefill()
            step_of = torch.zeros(rows, dtype=torch.long, device=device)  # (B,) token index within its response
            active = torch.ones(rows, dtype=torch.bool, device=device)  # (B,)
            for loop_step in itertools.count():
                slot_steps += rows
                drawn = sample_next(logits, params, step=step_of, vocab_size=vocab_size, eod_id=eod_id,
                                    draws=None if draws is None else draws[owner, step_of.clamp_max(n_new - 1)]) \
                    if source else (None, None)
                tokens = torch.where(active, share_from_sampler(drawn[0], runtime, (rows,), torch.long), pad_id)  # (B,)
                lp = share_from_sampler(drawn[1], runtime, (rows,), torch.float32)
                column = torch.where(active, step_of, n_new)  # idle rows write to the spill column
                response[owner, column] = tokens
                response_mask[owner, column] = active.long()
                logprobs[owner, column] = torch.where(active, lp, 0.0)
                active &= (tokens != eod_id) & (step_of + 1 < n_new)
                step_of += 1
                refill = None
                if (loop_step + 1) % check_every == 0 or loop_step + 1 - batch_start == n_new:
                    idle = (~active).nonzero()[:, 0]  # host sync: which rows finished
                    if len(idle) == rows and next_prompt >= queue_len:
                        break
                    if next_prompt < queue_len and len(idle) and hasattr(dec, "refill"):
                        refill = idle[:queue_len - next_prompt]
                    elif next_prompt < queue_len and len(idle) == rows:  # static batches: the next one
                        dec, owner, logits, step_of, active = _next_batch(
                            decoder_cls, model, runtime, prompt_ids, prompt_mask, n_new, next_prompt, rows, dec)
                        next_prompt += len(owner)
                        rows, batch_start = len(owner), loop_step + 1
                        continue
                logits = dec.step(tokens)
                if refill is not None:  # continuous batching: the next prompts start in the rows just freed
                    new = torch.arange(next_prompt, next_prompt + len(refill), device=device)
                    next_prompt += len(refill)
                    fresh = dec.refill(refill, prompt_ids[new], prompt_mask[new])
                    if fresh is not None:
                        logits[refill] = fresh
                    owner[refill], step_of[refill], active[refill] = new, 0, True
    finally:
        if hasattr(dec, "close"):
            dec.close()  # a CUDA graph and its memory pool end with the generation
        model.set_input_tensor(None)
    return _generation(response, response_mask, logprobs, slot_steps, n_new)


def _generation(response, response_mask, logprobs, slot_steps: int, n_new: int) -> Generation:
    """The decoded columns (Q, N + 1 with the spill column) cut to the longest response, as normal
    tensors (copies: the loop may have made them under inference mode)."""
    length = int(response_mask[:, :n_new].any(dim=0).sum())  # columns are contiguous from 0
    cut = lambda x: x[:, :length].clone()  # noqa: E731
    return Generation(cut(response), cut(response_mask), cut(logprobs), slot_steps)


@contextlib.contextmanager
def _inference(model, mode):
    """The model in eval mode (megatron uses its inference context only then), the CPU adapter
    suspended and `mode` (inference mode or no_grad) entered; its training mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with cpu_adapter.suspended(), mode:
            yield
    finally:
        model.train(was_training)


def _decode_mode(decoder_cls):
    """`torch.inference_mode` for the fast decoders (no view / version-counter bookkeeping: ~20% of a
    small CPU decode step); plain no_grad for megatron's forward, whose lru-cached RoPE tables must
    not become inference tensors that a later training forward would meet. Every tensor the loop
    returns is written into (or concatenated to) a normal tensor outside the mode."""
    fast = issubclass(decoder_cls, (KVCacheForward, CudaGraphDecode))
    return torch.inference_mode() if fast else contextlib.nullcontext()


def _generate_pipelined(model, runtime, prompt_ids, prompt_mask, params, rows, **kw) -> Generation:
    with _inference(model, torch.inference_mode()):
        decoded = pipelined_decode(model, runtime, prompt_ids, prompt_mask, params, rows, **kw)
    return _generation(*decoded, params.max_new_tokens)


def _next_batch(decoder_cls, model, runtime, prompt_ids, prompt_mask, n_new, start, rows, old):
    if hasattr(old, "close"):
        old.close()
    index = torch.arange(start, min(start + rows, prompt_ids.shape[0]), device=prompt_ids.device)
    dec = decoder_cls(model, runtime, prompt_ids[index], prompt_mask[index], n_new)
    logits = dec.prefill()
    zeros = torch.zeros(len(index), dtype=torch.long, device=prompt_ids.device)
    return dec, index, logits, zeros, torch.ones(len(index), dtype=torch.bool, device=prompt_ids.device)


def generate(chunks, runtime, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams, *,
             eod_id: int, vocab_size: int, seed: int, pad_id: int | None = None, keys: torch.Tensor | None = None,
             with_logprobs: bool = False, decoder=None, compiled: bool = False):
    """Sample responses with the KV cache: (response_ids (B, T), response_mask (B, T)), T <= max_new_tokens,
    and with_logprobs: the sampler's log-prob of each token (B, T) float32 (0 after a row's end).

    chunks: this rank's model chunk (one; unwrapped or not); prompt_ids (B, P) left-padded,
    prompt_mask (B, P) 1 on prompt tokens. vocab_size: the tokenizer's (ids >= it never sampled).
    pad_id fills the ids after EOD (default eod_id). keys (B,): each row's prompt key for the random
    stream (default 0 .. B-1). decoder: a decoder class (default `choose_decoder`; compiled: its
    step compiled on CPU, `decode.CompiledDecode`). Collective over
    the TP and PP groups; every rank of them returns the same tensors. Deterministic given
    (seed, keys), whatever the layout.
    """
    out = generate_all(chunks, runtime, prompt_ids, prompt_mask, params, eod_id=eod_id, vocab_size=vocab_size,
                       seed=seed, pad_id=pad_id, keys=keys, decoder=decoder, compiled=compiled)
    ids_mask = (out.response_ids, out.response_mask)
    return (*ids_mask, out.logprobs) if with_logprobs else ids_mask


def generate_full_reforward(chunks, runtime, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                            params: SamplingParams, *, eod_id: int, vocab_size: int, seed: int,
                            pad_id: int | None = None):
    """`generate` without a KV cache (the whole sequence re-run every step): slow, for tests and benches."""
    return generate(chunks, runtime, prompt_ids, prompt_mask, params, eod_id=eod_id, vocab_size=vocab_size,
                    seed=seed, pad_id=pad_id, decoder=FullReforward)


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
    rows = [slice(i, i + mbs) for i in range(0, batch, mbs)]
    if _fast_scoring(chunks, runtime):
        return _score_fast(unwrap(chunks[0]), runtime, sequences, attention_mask, reduce, rows)
    positions = position_ids_from_mask(attention_mask)  # (B, L)

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


def _fast_scoring(chunks, runtime) -> bool:
    """Score with `StageDecoder.score` (this rank's layers straight on their weights) rather than
    megatron's forward-only schedule: on CPU, where megatron's module overhead is a quarter of a
    small forward, for one stage (PP = 1, one chunk) that the fast decoder supports, without
    sequence parallelism. On a GPU the megatron forward (fused kernels) scores."""
    if runtime.dims.pp != 1 or len(chunks) != 1 or torch.device(runtime.device).type != "cpu":
        return False
    model = unwrap(chunks[0])
    return not model.config.sequence_parallel and unsupported_reason(model, runtime.dims.tp) is None


def _score_fast(model, runtime, sequences, attention_mask, reduce, rows):
    with _inference(model, torch.inference_mode()):
        decoder = StageDecoder(model, runtime, 0, sequences.shape[1], cache=False)
        collected = [reduce(decoder.score(sequences[r], sdpa_mask(attention_mask[r])), r) for r in rows]
    return torch.cat(collected)  # outside inference mode: a normal tensor


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
