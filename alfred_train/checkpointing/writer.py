"""dist_checkpointing's torch_dist save with every file written by threads of the trainer itself.

megatron-core 0.16.1's `FileSystemWriterAsync` always writes through child processes: a Manager
process (spawned once, kept for the life of the trainer) holds the results queue, and one forked
process per file writes it. A scheduler's TERM to the job step (Slurm requeue, spot reclaim), or
srun stopping the step's processes when the first task exits, kills them and the save that the
TERM asked for dies with BrokenPipeError. Here the same planner, file format and per-file fsync
are kept, but the write runs in threads of this process and the results go through an in-process
queue: no child process exists for a signal to kill.
"""

from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from functools import partial
from pathlib import Path


def save(sharded_state_dict: dict, checkpoint_dir: Path, thread_count: int = 2) -> None:
    """Collective: `dist_checkpointing.save` with the in-process writer."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded_state_dict, str(checkpoint_dir), sharded_strategy=_strategy(thread_count))


def _strategy(thread_count: int):
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class InProcessSaveStrategy(TorchDistSaveShardedStrategy):
        def async_save(self, sharded_state_dict, checkpoint_dir):
            with _results_in_process():
                request = super().async_save(sharded_state_dict, checkpoint_dir)
            if request.async_fn is None:  # nothing to write on this rank
                return request
            transforms = request.async_fn.args[0]  # partial(write_preloaded_data_multiproc, transforms, use_msc)
            return request._replace(async_fn=partial(_write_in_threads, transforms))

    return InProcessSaveStrategy("torch_dist", 1, thread_count=thread_count)


@contextmanager
def _results_in_process():
    """The writer takes its results queue from this module global (a Manager queue when unset):
    hand it a plain thread-safe queue for this save."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    saved, filesystem_async._results_queue = filesystem_async._results_queue, queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = saved


def _write_in_threads(transforms, rank: int, write_buckets: list, results_queue) -> None:
    """`write_preloaded_data_multiproc` with threads: one thread per file, the same per-file writer
    (with fsync), the same result shape ({bucket index: write results} or the first exception)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    local_results, count = queue.Queue(), queue.Queue()
    threads = []
    for i, bucket in enumerate(write_buckets):
        count.put(i)
        threads.append(threading.Thread(target=FileSystemWriterAsync.write_preloaded_data,
                                        args=(transforms, i, bucket, local_results, count, True)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results: dict | Exception = {}
    while not local_results.empty():
        index, out = local_results.get()
        if isinstance(out, Exception):
            results = out
            break
        results[index] = out
    results_queue.put(results)
