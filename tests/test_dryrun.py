"""Architecture presets, the Alfred-40B PPO recipe and `alfred-train ... --dry-run`.

In-process and fast: the CLI's dry run on the 40B recipe (layout, parameter counts against published
and transformers-computed values, memory table), every Alfred hyperparameter field by field, every
preset, config errors with exit code 2. One `slow` test launches 4 workers (TP=2 x PP=2, vpp=2) that
build the real megatron models and compare each rank's parameter count and layers with the analytic
ones (this file run as a script).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alfred_train import cli
from alfred_train.config import load_config
from alfred_train.sizing import bytes_per_param, kv_cache_bytes, model_params, params_per_gpu, stage_layers
from alfred_train.models.build import resolve_shape

REPO = Path(__file__).resolve().parents[1]
ALFRED = REPO / "configs" / "alfred-40b-ppo.yaml"
TINY_PPO = REPO / "configs" / "tiny-ppo.yaml"
GIB = 1024 ** 3

# Exact counts with untied embeddings, as transformers builds them (checked by
# test_counts_equal_transformers_models below): Llama-2 as published (6.74B / 13.0B / 69.0B);
# Falcon-40B "41.8B" and Falcon-7B "7.22B" as on their model pages (untied lm_head).
KNOWN_PARAMS = {
    "falcon-40b": 41_835_970_560,
    "falcon-7b": 7_217_189_760,
    "llama2-7b": 6_738_415_616,
    "llama-7b": 6_738_415_616,  # LLaMA-1: the same shape as Llama-2
    "llama-13b": 13_015_864_320,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
}


def preset_shape(name: str):
    cfg = load_config(TINY_PPO, [f"model.preset={name}", "parallel.tp=1"])
    return resolve_shape(cfg.model, vocab_size=512)


def dry_run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([*argv, "--dry-run"])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------------------------
# The Alfred recipe


def test_alfred_dry_run_prints_layout_params_and_memory(capsys):
    code, out, err = dry_run(capsys, "ppo", str(ALFRED))
    assert code == 0, err
    assert "TP=8 PP=4 DP=4 = 128 GPUs" in out
    assert "nodes: 16 x 8 GPUs" in out
    assert "pipeline stage 0: layers 0-14 (+ embedding)" in out
    assert "pipeline stage 3: layers 45-59 (+ final norm + output layer)" in out
    assert "Peak per GPU (train.recompute: full" in out and "Checkpoint: 1.16 TB each" in out
    params_table, memory_table = (section.splitlines() for section in out.split("\n\n")[1:3])
    totals = {line.split()[0]: int(line.split()[2].replace(",", "")) for line in params_table[3:]}
    # Falcon-40B: 41.8B published; policy/reference untied LM, value/reward a scalar head (h + 1).
    assert abs(totals["policy"] - 41.8e9) / 41.8e9 < 0.01
    assert totals["policy"] == totals["reference"] == KNOWN_PARAMS["falcon-40b"]
    assert totals["value"] == totals["reward"] == KNOWN_PARAMS["falcon-40b"] - 65024 * 8192 + 8192 + 1
    # Memory table: pipeline stage 0 (15 layers + the embedding) is the fullest for all four models.
    assert memory_table[0].startswith("Memory per GPU (pipeline stage 0")
    memory = {}
    for line in memory_table[3:]:  # table rows first, then the notes (which may repeat a first word)
        memory.setdefault(line.split()[0], line.split())
    n = 15 * (679_510_016 - 32_768) // 8 + 15 * 32_768 + 65024 * 8192 // 8  # per GPU: TP shards, norms replicated
    for name in ("policy", "value", "reference", "reward"):
        assert int(memory[name][2].replace(",", "")) == n, name
    weights, grads, optimizer, total = (float(x) for x in memory["policy"][3:11:2])
    assert weights == pytest.approx(n * 2 / GIB, abs=0.006)
    assert grads == pytest.approx(n * 4 / GIB, abs=0.006)
    assert optimizer == pytest.approx(n * 12 / 4 / GIB, abs=0.006)  # main params + Adam, ZeRO over dp=4
    assert total == pytest.approx(n * 9 / GIB, abs=0.006)
    assert memory["reference"][3:] == [f"{n * 2 / GIB:.2f}", "GiB", "-", "-", f"{n * 2 / GIB:.2f}", "GiB"]
    kv = 2 * 60 * 8 * 64 * 2048 * 64 * 2 / (8 * 4)  # 64 rollouts of 2048 tokens
    assert float(memory["KV"][-2]) == pytest.approx(kv / GIB, abs=0.006)
    expected = n * (9 + 9 + 2 + 2) + kv
    assert float(memory["total"][1]) == pytest.approx(expected / GIB, abs=0.006)
    assert 20 < float(memory["total"][1]) < 40  # fits an A100 40GB before activations
    # how rollouts decode: 64 rows, continuous batching, PP=4 without pipelined decode, and the fix named
    rollouts = next(line for line in out.splitlines() if line.startswith("Rollouts:"))
    assert "64 rows decoded together" in rollouts and "continuous batching on" in rollouts
    assert "pipelined decode off: each token crosses the 4 stages" in rollouts and "ppo.pipelined_decode" in rollouts


def test_dry_run_says_when_pipelined_decode_cannot_form_its_groups(capsys):
    code, out, err = dry_run(capsys, "ppo", str(TINY_PPO), "parallel.tp=1", "parallel.pp=2",
                             "ppo.pipelined_decode=true", "ppo.rollout_micro_batch=1")
    assert code == 0, err
    assert "raise ppo.rollout_micro_batch to >= 2" in out
    code, out, err = dry_run(capsys, "ppo", str(TINY_PPO), "parallel.tp=1", "parallel.pp=2",
                             "ppo.pipelined_decode=true", "ppo.recompute_logprobs=false")
    assert "pipelined decode: 2 row groups in flight" in out and "the sampler's" in out
    assert "torch.compile" not in out
    code, out, err = dry_run(capsys, "ppo", str(TINY_PPO), "ppo.compile_decode=true")
    assert code == 0 and "the decode step compiled by torch.compile" in out, err


def test_alfred_config_equals_the_table_field_by_field():
    cfg = load_config(ALFRED)
    m, p, o, opt, t = cfg.model, cfg.parallel, cfg.ppo, cfg.optim, cfg.train
    # Falcon-40B shape
    assert (m.arch, m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups) == \
        ("falcon", 60, 8192, 128, 8)
    assert (m.ffn_hidden_size, m.vocab_size, m.norm_eps, m.parallel_layernorms) == (4 * 8192, 65024, 1e-5, 2)
    assert m.hidden_size // m.num_attention_heads == 64
    # 3D parallelism + ZeRO, bf16, 128 GPUs on 16 p4d
    assert (p.tp, p.pp, p.dp, p.zero, cfg.world_size) == (8, 4, 4, True, 128)
    assert t.precision == "bf16"
    assert (cfg.launch.nodes, cfg.launch.gpus_per_node, cfg.launch.sagemaker.instance_type) == \
        (16, 8, "ml.p4d.24xlarge")
    # Policy and value optimizer
    assert (opt.lr, opt.warmup_steps, opt.decay_steps, opt.schedule, opt.min_lr) == \
        (1.85e-6, 10, 100, "cosine", 1.85e-7)
    assert o.value_lr == 1.85e-6
    # Trainer
    assert o.rollouts_per_iter == 1024
    assert (o.policy_epochs, o.value_epochs) == (1, 1)
    assert (o.kl_coef, o.adaptive_kl, o.gamma, o.lam) == (0.01, False, 1.0, 0.95)
    assert (o.clip_policy, o.clip_value) == (0.2, 0.2)
    assert (o.whiten_advantages, o.whiten_rewards, o.score_on_eod) == (True, False, True)
    assert t.max_steps == 200
    assert (o.policy_steps_per_epoch, o.value_steps_per_epoch) == (1, 8)
    # Trajectory data
    assert (o.max_new_tokens, o.min_new_tokens, o.top_p, o.temperature) == (1024, 0, 1.0, 1.0)
    assert o.policy_init and o.reward_init and cfg.data.prompts


# ---------------------------------------------------------------------------------------------
# Presets and parameter counts


@pytest.mark.parametrize("name", sorted(KNOWN_PARAMS))
def test_preset_parameter_counts_match_published(name):
    assert model_params(preset_shape(name), "lm").total == KNOWN_PARAMS[name]


def test_presets_load_with_their_shapes():
    expect = {  # layers, hidden, heads, kv groups, ffn, vocab, max_seq_len
        "falcon-40b": (60, 8192, 128, 8, 32768, 65024, 2048),
        "falcon-7b": (32, 4544, 71, 1, 18176, 65024, 2048),
        "llama2-7b": (32, 4096, 32, 32, 11008, 32000, 4096),
        "llama-7b": (32, 4096, 32, 32, 11008, 32000, 2048),
        "llama-13b": (40, 5120, 40, 40, 13824, 32000, 2048),
        "llama2-13b": (40, 5120, 40, 40, 13824, 32000, 4096),
        "llama2-70b": (80, 8192, 64, 8, 28672, 32000, 4096),
        "tiny-llama": (4, 64, 4, 2, 256, 512, 128),
        "tiny-falcon": (4, 64, 4, 2, 256, 512, 128),
    }
    assert sorted(p.stem for p in (REPO / "configs" / "presets").glob("*.yaml")) == sorted(expect)
    for name, want in expect.items():
        s = preset_shape(name)
        got = (s.num_layers, s.hidden_size, s.num_attention_heads, s.num_query_groups, s.ffn_hidden_size,
               s.padded_vocab_size, s.max_seq_len)
        assert got == want, name
    assert preset_shape("falcon-7b").parallel_layernorms == 1
    assert preset_shape("falcon-40b").parallel_layernorms == 2
    # the run's own model keys win over the preset
    cfg = load_config(TINY_PPO, ["model.preset=llama2-7b", "model.num_layers=8", "parallel.tp=1"])
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (8, 4096)


def test_counts_equal_transformers_models():
    """The analytic counts equal the parameters of the HF models (meta device: no memory)."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    configs = {
        "falcon-40b": tf.FalconConfig(vocab_size=65024, hidden_size=8192, num_hidden_layers=60,
                                      num_attention_heads=128, num_kv_heads=8, new_decoder_architecture=True,
                                      parallel_attn=True, bias=False, tie_word_embeddings=False),
        "falcon-7b": tf.FalconConfig(vocab_size=65024, hidden_size=4544, num_hidden_layers=32,
                                     num_attention_heads=71, multi_query=True, parallel_attn=True, bias=False,
                                     tie_word_embeddings=False),
        "llama2-70b": tf.LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                                     num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                                     tie_word_embeddings=False),
    }
    for name, config in configs.items():
        with torch.device("meta"):
            model = (tf.FalconForCausalLM if name.startswith("falcon") else tf.LlamaForCausalLM)(config)
        hf = sum(p.numel() for p in model.parameters())
        assert model_params(preset_shape(name), "lm").total == hf == KNOWN_PARAMS[name], name


def test_per_gpu_counts_add_up_to_the_total():
    """Summed over the TP x PP grid, per-GPU counts give the total plus the TP-replicated norms/head."""
    for name, kind, tp, pp in [("falcon-40b", "lm", 8, 4), ("llama2-70b", "scalar", 8, 8), ("falcon-7b", "lm", 1, 4)]:
        mp = model_params(preset_shape(name), kind)
        replicated = mp.num_layers * mp.norms + mp.final_norm + (0 if mp.head_sharded else mp.head)
        assert sum(params_per_gpu(mp, tp, pp)) * tp == mp.total + (tp - 1) * replicated, name


def test_stage_layers_interleaved_like_megatron():
    assert stage_layers(60, 4, None) == [[range(0, 15)], [range(15, 30)], [range(30, 45)], [range(45, 60)]]
    assert stage_layers(8, 2, 2) == [[range(0, 2), range(4, 6)], [range(2, 4), range(6, 8)]]


def test_bytes_per_param_and_kv_cache():
    assert bytes_per_param(trainable=True, bf16=True, zero=False, dp=4).total == 18
    assert bytes_per_param(trainable=True, bf16=True, zero=True, dp=4).total == 2 + 4 + 3
    assert bytes_per_param(trainable=True, bf16=False, zero=True, dp=2).total == 4 + 4 + 4
    assert bytes_per_param(trainable=False, bf16=True, zero=True, dp=4).total == 2
    shape = preset_shape("falcon-40b")
    # 2 (k, v) x 60 layers x 8 groups x 64 x 2048 tokens x 64 rollouts x 2 bytes / 8 / 4 = 480 MiB
    assert kv_cache_bytes(shape, seq_len=2048, micro_batch=64, tp=8, pp=4, bf16=True) == 480 * 1024 ** 2


# ---------------------------------------------------------------------------------------------
# Other stages, tiny recipe, errors


def test_sft_and_rm_dry_runs_show_only_the_trained_model(capsys):
    code, out, err = dry_run(capsys, "sft", str(TINY_PPO), "model.preset=llama2-7b", "parallel.tp=8",
                             "parallel.pp=2", "parallel.dp=2", "ppo.rollouts_per_iter=32")
    assert code == 0, err
    assert "TP=8 PP=2 DP=2 = 32 GPUs" in out and "6,738,415,616" in out
    assert "reward" not in out and "KV cache" not in out
    code, out, err = dry_run(capsys, "rm", str(TINY_PPO), "model.preset=llama2-7b", "parallel.tp=1")
    assert code == 0, err
    assert f"{6_738_415_616 - 32000 * 4096 + 4097:,}" in out and "policy" not in out


TINY_SFT = REPO / "configs" / "tiny-sft.yaml"
TINY_RM = REPO / "configs" / "tiny-rm.yaml"


def test_sft_and_rm_dry_runs_read_the_data_as_the_run_does(capsys, tmp_path):
    """The data is built by the run's own `prepare_data`: too few samples for one global batch and a
    bad record exit 2 in the dry run (they used to pass it and fail the run); files not reachable
    here are noted; a reachable set is summed up in a Data line."""
    code, out, err = dry_run(capsys, "sft", str(TINY_SFT))
    assert code == 0, err
    assert "training samples of 64 tokens (packed)" in out and "epochs" in out
    assert "weights start from a seeded random init (train.seed 1234): no checkpoint.init" in out
    code, out, err = dry_run(capsys, "rm", str(REPO / "configs" / "tiny-rm.yaml"))
    assert code == 0, err
    assert "Data: 1,900 training preference pairs" in out and "100 held out" in out
    code, _, err = dry_run(capsys, "sft", str(TINY_SFT), "data.synthetic_size=3")
    assert code == 2 and "fewer than train.global_batch_size (16)" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "response": "there"}\n{"prompt": 3\n')
    for stage in ("sft", "rm"):
        code, _, err = dry_run(capsys, stage, str(TINY_SFT), "data.synthetic=false", f"data.train={bad}")
        assert code == 2 and f"{bad}:" in err and len(err.strip().splitlines()) == 1, err
    code, out, err = dry_run(capsys, "sft", str(TINY_SFT), "data.synthetic=false", f"data.train={tmp_path}/no-*.jsonl")
    assert code == 0, err
    assert f"not checked here: data.train: {tmp_path}/no-*.jsonl is not reachable here" in out


def test_tiny_ppo_dry_run_reads_the_vocabulary_from_the_tokenizer(capsys):
    code, out, err = dry_run(capsys, "ppo", str(TINY_PPO))
    assert code == 0, err
    assert "TP=2 PP=1 DP=1 = 2 GPUs" in out and "vocab 512 padded to 512" in out
    # 4 layers x (attention 64*(4+4)*16 + 4*16*64, SwiGLU 3*64*256, 2 RMSNorms) + 2 x 512*64 + final norm
    assert f"{4 * (8192 + 4096 + 49152 + 128) + 2 * 512 * 64 + 64:,}" in out


def test_unknown_preset_exits_2_naming_model_preset(capsys):
    code, _, err = dry_run(capsys, "ppo", str(ALFRED), "model.preset=falcon-41b")
    assert code == 2
    assert "model.preset" in err and "falcon-41b" in err and "falcon-40b" in err


def test_bad_layouts_exit_2_naming_the_key(capsys):
    cases = [(["parallel.tp=3"], "parallel.tp"),  # 128 heads / 3
             (["parallel.pp=7"], "parallel.pp"),  # 60 layers / 7
             (["parallel.dp=2"], "launch.nodes"),  # 16 nodes x 8 != 64
             (["model.ffn_hidden_size=32764"], "model.ffn_hidden_size")]  # not divisible by tp=8
    for overrides, key in cases:
        code, _, err = dry_run(capsys, "ppo", str(ALFRED), *overrides)
        assert code == 2, overrides
        assert err.startswith(f"alfred-train: error: {key}"), err


# ---------------------------------------------------------------------------------------------
# The analytic counts against real megatron models (4 processes)


def _worker(out_dir: str) -> None:
    from alfred_train.config import ModelConfig, ParallelConfig
    from alfred_train.kernels.backends import choose_backend
    from alfred_train.models.build import build_model
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, shutdown

    rt = init_runtime(ParallelDims(2, 2, 1, 2))
    try:
        result = {"pp_rank": rt.pp_rank, "tp_rank": rt.tp_rank, "models": {}}
        for arch, norms in [("llama", 2), ("falcon", 2), ("falcon", 1)]:
            shape = resolve_shape(ModelConfig(arch=arch, num_layers=8, hidden_size=64, num_attention_heads=4,
                                              num_query_groups=2, parallel_layernorms=norms), 500)
            for kind in ("lm", "scalar"):
                chunks = build_model(shape, ParallelConfig(tp=2, pp=2, vpp=2), kind=kind, bf16=False,
                                     backend=choose_backend("eager"), device=rt.device, seed=None)
                result["models"][f"{arch}{norms}-{kind}"] = sum(p.numel() for c in chunks for p in c.parameters())
                result["layers"] = [[layer.layer_number - 1 for layer in c.decoder.layers] for c in chunks]
        (Path(out_dir) / f"rank{rt.rank}.json").write_text(json.dumps(result))
    finally:
        shutdown()


@pytest.mark.slow
def test_counts_equal_megatron_models_at_tp2_pp2_vpp2(tmp_path):
    from alfred_train.config import ModelConfig
    from alfred_train.parallel.init import _free_port

    world, port = 4, _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", ALFRED_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-3000:]}"
    for rank in range(world):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        pp_rank = got["pp_rank"]
        assert got["layers"] == [list(r) for r in stage_layers(8, 2, 2)[pp_rank]]
        for arch, norms in [("llama", 2), ("falcon", 2), ("falcon", 1)]:
            shape = resolve_shape(ModelConfig(arch=arch, num_layers=8, hidden_size=64, num_attention_heads=4,
                                              num_query_groups=2, parallel_layernorms=norms), 500)
            for kind in ("lm", "scalar"):
                expected = params_per_gpu(model_params(shape, kind), tp=2, pp=2)[pp_rank]
                assert got["models"][f"{arch}{norms}-{kind}"] == expected, (arch, norms, kind, rank)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_examples_and_pairs_that_train_on_nothing_are_left_out_and_counted(capsys, caplog, tmp_path):
    """An SFT example whose prompt fills data.seq_len trained with loss 0 (a run of only those: loss 0,
    grad_norm 0, exit 0); an RM pair cut to the same tokens for chosen and rejected trained at
    loss log 2 with accuracy 0. Left out with a count; refused when nothing is left."""
    good = [{"prompt": f"Write list {i} of cheerful words.", "response": "sunny happy bright"} for i in range(60)]
    long = [{"prompt": f"{i} " + "word " * 80, "response": "x"} for i in range(10)]
    sft = [str(TINY_SFT), "data.synthetic=false", "data.valid_fraction=0.3"]
    code, out, err = dry_run(capsys, "sft", *sft, f"data.train={_jsonl(tmp_path / 'sft.jsonl', good + long)}")
    assert code == 0 and "Data: 17 training samples" in out, err
    assert "6 of 49 training examples left out: their prompt fills data.seq_len (64 tokens)" in caplog.text
    code, _, err = dry_run(capsys, "sft", *sft, f"data.train={_jsonl(tmp_path / 'long.jsonl', long)}")
    assert code == 2 and "data.seq_len: the prompt of every example fills data.seq_len (64)" in err, err
    pairs = [{"prompt": f"Write list {i}.", "chosen": "sunny happy", "rejected": "gloomy sad"} for i in range(60)]
    ties = [{"prompt": f"Write list {i}.", "chosen": "same", "rejected": "same"} for i in range(60, 65)]
    rm = [str(TINY_RM), "data.synthetic=false", "train.global_batch_size=8"]
    code, out, err = dry_run(capsys, "rm", *rm, f"data.train={_jsonl(tmp_path / 'rm.jsonl', pairs + ties)}")
    assert code == 0 and "Data: 58 training preference pairs" in out, err
    assert "4 of 62 training pairs left out: chosen and rejected are the same tokens" in caplog.text
    code, _, err = dry_run(capsys, "rm", *rm, "data.seq_len=12", f"data.train={tmp_path / 'rm.jsonl'}")
    assert code == 2 and "data.seq_len: every training pair reads the same for chosen and rejected" in err, err


def test_cut_examples_are_counted_and_a_small_split_only_warns(capsys, caplog, tmp_path):
    """Examples and pairs longer than data.seq_len were cut without a word; a small SFT set at the
    default valid_fraction was refused with advice to lower data.seq_len; equal chosen and rejected
    responses were blamed on data.seq_len."""
    sft = [str(TINY_SFT), "data.synthetic=false"]
    rows = [{"prompt": f"Say {i}.", "response": "word " * (5 if i % 2 else 200)} for i in range(40)]
    code, out, err = dry_run(capsys, "sft", *sft, "data.valid_fraction=0", f"data.train={_jsonl(tmp_path / 'a.jsonl', rows)}")
    assert code == 0, err
    assert "20 of 40 training examples are longer than data.seq_len + 1 (65 tokens) and are cut there" in caplog.text
    small = [{"prompt": f"Say {i}.", "response": "ok"} for i in range(40)]
    code, out, err = dry_run(capsys, "sft", *sft, "train.global_batch_size=4", "train.micro_batch_size=1",
                             f"data.train={_jsonl(tmp_path / 'small.jsonl', small)}")
    assert code == 0 and "0 held out" in out, err
    assert "data.valid_fraction (0.05: 2 examples): too few held-out tokens for one row" in caplog.text
    # held-out prompts that fill data.seq_len: not for want of tokens (the warning said so), and more of them won't do
    from alfred_train.data import mixture

    cfg = load_config(TINY_SFT, [*sft[1:], f"data.train={tmp_path / 'small.jsonl'}"])
    held = {r.context[-1].content for r in mixture.load_train_valid(cfg.data, "sft", cfg.train.seed)[1]}
    filled = [{**r, "prompt": r["prompt"] + " word" * 80 if r["prompt"] in held else r["prompt"]} for r in small]
    caplog.clear()
    code, out, err = dry_run(capsys, "sft", *sft, "train.global_batch_size=4", "train.micro_batch_size=1",
                             f"data.train={_jsonl(tmp_path / 'filled.jsonl', filled)}")
    assert code == 0 and "data.valid_fraction (0.05: 2 examples): the prompt of each fills data.seq_len (64), no " \
        "response token is left to score; training goes on without valid_loss (raise data.seq_len)" in caplog.text, err
    rm = [str(TINY_RM), "data.synthetic=false", "train.global_batch_size=8"]
    pairs = [{"prompt": f"Write {i}.", "chosen": "sunny " * (3 if i % 2 else 90), "rejected": "sad"} for i in range(40)]
    code, out, err = dry_run(capsys, "rm", *rm, f"data.train={_jsonl(tmp_path / 'rm.jsonl', pairs)}")
    assert code == 0 and "19 of 38 training pairs fill data.seq_len (40 tokens)" in caplog.text, err
    same = [{"prompt": f"Write {i}.", "chosen": "same", "rejected": "same"} for i in range(40)]
    code, _, err = dry_run(capsys, "rm", *rm, f"data.train={_jsonl(tmp_path / 'same.jsonl', same)}")
    assert code == 2 and "every training pair has the same chosen and rejected response" in err, err


def test_a_training_split_too_small_for_one_block_names_valid_fraction(capsys):
    """It named data.seq_len and adding data only, when the held-out fraction took the data."""
    code, _, err = dry_run(capsys, "sft", str(TINY_SFT), "data.valid_fraction=0.999")
    assert code == 2 and err.rstrip().endswith("too few for one packed block of data.seq_len=64; lower data.seq_len "
                                               "or add data, or lower data.valid_fraction (0.999: 1998 of 2000 "
                                               "examples held out)"), err


def test_schedules_use_the_peak_and_spend_no_update_at_rate_zero(capsys):
    """Update k takes megatron's rate at step k - 1 (megatron's and HF's reading): Tulu's linear decay
    to 0 over its 300 iterations ends one step above 0 (it spent the 300th at rate 0), a schedule
    without warm-up starts at the peak, a warm-up starts above 0; a warm-up longer than the decay is
    cut, and the dry run says so."""
    from types import SimpleNamespace

    from alfred_train.training import build_scheduler

    code, out, _ = dry_run(capsys, "ppo", str(REPO / "configs" / "tulu-2.5-ppo-13b.yaml"))
    assert code == 0
    assert ("linear from 1e-06 to 0 at step 300 after 30 warm-up step(s): iteration 1 at 3.23e-08, "
            "peak 1e-06 at iteration 31, iteration 300 (the last) at 3.7e-09") in out
    code, out, _ = dry_run(capsys, "ppo", str(ALFRED))
    assert "floor 1.85e-07 from iteration 101, iteration 200 (the last) at 1.85e-07" in out

    def rates(steps: int, **optim) -> list[float]:
        cfg = load_config(TINY_PPO, [f"optim.{k}={v}" for k, v in optim.items()])
        group = {}
        scheduler = build_scheduler(SimpleNamespace(param_groups=[group]), cfg.optim, steps)
        seen = []
        for _ in range(steps):  # as a stage trains: read the rate, update, advance
            seen.append(group["lr"])
            scheduler.step(increment=1)
        return seen

    assert rates(4, lr=1e-3, min_lr=0, schedule="linear", warmup_steps=0) == pytest.approx(
        [1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert rates(4, lr=1e-3, min_lr=0, schedule="linear", warmup_steps=1, decay_steps=3) == pytest.approx(
        [5e-4, 1e-3, 5e-4, 0.0])  # the 4th is past the decay: the floor
    assert rates(3, lr=1e-3, schedule="constant", warmup_steps=2) == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    code, out, err = dry_run(capsys, "sft", str(REPO / "configs" / "tiny-sft.yaml"), "train.max_steps=4")
    assert code == 0 and "optim.warmup_steps 10 cut to 3: the decay ends at step 4" in out
