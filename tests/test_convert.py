"""Hugging Face <-> alfred-train conversion: logits parity at TP=1 / TP=2 / PP=2, exact round trips,
sharded input, refused configs, apply-delta arithmetic, reward models, tokenizers.

Tiny random Llama (GQA 4 heads / 2 groups, vocab 520 -> padded 640, sharded with an index) and
Falcon (new decoder architecture, GQA, tied embeddings, vocab 300 -> 384) are made locally with
transformers. Four launches do the distributed work (each checks several things):
    1. `alfred-train convert hf-to-mcore falcon --tp 2`        (the CLI spawning 2 workers)
    2. 2 workers at TP=2: convert llama at TP=2; logits of llama and falcon vs transformers; greedy
       rollouts of both (the fast decoder's TP path, Falcon's one reduce per layer)
    3. 2 workers at PP=2: convert falcon + reward at PP=2; logits of llama (TP=2 ckpt, resharded),
       falcon and the reward model vs transformers; greedy rollouts of llama and falcon across stages
    4. 1 process: convert all three at TP=1, logits vs transformers, export every checkpoint back
This file is also the worker: `python tests/test_convert.py JOB.json` under RANK/WORLD_SIZE env.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_SP = REPO / "alfred_train" / "data" / "assets" / "tiny_sp.model"
CORPUS = REPO / "alfred_train" / "data" / "assets" / "tiny_corpus.txt"
TOL = 1e-4
PROMPTS = {"llama": [[1, 40, 41, 42, 43, 44], [1, 300, 7], [1, 9, 99, 199, 299]],  # BOS first, varied lengths
           "falcon": [[40, 41, 42, 43], [200, 7, 8], [5, 6, 7, 8, 9, 10]]}
GREEDY_TOKENS = 10


# ---------------------------------------------------------------------------------------------
# Worker (runs in the launched processes; no transformers import there).

def _forward(chunks, tokens: torch.Tensor, runtime):
    """Full logits / scores (B, S, V) on the last pipeline stage, None elsewhere."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    model = chunks[0]
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)  # (B, S)
    if not runtime.is_first_stage:
        hidden = torch.empty(s, b, model.config.hidden_size)  # (S, B, h)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(tokens, position_ids, None, runtime_gather_output=True)
    if not runtime.is_last_stage:
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out


def _greedy(ckpt: str, prompts: list[list[int]], max_new: int, runtime, tp: int, pp: int) -> list[list[int]]:
    """Our KV-cache greedy decoding of left-padded prompts at TP x PP; each row up to and including EOD."""
    from alfred_train import checkpoint
    from alfred_train.config import ParallelConfig
    from alfred_train.data.tokenizer import load_tokenizer
    from alfred_train.kernels.backends import choose_backend
    from alfred_train.models.build import ModelShape, build_model
    from alfred_train.ppo.generation import SamplingParams, generate

    state = json.loads((checkpoint.resolve_checkpoint(ckpt) / "meta.json").read_text())["state"]
    shape = ModelShape(**state["model"])
    eod = load_tokenizer(state["tokenizer"]).eod_id
    chunks = build_model(shape, ParallelConfig(tp=tp, pp=pp), kind="lm", bf16=False, backend=choose_backend("sdpa"),
                         device=runtime.device)
    checkpoint.load_models(ckpt, {"policy": (chunks, None)})
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # (B, P) left-padded
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    response, response_mask = generate(chunks, runtime, ids, mask, SamplingParams(max_new_tokens=max_new, greedy=True),
                                       eod_id=eod, vocab_size=shape.vocab_size, seed=0)
    return [row[m.bool()].tolist() for row, m in zip(response, response_mask)]


def run_job(job: dict) -> None:
    from alfred_train import checkpoint
    from alfred_train.config import ParallelConfig
    from alfred_train.convert.hf_export import mcore_to_hf
    from alfred_train.convert.hf_import import MODEL_NAMES, hf_to_mcore
    from alfred_train.kernels.backends import choose_backend
    from alfred_train.models.build import ModelShape, build_model
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, shutdown

    tp, pp = job["tp"], job["pp"]
    runtime = init_runtime(ParallelDims(tp, pp, 1))
    results = {}
    try:
        for hf_dir, out_dir, kind, dtype in job.get("convert", []):
            hf_to_mcore(hf_dir, out_dir, runtime, tp=tp, pp=pp, kind=kind, dtype=dtype)
        for label, ckpt, ref_file in job.get("check", []):
            meta = json.loads((checkpoint.resolve_checkpoint(ckpt) / "meta.json").read_text())
            shape = ModelShape(**meta["state"]["model"])
            name = meta["models"][0]
            kind = "lm" if name == MODEL_NAMES["lm"] else "scalar"
            chunks = build_model(shape, ParallelConfig(tp=tp, pp=pp), kind=kind, bf16=False,
                                 backend=choose_backend("sdpa"), device=runtime.device)
            checkpoint.load_models(ckpt, {name: (chunks, None)})
            ref = torch.load(ref_file)
            with torch.no_grad():
                out = _forward(chunks, ref["tokens"], runtime)
            if out is not None:
                want = ref["logits"]  # (B, S, V) or (B, S, 1)
                results[label] = {
                    "max_abs_diff": (out[..., : want.shape[-1]] - want).abs().max().item(),
                    "padded_logits_max": out[..., want.shape[-1]:].abs().max().item() if kind == "lm" else 0.0,
                    "width": out.shape[-1]}
        for label, ckpt, prompts, max_new in job.get("generate", []):
            results[label] = _greedy(ckpt, prompts, max_new, runtime, tp, pp)
        for ckpt, out_dir in job.get("export", []):
            mcore_to_hf(ckpt, out_dir, runtime)
    finally:
        shutdown()
    if results:
        Path(job["results"]).mkdir(parents=True, exist_ok=True)
        (Path(job["results"]) / f"rank{runtime.rank}.json").write_text(json.dumps(results))


# ---------------------------------------------------------------------------------------------
# Fixtures: tiny Hugging Face models, reference logits, the four launches.

def _perturb(model, seed: int) -> None:
    """Random weights of a size that makes every tensor matter (norms away from 1, biases non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or "ln_" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(0.08 * noise)


def _falcon_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=[">>ABSTRACT<<", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(CORPUS)], trainer)
    tok.save(str(path))


def make_hf_models(root: Path) -> dict:
    from transformers import (FalconConfig, FalconForCausalLM, LlamaConfig, LlamaForCausalLM,
                              LlamaForSequenceClassification)

    torch.manual_seed(0)
    llama_cfg = dict(vocab_size=520, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                     rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
                     tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    llama = LlamaForCausalLM(LlamaConfig(**llama_cfg)).eval()
    _perturb(llama, 1)
    llama.save_pretrained(root / "llama", safe_serialization=True, max_shard_size="100KB")
    shutil.copyfile(TINY_SP, root / "llama" / "tokenizer.model")

    reward = LlamaForSequenceClassification(LlamaConfig(**llama_cfg, num_labels=1, pad_token_id=0)).eval()
    _perturb(reward, 2)
    reward.save_pretrained(root / "reward", safe_serialization=True)
    shutil.copyfile(TINY_SP, root / "reward" / "tokenizer.model")

    falcon = FalconForCausalLM(FalconConfig(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True, max_position_embeddings=128, layer_norm_epsilon=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0}, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=1, attn_implementation="eager")).eval()  # 1: <|endoftext|> here
    _perturb(falcon, 3)
    falcon.tie_weights()
    falcon.save_pretrained(root / "falcon", safe_serialization=True)
    _falcon_tokenizer(root / "falcon" / "tokenizer.json")

    falcon7b = FalconForCausalLM(FalconConfig(  # Falcon-7B style: one LayerNorm, multi-query, untied
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
        parallel_attn=True, new_decoder_architecture=False, max_position_embeddings=128,
        tie_word_embeddings=False, attn_implementation="eager")).eval()
    _perturb(falcon7b, 4)
    falcon7b.save_pretrained(root / "falcon7b", safe_serialization=True)
    return {"llama": llama, "falcon": falcon, "falcon7b": falcon7b, "reward": reward}


def reference(models: dict, root: Path) -> dict:
    """tokens (B, S) and transformers' logits: (B, S, V) for LMs, per-token scores (B, S, 1) for the RM."""
    gen = torch.Generator().manual_seed(7)
    refs = {}
    with torch.no_grad():
        for label, model in models.items():
            tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=gen)  # (B, S)
            if label == "reward":
                hidden = model.model(input_ids=tokens).last_hidden_state  # (B, S, h)
                logits = model.score(hidden)  # (B, S, 1)
            else:
                logits = model(input_ids=tokens).logits  # (B, S, V)
            refs[label] = root / f"ref_{label}.pt"
            torch.save({"tokens": tokens, "logits": logits}, refs[label])
    return refs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_workers(job: dict, world: int, root: Path, tag: str) -> dict:
    job_file = root / f"job_{tag}.json"
    job["results"] = str(root / f"results_{tag}")
    job_file.write_text(json.dumps(job))
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, str(job_file)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"{tag} worker failed:\n{out[-4000:]}"
    merged = {}
    for f in sorted(Path(job["results"]).glob("rank*.json")):
        for label, value in json.loads(f.read_text()).items():
            merged.setdefault(label, []).append(value)
    return merged


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alfred_train", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    models = make_hf_models(root)
    refs = reference(models, root)
    hf = {k: str(root / k) for k in models}
    ck = lambda name: str(root / name)  # noqa: E731

    done = cli("convert", "hf-to-mcore", hf["falcon"], ck("falcon_tp2"), "--tp", "2")
    assert done.returncode == 0, done.stderr[-4000:]
    tp2 = launch_workers({"tp": 2, "pp": 1, "convert": [[hf["llama"], ck("llama_tp2"), None, "auto"]],
                          "check": [["llama", ck("llama_tp2"), str(refs["llama"])],
                                    ["falcon", ck("falcon_tp2"), str(refs["falcon"])]],
                          "generate": [["greedy_llama", ck("llama_tp2"), PROMPTS["llama"], GREEDY_TOKENS],
                                       ["greedy_falcon", ck("falcon_tp2"), PROMPTS["falcon"], GREEDY_TOKENS]]},
                         2, root, "tp2")
    pp2 = launch_workers({"tp": 1, "pp": 2,
                          "convert": [[hf["falcon"], ck("falcon_pp2"), None, "auto"],
                                      [hf["reward"], ck("reward_pp2"), None, "auto"]],
                          "check": [["llama_from_tp2", ck("llama_tp2"), str(refs["llama"])],
                                    ["falcon", ck("falcon_pp2"), str(refs["falcon"])],
                                    ["reward", ck("reward_pp2"), str(refs["reward"])]],
                          "generate": [["greedy_llama", ck("llama_tp2"), PROMPTS["llama"], GREEDY_TOKENS],
                                       ["greedy_falcon", ck("falcon_pp2"), PROMPTS["falcon"], GREEDY_TOKENS]]},
                         2, root, "pp2")
    tp1_models = ("llama", "falcon", "falcon7b", "reward")
    tp1 = launch_workers({"tp": 1, "pp": 1,
                          "convert": [[hf[k], ck(f"{k}_tp1"), None, "auto"] for k in tp1_models]
                          + [[hf["llama"], ck("llama_bf16"), None, "bf16"]],
                          "check": [[k, ck(f"{k}_tp1"), str(refs[k])] for k in tp1_models],
                          "export": [[ck(f"{k}_tp1"), ck(f"{k}_back")] for k in tp1_models]
                          + [[ck("falcon_tp2"), ck("falcon_back_from_tp2")],
                             [ck("reward_pp2"), ck("reward_back_from_pp2")],
                             [ck("llama_bf16"), ck("llama_bf16_back")]],
                          "generate": [[f"greedy_{k}", ck(f"{k}_tp1"), PROMPTS[k], GREEDY_TOKENS]
                                       for k in ("llama", "falcon")]}, 1, root, "tp1")
    return {"root": root, "models": models, "refs": refs, "hf": hf,
            "results": {"tp1": tp1, "tp2": tp2, "pp2": pp2}}


# ---------------------------------------------------------------------------------------------
# Tests.

@pytest.mark.parametrize("layout,labels", [
    ("tp1", ("llama", "falcon", "falcon7b", "reward")),
    ("tp2", ("llama", "falcon")),
    ("pp2", ("llama_from_tp2", "falcon", "reward")),
])
def test_logits_match_transformers(work, layout, labels):
    results = work["results"][layout]
    for label in labels:
        ref = torch.load(work["refs"][label.replace("_from_tp2", "")])["logits"]
        assert ref.std() > 0.3  # the comparison is not between near-zero numbers
        assert label in results, f"{layout}: no result for {label}"
        for r in results[label]:  # one per last-stage rank (every TP rank gathers the full logits)
            assert r["max_abs_diff"] < TOL, (layout, label, r)
            assert r["padded_logits_max"] == 0.0, (layout, label, r)  # zero rows past the vocabulary
    widths = {label: results[label][0]["width"] for label in labels}
    if "falcon" in widths:
        assert widths["falcon"] == 384  # 300 padded to a multiple of 128
    if "reward" in widths:
        assert widths["reward"] == 1


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_greedy_generation_matches_transformers(work, layout):
    """Our KV-cache greedy decoding == transformers' generate, token for token, left-padded prompts, on
    every rank of TP=2 and PP=2 too (Falcon's parallel attention + MLP is the Alfred recipe's layer)."""
    for label in ("llama", "falcon"):
        model = work["models"][label]
        eos = model.config.eos_token_id
        width = max(len(p) for p in PROMPTS[label])
        ids = torch.zeros(len(PROMPTS[label]), width, dtype=torch.long)  # (B, P)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(PROMPTS[label]):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=GREEDY_TOKENS,
                                 min_new_tokens=0, pad_token_id=0, eos_token_id=eos)
        want = [row[: row.index(eos) + 1] if eos in row else row for row in out[:, width:].tolist()]
        ranks = work["results"][layout][f"greedy_{label}"]
        assert len(ranks) == (1 if layout == "tp1" else 2), (layout, label)
        for ours in ranks:
            assert ours == want, (layout, label, ours, want)
        assert sum(len(r) for r in want) >= len(want) * 3  # something was generated


def _tensors(path: Path) -> dict:
    from alfred_train.convert.safetensors_io import SafetensorsDir

    d = SafetensorsDir(path)
    return {k: d.get(k) for k in d.keys()}


@pytest.mark.parametrize("source,back", [
    ("llama", "llama_back"), ("falcon", "falcon_back"), ("falcon7b", "falcon7b_back"), ("reward", "reward_back"),
    ("falcon", "falcon_back_from_tp2"), ("reward", "reward_back_from_pp2"),
])
def test_round_trip_reproduces_every_tensor(work, source, back):
    root = work["root"]
    before, after = _tensors(root / source), _tensors(root / back)
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype, name
        assert torch.equal(before[name], after[name]), name


def test_bf16_checkpoint_exports_bf16(work):
    root = work["root"]
    meta = json.loads((root / "llama_bf16" / "iter_0000000" / "meta.json").read_text())
    assert meta["state"]["dtype"] == "bfloat16"
    before, after = _tensors(root / "llama"), _tensors(root / "llama_bf16_back")
    assert sorted(before) == sorted(after)
    for name in before:
        assert after[name].dtype == torch.bfloat16, name
        assert torch.equal(before[name].to(torch.bfloat16), after[name]), name


def test_sharded_input_and_tied_falcon_layout(work):
    root = work["root"]
    assert (root / "llama" / "model.safetensors.index.json").is_file()  # input was sharded
    assert "lm_head.weight" not in _tensors(root / "falcon_back")  # tied again on export
    config = json.loads((root / "falcon_back" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["new_decoder_architecture"] is True
    assert config["num_kv_heads"] == 2 and config["rope_theta"] == 20000.0


def test_exported_models_load_in_transformers(work):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    root = work["root"]
    for label, loader in (("llama", AutoModelForCausalLM), ("falcon", AutoModelForCausalLM),
                          ("falcon7b", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification)):
        model = loader.from_pretrained(root / f"{label}_back", attn_implementation="eager").eval()
        ref = torch.load(work["refs"][label])
        with torch.no_grad():
            if label == "reward":
                got = model.score(model.model(input_ids=ref["tokens"]).last_hidden_state)
            else:
                got = model(input_ids=ref["tokens"]).logits
        assert (got - ref["logits"]).abs().max().item() < 1e-6, label


def test_model_yaml_and_tokenizers(work):
    import yaml

    from alfred_train.config import from_dict, Config
    from alfred_train.data.tokenizer import load_tokenizer
    from alfred_train.models.build import resolve_shape

    root = work["root"]
    section = yaml.safe_load((root / "llama_tp1" / "model.yaml").read_text())["model"]
    cfg = from_dict(Config, {"model": section})
    meta = json.loads((root / "llama_tp1" / "iter_0000000" / "meta.json").read_text())
    llama_tok = load_tokenizer(cfg.model.tokenizer)
    assert resolve_shape(cfg.model, llama_tok.vocab_size).__dict__ == meta["state"]["model"]
    assert meta["state"]["model"]["padded_vocab_size"] == 640 and meta["state"]["model"]["rotary_base"] == 5000
    assert (llama_tok.bos_id, llama_tok.eos_id, llama_tok.eod_id) == (1, 2, 2)

    falcon_tok = load_tokenizer(json.loads((root / "falcon_tp1" / "iter_0000000" / "meta.json")
                                           .read_text())["state"]["tokenizer"])
    assert falcon_tok.bos_id is None and falcon_tok.eos_id == falcon_tok.eod_id == 1  # <|endoftext|>
    assert falcon_tok.decode(falcon_tok.encode("the reward model")) == "the reward model"
    back_tok = load_tokenizer(root / "falcon_back")
    assert back_tok.encode("the reward model") == falcon_tok.encode("the reward model")
    back_llama = load_tokenizer(root / "llama_back")
    assert back_llama.encode("a b c") == llama_tok.encode("a b c")


@pytest.mark.parametrize("field,value", [
    ("alibi", True), ("bias", True), ("activation", "relu"), ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ("new_decoder_architecture+parallel_attn", False),
])
def test_unsupported_falcon_config_refused_before_weights(work, tmp_path, capsys, field, value):
    from alfred_train.cli import main

    cfg = json.loads((work["root"] / "falcon" / "config.json").read_text())
    if field == "new_decoder_architecture+parallel_attn":
        cfg.update(new_decoder_architecture=False, parallel_attn=False)
        field = "parallel_attn"
    else:
        cfg[field] = value
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))  # no weights at all: reading one would fail
    code = main(["convert", "hf-to-mcore", str(bad), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"unsupported {field}" in err and "safetensors" not in err, err


@pytest.mark.parametrize("field,value", [("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu"),
                                         ("head_dim", 32), ("rope_parameters", {"rope_type": "llama3",
                                                                                "rope_theta": 5e5})])
def test_unsupported_llama_config_refused(work, field, value):
    from alfred_train.convert.hf_config import read_hf_config, shape_from_hf
    from alfred_train.errors import ConfigError

    cfg = read_hf_config(work["root"] / "llama")
    cfg[field] = value
    with pytest.raises(ConfigError, match=field):
        shape_from_hf(cfg, "lm")


def test_missing_weights_named_after_config_passes(work, tmp_path, capsys):
    from alfred_train.cli import main

    bad = tmp_path / "noweights"
    bad.mkdir()
    shutil.copyfile(work["root"] / "falcon" / "config.json", bad / "config.json")
    assert main(["convert", "hf-to-mcore", str(bad), str(tmp_path / "out")]) == 2
    assert "no model.safetensors" in capsys.readouterr().err


def _save(d: Path, tensors: dict, config: dict) -> None:
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config))


def test_apply_delta_adds_and_pads_added_tokens(tmp_path):
    from alfred_train.cli import main

    config = {"model_type": "llama", "hidden_size": 2, "num_hidden_layers": 1, "num_attention_heads": 1}
    base = {"model.embed_tokens.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
            "lm_head.weight": torch.tensor([[0.5, 0.5], [1.0, -1.0]]),
            "model.norm.weight": torch.tensor([1.0, 1.0], dtype=torch.bfloat16)}
    delta = {"model.embed_tokens.weight": torch.tensor([[0.1, 0.2], [0.3, 0.4], [7.0, 8.0]]),
             "lm_head.weight": torch.tensor([[1.0, 1.0], [1.0, 1.0], [-2.0, 2.0]]),
             "model.norm.weight": torch.tensor([0.5, -0.25], dtype=torch.bfloat16)}
    _save(tmp_path / "base", base, {**config, "vocab_size": 2})
    _save(tmp_path / "delta", delta, {**config, "vocab_size": 3})
    (tmp_path / "delta" / "tokenizer.json").write_text("{}")
    assert main(["convert", "apply-delta", str(tmp_path / "base"), str(tmp_path / "delta"),
                 str(tmp_path / "out"), "--max-shard-size", "40B"]) == 0
    out = _tensors(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()  # 40 B shards: several files
    assert torch.equal(out["model.embed_tokens.weight"], torch.tensor([[1.1, 2.2], [3.3, 4.4], [7.0, 8.0]]))
    assert torch.equal(out["lm_head.weight"], torch.tensor([[1.5, 1.5], [2.0, 0.0], [-2.0, 2.0]]))
    assert out["model.norm.weight"].dtype == torch.bfloat16
    assert out["model.norm.weight"].tolist() == [1.5, 0.75]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 3
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_apply_delta_refuses_mismatch(tmp_path, capsys):
    from alfred_train.cli import main

    config = {"model_type": "llama", "hidden_size": 2, "num_hidden_layers": 1, "num_attention_heads": 1}
    _save(tmp_path / "base", {"model.norm.weight": torch.ones(2)}, config)
    _save(tmp_path / "delta", {"model.norm.weight": torch.ones(3)}, config)
    assert main(["convert", "apply-delta", str(tmp_path / "base"), str(tmp_path / "delta"),
                 str(tmp_path / "out")]) == 2
    assert "model.norm.weight: base shape (2,) != delta shape (3,)" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["mcore-to-hf", "ckpt"], ["hf-to-mcore", "hf"], ["apply-delta", "base", "delta"]])
def test_output_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, command):
    from alfred_train.cli import main

    plain = tmp_path / "out"
    plain.write_text("keep me")
    for out in (plain, plain / "sub"):
        assert main(["convert", *command, str(out)]) == 2
        assert capsys.readouterr().err.endswith(f"{plain} is a file, not a directory; name a directory to write into\n")
    assert plain.read_text() == "keep me"


def test_qkv_grouping_is_inverse_and_matches_falcon_layout():
    from alfred_train.convert.hf import grouped_to_qkv, qkv_to_grouped

    heads, groups, d, h = 4, 2, 3, 5
    q = torch.arange(heads * d * h, dtype=torch.float32).reshape(heads * d, h)
    k = -torch.arange(groups * d * h, dtype=torch.float32).reshape(groups * d, h) - 1
    v = k - 1000
    fused = qkv_to_grouped(q, k, v, heads=heads, groups=groups)  # (G*(H/G+2)*d, h)
    # Falcon's view: (G, H/G + 2, d, h): q heads of the group, then k_g, then v_g
    view = fused.reshape(groups, heads // groups + 2, d, h)
    assert torch.equal(view[1, 0], q[2 * d: 3 * d]) and torch.equal(view[1, 2], k[d:])
    assert torch.equal(view[0, 3], v[:d])
    assert all(torch.equal(a, b) for a, b in zip(grouped_to_qkv(fused, heads=heads, groups=groups), (q, k, v)))



# ---------------------------------------------------------------------------------------------
# Bad or ambiguous input, on a tiny Llama made once (no workers launched).

TINY_LLAMA = dict(vocab_size=520, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """An untied Llama saved by transformers (one model.safetensors) with the SentencePiece tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny") / "llama"
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(d)
    shutil.copyfile(TINY_SP, d / "tokenizer.model")
    return d


def _copy_hf(src: Path, dst: Path, **config_changes) -> Path:
    """A copy of an HF dir; config_changes set config.json fields (None: remove the field)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _convert_error(capsys, *argv: str) -> str:
    """Run the CLI, expect exit code 2 and a one-line error; return it."""
    from alfred_train.cli import main

    code = main(["convert", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


def test_llama_without_tie_field_is_untied_like_transformers(tiny_llama, tmp_path):
    from alfred_train.convert.hf_import import check_hf_tensors, plan_import
    from alfred_train.convert.safetensors_io import SafetensorsDir

    hf_dir = _copy_hf(tiny_llama, tmp_path / "llama", tie_word_embeddings=None)
    plan = plan_import(hf_dir)
    assert plan.tied is False  # transformers' LlamaConfig default: lm_head.weight is its own tensor
    rules = check_hf_tensors(plan, SafetensorsDir(hf_dir))
    assert [r.hf for r in rules if r.ours == "output_layer.weight"] == [("lm_head.weight",)]


def test_falcon_without_tie_field_is_tied_like_transformers():
    from alfred_train.convert.hf_config import is_tied

    assert is_tied({"model_type": "falcon"}) is True
    assert is_tied({"model_type": "llama"}) is False
    assert is_tied({"model_type": "falcon", "tie_word_embeddings": False}) is False


def test_tie_field_contradicting_the_weights_is_refused(tiny_llama, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    tied = _copy_hf(tiny_llama, tmp_path / "tied", tie_word_embeddings=True)  # but a distinct lm_head.weight
    err = _convert_error(capsys, "hf-to-mcore", str(tied), str(tmp_path / "out1"))
    assert "tie_word_embeddings" in err and "lm_head.weight" in err, err
    assert not (tmp_path / "out1").exists()

    untied = _copy_hf(tiny_llama, tmp_path / "untied", tie_word_embeddings=None)  # default untied, no lm_head
    weights = load_file(str(untied / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(untied / "model.safetensors"), metadata={"format": "pt"})
    err = _convert_error(capsys, "hf-to-mcore", str(untied), str(tmp_path / "out2"))
    assert "tie_word_embeddings" in err and "lm_head.weight" in err, err

    same = _copy_hf(tiny_llama, tmp_path / "same", tie_word_embeddings=True)  # tied, lm_head a copy: fine
    weights = load_file(str(same / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(same / "model.safetensors"), metadata={"format": "pt"})
    from alfred_train.convert.hf_import import check_hf_tensors, plan_import
    from alfred_train.convert.safetensors_io import SafetensorsDir

    plan = plan_import(same)
    assert plan.tied
    check_hf_tensors(plan, SafetensorsDir(same))



def test_peft_alpha_pattern_by_full_module_path(tiny_llama, tmp_path):
    """PEFT matches a pattern key against the module path (`(.*\\.)?(key)$`): a key naming layer 0's q_proj
    scales that module only; our imported adapter reproduces PEFT's delta W of every module."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from alfred_train.convert import peft
    from alfred_train.convert.hf_import import plan_import

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                        alpha_pattern={"model.layers.0.self_attn.q_proj": 32}, task_type="CAUSAL_LM")
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_llama), config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(tmp_path / "adapter")
    prefix = "base_model.model.model.layers"
    modules = dict(model.named_modules())
    assert modules[f"{prefix}.0.self_attn.q_proj"].scaling["default"] == 8.0  # 32 / 4: the pattern applies
    assert modules[f"{prefix}.1.self_attn.q_proj"].scaling["default"] == 2.0  # 8 / 4

    shape = plan_import(tiny_llama).shape
    spec, tensors = peft.read_adapter(tmp_path / "adapter", shape)
    scale = spec.targets["linear_qkv"]["scale"]
    for i in range(shape.num_layers):
        a = tensors[f"decoder.layers.{i}.self_attention.lora_linear_qkv.lora_A"]  # (r, h)
        b = tensors[f"decoder.layers.{i}.self_attention.lora_linear_qkv.lora_B"]  # (n_out, r)
        q, k, v = peft.split_rows(shape, "linear_qkv", scale * b @ a)
        with torch.no_grad():
            want_q = modules[f"{prefix}.{i}.self_attn.q_proj"].get_delta_weight("default")
            want_v = modules[f"{prefix}.{i}.self_attn.v_proj"].get_delta_weight("default")
        torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, want_v, rtol=1e-5, atol=1e-6)
        assert not k.any()



def _damage(hf_dir: Path, damage: str) -> None:
    weights = hf_dir / "model.safetensors"
    if damage == "truncated weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "random bytes as weights":
        weights.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
                            .to(torch.uint8).numpy().tobytes())
    elif damage == "invalid config.json":
        (hf_dir / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')


@pytest.mark.parametrize("damage,words", [("truncated weights", "model.safetensors"),
                                          ("random bytes as weights", "model.safetensors"),
                                          ("invalid config.json", "config.json")])
def test_damaged_hf_files_are_one_line_errors(tiny_llama, tmp_path, capsys, damage, words):
    hf_dir = _copy_hf(tiny_llama, tmp_path / "hf")
    _damage(hf_dir, damage)
    err = _convert_error(capsys, "hf-to-mcore", str(hf_dir), str(tmp_path / "out"))
    assert f"{hf_dir / words}" in err and ("damaged" in err or "not valid JSON" in err), err
    assert not (tmp_path / "out").exists()
    if damage != "invalid config.json":  # apply-delta reads the same files
        err = _convert_error(capsys, "apply-delta", str(tiny_llama), str(hf_dir), str(tmp_path / "out"))
        assert f"{hf_dir / words}" in err and "damaged" in err, err
        assert not (tmp_path / "out").exists()


def _falcon_config() -> dict:
    from transformers import FalconConfig

    return FalconConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                        new_decoder_architecture=True).to_dict()


@pytest.mark.parametrize("family,field", [
    *[("llama", f) for f in ("hidden_size", "vocab_size", "intermediate_size", "num_hidden_layers",
                             "num_attention_heads")],
    *[("falcon", f) for f in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")]])
def test_missing_shape_field_named_with_its_file(tiny_llama, tmp_path, capsys, family, field):
    if family == "llama":
        config = json.loads((tiny_llama / "config.json").read_text())
    else:
        config = _falcon_config()
    del config[field]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(config))
    err = _convert_error(capsys, "hf-to-mcore", str(bad), str(tmp_path / "out"))
    assert f"{bad / 'config.json'}" in err and field in err and "missing" in err, err



@pytest.fixture(scope="module")
def tiny_ckpt(tiny_llama, tmp_path_factory) -> Path:
    """`tiny_llama` converted to our checkpoint (TP=1), by the CLI."""
    out = tmp_path_factory.mktemp("tiny_ckpt") / "ckpt"
    done = cli("convert", "hf-to-mcore", str(tiny_llama), str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    """The CLI exited 2 with its one `error:` line and no traceback; returns that line."""
    lines = [ln for ln in done.stderr.splitlines() if "error" in ln.lower()]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-4000:]
    return lines[0]


def test_damaged_checkpoint_refused_before_export(tiny_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    shard = sorted(ckpt.glob("iter_*/*.distcp"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    line = _one_error_line(cli("convert", "mcore-to-hf", str(ckpt), str(tmp_path / "hf")))
    assert "damaged" in line and shard.name in line, line
    assert not (tmp_path / "hf").exists()



def test_generate_on_a_converted_model_with_more_rows_than_tokens(tiny_ckpt, tmp_path):
    """HF Llama's 520 embedding rows over a 512-token tokenizer (rows a checkpoint pads to): generate
    refused it (tokenizer vocabulary != the model's); ids past the tokenizer's are never sampled."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt_ids": [1, 40, 41]}\n')
    done = cli("generate", str(tiny_ckpt), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"),
               "--max-new-tokens", "6", "--min-new-tokens", "6")
    assert done.returncode == 0, done.stderr[-3000:]
    ids = json.loads((tmp_path / "o.jsonl").read_text())["completion_ids"]
    assert len(ids) == 6 and all(0 <= i < 512 for i in ids), ids


def _small_delta_pair(root: Path, late_shape: tuple[int, ...] = (2,)) -> tuple[Path, Path]:
    """base and delta dirs of four tensors; the delta's last tensor (by name) has shape late_shape."""
    config = {"model_type": "llama", "hidden_size": 2, "num_hidden_layers": 1, "num_attention_heads": 1}
    names = ["a.weight", "b.weight", "c.weight", "z.weight"]
    _save(root / "base", {n: torch.ones(2) for n in names}, config)
    _save(root / "delta", {**{n: torch.ones(2) for n in names[:-1]}, names[-1]: torch.ones(late_shape)}, config)
    return root / "base", root / "delta"


@pytest.mark.parametrize("out", ["delta", "base", "delta/sub", "base/."])
def test_apply_delta_refuses_output_in_an_input(tmp_path, capsys, out):
    base, delta = _small_delta_pair(tmp_path)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    err = _convert_error(capsys, "apply-delta", str(base), str(delta), str(tmp_path / out))
    assert "output" in err and "input" in err, err
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before


def test_apply_delta_wrong_shape_leaves_no_output(tmp_path, capsys):
    base, delta = _small_delta_pair(tmp_path, late_shape=(3,))  # z.weight: written after a, b, c
    err = _convert_error(capsys, "apply-delta", str(base), str(delta), str(tmp_path / "out"), "--max-shard-size", "8B")
    assert "z.weight: base shape (2,) != delta shape (3,)" in err, err
    assert not (tmp_path / "out").exists()


def test_a_shard_size_of_zero_is_refused(tmp_path, capsys):
    """--max-shard-size 0 wrote one file per tensor."""
    base, delta = _small_delta_pair(tmp_path)
    for size in ("0", "0MB", "0.1B"):
        err = _convert_error(capsys, "apply-delta", str(base), str(delta), str(tmp_path / "out"),
                             "--max-shard-size", size)
        assert f"--max-shard-size '{size}': must be at least one byte" in err, err
    assert not (tmp_path / "out").exists()


def test_shard_writer_removes_its_shards_on_error(tmp_path):
    from alfred_train.convert.safetensors_io import ShardWriter

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="mid-way"):
        with ShardWriter(tmp_path / "out", max_shard_bytes=8) as writer:
            for i in range(4):
                writer.add(f"t{i}", torch.ones(2))  # 8 bytes each: a shard per tensor
            raise RuntimeError("mid-way")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    with pytest.raises(RuntimeError, match="mid-way"):
        with ShardWriter(tmp_path / "new", max_shard_bytes=8) as writer:
            writer.add("t0", torch.ones(2))
            writer.add("t1", torch.ones(2))
            raise RuntimeError("mid-way")
    assert not (tmp_path / "new").exists()  # the directory it made, gone with its shards



def test_import_over_an_earlier_import_drops_its_tokenizer(tiny_llama, tiny_ckpt, tmp_path):
    from alfred_train.data.tokenizer import load_tokenizer

    out = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, out)  # an earlier conversion, with tokenizer/tokenizer.model
    hf_dir = _copy_hf(tiny_llama, tmp_path / "hf")
    (hf_dir / "tokenizer.model").unlink()
    _falcon_tokenizer(hf_dir / "tokenizer.json")  # 290 tokens: fits the 520 rows
    done = cli("convert", "hf-to-mcore", str(hf_dir), str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["generation_config.json", "tokenizer.json"]
    assert load_tokenizer(out / "tokenizer").vocab_size == 290


def test_import_refuses_a_directory_that_is_not_an_earlier_import(tiny_llama, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "iter_0000100").mkdir(parents=True)  # e.g. a training run's directory
    err = _convert_error(capsys, "hf-to-mcore", str(tiny_llama), str(out))
    assert f"output {out} is not empty" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


def test_export_over_an_earlier_export_replaces_what_it_wrote(tiny_ckpt, tmp_path):
    out = tmp_path / "hf"
    done = cli("convert", "mcore-to-hf", str(tiny_ckpt), str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((out / "alfred-export.json").read_text())
    assert record["by"] == "mcore-to-hf" and record["model"] == "policy" and record["lora"] is None
    assert record["checkpoint"] == str(sorted(tiny_ckpt.glob("iter_*"))[-1].resolve())
    from alfred_train.convert.hf_export import checkpoint_source
    from alfred_train.evaluation import exported_from

    assert exported_from(out) == checkpoint_source(sorted(tiny_ckpt.glob("iter_*"))[-1])  # eval --hf-dir reuses it
    weights = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(weights[:100])  # cut short since: exported again, not scored
    assert exported_from(out) is None
    (out / "model.safetensors").write_bytes(weights)
    # as if the earlier export had been of a LoRA checkpoint with another tokenizer
    (out / "adapter").mkdir()
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "tokenizer.json"):
        (out / name).write_text("{}")
    (out / "tokenizer_config.json").write_text('{"tokenizer_class": "stale"}')
    record["files"].update({"adapter/adapter_config.json": 2, "adapter/adapter_model.safetensors": 2, "tokenizer.json": 2})
    (out / "alfred-export.json").write_text(json.dumps(record))
    (out / "README.md").write_text("not ours")  # a model card written beside it
    done = cli("convert", "mcore-to-hf", str(tiny_ckpt), str(out), "--merge-lora")  # no adapters: said, not silent
    assert done.returncode == 0, done.stderr[-4000:]
    assert "--merge-lora: model 'policy' of " in done.stderr and "has no LoRA adapters" in done.stderr
    written = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", "alfred-export.json", *written])
    assert sorted(json.loads((out / "alfred-export.json").read_text())["files"]) == written
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging directory left


def test_export_refuses_a_directory_that_is_not_an_export(tiny_llama, tiny_ckpt, tmp_path, capsys):
    """A downloaded model (or the HF base of the run itself) named as the output: an export deleted its
    model*.safetensors and tokenizer files and wrote ours."""
    hf_dir = _copy_hf(tiny_llama, tmp_path / "base")
    before = {p: p.read_bytes() for p in sorted(hf_dir.rglob("*")) if p.is_file()}
    err = _convert_error(capsys, "mcore-to-hf", str(tiny_ckpt), str(hf_dir))
    assert f"output {hf_dir} is not empty and holds no earlier export" in err, err
    delta = _copy_hf(tiny_llama, tmp_path / "delta")
    err = _convert_error(capsys, "apply-delta", str(tiny_llama), str(delta), str(hf_dir))
    assert f"output {hf_dir} is not empty and holds no earlier export" in err, err
    assert {p: p.read_bytes() for p in sorted(hf_dir.rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize("earlier", [False, True])
def test_failed_export_leaves_output_as_it_was(tiny_ckpt, tmp_path, capsys, monkeypatch, earlier):
    """A failure once the weights are written (here: copying the tokenizer) leaves OUT_DIR as it was:
    absent, or the earlier export it would have replaced, whole; and no staging directory."""
    from alfred_train.convert import hf_export
    from alfred_train.errors import ConfigError

    out = tmp_path / "exports" / "hf"
    if earlier:
        assert cli("convert", "mcore-to-hf", str(tiny_ckpt), str(out)).returncode == 0
        (out / "model.safetensors").write_bytes(b"the earlier weights")
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    written = []

    def fail(state, out_dir):
        written.extend(p.name for p in out_dir.iterdir())
        raise ConfigError("tokenizer copy failed mid-way")

    monkeypatch.setattr(hf_export, "export_tokenizer", fail)
    err = _convert_error(capsys, "mcore-to-hf", str(tiny_ckpt), str(out))
    assert "tokenizer copy failed mid-way" in err and written == ["model.safetensors"], (err, written)
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == (["hf"] if earlier else [])


def test_outputs_that_cannot_be_written_are_one_line_errors(tiny_llama, tiny_ckpt, tmp_path, capsys):
    """A name the filesystem refuses (here too long, as EACCES or EROFS would be): one line, before
    any weight is read, for each converter."""
    out = tmp_path / ("x" * 250)  # a valid name; its staging directory's name is too long
    for argv in (["mcore-to-hf", str(tiny_ckpt), str(out)], ["hf-to-mcore", str(tiny_llama), str(out)],
                 ["apply-delta", str(tiny_llama), str(tiny_llama), str(out)]):
        err = _convert_error(capsys, *argv)
        assert f"output {out}: cannot write there (File name too long)" in err, err
    err = _convert_error(capsys, "mcore-to-hf", str(tiny_ckpt), str(tmp_path / ("y" * 300) / "hf"))
    assert "File name too long; name another path" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("field,value,tensor,shapes", [
    ("intermediate_size", 256, "model.layers.0.mlp.gate_proj.weight", "(128, 64), config.json implies (256, 64)"),
    ("num_key_value_heads", 4, "model.layers.0.self_attn.k_proj.weight", "(32, 64), config.json implies (64, 64)"),
    ("vocab_size", 600, "model.embed_tokens.weight", "(520, 64), config.json implies (600, 64)"),
])
def test_tensor_shapes_not_matching_config_refused_before_output(tiny_llama, tmp_path, capsys, field, value,
                                                                 tensor, shapes):
    hf_dir = _copy_hf(tiny_llama, tmp_path / "hf", **{field: value})
    err = _convert_error(capsys, "hf-to-mcore", str(hf_dir), str(tmp_path / "out"), "--tp", "2")
    assert f"tensor {tensor!r} has shape {shapes}" in err and f"fix {field}" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,words", [
    (("--pp", "3"), "--pp 3: does not divide the 2 layers (config.json num_hidden_layers); pick a --pp of 1, 2"),
    (("--tp", "3"), "--tp 3: does not divide num_attention_heads (4), num_key_value_heads (2), intermediate_size "
                    "(128), the padded vocabulary (640); pick a --tp of 1, 2"),
    (("--tp", "4"), "--tp 4: does not divide num_key_value_heads (2); pick a --tp of 1, 2"),
])
def test_layout_not_fitting_the_model_refused_before_output(tiny_llama, tmp_path, capsys, flags, words):
    err = _convert_error(capsys, "hf-to-mcore", str(tiny_llama), str(tmp_path / "out"), *flags)
    assert words in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("earlier", [False, True])
def test_failed_import_leaves_output_as_it_was(tiny_llama, tiny_ckpt, tmp_path, capsys, monkeypatch, earlier):
    """A failure once the output is being written (here: while filling the model, the tokenizer copied)
    leaves OUT_DIR as it was: absent, or the earlier conversion it would have replaced, whole."""
    from alfred_train.convert import hf_import
    from alfred_train.errors import ConfigError

    hf_dir = _copy_hf(tiny_llama, tmp_path / "hf")
    (hf_dir / "tokenizer.model").unlink()
    _falcon_tokenizer(hf_dir / "tokenizer.json")  # another tokenizer than the earlier conversion's
    runs = tmp_path / "runs"
    runs.mkdir()
    if earlier:
        shutil.copytree(tiny_ckpt, runs / "ckpt")
    before = {p: p.read_bytes() for p in sorted(runs.rglob("*")) if p.is_file()}
    copied = []

    def fail(chunks, read):
        copied.extend(p.name for p in runs.rglob("tokenizer.json"))
        raise ConfigError("filling failed mid-way")

    monkeypatch.setattr(hf_import, "fill_from_globals", fail)
    err = _convert_error(capsys, "hf-to-mcore", str(hf_dir), str(runs / "ckpt"))
    assert "filling failed mid-way" in err and copied == ["tokenizer.json"], (err, copied)
    assert {p: p.read_bytes() for p in sorted(runs.rglob("*")) if p.is_file()} == before
    assert sorted(p.name for p in runs.iterdir()) == (["ckpt"] if earlier else [])


def test_peft_modules_to_save_refused_with_what_to_do(tiny_llama, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    get_peft_model(LlamaForCausalLM.from_pretrained(tiny_llama), config).save_pretrained(tmp_path / "adapter")
    capsys.readouterr()  # transformers' loading progress
    err = _convert_error(capsys, "hf-to-mcore", str(tiny_llama), str(tmp_path / "out"),
                         "--adapter", str(tmp_path / "adapter"))
    assert "modules_to_save=['lm_head']" in err and "not supported" in err and "merge_and_unload" in err, err
    assert "without --adapter" in err and "another base" not in err, err
    assert not (tmp_path / "out").exists()


if __name__ == "__main__":
    run_job(json.loads(Path(sys.argv[1]).read_text()))
