"""PPO scoring against a direct forward of the same models (one rank, in process):

score on EOD (an EOD appended for scoring to a response cut without one) and missing_eod_penalty;
old / reference log-probs and the update's new log-probs under the sampling temperature; the
scalar head under sequence parallelism in eval mode (2 gloo processes). GPU (`-m gpu`): a left-padded row equals the row alone for every
installed attention backend PPO accepts, and PPO refuses the others.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

VOCAB, EOD, PAD = 500, 2, 0
PROMPTS = [[5, 17, 33, 9], [41, 8]]  # left-padded to P = 4
RESPONSES = [[60, 61, EOD, PAD, PAD], [70, 71, 72, 73, 74]]  # row 0 stops at EOD; row 1 is cut at T = 5
TEMPERATURE = 0.7


def _shape():
    from alfred_train.models.build import ModelShape

    return ModelShape(arch="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                      num_query_groups=2, vocab_size=VOCAB, padded_vocab_size=512, max_seq_len=32,
                      rotary_base=10000, norm_eps=1e-5, parallel_layernorms=2, init_std=0.2)


def _build(runtime, kind: str, seed: int, backend: str = "sdpa", bf16: bool = False):
    from alfred_train.config import ParallelConfig
    from alfred_train.kernels.backends import choose_backend
    from alfred_train.models.build import build_model

    return build_model(_shape(), ParallelConfig(), kind=kind, bf16=bf16, backend=choose_backend(backend),
                       device=runtime.device, seed=seed)


@pytest.fixture(scope="module")
def runtime():
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, seed_everything, shutdown

    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    rt = init_runtime(ParallelDims(1, 1, 1))
    seed_everything(0, rt)
    yield rt
    shutdown()
    os.environ.update(env)


@pytest.fixture(scope="module")
def models(runtime):
    from alfred_train.ppo.experience import Models

    return Models(policy=_build(runtime, "lm", 3), value=_build(runtime, "scalar", 5),
                  reference=_build(runtime, "lm", 4), reward=_build(runtime, "scalar", 6))


def _rollout():
    from alfred_train.ppo.experience import left_pad
    from alfred_train.ppo.rollout import Rollout

    ids, mask = left_pad(PROMPTS, PAD)
    response = torch.tensor(RESPONSES)
    return Rollout(prompt_ids=ids, prompt_mask=mask, response_ids=response,
                   response_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))


def _forward(chunks, ids, real):
    """Direct forward of (B, S) ids with real-token mask `real`: (B, S, ...) float64."""
    from alfred_train.ppo.generation import attention_mask_for, position_ids_from_mask

    device = next(chunks[0].parameters()).device
    ids, real = ids.to(device), real.to(device)
    with torch.no_grad():
        return chunks[0](ids, position_ids_from_mask(real), attention_mask_for(real, ids.shape[1])).double().cpu()


def _score(models, runtime, rollout, **kw):
    from alfred_train.ppo.experience import score_rollouts

    args = dict(micro_batch=2, vocab_size=VOCAB, eod_id=EOD, pad_id=PAD, temperature=TEMPERATURE)
    return score_rollouts(models, runtime, rollout, **{**args, **kw})[0]


def test_score_on_eod_appends_an_eod_to_a_cut_response_and_penalizes_it(runtime, models):
    rollout = _rollout()
    seqs, real = rollout.sequences(), rollout.attention_mask()  # (2, 9)
    # the RM alone on [prompt, response, EOD]: row 1 (cut) is read at the appended EOD (position 9)
    appended = torch.cat([seqs, torch.tensor([[PAD], [EOD]])], 1)  # (2, 10)
    rm = _forward(models.reward, appended, torch.cat([real, torch.tensor([[0], [1]])], 1))[..., 0]  # (2, 10)
    plain = _forward(models.reward, seqs, real)[..., 0]  # (2, 9)
    want_eod = torch.stack([rm[0, 4 + 2], rm[1, 9]])  # row 0: its own EOD at P + 2
    want_last = torch.stack([plain[0, 4 + 2], plain[1, 8]])  # score_on_eod false: row 1's last token
    assert abs(want_eod[1] - want_last[1]) > 1e-3  # the two readings differ: the test can tell them apart

    torch.testing.assert_close(_score(models, runtime, rollout).scores.double(), want_eod, atol=1e-5, rtol=0)
    torch.testing.assert_close(_score(models, runtime, rollout, score_on_eod=False).scores.double(), want_last,
                               atol=1e-5, rtol=0)
    penalized = _score(models, runtime, rollout, missing_eod_penalty=0.5).scores.double()
    torch.testing.assert_close(penalized, want_eod - torch.tensor([0.0, 0.5], dtype=torch.float64), atol=1e-5, rtol=0)


def test_scoring_and_update_log_probs_use_the_sampling_temperature(runtime, models):
    from alfred_train.ppo import math as ppo_math
    from alfred_train.ppo.experience import compute_advantages
    from alfred_train.ppo.update import policy_forward_step

    rollout = _rollout()
    seqs, real, p = rollout.sequences(), rollout.attention_mask(), rollout.prompt_len
    scored = _score(models, runtime, rollout)
    for chunks, got in [(models.policy, scored.old_logprobs), (models.reference, scored.ref_logprobs)]:
        logits = _forward(chunks, seqs, real)[:, p - 1:-1, :VOCAB]  # (2, T, VOCAB)
        want = (logits / TEMPERATURE).log_softmax(-1).gather(-1, rollout.response_ids[..., None])[..., 0]
        torch.testing.assert_close(got.double() * rollout.response_mask, want * rollout.response_mask,
                                   atol=1e-5, rtol=0)
    scored, _ = compute_advantages(scored, kl_estimator=ppo_math.kl_estimator("k1"), beta=0.01, gamma=1.0, lam=0.95,
                                   whiten_rewards=False, whiten_advantages=True, dp_group=None)
    # the update's first step, before any change to the weights: ratio 1, approx KL 0 -- only when the
    # update uses the same temperature as scoring
    model = models.policy[0]
    for temperature, same in [(TEMPERATURE, True), (1.0, False)]:
        step = policy_forward_step(runtime, clip=0.2, vocab_size=VOCAB, temperature=temperature)
        with torch.no_grad():
            logits, loss_fn = step(iter([scored]), model)
            _, tokens, report = loss_fn(logits)
        approx_kl = float(report["approx_kl"]) / float(tokens)
        assert (abs(approx_kl) < 1e-7) == same, (temperature, approx_kl)


def _sp_head_worker(rank, port):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    from alfred_train.models.heads import ScalarHead
    from alfred_train.parallel import cpu

    cpu.install()  # megatron's gather allocates on torch.cuda.current_device(): the CPU adapter answers "cpu"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        parallel_state.initialize_model_parallel(2, 1)
        config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, tensor_model_parallel_size=2,
                                   sequence_parallel=True, params_dtype=torch.float32)
        head = ScalarHead(config)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            head.weight.copy_(torch.randn(1, 8, generator=gen))
        hidden = torch.randn(6, 3, 8, generator=gen)  # (s, b, h); this rank holds s/tp = 3 positions
        want = hidden @ head.weight.t() + head.bias  # (s, b, 1)
        for training in (True, False):
            head.train(training)
            with torch.no_grad():
                scores, _ = head(hidden[3 * rank:3 * rank + 3])
            assert scores.shape == (6, 3, 1), (training, scores.shape)
            torch.testing.assert_close(scores, want)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason="two gloo processes on the CPU")
def test_scalar_head_under_sequence_parallelism_gathers_in_eval_too():
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    mp.spawn(_sp_head_worker, args=(free_port(),), nprocs=2, join=True)


# ----------------------------------------------------------------------------- GPU

HAS_CUDA = torch.cuda.is_available()
INSTALLED = ["sdpa", "eager"] + [name for name, module in [("te", "transformer_engine"), ("flash", "flash_attn")]
                                 if importlib.util.find_spec(module) is not None]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", INSTALLED)
def test_left_padded_row_equals_the_row_alone_for_every_installed_backend(runtime, backend):
    """On the GPU: PPO's backends give a left-padded row the logits and scores of the row alone;
    te and flash (causal masks only) are refused by PPO's config check and by the backend choice."""
    from alfred_train.config import load_config
    from alfred_train.errors import ConfigError
    from alfred_train.kernels.backends import PADDING_MASK_BACKENDS, choose_backend
    from alfred_train.ppo.checks import check_config
    from tests.helpers import ROOT

    cfg = load_config(ROOT / "configs" / "tiny-ppo.yaml", [f"model.attention_backend={backend}"])
    if backend not in PADDING_MASK_BACKENDS:
        with pytest.raises(ConfigError, match="model.attention_backend"):
            check_config(cfg)
        with pytest.raises(ConfigError, match="model.attention_backend"):
            choose_backend(backend, needs_padding_mask=True)
        return
    check_config(cfg)
    rollout = _rollout()
    seqs, real = rollout.sequences(), rollout.attention_mask()  # (2, 9): row 1 has 2 padding positions
    for kind in ("lm", "scalar"):
        chunks = _build(runtime, kind, 3, backend=backend)
        batch = _forward(chunks, seqs, real)  # (2, 9, ...)
        for row in range(2):
            keep = real[row].bool()
            alone = _forward(chunks, seqs[row:row + 1, keep], real[row:row + 1, keep])[0]  # (n, ...)
            torch.testing.assert_close(batch[row, keep], alone, atol=1e-3, rtol=1e-3)
