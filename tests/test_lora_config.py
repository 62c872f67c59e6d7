"""LoRA config section and dry-run lines (no processes): bad input is one ConfigError line naming the key."""

from __future__ import annotations

import pytest

from alfred_train.config import load_config
from alfred_train.dryrun import describe
from alfred_train.errors import ConfigError
from tests.helpers import ROOT

TINY_PPO = ROOT / "configs" / "tiny-ppo.yaml"


@pytest.mark.parametrize("override,message", [
    ("lora.targets=[q_proj]", "lora.targets: unknown target 'q_proj'"),
    ("lora.rank=-1", "lora.rank: must be >= 0"),
    ("lora.dropout=1.0", "lora.dropout: must be in [0, 1)"),
    ("ppo.offload_frozen=true", "ppo.offload_frozen: with lora.rank > 0"),
])
def test_bad_lora_config_is_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(TINY_PPO, ["lora.rank=4", override])


def test_rank_larger_than_a_layer_is_refused_by_the_dry_run():
    cfg = load_config(TINY_PPO, ["lora.rank=65", "parallel.tp=1"])
    with pytest.raises(ConfigError, match=r"lora.rank: 65 is larger than linear_qkv \(64 -> 128\)"):
        describe(cfg, "ppo")


def test_dry_run_shows_memory_with_and_without_lora():
    """7B PPO on one 8 x A100-80GB node at TP=1, DP=8 (ZeRO): full fine-tuning needs four 7B copies
    (126 GiB per GPU, does not fit); LoRA needs two frozen copies plus small adapters."""
    cfg = load_config(TINY_PPO, ["model.preset=llama2-7b", "parallel.tp=1", "parallel.dp=8", "parallel.zero=true",
                                 "lora.rank=16", "model.max_seq_len=1024", "ppo.rollout_micro_batch=16",
                                 "ppo.rollouts_per_iter=256", "train.global_batch_size=64"])
    text = describe(cfg, "ppo")
    line = next(ln for ln in text.splitlines() if "with LoRA vs" in ln)
    with_lora, full = (float(x.split(" GiB")[0].split()[-1]) for x in line.split(" with LoRA vs "))
    assert full > 80 > with_lora > 2 * 12.5  # two frozen 7B bases in bf16, adapters on top
    assert "12,582,912 adapter parameters" in text  # 32 layers x 16 x (4096 + 12288 + 4096 + 4096)


def test_a_lora_run_that_fits_only_with_lora_is_not_refused():
    """The peak plan (and `alfred-train launch`, which runs the dry run) counts the LoRA model states:
    StackLLaMA's PPO at TP=1 x DP=8 on 80 GB needs 150 GiB of states as full fine-tuning, and was
    refused ("parallel.pp: the plan needs 156.5 GiB") although LoRA holds it in under 80."""
    over = ["parallel.tp=1", "parallel.dp=8", "launch.gpu_memory_gib=80"]
    text = describe(load_config(ROOT / "configs" / "stackllama-ppo.yaml", over), "ppo")
    peak = float(next(ln for ln in text.splitlines() if ln.startswith("  peak: ")).split()[1])
    assert peak < 80
    with pytest.raises(ConfigError, match="parallel.pp: the plan needs"):  # without LoRA it does not fit
        describe(load_config(ROOT / "configs" / "stackllama-ppo.yaml", [*over, "lora.rank=0"]), "ppo")


def test_a_lora_checkpoint_is_sized_as_its_adapters():
    """The dry run (and the SageMaker disk check after it) sized a LoRA checkpoint as the full model's
    weights and Adam states (94 GB for StackLLaMA's SFT), and refused a 200 GB volume for its PPO job.
    A LoRA checkpoint holds the adapters (and the value model's head): StackLLaMA's PPO, linear_qkv r=16
    on 32 layers of 4096 -> 12288, for the policy and the value model (+ a 4096 + 1 head)."""
    params = 2 * 32 * 16 * (4096 + 12288) + 4097
    text = describe(load_config(ROOT / "configs" / "stackllama-ppo.yaml",
                                ["parallel.tp=1", "parallel.dp=8", "launch.gpu_memory_gib=80"]), "ppo")
    line = next(ln for ln in text.splitlines() if ln.startswith("Checkpoint: "))
    assert line.startswith(f"Checkpoint: {params * 14 / 1e6:.2f} MB each ({params * 2 / 1e6:.2f} MB weights"), line

