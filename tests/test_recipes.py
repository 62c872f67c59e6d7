"""One recipe per seed system: each passes --dry-run with the seed's own settings, and a tiny replica
(same data format, template and algorithm settings; tiny preset, tiny data, one process) runs
SFT -> RM -> PPO end to end through the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from alfred_train import cli
from alfred_train.config import load_config
from alfred_train.data.synthetic import make_preference_pairs, make_sft_records
from tests import format_fixtures as fx
from tests.helpers import ROOT, metrics, run_cli

CONFIGS = ROOT / "configs"
RECIPES = {  # stage -> recipe file
    "stackllama": {"sft": "stackllama-sft.yaml", "rm": "stackllama-rm.yaml", "ppo": "stackllama-ppo.yaml"},
    "stable-vicuna": dict.fromkeys(("sft", "rm", "ppo"), "stable-vicuna-ppo.yaml"),
    "tulu-2.5": dict.fromkeys(("sft", "rm", "ppo"), "tulu-2.5-ppo-13b.yaml"),
    "alfred": dict.fromkeys(("sft", "rm", "ppo"), "alfred-40b-ppo.yaml"),
}


DRY_RUNS = [("stackllama", "sft"), ("stackllama", "rm"), ("stackllama", "ppo"), ("stable-vicuna", "rm"),
            ("stable-vicuna", "ppo"), ("tulu-2.5", "rm"), ("tulu-2.5", "ppo"), ("alfred", "ppo")]


@pytest.mark.parametrize("seed,stage", DRY_RUNS)
def test_recipe_dry_runs_with_the_seeds_settings(seed, stage, capsys):
    assert cli.main([stage, str(CONFIGS / RECIPES[seed][stage]), "--dry-run"]) == 0, capsys.readouterr().err


def test_a_stage_without_its_data_is_refused_by_the_dry_run(capsys):
    # Alfred's recipe holds PPO prompts only: its SFT stage would have nothing to train on
    assert cli.main(["sft", str(CONFIGS / "alfred-40b-ppo.yaml"), "--dry-run"]) == 2
    assert "data.train: the SFT examples this stage trains on come from data.train, which is not set" in \
        capsys.readouterr().err


def test_stackllama_recipes_hold_trls_settings():
    sft, rm, ppo = (load_config(CONFIGS / f"stackllama-{s}.yaml") for s in ("sft", "rm", "ppo"))
    assert sft.model.preset == "llama-7b" and sft.data.template == "stackllama"
    assert sft.data.format == rm.data.format == ppo.data.format == "stack-exchange-paired"
    assert (sft.optim.lr, sft.optim.schedule, sft.optim.warmup_steps, sft.optim.weight_decay) == (1e-4, "cosine", 100, 0.05)
    assert (sft.data.seq_len, sft.data.pack, sft.train.max_steps) == (1024, True, 10000)
    assert (rm.optim.lr, rm.optim.schedule, rm.data.seq_len, rm.optim.weight_decay) == (2e-5, "linear", 512, 0.001)
    o = ppo.ppo
    assert (ppo.optim.lr, ppo.optim.schedule, ppo.optim.clip_grad) == (1.41e-5, "constant", 0.0)
    assert (o.kl_coef, o.adaptive_kl, o.kl_target, o.kl_horizon) == (0.2, True, 6.0, 10000)
    assert (o.policy_epochs, o.policy_steps_per_epoch, o.rollouts_per_iter) == (4, 8, 256)
    assert (o.max_new_tokens, o.min_new_tokens, o.top_k, o.top_p) == (128, 32, 0, 1.0)
    # TRL's LoraConfig per script (q_proj/v_proj live in megatron's fused linear_qkv)
    for cfg, rank, alpha, dropout in [(sft, 16, 32, 0.05), (rm, 8, 32, 0.1), (ppo, 16, 32, 0.05)]:
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (rank, alpha, dropout,
                                                                                      ("linear_qkv",))


def test_tulu_and_stable_vicuna_recipes_hold_their_settings():
    tulu = load_config(CONFIGS / "tulu-2.5-ppo-13b.yaml")
    opt, o = tulu.optim, tulu.ppo
    assert (tulu.model.preset, tulu.data.template) == ("llama2-13b", "tulu")
    assert (opt.lr, opt.beta1, opt.beta2, opt.eps, opt.schedule, opt.min_lr) == (1e-6, 0.9, 0.999, 1e-8, "linear", 0.0)
    assert opt.warmup_steps == tulu.train.max_steps // 10 and opt.decay_steps == tulu.train.max_steps
    assert (o.rollouts_per_iter, o.policy_epochs, o.kl_coef, o.adaptive_kl) == (64, 1, 0.05, False)
    vicuna = load_config(CONFIGS / "stable-vicuna-ppo.yaml")
    assert (vicuna.model.preset, vicuna.data.template) == ("llama-13b", "stable-vicuna")
    assert [s.format for s in vicuna.data.train][0] == "oasst1" and vicuna.data.languages == ("en",)
    assert "convert apply-delta" in (CONFIGS / "stable-vicuna-ppo.yaml").read_text()
    alfred = load_config(CONFIGS / "alfred-40b-ppo.yaml")
    assert [s.format for s in alfred.data.prompts][:3] == ["oasst1", "hh-rlhf", "dolly"]
    assert alfred.data.languages == ("en", "fr", "de", "es", "it")


# ---------------------------------------------------------------------------------------------
# Tiny replicas: the recipe file itself, with only scale and paths overridden.

SCALE = ["model.tokenizer=", "model.vocab_size=", "checkpoint.init=", "model.attention_backend=auto", "parallel.tp=1", "parallel.pp=1", "parallel.dp=1",
         "parallel.zero=false", "train.precision=fp32", "train.max_steps=1", "train.micro_batch_size=2",
         "train.global_batch_size=4", "train.eval_interval=0", "train.eval_batches=1", "data.seq_len=64",
         "data.valid_fraction=0.1", "checkpoint.interval=0", "checkpoint.resume=none",
         "logging.tensorboard=false", "logging.plots=false"]
PPO_SCALE = ["ppo.rollouts_per_iter=16", "ppo.rollout_micro_batch=8", "ppo.train_micro_batch=2",
             "ppo.max_new_tokens=8", "ppo.max_prompt_tokens=112", "ppo.eval_prompts=0"]
SCALE_KEYS = {"rollouts_per_iter", "rollout_micro_batch", "train_micro_batch", "max_new_tokens", "min_new_tokens",
              "max_prompt_tokens", "eval_prompts", "policy_init", "reward_init"}
TEMPLATE_CUES = {"stackllama": "Question: ", "stable-vicuna": "### Human: ", "tulu": "<|user|>\n", "plain": ""}


def _chat_pairs(n: int) -> list[dict]:
    """Tulu 2.5 preference data: chosen / rejected message lists."""
    return [{"prompt": p["prompt"],
             "chosen": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["rejected"]}]}
            for p in make_preference_pairs(n, 5)]


def _data(seed: str, d: Path) -> dict[str, list[str]]:
    """Per stage, the data overrides pointing the recipe at tiny files in its own formats."""
    if seed == "stackllama":
        se = fx.write(d / "se.parquet", fx.stack_exchange_rows(64))
        return {"sft": [f"data.train={se}"], "rm": [f"data.train={se}", f"data.valid={se}"],
                "ppo": [f"data.prompts={se}"]}
    if seed == "stable-vicuna":
        oasst = fx.write(d / "oasst1.parquet", fx.oasst1_rows(48))  # half the trees in en (data.languages)
        hh = fx.write(d / "hh.jsonl.gz", fx.hh_rlhf_rows(24))
        gpt4all = fx.write(d / "gpt4all.parquet", make_sft_records(16, 3))
        alpaca = d / "alpaca_data.json"  # as Stanford ships it: one JSON array
        alpaca.write_text(json.dumps([{"instruction": r["prompt"], "input": "", "output": r["response"]}
                                      for r in make_sft_records(16, 5)], indent=2))
        train = f"data.train=[{{path: {oasst}, format: oasst1}}, {{path: {hh}, format: hh-rlhf, weight: 0.5}}]"
        return dict.fromkeys(("sft", "rm"), [train]) | {"ppo": [
            f"data.prompts=[{{path: {oasst}, format: oasst1}}, {{path: {gpt4all}, format: records, weight: 0.25}},"
            f" {{path: {alpaca}, format: alpaca, weight: 0.25}}]"]}
    if seed == "tulu-2.5":
        return dict.fromkeys(("sft", "rm", "ppo"), [f"data.train={fx.write(d / 'arena.jsonl', _chat_pairs(64))}"])
    hh = fx.write(d / "hh.parquet", fx.hh_rlhf_rows(64))
    oasst, dolly = fx.write(d / "oasst1.parquet", fx.oasst1_rows(16)), fx.write(d / "dolly.jsonl", fx.dolly_rows(16))
    own = fx.write(d / "own.jsonl", [{"prompt": p["prompt"]} for p in make_sft_records(8, 4)])
    return dict.fromkeys(("sft", "rm"), [f"data.train={hh}"]) | {"ppo": [
        f"data.prompts=[{{path: {oasst}, format: oasst1}}, {{path: {hh}, format: hh-rlhf, weight: 0.25}},"
        f" {{path: {dolly}, format: dolly}}, {{path: {own}, format: records}}]"]}


@pytest.mark.slow
@pytest.mark.parametrize("seed", sorted(RECIPES))
def test_tiny_replica_runs_sft_rm_ppo(seed, tmp_path):
    recipe = {stage: str(CONFIGS / name) for stage, name in RECIPES[seed].items()}
    preset = "tiny-falcon" if seed == "alfred" else "tiny-llama"
    data = _data(seed, tmp_path / "data")
    runs = {stage: tmp_path / stage for stage in ("sft", "rm", "ppo")}
    common = [f"model.preset={preset}", *SCALE]
    run_cli("sft", recipe["sft"], *common, *data["sft"], f"run.dir={runs['sft']}")
    run_cli("rm", recipe["rm"], *common, *data["rm"], f"rm.init={runs['sft']}", f"run.dir={runs['rm']}")
    min_new = ["ppo.min_new_tokens=4"] if load_config(recipe["ppo"]).ppo.min_new_tokens > 8 else []
    run_cli("ppo", recipe["ppo"], *common, *PPO_SCALE, *min_new, *data["ppo"], f"ppo.policy_init={runs['sft']}",
            f"ppo.reward_init={runs['rm']}", f"run.dir={runs['ppo']}")

    # the replica ran the recipe's algorithm: its resolved PPO config equals the recipe's but for scale
    ran = yaml.safe_load((runs["ppo"] / "config.yaml").read_text())
    want = load_config(recipe["ppo"])
    want_ppo = json.loads(json.dumps(dataclasses.asdict(want.ppo)))  # tuples as YAML lists
    for key, value in ran["ppo"].items():
        if key not in SCALE_KEYS:
            assert value == want_ppo[key], key
    assert ran["optim"] == dataclasses.asdict(want.optim)
    assert (ran["data"]["template"], ran["data"]["format"]) == (want.data.template, want.data.format)
    assert metrics(runs["ppo"], "kl_coef")[0] == want.ppo.kl_coef
    assert metrics(runs["rm"], "accuracy") and metrics(runs["sft"], "loss")
    samples = [json.loads(line) for line in (runs["ppo"] / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"].startswith(TEMPLATE_CUES[want.data.template]) for s in samples)
