"""Attention backend: detected explicitly, chosen once at startup, logged.

    model.attention_backend   core_attention class                      layer spec
    te                        megatron TEDotProductAttention            megatron's TE spec
    flash                     kernels.attention.FlashAttention           local spec
    sdpa                      kernels.attention.SDPAAttention            local spec
    eager                     megatron DotProductAttention               local spec
    auto                      te if `transformer_engine.pytorch` imports, else flash if
                              `flash_attn` imports and CUDA is available, else sdpa;
                              with needs_padding_mask (PPO): sdpa

A backend that was asked for by name and cannot run is a `ConfigError` naming the extra to
install; nothing falls back silently. The model builder reads `backend.core_attention` into a
layer spec's `self_attention.submodules.core_attention` slot, or uses the TE spec when
`backend.uses_te_spec`.

Padding masks: te (megatron's TE spec builds its layers with the causal mask type) and flash
(`flash_attn_func`, causal only) ignore the (B, 1, sq, sk) padding mask; sdpa and eager apply it.
PPO's rollouts are left-padded, so PPO asks for `needs_padding_mask=True`: `auto` then never picks
te or flash, and PPO's config check (ppo.checks) refuses them by name before anything is built.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from alfred_train.errors import ConfigError

logger = logging.getLogger("alfred_train")

BACKEND_NAMES = ("auto", "te", "flash", "sdpa", "eager")
_INSTALL_GPU = "pip install 'alfred-train[gpu]'"


@dataclass(frozen=True)
class AttentionBackend:
    name: str  # one of te | flash | sdpa | eager (never auto: that is resolved here)
    core_attention: type  # module class for the layer spec's core_attention slot
    uses_te_spec: bool  # True: build layers from megatron's Transformer Engine spec


def _import_failure(module: str) -> Optional[str]:
    """None if `module` imports, else why not (one line). Broken installs count as missing."""
    try:
        importlib.import_module(module)
    except Exception as err:  # ImportError, OSError from missing CUDA libraries, ...
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


def _te_unavailable() -> Optional[str]:
    return _import_failure("transformer_engine.pytorch")


def _flash_unavailable() -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return _import_failure("flash_attn")


def _te_backend() -> AttentionBackend:
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    return AttentionBackend("te", TEDotProductAttention, uses_te_spec=True)


def _flash_backend() -> AttentionBackend:
    from alfred_train.kernels.attention import FlashAttention

    return AttentionBackend("flash", FlashAttention, uses_te_spec=False)


def _sdpa_backend() -> AttentionBackend:
    from alfred_train.kernels.attention import SDPAAttention

    return AttentionBackend("sdpa", SDPAAttention, uses_te_spec=False)


def _eager_backend() -> AttentionBackend:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return AttentionBackend("eager", DotProductAttention, uses_te_spec=False)


@dataclass(frozen=True)
class _Probe:
    unavailable: Callable[[], Optional[str]]  # None if the backend can run, else why not
    build: Callable[[], AttentionBackend]
    missing: str  # what is missing, for the error message
    fix: str  # what to do about it


_PROBES = {
    "te": _Probe(_te_unavailable, _te_backend, "transformer_engine is not installed", _INSTALL_GPU),
    "flash": _Probe(
        _flash_unavailable,
        _flash_backend,
        "flash_attn is not usable",
        f"{_INSTALL_GPU} on a CUDA machine",
    ),
    "sdpa": _Probe(lambda: None, _sdpa_backend, "", ""),
    "eager": _Probe(lambda: None, _eager_backend, "", ""),
}


PADDING_MASK_BACKENDS = ("sdpa", "eager")  # the backends that apply a padding attention_mask


def choose_backend(requested: str, *, needs_padding_mask: bool = False) -> AttentionBackend:
    """Resolve `model.attention_backend` (auto|te|flash|sdpa|eager) to one backend and log it.
    needs_padding_mask: the caller passes padding masks (PPO's left-padded rollouts)."""
    if requested not in BACKEND_NAMES:
        raise ConfigError(
            f"model.attention_backend={requested!r} is unknown: use one of {', '.join(BACKEND_NAMES)}"
        )
    if needs_padding_mask and requested not in PADDING_MASK_BACKENDS + ("auto",):
        raise ConfigError(f"model.attention_backend: {requested} ignores padding masks, which this stage "
                          "needs; set model.attention_backend=sdpa or eager")
    if requested != "auto":
        probe = _PROBES[requested]
        reason = probe.unavailable()
        if reason is not None:
            raise ConfigError(
                f"model.attention_backend={requested} but {probe.missing} ({reason}): "
                f"{probe.fix} or set model.attention_backend=sdpa"
            )
        backend = probe.build()
        logger.info("attention backend: %s (requested)", backend.name)
        return backend

    skipped = ["te, flash: no padding mask"] if needs_padding_mask else []
    for name in () if needs_padding_mask else ("te", "flash"):
        reason = _PROBES[name].unavailable()
        if reason is None:
            backend = _PROBES[name].build()
            logger.info("attention backend: %s (auto)", backend.name)
            return backend
        skipped.append(f"{name}: {reason}")
    backend = _sdpa_backend()
    logger.info("attention backend: sdpa (auto; skipped %s)", "; ".join(skipped))
    return backend
