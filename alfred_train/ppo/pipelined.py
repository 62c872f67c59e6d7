"""Pipeline-parallel decoding that keeps every stage busy: G = pp row groups in flight, the queue
continuously batched.

Plain PP decoding sends each token through the stages one after another: with pp stages, pp - 1
of them idle at any moment. Here the B rows (slots) are split into G = pp groups; item i is
group i mod G's next decode step, and at tick t stage s runs item t - s, on the hidden states
stage s - 1 produced for it at tick t - 1:

    tick      0     1     2     3     4   ...          (pp = 2, groups A and B)
    stage 0   A1    B1    A2    B2    A3
    stage 1         A1    B1    A2    B2

Each tick ends with one broadcast over the PP group from the last stage: the tokens (and sampler
log-probs) of the group it just finished. Every rank records them (so all ranks return the same
tensors and take the same decisions), and stage 0 needs exactly those tokens at the next tick: the
item it starts then is the next step of the group just finished, because G = pp. Within a tick the
stages compute at the same time; the broadcast is the only wait. Hidden states go stage to stage
with `isend` (the receiver takes them at its next tick). TP: as in the plain loop, the last stage's
TP rank 0 samples and the tokens are broadcast over its TP group first.

Continuous batching (Q > B prompts): when a group's tokens are recorded, every rank sees which of
its rows ended and assigns them the next prompts of the queue. The group's next item carries the
refill through the stages: each stage runs the group's decode step, then prefills the new prompts
into the freed cache rows (`KVCacheForward.refill`) and passes both outputs on; the last stage
samples the new rows' first tokens from the prefill's logits. A row computes what it computes in
the plain loop and draws its tokens from its prompt's key: the same tokens, pipelined or not,
continuously batched or not. The first B prompts are prefilled group by group through the stages
(not overlapped). The loop ends when every row has ended and the queue is empty; each non-first
stage then takes the one item its predecessor sent at the last tick.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from alfred_train.ppo.decode import KVCacheForward, _stage_rank, share_from_sampler
from alfred_train.ppo.sampling import sample_next


def can_pipeline(runtime, batch: int, decoder_cls) -> bool:
    return runtime.dims.pp > 1 and batch >= runtime.dims.pp and issubclass(decoder_cls, KVCacheForward)


@torch.no_grad()
def pipelined_decode(model, runtime, prompt_ids, prompt_mask, params, slots: int, *, eod_id: int, vocab_size: int,
                     pad_id: int, draws: torch.Tensor | None, check_every: int, decoder_cls=KVCacheForward):
    """Decode Q prompts (Q, P), `slots` rows at a time in G = pp groups in flight, a row that ends
    taking the queue's next prompt: (response (Q, N + 1), mask, logprobs (Q, N + 1), slot_steps);
    column N is a spill column (the writes of idle rows). draws (Q, N): the prompts' uniform draws
    (`sampling.draw_table`), on the sampling rank (None elsewhere, and for greedy decoding).
    Collective over the TP and PP groups; the caller suspends the CPU adapter."""
    rt, n_new, device = runtime, params.max_new_tokens, runtime.device
    queue_len, pp, stage = prompt_ids.shape[0], runtime.dims.pp, runtime.pp_rank
    batch = min(slots, queue_len)
    groups = list(torch.arange(batch, device=device).tensor_split(pp))  # G = pp row groups
    source = rt.is_last_stage and rt.tp_rank == 0
    response = torch.full((queue_len, n_new + 1), pad_id, dtype=torch.long, device=device)
    response_mask = torch.zeros_like(response)
    logprobs = torch.zeros(response.shape, dtype=torch.float32, device=device)
    owner = torch.arange(batch, device=device)  # (B,) the prompt each row decodes
    step_of = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) token index within its response
    active = torch.ones(batch, dtype=torch.bool, device=device)  # (B,)
    last_tokens = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) each row's newest token
    hidden_size = model.config.hidden_size
    # host-side bookkeeping, the same on every rank: per group, its records so far, the record by
    # which all its rows have surely ended, and the refill its next item carries (local rows, prompts)
    records, deadline, refills = [0] * pp, [n_new] * pp, [None] * pp
    next_prompt, slot_steps = batch, 0  # the queue's next prompt; rows x decode steps so far

    def record(g, logits) -> bool:
        """Sample the newest token of group g's rows on the source, share and record it, refill the
        rows that ended from the queue; True when every row has ended and the queue is empty."""
        nonlocal next_prompt, slot_steps
        rows = groups[g]
        live, step = active[rows], step_of[rows]
        drawn = sample_next(logits, params, step=step, vocab_size=vocab_size, eod_id=eod_id,
                            draws=None if draws is None else draws[owner[rows], step.clamp_max(n_new - 1)]) \
            if source else None
        packet = torch.cat([drawn[0].double(), drawn[1].double()]) if source else None  # ids exact in float64
        packet = share_from_sampler(packet, rt, (2 * len(rows),), torch.float64)
        tokens = torch.where(live, packet[:len(rows)].long(), pad_id)
        column = torch.where(live, step, n_new)
        response[owner[rows], column] = tokens
        response_mask[owner[rows], column] = live.long()
        logprobs[owner[rows], column] = torch.where(live, packet[len(rows):].float(), 0.0)
        active[rows] = live & (tokens != eod_id) & (step + 1 < n_new)
        step_of[rows] += 1
        last_tokens[rows] = tokens
        slot_steps += len(rows)
        records[g] += 1
        if records[g] % check_every and records[g] < deadline[g]:
            return False  # no host sync this time
        ended = (~active[rows]).nonzero()[:, 0][:queue_len - next_prompt]  # host sync: local rows
        if len(ended):
            new = torch.arange(next_prompt, next_prompt + len(ended), device=device)
            next_prompt += len(ended)
            owner[rows[ended]], step_of[rows[ended]], active[rows[ended]] = new, 0, True
            refills[g], deadline[g] = (ended, new), records[g] + n_new
        return next_prompt >= queue_len and not bool(active.any())

    decoders = [decoder_cls(model, rt, prompt_ids[g], prompt_mask[g], n_new) for g in groups]
    finished = False
    for g, dec in enumerate(decoders):  # prefill, group by group through the stages
        finished = record(g, dec.prefill())
    sends, out, tick = [], None, -1
    for tick in itertools.count():
        if finished:
            break
        item = tick - stage
        if item >= 0:  # this stage's item at this tick: group item % G's next step
            g = item % pp
            rows, dec = groups[g], decoders[g]
            x = last_tokens[rows] if rt.is_first_stage else _receive(rt, (len(rows), 1, hidden_size), dec)
            out = dec.step_local(x)
            sent = [out]
            if refills[g] is not None:  # rows that ended start their new prompts
                ended, new = refills[g]
                refills[g] = None
                x = prompt_ids[new] if rt.is_first_stage else \
                    _receive(rt, (len(new), prompt_ids.shape[1], hidden_size), dec)
                fresh = dec.refill(ended, prompt_ids[new], prompt_mask[new], stage_input=x)
                if rt.is_last_stage:
                    out[ended, -1] = fresh
                sent.append(fresh)
            if not rt.is_last_stage:
                sends += [dist.isend(t.contiguous(), dst=_stage_rank(rt, stage + 1), group=rt.pp_group) for t in sent]
        done_item = tick - (pp - 1)  # the item the last stage completes at this tick, known to every rank
        if done_item >= 0:
            finished = record(done_item % pp, out[:, -1] if rt.is_last_stage else None)
        while len(sends) > 4:
            sends.pop(0).wait()
    if not rt.is_first_stage and tick > 0:
        # the item the previous stage sent at the last tick, unmatched (its send would hang); no
        # refill rides on it: a refilled row is active until its first token is recorded
        _receive(rt, (len(groups[(tick - stage) % pp]), 1, hidden_size), decoders[0])
    for work in sends:
        work.wait()
    return response, response_mask, logprobs, slot_steps


def _receive(rt, shape, dec) -> torch.Tensor:
    x = torch.empty(shape, dtype=dec.decoder.dtype, device=rt.device)
    dist.recv(x, src=_stage_rank(rt, rt.pp_rank - 1), group=rt.pp_group)
    return x
