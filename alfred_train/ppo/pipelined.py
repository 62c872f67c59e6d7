"""Pipeline-parallel decoding that keeps every stage busy: G = pp row groups in flight.

Plain PP decoding sends each token through the stages one after another: with pp stages, pp - 1
of them idle at any moment. Here the B rows are split into G = pp groups; at tick t stage s runs
decode step j = (t - s) // G + 1 of group g = (t - s) % G, on the hidden states stage s - 1
produced for it at tick t - 1:

    tick      0     1     2     3     4   ...          (pp = 2, groups A and B)
    stage 0   A1    B1    A2    B2    A3
    stage 1         A1    B1    A2    B2

Each tick ends with one broadcast over the PP group from the last stage: the tokens (and sampler
log-probs) of the group it just finished, and whether every row of every group has ended. Stage 0
needs exactly those tokens at the next tick (the group it starts then is the group just finished,
because G = pp), every rank records them, so all ranks return the same tensors. Within a tick the
stages compute at the same time; the broadcast is the only wait. Hidden states go stage to stage
with `isend` (the receiver takes them at its next tick). TP: as in the plain loop, the last stage's
TP rank 0 samples and the tokens are broadcast over its TP group first.

Prefill runs group by group through the stages (not overlapped: one pass per generation). Each
group has its own `KVCacheForward` (its own cache rows); a row computes what it computes in the
plain loop, and draws its tokens from its prompt's key: the same tokens, pipelined or not.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from alfred_train.ppo.decode import KVCacheForward, _stage_rank, share_from_sampler
from alfred_train.ppo.sampling import sample_next


def can_pipeline(runtime, batch: int, decoder_cls) -> bool:
    return runtime.dims.pp > 1 and batch >= runtime.dims.pp and decoder_cls is KVCacheForward


@torch.no_grad()
def pipelined_decode(model, runtime, prompt_ids, prompt_mask, params, *, eod_id: int, vocab_size: int, pad_id: int,
                     draws: torch.Tensor | None, check_every: int):
    """Decode B prompts (B, P) with G = pp groups in flight: (response (B, N), mask (B, N), logprobs (B, N),
    slot_steps). draws (B, N): the rows' uniform draws (`sampling.draw_table`), on the sampling rank
    (None elsewhere, and for greedy decoding). Collective over the TP and PP groups; the caller
    suspends the CPU adapter."""
    rt, n_new, device = runtime, params.max_new_tokens, runtime.device
    batch, pp, stage = prompt_ids.shape[0], runtime.dims.pp, runtime.pp_rank
    groups = list(torch.arange(batch, device=device).tensor_split(pp))  # G = pp row groups
    source = rt.is_last_stage and rt.tp_rank == 0
    response = torch.full((batch, n_new), pad_id, dtype=torch.long, device=device)  # (B, N)
    response_mask = torch.zeros_like(response)
    logprobs = torch.zeros(response.shape, dtype=torch.float32, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,)
    last_tokens = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) each row's newest token
    hidden_size = model.config.hidden_size

    def record(rows, step, logits):
        """Sample token `step` of `rows` on the source, share it, record it; True when all rows ended."""
        drawn = sample_next(logits, params, step=step, vocab_size=vocab_size, eod_id=eod_id,
                            draws=None if draws is None else draws[rows, step]) if source else None
        packet = None
        if source:
            packet = torch.cat([drawn[0].double(), drawn[1].double()])  # (2 R,) ids are exact in float64
        packet = share_from_sampler(packet, rt, (2 * len(rows),), torch.float64)
        tokens, lp = packet[:len(rows)].long(), packet[len(rows):].float()
        ended = done[rows]
        tokens = torch.where(ended, pad_id, tokens)
        response[rows, step] = tokens
        response_mask[rows, step] = (~ended).long()
        logprobs[rows, step] = torch.where(ended, 0.0, lp)
        done[rows] = ended | (tokens == eod_id)
        last_tokens[rows] = tokens

    decoders = [KVCacheForward(model, rt, prompt_ids[g], prompt_mask[g], n_new) for g in groups]
    for g, dec in zip(groups, decoders):  # prefill, group by group through the stages
        record(g, 0, dec.prefill())
    ticks = pp - 1 + (n_new - 1) * pp  # the last stage's last item: group G-1, step N-1
    sends = []
    steps_run, tick = 1, -1
    for tick in range(ticks):
        item = tick - stage
        if 0 <= item < (n_new - 1) * pp:  # this stage's (group, step) at this tick
            g, step = item % pp, item // pp + 1
            rows, dec = groups[g], decoders[g]
            if rt.is_first_stage:
                x = last_tokens[rows]  # (R,) the group's tokens, recorded at the previous tick
            else:
                x = torch.empty(len(rows), 1, hidden_size, dtype=dec.decoder.dtype, device=device)
                dist.recv(x, src=_stage_rank(rt, stage - 1), group=rt.pp_group)  # (R, 1, h)
            out = dec.step_local(x)
            if not rt.is_last_stage:
                sends.append(dist.isend(out.contiguous(), dst=_stage_rank(rt, stage + 1), group=rt.pp_group))
        finished = tick - (pp - 1)  # the item the last stage completes at this tick, known to every rank
        if finished >= 0:
            g, step = finished % pp, finished // pp + 1
            record(groups[g], step, out[:, -1] if rt.is_last_stage else None)
            steps_run = max(steps_run, step + 1)
            if (g == pp - 1 and (step + 1) % check_every == 0) and bool(done.all()):
                break  # every rank decides the same: `done` is shared
        if len(sends) > 2:
            sends.pop(0).wait()
    if not rt.is_first_stage and 0 <= tick + 1 - stage < (n_new - 1) * pp and tick < ticks - 1:
        # stopped early: take the one item the previous stage sent at the last tick (unmatched, its send hangs)
        rows = groups[(tick + 1 - stage) % pp]
        dist.recv(torch.empty(len(rows), 1, hidden_size, dtype=decoders[0].decoder.dtype, device=device),
                  src=_stage_rank(rt, stage - 1), group=rt.pp_group)
    for work in sends:
        work.wait()
    return response, response_mask, logprobs, batch * steps_run
