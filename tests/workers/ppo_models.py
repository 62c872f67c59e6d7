"""Worker: make seeded "policy" and "reward" checkpoints, then check the PPO models built from them.

    python tests/workers/ppo_models.py OUT_DIR [nan-reward]

Writes OUT_DIR/sft (model "policy") and OUT_DIR/rm (model "reward"); with `nan-reward` the reward
head weights are NaN (to test the non-finite-update guard). Then builds the four PPO models the
way the stage does and asserts: value == reward parameter by parameter, no storage shared with
the policy or the reward model, reference == policy.
"""

import dataclasses
import sys
from pathlib import Path

import torch


def save_seeded_inits(out: Path, overrides=(), nan_reward: bool = False):
    """tiny-ppo.yaml (+ overrides) with OUT/sft and OUT/rm as its inits, and seeded "policy" and
    "reward" checkpoints written there (NaN reward head weights with nan_reward), one process.
    Returns (cfg, runtime, tokenizer, shape, backend, state): state is the checkpoints' common state."""
    from alfred_train import checkpoint
    from alfred_train.config import load_config
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime
    from alfred_train.stages import common

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny-ppo.yaml",
                      ["parallel.tp=1", f"ppo.policy_init={out / 'sft'}", f"ppo.reward_init={out / 'rm'}", *overrides])
    runtime = init_runtime(ParallelDims(1, 1, 1))
    tokenizer = common.tokenizer_for(cfg)
    shape = common.shape_for(cfg, tokenizer)
    backend = common.attention_backend(cfg, runtime)
    state = {"model": dataclasses.asdict(shape), "tokenizer": common.tokenizer_path(cfg)}
    lm = common.make_model(cfg, runtime, shape, kind="lm", backend=backend, seed=11)
    scalar = common.make_model(cfg, runtime, shape, kind="scalar", backend=backend, seed=22)
    if nan_reward:
        with torch.no_grad():
            scalar[0].output_layer.weight.fill_(float("nan"))
    checkpoint.save_checkpoint(out / "sft" / "checkpoints", 1, {"policy": (lm, None)}, state, runtime, 1, common.layout(cfg))
    checkpoint.save_checkpoint(out / "rm" / "checkpoints", 1, {"reward": (scalar, None)}, state, runtime, 1, common.layout(cfg))
    return cfg, runtime, tokenizer, shape, backend, state


def main():
    from alfred_train import checkpoint
    from alfred_train.parallel.init import shutdown
    from alfred_train.stages import ppo

    out = Path(sys.argv[1])
    nan = len(sys.argv) > 2 and sys.argv[2] == "nan-reward"
    cfg, runtime, _, shape, backend, _ = save_seeded_inits(out, nan_reward=nan)

    policy, value, models = ppo.build_models(cfg, runtime, shape, backend)
    checkpoint.load_models(out / "sft", {"policy": (models.policy, None)})
    checkpoint.load_models(out / "sft", {"policy": (models.reference, None)})
    checkpoint.load_models(out / "rm", {"reward": (models.reward, None)})
    checkpoint.load_models(out / "rm", {"value=reward": (models.value, None)})
    value_params = dict(models.value[0].named_parameters())
    reward_params = dict(models.reward[0].named_parameters())
    assert value_params.keys() == reward_params.keys()
    for name, p in value_params.items():
        assert torch.equal(p, reward_params[name]) or nan, name
    storages = lambda ms: {p.untyped_storage().data_ptr() for m in ms for p in m.parameters()}  # noqa: E731
    assert not storages(models.value) & storages(models.policy), "value shares memory with the policy"
    assert not storages(models.value) & storages(models.reward), "value shares memory with the reward model"
    for (name, p), (_, q) in zip(models.policy[0].named_parameters(), models.reference[0].named_parameters()):
        assert torch.equal(p, q), name
    assert value.optimizer is not policy.optimizer and value.scheduler is not policy.scheduler
    print("ppo models ok")
    shutdown()


if __name__ == "__main__":
    main()
