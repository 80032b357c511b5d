"""Class re-seeding: similarity of class images, which classes are free, the split test."""

from __future__ import annotations

import numpy as np
import pytest

from cryonb.backend import fft_batch
from cryonb.data.conventions import euler_to_matrix
from cryonb.em._reseed import (
    CROWDED_RATIO,
    HALF_RATIO,
    MERGE_RATIO,
    SPLIT_SEPARATION,
    _class_frame_pixels,
    _interp_halfplane,
    _principal_scores,
    class_similarity,
    find_free_classes,
    half_pairs,
    merge_candidates,
    merge_ratios,
    realign_class,
    split_accepted,
    split_class,
    split_classes,
)
from cryonb.fourier import (
    Projector,
    fft2_centered,
    ifft2_centered,
    rotate_2d,
    shift_2d,
    shift_phases_2d,
)
from cryonb.simulate import phantom_map, simulate_particles

N = 48


@pytest.fixture(scope="module")
def views():
    """Four projections of the phantom (distinct views), (4, N, N)."""
    proj = Projector(phantom_map(N).astype(np.float32))
    rots = euler_to_matrix(np.array([0.0, 70.0, 150.0, 250.0]), np.array([20.0, 60.0, 100.0,
                                                                           140.0]), 0.0)
    return np.stack([ifft2_centered(f, N) for f in proj.project(rots)]).astype(np.float32)


def _turned(img, psi, shift):
    """``img`` rotated by ``psi`` degrees and shifted by ``shift`` (x, y) pixels."""
    turned = rotate_2d(img, psi)
    return ifft2_centered(shift_2d(fft2_centered(turned), np.asarray(shift, float)),
                          N).astype(np.float32)


def test_a_turned_copy_is_a_duplicate_and_other_views_are_not(views):
    rng = np.random.default_rng(0)
    copy = _turned(views[0], 37.0, (1.3, -2.6))
    copy += rng.normal(0, 0.1 * copy.std(), copy.shape).astype(np.float32)
    classes = np.concatenate([views, copy[None]])
    sim = class_similarity(classes, n_psi=72, max_res_px=N // 4)
    np.testing.assert_allclose(sim, sim.T)
    np.testing.assert_allclose(np.diag(sim), 1.0)
    assert sim[0, 4] >= 0.95, sim[0, 4]
    # the phantom is one elongated body: its views look alike at low resolution (0.87-0.93
    # here, noise-free; noisy class averages of distinct ribosome views: 0.5-0.7), but less
    # alike than a turned copy
    others = sim[:4, :4][~np.eye(4, dtype=bool)]
    assert others.max() < sim[0, 4], sim
    # the sub-pixel shift search is what lifts the copy clear of the threshold
    coarse = class_similarity(classes, n_psi=72, max_res_px=N // 4, upsample=1)
    assert coarse[0, 4] <= sim[0, 4]


@pytest.fixture(scope="module")
def views_and_copy(views):
    rng = np.random.default_rng(0)
    copy = _turned(views[0], 37.0, (1.3, -2.6))
    copy += rng.normal(0, 0.1 * copy.std(), copy.shape).astype(np.float32)
    return np.concatenate([views, copy[None]])


def test_class_similarity_in_chunks(views_and_copy):
    """A few pairs at a time, in the whole-pixel and the sub-pixel search, give what one batch
    gives."""
    whole = class_similarity(views_and_copy, n_psi=72, max_res_px=N // 4)
    per = 3 * 72 * (N // 2 + 2) * (N // 4 + 2) * 16  # three pairs' products and transforms
    chunked = class_similarity(views_and_copy, n_psi=72, max_res_px=N // 4, chunk_bytes=per)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)


class _PaddedNumPy:
    """NumPy under another name: the code paths for a GPU module (batches padded to
    :func:`cryonb.backend.fft_batch`'s sizes, fixed-size chunks of transforms) run on the
    host."""

    def __getattr__(self, name):
        return getattr(np, name)


def test_fft_batch_sizes():
    xp = _PaddedNumPy()
    assert [fft_batch(n, np) for n in (1, 5, 9)] == [1, 5, 9]
    assert [fft_batch(n, xp) for n in (1, 2, 5, 8, 9)] == [1, 2, 8, 8, 16]
    assert fft_batch(5, xp, at_most=6) == 6 and fft_batch(7, xp, at_most=6) == 7


def test_padded_batches_give_what_the_host_gives(views_and_copy):
    """The GPU's zero-padded batches (the last chunk of pairs, the clusters' averages, the
    class-frame transforms) change no value: the similarities in chunks of three pairs and
    the split tests of three classes, against the host's unpadded ones."""
    per = 3 * 72 * (N // 2 + 2) * (N // 4 + 2) * 16
    for chunk in (None, per):
        want = class_similarity(views_and_copy, n_psi=72, max_res_px=N // 4, chunk_bytes=chunk)
        got = class_similarity(views_and_copy, n_psi=72, max_res_px=N // 4, chunk_bytes=chunk,
                               xp=_PaddedNumPy())
        np.testing.assert_allclose(got, want, rtol=1e-5)
    args = _three_classes()
    for (avg, labels, sep), (avg_p, labels_p, sep_p) in zip(
            _split_all(*args), _split_all(*args, xp=_PaddedNumPy())):
        assert (labels_p == labels).all() and sep_p == pytest.approx(sep, rel=1e-5)
        np.testing.assert_allclose(avg_p, avg, atol=1e-5 * np.abs(avg).max())


def _smooth_blobs(n: int, seed: int = 1) -> np.ndarray:
    """``n`` low-pass filtered noise images (unlike the phantom's views), (n, N, N)."""
    rng = np.random.default_rng(seed)
    f = fft2_centered(rng.normal(size=(n, N, N)).astype(np.float32))
    k = np.hypot(*np.meshgrid(np.arange(N // 2 + 1), np.fft.fftfreq(N, 1 / N)))
    return ifft2_centered(f * np.exp(-((k / 5.0) ** 2)), N).astype(np.float32)


def test_pairs_left_out_cannot_reach_the_threshold(views_and_copy):
    """``above``: the amplitude spectra's correlation bounds each pair's similarity, so every
    pair that exceeds ``above`` is searched (with the full search's value) at every level,
    and the pairs left out are NaN."""
    classes = np.concatenate([views_and_copy, _smooth_blobs(4)])
    full = class_similarity(classes, n_psi=36, max_res_px=N // 4)
    off = ~np.eye(len(classes), dtype=bool)
    left_out = {}
    for level in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
        part = class_similarity(classes, n_psi=36, max_res_px=N // 4, above=level)
        done = ~np.isnan(part)
        assert done[full > level].all(), level
        np.testing.assert_allclose(part[done], full[done], rtol=1e-6)
        np.testing.assert_allclose(part, part.T)
        left_out[level] = int((~done & off).sum()) // 2
    # the blobs against the views and the views' copy: most pairs need no search at 0.9
    assert left_out[0.9] >= 20 and left_out[0.3] <= left_out[0.9], left_out
    np.testing.assert_allclose(class_similarity(classes, n_psi=36, max_res_px=N // 4,
                                                above=-1.0), full, rtol=1e-6)
    none = class_similarity(classes, n_psi=36, max_res_px=N // 4, above=1.5)  # no pair left
    assert np.isnan(none[off]).all() and (np.diag(none) == 1).all()


def test_a_duplicate_by_shared_particles_alone_says_its_similarity_is_low(views):
    """A pair freed for its shared particles whose images cannot reach the threshold (not
    searched) reports the similarity as below it."""
    classes = np.concatenate([views[:2], _smooth_blobs(2)])
    counts = np.array([300.0, 250, 280, 120])
    overlap = np.zeros((4, 4))
    overlap[0, 3] = overlap[3, 0] = 0.4
    free, why = find_free_classes(counts, classes, int(counts.sum()), overlap)
    assert free == [3]
    assert why[3] == "duplicate of class 1 (similarity below 0.90, shared particles 0.40)"


@pytest.mark.gpu
def test_class_similarity_is_the_same_on_the_gpu(views_and_copy):
    import cupy

    host = class_similarity(views_and_copy, n_psi=72, max_res_px=N // 4)
    device = class_similarity(views_and_copy, n_psi=72, max_res_px=N // 4, xp=cupy)
    assert isinstance(device, np.ndarray)
    np.testing.assert_allclose(device, host, atol=1e-4)
    # only the pairs that may pass a threshold: the same pairs left out as on the host
    classes = np.concatenate([views_and_copy, _smooth_blobs(4)])
    full = class_similarity(classes, n_psi=72, max_res_px=N // 4)
    device = class_similarity(classes, n_psi=72, max_res_px=N // 4, xp=cupy, above=0.9)
    done = ~np.isnan(device)
    assert done[full > 0.9].all() and (~done).any()
    np.testing.assert_allclose(device[done], full[done], atol=1e-4)


def test_free_classes_and_why(views):
    copy = _turned(views[1], 120.0, (0.5, 0.5))
    classes = np.concatenate([views, copy[None], views[2:3] * 0.01])
    counts = np.array([300.0, 250, 300, 280, 120, 5])
    pmax = np.array([0.9, 0.92, 0.91, 0.5, 0.9, 0.4])
    free, why = find_free_classes(counts, classes, int(counts.sum()), pmax=pmax)
    assert free == [3, 4, 5]
    assert why[5].startswith("nearly empty (5 particles)")
    assert why[3].startswith("junk (mean max. probability 0.50")
    assert why[4].startswith("duplicate of class 2")  # the smaller of the pair is freed
    # shared particles (co-responsibility) alone also make a duplicate pair
    overlap = np.zeros((6, 6))
    overlap[0, 2] = overlap[2, 0] = 0.4
    free, why = find_free_classes(counts, classes, int(counts.sum()), overlap, pmax)
    assert 2 in free and why[2].startswith("duplicate of class 1")


def test_look_alike_classes_are_duplicates_only_if_their_particles_fit_both(views):
    """With the E-step's class margins, a look-alike pair is a duplicate only when the
    smaller class's particles fit the other about as well as their own: relative to their
    next-best class that is not free (junk classes, which fit nothing, do not count)."""
    copy = _turned(views[1], 120.0, (0.5, 0.5))
    classes = np.concatenate([views, copy[None], views[2:3] * 0.01])
    counts = np.array([300.0, 250, 300, 280, 120, 5])
    pmax = np.array([0.9, 0.92, 0.91, 0.5, 0.9, 0.4])
    margin = np.full((6, 6), 40.0)  # classes 3 (junk) and 5 (empty) are free already
    margin[:, 3] = margin[:, 5] = 400.0
    np.fill_diagonal(margin, 0.0)
    margin[4, 1] = 8.0  # class 5's particles fit class 2 almost as well: the same view
    free, why = find_free_classes(counts, classes, int(counts.sum()), pmax=pmax, margin=margin)
    assert free == [3, 4, 5] and why[4].startswith("duplicate of class 2")
    margin[4, 1] = 30.0  # ... or clearly worse than their own: two views that look alike
    free, why = find_free_classes(counts, classes, int(counts.sum()), pmax=pmax, margin=margin)
    assert free == [3, 5]


def test_only_the_pairs_whose_particles_fit_both_are_searched(views, monkeypatch):
    """The margins are known before the images are compared: only the pairs they allow are
    searched (``class_similarity(only=)``, the full search's values, NaN elsewhere), and the
    free classes and reasons are those of the test above."""
    from cryonb.em import _reseed

    copy = _turned(views[1], 120.0, (0.5, 0.5))
    classes = np.concatenate([views, copy[None], views[2:3] * 0.01])
    counts = np.array([300.0, 250, 300, 280, 120, 5])
    pmax = np.array([0.9, 0.92, 0.91, 0.5, 0.9, 0.4])
    margin = np.full((6, 6), 40.0)
    margin[:, 3] = margin[:, 5] = 400.0
    np.fill_diagonal(margin, 0.0)
    margin[4, 1] = 8.0
    margin[0, 2] = 10.0  # two distinct views whose particles fit both: allowed, below 0.9
    seen = []

    def spy(*a, only=None, **k):
        seen.append(only)
        return class_similarity(*a, only=only, **k)

    monkeypatch.setattr(_reseed, "class_similarity", spy)
    free, why = find_free_classes(counts, classes, int(counts.sum()), pmax=pmax, margin=margin)
    assert free == [3, 4, 5] and why[4].startswith("duplicate of class 2 (similarity 0.9")
    allowed = {tuple(p) for p in np.argwhere(np.triu(seen[0], 1))}
    assert allowed == {(1, 4), (0, 2)}
    full = class_similarity(classes, n_psi=36, max_res_px=N // 4)
    part = class_similarity(classes, n_psi=36, max_res_px=N // 4, only=seen[0])
    done = ~np.isnan(part)
    assert {tuple(p) for p in np.argwhere(np.triu(done, 1))} == allowed
    np.testing.assert_allclose(part[done], full[done], rtol=1e-6)
    nothing = class_similarity(classes, only=np.zeros((6, 6), bool))
    assert np.isnan(nothing[~np.eye(6, dtype=bool)]).all() and (np.diag(nothing) == 1).all()


def _aligned_set(n_views, n=400, snr=0.1, seed=0):
    sim = simulate_particles(n=n, box=N, n_views=n_views, snr=snr, ctf=False, seed=seed)
    t = sim.truth
    offsets = np.stack([t.origin_x, t.origin_y], axis=1) / sim.pixel_size
    return sim, t.psi.to_numpy(), offsets


def _split(sim, psi, offsets, xp=np):
    shells = N // 2 + 1
    noise = fft2_centered(sim.images[:50] - sim.images.mean(axis=0))
    sigma2 = np.full(shells, float(np.mean(np.abs(noise) ** 2)) / 2)
    return split_class(sim.images, psi, offsets, None, sigma2, np.ones(shells), 2.0, N,
                       np.ones((N, N), np.float32), sim.pixel_size, seed=0, xp=xp)


def test_two_merged_views_split_along_the_views():
    sim, psi, offsets = _aligned_set(2)
    averages, labels, separation = _split(sim, psi, offsets)
    assert separation >= SPLIT_SEPARATION, separation
    view = sim.truth.view.to_numpy()
    agree = max(np.mean(labels == view), np.mean(labels != view))
    assert agree >= 0.95, agree
    assert averages.shape == (2, N, N) and averages.dtype == np.float32


@pytest.mark.gpu
def test_the_split_test_gives_the_same_on_the_gpu():
    import cupy

    sim, psi, offsets = _aligned_set(2)
    averages, labels, separation = _split(sim, psi, offsets)
    averages_gpu, labels_gpu, separation_gpu = _split(sim, psi, offsets, xp=cupy)
    assert isinstance(averages_gpu, np.ndarray) and isinstance(labels_gpu, np.ndarray)
    assert (labels_gpu == labels).all()
    assert separation_gpu == pytest.approx(separation, rel=1e-4)
    np.testing.assert_allclose(averages_gpu, averages, atol=1e-4 * np.abs(averages).max())


def _three_classes():
    """Three classes' particles in one stack (two views; one view; 20 particles, whose
    principal components take the exact SVD), each with its own noise power and prior."""
    sets = [_aligned_set(2, n=160, seed=2), _aligned_set(1, n=120, seed=3),
            _aligned_set(2, n=20, seed=5)]
    images = np.concatenate([s.images for s, _, _ in sets])
    psi = np.concatenate([p for _, p, _ in sets])
    offsets = np.concatenate([o for _, _, o in sets])
    ends = np.cumsum([len(p) for _, p, _ in sets])
    members = [np.arange(e - len(p), e) for (_, p, _), e in zip(sets, ends)]
    shells = N // 2 + 1
    rng = np.random.default_rng(7)
    sigma2 = rng.uniform(0.5, 2.0, (3, shells)) * float(np.var(images))
    tau2 = rng.uniform(0.5, 2.0, (3, shells))
    return images, psi, offsets, members, sigma2, tau2


def _split_all(images, psi, offsets, members, sigma2, tau2, xp=np):
    return split_classes(images, psi, offsets, None, members, sigma2, tau2, 2.0, N,
                         np.ones((N, N), np.float32), 3.0, seed=0, xp=xp)


def test_split_tests_of_several_classes_at_once_are_each_class_own():
    """``split_classes`` (one pass over all the classes' particles) gives each class what
    ``split_class`` gives it alone: labels, separation and averages, with the class's own
    noise power and prior; the two-view class still splits and the one-view class does not."""
    images, psi, offsets, members, sigma2, tau2 = _three_classes()
    together = _split_all(images, psi, offsets, members, sigma2, tau2)
    assert len(together) == 3
    for j, rows in enumerate(members):
        alone = split_class(images[rows], psi[rows], offsets[rows], None, sigma2[j], tau2[j],
                            2.0, N, np.ones((N, N), np.float32), 3.0, seed=0)
        avg, labels, sep = together[j]
        assert (labels == alone[1]).all() and len(labels) == len(rows)
        assert sep == pytest.approx(alone[2], rel=1e-9)
        assert avg.shape == (2, N, N) and avg.dtype == np.float32
        np.testing.assert_allclose(avg, alone[0], rtol=0, atol=1e-6 * np.abs(alone[0]).max())
    assert together[0][2] >= SPLIT_SEPARATION > together[1][2]


@pytest.mark.gpu
def test_split_tests_of_several_classes_on_the_gpu():
    import cupy

    args = _three_classes()
    host = _split_all(*args)
    device = _split_all(*args, xp=cupy)
    for (avg, labels, sep), (avg_d, labels_d, sep_d) in zip(host, device):
        assert isinstance(avg_d, np.ndarray) and isinstance(labels_d, np.ndarray)
        assert (labels_d == labels).all()
        assert sep_d == pytest.approx(sep, rel=1e-4)
        np.testing.assert_allclose(avg_d, avg, atol=1e-4 * np.abs(avg).max())


def test_principal_scores_of_a_stack_are_each_matrix_own():
    """Matrices of different heights computed as one zero-padded stack, a second width in
    its own stack, one small enough for the exact SVD, and a stack split by ``max_bytes``:
    each gets its own leading scores (the exact SVD's, up to the components' signs)."""
    rng = np.random.default_rng(3)

    def low_rank(n, m):
        basis = rng.standard_normal((4, m))
        Z = (rng.standard_normal((n, 4)) * [30.0, 20.0, 12.0, 5.0]) @ basis
        Z += rng.standard_normal((n, m))
        return Z - Z.mean(axis=0)

    Zs = [low_rank(n, m) for n, m in ((300, 400), (90, 400), (150, 250), (20, 400),
                                      (200, 400))]
    for max_bytes in (1 << 28, 8 * 300 * 400):  # one stack of width 400; one per matrix
        got = _principal_scores(Zs, 3, seed=0, max_bytes=max_bytes)
        for Z, scores in zip(Zs, got):
            u, s, _ = np.linalg.svd(Z, full_matrices=False)
            want = u[:, :3] * s[:3]
            assert scores.shape == want.shape
            signs = np.sign((scores * want).sum(axis=0))
            np.testing.assert_allclose(scores * signs, want, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("psi", [0.0, 90.0])
def test_class_frame_pixels_are_the_shifted_transform_turned(psi):
    """At 0 and 90 degrees the class frame's pixels fall on the particles' grid: the values are
    the full transform of the image shifted by its origin (the 90 degree case reads half of
    them through Friedel symmetry), whether the transforms are made in one chunk or several."""
    rng = np.random.default_rng(0)
    imgs = rng.standard_normal((5, N, N)).astype(np.float32)
    off = rng.uniform(-3, 3, (5, 2))
    shifted = ifft2_centered(fft2_centered(imgs) * shift_phases_2d(N, off), N)
    full = np.fft.fft2(np.fft.ifftshift(shifted, axes=(-2, -1))) / N**2  # (5, ky, kx)
    for chunk in (1 << 27, 2 * 4 * N * N):  # one chunk; chunks of two images
        X, c, _flat, kx, ky, _ = _class_frame_pixels(imgs, np.full((5, 1), psi), off, None,
                                                    24, 3.0, chunk_bytes=chunk)
        # particle pixel A q, A = [[cos, sin], [-sin, cos]]
        t = np.deg2rad(psi)
        px = np.rint(np.cos(t) * kx + np.sin(t) * ky).astype(int)
        py = np.rint(-np.sin(t) * kx + np.cos(t) * ky).astype(int)
        want = full[:, py % N, px % N]
        np.testing.assert_allclose(X[:, 0], want, atol=2e-6 * np.abs(want).max())
        assert (c == 1).all()


def test_halfplane_interpolation_inside_and_at_the_edges():
    """Bilinear values against a loop over the four neighbours (Friedel for x < 0, zero
    beyond Nyquist), for points well inside (the split test's case) and up to the edges."""
    rng = np.random.default_rng(1)
    n, W = 8, 8 // 2 + 1
    F = (rng.standard_normal((2, n, W)) + 1j * rng.standard_normal((2, n, W))).astype(
        np.complex64)

    def value(i, x, y):
        conj = x < 0
        x, y = (-x, -y) if conj else (x, y)
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        out = 0j
        for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                if xi <= n // 2 and abs(yi) <= n // 2:
                    out += wx * wy * F[i, yi % n, xi]
        return np.conj(out) if conj else out

    for r in (2.9, 4.4):  # every neighbour inside the box; up to and beyond Nyquist
        x, y = rng.uniform(-r, r, (2, 2, 50))
        got = _interp_halfplane(F, x, y)
        want = np.array([[value(i, x[i, q], y[i, q]) for q in range(50)] for i in range(2)])
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_one_view_does_not_split():
    sim, psi, offsets = _aligned_set(1, seed=1)
    _, _, separation = _split(sim, psi, offsets)
    assert separation < SPLIT_SEPARATION, separation


@pytest.fixture(scope="module")
def one_view_set():
    """One view at random angles and shifts (SNR 0.05, no CTF), its clean image and a round
    blob: the view's rotational average, the state of a class smeared by rotation."""
    sim, _psi, _off = _aligned_set(1, n=200, snr=0.05, seed=4)
    t = sim.truth.iloc[0]
    rot = euler_to_matrix(np.array([t.rot]), np.array([t.tilt]), 0.0)
    view = ifft2_centered(Projector(sim.volume.astype(np.float32)).project(rot)[0], N)
    blob = np.mean([rotate_2d(view, a) for a in np.arange(0, 360, 10.0)], axis=0)
    shells = N // 2 + 1
    noise = fft2_centered(sim.images[:50] - sim.images.mean(axis=0))
    sigma2 = np.full(shells, float(np.mean(np.abs(noise) ** 2)) / 2)
    k = np.fft.fftfreq(N, 1.0 / N)
    ring = np.rint(np.hypot(k[:, None], np.arange(N // 2 + 1)[None])).astype(int).ravel()
    power = np.abs(fft2_centered(view.astype(np.float32))).ravel() ** 2 / 2
    tau2 = np.bincount(ring, power, shells + N)[:shells] / np.maximum(
        np.bincount(ring, minlength=shells + N)[:shells], 1)
    return sim, view.astype(np.float32), blob.astype(np.float32), sigma2, tau2


def _realign(sim, current, sigma2, tau2, xp=np, **kw):
    return realign_class(sim.images, None, sigma2, tau2, 2.0, N // 2, current,
                         np.ones((N, N), np.float32), sim.pixel_size, offset_range=3.0, seed=0,
                         xp=xp, **kw)


@pytest.mark.gpu
def test_realignment_on_the_gpu(one_view_set):
    """One EM iteration from one start gives the host's numbers; the whole search (EM from
    single particles, whose float32 rounding can pick another of the starts) re-aligns the
    blob as on the host."""
    import cupy

    sim, view, blob, sigma2, tau2 = one_view_set
    short = dict(n_starts=1, n_keep=1, n_iter=1)
    image, gain = _realign(sim, blob, sigma2, tau2, **short)
    image_gpu, gain_gpu = _realign(sim, blob, sigma2, tau2, xp=cupy, **short)
    assert isinstance(image_gpu, np.ndarray) and image_gpu.dtype == np.float32
    assert gain_gpu == pytest.approx(gain, rel=1e-3, abs=1e-4)
    assert np.corrcoef(image.ravel(), image_gpu.ravel())[0, 1] > 0.9999
    image_gpu, gain_gpu = _realign(sim, blob, sigma2, tau2, xp=cupy)
    assert class_similarity(np.stack([view, image_gpu]), n_psi=72)[0, 1] >= 0.9
    assert gain_gpu > 1.0, gain_gpu


def test_a_class_smeared_by_rotation_is_realigned(one_view_set):
    sim, view, blob, sigma2, tau2 = one_view_set
    image, gain = _realign(sim, blob, sigma2, tau2)
    assert image.shape == (N, N) and image.dtype == np.float32
    sim_new = class_similarity(np.stack([view, image]), n_psi=72)[0, 1]
    sim_blob = class_similarity(np.stack([view, blob]), n_psi=72)[0, 1]
    # the re-aligned average is the view (up to rotation and shift), the blob is not
    assert sim_new >= 0.9 > sim_blob, (sim_new, sim_blob)
    assert gain > 1.0, gain  # clearly better likelihood per particle: realign


def test_an_aligned_class_gains_nothing(one_view_set):
    sim, view, _blob, sigma2, tau2 = one_view_set
    _, gain = _realign(sim, view, sigma2, tau2)
    assert gain < 1.0, gain


def test_which_splits_reseed():
    # separations met at pixel SNR 0.05 (8 views): a class of two merged views 3.6 at twice
    # the median size, single views 2.8-3.3 at the median size
    med = 250.0
    crowded = CROWDED_RATIO * med + 1
    assert split_accepted(SPLIT_SEPARATION + 0.1, 0.4, med, med, 5.0, junk=False)
    assert not split_accepted(3.25, 0.5, med, med, 3.25, junk=False)  # one view, best
    assert split_accepted(3.56, 0.43, crowded, med, 3.56, junk=False)  # crowded, best
    assert not split_accepted(3.56, 0.43, crowded, med, 3.56, junk=False, late=False)
    assert not split_accepted(3.56, 0.43, crowded, med, 3.8, junk=False)  # not the best
    assert not split_accepted(2.9, 0.5, crowded, med, 2.9, junk=False)  # too close
    assert split_accepted(1.0, 0.3, 50, med, 3.0, junk=True)  # junk: whatever separation
    assert not split_accepted(9.0, 0.0, med, med, 9.0, junk=True)  # one empty half


def test_merge_candidates_pair_one_view_in_two_classes():
    # classes 1 and 3 hold one view (their particles lose 8-10 nats by swapping), the others
    # are distinct (40 nats); class 4 is the crowded one and takes part in no pair
    margin = np.full((5, 5), 40.0)
    np.fill_diagonal(margin, 0.0)
    margin[1, 3], margin[3, 1] = 8.0, 10.0
    counts = np.array([250.0, 120, 250, 130, 480])
    r = merge_ratios(margin)
    assert r[1, 3] == pytest.approx(0.2) and r[0, 2] == pytest.approx(1.0)
    assert np.isinf(np.diag(r)).all()
    pairs = merge_candidates(margin, counts)
    assert pairs == [(pytest.approx(0.2), 1, 3)]  # the smaller class is the one freed
    assert merge_candidates(margin, counts, exclude=[3]) == []
    # the threshold: a ratio just above it is no pair
    margin[1, 3] = 40.0 * MERGE_RATIO * 1.05
    assert merge_candidates(margin, counts) == []
    # fewer than three classes: no typical cost to compare with
    assert merge_candidates(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([5.0, 6.0])) == []


def test_junk_classes_do_not_make_distinct_views_look_cheap_to_merge():
    """Classes of junk fit no particle (large margins to them): left out of the typical
    margin (``exclude``, the free classes), two distinct views are no merge pair; counted,
    the median would be a junk class's and the pair would look cheap."""
    margin = np.full((6, 6), 40.0)
    margin[:, 3:] = 400.0  # classes 3-5: junk, free
    np.fill_diagonal(margin, 0.0)
    margin[0, 1] = margin[1, 0] = 35.0  # two distinct views that look somewhat alike
    counts = np.array([190.0, 200, 180, 40, 30, 60])
    assert merge_ratios(margin)[0, 1] < MERGE_RATIO  # 35 / 400: "cheap"
    assert merge_ratios(margin, exclude=[3, 4, 5])[0, 1] == pytest.approx(35 / 40)
    assert merge_candidates(margin, counts, exclude=[3, 4, 5]) == []


def test_half_pairs_find_one_view_in_two_small_classes():
    # classes 1 and 3 split one view (half a typical class each) but their particles still
    # lose 60% of a typical move by swapping (ratio 0.6, no merge candidate); class 4 holds
    # two views
    margin = np.full((5, 5), 40.0)
    np.fill_diagonal(margin, 0.0)
    margin[1, 3], margin[3, 1] = 24.0, 26.0
    counts = np.array([250.0, 120, 250, 130, 480])
    assert merge_candidates(margin, counts) == []
    assert half_pairs(margin, counts) == [(pytest.approx(0.6), 1, 3)]
    assert half_pairs(margin, counts, exclude=[1]) == []
    # two typical classes are no such pair, whatever their ratio
    assert half_pairs(margin, np.array([250.0, 240, 250, 260, 480])) == []
    # nor are a typical and a small one, or two that fit each other no better than others
    assert half_pairs(margin, np.array([250.0, 120, 250, 230, 480])) == []
    margin[1, 3] = 40.0 * HALF_RATIO * 1.05
    assert half_pairs(margin, counts) == []


def _merge_ratios_reference(margin, exclude=()):
    """merge_ratios as its docstring says it, one pair at a time (plain NumPy)."""
    K = margin.shape[0]
    out = np.full((K, K), np.inf)
    if K < 3:
        return out
    skip = set(int(k) for k in exclude)
    for a in range(K):
        for b in range(K):
            if a != b:
                rest = [c for c in range(K) if c not in (a, b) and c not in skip]
                rest = rest or [c for c in range(K) if c not in (a, b)]
                typical = float(np.median(margin[a, rest]))
                if typical > 0:
                    out[a, b] = margin[a, b] / typical
    return out


def test_merge_ratios_are_the_pairwise_medians():
    """The per-row sorted medians give, bit for bit, the median over the other classes of
    each pair: with ties, NaN margins, rows of no positive margin, any classes excluded."""
    rng = np.random.default_rng(0)
    for _ in range(400):
        K = int(rng.integers(2, 11))
        margin = rng.normal(20, 10, (K, K))
        if rng.random() < 0.3:
            margin = np.round(margin)  # ties
        for _ in range(int(rng.integers(0, 3))):
            margin[rng.integers(K), rng.integers(K)] = np.nan
        if rng.random() < 0.1:
            margin[rng.integers(K)] = -1.0
        exclude = rng.choice(K, int(rng.integers(0, K + 1)), replace=False)
        np.testing.assert_array_equal(merge_ratios(margin, exclude),
                                      _merge_ratios_reference(margin, exclude))

