"""The rollout decoders: a stage's KV cache and step, and how tokens and hidden states cross stages.

    KVCacheForward    the fast path: `stage_decoder.StageDecoder` with a static cache, one token per
                      step, rows refilled in place (continuous batching)
    CompiledDecode    KVCacheForward with its step compiled by torch.compile (CPU, ppo.compile_decode)
    CudaGraphDecode   KVCacheForward with its step captured in a CUDA graph (one GPU rank)
    MegatronKVCache   megatron's own forward with its StaticInferenceContext: reference and fallback
    FullReforward     no cache, the whole sequence every step: the slowest reference

`choose_decoder` picks the fastest one the model and layout allow; the masks and position ids
here are megatron's (and the reference decoders').
"""

from __future__ import annotations

import logging
from functools import partial

import torch
import torch.distributed as dist

from alfred_train.errors import ConfigError
from alfred_train.models.build import unwrap
from alfred_train.ppo import compiled as compiled_steps
from alfred_train.ppo.stage_decoder import StageDecoder, unsupported_reason

log = logging.getLogger("alfred_train")

# --------------------------------------------------------------------------- masks and positions

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


def sdpa_mask(key_is_real: torch.Tensor) -> torch.Tensor | None:
    """`attention_mask_for` a whole sequence in SDPA's sense: (B, 1, S, S) bool, True = attend; None
    without padding, so SDPA takes its plain causal path."""
    real = key_is_real.bool()
    return None if bool(real.all()) else ~attention_mask_for(real, real.shape[1])


# --------------------------------------------------------------------------- pipeline stage I/O and decoders

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


def share_from_sampler(tensor, runtime, shape, dtype) -> torch.Tensor:
    """A tensor from the sampling rank (last stage, TP rank 0) to every rank of its TP and PP groups;
    `tensor` is None elsewhere (a buffer of `shape`, `dtype` receives it)."""
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device=runtime.device)
    if runtime.dims.tp > 1 and runtime.is_last_stage:
        dist.broadcast(tensor, src=dist.get_global_rank(runtime.tp_group, 0), group=runtime.tp_group)
    if runtime.dims.pp > 1:
        dist.broadcast(tensor, src=_stage_rank(runtime, runtime.dims.pp - 1), group=runtime.pp_group)
    return tensor


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
    """The fast path: prompts prefilled into this stage's own static KV cache (`StageDecoder`), then
    one (B, 1) token per step, each row at its own cache slot. RoPE tables and the key bias are
    built once per generation; the slots live on the device (no host value in a step: the same
    kernels every step). `refill` starts new prompts in some rows while the others go on
    (continuous batching): those rows' slots, key bias and cache are reset and their prompt is
    prefilled; a row's computation does not depend on the other rows."""

    def __init__(self, model, runtime, prompt_ids, prompt_mask, max_new_tokens: int):
        batch, prompt_len = prompt_ids.shape
        device = prompt_ids.device
        self.model, self.runtime, self.prompt_ids, self.prompt_mask = model, runtime, prompt_ids, prompt_mask
        self.max_len = prompt_len + max_new_tokens  # S
        self.decoder = StageDecoder(model, runtime, batch, self.max_len)
        self.key_bias = torch.empty(batch, 1, 1, self.max_len, dtype=self.decoder.dtype, device=device)  # (B,1,1,S)
        self.slot = torch.empty(batch, dtype=torch.long, device=device)  # (B,) each row's next cache slot
        # a device 0 (a Python 0.0 would be a CPU tensor copied in every step: no CUDA-graph capture)
        self.visible = torch.zeros((), dtype=self.decoder.dtype, device=device)
        # a step reads only the slots filled so far (its width, counted on the host: no sync, no cost);
        # a captured or compiled step (CudaGraphDecode, CompiledDecode) sets None: all S slots, static shapes
        self.width = prompt_len
        self.hidden_size = model.config.hidden_size

    def _decode(self, x, slots, key_bias):
        """This stage's forward of one token per row (`CompiledDecode` compiles it)."""
        return self.decoder.forward(x, slots, key_bias)

    def _run(self, x, forward):
        """This stage's `forward(x)`, its input received from the previous stage (x: the ids (B, s) on
        the first stage, there only their shape) and its output sent to the next; (B, V) on the last."""
        rt = self.runtime
        if not rt.is_first_stage:
            batch, seq = x.shape
            x = torch.empty(batch, seq, self.hidden_size, dtype=self.decoder.dtype, device=rt.device)
            dist.recv(x, src=_stage_rank(rt, rt.pp_rank - 1), group=rt.pp_group)  # (B, s, h)
        out = forward(x)
        if rt.is_last_stage:
            return out[:, -1]  # (B, V)
        dist.send(out.contiguous(), dst=_stage_rank(rt, rt.pp_rank + 1), group=rt.pp_group)
        return None

    def _start(self, prompt_ids, prompt_mask, rows, stage_input=None):
        prompt_len = prompt_ids.shape[1]
        real = prompt_mask.bool()  # (R, P)
        bias = torch.full((real.shape[0], self.max_len), float("-inf"), dtype=self.key_bias.dtype,
                          device=real.device)
        bias[:, :prompt_len].masked_fill_(real, 0.0)  # (R, S): prompt tokens visible, the rest not yet
        if rows is None:
            self.key_bias[:, 0, 0] = bias
            self.slot.fill_(prompt_len)
        else:
            self.key_bias[rows, 0, 0] = bias
            self.slot[rows] = prompt_len
        mask = sdpa_mask(real)  # (R, 1, P, P)
        slots = torch.arange(prompt_len, device=real.device)
        forward = partial(self.decoder.forward, slots=slots, mask=mask, rows=rows)
        if stage_input is None:
            return self._run(prompt_ids, forward)
        out = forward(stage_input)
        return out[:, -1] if self.runtime.is_last_stage else out

    def prefill(self):
        return self._start(self.prompt_ids, self.prompt_mask, None)

    def refill(self, rows, prompt_ids, prompt_mask, stage_input=None):
        """Start prompts (R, P) (left-padded to the generation's P) in cache rows `rows` (R,): (R, V).
        stage_input: this stage's input from a caller that moves it (the pipelined decoder): the ids on
        the first stage, the previous stage's hidden states (R, P, h) elsewhere; the output is then
        returned, not sent: logits (R, V) on the last stage, else hidden states (R, P, h)."""
        return self._start(prompt_ids, prompt_mask, rows, stage_input)

    def step(self, tokens):
        return self.step_local(tokens, communicate=True)

    def step_local(self, x, communicate: bool = False):
        """One decode step; x: tokens (B,) on the first stage, else the previous stage's hidden states
        (B, 1, h) (with communicate=True: received here). Without communication: this stage's output,
        hidden (B, 1, h) or logits (B, 1, V), for a caller that moves it (the pipelined decoder)."""
        self.key_bias[self.decoder.row_index, 0, 0, self.slot] = self.visible  # each new token sees itself
        bias = self.key_bias
        if self.width is not None:
            self.width = min(self.width + 1, self.max_len)
            bias = bias[..., :self.width]  # (B, 1, 1, w)
        x = x[:, None] if x.dim() == 1 else x
        forward = partial(self._decode, slots=self.slot, key_bias=bias)
        out = self._run(x, forward) if communicate else forward(x)
        self.slot.add_(1).clamp_max_(self.max_len - 1)  # a finished row may idle on: keep its slot in range
        return out


class CompiledDecode(KVCacheForward):
    """`KVCacheForward` with its decode step compiled by torch.compile (`compiled.decode_step`; CPU,
    `ppo.compile_decode`). Every step attends over the whole cache (static shapes, as a captured
    CUDA-graph step): one compiled step for the whole generation, however far it has got."""

    def __init__(self, model, runtime, prompt_ids, prompt_mask, max_new_tokens: int):
        super().__init__(model, runtime, prompt_ids, prompt_mask, max_new_tokens)
        self.width = None

    def _decode(self, x, slots, key_bias):
        return compiled_steps.decode_step(self.decoder, x, slots, key_bias)


class MegatronKVCache:
    """Reference / fallback: megatron's own forward with its `StaticInferenceContext` KV cache."""

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


def _check_attention_backend(model) -> None:
    layers = model.decoder.layers
    if len(layers) and type(layers[0].self_attention.core_attention).__name__ == "FlashAttention":
        raise ConfigError("generation needs padding masks, which the flash attention backend does not take: "
                          "set model.attention_backend=sdpa")


class CudaGraphDecode:
    """`KVCacheForward` with its decode step captured once in a CUDA graph and replayed after.

    The step is capturable because nothing in it depends on a host value: the cache slot, the key
    bias and the cache are device tensors updated in place, shapes are static (every step attends
    over all S slots). Two eager warm-up steps run on a side stream (CUDA's lazy init, cuBLAS
    workspaces), the third is captured (capture records, it runs nothing) and replayed. Any failure
    to capture logs one warning and the generation goes on eagerly: the same tokens, slower (later
    generations in the process get `KVCacheForward` from `choose_decoder`, without trying again).
    The graph and its memory pool live only inside one `generate` call (`close`), so the training
    phase that follows never holds them. TP/PP collectives are not captured: one rank, one stage only.
    """

    WARMUP_STEPS = 2
    capture_failed = False  # once per process: a step that cannot be captured is not tried again

    def __init__(self, model, runtime, prompt_ids, prompt_mask, max_new_tokens: int):
        self.eager = KVCacheForward(model, runtime, prompt_ids, prompt_mask, max_new_tokens)
        self.eager.width = None  # the captured step's shapes are static: it attends over all S slots
        self.graph, self.steps = None, 0
        self.tokens = self.logits = None  # the graph's static input (B,) and output (B, V)

    def prefill(self):
        return self.eager.prefill()

    def refill(self, rows, prompt_ids, prompt_mask):  # eager, in place on the tensors the graph reads
        return self.eager.refill(rows, prompt_ids, prompt_mask)

    def step(self, tokens):
        self.steps += 1
        if self.graph is None and not CudaGraphDecode.capture_failed:
            if self.steps <= self.WARMUP_STEPS:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self.eager.step(tokens)
                torch.cuda.current_stream().wait_stream(side)
                return out
            self._capture(tokens)
        if self.graph is None:
            return self.eager.step(tokens)
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits

    def _capture(self, tokens):
        graph = torch.cuda.CUDAGraph()
        self.tokens = tokens.clone()
        try:
            with torch.cuda.graph(graph):
                self.logits = self.eager.step(self.tokens)
            self.graph = graph
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to the eager step
            self.tokens = self.logits = None
            CudaGraphDecode.capture_failed = True
            log.warning("generation: CUDA-graph capture of the decode step failed (%s: %s); decoding eagerly",
                        type(err).__name__, err, extra={"rank_local": True})

    def close(self):
        if self.graph is not None:
            self.graph.reset()
        self.graph = self.tokens = self.logits = None


def choose_decoder(model, runtime, compiled: bool = False):
    """The fastest decoder this model and layout allow: `CudaGraphDecode` on one GPU rank (until a
    capture fails in the process), `KVCacheForward` where `StageDecoder` supports the model
    (`CompiledDecode` on CPU with compiled), else megatron's `MegatronKVCache`."""
    reason = unsupported_reason(model, runtime.dims.tp)
    if reason:
        log.info("generation: megatron's own forward decodes (the fast decoder does not support %s)", reason)
        return MegatronKVCache
    on_gpu = torch.device(runtime.device).type == "cuda"
    one_rank = runtime.dims.tp == 1 and runtime.dims.pp == 1
    # after a failed capture, the plain eager step: it reads only the filled cache, the graph's fallback all of it
    if on_gpu and CUDA_GRAPHS and one_rank and not CudaGraphDecode.capture_failed:
        return CudaGraphDecode
    return CompiledDecode if compiled and not on_gpu else KVCacheForward


CUDA_GRAPHS = True  # the one switch for tests and benchmarks (before/after on a GPU)
