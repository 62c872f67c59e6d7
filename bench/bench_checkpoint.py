"""What a trustworthy checkpoint costs: the manifest + fsync share of save time, and resume checks.

    python bench/bench_checkpoint.py                  # ~1-2 minutes on 2 CPU cores; prints a table
    python bench/bench_checkpoint.py --sizes 256x4 1024x8

One process (gloo), a Llama-shape model of each `--sizes` (hidden x layers) with its Adam state,
saved `--repeats` times through `checkpoint.save_checkpoint` into a temporary directory (the
machine's own disk; `--dir` for another). Columns from the repeat whose save time is the median
(megatron writer: median of its own repeats):
- write: dist_checkpointing with the in-process writer (threads, per-file fsync) + RNG files;
- manifest+fsync: every file re-read for sha256 and fsynced by the rank that wrote it, the manifest
  gathered and written, directories fsynced, the rename, `latest`; share = its part of the save;
- megatron writer: the same state saved by megatron-core's default writer (forked writer
  processes + Manager queue, the one SIGTERM could kill), for comparison with `write`;
- verify: the resume check of the saved checkpoint (sizes + sha256 of every file, 8 threads).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def measure(hidden: int, layers: int, repeats: int, out: Path) -> dict:
    from megatron.core import dist_checkpointing

    from alfred_train import checkpoint
    from alfred_train.checkpointing import manifest as mf
    from alfred_train.checkpointing import optimizer_state
    from alfred_train.config import load_config
    from alfred_train.models.build import unwrap
    from alfred_train.stages import common

    heads = max(4, hidden // 64)
    cfg = load_config(ROOT / "configs" / "tiny-sft.yaml", [
        "parallel.tp=1", f"model.hidden_size={hidden}", f"model.num_layers={layers}",
        f"model.num_attention_heads={heads}", f"model.num_query_groups={heads}"])
    runtime = _runtime()
    tokenizer = common.tokenizer_for(cfg)
    shape = common.shape_for(cfg, tokenizer)
    trainable = common.build_trainable(cfg, runtime, shape, common.attention_backend(cfg, runtime), kind="lm",
                                       total_steps=10)
    optimizer_state.prime(trainable.optimizer)  # Adam state exists, as after a step
    models = {"policy": ([unwrap(c) for c in trainable.chunks], trainable.optimizer)}
    params = sum(p.numel() for c in trainable.chunks for p in c.parameters())
    rows = {"write": [], "manifest": [], "total": [], "megatron": [], "verify": []}
    root = out / f"h{hidden}x{layers}"
    for i in range(repeats):
        timings = {}
        path = checkpoint.save_checkpoint(root, i + 1, models, {}, runtime, keep=1, layout=common.layout(cfg),
                                          timings=timings)
        for key in ("write", "manifest", "total"):
            rows[key].append(timings[key])
        t0 = time.perf_counter()
        assert mf.problems(path) == []
        rows["verify"].append(time.perf_counter() - t0)
        plain = out / f"megatron-{hidden}x{layers}-{i}"
        plain.mkdir()
        sharded = checkpoint._model_sd(models["policy"][0], "policy")
        sharded["policy.optimizer"] = optimizer_state.sharded(trainable.optimizer, dict(sharded), is_loading=False)
        t0 = time.perf_counter()
        dist_checkpointing.save(sharded, str(plain))
        rows["megatron"].append(time.perf_counter() - t0)
    pick = sorted(range(repeats), key=lambda i: rows["total"][i])[repeats // 2]  # the median save, whole
    return {"shape": f"{hidden}x{layers}", "params": params, "mb": _size_mb(path),
            **{k: v[pick] for k, v in rows.items() if k != "megatron"}, "megatron": statistics.median(rows["megatron"])}


def _runtime():
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime

    return init_runtime(ParallelDims(1, 1, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["256x4", "768x8"], help="hidden x layers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = [measure(*map(int, s.split("x")), args.repeats, Path(tmp)) for s in args.sizes]
    print(f"\n## Checkpoint save cost ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"median of {args.repeats} saves)\n")
    print("| model (hidden x layers) | params | checkpoint MB | save s | write s | manifest+fsync s | "
          "manifest share | megatron writer s | verify s (resume) | verify MB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['shape']} | {r['params'] / 1e6:.1f}M | {r['mb']:.0f} | {r['total']:.3f} | {r['write']:.3f} | "
              f"{r['manifest']:.3f} | {100 * r['manifest'] / r['total']:.0f}% | {r['megatron']:.3f} | "
              f"{r['verify']:.3f} | {r['mb'] / r['verify']:.0f} |")


if __name__ == "__main__":
    main()
