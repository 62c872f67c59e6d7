"""Worker: PPO in two copies with LoRA. Makes seeded "policy" and "reward" checkpoints, builds the
LoRA PPO models the way the stage does, moves the adapters and the value head away from the base,
and asserts: the reference (policy, adapters off) and the reward model (value model, adapters off,
RM head) score exactly as separately built frozen copies do; the policy does not; no third or fourth
copy of the weights; the optimizers hold the adapters (and the value head) only. Then an RM trained
with LoRA as the reward_init: loaded merged, the reward model scores as that RM with its adapters.

    python tests/workers/lora_ppo_models.py OUT_DIR
"""

import dataclasses
import sys
from pathlib import Path

import torch
from ppo_models import save_seeded_inits  # tests/workers/ppo_models.py (this script's directory is on sys.path)


def main():
    from alfred_train import checkpoint
    from alfred_train.models import lora, lora_checkpoint
    from alfred_train.parallel.init import shutdown
    from alfred_train.ppo.generation import score_at_eod, sequence_logprobs, sequence_values
    from alfred_train.stages import common, ppo

    out = Path(sys.argv[1])
    cfg, runtime, tokenizer, shape, backend, state = save_seeded_inits(
        out, ["lora.rank=4", "lora.targets=[linear_qkv,linear_proj,linear_fc1,linear_fc2]"])

    policy, value, models = ppo.build_lora_models(cfg, runtime, shape, backend)
    reference = ppo._frozen(common.make_model(cfg, runtime, shape, kind="lm", backend=backend, seed=None))
    reward = ppo._frozen(common.make_model(cfg, runtime, shape, kind="scalar", backend=backend, seed=None))
    checkpoint.load_models(out / "sft", {"policy": (reference, None)})
    checkpoint.load_models(out / "rm", {"reward": (reward, None)})

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained adapters and value head: far from the base
        for chunk in models.policy + models.value:
            for a in lora.adapters(chunk):
                a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=gen) * 0.5)
        models.value[0].output_layer.weight.add_(1.0)
    head = models.value[0].output_layer.weight.detach().clone()

    seqs = torch.randint(3, tokenizer.vocab_size, (4, 16), generator=gen)  # (B, L)
    mask = torch.ones_like(seqs)
    eod = torch.full((4,), 15)
    lp = lambda ms: sequence_logprobs(ms, runtime, seqs, mask, 6, vocab_size=tokenizer.vocab_size)[0]  # noqa: E731
    score = lambda ms: score_at_eod(ms, runtime, seqs, mask, eod)  # noqa: E731
    for c in models.policy + models.value:
        c.eval()
    assert torch.equal(lp(models.reference), lp(reference)), "reference != frozen SFT copy"
    assert torch.equal(score(models.reward), score(reward)), "reward != frozen RM copy"
    assert (lp(models.policy) - lp(reference)).abs().max() > 1e-3, "adapters have no effect"
    values = sequence_values(models.value, runtime, seqs, mask, 6)
    assert (values[:, -1] - score(reward)).abs().max() > 1e-3, "value head is the RM head"
    assert torch.equal(models.value[0].output_layer.weight, head), "value head not restored after scoring"

    storages = lambda ms: {p.untyped_storage().data_ptr() for m in ms for p in m.parameters()}  # noqa: E731
    assert storages(models.reference) == storages(models.policy) and storages(models.reward) == storages(models.value)
    assert not storages(models.policy) & storages(models.value)
    for t, extra in ((policy, ()), (value, ("output_layer",))):
        trained = sum(p.numel() for n, p in t.chunks[0].named_parameters()
                      if "lora_" in n or any(n.startswith(f"module.{e}") or e in n for e in extra))
        held = sum(p.numel() for g in t.optimizer.param_groups for p in g["params"])
        assert held == trained > 0, (held, trained)

    # An RM trained with LoRA (its checkpoint: adapters + head + a reference to `rm`) as the PPO
    # reward/value base: loaded merged, it scores as the RM-with-adapters itself does.
    rm_lora = common.make_model(cfg, runtime, shape, kind="scalar", backend=backend, seed=None)
    checkpoint.load_models(out / "rm", {"reward": (rm_lora, None)})
    spec = lora.AdapterSpec.from_config(cfg.lora)
    lora.attach(rm_lora, spec, kind="scalar")
    lora.init_adapters(rm_lora, 5)
    with torch.no_grad():
        for a in lora.adapters(rm_lora[0]):
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=gen) * 0.3)
        rm_lora[0].output_layer.weight.add_(0.5)
    base = lora_checkpoint.base_ref(out / "rm", "reward")
    rm_state = {**state, "lora": {"reward": {**spec.to_state(), "base": base.to_state()}}}
    checkpoint.save_checkpoint(out / "rm_lora" / "checkpoints", 1,
                               {"reward": (lora_checkpoint.checkpoint_chunks(rm_lora), None)}, rm_state, runtime, 1,
                               common.layout(cfg))
    cfg2 = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, reward_init=str(out / "rm_lora")))
    _, _, chained = ppo.build_lora_models(cfg2, runtime, shape, backend)
    for c in rm_lora + chained.value:
        c.eval()
    assert (score(chained.reward) - score(rm_lora)).abs().max() < 1e-5, "merged LoRA RM != RM with adapters"
    assert (score(chained.reward) - score(reward)).abs().max() > 1e-3  # the RM's adapters and head count
    print("lora ppo models ok")
    shutdown()


if __name__ == "__main__":
    main()
