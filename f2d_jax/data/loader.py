"""Global training batches from any indexable source, with an order fixed by (seed, step).

The global batch of step s is positions [s*B, (s+1)*B) of an endless chain of per-epoch
permutations of the dataset. Each process reads only the rows its devices hold and assembles
the global arrays. The iterator's whole state is the step: a resumed run sees exactly the
examples it would have seen, whatever the number of hosts or the mesh.

Host batches are loaded by `workers` threads, each loading whole batches of consecutive steps,
and handed over in step order: a batch is the same function of (seed, step, rows) whatever the
number of threads. Decoding scales with them because OpenCV's decoders and array_record's reads
release the GIL.
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import NamedSharding


class Source(Protocol):
    def __len__(self) -> int: ...

    def get(self, indices) -> dict[str, np.ndarray]: ...


@functools.lru_cache(maxsize=4)
def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> np.ndarray:
    """(batch_size,) dataset indices of the global batch of `step`."""
    positions = step * batch_size + np.arange(batch_size)
    epochs, offsets = np.divmod(positions, num_examples)
    return np.array([_permutation(num_examples, seed, int(e))[o] for e, o in zip(epochs, offsets)])


def local_rows(sharding: NamedSharding, batch_size: int) -> slice:
    """The contiguous rows of a (batch_size, ...) array that this process's devices hold."""
    rows = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(batch_size)[index[0]])
    lo, hi = min(rows), max(rows) + 1
    assert len(rows) == hi - lo, "this process's batch rows are not contiguous"
    return slice(lo, hi)


MAX_AUTO_WORKERS = 16


def loading_workers(workers: int) -> int:
    """The loading threads `workers` (a config's data.workers) asks for: itself when positive,
    else (0, "auto") one per CPU this process may run on, at most MAX_AUTO_WORKERS."""
    if workers < 0:
        raise ValueError(f"data.workers must be >= 0 (0: one per CPU core), got {workers}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return workers or min(cpus, MAX_AUTO_WORKERS)


class BatchLoader:
    """Iterates (step, {name: global jax.Array}) from `start_step`, loading ahead in threads.

    transform: numpy batch -> numpy batch (e.g. decode, derive the latent-resolution mask).
    workers: threads loading host batches of consecutive steps at once (the batches and their
    order do not depend on it); up to `workers` batches are loading and `prefetch` more are ready.
    """

    def __init__(self, source: Source, batch_size: int, seed: int, sharding: NamedSharding, start_step: int = 0,
                 transform: Callable[[dict], dict] | None = None, prefetch: int = 2, workers: int = 1):
        if len(source) < 1:
            raise ValueError("the dataset is empty")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.source, self.batch_size, self.seed, self.sharding = source, batch_size, seed, sharding
        self.workers = workers
        self.rows = local_rows(sharding, batch_size)
        self.transform = transform or (lambda batch: batch)
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(start_step,), daemon=True)
        self._thread.start()

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch of `step`, as numpy arrays."""
        indices = batch_indices(step, self.batch_size, len(self.source), self.seed)[self.rows]
        return self.transform(self.source.get(indices))

    def _work(self, step: int) -> None:
        with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="batch-loader") as pool:
            loading = collections.deque(pool.submit(self.host_batch, s) for s in range(step, step + self.workers))
            while not self._stop.is_set():
                try:
                    item = (step, loading.popleft().result())
                except Exception as e:  # surfaces in the training thread
                    item = (step, e)
                failed = isinstance(item[1], Exception)
                if not failed:
                    loading.append(pool.submit(self.host_batch, step + self.workers))
                if not self._put(item) or failed:
                    break
                step += 1
            for future in loading:
                future.cancel()

    def _put(self, item) -> bool:
        """Queues `item` unless the loader is closed first; whether it was queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, dict[str, Any]]:
        step, batch = self._queue.get()
        if isinstance(batch, Exception):
            raise batch
        global_arrays = {name: jax.make_array_from_process_local_data(
            self.sharding, value, (self.batch_size, *value.shape[1:])) for name, value in batch.items()}
        return step, global_arrays

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
