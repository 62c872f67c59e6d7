"""The CPU adapter: lets megatron-core run unchanged on a machine without CUDA (gloo backend).

This is the only module of alfred-train that knows megatron-core assumes CUDA. It is installed by
`install()` when `torch.cuda.is_available()` is False and does nothing on a GPU machine.
What it changes, and why (see ../shared/notes/megatron-core-on-cpu.md for the measurements):

1. `torch.cuda.current_device()` answers ``"cpu"``: megatron passes it as a `device=` argument
   (tensor_parallel layers and mappings, p2p communication, the schedules).
2. `torch.cuda.synchronize()` (and a few stream/event helpers) become no-ops: the CPU build raises.
3. A global `TorchFunctionMode` maps every `device="cuda"`, `.cuda()` and `.to("cuda")` request
   to the CPU: the optimizer stack (clip_grads, distributed optimizer, grad scaler) and the
   schedules create tensors on a literal "cuda" device.
4. `Tensor.type()` with no argument reports the CUDA type name (`torch.cuda.FloatTensor`):
   megatron's optimizers assert that gradients and parameters are CUDA tensors by type string.
5. The model-parallel RNG tracker is megatron's "inference" tracker, whose `fork()` is a no-op:
   CUDA RNG states do not exist. Dropout must therefore be 0 (the RLHF setting; checked by
   `alfred_train.models` when it builds a TransformerConfig).

Cost of (3): every torch call pays a Python `__torch_function__` dispatch. On a forward+backward of a
4-layer hidden-128 GPT that is within run-to-run noise, but a decode step is nothing but small
calls: a tiny 16 x (64 + 64) generation spent about half its time in the mode. Code that makes no
literal CUDA request runs under `suspended()` (the rollout decode loop does), which takes the
mode off the stack for its block at no per-call cost.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_installed = False
_mode: TorchFunctionMode | None = None  # the global mode of (3), once installed


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU for every torch call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_plain_type = torch.Tensor.type


def _cuda_type_name(self, *args, **kwargs):
    if args or kwargs:
        return _plain_type(self, *args, **kwargs)
    name = _plain_type(self)
    return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name


class _NoStream:
    """Stand-in for torch.cuda.Stream / Event on CPU: every call is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cpu_rng_for_recompute() -> None:
    """Activation recomputation (train.recompute) saves and restores "the GPU's" RNG state around
    each recomputed layer: on CPU that state is the CPU generator's, which it also restores itself."""
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def install() -> bool:
    """Install the adapter if there is no CUDA. Returns True when it is active. Idempotent."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    torch.cuda.default_stream = lambda *a, **k: _NoStream()
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.empty_cache = lambda: None
    torch.Tensor.type = _cuda_type_name
    _cpu_rng_for_recompute()
    global _mode
    _mode = _CudaToCpu()
    _mode.__enter__()  # global for the life of the process
    _installed = True
    return True


@contextlib.contextmanager
def suspended():
    """Run a block without the global CUDA-to-CPU mode (3): for hot loops that create no tensor on a
    literal "cuda" device. A no-op without the adapter, or when another mode sits above ours."""
    depth = torch._C._len_torch_function_stack()
    if _mode is None or depth == 0 or torch._C._get_function_stack_at(depth - 1) is not _mode:
        yield
        return
    mode = torch._C._pop_torch_function_stack()
    try:
        yield
    finally:
        torch._C._push_on_torch_function_stack(mode)


def is_active() -> bool:
    return _installed
