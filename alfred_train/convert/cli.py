"""`alfred-train convert`: move weights between Hugging Face directories and our checkpoints.

    alfred-train convert hf-to-mcore HF_DIR OUT_DIR [--tp N --pp N] [--kind auto|lm|reward] [--dtype ...]
                                     (HF_DIR may be an HF Trainer DeepSpeed ZeRO checkpoint: global_step*/)
                                     [--adapter PEFT_ADAPTER_DIR]
    alfred-train convert mcore-to-hf CKPT_DIR OUT_DIR [--model policy|reward|value] [--dtype ...]
                                     [--max-shard-size 5GB] [--merge-lora]
    alfred-train convert apply-delta BASE_DIR DELTA_DIR OUT_DIR [--max-shard-size 5GB]

hf-to-mcore checks config.json and the safetensors headers in this process, then, when tp*pp > 1
and no launcher started us, runs tp*pp local workers (like the stages do).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from alfred_train.convert.safetensors_io import DEFAULT_SHARD_BYTES
from alfred_train.errors import ConfigError

KINDS = {"auto": None, "lm": "lm", "reward": "scalar"}


def parse_size(text: str) -> int:
    """'5GB' / '200MB' / '1048576' -> bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not m:
        raise ConfigError(f"--max-shard-size {text!r}: write a size like 5GB, 500MB or a byte count")
    size = int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))
    if size < 1:  # 0 wrote one shard per tensor
        raise ConfigError(f"--max-shard-size {text!r}: must be at least one byte; leave it out for 5GB shards")
    return size


def add_commands(subparsers) -> None:
    conv = subparsers.add_parser("convert", help="Hugging Face <-> alfred-train checkpoint conversion")
    sub = conv.add_subparsers(dest="convert_command", required=True)

    p = sub.add_parser("hf-to-mcore", help="Hugging Face Llama/Falcon directory -> our checkpoint")
    p.add_argument("hf_dir", help="config.json + safetensors, or an HF Trainer checkpoint with DeepSpeed "
                                  "ZeRO global_step*/ shards (needs the [deepspeed] extra)")
    p.add_argument("out_dir")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to save at")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to save at")
    p.add_argument("--kind", choices=sorted(KINDS), default="auto",
                   help="reward: scalar head from score.weight (auto: from config.json architectures)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="stored weights (auto: bf16 if the HF weights are bf16, else fp32)")
    p.add_argument("--adapter", default=None,
                   help="a PEFT LoRA adapter dir (adapter_config.json + adapter_model.safetensors) on this base")
    p.set_defaults(func=run_hf_to_mcore)

    p = sub.add_parser("mcore-to-hf", help="our checkpoint -> Hugging Face safetensors + config.json")
    p.add_argument("ckpt_dir", help="a checkpoint dir, a checkpoints/ root or a run dir")
    p.add_argument("out_dir")
    p.add_argument("--model", default=None, help="policy | reward | value (default: policy, else reward)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--max-shard-size", default="5GB", help="split into shards + index above this size")
    p.add_argument("--merge-lora", action="store_true",
                   help="LoRA checkpoint: write merged weights W + (alpha/r) B A instead of base + PEFT adapter")
    p.set_defaults(func=run_mcore_to_hf)

    p = sub.add_parser("apply-delta", help="base + delta weights (Hugging Face dirs) -> target weights")
    p.add_argument("base_dir")
    p.add_argument("delta_dir")
    p.add_argument("out_dir")
    p.add_argument("--max-shard-size", default="5GB")
    p.set_defaults(func=run_apply_delta)


def check_out_dir(out_dir: str) -> None:
    """Refuse an output that a file stands in the way of, before any weight is read."""
    from alfred_train.checkpointing.site import file_in_the_way

    if blocked := file_in_the_way(Path(out_dir)):
        where = "" if blocked == Path(out_dir) else f": {blocked}"
        raise ConfigError(f"output {out_dir}{where} is a file, not a directory; name a directory to write into")


def _single_process_runtime(tp: int = 1, pp: int = 1):
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime

    return init_runtime(ParallelDims(tp, pp, 1))


def run_hf_to_mcore(args) -> int:
    from alfred_train.convert.deepspeed_zero import is_zero_checkpoint, require_deepspeed
    from alfred_train.convert.hf_import import (check_hf_tensors, check_layout, hf_to_mcore, output_problem,
                                                plan_import, read_adapter, staging_dir)
    from alfred_train.convert.safetensors_io import SafetensorsDir
    from alfred_train.parallel.init import detect_launch_env, shutdown

    if args.tp < 1 or args.pp < 1:
        raise ConfigError(f"--tp {args.tp} --pp {args.pp}: both must be >= 1")
    check_out_dir(args.out_dir)
    if problem := output_problem(Path(args.out_dir)):
        raise ConfigError(problem)
    plan = plan_import(args.hf_dir, KINDS[args.kind], args.dtype)  # config errors before any weight
    check_layout(plan, args.tp, args.pp)
    if is_zero_checkpoint(args.hf_dir):  # assembled (and its tensors checked) once, in the workers
        require_deepspeed(args.hf_dir)
    else:
        check_hf_tensors(plan, SafetensorsDir(args.hf_dir))
    read_adapter(plan, args.adapter)  # its shapes against the base, before any worker starts
    world = args.tp * args.pp
    if world > 1 and detect_launch_env().launcher == "single":
        from alfred_train.parallel.spawn import spawn_local

        argv = ["convert", "hf-to-mcore", args.hf_dir, args.out_dir, "--tp", str(args.tp), "--pp",
                str(args.pp), "--kind", args.kind, "--dtype", args.dtype]
        argv += ["--adapter", args.adapter] if args.adapter else []
        code = spawn_local(argv, world)
        if code:  # a worker killed mid-conversion could not remove its part
            shutil.rmtree(staging_dir(Path(args.out_dir)), ignore_errors=True)
        return code
    runtime = _single_process_runtime(args.tp, args.pp)
    try:
        hf_to_mcore(args.hf_dir, args.out_dir, runtime, tp=args.tp, pp=args.pp, kind=plan.kind,
                    dtype=args.dtype, adapter=args.adapter)
    finally:
        shutdown()
    return 0


def run_mcore_to_hf(args) -> int:
    from alfred_train.convert.hf_export import mcore_to_hf
    from alfred_train.parallel.init import detect_launch_env, shutdown

    if detect_launch_env().world_size != 1:
        raise ConfigError("convert mcore-to-hf runs as one process; start it without torchrun/srun")
    check_out_dir(args.out_dir)
    max_bytes = parse_size(args.max_shard_size) if args.max_shard_size else DEFAULT_SHARD_BYTES
    runtime = _single_process_runtime()
    try:
        mcore_to_hf(args.ckpt_dir, args.out_dir, runtime, model=args.model, dtype=args.dtype,
                    max_shard_bytes=max_bytes, merge_lora=args.merge_lora)
    finally:
        shutdown()
    return 0


def run_apply_delta(args) -> int:
    from alfred_train.convert.delta import apply_delta

    check_out_dir(args.out_dir)
    apply_delta(args.base_dir, args.delta_dir, args.out_dir, parse_size(args.max_shard_size))
    return 0
