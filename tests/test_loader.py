"""The training loader (f2d_jax.data.loader.BatchLoader) loading with several threads: the same
batches in the same order as with one, from any start step (a resumed run) and on each of two
hosts (two JAX processes on localhost), from an insightface pack of JPEGs decoded per batch."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from f2d_jax.data.loader import BatchLoader, batch_indices, loading_workers
from f2d_jax.data.recordio import write_face_recordio
from f2d_jax.pretrain.data import RecordIOSource

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES, BATCH, SEED, STEPS = 40, 8, 3, 12   # 5 steps an epoch: the steps cross two epoch boundaries
RUNS = ((1, 0), (3, 0), (3, 7))                # (workers, start step): serial, parallel, parallel resumed


class Jittery:
    """A source whose loads finish out of order: each first waits 0-9 ms, by its first index."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def get(self, indices):
        time.sleep(0.003 * (int(indices[0]) % 4))
        return self.source.get(indices)


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (EXAMPLES, 112, 112, 3), dtype=np.uint8)
    return write_face_recordio(tmp_path_factory.mktemp("pack"), images, np.arange(EXAMPLES) % 10,
                               image_format=".jpg")


def expected(source, step: int) -> dict[str, np.ndarray]:
    """The global batch of `step`, read directly."""
    return source.get(batch_indices(step, BATCH, len(source), SEED))


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a global batch array, in order."""
    shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    return np.concatenate([np.asarray(shard.data) for shard in shards])


def load(source, sharding, workers: int, start: int, transform=None) -> tuple[list[int], dict, slice]:
    """(the steps yielded, {(step, field): this process's rows}, the rows) of steps start .. STEPS - 1."""
    loader = BatchLoader(Jittery(source), BATCH, SEED, sharding, start_step=start, transform=transform,
                         workers=workers)
    steps, rows = [], {}
    try:
        for _ in range(start, STEPS):
            step, batch = next(loader)
            steps.append(step)
            rows.update({(step, name): local_rows(array) for name, array in batch.items()})
    finally:
        loader.close()
    return steps, rows, loader.rows


def test_parallel_loading_yields_the_serial_batches_and_resumes(pack):
    source = RecordIOSource(pack)
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), PartitionSpec("data"))
    flip = lambda batch: {**batch, "image": batch["image"][:, :, ::-1]}   # noqa: E731  (a transform)
    serial_steps, serial, _ = load(source, sharding, 1, 0, flip)
    assert serial_steps == list(range(STEPS))
    for step in range(STEPS):
        want = flip(expected(source, step))
        for name in ("image", "label"):
            np.testing.assert_array_equal(serial[step, name], want[name])
            assert serial[step, name].dtype == want[name].dtype
    for workers, start in ((2, 0), (5, 0), (3, 7), (4, STEPS - 1)):
        steps, rows, _ = load(source, sharding, workers, start, flip)
        assert steps == list(range(start, STEPS)), (workers, start)
        assert rows.keys() == {key for key in serial if key[0] >= start}
        for key, value in rows.items():
            np.testing.assert_array_equal(value, serial[key], err_msg=f"workers={workers}, start={start}, {key}")


def test_a_failed_load_surfaces_after_the_batches_before_it(pack):
    class Failing(RecordIOSource):
        bad = int(batch_indices(3, BATCH, EXAMPLES, SEED)[0])   # in step 3's batch, not in steps 0-2's

        def get(self, indices):
            if self.bad in [int(i) for i in indices]:
                raise ValueError("unreadable example")
            return super().get(indices)

    sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), PartitionSpec("data"))
    loader = BatchLoader(Failing(pack), BATCH, SEED, sharding, workers=4)
    try:
        assert [next(loader)[0] for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="unreadable example"):
            next(loader)
    finally:
        loader.close()


def test_loading_workers():
    assert loading_workers(3) == 3
    assert 1 <= loading_workers(0) <= 16
    with pytest.raises(ValueError, match="data.workers"):
        loading_workers(-1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_main(pack: str, out: str) -> None:
    """One of two hosts: every run of RUNS over a 4-device mesh (2 devices here), saved to `out`."""
    from f2d_jax.train.launch import initialize_distributed

    initialize_distributed()
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    saved = {}
    for workers, start in RUNS:
        steps, rows, mine = load(RecordIOSource(pack), sharding, workers, start)
        saved[f"{workers}/{start}/steps"] = np.array(steps)
        saved[f"{workers}/{start}/rows"] = np.array([mine.start, mine.stop])
        saved.update({f"{workers}/{start}/{step}/{name}": value for (step, name), value in rows.items()})
    np.savez(out, **saved)


@pytest.mark.slow
def test_two_hosts_each_load_their_rows_in_parallel(pack, tmp_path):
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, __file__, str(pack), str(tmp_path / f"host{i}.npz")], cwd=ROOT,
                              env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    hosts = [np.load(tmp_path / f"host{i}.npz") for i in range(2)]
    source = RecordIOSource(pack)
    for workers, start in RUNS:
        run = f"{workers}/{start}"
        rows = [slice(*host[f"{run}/rows"]) for host in hosts]
        assert (rows[0].start, rows[0].stop, rows[1].start, rows[1].stop) == (0, BATCH // 2, BATCH // 2, BATCH)
        for host, mine in zip(hosts, rows):
            assert host[f"{run}/steps"].tolist() == list(range(start, STEPS))
            for step in range(start, STEPS):
                want = expected(source, step)
                for name in ("image", "label"):
                    np.testing.assert_array_equal(host[f"{run}/{step}/{name}"], want[name][mine],
                                                  err_msg=f"{run}, step {step}, {name}, rows {mine}")


if __name__ == "__main__":
    host_main(*sys.argv[1:])
