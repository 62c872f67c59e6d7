"""The optimizer and schedule a trainable gets (training.build_optimizer / build_scheduler), on a
real one-process megatron model: the rates its param groups take, step by step."""

from __future__ import annotations

import pytest

from alfred_train.config import load_config
from tests.helpers import ROOT


def _rates(cfg, lr, steps: int) -> list[float]:
    from alfred_train.kernels.backends import choose_backend
    from alfred_train.models.build import build_model, resolve_shape
    from alfred_train.training import build_optimizer, build_scheduler, wrap_ddp

    shape = resolve_shape(cfg.model, 512)
    chunks = wrap_ddp(build_model(shape, cfg.parallel, kind="scalar", bf16=False, backend=choose_backend("sdpa"),
                                  device="cpu", seed=1), zero=False)
    optimizer = build_optimizer(chunks, cfg.optim, lr=lr, bf16=False, zero=False)
    scheduler = build_scheduler(optimizer, cfg.optim, steps, lr=lr)
    rates = []
    for _ in range(steps + 2):  # past the decay: the floor
        rates.append(optimizer.param_groups[0]["lr"])
        scheduler.step(1)
    return rates


@pytest.mark.parametrize("value_lr", [1e-2, 1e-5])
def test_value_lr_decays_to_its_scaled_floor(megatron_world, value_lr):
    """ppo.value_lr's schedule is the policy's scaled by value_lr / optim.lr, floor included: megatron
    reads each param group's min_lr over the scheduler's, and the unscaled optim.min_lr there made a
    value rate below it *rise* to it over the decay."""
    cfg = load_config(ROOT / "configs" / "tiny-ppo.yaml", ["parallel.tp=1", "optim.warmup_steps=0",
                                                          "optim.decay_steps=null", "optim.schedule=cosine"])
    policy = _rates(cfg, None, 6)
    value = _rates(cfg, value_lr, 6)
    assert value == pytest.approx([r * value_lr / cfg.optim.lr for r in policy], rel=1e-9)
    assert value[-1] == pytest.approx(cfg.optim.min_lr * value_lr / cfg.optim.lr) and value[0] == pytest.approx(value_lr)
    assert all(a >= b for a, b in zip(value, value[1:]))  # decays, never rises
