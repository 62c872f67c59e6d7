"""`alfred-train sft|rm|ppo CONFIG --dry-run`: validate, then print the layout, parameter counts
and a per-GPU memory estimate. Pure arithmetic on the resolved shape: no GPU, no processes, no
torch.distributed, no weights.

The arithmetic (parameter counts, stage layers, bytes per parameter, the KV cache) is `sizing.py`.
Activations and temporary buffers come on top (alfred_train.resources): the "Peak per GPU" table
adds, per pipeline stage, the larger of the training phase (1F1B activations of up to pp
micro-batches, per `train.recompute`; the logits buffer) and, for PPO, the generation phase (KV
cache, prefill and sampler buffers), plus a fixed reserve for the CUDA context. A plan above the
GPU's memory (launch.gpu_memory_gib, or the SageMaker instance type's GPU) is refused naming what
to change. The checkpoints the run loads (inits, the one it resumes) are checked as the run checks
them (`stages.checkpoint_checks.check_checkpoints`: meta.json only), where reachable. Checkpoint size, and
for SageMaker the disk each instance needs and the S3 traffic (launch/sagemaker_plan.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from alfred_train import resources
from alfred_train.config import Config, validate
from alfred_train.config_checks import validate_stage
from alfred_train.errors import ConfigError
from alfred_train.models.build import ModelShape, resolve_shape
from alfred_train.sizing import bytes_per_param, kv_cache_bytes, model_params, params_per_gpu, stage_layers
from alfred_train.training import schedule_line

GIB = 1024 ** 3

# (model name, kind, trainable) per stage, in the order PPO holds them.
STAGE_MODELS = {
    "sft": (("policy", "lm", True),),
    "rm": (("reward", "scalar", True),),
    "ppo": (("policy", "lm", True), ("value", "scalar", True),
            ("reference", "lm", False), ("reward", "scalar", False)),
}


# ---------------------------------------------------------------------------------------------
# The report


def _billions(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def _size(n: float) -> str:
    """Bytes as GiB, or MiB / KiB for the tiny models ("-" for nothing)."""
    if n == 0:
        return "-"
    for unit, scale in (("GiB", GIB), ("MiB", 1024 ** 2)):
        if n >= 0.01 * scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1024:.2f} KiB"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Aligned text table: first column left-aligned, the numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return [fmt(header), "  " + "-" * (sum(widths) + 2 * (len(widths) - 1)), *(fmt(r) for r in rows)]


def _vocab_size(cfg: Config) -> int:
    """The tokenizer's vocabulary (`resolve_shape` refuses a model.vocab_size below it), or
    model.vocab_size when the tokenizer is not reachable here."""
    from pathlib import Path

    from alfred_train.stages.common import tokenizer_for, tokenizer_path

    if cfg.model.vocab_size and not Path(tokenizer_path(cfg)).exists():
        return cfg.model.vocab_size
    return tokenizer_for(cfg).vocab_size


def _check_shards(shape: ModelShape, tp: int) -> None:
    if shape.ffn_hidden_size % tp:
        raise ConfigError(f"model.ffn_hidden_size: {shape.ffn_hidden_size} is not divisible by parallel.tp ({tp})")
    if shape.padded_vocab_size % tp:
        raise ConfigError(f"parallel.tp: {tp} does not divide the padded vocabulary ({shape.padded_vocab_size})")


def _check_launch(cfg: Config) -> None:
    from alfred_train.launch.config import check_processes

    if cfg.launch.backend != "local":
        check_processes(cfg.launch, cfg.world_size)


def _layout_lines(cfg: Config, shape: ModelShape) -> list[str]:
    p, launch = cfg.parallel, cfg.launch
    lines = [f"Layout: TP={p.tp} PP={p.pp} DP={p.dp} = {cfg.world_size} GPUs"
             f"  (vpp {p.vpp or 'off'}, zero {'on: optimizer state sharded over DP' if p.zero else 'off'},"
             f" sequence_parallel {'on' if p.sequence_parallel else 'off'})"]
    if launch.backend != "local" and launch.gpus_per_node:
        lines.append(f"  nodes: {launch.nodes} x {launch.gpus_per_node} GPUs ({launch.backend}"
                     + (f", {launch.sagemaker.instance_type}" if launch.backend == "sagemaker" else "") + ")")
    for rank, chunks in enumerate(stage_layers(shape.num_layers, p.pp, p.vpp)):
        held = ", ".join(f"{c.start}-{c.stop - 1}" if len(c) > 1 else f"{c.start}" for c in chunks)
        extra = (["embedding"] if rank == 0 else []) + (["final norm + output layer"] if rank == p.pp - 1 else [])
        lines.append(f"  pipeline stage {rank}: layers {held}" + (f" (+ {', '.join(extra)})" if extra else ""))
    return lines


def _shape_line(cfg: Config, shape: ModelShape) -> str:
    head_dim = shape.hidden_size // shape.num_attention_heads
    name = cfg.model.preset or "custom shape"
    return (f"Model: {name} ({shape.arch}, {shape.num_layers} layers, hidden {shape.hidden_size}, "
            f"{shape.num_attention_heads} heads x {head_dim}, {shape.num_query_groups} kv groups, "
            f"ffn {shape.ffn_hidden_size}, vocab {shape.vocab_size} padded to {shape.padded_vocab_size}, "
            f"max_seq_len {shape.max_seq_len})")


def _use_bf16(cfg: Config) -> bool:
    return cfg.train.precision != "fp32"  # auto: bf16 on the GPUs a real run uses


def describe(cfg: Config, stage: str) -> str:
    """The dry-run report for `alfred-train <stage> CONFIG --dry-run` (raises ConfigError if invalid)."""
    if stage not in STAGE_MODELS:
        raise ConfigError(f"stage {stage!r}: expected one of {', '.join(STAGE_MODELS)}")
    validate(cfg, world_size=cfg.world_size)
    validate_stage(cfg, stage)
    _check_launch(cfg)
    unchecked = []
    if stage == "ppo":  # the same checks `alfred-train ppo` runs before it builds a model
        from alfred_train.ppo.checks import preflight

        unchecked = preflight(cfg, dry_run=True)[2]
    p = cfg.parallel
    shape = resolve_shape(cfg.model, _vocab_size(cfg))
    _check_shards(shape, p.tp)
    data = []
    if stage != "ppo":  # the checkpoints it loads (PPO's preflight checks its own) and the data
        from alfred_train.stages.checkpoint_checks import check_checkpoints

        unchecked = check_checkpoints(cfg, stage, shape, required=False)[1]
        data, missing = _data_lines(cfg, stage)
        unchecked += missing
    bf16 = _use_bf16(cfg)
    lines = [f"alfred-train {stage} --dry-run: the configuration is valid; nothing was started.",
             _shape_line(cfg, shape), *_layout_lines(cfg, shape), ""]

    models = [(name, trainable, model_params(shape, kind)) for name, kind, trainable in STAGE_MODELS[stage]]
    per_stage = {name: params_per_gpu(mp, p.tp, p.pp) for name, _, mp in models}
    lines.append("Parameters")
    lines += _table(["model", "total", "exact", "per GPU (fullest stage)", "per GPU by stage"],
                    [[name, _billions(mp.total), f"{mp.total:,}", f"{max(per_stage[name]):,}",
                      " / ".join(_billions(n) for n in per_stage[name])] for name, _, mp in models])
    lines.append("")

    # Memory of every pipeline stage; the fullest one is what has to fit.
    kv = 0
    if stage == "ppo":
        kv = kv_cache_bytes(shape, seq_len=shape.max_seq_len, micro_batch=cfg.ppo.rollout_micro_batch,
                            tp=p.tp, pp=p.pp, bf16=bf16)
    stage_bytes = [sum(per_stage[name][r] * bytes_per_param(trainable=t, bf16=bf16, zero=p.zero, dp=p.dp).total
                       for name, t, _ in models) + kv for r in range(p.pp)]
    fullest = max(range(p.pp), key=lambda r: stage_bytes[r])
    rows = []
    for name, trainable, _ in models:
        bpp = bytes_per_param(trainable=trainable, bf16=bf16, zero=p.zero, dp=p.dp)
        n = per_stage[name][fullest]
        rows.append([name, "trainable" if trainable else "frozen", f"{n:,}", _size(n * bpp.weights),
                     _size(n * bpp.grads), _size(n * bpp.optimizer), _size(n * bpp.total)])
    if stage == "ppo":
        rows.append(["KV cache", f"{cfg.ppo.rollout_micro_batch} x {shape.max_seq_len} tok", "", "", "", "",
                     _size(kv)])
    rows.append(["total", "", "", "", "", "", _size(stage_bytes[fullest])])  # model states (+ KV cache)
    dtype = "bf16" if bf16 else "fp32"
    lines.append(f"Memory per GPU (pipeline stage {fullest}, the fullest; {dtype}"
                 + (f", zero over dp={p.dp}" if p.zero else "") + ")")
    lines += _table(["model", "role", "params", "weights", "grads", "optimizer", "total"], rows)
    trainable_b = bytes_per_param(trainable=True, bf16=bf16, zero=p.zero, dp=p.dp)
    lines.append(f"  trainable: {trainable_b.weights:g} B weights + {trainable_b.grads:g} B fp32 grads + "
                 f"{trainable_b.optimizer:g} B main params/Adam per parameter; frozen: weights only")
    if stage == "ppo":
        lines.append(f"  KV cache: 2 x {shape.num_layers} layers x {shape.num_query_groups} kv groups x "
                     f"{shape.hidden_size // shape.num_attention_heads} x {shape.max_seq_len} tokens "
                     f"(prompt + max_new_tokens {cfg.ppo.max_new_tokens}) x {cfg.ppo.rollout_micro_batch} "
                     f"rollouts / tp {p.tp} / pp {p.pp}")
        if cfg.ppo.offload_frozen:
            lines.append("  ppo.offload_frozen: reference and reward weights leave the GPU between phases")
    lines.append("  Model states only; activations, buffers and the CUDA context follow in the peak plan.")
    planned = stage_bytes
    if cfg.lora.rank:  # frozen bases + adapters: the states a LoRA run holds
        from alfred_train.models import lora_plan

        planned = lora_plan.state_bytes(cfg, shape, STAGE_MODELS[stage], per_stage, kv)
    static = [b - kv for b in planned]  # the generation phase adds the KV cache back
    plan = peak_plan(cfg, stage, shape, static, kv, bf16)
    lines += ["", *plan.lines]
    trainable = [mp.total for _, t, mp in models if t]
    if cfg.lora.rank:  # a LoRA checkpoint holds the adapters (and a scalar head), not the frozen base
        from alfred_train.models.lora_plan import checkpoint_params

        trainable = checkpoint_params(cfg, shape, STAGE_MODELS[stage])
    resume = _resume_lines(cfg, stage)
    init = _init_lines(cfg, stage) if not resume or stage == "ppo" else []  # PPO's frozen models load them anyway
    lines += ["", *checkpoint_lines(cfg, trainable, bf16), *resume, *init, *data]
    if cfg.lora.rank:
        from alfred_train.models.lora_plan import memory_lines

        lines += memory_lines(cfg, shape, stage, STAGE_MODELS[stage], per_stage, stage_bytes, _size, kv)
    if stage == "ppo":
        lines += ["", _ppo_line(cfg), _rollout_line(cfg)]
    else:
        lines += ["", f"Learning rate: {schedule_line(cfg.optim, cfg.train.max_steps, 'update')}"]
    if unchecked:
        lines += ([] if stage == "ppo" else [""]) + [f"  not checked here: {note}" for note in unchecked]
    full = plan if plan.recompute == "full" else peak_plan(cfg, stage, shape, static, kv, bf16, recompute="full")
    check_fits(cfg, plan, full)
    return "\n".join(lines)


def _data_lines(cfg: Config, stage: str) -> tuple[list[str], list[str]]:
    """SFT / RM: (what the run trains on, notes on the data files not reachable here). The data is
    read and built by the run's own `prepare_data`, so a bad record or too small a set is refused
    here as it would be when the run starts."""
    from pathlib import Path

    from alfred_train.data import mixture
    from alfred_train.stages import common, rm, sft

    d, t = cfg.data, cfg.train
    missing = ([] if d.synthetic else mixture.unreachable(d.train, d.format, "data.train")) \
        + mixture.unreachable(d.valid, d.format, "data.valid")
    if not Path(common.tokenizer_path(cfg)).exists():
        missing.append(f"model.tokenizer: {common.tokenizer_path(cfg)}")
    if missing:
        return [], [f"{m} is not reachable here: the data is read and checked when the run starts" for m in missing]
    train, valid = (sft if stage == "sft" else rm).prepare_data(cfg, common.tokenizer_for(cfg))
    n_valid = len(valid) if valid is not None else 0
    what = (f"samples of {d.seq_len} tokens" + (" (packed)" if d.pack else " (one example each)")) if stage == "sft" \
        else f"preference pairs (up to {d.seq_len} tokens each)"
    steps = len(train) // t.global_batch_size
    lines = [f"Data: {len(train):,} training {what}, {n_valid:,} held out; an epoch is {steps:,} steps of "
             f"{t.global_batch_size}, so train.max_steps {t.max_steps} is {t.max_steps / steps:.2f} epochs"]
    if n_valid:
        try:
            common.eval_indices(n_valid, cfg, 0)
        except ConfigError as err:
            lines.append(f"  no valid_* metrics: {err}")
    return lines, []


def _init_lines(cfg: Config, stage: str) -> list[str]:
    """Where the weights start when the run does not resume: a checkpoint, or the seeded random
    init (said aloud: a recipe that forgot checkpoint.init trained a 7B from noise without a word)."""
    from alfred_train.stages.checkpoint_checks import init_uses

    uses = init_uses(cfg, stage)
    if uses:
        return [f"  weights start from {use.key}: {use.where}" for use in uses]
    note = " (the LoRA base too)" if cfg.lora.rank else ""
    return [f"  weights start from a seeded random init (train.seed {cfg.train.seed}){note}: no "
            + ("rm.init or checkpoint.init" if stage == "rm" else "checkpoint.init")]


def _resume_lines(cfg: Config, stage: str) -> list[str]:
    """The checkpoint the run resumes, and at which layout (refused if its optimizer states cannot
    reshard to it: also where PPO's preflight could not check the checkpoints without a tokenizer)."""
    from alfred_train import checkpoint
    from alfred_train.stages.checkpoint_checks import check_resume_layout, checkpoints_to_load

    for use in checkpoints_to_load(cfg, stage):
        path = checkpoint.locate(use.where, use.key, required=False) if use.resume else None
        if path is not None:
            meta = checkpoint.read_meta(path)
            moved = check_resume_layout(cfg, use, path, meta)
            return [f"  resumes {path} (step {meta['step']})"
                    + (f" at another layout ({moved}): weights and optimizer states reshard" if moved else "")]
    return []


def checkpoint_lines(cfg: Config, trainable_params: list[int], bf16: bool) -> list[str]:
    """Checkpoint size; on SageMaker also per-instance disk and S3 traffic (refuses a small volume)."""
    from alfred_train.launch.sagemaker_disk import disk_plan

    size = resources.checkpoint_size(trainable_params, bf16=bf16)
    lines = [f"Checkpoint: {resources.human(size.total)} each ({resources.human(size.weights)} weights + "
             f"{resources.human(size.optimizer)} fp32 main params and Adam state), keep {cfg.checkpoint.keep}"]
    if cfg.launch.backend == "sagemaker":
        lines += disk_plan(cfg, size).lines
    return lines


# ---------------------------------------------------------------------------------------------
# Peak memory: model states + the larger phase (training activations or generation buffers)


@dataclass(frozen=True)
class PeakPlan:
    peak: float  # bytes on the fullest GPU
    stage: int  # its pipeline stage
    phase: str  # "training" or "generation"
    lines: list[str]
    recompute: str
    states: float  # the fullest stage's model states + the reserve: what no recompute can lower


def _training_shape(cfg: Config, stage: str, shape: ModelShape) -> tuple[int, int, int]:
    """(tokens per sequence, sequences per micro-batch, micro-batches per optimizer step) of one DP rank."""
    t, p = cfg.train, cfg.parallel
    if stage == "ppo":
        o = cfg.ppo
        per_step = o.rollouts_per_iter // p.dp // min(o.policy_steps_per_epoch, o.value_steps_per_epoch)
        return shape.max_seq_len, o.train_micro_batch, max(1, per_step // o.train_micro_batch)
    sequences = t.micro_batch_size * (2 if stage == "rm" else 1)  # RM: chosen + rejected
    return cfg.data.seq_len, sequences, max(1, t.global_batch_size // (t.micro_batch_size * p.dp))


def peak_plan(cfg: Config, stage: str, shape: ModelShape, static: list[float], kv: float, bf16: bool,
              recompute: str | None = None) -> PeakPlan:
    p = cfg.parallel
    recompute = recompute or cfg.train.recompute
    seq, micro, num_micro = _training_shape(cfg, stage, shape)
    eager = cfg.model.attention_backend == "eager"
    scale = 1 if bf16 else 2  # fp32 activations are twice the 16-bit sizes
    per_layer = resources.layer_activation_bytes(shape, seq=seq, micro_batch=micro, tp=p.tp,
                                                 sp=p.sequence_parallel, recompute=recompute, eager=eager) * scale
    rows, best = [], None
    for r in range(p.pp):
        held = resources.in_flight_micro_batches(p.pp, p.vpp, num_micro) if r == 0 else min(p.pp - r, num_micro)
        acts = shape.num_layers // p.pp * per_layer * held
        if recompute == "full":
            acts += resources.layer_activation_bytes(shape, seq=seq, micro_batch=micro, tp=p.tp,
                                                     sp=p.sequence_parallel, recompute="none", eager=eager) * scale
        buffers = (2 * seq * micro * shape.hidden_size * 2 * scale if p.pp > 1 else 0)
        if r == p.pp - 1:
            buffers += resources.logits_bytes(shape, seq=seq, micro_batch=micro, tp=p.tp)
        train = acts + buffers
        gen = 0.0
        if stage == "ppo":
            prompt_len = shape.max_seq_len - cfg.ppo.max_new_tokens
            gen = kv + resources.generation_buffer_bytes(shape, prompt_len=prompt_len,
                                                         batch=cfg.ppo.rollout_micro_batch, tp=p.tp, bf16=bf16)
        reserve = resources.RESERVE_GIB * GIB
        total = static[r] + max(train, gen) + reserve
        phase = "generation" if gen > train else "training"
        rows.append([f"stage {r}", _size(static[r]), _size(acts), _size(buffers), _size(gen) if stage == "ppo" else "-",
                     _size(reserve), _size(total)])
        if best is None or total > best[0]:
            best = (total, r, phase)
    lines = [f"Peak per GPU (train.recompute: {recompute}; 1F1B holds up to {p.pp} micro-batch(es) of "
             f"{micro} x {seq} tokens on stage 0, {num_micro} per step)"]
    lines += _table(["pipeline", "model states", "activations", "logits+p2p", "generation", "reserve", "peak"],
                    rows)
    lines.append(f"  peak: {_size(best[0])} on pipeline stage {best[1]} ({best[2]} phase); reserve = CUDA "
                 f"context, NCCL buffers, fragmentation ({resources.RESERVE_GIB:g} GiB)")
    return PeakPlan(best[0], best[1], best[2], lines, recompute, max(static) + resources.RESERVE_GIB * GIB)


def gpu_memory_gib(cfg: Config) -> tuple[float, str]:
    """(usable GiB of one GPU, what it is) from launch.gpu_memory_gib or the SageMaker instance type."""
    launch = cfg.launch
    if launch.gpu_memory_gib:
        return launch.gpu_memory_gib, f"launch.gpu_memory_gib={launch.gpu_memory_gib:g}"
    if launch.backend == "sagemaker" and launch.sagemaker.instance_type in resources.INSTANCE_GPU_MEMORY_GIB:
        itype = launch.sagemaker.instance_type
        return resources.INSTANCE_GPU_MEMORY_GIB[itype], f"one GPU of {itype}"
    return 0.0, ""


def check_fits(cfg: Config, plan: PeakPlan, full: PeakPlan) -> None:
    """Refuse a plan above the GPU's memory, naming the first change that would make it fit
    (`full`: the same plan with train.recompute: full)."""
    limit, what = gpu_memory_gib(cfg)
    if not limit or plan.peak <= limit * GIB:
        return
    need = f"the plan needs {plan.peak / GIB:.1f} GiB per GPU (pipeline stage {plan.stage}, {plan.phase} phase)"
    if plan.states > limit * GIB:
        key = "parallel.pp"
        zero = "" if cfg.parallel.zero else "turn on parallel.zero, "
        advice = (f"the model states and the {resources.RESERVE_GIB:g} GiB reserve alone need {plan.states / GIB:.1f} "
                  f"GiB: raise it or parallel.tp, {zero}or use a GPU with more memory")
    elif plan.recompute != "full" and full.peak <= limit * GIB:
        key, advice = "train.recompute", f"set train.recompute: full (plan {full.peak / GIB:.1f} GiB)"
    elif plan.phase == "generation":
        key, advice = "ppo.rollout_micro_batch", ("lower it (KV cache and prefill buffers), raise parallel.tp "
                                                  "or parallel.pp, or set ppo.offload_frozen: true")
    else:
        key = "parallel.pp"
        advice = "raise it or parallel.tp, turn on parallel.sequence_parallel, or lower the micro-batch size"
    raise ConfigError(f"{key}: {need} but {what} has {limit:g} GiB; {advice}")


def _ppo_line(cfg: Config) -> str:
    o, opt = cfg.ppo, cfg.optim
    per_rank = o.rollouts_per_iter // cfg.parallel.dp
    return (f"PPO: {cfg.train.max_steps} iterations x {o.rollouts_per_iter} rollouts ({per_rank} per DP rank); "
            f"policy {o.policy_epochs} epoch(s) x {o.policy_steps_per_epoch} step(s), "
            f"value {o.value_epochs} epoch(s) x {o.value_steps_per_epoch} step(s); "
            "learning rate per iteration, both models"
            + (f" (the value model's scaled to its peak ppo.value_lr {o.value_lr:g})" if o.value_lr else "")
            + f": {schedule_line(opt, cfg.train.max_steps, 'iteration')}")


def _rollout_line(cfg: Config) -> str:
    """How rollouts are decoded: batching, the pipeline, and where PPO's old log-probs come from."""
    o, pp = cfg.ppo, cfg.parallel.pp
    batches = math.ceil(o.rollouts_per_iter // cfg.parallel.dp / o.rollout_micro_batch)
    batching = "on (a row that ends takes the next prompt)" if o.continuous_batching else \
        f"off ({batches} static micro-batches, each held by its longest response)"
    parts = [f"Rollouts: {o.rollout_micro_batch} rows decoded together per DP rank, continuous batching {batching}"]
    if pp > 1 and o.pipelined_decode and o.rollout_micro_batch >= pp:
        parts.append(f"pipelined decode: {pp} row groups in flight, every stage busy")
    elif pp > 1 and o.pipelined_decode:
        parts.append(f"pipelined decode asked for but not possible: {o.rollout_micro_batch} rows cannot form "
                     f"{pp} groups (raise ppo.rollout_micro_batch to >= {pp})")
    elif pp > 1:
        parts.append(f"pipelined decode off: each token crosses the {pp} stages one after another "
                     f"(ppo.pipelined_decode: true keeps them all busy; it pays where a stage's step is compute-bound)")
    if o.compile_decode:
        parts.append("on CPU the decode step compiled by torch.compile in the first iteration "
                     "(ppo.compile_decode; not used on a GPU, which captures it in a CUDA graph)")
    parts.append("old log-probs: " + ("recomputed by the scoring pass (ppo.recompute_logprobs)"
                                      if o.recompute_logprobs else "the sampler's (ppo.recompute_logprobs: false)"))
    return "; ".join(parts)
