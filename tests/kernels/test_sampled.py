"""Sampled dot products and weighted scatter-adds: Numba / CuPy against NumPy references."""

import numpy as np
import pytest

from cryonb.kernels import (
    sampled_dot,
    sampled_dot_reference,
    scatter_products,
    scatter_products_reference,
)


def _data(seed=0, nu=30, nv=20, D=70, n=500, M=12):
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(nu, D)).astype(np.float32)
    V = rng.normal(size=(nv, D)).astype(np.float32)
    iu, iv = rng.integers(0, nu, n), rng.integers(0, nv, n)
    iacc, w = rng.integers(0, M, n), rng.random(n).astype(np.float32)
    return U, V, iu, iv, iacc, w, M


def test_sampled_dot_cpu():
    U, V, iu, iv, *_ = _data()
    np.testing.assert_allclose(sampled_dot(U, V, iu, iv), sampled_dot_reference(U, V, iu, iv),
                               rtol=1e-4, atol=1e-4)
    assert sampled_dot(U, V, iu[:0], iv[:0]).shape == (0,)


@pytest.mark.parametrize("ts, ps", [(4, 2), (1, 2), (3, 1), (9, 2)])
def test_sampled_dot_blocks_are_the_expanded_products(xp, ts, ps):
    """Blocks of ts x ps products equal, bit for bit, the per-sample products of the expanded
    rows on the same backend (the GPU kernel sums each product in sampled_dot's order; 9 x 2
    exceeds the GPU's block registers and takes the per-sample kernel)."""
    from cryonb.kernels import sampled_dot_blocks

    rng = np.random.default_rng(ts * 10 + ps)
    D, nu, nv, n = 70, 13, 11, 300
    U = xp.asarray(rng.normal(size=(nu * ts, D)).astype(np.float32))
    V = xp.asarray(rng.normal(size=(nv * ps, D)).astype(np.float32))
    iu, iv = xp.asarray(rng.integers(0, nu, n)), xp.asarray(rng.integers(0, nv, n))
    got = sampled_dot_blocks(U, V, iu, iv, ts, ps)
    assert got.shape == (n, ps, ts) and got.dtype == np.float32
    rows_u = iu[:, None, None] * ts + xp.arange(ts)[None, None, :]
    rows_v = iv[:, None, None] * ps + xp.arange(ps)[None, :, None]
    shape = (n, ps, ts)
    want = sampled_dot(U, V, xp.broadcast_to(rows_u, shape).reshape(-1),
                       xp.broadcast_to(rows_v, shape).reshape(-1)).reshape(shape)
    host = [a.get() if hasattr(a, "get") else a for a in (got, want, U, V, iu, iv)]
    assert np.array_equal(host[0], host[1])
    Uh, Vh, iuh, ivh = host[2:]
    np.testing.assert_allclose(host[0][:, 1 % ps, ts - 1], sampled_dot_reference(
        Uh, Vh, iuh * ts + ts - 1, ivh * ps + 1 % ps), rtol=1e-4, atol=1e-4)
    assert sampled_dot_blocks(U, V, iu[:0], iv[:0], ts, ps).shape == (0, ps, ts)
    with pytest.raises(ValueError, match="ts=0"):
        sampled_dot_blocks(U, V, iu, iv, 0, ps)


@pytest.mark.parametrize("with_v", [True, False])
def test_scatter_products_cpu(with_v):
    U, V, iu, iv, iacc, w, M = _data(1)
    a = np.zeros((M, U.shape[1]))
    b = np.zeros((M, U.shape[1]))
    scatter_products(a, U, V if with_v else None, iu, iv, iacc, w)
    scatter_products_reference(b, U, V if with_v else None, iu, iv, iacc, w)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_keys", [1, 700, 1 << 16, (1 << 16) + 5, 1 << 35])
def test_stable_order_is_the_stable_argsort(n_keys):
    """The 16-bit radix passes give NumPy's stable argsort for keys of any range."""
    from cryonb.kernels._sampled import _stable_order

    rng = np.random.default_rng(n_keys % 1000)
    keys = rng.integers(0, n_keys, 5000)
    keys[:50] = n_keys - 1
    assert np.array_equal(_stable_order(keys, n_keys), np.argsort(keys, kind="stable"))


def test_scatter_is_deterministic():
    U, V, iu, iv, iacc, w, M = _data(2, n=5000)
    a = np.zeros((M, U.shape[1]))
    b = np.zeros((M, U.shape[1]))
    scatter_products(a, U, V, iu, iv, iacc, w)
    scatter_products(b, U, V, iu, iv, iacc, w)
    assert np.array_equal(a, b)


@pytest.mark.gpu
# each method, and the default choice (by samples per row)
@pytest.mark.parametrize("method", ["sparse", "atomic", "rows", None])
def test_gpu_kernels_match_reference(method):
    import cupy

    U, V, iu, iv, iacc, w, M = _data(3)
    d = sampled_dot(cupy.asarray(U), cupy.asarray(V), cupy.asarray(iu), cupy.asarray(iv))
    np.testing.assert_allclose(d.get(), sampled_dot_reference(U, V, iu, iv), rtol=1e-4,
                               atol=1e-4)
    for with_v in (True, False):
        a = cupy.zeros((M, U.shape[1]))
        scatter_products(a, cupy.asarray(U), cupy.asarray(V) if with_v else None,
                         cupy.asarray(iu), cupy.asarray(iv), cupy.asarray(iacc), cupy.asarray(w),
                         method)
        b = np.zeros((M, U.shape[1]))
        scatter_products_reference(b, U, V if with_v else None, iu, iv, iacc, w)
        np.testing.assert_allclose(a.get(), b, rtol=1e-5, atol=1e-5)
    # as the E-step uses it: each row of U belongs to one target row (sparse products)
    owner = np.random.default_rng(4).integers(0, M, U.shape[0])
    for with_v in (True, False):
        a = cupy.zeros((M, U.shape[1]))
        scatter_products(a, cupy.asarray(U), cupy.asarray(V) if with_v else None,
                         cupy.asarray(iu), cupy.asarray(iv), cupy.asarray(owner[iu]),
                         cupy.asarray(w), method)
        b = np.zeros((M, U.shape[1]))
        scatter_products_reference(b, U, V if with_v else None, iu, iv, owner[iu], w)
        tol = 1e-9 if method == "sparse" else 1e-5  # float64 products / float32 products
        np.testing.assert_allclose(a.get(), b, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [64, 4096])
def test_gpu_row_sums_split_crowded_rows(monkeypatch, chunk):
    """The GPU scatter-add with samples grouped by row: a crowded row split into chunks
    (64 samples each) and rows in one chunk both give the reference; without split rows the
    result has the same bits every time; rows no sample hits keep their values."""
    import cupy

    from cryonb.kernels import _sampled

    monkeypatch.setattr(_sampled, "ROW_CHUNK", chunk)
    U, V, iu, iv, iacc, w, M = _data(7, n=6000, M=40)
    iacc[iacc == 5] = 6  # a row no sample hits
    iacc[:3000] = 3  # a crowded row
    for with_v in (True, False):
        start = np.random.default_rng(1).normal(size=(M, U.shape[1]))
        got = []
        for _ in range(2):
            a = cupy.asarray(start)
            scatter_products(a, cupy.asarray(U), cupy.asarray(V) if with_v else None,
                             cupy.asarray(iu), cupy.asarray(iv), cupy.asarray(iacc),
                             cupy.asarray(w), "rows")
            got.append(a.get())
        b = start.copy()
        scatter_products_reference(b, U, V if with_v else None, iu, iv, iacc, w)
        tol = 1e-5 if with_v else 1e-9  # float32 products / exact ones
        np.testing.assert_allclose(got[0], b, rtol=tol, atol=tol)
        assert np.array_equal(got[0][5], start[5])
        if chunk == 4096:
            assert np.array_equal(got[0], got[1])


@pytest.mark.gpu
def test_gpu_atomic_sums_merge_runs_of_one_row():
    """The atomic adds sum each run of consecutive samples with one target row first: runs
    of 1 to 70 samples (shorter and longer than a block's SP_CHUNK, across block ends, the
    same row again after another) give the reference."""
    import cupy

    from cryonb.kernels import _sampled

    rng = np.random.default_rng(11)
    U, V, *_ = _data(8)
    M = 9
    lengths = rng.integers(1, 71, 60)
    iacc = np.repeat(rng.integers(0, M, lengths.shape[0]), lengths)
    n = iacc.shape[0]
    assert n % _sampled.SP_CHUNK and lengths.max() > _sampled.SP_CHUNK
    iu, iv = rng.integers(0, U.shape[0], n), rng.integers(0, V.shape[0], n)
    w = rng.random(n).astype(np.float32)
    for with_v in (True, False):
        a = cupy.zeros((M, U.shape[1]))
        scatter_products(a, cupy.asarray(U), cupy.asarray(V) if with_v else None,
                         cupy.asarray(iu), cupy.asarray(iv), cupy.asarray(iacc),
                         cupy.asarray(w), "atomic")
        b = np.zeros((M, U.shape[1]))
        scatter_products_reference(b, U, V if with_v else None, iu, iv, iacc, w)
        tol = 1e-5 if with_v else 1e-9  # float32 products / exact ones
        np.testing.assert_allclose(a.get(), b, rtol=tol, atol=tol)


def test_scatter_method_rule_and_bad_names():
    """Grouping by row from ROWS_FROM samples per row, atomic adds below; a forced method
    wins; an unknown one is refused by name."""
    from cryonb.kernels import _sampled

    rows = 100
    assert _sampled._scatter_method(_sampled.ROWS_FROM * rows, rows) == "rows"
    assert _sampled._scatter_method(_sampled.ROWS_FROM * rows - 1, rows) == "atomic"
    assert _sampled._scatter_method(10, rows, "sparse") == "sparse"
    with pytest.raises(ValueError, match="'dense'"):
        _sampled._scatter_method(10, rows, "dense")


@pytest.mark.parametrize("ts, ps", [(4, 2), (1, 2), (3, 3)])
def test_residual_sums_blocks_follow_the_reference(xp, ts, ps):
    """Blocks of ts x ps samples (about half of their weights zero, one segment empty) give
    the float64 reference's sums over their samples to float32 rounding of each block, and
    the GPU the CPU's bits."""
    from cryonb.kernels import residual_sums_blocks, residual_sums_reference, segment_starts

    rng = np.random.default_rng(ts + 7 * ps)
    P, nx, na, n, G = 35, 15, 9, 400, 30
    X = rng.normal(size=(nx * ts, 2 * P)).astype(np.float32)
    A = rng.normal(size=(na * ps, 2 * P)).astype(np.float32)
    iu, iv = rng.integers(0, nx, n), rng.integers(0, na, n)
    seg = np.sort(rng.integers(0, G, n))
    seg[seg == 4] = 5
    w = (rng.random((n, ps, ts)) * (rng.random((n, ps, ts)) < 0.5)).astype(np.float32)
    starts = segment_starts(seg, G)
    data = (X, A, iu, iv, ts, ps, starts, w)
    got = residual_sums_blocks(*(xp.asarray(a) if isinstance(a, np.ndarray) else a
                                 for a in data))
    host = [a.get() if hasattr(a, "get") else a for a in got]
    blk, qt = np.divmod(np.arange(n * ps * ts), ps * ts)
    want = residual_sums_reference(X, A, iu[blk] * ts + qt % ts, iv[blk] * ps + qt // ts,
                                   segment_starts(seg[blk], G), w.reshape(-1))
    for g, r in zip(host, want):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5 * np.abs(r).max())
        assert np.all(g[4] == 0.0)
    if xp is not np:
        cpu = residual_sums_blocks(*data)
        assert all(np.array_equal(a, b) for a, b in zip(host, cpu))


@pytest.mark.parametrize("runs", [False, True], ids=["any order", "runs of one row"])
@pytest.mark.parametrize("one_row", [False, True])
def test_scatter_blocks_add_the_weighted_samples(xp, one_row, runs):
    """Blocks of 4 x 2 samples (about half of their weights zero) add what scatter_products
    adds for their samples of non-zero weight: on the CPU the same bits, on the GPU (a
    block's terms in float32, a run of blocks with one target row summed, atomic adds) to
    float32 rounding. Runs of
    2-108 blocks, across the GPU's chunks of 32 blocks."""
    from cryonb.kernels import scatter_blocks

    rng = np.random.default_rng(11 + one_row)
    ts, ps, D, nu, M, n = 4, 2, 70, 12, 9, 300
    U = rng.normal(size=(nu if one_row else nu * ts, D)).astype(np.float32)
    iu, iv = rng.integers(0, nu, n), rng.integers(0, M, n)
    if runs:
        iv = np.repeat(np.arange(M), np.diff(np.r_[0, np.sort(rng.choice(n - 1, M - 1,
                                                                        replace=False) + 1), n]))
    w = (rng.random((n, ps, ts)) * (rng.random((n, ps, ts)) < 0.5)).astype(np.float32)
    got = xp.zeros((M * ps, D))
    scatter_blocks(got, xp.asarray(U), xp.asarray(iu), xp.asarray(iv), ts, ps, xp.asarray(w),
                   one_row=one_row)
    keep = np.flatnonzero(w.reshape(-1) != 0)
    blk, qt = np.divmod(keep, ps * ts)
    rows = iu[blk] if one_row else iu[blk] * ts + qt % ts
    want = np.zeros((M * ps, D))
    scatter_products(want, U, None, rows, rows, iv[blk] * ps + qt // ts, w.reshape(-1)[keep])
    host = got.get() if hasattr(got, "get") else got
    if xp is np:
        assert np.array_equal(host, want)
    else:
        # a block's terms of one target row are summed in float32 first
        np.testing.assert_allclose(host, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    with pytest.raises(ValueError, match="acc has rows of 70 values and U of 69"):
        scatter_blocks(xp.zeros((M * ps, D)), xp.asarray(U[:, :69]), xp.asarray(iu),
                       xp.asarray(iv), ts, ps, xp.asarray(w), one_row=one_row)


@pytest.mark.parametrize("runs", [False, True], ids=["any order", "runs of one row"])
def test_scatter_blocks_residual_gives_the_three_sums(xp, runs):
    """The data and weights' sums of scatter_blocks and, over the same samples,
    residual_sums_blocks of the same rows: on the CPU the three functions' bits, on the GPU
    (one kernel, the residual from each run's sums) to float32 rounding. Segments of 1-60
    blocks, one empty, runs of one target row across segment and chunk ends."""
    from cryonb.kernels import (
        residual_sums_blocks,
        scatter_blocks,
        scatter_blocks_residual,
        segment_starts,
    )

    rng = np.random.default_rng(5 + runs)
    ts, ps, D, nu, M, n, G = 4, 2, 70, 40, 9, 400, 12
    U = rng.normal(size=(nu * ts, D)).astype(np.float32)
    A = rng.normal(size=(M * ps, D)).astype(np.float32)
    C = rng.random((G, D // 2)).astype(np.float32)
    iu, iv = rng.integers(0, nu, n), rng.integers(0, M, n)
    ib = np.sort(rng.choice(np.r_[0:4, 5:G], n))  # segment 4 empty
    if runs:  # (segment, target row) order: runs of one row within a segment
        order = np.lexsort((iv, ib))
        iu, iv, ib = iu[order], iv[order], ib[order]
    w = (rng.random((n, ps, ts)) * (rng.random((n, ps, ts)) < 0.5)).astype(np.float32)
    got, got_w = xp.zeros((M * ps, D)), xp.zeros((M * ps, D // 2))
    q, a2 = scatter_blocks_residual(got, xp.asarray(U), xp.asarray(A), got_w, xp.asarray(C),
                                    xp.asarray(iu), xp.asarray(iv), xp.asarray(ib), ts, ps,
                                    xp.asarray(w), G)
    want, want_w = np.zeros((M * ps, D)), np.zeros((M * ps, D // 2))
    scatter_blocks(want, U, iu, iv, ts, ps, w)
    scatter_blocks(want_w, C, ib, iv, ts, ps, w, one_row=True)
    wq, wa2 = residual_sums_blocks(U, A, iu, iv, ts, ps, segment_starts(ib, G), w)
    host = [x.get() if hasattr(x, "get") else x for x in (got, got_w, q, a2)]
    assert host[2].shape == host[3].shape == (G, D // 2)
    for h, want_h in zip(host, (want, want_w, wq, wa2)):
        if xp is np:
            assert np.array_equal(h, want_h)
        else:
            np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-6 * np.abs(want_h).max())
    assert not host[2][4].any() and not host[3][4].any()
    with pytest.raises(ValueError, match="need 2P"):
        scatter_blocks_residual(got, xp.asarray(U), xp.asarray(A[:, :68]), got_w,
                                xp.asarray(C), xp.asarray(iu), xp.asarray(iv),
                                xp.asarray(ib), ts, ps, xp.asarray(w), G)


def test_residual_sums_need_matching_rows():
    """Rows of X and A of different widths are refused with both widths named."""
    from cryonb.kernels import residual_sums_blocks

    X = np.zeros((8, 70), np.float32)
    A = np.zeros((4, 68), np.float32)
    with pytest.raises(ValueError, match=r"X has rows of 70 values and A of 68"):
        residual_sums_blocks(X, A, [0], [0], 4, 2, np.array([0, 1]), np.ones((1, 2, 4)))


def _shifted_case(seed, ts=4, ps=2, P=35, B=9, T=5, M=7, n=300):
    """Images, phases, weights and blocks of the second pass's shape: blocks in (image,
    target row) order, as the E-step's GPU path orders them."""
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(B, P)) + 1j * rng.normal(size=(B, P))).astype(np.complex64)
    ph = np.exp(1j * rng.uniform(0, 2 * np.pi, (T * ts, P))).astype(np.complex64)
    W = rng.random((B, P)).astype(np.float32)
    ib = np.sort(rng.choice(np.r_[0:3, 4:B], n))  # image 3 has no blocks
    it, iv = rng.integers(0, T, n), rng.integers(0, M, n)
    order = np.lexsort((it, iv, ib))
    A = rng.normal(size=(M * ps, 2 * P)).astype(np.float32)
    w = (rng.random((n, ps, ts)) * (rng.random((n, ps, ts)) < 0.6)).astype(np.float32)
    C = rng.random((B, P)).astype(np.float32)
    return X, ph, W, ib[order], it[order], iv[order], A, w, C


def _rows(X, ph, W, ib, it, ts):
    """Each block's ts shifted rows written out (n * ts, 2P), in block order (by the CPU's
    kernel)."""
    from cryonb.kernels import shifted_images_ri

    rb = np.repeat(ib, ts)
    rt = (it[:, None] * ts + np.arange(ts)[None]).reshape(-1)
    return shifted_images_ri(X, ph, W, rb, rt)


def test_shifted_blocks_dot_products_are_those_of_the_written_rows(xp):
    """shifted_dot_blocks: the products of each block's shifted rows with its reference
    rows; on the CPU the written rows' sampled_dot_blocks bit for bit, on the GPU (rows made
    in the kernel) to float32 rounding. A block too large for the GPU's kernels writes its
    rows there too; a subset of blocks (take) keeps its rows."""
    from cryonb.kernels import sampled_dot_blocks, shifted_blocks, shifted_dot_blocks
    from cryonb.kernels._sampled import BLOCK_MAX

    ts, ps = 4, 2
    X, ph, W, ib, it, iv, A, *_ = _shifted_case(3, ts, ps)
    n = ib.size
    S = shifted_blocks(*(xp.asarray(a) for a in (X, ph, W, ib, it)), ts, ps)
    assert (S.Y is None) == (xp is not np)
    got = shifted_dot_blocks(S, xp.asarray(A), xp.asarray(iv), ps)
    got = got.get() if hasattr(got, "get") else got
    U = _rows(X, ph, W, ib, it, ts)
    want = sampled_dot_blocks(U, A, np.arange(n), iv, ts, ps)
    assert got.shape == (n, ps, ts) and got.dtype == np.float32
    if xp is np:
        assert np.array_equal(got, want)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    sel = np.arange(0, n, 3)
    part = shifted_dot_blocks(S.take(xp.asarray(sel)), xp.asarray(A), xp.asarray(iv[sel]), ps)
    np.testing.assert_array_equal(part.get() if hasattr(part, "get") else part, got[sel])
    big = shifted_blocks(*(xp.asarray(a) for a in (X, ph, W, ib, it)), ts, BLOCK_MAX)
    assert big.Y is not None  # ts x ps > BLOCK_MAX: the rows are written on both backends
    with pytest.raises(ValueError, match="2P = 70"):
        shifted_dot_blocks(S, xp.asarray(A[:, :68]), xp.asarray(iv), ps)
    assert shifted_dot_blocks(S.take(xp.asarray(sel[:0])), xp.asarray(A),
                              xp.asarray(iv[:0]), ps).shape == (0, ps, ts)


@pytest.mark.parametrize("B", [9, 300])
def test_scatter_shifted_residual_gives_the_written_rows_sums(xp, B):
    """scatter_shifted_residual: the data, weights' and residual sums of
    scatter_blocks_residual over each block's shifted rows (CPU: its bits; GPU, rows made in
    the kernel: to float32 rounding), runs of one target row across chunk ends, an image
    without blocks giving zeros. B = 9: every image's blocks span chunks of the GPU kernel
    (its per-image sums added); B = 300: most images' blocks lie in one chunk (written)."""
    from cryonb.kernels import scatter_blocks_residual, scatter_shifted_residual, shifted_blocks

    ts, ps = 4, 2
    X, ph, W, ib, it, iv, A, w, C = _shifted_case(4, ts, ps, B=B, n=400)
    B, P = X.shape
    M = A.shape[0]
    S = shifted_blocks(*(xp.asarray(a) for a in (X, ph, W, ib, it)), ts, ps)
    got, got_w = xp.zeros((M, 2 * P)), xp.zeros((M, P))
    q, a2 = scatter_shifted_residual(got, S, xp.asarray(A), got_w, xp.asarray(C),
                                     xp.asarray(iv), ps, xp.asarray(w), B)
    want, want_w = np.zeros((M, 2 * P)), np.zeros((M, P))
    U = _rows(X, ph, W, ib, it, ts)
    wq, wa2 = scatter_blocks_residual(want, U, A, want_w, C, np.arange(ib.size), iv, ib, ts,
                                      ps, w, B)
    host = [x.get() if hasattr(x, "get") else x for x in (got, got_w, q, a2)]
    for h, want_h in zip(host, (want, want_w, wq, wa2)):
        if xp is np:
            assert np.array_equal(h, want_h)
        np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-6 * np.abs(want_h).max())
    assert not host[2][3].any() and not host[3][3].any()
    with pytest.raises(ValueError, match="need 2P = 70 and P"):
        scatter_shifted_residual(got, S, xp.asarray(A), got_w, xp.asarray(C[:, :30]),
                                 xp.asarray(iv), ps, xp.asarray(w), B)
