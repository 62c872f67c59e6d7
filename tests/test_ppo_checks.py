"""PPO's config errors before any model is built (ppo/checks.py), in process and fast.

Each bad setting exits 2 with one line naming the key, from `--dry-run` and from the real run alike
(the same `preflight`); the DP-invariant mini-batches; prompts cut at ppo.max_prompt_tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alfred_train import cli
from alfred_train.config import load_config
from alfred_train.errors import ConfigError
from tests.helpers import ROOT

TINY_PPO = str(ROOT / "configs" / "tiny-ppo.yaml")
ALFRED = str(ROOT / "configs" / "alfred-40b-ppo.yaml")


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    return code, err


# (overrides, the key the error names): tiny-ppo has 32 rollouts, 1 DP rank, micro-batches of 16 / 8
CASES = [
    (["ppo.rollout_micro_batch=5"], "ppo.rollout_micro_batch"),
    (["ppo.train_micro_batch=3"], "ppo.train_micro_batch"),
    (["ppo.value_steps_per_epoch=8"], "ppo.value_steps_per_epoch"),  # mini-batches of 4 < micro-batch 8
    (["ppo.policy_steps_per_epoch=3"], "ppo.policy_steps_per_epoch"),
    (["ppo.eval_prompts=12"], "ppo.eval_prompts"),  # 12 held out: not whole micro-batches of 8
    (["parallel.tp=1", "parallel.pp=2", "parallel.vpp=2"], "parallel.vpp"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    (["model.attention_backend=flash"], "model.attention_backend"),
    (["model.attention_backend=te"], "model.attention_backend"),
    (["ppo.max_prompt_tokens=120"], "ppo.max_prompt_tokens"),  # 120 + 12 + 1 > max_seq_len 128
    (["ppo.max_new_tokens=126"], "ppo.max_new_tokens"),  # 126 + 1 leaves 1 of 128 for the prompt (derived limit)
    (["data.synthetic_size=20"], "ppo.rollouts_per_iter"),  # 20 prompts < 32 rollouts
    (["ppo.missing_eod_penalty=-1"], "ppo.missing_eod_penalty"),
]


@pytest.fixture(scope="module")
def inits(tmp_path_factory):
    """SFT / RM checkpoint stand-ins: a meta.json recording the tiny recipe's tokenizer and template."""
    from alfred_train.stages.common import tokenizer_digest, tokenizer_path

    cfg = load_config(TINY_PPO)
    root = tmp_path_factory.mktemp("inits")
    state = {"template": cfg.data.template, "tokenizer": tokenizer_path(cfg),
             "tokenizer_sha256": tokenizer_digest(tokenizer_path(cfg))}
    return [f"ppo.policy_init={_checkpoint(root / 'sft', state)}", f"ppo.reward_init={_checkpoint(root / 'rm', state)}"]


@pytest.mark.parametrize("overrides,key", CASES, ids=[c[1] + ":" + c[0][-1] for c in CASES])
def test_config_errors_exit_2_naming_the_key_in_dry_run_and_real_run(capsys, tmp_path, inits, overrides, key):
    for extra in (["--dry-run"], []):  # the real run (2 processes) stops before spawning them
        code, err = _run(capsys, "ppo", TINY_PPO, f"run.dir={tmp_path}", *inits, *overrides, *extra)
        assert code == 2, (extra, err)
        assert err.startswith(f"alfred-train: error: {key}") and err.count("\n") == 1, err
    assert not (tmp_path / "config.yaml").exists()  # nothing written, nothing started


def test_the_alfred_recipe_names_a_backend_ppo_runs_with(capsys):
    cfg = load_config(ALFRED)
    assert cfg.model.attention_backend == "sdpa"
    code, err = _run(capsys, "ppo", ALFRED, "--dry-run")
    assert code == 0, err
    code, err = _run(capsys, "ppo", ALFRED, "model.attention_backend=flash", "--dry-run")
    assert code == 2 and "model.attention_backend: flash" in err


def test_auto_never_picks_a_backend_without_padding_masks():
    from alfred_train.kernels.backends import choose_backend

    assert choose_backend("auto", needs_padding_mask=True).name == "sdpa"
    for name in ("te", "flash"):
        with pytest.raises(ConfigError, match="model.attention_backend: .*padding"):
            choose_backend(name, needs_padding_mask=True)


def _checkpoint(root, state: dict):
    root.mkdir(parents=True)
    (root / "meta.json").write_text(json.dumps({"step": 1, "layout": {}, "models": [], "state": state}))
    return root


def test_checkpoints_recorded_with_another_template_or_tokenizer_are_refused(capsys, tmp_path, inits):
    sft = inits[0].split("=", 1)[1]
    good = json.loads((Path(sft) / "meta.json").read_text())["state"]
    cases = [({**good, "template": "tulu"}, "data.template"), ({**good, "tokenizer_sha256": "0" * 64}, "model.tokenizer")]
    for i, (state, key) in enumerate(cases):
        rm = _checkpoint(tmp_path / f"rm{i}", state)
        code, err = _run(capsys, "ppo", TINY_PPO, f"ppo.policy_init={sft}", f"ppo.reward_init={rm}", "--dry-run")
        assert code == 2 and err.startswith(f"alfred-train: error: {key}") and "ppo.reward_init" in err, err
    code, out = cli.main(["ppo", TINY_PPO, f"ppo.policy_init={sft}", f"ppo.reward_init={sft}", "--dry-run"]), \
        capsys.readouterr().out
    assert code == 0 and "not checked here" not in out, out
    # the real run needs the checkpoints: a missing one is an error, not a note
    code, err = _run(capsys, "ppo", TINY_PPO, f"run.dir={tmp_path / 'run'}", f"ppo.policy_init={tmp_path / 'nope'}",
                     f"ppo.reward_init={sft}")
    assert code == 2 and err.startswith("alfred-train: error: ppo.policy_init"), err


def test_long_prompts_are_cut_to_max_prompt_tokens_and_counted():
    from alfred_train.ppo.checks import load_prompts
    from alfred_train.stages.common import tokenizer_for

    cfg = load_config(TINY_PPO, ["ppo.max_prompt_tokens=12", "data.synthetic_size=64"])
    tokenizer = tokenizer_for(cfg)
    full = load_prompts(load_config(TINY_PPO, ["data.synthetic_size=64"]), tokenizer)
    cut = load_prompts(cfg, tokenizer)
    assert len(cut.train) == 64 and len(cut.held_out) == cfg.ppo.eval_prompts
    longer = {i for i, p in enumerate(full.train) if len(p) > 12}
    assert longer and cut.cut == longer and not full.cut
    for i, (a, b) in enumerate(zip(full.train, cut.train)):
        assert len(b) <= 12 and (b == a if i not in longer else b == a[:1] + a[-11:]), i  # BOS + last tokens


def test_minibatches_are_the_same_global_rows_at_any_dp_size():
    from alfred_train.ppo.update import minibatch_rows

    n, k = 16, 4
    for epoch in (0, 1):
        one = [set(r.tolist()) for r in minibatch_rows(n, k, first_row=0, seed=7, epoch=epoch)]
        assert sorted(x for m in one for x in m) == list(range(n)) and all(len(m) == n // k for m in one)
        for dp in (2, 4):
            share = n // dp
            per_rank = [minibatch_rows(share, k, first_row=r * share, seed=7, epoch=epoch) for r in range(dp)]
            united = [set() for _ in range(k)]
            for r, rows in enumerate(per_rank):
                for j, local in enumerate(rows):
                    united[j] |= {r * share + i for i in local.tolist()}
            assert united == one, (dp, epoch)
    assert [set(r.tolist()) for r in minibatch_rows(n, k, first_row=0, seed=7, epoch=1)] != \
        [set(r.tolist()) for r in minibatch_rows(n, k, first_row=0, seed=7, epoch=0)]  # reshuffled per epoch
    assert torch.cat(minibatch_rows(8, 1, first_row=8, seed=7, epoch=0)).tolist() == list(range(8))
