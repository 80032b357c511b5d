"""Images kept on the device between iterations (cryonb.parallel.resident, the GPU worker)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from parallel_cases import tiny_config

from cryonb.parallel.images import TableSource
from cryonb.parallel.resident import (
    MAX_FRACTION,
    RESERVE_BYTES,
    PoolRows,
    ResidentImages,
    StoredRows,
    resident_capacity,
    resident_enabled,
)

GB = 10**9


def test_capacity_leaves_a_reserve_and_shares_the_card():
    """Free memory less the reserve (a quarter of the card, at least 2 GiB), at most half the
    card, divided among the ranks on the card; never more than the run's particles."""
    row = 4 * 128 * 128
    # 80 GB card, 70 GB free: 70 - 20 = 50 > 40 (half the card): 40 GB
    assert resident_capacity(10**7, 128, 70 * GB, 80 * GB) == int(40 * GB // row)
    # 30 GB free: 30 - 20 = 10 GB; two ranks on the card: 5 GB each
    assert resident_capacity(10**7, 128, 30 * GB, 80 * GB) == int(10 * GB // row)
    assert resident_capacity(10**7, 128, 30 * GB, 80 * GB, share=0.5) == int(5 * GB // row)
    # a small card keeps at least RESERVE_BYTES free
    assert resident_capacity(10**7, 128, 4 * GB, 6 * GB) == int((4 * GB - RESERVE_BYTES)
                                                               // row)
    # nothing free beyond the reserve, or a share of nothing: no store
    assert resident_capacity(10**7, 128, 15 * GB, 80 * GB) == 0
    assert resident_capacity(10**7, 128, 70 * GB, 80 * GB, share=0.0) == 0
    # the run's particles bound it
    assert resident_capacity(8000, 128, 70 * GB, 80 * GB) == 8000
    assert MAX_FRACTION * 80 * GB // row >= resident_capacity(10**9, 128, 80 * GB, 80 * GB)


def test_enabled_unless_switched_off(monkeypatch):
    monkeypatch.delenv("CRYONB_RESIDENT_IMAGES", raising=False)
    assert resident_enabled()
    for off in ("0", "off", "False", " no "):
        monkeypatch.setenv("CRYONB_RESIDENT_IMAGES", off)
        assert not resident_enabled()
    monkeypatch.setenv("CRYONB_RESIDENT_IMAGES", "1")
    assert resident_enabled()


def _images(n, box=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)


def test_store_fills_up_to_its_capacity_and_gives_pools_back():
    """Particles are stored as pools pass, up to the capacity, each once; a pool comes back
    as the same images whether stored, read, or partly both."""
    imgs = _images(20)
    st = ResidentImages(20, 4, capacity=6, xp=np)
    assert st.nbytes == 0 and st.count == 0
    first = np.array([3, 1, 7, 9])
    assert st.add(first, imgs[first]) == 4
    assert st.nbytes == 6 * 4 * 4 * 4 and st.count == 4
    assert st.add(first, imgs[first]) == 0  # already there
    second = np.array([9, 12, 0, 5])
    assert st.add(second, imgs[second]) == 2  # 9 is there; room for two more: 12 and 0
    assert st.count == 6
    np.testing.assert_array_equal(st.missing([5, 12, 3, 19, 0]), [True, False, False, True,
                                                                   False])
    # every image stored
    pool = np.array([0, 7, 12, 1])
    got = st.assemble(PoolRows(pool, np.zeros(4, bool)))
    np.testing.assert_array_equal(got, imgs[pool])
    # some read from the source (in pool order); the store is full, so they stay missing
    pool = np.array([5, 3, 19, 9])
    miss = st.missing(pool)
    got = st.assemble(PoolRows(pool, miss, imgs[pool[miss]]))
    np.testing.assert_array_equal(got, imgs[pool])
    assert st.count == 6
    st.release()
    assert st.nbytes == 0 and st.count == 0 and st.missing(pool).all()


def test_a_stored_pool_is_read_in_place():
    """A pool whose every image is stored comes as StoredRows: the store and the pool's
    rows of it (sliced as a pool is split), gathered when asked for."""
    imgs = _images(10, seed=2)
    st = ResidentImages(10, 4, capacity=10, xp=np)
    st.add(np.arange(10), imgs)
    got = st.assemble(PoolRows(np.array([4, 1, 7]), np.zeros(3, bool)))
    assert isinstance(got, StoredRows) and len(got) == 3 and got.shape == (3, 4, 4)
    np.testing.assert_array_equal(got.store[got.slots], imgs[[4, 1, 7]])
    np.testing.assert_array_equal(got.gather(), imgs[[4, 1, 7]])
    np.testing.assert_array_equal(np.asarray(got[1:]), imgs[[1, 7]])


def test_partly_stored_pools_store_what_they_read():
    imgs = _images(10, seed=1)
    st = ResidentImages(10, 4, capacity=10, xp=np)
    st.add(np.array([2, 4]), imgs[[2, 4]])
    pool = np.array([4, 8, 2, 6])
    miss = st.missing(pool)
    np.testing.assert_array_equal(miss, [False, True, False, True])
    np.testing.assert_array_equal(st.assemble(PoolRows(pool, miss, imgs[[8, 6]])), imgs[pool])
    assert not st.missing(pool).any()
    # a reader that claims a particle is stored when it is not is a bug, not a wrong image
    with pytest.raises(RuntimeError, match="not stored"):
        st.assemble(PoolRows(np.array([0, 2]), np.array([False, False])))


class _CountingSource(TableSource):
    def __init__(self, table):
        super().__init__(table)
        self.asked: list = []

    def images(self, rows, out=None):
        self.asked.append(np.asarray(rows).tolist())
        return super().images(rows, out=out)


@pytest.fixture(scope="module")
def table(tiny_set):
    from cryonb.io import read_particles

    return read_particles(tiny_set)


def test_worker_reader_reads_only_what_the_device_lacks(table):
    """With a store on each of the rank's devices, the reader of an E-step pool reads only
    the particles some device lacks; the initial pass, and a device without a store (yet),
    read the whole pool."""
    from cryonb.em import Class2DConfig
    from cryonb.parallel._worker import WorkerService

    src = _CountingSource(table)
    w = WorkerService(rank=1, config=Class2DConfig(i="x", o="y"),
                      setup={"N": table.box, "n": table.n}, threads=1, source=src)
    w.close()  # its threads are gone: the test calls the reader itself
    rows = np.array([10, 3, 77, 140, 52])
    w.devices, w._use_resident = [0, 1], True
    w._phase = ("estep", None, 2)
    st0, st1 = (ResidentImages(table.n, table.box, 100, np) for _ in range(2))
    st0.add(rows[:3], table.images(rows[:3]))
    st1.add(rows[1:4], table.images(rows[1:4]))
    # a device without a store yet: the whole pool
    w._resident = {0: st0}
    got = w._images({"index": rows})
    assert isinstance(got, np.ndarray) and src.asked[-1] == rows.tolist()
    # both stores: only what one of them lacks (10 on device 1, 140 on 0, 52 on both)
    w._resident = {0: st0, 1: st1}
    got = w._images({"index": rows})
    assert isinstance(got, PoolRows)
    np.testing.assert_array_equal(got.missing, [True, False, False, True, True])
    assert src.asked[-1] == [10, 140, 52]
    np.testing.assert_array_equal(got.host, table.images(rows[[0, 3, 4]]))
    # everything stored: nothing read
    n_asked = len(src.asked)
    got = w._images({"index": rows[1:3]})
    assert isinstance(got, PoolRows) and got.host is None and len(src.asked) == n_asked
    # the initial pass reads images on the host, whatever is stored
    w._phase = ("init", None, 0)
    assert isinstance(w._images({"index": rows[1:3]}), np.ndarray)
    # a device whose store could not be made (None): read everything
    w._phase = ("estep", None, 3)
    w._resident = {0: st0, 1: None}
    assert isinstance(w._images({"index": rows[1:3]}), np.ndarray)
    # switched off
    w._resident = {0: st0, 1: st1}
    w._use_resident = False
    assert isinstance(w._images({"index": rows[1:3]}), np.ndarray)


def test_ranks_sharing_a_card_share_its_room():
    from cryonb.parallel.runtime import _resident_shares

    def rank(r, host, devices):
        return SimpleNamespace(rank=r, info=SimpleNamespace(host=host, devices=devices))

    ws = [rank(1, "a", [0]), rank(2, "a", [0]), rank(3, "a", [1, 1]), rank(4, "b", [0]),
          rank(5, "a", None)]
    assert _resident_shares(ws) == {1: 0.5, 2: 0.5, 3: 1.0, 4: 1.0}


@pytest.mark.gpu
def test_gpu_run_with_stored_images_is_the_same_run(tiny_set, tmp_path, monkeypatch):
    """A GPU run that keeps its images on the device writes the very files of one that reads
    them every iteration (one thread, and two threads sharing the store); it reports the
    particles it did not read and gives the memory back at the end."""
    import cupy

    from cryonb.backend import gpu_available
    from cryonb.io import read_mrc, read_particles
    from cryonb.parallel import run_class2d

    if not gpu_available():
        pytest.skip("no usable GPU (CuPy)")
    runs = {}
    for name, env, j in (("read", "0", 1), ("stored", "1", 1), ("stored2", "1", 2)):
        monkeypatch.setenv("CRYONB_RESIDENT_IMAGES", env)
        cfg = tiny_config(tiny_set, tmp_path / name, iter=4, pool=40, gpu="", cpu=False, j=j)
        runs[name] = run_class2d(cfg)
        assert cupy.get_default_memory_pool().total_bytes() < 64 << 20
    stored = {name: sum(t.stored for t in r.stats.rank_totals().values())
              for name, r in runs.items()}
    assert stored["read"] == 0
    n = 150
    # iteration 1 reads every particle; iterations 2-4 read none
    assert stored["stored"] == 3 * n and stored["stored2"] == 3 * n
    assert "on device" in runs["stored"].stats.table()
    want = read_particles(runs["read"].files["data"]).particles
    got = read_particles(runs["stored"].files["data"]).particles
    for col in ("rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnMaxValueProbDistribution"):
        np.testing.assert_array_equal(got[col], want[col])
    np.testing.assert_array_equal(read_mrc(runs["stored"].classes).data,
                                  read_mrc(runs["read"].classes).data)
    # two threads add their pools' sums in another order: the threads' tolerance
    got = read_particles(runs["stored2"].files["data"]).particles
    assert np.mean(got["rlnClassNumber"].to_numpy() == want["rlnClassNumber"].to_numpy()) >= 0.99
    for a, b in zip(read_mrc(runs["stored2"].classes).data, read_mrc(runs["read"].classes).data):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.99


@pytest.mark.gpu
def test_gpu_automatic_pool_is_one_pool_once_images_are_stored(tiny_set, tmp_path):
    """With the automatic pool a GPU rank computes two pools per E-step while it reads
    images, one once it found every image stored (iteration 3 on: iteration 2 is the first
    read from the store); the run is the one of a fixed pool up to the order of its sums."""
    from cryonb.backend import gpu_available
    from cryonb.io import read_particles
    from cryonb.parallel import run_class2d

    if not gpu_available():
        pytest.skip("no usable GPU (CuPy)")
    fixed = run_class2d(tiny_config(tiny_set, tmp_path / "fixed", iter=4, pool=75, gpu="",
                                    cpu=False))
    auto = run_class2d(tiny_config(tiny_set, tmp_path / "auto", iter=4, pool=0, gpu="",
                                   cpu=False))
    pools = [sum(t.pools for t in s.ranks.values()) for s in auto.stats.iterations
             if "estep" in s.stages]
    assert pools == [2, 2, 1, 1]
    got, want = (read_particles(r.files["data"]).particles["rlnClassNumber"].to_numpy()
                 for r in (auto, fixed))
    assert np.mean(got == want) >= 0.99
