"""PPO with a policy and a separate value network initialized from the reward model.

Four models on the same ranks and TP/PP layout: policy (trainable, from the SFT checkpoint),
value (trainable, from the RM checkpoint, sharing no parameter with the policy), reference
(frozen SFT weights) and reward model (frozen). One iteration (DESIGN.md's data flow):
generate -> score -> advantages -> policy_epochs x policy_steps_per_epoch policy steps ->
value_epochs x value_steps_per_epoch value steps -> metrics / samples / checkpoint.
"""

from __future__ import annotations

import json
import logging

import torch

from alfred_train.config import Config
from alfred_train.data import synthetic
from alfred_train.data.sampler import iterate_batches
from alfred_train.kernels.backends import choose_backend
from alfred_train.evaluation import evaluate_after_training
from alfred_train.metrics import MetricsLogger, plot_metrics
from alfred_train.ppo import math as ppo_math
from alfred_train.ppo.checks import preflight
from alfred_train.ppo.experience import Models, compute_advantages, generate_rollouts, score_rollouts
from alfred_train.ppo.generation import SamplingParams
from alfred_train.ppo.update import minibatch_rows, policy_forward_step, value_forward_step
from alfred_train.profiling import Phases
from alfred_train.models.build import unwrap
from alfred_train.stages import common, inits
from alfred_train.training import Trainable

log = logging.getLogger("alfred_train")


def _frozen(chunks):
    for c in chunks:
        c.eval()
        for p in c.parameters():
            p.requires_grad_(False)
    return chunks


def _offload(chunks, device):
    for c in chunks:
        c.to(device)


def build_models(cfg: Config, runtime, shape, backend, frozen: bool = True):
    """(policy Trainable, value Trainable, Models): four separate networks, seeded, not yet loaded.
    The value model is its own network with its own optimizer and schedule (DESIGN.md decision 4).
    Both schedules count PPO iterations (notes/rlhf-recipes.md): `run` advances them once per
    iteration, so with ppo.value_lr unset the value rate at iteration k is the policy's.
    frozen=False: the trainables only (Models is None)."""
    o, t = cfg.ppo, cfg.train
    policy = common.build_trainable(cfg, runtime, shape, backend, kind="lm", total_steps=t.max_steps,
                                    schedule_per_step=False)
    value = common.build_trainable(cfg, runtime, shape, backend, kind="scalar", lr=o.value_lr,
                                   total_steps=t.max_steps, schedule_per_step=False)
    if not frozen:
        return policy, value, None
    reference = _frozen(common.make_model(cfg, runtime, shape, kind="lm", backend=backend, seed=t.seed))
    reward = _frozen(common.make_model(cfg, runtime, shape, kind="scalar", backend=backend, seed=t.seed))
    models = Models(policy=[unwrap(c) for c in policy.chunks], value=[unwrap(c) for c in value.chunks],
                    reference=reference, reward=reward)
    return policy, value, models


def build_lora_models(cfg: Config, runtime, shape, backend):
    """With lora.rank > 0, two networks instead of four: the policy (SFT base + adapters) and the
    value model (RM base + adapters + its trainable head), bases loaded; the reference is the policy
    with adapters off, the reward model the value model with adapters off and the RM's own head."""
    from alfred_train.models import lora, lora_checkpoint

    o = cfg.ppo
    policy, value, _ = build_models(cfg, runtime, shape, backend, frozen=False)
    common.load_lora_base(policy, "policy", lora_checkpoint.base_ref(o.policy_init, "policy"))
    common.load_lora_base(value, "value", lora_checkpoint.base_ref(o.reward_init, "reward"))
    policy_chunks, value_chunks = [unwrap(c) for c in policy.chunks], [unwrap(c) for c in value.chunks]
    models = Models(policy=policy_chunks, value=value_chunks,
                    reference=[lora.AdaptersOff(c) for c in policy_chunks],
                    reward=[lora.AdaptersOff(c, lora.frozen_head(c)) for c in value_chunks])
    return policy, value, models


def run(cfg: Config, runtime) -> int:
    o, t = cfg.ppo, cfg.train
    # every config error before a model is built, on every rank if any rank's files are refused
    tokenizer, prompt_set, _ = common.on_every_rank(
        runtime, lambda: preflight(cfg, dry_run=False, main=runtime.is_main))
    run_dir = common.prepare_run_dir(cfg, runtime)
    started_from = inits.record(cfg, "ppo")  # recorded in its checkpoints: a resume keeps them
    shape = common.shape_for(cfg, tokenizer)
    backend = choose_backend(cfg.model.attention_backend, needs_padding_mask=True)  # left-padded rollouts
    if cfg.lora.rank:  # two copies, bases loaded (a LoRA checkpoint holds the adapters only)
        policy, value, models = build_lora_models(cfg, runtime, shape, backend)
    else:
        policy, value, models = build_models(cfg, runtime, shape, backend)
        common.load_full(models.reference, o.policy_init, "policy", "policy")
        common.load_full(models.reward, o.reward_init, "reward", "reward")
    kl_ctl = ppo_math.AdaptiveKLController(o.kl_coef, o.kl_target, o.kl_horizon) if o.adaptive_kl \
        else ppo_math.FixedKLController(o.kl_coef)
    trainables = {"policy": policy, "value": value}
    step, consumed = 0, 0
    bad_steps = common.BadSteps(cfg, runtime, "PPO iteration", "lower optim.lr or check the reward scale")
    resumed = common.resume(cfg, runtime, trainables)
    if resumed is not None:
        step, state = resumed
        kl_ctl.load_state_dict(state["kl_controller"])  # a fixed beta is ppo.kl_coef's; adaptive goes on
        if o.adaptive_kl and kl_ctl.kl_coef != o.kl_coef:
            log.info("adaptive KL: resumed at beta %.4g (ppo.kl_coef %.4g is its starting value)", kl_ctl.kl_coef,
                     o.kl_coef)
        consumed, bad_steps.count = state["consumed_prompts"], state["bad_steps"]
    elif not cfg.lora.rank:
        common.load_full(models.policy, o.policy_init, "policy", "policy")
        common.load_full(models.value, o.reward_init, "reward", "value")
        for trainable in (policy, value):  # bf16: refresh the fp32 main copies from the loaded weights
            trainable.optimizer.reload_model_params()

    train_prompts = prompt_set.train
    eval_prompts = _dp_slice(prompt_set.held_out, runtime.dp_rank, cfg.parallel.dp)
    eval_keys = _dp_slice(list(range(len(prompt_set.held_out))), runtime.dp_rank, cfg.parallel.dp)
    batches = iterate_batches(len(train_prompts), o.rollouts_per_iter, runtime.dp_rank, cfg.parallel.dp,
                              t.seed, consumed)
    params = SamplingParams.from_ppo(o)
    kl_fn = ppo_math.kl_estimator(o.kl_estimator)
    common_args = dict(eod_id=tokenizer.eod_id, pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    scoring = dict(common_args, temperature=o.temperature, score_on_eod=o.score_on_eod,
                   missing_eod_penalty=o.missing_eod_penalty)

    def save(at_step):
        common.save(cfg, runtime, at_step, trainables, shape, "ppo", kl_controller=kl_ctl.state_dict(),
                    consumed_prompts=consumed, bad_steps=bad_steps.count, inits=started_from)

    def evaluate(tag_step):
        return evaluate_policy(models, runtime, eval_prompts, eval_keys, params, o, tokenizer, t.seed, common_args, scoring,
                               ground_truth=cfg.data.synthetic and not cfg.data.prompts)

    metrics = MetricsLogger(run_dir, enabled=runtime.is_main, total_steps=t.max_steps, start_step=step,
                            tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress, desc="ppo",
                            log_interval=t.log_interval)
    if step == 0 and eval_prompts:
        metrics.log(0, evaluate(0))
    preemption = common.Preemption()
    phases = Phases(run_dir, cfg.logging.profile_step, runtime.rank, runtime.device)
    code = 0
    while step < t.max_steps:
        position = next(batches)
        prompts = [train_prompts[i] for i in position.indices]
        with phases("generate", step + 1):
            if o.offload_frozen:
                _offload(models.reference + models.reward, "cpu")
            rollout, utilisation = generate_rollouts(models.policy, runtime, prompts, params,
                                                     micro_batch=o.rollout_micro_batch, seed=t.seed * 1000 + step,
                                                     keys=list(position.indices), continuous=o.continuous_batching,
                                                     pipelined=o.pipelined_decode, compiled=o.compile_decode,
                                                     **common_args)
        with phases("score", step + 1):
            if o.offload_frozen:
                _offload(models.reference + models.reward, runtime.device)
            sampler_logprobs = rollout.old_logprobs
            rollout, entropy = score_rollouts(models, runtime, rollout, micro_batch=o.train_micro_batch,
                                              recompute_logprobs=o.recompute_logprobs, **scoring)
            rollout, kl = compute_advantages(rollout, kl_estimator=kl_fn, beta=kl_ctl.kl_coef, gamma=o.gamma,
                                             lam=o.lam, whiten_rewards=o.whiten_rewards,
                                             whiten_advantages=o.whiten_advantages, dp_group=runtime.dp_group)
        with phases("train", step + 1):
            first_row = runtime.dp_rank * rollout.batch_size  # this rank's rows in the iteration's global batch
            policy_reports = _update(policy, rollout, o.policy_epochs, o.policy_steps_per_epoch, o.train_micro_batch,
                                     policy_forward_step(runtime, clip=o.clip_policy, vocab_size=tokenizer.vocab_size,
                                                         temperature=o.temperature),
                                     seed=t.seed + step, first_row=first_row)
            value_reports = _update(value, rollout, o.value_epochs, o.value_steps_per_epoch, o.train_micro_batch,
                                    value_forward_step(runtime, clip=o.clip_value), seed=t.seed + 7919 * (step + 1),
                                    first_row=first_row)
            for trainable in (policy, value):  # both schedules count PPO iterations
                trainable.advance_schedule()
        step, consumed = step + 1, position.consumed_samples
        stats = rollout_stats(rollout, kl, entropy, runtime.dp_group, tokenizer.eod_id)
        stats["prompts_cut"] = _count_cut(position.indices, prompt_set.cut, runtime.dp_group)
        beta = kl_ctl.kl_coef
        kl_ctl.update(stats["kl"], o.rollouts_per_iter)
        bad = policy_reports["skipped"] + value_reports["skipped"]
        gen_tokens = stats.pop("_response_tokens")
        if o.recompute_logprobs:  # largest |scoring - sampler| log-prob over this iteration's tokens
            stats["logprob_gap"] = logprob_gap(rollout, sampler_logprobs, runtime.dp_group)
        row = {**stats, "kl_coef": beta,
               "policy_loss": policy_reports["loss"], "value_loss": value_reports["loss"],
               "clipfrac": policy_reports["clipfrac"], "approx_kl": policy_reports["approx_kl"],
               "value_clipfrac": value_reports["clipfrac"], "skipped_updates": bad,
               "lr": policy_reports["lr"], "value_lr": value_reports["lr"],
               "policy_ratio_first": policy_reports["ratio_first"], "slot_utilisation": utilisation,
               **{f"time_{name}": seconds for name, seconds in phases.seconds.items()},
               "tokens_per_s": gen_tokens / sum(phases.seconds.values())}
        if eval_prompts and ((t.eval_interval and step % t.eval_interval == 0) or step == t.max_steps):
            row.update(evaluate(step))
        metrics.log(step, row)
        _write_samples(run_dir, step, rollout, tokenizer, runtime, o.samples_per_iter)
        bad_steps.after(step, bad)
        if common.checkpoint_or_stop(cfg, step, save, preemption, runtime, metrics):
            code = common.PREEMPTED_EXIT_CODE
            break
    metrics.close()
    if runtime.is_main:
        if cfg.logging.plots:
            plot_metrics(run_dir, ["score", "eval_score", "kl", "entropy", "value_loss", "response_len",
                                   "clipfrac", "explained_var", "eval_property",
                                   ("time_generate", "time_score", "time_train"), "slot_utilisation",
                                   "tokens_per_s"], "ppo.png")
        common.say_done(f"ppo: {step} iterations done", run_dir,
                        ["metrics.jsonl", "samples.jsonl", "tb/", "ppo.png", "checkpoints/"])
    if code == 0:
        evaluate_after_training(cfg, run_dir, runtime)  # ppo.eval_tasks: lm-eval on the final checkpoint
    return code


def _update(trainable: Trainable, rollout, epochs: int, steps_per_epoch: int, micro_batch: int, forward_step,
            seed: int, first_row: int) -> dict:
    """epochs x steps_per_epoch optimizer steps over random mini-batches of this rank's rollouts, the
    same global mini-batches at any DP size (`minibatch_rows`); returns the token-weighted mean of
    each report and the number of skipped (non-finite) steps."""
    totals, weight, skipped, lr, first = {}, 0.0, 0, 0.0, {}
    for epoch in range(epochs):
        for rows in minibatch_rows(rollout.batch_size, steps_per_epoch, first_row=first_row, seed=seed, epoch=epoch):
            mini = rollout.select(rows)
            micro = mini.split(mini.batch_size // micro_batch)  # ppo.checks: a whole number of micro-batches
            result = trainable.step(micro, forward_step, seq_len=mini.prompt_len + mini.response_len,
                                    micro_batch_size=micro[0].batch_size)
            skipped += int(not result.ok)
            lr = result.lr
            first = first or result.reports
            for k, v in {"loss": result.loss, **result.reports}.items():
                totals[k] = totals.get(k, 0.0) + v * result.tokens
            weight += result.tokens
    out = {k: v / max(weight, 1.0) for k, v in totals.items()}
    # the first mini-batch sees the policy that sampled: its ratio pi/pi_old is 1 when log-probs agree
    return {**out, "skipped": skipped, "lr": lr, "ratio_first": first.get("ratio", float("nan"))}


def logprob_gap(rollout, sampler_logprobs, dp_group) -> float:
    """max |old_logprobs - sampler_logprobs| over response tokens, over every DP rank."""
    gap = ((rollout.old_logprobs - sampler_logprobs).abs() * rollout.response_mask).max().double()
    # the max through a sum: each rank contributes its value to its own slot
    world = 1 if dp_group is None else torch.distributed.get_world_size(dp_group)
    slots = torch.zeros(world, dtype=torch.float64)
    slots[0 if dp_group is None else torch.distributed.get_rank(dp_group)] = gap
    return float(ppo_math.all_reduce_sum(slots, dp_group).max())


def rollout_stats(rollout, kl, entropy, dp_group, eod_id: int) -> dict:
    """Iteration metrics averaged over every rollout of every DP rank."""
    mask = rollout.response_mask.float()  # (B, T)
    lengths = mask.sum(1)  # (B,)
    last = ppo_math.last_token_index(rollout.response_mask)  # (B,)
    ends_eod = (rollout.response_ids.gather(1, last[:, None])[:, 0] == eod_id).float() * (lengths > 0).float()
    sums = torch.stack([
        rollout.scores.float().sum(), (kl * mask).sum(), (entropy * mask).sum(), mask.sum(),
        lengths.sum(), ends_eod.sum(), torch.tensor(float(rollout.batch_size)),
    ]).double()
    score, kl_sum, ent, tokens, length, eod, n = ppo_math.all_reduce_sum(sums, dp_group).tolist()
    ev = ppo_math.explained_variance(rollout.values, rollout.returns, mask, group=dp_group)
    return {"score": score / n, "kl": kl_sum / n, "entropy": ent / max(tokens, 1.0),
            "response_len": length / n, "eod_rate": eod / n, "explained_var": float(ev),
            "_response_tokens": tokens}


def _dp_slice(items: list, dp_rank: int, dp: int) -> list:
    """DP rank `dp_rank`'s contiguous share of `items` (ppo.checks: len(items) % dp == 0)."""
    share = len(items) // dp
    return items[dp_rank * share:(dp_rank + 1) * share]


def _count_cut(indices, cut: frozenset, dp_group) -> float:
    """Prompts of this iteration's global batch that were cut at ppo.max_prompt_tokens."""
    local = torch.tensor([float(sum(i in cut for i in indices))], dtype=torch.float64)
    return float(ppo_math.all_reduce_sum(local, dp_group)[0])


@torch.no_grad()
def evaluate_policy(models: Models, runtime, prompts, keys, params, o, tokenizer, seed, common_args, scoring, *,
                    ground_truth: bool) -> dict:
    """Mean RM score, KL (and, for the synthetic task, the ground-truth property) on held-out prompts:
    each DP rank samples and scores its own share (training sampling parameters, a fixed seed, each
    prompt's random stream keyed by its held-out index), and the means are over every held-out prompt
    of every rank."""
    rollout, _ = generate_rollouts(models.policy, runtime, prompts, params, micro_batch=o.rollout_micro_batch,
                                   seed=seed + 99991, keys=keys, continuous=o.continuous_batching,
                                   pipelined=o.pipelined_decode, compiled=o.compile_decode, **common_args)
    rollout, _ = score_rollouts(models, runtime, rollout, micro_batch=min(o.train_micro_batch, len(prompts)),
                                **scoring)
    kl = (rollout.old_logprobs - rollout.ref_logprobs) * rollout.response_mask  # (B, T)
    sums = [rollout.scores.sum(), kl.sum(), torch.tensor(0.0), torch.tensor(float(rollout.batch_size))]
    if ground_truth:  # the synthetic task's checkable property, next to what the RM believes
        responses = [tokenizer.decode(_response_tokens(rollout, b, tokenizer.eod_id)) for b in range(rollout.batch_size)]
        sums[2] = torch.tensor(float(sum(synthetic.property_score(r) for r in responses)))
    score, kl_sum, prop, n = ppo_math.all_reduce_sum(torch.stack(sums).double(), runtime.dp_group).tolist()
    out = {"eval_score": score / n, "eval_kl": kl_sum / n}
    if ground_truth:
        out["eval_property"] = prop / n
    return out


def _response_tokens(rollout, b: int, eod_id: int) -> list[int]:
    ids = rollout.response_ids[b][rollout.response_mask[b].bool()].tolist()
    return [i for i in ids if i != eod_id]


def _write_samples(run_dir, step, rollout, tokenizer, runtime, n: int) -> None:
    if not runtime.is_main or n <= 0:
        return
    with open(run_dir / "samples.jsonl", "a") as f:
        for b in range(min(n, rollout.batch_size)):
            prompt = rollout.prompt_ids[b][rollout.prompt_mask[b].bool()].tolist()
            f.write(json.dumps({"step": step, "prompt": tokenizer.decode(prompt),
                                "response": tokenizer.decode(_response_tokens(rollout, b, tokenizer.eod_id)),
                                "score": float(rollout.scores[b])}) + "\n")

