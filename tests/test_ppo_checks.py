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
    (["parallel.tp=1", "parallel.dp=3", "train.global_batch_size=24"], "ppo.rollouts_per_iter"),  # 32 over 3 ranks
    (["ppo.eval_prompts=12"], "ppo.eval_prompts"),  # 12 held out: not whole micro-batches of 8
    (["parallel.tp=1", "parallel.pp=2", "parallel.vpp=2"], "parallel.vpp"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    (["model.attention_backend=flash"], "model.attention_backend"),
    (["model.attention_backend=te"], "model.attention_backend"),
    (["ppo.max_prompt_tokens=120"], "ppo.max_prompt_tokens"),  # 120 + 12 + 1 > max_seq_len 128
    (["ppo.max_new_tokens=126"], "ppo.max_new_tokens"),  # 126 + 1 leaves 1 of 128 for the prompt (derived limit)
    (["data.synthetic_size=20"], "ppo.rollouts_per_iter"),  # 20 prompts < 32 rollouts
    (["ppo.missing_eod_penalty=-1"], "ppo.missing_eod_penalty"),
    (["data.valid=/data/valid.jsonl"], "data.valid"),  # PPO never read it: a dry run called it valid
    (["checkpoint.init=/does/not/exist"], "checkpoint.init"),  # ignored: PPO starts from ppo.*_init
    (["ppo.adaptive_kl=true", "ppo.kl_coef=0"], "ppo.kl_coef"),  # the controller multiplies: 0 stayed 0
    (["ppo.adaptive_kl=true", "ppo.kl_horizon=6"], "ppo.kl_horizon"),  # 1 - 0.2 x 32 / 6 < 0: a negative beta
]


@pytest.fixture(scope="module")
def inits(tmp_path_factory):
    """SFT / RM checkpoint stand-ins: a meta.json recording the tiny recipe's tokenizer and template."""
    from alfred_train.stages.common import tokenizer_digest, tokenizer_path

    cfg = load_config(TINY_PPO)
    root = tmp_path_factory.mktemp("inits")
    state = {"template": cfg.data.template, "tokenizer": tokenizer_path(cfg),
             "tokenizer_sha256": tokenizer_digest(tokenizer_path(cfg)), "model": _shape(cfg)}
    return [f"ppo.policy_init={_checkpoint(root / 'sft', state, ['policy'])}",
            f"ppo.reward_init={_checkpoint(root / 'rm', state, ['reward'])}"]


def _shape(cfg) -> dict:
    import dataclasses

    from alfred_train.stages.common import shape_for, tokenizer_for

    return dataclasses.asdict(shape_for(cfg, tokenizer_for(cfg)))


@pytest.mark.parametrize("overrides,key", CASES, ids=[c[1] + ":" + c[0][-1] for c in CASES])
def test_config_errors_exit_2_naming_the_key_in_dry_run_and_real_run(capsys, tmp_path, inits, overrides, key):
    for extra in (["--dry-run"], []):  # the real run (2 processes) stops before spawning them
        code, err = _run(capsys, "ppo", TINY_PPO, f"run.dir={tmp_path}", *inits, *overrides, *extra)
        assert code == 2, (extra, err)
        assert err.startswith(f"alfred-train: error: {key}") and err.count("\n") == 1, err
    assert not (tmp_path / "config.yaml").exists()  # nothing written, nothing started


def test_the_sft_batch_keys_ppo_does_not_read_do_not_refuse_it(capsys, tmp_path, inits):
    """train.micro_batch_size / global_batch_size are the SFT and RM stages' (a recipe's YAML serves
    several stages); a PPO run was refused for them not dividing each other."""
    over = [f"run.dir={tmp_path}", *inits, "train.micro_batch_size=3", "--dry-run"]
    assert cli.main(["ppo", TINY_PPO, *over]) == 0, capsys.readouterr().err
    code, err = _run(capsys, "rm", str(ROOT / "configs" / "tiny-rm.yaml"), *over[:1], *over[3:])
    assert code == 2 and err.startswith("alfred-train: error: train.global_batch_size: 32 is not divisible"), err


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


def _checkpoint(root, state: dict, models: list[str], layout: dict | None = None):
    root.mkdir(parents=True)
    (root / "meta.json").write_text(json.dumps({"step": 1, "layout": layout or {}, "models": models, "state": state}))
    return root


def test_checkpoints_recorded_with_another_template_or_tokenizer_are_refused(capsys, tmp_path, inits):
    sft = inits[0].split("=", 1)[1]
    good = json.loads((Path(sft) / "meta.json").read_text())["state"]
    cases = [({**good, "template": "tulu"}, "data.template"), ({**good, "tokenizer_sha256": "0" * 64}, "model.tokenizer")]
    for i, (state, key) in enumerate(cases):
        rm = _checkpoint(tmp_path / f"rm{i}", state, ["reward"])
        code, err = _run(capsys, "ppo", TINY_PPO, f"ppo.policy_init={sft}", f"ppo.reward_init={rm}", "--dry-run")
        assert code == 2 and err.startswith(f"alfred-train: error: {key}") and "ppo.reward_init" in err, err
    code, out = cli.main(["ppo", TINY_PPO, *inits, "--dry-run"]), capsys.readouterr().out
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


def _prompt_file(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"question {path.stem} {i}?"}) + "\n" for i in range(n)))
    return path


def test_a_prompt_mixture_is_checked_source_by_source(capsys, tmp_path, inits):
    a, b, c = (_prompt_file(tmp_path / f"{name}.jsonl", 60) for name in "abc")

    def mixture(*paths):
        return "data.prompts=[" + ", ".join(f"{{path: {p}, format: records, weight: 0.5}}" for p in paths) + "]"

    run = ["ppo", TINY_PPO, f"run.dir={tmp_path / 'run'}", *inits, "--dry-run"]  # 32 rollouts + 32 held out
    code, out = cli.main([*run, mixture(a, b, c)]), capsys.readouterr()  # 32 held out, half of the other 148
    assert code == 0 and "not checked here" not in out.out, out.err
    code, err = _run(capsys, *run, mixture(a))  # 32 held out, half of the other 28: too few, through the mixture
    assert code == 2 and err.startswith("alfred-train: error: ppo.rollouts_per_iter: data.prompts leaves 14 "), err
    code, out = cli.main([*run, mixture(a, tmp_path / "absent.jsonl", tmp_path / "shards-*.jsonl")]), \
        capsys.readouterr().out
    assert code == 0, out
    assert f"not checked here: data.prompts[1]: {tmp_path / 'absent.jsonl'} is not reachable" in out
    assert "not checked here: data.prompts[2]" in out and "data.prompts[0]" not in out


def test_the_alfred_recipe_dry_run_with_a_readable_tokenizer_notes_each_prompt_source(capsys):
    from alfred_train.data.corpus import TINY_SP_MODEL_PATH

    code, out = cli.main(["ppo", ALFRED, "--dry-run", f"model.tokenizer={TINY_SP_MODEL_PATH}"]), capsys.readouterr()
    assert code == 0, out.err
    assert all(f"not checked here: data.prompts[{i}]: /fsx/" in out.out for i in range(5)), out.out
    assert "not checked here: ppo.policy_init: /fsx/" in out.out
    # without a readable tokenizer every other note was dropped: the inits and prompts are named too
    code, out = cli.main(["ppo", ALFRED, "--dry-run"]), capsys.readouterr()
    assert code == 0 and "not checked here: model.tokenizer: /fsx/" in out.out, out.err
    assert all(f"not checked here: data.prompts[{i}]: /fsx/" in out.out for i in range(5)), out.out
    assert "not checked here: ppo.policy_init: /fsx/alfred/checkpoints/falcon-40b-sft" in out.out, out.out
    assert "not checked here: ppo.reward_init: /fsx/" in out.out


def test_checkpoints_of_another_kind_or_shape_or_none_exit_2_in_dry_run_and_real_run(capsys, tmp_path, inits):
    sft, rm = (i.split("=", 1)[1] for i in inits)
    (tmp_path / "empty").mkdir()
    (tmp_path / "plain").write_text("not a checkpoint")
    cases = [([f"ppo.policy_init={tmp_path / 'empty'}"], "ppo.policy_init", "holds no checkpoint"),
             ([f"ppo.policy_init={tmp_path / 'plain'}"], "ppo.policy_init", "is a file"),
             ([f"ppo.policy_init={rm}"], "ppo.policy_init", "holds the models ['reward']"),
             ([f"ppo.reward_init={sft}"], "ppo.reward_init", "holds the models ['policy']"),
             (["model.num_layers=2"], "ppo.policy_init", "num_layers=4, this config builds num_layers=2"),
             (["model.arch=falcon"], "ppo.policy_init", "arch=llama, this config builds arch=falcon")]
    for overrides, key, says in cases:
        for extra in (["--dry-run"], []):  # the real run (2 processes) stops before spawning them
            code, err = _run(capsys, "ppo", TINY_PPO, f"run.dir={tmp_path / 'run'}", *inits, *overrides, *extra)
            assert code == 2 and err.startswith(f"alfred-train: error: {key}: ") and says in err, (extra, err)
            assert err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
    # a path not mounted here is a note in the dry run (an /fsx path on a login node), an error in the run
    code, out = cli.main(["ppo", TINY_PPO, *inits, "ppo.reward_init=/fsx/nowhere/rm", "--dry-run"]), \
        capsys.readouterr().out
    assert code == 0 and "not checked here: ppo.reward_init: /fsx/nowhere/rm is not reachable here" in out, out


def test_the_checkpoint_a_ppo_run_resumes_is_checked_too(capsys, tmp_path, inits):
    cfg = load_config(TINY_PPO)
    run = tmp_path / "run"
    state = {"model": {**_shape(cfg), "num_layers": 2}, "stage": "ppo"}
    layout = {"tp": 2, "pp": 1, "dp": 1, "vpp": None, "zero": False}
    _checkpoint(run / "checkpoints" / "iter_0000004", state, ["policy", "value"], layout)
    for extra in (["--dry-run"], []):
        code, err = _run(capsys, "ppo", TINY_PPO, f"run.dir={run}", *inits, *extra)
        assert code == 2 and err.startswith("alfred-train: error: checkpoint.resume: ") and "num_layers=2" in err, err
    code, err = _run(capsys, "ppo", TINY_PPO, f"run.dir={run}", *inits, "checkpoint.resume=none", "--dry-run")
    assert code == 2 and "holds checkpoints of an earlier run after it (iter_0000004)" in err, err
