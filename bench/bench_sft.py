"""SFT tokens/s of the tiny model at TP=1, TP=2, PP=2 and DP=2 on this machine, and where the time goes.

    python bench/bench_sft.py                    # 1.5-3 minutes on 2 CPU cores; prints two tables
    python bench/bench_sft.py --write-results    # also writes them into bench/RESULTS.md

Each layout is a real `alfred-train sft configs/tiny-sft.yaml` run of `--steps` optimizer steps
(no checkpoints, no evaluation, no TensorBoard). This script starts its processes torchrun-style
(RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, OMP_NUM_THREADS = cores / processes, as
`parallel.spawn` does); each process runs `alfred_train.cli.main(["sft", ...])` after putting a
timer on torch.distributed's calls. Every layout does the same work per step: global batch 16 x
seq_len 64 = 1,024 tokens, so tokens/s = 1,024 / step time and the layouts compare directly.
The machine is shared with other work: each layout runs `--repeats` times (alternating the order)
and the run with the lowest median step time, the least disturbed one, is reported; the load
average is printed with the tables.

Where the time goes (all measured, nothing modelled):
- launch: from starting the processes to the start of step 1 (metrics.jsonl `time - step_time`),
  split into interpreter start (until the worker's first line runs), imports (alfred_train, torch,
  megatron-core) and init + model build + data preparation; teardown = exit - end of the last step.
- communication vs compute, per step after the warm-up steps: the time each rank spends inside
  torch.distributed calls (all-reduce, all-gather, send/recv, ...; `Work.wait` of asynchronous
  point-to-point ops counted, nested calls once) whose midpoint falls in a step window of
  metrics.jsonl, averaged over ranks, as a share of the step time. This is communication
  *including the wait for the slower peer* (load imbalance, the pipeline bubble): on a CPU where
  the ranks share two cores nothing overlaps, so that wait is real cost. compute = step - comm.
  (A TP=2-vs-TP=1 difference alone would mix communication with the different thread counts:
  TP=1 runs 2 threads in 1 process, TP=2 1 thread in each of 2.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-sft.yaml"
RESULTS = ROOT / "bench" / "RESULTS.md"
HEADING = "## SFT throughput on CPU (2 cores)"
QUIET = ["checkpoint.interval=0", "checkpoint.save_final=false", "train.eval_interval=0",
         "data.valid_fraction=0", "logging.tensorboard=false", "logging.plots=false", "logging.progress=false"]
LAYOUTS = {"TP=1": (1, 1, 1), "TP=2": (2, 1, 1), "PP=2": (1, 2, 1), "DP=2": (1, 1, 2)}  # (tp, pp, dp)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
               "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce", "barrier", "send", "recv",
               "isend", "irecv", "batch_isend_irecv", "all_to_all_single", "all_gather_object",
               "broadcast_object_list", "gather", "scatter")


# ---------------------------------------------------------------------------------------------
# Worker side: time torch.distributed, then run the real CLI.

def install_comm_timer(events: list) -> None:
    """Wrap torch.distributed's collectives and `Work.wait`; append (wall start, seconds) per outermost call."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    depth = threading.local()

    def timed(fn):
        def wrapper(*args, **kwargs):
            if getattr(depth, "n", 0):
                return fn(*args, **kwargs)
            depth.n = 1
            start, t0 = time.time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                events.append((start, time.perf_counter() - t0))
                depth.n = 0
        return wrapper

    for name in COLLECTIVES:
        if hasattr(dist, name):
            wrapped = timed(getattr(dist, name))
            setattr(dist, name, wrapped)
            if hasattr(distributed_c10d, name):
                setattr(distributed_c10d, name, wrapped)
    dist.Work.wait = timed(dist.Work.wait)


def worker(out_prefix: str, cli_args: list[str]) -> int:
    started = time.time()
    events: list[tuple[float, float]] = []
    install_comm_timer(events)  # before megatron is imported, so `from torch.distributed import x` sees it
    import megatron.core  # noqa: F401  (imported here only to time the imports apart from the run)

    import alfred_train.stages.sft  # noqa: F401
    from alfred_train.cli import main

    imported = time.time()
    code = main(cli_args)
    rank = os.environ["RANK"]
    Path(f"{out_prefix}.rank{rank}.json").write_text(
        json.dumps({"started": started, "imported": imported, "events": events}))
    return code


# ---------------------------------------------------------------------------------------------
# Bench side: launch, read metrics.jsonl and the timings.

@dataclass(frozen=True)
class Result:
    layout: str
    processes: int
    step_s: float  # median step time after warm-up
    tokens_per_s: float  # median of metrics.jsonl tokens_per_s after warm-up
    comm_share: float  # mean over ranks of time in torch.distributed / step time, after warm-up
    wall_s: float  # launch to the last process's exit
    python_s: float  # launch -> worker's first line (interpreter start), slowest rank
    imports_s: float  # imports of torch, megatron-core, alfred_train, slowest rank
    init_s: float  # -> start of step 1: process groups, model build, optimizer, data preparation
    steps_s: float  # all steps, warm-up included
    teardown_s: float


def run_layout(name: str, tp: int, pp: int, dp: int, steps: int, warmup: int, work: Path) -> Result:
    world = tp * pp * dp
    run_dir, prefix = work / name.replace("=", ""), str(work / f"{name.replace('=', '')}-comm")
    cli_args = ["sft", str(CONFIG), f"run.dir={run_dir}", f"train.max_steps={steps}", f"parallel.tp={tp}",
                f"parallel.pp={pp}", f"parallel.dp={dp}", *QUIET]
    port = _free_port()
    launched = time.time()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
        log = open(work / f"{name.replace('=', '')}.rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, __file__, "--worker", prefix, "--", *cli_args],
                                       env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
    for rank, (proc, log) in enumerate(procs):
        if proc.wait(timeout=600) != 0:
            raise SystemExit(f"{name} rank {rank} exited {proc.returncode}:\n{Path(log.name).read_text()[-3000:]}")
        log.close()
    ended = time.time()

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step_time" in r]
    measured = [r for r in rows if r["step"] > warmup]
    windows = [(r["time"] - r["step_time"], r["time"]) for r in measured]
    ranks = [json.loads(Path(f"{prefix}.rank{rank}.json").read_text()) for rank in range(world)]
    step_total = sum(r["step_time"] for r in measured)
    comm = [sum(d for s, d in rank["events"] if any(a <= s + d / 2 <= b for a, b in windows)) for rank in ranks]
    first_start = rows[0]["time"] - rows[0]["step_time"]
    return Result(
        layout=name, processes=world,
        step_s=statistics.median(r["step_time"] for r in measured),
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in measured),
        comm_share=statistics.mean(comm) / step_total,
        wall_s=ended - launched,
        python_s=max(r["started"] for r in ranks) - launched,
        imports_s=max(r["imported"] - r["started"] for r in ranks),
        init_s=first_start - max(r["imported"] for r in ranks),
        steps_s=rows[-1]["time"] - first_start,
        teardown_s=ended - rows[-1]["time"])


def tables(results: list[Result], steps: int, warmup: int, repeats: int) -> str:
    base = next(r for r in results if r.layout == "TP=1").tokens_per_s
    lines = [f"Throughput ({steps} steps, first {warmup} skipped as warm-up; 1,024 tokens per step; "
             f"the faster of {repeats} runs per layout):", "",
             "| layout | processes | median step s | tokens/s | vs TP=1 | comm share of step | compute s/step |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.layout} | {r.processes} | {r.step_s:.3f} | {r.tokens_per_s:,.0f} | "
                     f"{r.tokens_per_s / base:.2f}x | {r.comm_share:.0%} | {r.step_s * (1 - r.comm_share):.3f} |")
    lines += ["", "Where the wall time of each run goes (seconds):", "",
              "| layout | wall | interpreter start | imports | init + model + data | steps | teardown |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.layout} | {r.wall_s:.1f} | {r.python_s:.1f} | {r.imports_s:.1f} | {r.init_s:.1f} | "
                     f"{r.steps_s:.1f} | {r.teardown_s:.1f} |")
    launch = statistics.mean((r.python_s + r.imports_s + r.init_s) / r.wall_s for r in results)
    comm = {r.layout: r.comm_share for r in results if r.processes > 1}
    lines += ["", f"Where the time goes: launch (interpreter + imports + init/model/data) is {launch:.0%} of a "
              f"{steps}-step run's wall time on average; inside a step, communication (incl. waiting for the "
              f"peer) takes " + ", ".join(f"{k} {v:.0%}" for k, v in comm.items()) + ", the rest is compute."]
    return "\n".join(lines)


def write_results(text: str) -> None:
    """Replace this script's section of RESULTS.md (or append it); other sections stay as they are."""
    machine = (f"{_cpu_model()}, {os.cpu_count()} cores visible, Python {platform.python_version()}, "
               f"torch {_version('torch')}, megatron-core {_version('megatron-core')}")
    section = (f"{HEADING}\n\nMeasured {datetime.date.today().isoformat()} with `python bench/bench_sft.py` on "
               f"{machine}; gloo, fp32, configs/tiny-sft.yaml (4 layers, hidden 64, seq 64, global batch 16). "
               f"The machine is shared with other work, so runs of one layout differ (all of them are listed).\n\n"
               f"{text}\n")
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if HEADING in old:
        head, rest = old.split(HEADING, 1)
        nxt = rest.find("\n## ")
        new = head + section + (rest[nxt + 1:] if nxt >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(new)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    parser.add_argument("--repeats", type=int, default=2, help="runs per layout; the fastest is reported")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset of " + ",".join(LAYOUTS))
    parser.add_argument("--write-results", action="store_true", help=f"write the tables into {RESULTS}")
    args = parser.parse_args()
    names = ["TP=1", *[n for n in args.layouts.split(",") if n != "TP=1"]]  # TP=1 is the reference
    print(f"load average (1 min) before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    runs: dict[str, list[Result]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        for repeat in range(args.repeats):  # alternate the order so a burst of other load hits all layouts alike
            for name in names if repeat % 2 == 0 else reversed(names):
                work = Path(tmp) / f"r{repeat}"
                work.mkdir(exist_ok=True)
                runs[name].append(run_layout(name, *LAYOUTS[name], steps=args.steps, warmup=args.warmup, work=work))
                print(f"{name} (run {repeat + 1}): {runs[name][-1].tokens_per_s:,.0f} tokens/s", flush=True)
    results = [min(runs[name], key=lambda r: r.step_s) for name in names]  # the least disturbed run
    load = os.getloadavg()[0]
    spread = "; ".join(f"{name} " + ", ".join(f"{r.tokens_per_s:,.0f}" for r in runs[name]) for name in names)
    text = tables(results, args.steps, args.warmup, args.repeats) + f"\n\nEvery run, tokens/s: {spread}." + (
        f"\n\nLoad average (1 min) at the end: {load:.1f} on {os.cpu_count()} cores"
        + (" -- other work was running: these numbers are contended." if load > 1.5 * (os.cpu_count() or 1) else "."))
    print("\n" + text)
    if args.write_results:
        write_results(text)
        print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2], sys.argv[sys.argv.index("--") + 1:]))
    main()
