"""Re-seeding classes during 2D classification (cryonb's addition to RELION's algorithm).

Maximum-likelihood 2D classification is a local optimiser. On data with a few distinct views
it often settles where one class holds several views while other classes are (nearly) empty,
or where two classes describe the same view. RELION keeps such states to the end. cryonb, in
the first part of a run (``--reseed_until``), frees those classes and gives them a new start:

1. A class is *free* when it is nearly empty (fewer than ``0.2 N / K`` particles), junk (the
   mean maximum probability of its particles below ``JUNK_PMAX_RATIO`` times the median
   class's), or the smaller of two classes that are the same image up to an in-plane rotation
   and shift (:func:`class_similarity` above ``dup_threshold``) or share their particles.
2. Free slots are filled by *splitting* classes: the largest remaining classes when the split
   test separates their particles clearly (``SPLIT_SEPARATION``, or less for a crowded class,
   see :func:`split_accepted`), and junk classes whatever the separation (a junk class keeps
   one half). A split brings the particles into
   the class frame with their current poses (shift by the origin, rotation by ``-psi``),
   phase-flipped with their CTF, low-pass filtered at the current resolution, and clustered in
   two by 2-means on their first principal components. The two CTF-weighted (Wiener)
   averages become the split class and the free class. A junk or crowded class that finds
   no free slot may take one from a *merge*: the smaller of two classes whose particles fit
   both almost equally well (:func:`merge_candidates`, from the E-step's class margins),
   typically one view split over two classes while another class holds two views. A crowded
   class that splits clearly may also take the smaller of two half-size classes whose
   particles fit each other's class better than a typical one (:func:`half_pairs`): the
   same state when the two halves' averages differ by more than noise.
3. EM then refines both from there.
4. A junk class left without a slot (nothing to split into) is often a class *smeared by
   rotation*: a round blob, the rotational average of its view, whose particles' angles are
   arbitrary; EM keeps such a state to the end. Such a class is aligned afresh from its own
   particles (:func:`realign_class`: one-class EM over angles and shifts from single-particle
   starts) and replaced when that explains its particles clearly better.

This is divisive clustering in the style of k-means/cryoSPARC re-seeding, applied to the
aligned particles rather than to random subsets, so that the two seeds already differ in the
way the merged views differ.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module, fft_batch, fft_module, to_numpy, usable_cores

__all__ = ["CROWDED_RATIO", "CROWDED_SEPARATION", "DUP_MARGIN_RATIO", "HALF_RATIO", "HALF_SIZE",
           "HALF_TOTAL", "JUNK_PMAX_RATIO", "MERGE_RATIO", "SPLIT_SEPARATION", "class_similarity",
           "find_free_classes", "half_pairs", "merge_candidates", "merge_ratios",
           "realign_class", "split_accepted", "split_class", "split_classes"]

#: two look-alike classes are duplicates only where the smaller one's particles lose less
#: than this fraction of their margin to their next-best class that is not free by moving to
#: the other (see :func:`find_free_classes`)
DUP_MARGIN_RATIO = 0.5

#: a class whose particles' mean maximum probability is below this fraction of the median
#: class's is "junk" (it collects particles that fit nowhere well) and is re-seeded
JUNK_PMAX_RATIO = 0.88
#: a class splits when its two clusters are this many within-cluster standard deviations
#: apart (one view split by noise: about 2-3; two views: 5 and more)
SPLIT_SEPARATION = 4.0
#: a class this many times the median class size is *crowded* (0 = no crowded rule) ...
CROWDED_RATIO = 1.6
#: ... and splits at this separation when it separates best among the crowded ones
CROWDED_SEPARATION = 3.0
#: a junk or crowded class with no free slot may take the smaller class of a pair whose
#: particles fit both almost equally: moving them costs less than this fraction of what
#: moving them to a typical other class would (:func:`merge_candidates`; 0 = never)
MERGE_RATIO = 0.35
#: :func:`half_pairs`: each class at most this fraction of the median class, ...
HALF_SIZE = 0.7
#: ... the two together within this range of it, ...
HALF_TOTAL = (0.7, 1.4)
#: ... and a merge ratio below this
HALF_RATIO = 0.85


def split_accepted(separation: float, share: float, count: float, median_count: float,
                   best_separation: float, junk: bool, late: bool = True) -> bool:
    """Whether a split test's result re-seeds a free class.

    A split is used when its clusters separate by ``SPLIT_SEPARATION``; a junk class's
    whatever the separation (it is free anyway, its low probabilities already say that it
    mixes views, and on noisy data two merged views can separate by as little as one view
    split by noise, ~3; EM then decides from the two seeds); and a *crowded* class's
    (``CROWDED_RATIO`` times the median class size) at ``CROWDED_SEPARATION`` when it
    separates best among the crowded candidates: while a class is free (often a duplicate, two
    classes for one view) a class holding twice the typical share most likely holds two
    views, and at pixel SNR 0.05 two merged views separated by 3.6 where single views gave
    2.5-3.3. The crowded rule holds only ``late`` (once the classes have formed: in the first
    iterations every class is a blend, and some hold most particles). Both halves must be
    non-empty (``0 < share < 1``).

    Parameters
    ----------
    separation, share : float
        The split test's separation and the fraction of particles in its second cluster.
    count, median_count : float
        The class's particles and the median over non-empty classes.
    best_separation : float
        The highest separation among this round's crowded candidates.
    junk : bool
        The class is junk (see :func:`find_free_classes`).
    late : bool
        The prior annealing is over.
    """
    if not 0 < share < 1:
        return False
    crowded = (late and CROWDED_RATIO > 0 and count >= CROWDED_RATIO * median_count
               and separation >= best_separation and separation >= CROWDED_SEPARATION)
    return separation >= SPLIT_SEPARATION or junk or crowded


def class_similarity(classes: np.ndarray, n_psi: int = 36, max_res_px: int | None = None,
                     upsample: int = 4, refine_above: float = 0.75, xp=np,
                     chunk_bytes: int | None = None, above: float | None = None,
                     only: np.ndarray | None = None):
    """Normalised correlation of every pair of class images, maximised over rotations and shifts.

    Parameters
    ----------
    classes : ndarray of shape (K, N, N)
    n_psi : int
        In-plane angles tried.
    max_res_px : int, optional
        Fourier radius (pixels) compared (default ``N // 4``: the overall shape).
    upsample : int
        Shifts are searched on a grid ``upsample`` times finer than the pixels of the low-pass
        filtered images (zero-padded cross-correlation, at the best angle and its two
        neighbours on each side), for the pairs whose whole-pixel similarity exceeds
        ``refine_above``. On whole pixels of the small images (several
        original pixels each), two halves of one view score ~0.9; sub-pixel, ~0.95, while
        distinct views stay near 0.5-0.7.
    xp : module
        Where to compute the cross-correlations (``numpy`` or ``cupy``, on the current
        device): ``K (K - 1) / 2 * n_psi`` inverse transforms, all pairs in chunks of about
        ``chunk_bytes`` (default 64 MiB on the host, 512 MiB on the device), and five
        zero-padded ones per pair refined. At K=100, 72 angles and a radius of 32 pixels
        that is 356,400 transforms of 66 x 66 pixels: 12.6 s on 16 host cores, 0.12 s on
        an H100.
    chunk_bytes : int, optional
    above : float, optional
        Search only the pairs whose similarity may exceed ``above``. For any shift, the
        correlation of two transforms is at most the correlation of their amplitudes
        (``|sum F G* e^(i k s)| <= sum |F| |G|``), so each pair's amplitude correlation at its
        best angle (one matrix product for all pairs and angles) bounds its similarity;
        pairs whose bound is at most ``above`` (less a margin for rounding) are left out, and their
        entries are NaN. The others' values are those of the full search. On 100 noise-free
        70S ribosome views at 64 px, 3 of 4950 pairs were searched at ``above=0.9``; class
        averages of blurred early iterations leave about half of the pairs.
    only : ndarray of shape (K, K), bool, optional
        Search only the pairs ``(a, b)`` where ``only[a, b]`` (upper triangle read); the
        others' entries are NaN (with ``above``, the pairs left are those of both).

    Returns
    -------
    ndarray of shape (K, K)
        Symmetric, 1 on the diagonal; ``sim[a, b]`` = max over psi and (circular) shifts of the
        correlation of the low-pass filtered ``A_a`` with ``A_b`` rotated by psi (DC excluded);
        NaN for the pairs left out by ``above``.
    """
    from ..data.conventions import inplane_matrix
    from ..fourier import Projector, fft2_centered, ifft2_centered, window_2d

    K, N = classes.shape[0], classes.shape[-1]
    sim = np.eye(K)
    pairs = np.argwhere(np.triu(np.ones((K, K), bool), 1))  # (K (K-1) / 2, 2), a < b
    if only is not None:
        pairs = pairs[np.asarray(only, bool)[pairs[:, 0], pairs[:, 1]]]
    if above is not None or only is not None:
        sim[~np.eye(K, dtype=bool)] = np.nan
        if not len(pairs):
            return sim
    r = max_res_px or max(4, N // 4)
    n = min(N, 2 * r + 2)
    n += n % 2
    small = ifft2_centered(window_2d(fft2_centered(classes.astype(np.float32)), n), n)
    rots = inplane_matrix(np.arange(n_psi) * 360.0 / n_psi)
    ky = np.fft.fftfreq(n, 1.0 / n)[:, None]
    kx = np.arange(n // 2 + 1)[None]
    keep = ((kx**2 + ky**2) <= r * r) & ((kx**2 + ky**2) > 0)
    # (K, R, n, n//2+1): every class at every angle, from one set of interpolation weights
    F = Projector(xp.asarray(small), stack=True).project(xp.asarray(rots)) * xp.asarray(keep)
    F = F.astype(xp.complex64, copy=False)
    # full-plane sums from the half plane: columns 0 < kx < n/2 stand for two pixels each
    wcol = xp.asarray(np.where((kx == 0) | (kx == n // 2), 1.0, 2.0))
    norms = to_numpy(xp.sqrt((xp.abs(F[:, 0]) ** 2 * wcol).sum(axis=(-2, -1))))
    fft = fft_module(xp)
    par = {"workers": usable_cores()} if xp is np else {}  # scipy.fft: the batches over cores
    chunk_bytes = chunk_bytes or (1 << 26 if xp is np else 1 << 29)

    def best_shift(a, b, turns, m, rows):
        """Max over (circular) shifts of the cross-correlations of pairs ``(a, b)`` at the
        angles ``turns`` (pairs, T), on an m x m grid (zero-padded for m > n), transformed
        as a batch of ``rows >= len(a)`` pairs (zeros after the pairs): (pairs, T)."""
        G = F[xp.asarray(a), 0][:, None] * xp.conj(F[xp.asarray(b)[:, None], xp.asarray(turns)])
        if m > n or rows > len(a):
            h = n // 2
            Gp = xp.zeros((rows, G.shape[1], m, m // 2 + 1), G.dtype)
            Gp[:len(a), :, :h, :h + 1] = G[..., :h, :]
            Gp[:len(a), :, m - h:, :h + 1] = G[..., h:, :]
            G = Gp
        cc = fft.irfft2(G, s=(m, m), axes=(-2, -1), **par)[:len(a)]
        return to_numpy(cc.reshape(len(a), turns.shape[1], -1).max(axis=2)).astype(
            np.float64) * (m * m)

    def chunks(pairs, turns, m, per_pair):
        # fixed-size chunks (one FFT plan for all but the last; on a GPU the last padded to
        # a power of two, see fft_batch)
        step = max(1, chunk_bytes // per_pair)
        for i in range(0, len(pairs), step):
            part = pairs[i:i + step]
            yield i, best_shift(*part.T, turns[i:i + step], m, fft_batch(len(part), xp, step))

    if above is not None:
        bound = _amplitude_bound(F, wcol, norms)
        pairs = pairs[bound[pairs[:, 0], pairs[:, 1]] > above - _BOUND_MARGIN]
    best = np.zeros(len(pairs), np.int64)  # each pair's best angle
    turns = np.broadcast_to(np.arange(n_psi), (len(pairs), n_psi))
    for i, cc in chunks(pairs, turns, n, n_psi * n * (n // 2 + 1) * 16):
        a, b = pairs[i:i + len(cc)].T
        sim[a, b] = cc.max(axis=1) / np.maximum(norms[a] * norms[b], 1e-30)
        best[i:i + len(cc)] = cc.argmax(axis=1)
    # sub-pixel shifts: the zero-padded cross-correlation at the best angle and its two
    # neighbours on each side, for the pairs above refine_above (many pairs in the first
    # iterations, whose classes are blobs alike)
    up = sim[pairs[:, 0], pairs[:, 1]] > refine_above if upsample > 1 else np.zeros(0, bool)
    if up.any():
        m = upsample * n
        turns = (best[up][:, None] + np.arange(-2, 3)) % n_psi
        for i, cc in chunks(pairs[up], turns, m, 5 * m * (m // 2 + 1) * 12):
            a, b = pairs[up][i:i + len(cc)].T
            sim[a, b] = np.maximum(sim[a, b], cc.max(axis=1)
                                   / np.maximum(norms[a] * norms[b], 1e-30))
    lower = np.tril_indices(K, -1)
    sim[lower] = sim.T[lower]
    return sim


#: rounding allowed for in the amplitude bound (see ``class_similarity(above=)``): float32,
#: or TF32 where CuPy is set to use it for float32 products (``CUPY_TF32=1``), ~5e-4
_BOUND_MARGIN = 1e-2


def _amplitude_bound(F, wcol, norms: np.ndarray) -> np.ndarray:
    """Upper bound of :func:`class_similarity` for every pair: the correlation of the
    amplitude spectra at the best angle.

    Parameters
    ----------
    F : array of shape (K, R, n, n // 2 + 1), complex
        Each class's low-pass filtered half-plane transform at each of ``R`` angles.
    wcol : array of shape (1, n // 2 + 1)
        Half-plane column weights (1 for ``kx = 0`` and ``n / 2``, else 2).
    norms : ndarray of shape (K,)
        Each class's norm (angle 0) with the same weights.

    Returns
    -------
    ndarray of shape (K, K)
        ``bound[a, b]`` = max over angles ``r`` of ``sum wcol |F[a, 0]| |F[b, r]|`` over
        ``norms[a] norms[b]``: at least the correlation of ``F[a, 0]`` with ``F[b, r]`` at any
        shift (for ``a < b``, the pairing the search uses).
    """
    xp = array_module(F)
    K, R = F.shape[:2]
    amp = xp.abs(F)  # float32 for complex64
    weighted = (amp[:, 0] * wcol.astype(amp.dtype)).reshape(K, -1)
    cross = weighted @ amp.reshape(K * R, -1).T  # (K, K R)
    best = to_numpy(cross.reshape(K, K, R).max(axis=2)).astype(np.float64)
    return best / np.maximum(np.outer(norms, norms), 1e-30)


def merge_ratios(margin: np.ndarray, exclude=()) -> np.ndarray:
    """How cheaply each class's particles would move to each other class, relative to the rest.

    Parameters
    ----------
    margin : ndarray of shape (K, K)
        ``margin[a, b]``: mean over class ``a``'s particles of their log-likelihood in ``a``
        minus that in ``b`` (best pose in each; ``Class2DModel.class_margin``).

    exclude : iterable of int
        Classes left out of the median (free ones: junk, which fits nothing, would make any
        pair of real classes look cheap; with 180 empty picks in four classes, two classes
        of distinct views were merged at a ratio below 0.35 that way). Where no class is
        left, all are used.

    Returns
    -------
    ndarray of shape (K, K)
        ``margin[a, b]`` over the median of ``margin[a, c]`` for the other classes ``c``
        (neither ``a`` nor ``b``, nor in ``exclude``); ``inf`` on the diagonal and where there
        is no other class or no margin. On 8-view sets at pixel SNR 0.05, one view split
        over two classes gave 0.21-0.33 for as long as it stayed split; distinct views settle
        at 0.5 and more, but pass through 0.3-0.4 for a few iterations after re-seeding.
    """
    margin = np.asarray(margin, dtype=np.float64)  # as class_margin is
    K = margin.shape[0]
    out = np.full((K, K), np.inf)
    if K < 3:
        return out
    skip = np.zeros(K, bool)
    skip[[int(k) for k in exclude]] = True
    for a in range(K):
        others = np.arange(K) != a
        kept = others & ~skip
        # the median of the kept classes without b; where that leaves none, of all without b
        typical = _medians_without(margin[a], kept)
        fallback = _medians_without(margin[a], others)
        alone = kept.sum() - kept == 0  # b is the only kept class, or none is kept
        typical = np.where(alone, fallback, typical)
        ok = others & (typical > 0)
        out[a, ok] = margin[a, ok] / typical[ok]
    return out


def _medians_without(row: np.ndarray, member: np.ndarray) -> np.ndarray:
    """For every ``b``: the median of ``row[c]`` over the members ``c`` other than ``b``.

    Parameters
    ----------
    row : ndarray of shape (K,)
    member : bool ndarray of shape (K,)

    Returns
    -------
    ndarray of shape (K,)
        ``np.median(row[member & (arange(K) != b)])`` for each ``b`` (the same values: the
        middle one, or the mean of the middle two, of the sorted members with ``b`` left
        out); NaN where no member is left or those left hold a NaN.
    """
    K = row.shape[0]
    out = np.full(K, np.nan)
    nan = np.flatnonzero(member & np.isnan(row))
    if nan.size:  # NaN unless b is the one NaN member: then the median of the others
        if nan.size == 1:
            out[nan[0]] = _medians_without(row, member & ~np.isnan(row))[nan[0]]
        return out
    idx = np.flatnonzero(member)
    n = idx.size
    if n == 0:
        return out
    order = np.argsort(row[idx], kind="stable")
    v = row[idx][order]
    pos = np.full(K, n)  # each b's place among the sorted members (n: not a member)
    pos[idx[order]] = np.arange(n)
    m = np.where(pos < n, n - 1, n)  # members left

    def kth(k):  # the k-th smallest member left (k < m)
        return v[np.minimum(np.where(k < pos, k, k + 1), n - 1)]

    hi = m // 2
    lo = np.where(m % 2 == 1, hi, hi - 1)
    med = (kth(lo) + kth(hi)) / 2
    med = np.where(m % 2 == 1, kth(hi), med)
    return np.where(m > 0, med, np.nan)


def merge_candidates(margin: np.ndarray, counts: np.ndarray, exclude=()) -> list:
    """Pairs of classes that describe the same particles, the cheapest merge first.

    A pair qualifies when the smaller class's particles would lose less than ``MERGE_RATIO``
    of what moving to a typical other class would cost them (:func:`merge_ratios`): one view
    split over two classes whose averages differ by noise (their image similarity can stay as
    low as that of two distinct views, 0.66 on one such pair). Merging the pair (freeing the
    smaller class) gives a slot to a class that holds two views.

    Parameters
    ----------
    margin : ndarray of shape (K, K)
        ``Class2DModel.class_margin``.
    counts : ndarray of shape (K,)
        Particles per class.
    exclude : iterable of int
        Classes that may not be part of a pair.

    Returns
    -------
    list of (ratio, smaller, larger)
        Sorted by ratio; each class in at most one pair.
    """
    K = len(counts)
    if MERGE_RATIO <= 0 or margin is None or margin.shape != (K, K):
        return []
    return _disjoint_pairs(merge_ratios(margin, exclude), counts, exclude,
                           lambda a, b, ratio: ratio < MERGE_RATIO)


def _disjoint_pairs(ratios: np.ndarray, counts: np.ndarray, exclude, accept) -> list:
    """Pairs ``(ratio, smaller, larger)`` of non-empty classes that ``accept(a, b, ratio)``,
    cheapest first, each class in at most one pair and none in ``exclude``."""
    K = len(counts)
    pairs = sorted((float(ratios[a, b]), a, b) for a in range(K) for b in range(K)
                   if a != b and counts[a] > 0 and (counts[a], a) < (counts[b], b)
                   and accept(a, b, float(ratios[a, b])))
    out, taken = [], set(exclude)
    for ratio, a, b in pairs:
        if a not in taken and b not in taken:
            out.append((ratio, a, b))
            taken.update((a, b))
    return out


def half_pairs(margin: np.ndarray, counts: np.ndarray, exclude=()) -> list:
    """Pairs of small classes that likely split one view, for a class that clearly holds two.

    When a crowded class splits clearly (:data:`SPLIT_SEPARATION`) and no class is free or
    cheap to merge (:func:`merge_candidates`), two classes that are each at most
    ``HALF_SIZE`` of the median class, together ``HALF_TOTAL`` of it, and whose particles
    fit each other's class better than a typical one (merge ratio below ``HALF_RATIO``) are
    the other half of the picture: one view split in two. With ``--ctf_intact_first_peak``
    on data without strong low-resolution contrast such a pair kept merge ratios of
    0.58-0.77 for as long as it stayed split.

    Parameters and result as :func:`merge_candidates`.
    """
    K = len(counts)
    if margin is None or margin.shape != (K, K) or not (counts > 0).any():
        return []
    med = float(np.median(counts[counts > 0]))

    def accept(a, b, ratio):
        total = counts[a] + counts[b]
        return (counts[b] <= HALF_SIZE * med and ratio < HALF_RATIO
                and HALF_TOTAL[0] * med <= total <= HALF_TOTAL[1] * med)

    return _disjoint_pairs(merge_ratios(margin, exclude), counts, exclude, accept)


def find_free_classes(counts: np.ndarray, classes: np.ndarray, n_particles: int,
                      overlap: np.ndarray | None = None, pmax: np.ndarray | None = None, *,
                      margin: np.ndarray | None = None, empty_fraction: float = 0.2,
                      dup_threshold: float = 0.9, overlap_threshold: float = 0.25,
                      n_psi: int = 36, max_res_px: int | None = None, xp=np):
    """Classes to re-seed: nearly empty ones and the smaller of each duplicate pair.

    A class is junk when its particles' mean maximum probability ``pmax`` (per class) is below
    ``JUNK_PMAX_RATIO`` times the median class's. Two classes are duplicates when their images
    agree up to a rotation and shift
    (:func:`class_similarity` above ``dup_threshold``) or when they share their particles
    (normalised co-responsibility ``overlap`` above ``overlap_threshold``).

    Parameters
    ----------
    counts : ndarray of shape (K,)
        Particles per class (best class).
    classes : ndarray of shape (K, N, N)
    n_particles : int
    margin : ndarray of shape (K, K), optional
        The E-step's class margins (``Class2DModel.class_margin``). Given, two classes that
        look alike are duplicates only when the smaller one's particles would also fit the
        other: their margin to it below ``DUP_MARGIN_RATIO`` times their smallest margin to
        any other class not already free (the next-best real class). At low resolution two
        classes of different views (blobs of several views each, with junk in the set)
        reached a similarity of 0.91, and freeing one merged them.
    empty_fraction : float
        A class with fewer than ``empty_fraction * n_particles / K`` particles is free.
    dup_threshold : float
        Similarity (see :func:`class_similarity`) above which two classes are duplicates.
    xp : module
        Where :func:`class_similarity` computes (``numpy`` or ``cupy``).

    Returns
    -------
    free : list of int
    reasons : dict of int -> str
    """
    K = len(counts)
    free, reasons = [], {}
    for k in range(K):
        if counts[k] < empty_fraction * n_particles / K:
            free.append(k)
            reasons[k] = f"nearly empty ({int(counts[k])} particles)"
    if pmax is not None:
        med = np.median(pmax[counts > 0])
        for k in range(K):
            if k not in free and counts[k] > 0 and pmax[k] < JUNK_PMAX_RATIO * med:
                free.append(k)
                reasons[k] = f"junk (mean max. probability {pmax[k]:.2f}, median {med:.2f})"
    fit = _fit_both(counts, margin, free) if margin is not None and margin.shape == (K, K) \
        else None
    # pairs that cannot reach the threshold are not searched (NaN): below it, a similarity
    # decides nothing; nor are those whose particles do not fit both classes (similarity 0)
    sim = class_similarity(classes, n_psi=n_psi, max_res_px=max_res_px, xp=xp,
                           above=dup_threshold, only=fit)
    below = np.isnan(sim) if fit is None else np.isnan(sim) & fit
    sim[np.isnan(sim)] = 0.0
    ov = np.zeros((K, K)) if overlap is None or overlap.shape != (K, K) else overlap
    score = np.maximum(sim / dup_threshold, ov / overlap_threshold)
    pairs = sorted(((score[a, b], a, b) for a in range(K) for b in range(a + 1, K)),
                   reverse=True)
    taken = set(free)
    for sc, a, b in pairs:
        if sc < 1.0:
            break
        if a in taken or b in taken:
            continue
        s = sim[a, b]
        small = a if counts[a] < counts[b] else b
        free.append(int(small))
        look = f"below {dup_threshold:.2f}" if below[a, b] else f"{s:.2f}"
        reasons[int(small)] = (f"duplicate of class {int(b if small == a else a) + 1} "
                               f"(similarity {look}, shared particles {ov[a, b]:.2f})")
        taken.update((int(a), int(b)))
    return sorted(free), reasons


def _fit_both(counts: np.ndarray, margin: np.ndarray, free) -> np.ndarray:
    """Pairs whose smaller class's particles would also fit the larger one (see
    :func:`find_free_classes`' ``margin``): boolean of shape (K, K), symmetric.

    Their margin to it is below ``DUP_MARGIN_RATIO`` times their smallest margin to any other
    class not free already (the next-best real class; not a median: where junk takes several
    classes, its fit-nowhere margins made any pair of real classes cheap). Known before the
    images are compared, so that only these pairs are searched (at K=100, a few of 4,950).
    """
    K = len(counts)
    keep = np.ones(K, bool)
    keep[list(free)] = False
    # typical[s, l]: row s's smallest margin over the classes kept, other than s and l (its
    # two smallest, the second where the first is l; NaN as -inf, which no ratio passes)
    M = np.where(keep, np.nan_to_num(margin, nan=-np.inf, posinf=np.inf), np.inf)
    np.fill_diagonal(M, np.inf)
    M = np.hstack([M, np.full((K, 1), np.inf)])  # two columns at least
    order = np.argsort(M, axis=1, kind="stable")[:, :2]
    first, second = np.take_along_axis(M, order, axis=1).T
    typical = np.where(order[:, :1] == np.arange(K), second[:, None], first[:, None])
    others = keep.sum() - keep[:, None] - keep[None, :]
    typical = np.where(others > 0, typical, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cond = (typical > 0) & (margin / typical < DUP_MARGIN_RATIO)  # cond[small, large]
    fit = np.where(counts[:, None] <= counts[None, :], cond, cond.T)  # (a, b): a smaller
    fit = np.triu(fit, 1)
    return fit | fit.T


def split_class(images, psi, offsets, ctf, sigma2, tau2, tau2_fudge, current_size, mask,
                pixel_size, seed: int = 0, n_components: int = 3, xp=np):
    """Split aligned particles of one class in two; return the two Wiener averages.

    Parameters
    ----------
    images : ndarray of shape (n, N, N), float32
        The class's particles (norm-corrected).
    psi : ndarray of shape (n,)
        In-plane angles (deg) of their current best pose.
    offsets : ndarray of shape (n, 2)
        RELION origins (pixels).
    ctf : CTFParams or None
        Per-particle CTF parameters (``None``: no CTF).
    sigma2 : ndarray of shape (N//2+1,)
        Noise power per shell.
    tau2 : ndarray of shape (N//2+1,)
        Signal power prior per shell of the class.
    tau2_fudge : float
    current_size : int
        Fourier box limiting the resolution used.
    mask : ndarray of shape (N, N)
        Soft particle mask for the averages.
    pixel_size : float
    seed : int
    n_components : int
        Principal components used for the 2-means.
    xp : module
        Where to compute (``numpy`` or ``cupy``, on the current device): the images are
        copied there in chunks; the inputs and the results are host arrays either way.

    Returns
    -------
    averages : ndarray of shape (2, N, N), float32
        The Wiener averages of clusters 0 and 1.
    labels : ndarray of shape (n,), int (0 or 1)
        0 for the larger cluster (on a tie, the first particle's).
    separation : float
        Distance between the two clusters' centres over the pooled within-cluster standard
        deviation along that direction: about 1-2 for one view split by noise, well above 3
        for two views.
    """
    return split_classes(images, psi, offsets, ctf, [np.arange(len(images))],
                         np.asarray(sigma2)[None], np.asarray(tau2)[None], tau2_fudge,
                         current_size, mask, pixel_size, seed, n_components, xp)[0]


def split_classes(images, psi, offsets, ctf, members, sigma2, tau2, tau2_fudge, current_size,
                  mask, pixel_size, seed: int = 0, n_components: int = 3, xp=np) -> list:
    """:func:`split_class` of several classes at once.

    The per-particle work (transforms, class-frame pixels, features) is done once for all the
    classes' particles, the principal components of all the classes as zero-padded stacks
    (:func:`_principal_scores`), and the averages of all the clusters in one scatter and one
    batch of inverse transforms. Each class keeps its own features, components, clusters
    and averages: the results are those of :func:`split_class` on each class alone.

    Parameters
    ----------
    images : ndarray of shape (n, N, N), float32
        The particles of all the classes (norm-corrected).
    psi, offsets, ctf
        Their poses and CTFs, as :func:`split_class`'s.
    members : list of C int arrays
        The rows of ``images`` that make up each class.
    sigma2 : ndarray of shape (C, N//2+1)
        Noise power per shell for each class.
    tau2 : ndarray of shape (C, N//2+1)
        Signal power prior per shell of each class.
    tau2_fudge, current_size, mask, pixel_size, seed, n_components, xp
        As :func:`split_class`'s.

    Returns
    -------
    list of C tuples
        ``(averages, labels, separation)`` of each class, as :func:`split_class` returns them.
    """
    from ..backend import add_rows_at
    from ..fourier import ifft2_centered

    N = images.shape[-1]
    members = [np.asarray(m, dtype=np.int64) for m in members]
    X, c, flat, _kx, _ky, shells = _class_frame_pixels(
        images, np.asarray(psi, float)[:, None], offsets, ctf, current_size, pixel_size, xp)
    X, c = X[:, 0], c[:, 0]
    # features: phase-flipped, noise-whitened low-resolution pixels (DC left out)
    inv_s2 = 1.0 / np.maximum(np.asarray(sigma2, float)[:, shells], 1e-30)  # (C, P)
    outer = xp.asarray(shells > 0)
    flipped = (X * xp.sign(c))[:, outer]
    Zs = []
    for j, rows in enumerate(members):
        feat = flipped[xp.asarray(rows)] * xp.asarray(np.sqrt(inv_s2[j, shells > 0]))
        Z = xp.concatenate([feat.real, feat.imag], axis=1)
        Zs.append(Z - Z.mean(axis=0))
    del flipped
    scores = _principal_scores(Zs, n_components, seed)
    del Zs
    # the clustering on the host: a few values per particle
    labels, separations = [], []
    for s in scores:
        s = to_numpy(s)
        lab = _two_means(s, seed)
        # label 0 is the larger cluster (the class keeps it; the free class gets cluster 1):
        # the components' signs, and so the clusters' order, differ between LAPACK and
        # cuSOLVER
        if 2 * lab.sum() > len(lab) or (2 * lab.sum() == len(lab) and lab[0]):
            lab = 1 - lab
        labels.append(lab)
        separations.append(_separation(s, lab))
    # the Wiener averages of the 2 C clusters: sums by cluster in one scatter
    rows = xp.asarray(np.concatenate(members))
    cluster = xp.asarray(np.concatenate([2 * j + lab for j, lab in enumerate(labels)]))
    C, P = len(members), X.shape[1]
    crow = c[rows]
    cx = crow * X[rows]
    sums = xp.zeros((2 * C, 3 * P), xp.float64)  # per cluster: sum c X (re, im), sum c^2
    add_rows_at(sums, cluster, xp.concatenate([cx.real, cx.imag, crow * crow], axis=1))
    del crow, cx
    cx, cc = sums[:, :P] + 1j * sums[:, P:2 * P], sums[:, 2 * P:]
    fudge = tau2_fudge * np.asarray(tau2, float)[:, shells]
    reg = np.where(shells >= 1, 1.0 / np.maximum(fudge, 1e-30), 0.0)
    inv2, reg2 = (xp.asarray(np.repeat(a, 2, axis=0)) for a in (inv_s2, reg))
    half = xp.zeros((fft_batch(2 * C, xp), N * (N // 2 + 1)), xp.complex128)
    half[:2 * C, xp.asarray(flat)] = cx * inv2 / xp.maximum(cc * inv2 + reg2, 1e-30)
    out = (ifft2_centered(half.reshape(-1, N, N // 2 + 1), N)[:2 * C]
           * xp.asarray(mask)).astype(xp.float32)
    out = to_numpy(out).reshape(C, 2, N, N)
    return [(out[j], labels[j], separations[j]) for j in range(C)]


def _class_frame_pixels(images, psi, offsets, ctf, size: int, pixel_size: float, xp=None,
                        chunk_bytes: int = 1 << 27):
    """The particles' Fourier pixels in class frames: shifted by their origins, rotated by psi.

    Parameters
    ----------
    images : ndarray of shape (n, N, N)
    psi : ndarray of shape (n, J)
        In-plane angles (deg): ``J`` class frames per particle.
    offsets : ndarray of shape (n, 2)
        RELION origins (pixels).
    ctf : CTFParams or None
    size : int
        Fourier box: the pixels with ``|q| < size / 2`` (DC included) are sampled.
    pixel_size : float
    xp : module, optional
        Where to compute (default: the images' module). Host images go there in chunks of
        about ``chunk_bytes`` (with their transforms, the largest arrays made here).

    Returns
    -------
    X : complex array of shape (n, J, P)
        ``X[i, j, p]``: particle ``i``'s transform at ``A(psi_ij) q_p`` (bilinear), with
        ``q_p`` the class-frame pixel ``p``.
    c : array of shape (n, J, P), float64
        The CTF at the same points (ones without CTF).
    flat : ndarray of shape (P,)
        Indices of the pixels in the ``(N, N//2+1)`` half plane.
    kx, ky : ndarray of shape (P,)
        Their Fourier indices ``q_p``.
    shells : ndarray of shape (P,), int
    """
    from ..ctf import ctf_at
    from ..data.conventions import inplane_matrix
    from ..fourier import window_2d
    from ._estep import _pixels

    xp = array_module(images) if xp is None else xp
    n, N = images.shape[0], images.shape[-1]
    J = psi.shape[1]
    # only |k| < size / 2 is used: window the transforms to that (plus a margin for the
    # interpolation). The transforms are of the images as stored (origin at the corner); one
    # phase per axis moves the origin to the box centre (fft2_centered's ifftshift), shifts by
    # +origin (shift_phases_2d) and divides by N^2: exp(2 pi i k (N//2 - origin) / N) / N^2
    n_w = min(N, size + 4 + size % 2)
    step = max(1, chunk_bytes // (4 * N * N))
    parts = []
    for i in range(0, max(n, 1), step):
        part = xp.asarray(images[i:i + step], dtype=xp.float32)
        if xp is not np and len(part) < step:  # one cuFFT plan for every chunk and class
            part = xp.concatenate([part, xp.zeros((step - len(part), N, N), xp.float32)])
        parts.append(window_2d(fft_module(xp).rfft2(part, axes=(-2, -1)), n_w))
    F = xp.concatenate(parts)[:n]
    o = xp.asarray(offsets, dtype=xp.float64)
    k_y = xp.asarray(np.fft.fftfreq(n_w, 1.0 / n_w))[None]
    k_x = xp.arange(n_w // 2 + 1, dtype=xp.float64)[None]
    F *= xp.exp((2j * np.pi / N) * k_y * (N // 2 - o[:, 1, None])).astype(xp.complex64)[:, :, None]
    F *= (xp.exp((2j * np.pi / N) * k_x * (N // 2 - o[:, 0, None]))
          / (N * N)).astype(xp.complex64)[:, None, :]
    flat, kx, ky, shells = _pixels(N, size, include_dc=True)
    A = inplane_matrix(xp.asarray(psi, dtype=xp.float64).ravel()).reshape(n, J, 2, 2)
    # particle-frame coordinates A q (particle pixel k <-> class pixel A^T k), (n, J * P)
    qx, qy = xp.asarray(kx), xp.asarray(ky)
    px = (A[..., 0, 0, None] * qx + A[..., 0, 1, None] * qy).reshape(n, -1)
    py = (A[..., 1, 0, None] * qx + A[..., 1, 1, None] * qy).reshape(n, -1)
    X = _interp_halfplane(F, px, py).reshape(n, J, -1)
    if ctf is not None:
        c = ctf_at(ctf, px, py, N, pixel_size, xp, aligned=True).astype(
            xp.float64).reshape(n, J, -1)
    else:
        c = xp.ones(X.shape)
    return X, c, flat, kx, ky, shells


def realign_class(images, ctf, sigma2, tau2, tau2_fudge, size: int, current, mask,
                  pixel_size: float, *, offset_range: float = 3.0, n_starts: int = 8,
                  n_keep: int = 2, n_iter: int = 10, n_psi: int = 72, seed: int = 0, xp=np):
    """Align one class's particles afresh (reference-free), for a class smeared by rotation.

    A class can settle as the rotational average of its view (a round blob): its particles'
    angles are then arbitrary, the average stays round, and EM keeps that state to the end
    (a local optimum; on one 10-view SNR 0.05 set, the view's particles scattered over the
    classes and 85% of the remaining ones had angle errors above 20 deg). This runs a
    one-class EM over in-plane angles and shifts on the class's particles, from
    ``n_starts`` single particles (three iterations each, then the ``n_keep`` most likely
    ones to ``n_iter``) and from the current class image, and returns the best result with
    its log-likelihood gain over the current image's.

    Parameters
    ----------
    images : ndarray of shape (n, N, N), float32
        The class's particles (norm-corrected).
    ctf : CTFParams or None
    sigma2 : ndarray of shape (N//2+1,)
        Noise power per shell.
    tau2 : ndarray of shape (N//2+1,)
        Signal power prior per shell (a typical class's).
    tau2_fudge : float
    size : int
        Fourier box limiting the resolution used.
    current : ndarray of shape (N, N)
        The current class image.
    mask : ndarray of shape (N, N)
    pixel_size : float
    offset_range : float
        Shifts (pixels) searched about the particles' box centres; their current origins are
        not used (those of a smeared class are unreliable).
    n_starts, n_keep, n_iter, n_psi : int
        Starts, starts kept after three iterations, EM iterations, in-plane angles.
    seed : int
    xp : module
        Where to compute (``numpy`` or ``cupy``, on the current device); the inputs and the
        results are host arrays either way.

    Returns
    -------
    image : ndarray of shape (N, N), float32
        The best start's average (masked).
    gain : float
        Its log-likelihood minus that of the run started from ``current``, per particle
        (> 0: it explains the particles better).
    """
    from ..fourier import fft2_centered, ifft2_centered

    n, N = images.shape[0], images.shape[-1]
    psi = np.broadcast_to(np.arange(n_psi) * (360.0 / n_psi), (n, n_psi))
    X, c, flat, kx, ky, shells = _class_frame_pixels(images, psi, np.zeros((n, 2)), ctf, size,
                                                     pixel_size, xp)
    P = X.shape[-1]
    half = xp.asarray(1.0 / (2.0 * np.maximum(sigma2[shells], 1e-30)))
    CX = (c * X * half).astype(xp.complex64).reshape(n * n_psi, P)
    CC = (c * c * half).astype(xp.float32)  # (n, J, P)
    reg = xp.asarray(np.where(shells >= 1, 1.0 / np.maximum(2.0 * tau2_fudge * tau2[shells],
                                                            1e-30), 0.0))
    # shifts of the reference (class frame) on a grid within offset_range
    step = max(1.0, offset_range / 3.0)
    g = np.arange(-np.floor(offset_range / step), np.floor(offset_range / step) + 1) * step
    sh = np.array([(x, y) for x in g for y in g if x * x + y * y <= offset_range**2 + 1e-9])
    ph = xp.asarray(np.exp(2j * np.pi * (np.outer(kx, sh[:, 0]) + np.outer(ky, sh[:, 1])) / N),
                    dtype=xp.complex64)  # (P, T): the cross term of the reference shifted by -t
    T = len(sh)

    def scaled(a0):
        # the start scaled to the particles (least squares at each particle's best angle)
        cross = 2 * xp.real(CX @ xp.conj(a0).astype(xp.complex64)).reshape(n, n_psi)
        quad = CC @ (xp.abs(a0) ** 2).astype(xp.float32)
        best = cross.argmax(axis=1)
        r = xp.arange(n)
        ratio = to_numpy(cross[r, best] / (2 * xp.maximum(quad[r, best], 1e-30)))
        return a0 * max(float(np.median(ratio)), 0.0)  # (CuPy's median compiles 17 kernels)

    def run(a, iters):
        for _ in range(iters):
            ll = 2 * xp.real((CX * xp.conj(a).astype(xp.complex64)) @ ph).reshape(n, n_psi, T)
            ll -= (CC @ (xp.abs(a) ** 2).astype(xp.float32))[..., None]
            top = ll.reshape(n, -1).max(axis=1)  # log-sum-exp over (angle, shift)
            L = xp.log(xp.exp(ll.reshape(n, -1) - top[:, None]).sum(axis=1)) + top
            w = xp.exp(ll - L[:, None, None]).astype(xp.float32)
            num = (CX * (w.reshape(-1, T) @ ph.T)).sum(axis=0)
            den = xp.einsum("nj,njp->p", w.sum(axis=-1), CC) + reg
            a = num / xp.maximum(den, 1e-30)
        return a, L

    cur = xp.asarray(fft2_centered(np.asarray(current, np.float32)).reshape(-1)[flat])
    _, l_cur = run(scaled(cur), n_iter)
    # every start a few iterations, the most likely ones to the end
    rng = np.random.default_rng(seed)
    first = min(3, n_iter)
    runs = []
    for i in rng.choice(n, min(n_starts, n), replace=False):
        ci, xi = c[i, 0], X[i, 0]
        runs.append(run(scaled(ci * xi / (ci * ci + 0.1)), first))
    runs.sort(key=lambda r: -float(r[1].sum()))
    best_a, best_l = max((run(a, n_iter - first) if n_iter > first else (a, ll)
                          for a, ll in runs[:n_keep]), key=lambda r: float(r[1].sum()))
    out = xp.zeros(N * (N // 2 + 1), xp.complex128)
    out[xp.asarray(flat)] = best_a
    image = ifft2_centered(out.reshape(N, N // 2 + 1), N) * xp.asarray(mask)
    return to_numpy(image).astype(np.float32), float((best_l - l_cur).mean())


def _principal_scores(Zs: list, n_components: int, seed: int, n_power: int = 4,
                      extra: int = 10, max_bytes: int = 1 << 28) -> list:
    """Scores of the rows of each ``Z`` on its first principal components (randomised SVD).

    Subspace iteration (Halko, Martinsson & Tropp 2011) with ``extra`` more directions than
    needed and ``n_power`` power iterations: the leading components of a (n, m) matrix in
    O(n m (k + extra)) instead of a full SVD's O(n m min(n, m)). Matrices of one width are
    computed together, as a stack padded with zero rows (at most ``max_bytes`` a stack; the
    zero rows change neither the subspaces nor the other rows' scores): one batched product
    or QR factorisation per step for all of them, where one matrix at a time took ~9 ms of
    small GPU operations each (0.45 s of a re-seeding check at K=100). The last step's SVD
    of the (k, m) projection ``B = Q^T Z`` is taken from the eigenvectors of ``B B^T``
    (k x k, on the host).

    Parameters
    ----------
    Zs : list of arrays of shape (n_i, m)
        Centred features, rows = particles; one module (NumPy or CuPy) for all.
    n_components, seed, n_power, extra, max_bytes

    Returns
    -------
    list of arrays of shape (n_i, n_components)
        ``U[:, :k] * S[:k]`` of each SVD ``Z = U S V^T`` (signs arbitrary).
    """
    out = [None] * len(Zs)
    todo = []
    for i, Z in enumerate(Zs):
        xp = array_module(Z)
        if min(n_components + extra, *Z.shape) >= min(Z.shape) // 2:
            # small matrix: the exact SVD is as cheap
            u, s, _ = xp.linalg.svd(Z, full_matrices=False)
            out[i] = u[:, :n_components] * s[:n_components]
        else:
            todo.append(i)
    todo.sort(key=lambda i: -Zs[i].shape[0])
    while todo:
        n, m = Zs[todo[0]].shape
        size = max(1, max_bytes // (8 * n * m))
        group = [i for i in todo[:size] if Zs[i].shape[1] == m]
        todo = [i for i in todo if i not in group]
        xp = array_module(Zs[group[0]])
        Zb = xp.zeros((len(group), n, m), Zs[group[0]].dtype)
        for g, i in enumerate(group):
            Zb[g, :Zs[i].shape[0]] = Zs[i]
        k = n_components + extra
        rng = np.random.default_rng(seed)  # the same start on either backend
        q, _ = xp.linalg.qr(Zb @ xp.asarray(rng.standard_normal((m, k)), dtype=Zb.dtype))
        ZbT = Zb.transpose(0, 2, 1)
        for _ in range(n_power):
            q, _ = xp.linalg.qr(ZbT @ q)
            q, _ = xp.linalg.qr(Zb @ q)
        B = q.transpose(0, 2, 1) @ Zb  # (G, k, m)
        w, v = np.linalg.eigh(to_numpy(B @ B.transpose(0, 2, 1)))  # ascending
        top = v[:, :, ::-1][:, :, :n_components] * np.sqrt(np.maximum(
            w[:, ::-1][:, None, :n_components], 0))
        scores = q @ xp.asarray(top, dtype=q.dtype)
        for g, i in enumerate(group):
            out[i] = scores[g, :Zs[i].shape[0]]
    return out


def _separation(scores, labels) -> float:
    """Fisher separation of a 2-cluster labelling along the line joining the centres."""
    if labels.min() == labels.max():
        return 0.0
    c0, c1 = scores[labels == 0].mean(axis=0), scores[labels == 1].mean(axis=0)
    d = c1 - c0
    nd = np.linalg.norm(d)
    if nd == 0:
        return 0.0
    proj = scores @ (d / nd)
    v = (proj[labels == 0].var() * (labels == 0).sum() + proj[labels == 1].var()
         * (labels == 1).sum()) / len(labels)
    return float(nd / np.sqrt(max(v, 1e-30)))


def _two_means(x, seed: int, n_iter: int = 30):
    """2-means clustering of rows of ``x`` started from the sign of the first column."""
    labels = (x[:, 0] > np.median(x[:, 0])).astype(int)
    for _ in range(n_iter):
        cent = np.stack([x[labels == g].mean(axis=0) if (labels == g).any() else
                         x[np.random.default_rng(seed).integers(len(x))] for g in range(2)])
        d = ((x[:, None, :] - cent[None]) ** 2).sum(axis=-1)
        new = d.argmin(axis=1)
        if (new == labels).all():
            break
        labels = new
    return labels


def _interp_halfplane(F, x, y):
    """Bilinear interpolation of half-plane transforms at (x, y) Fourier coordinates.

    Points with ``x < 0`` are read at ``(-x, -y)`` and conjugated (Friedel symmetry);
    neighbours beyond the box's Nyquist frequency count as zero.

    Parameters
    ----------
    F : complex array of shape (n, N, N//2+1)
    x, y : float arrays of shape (n, Q)
        Transform ``i``'s points in row ``i``.

    Returns
    -------
    complex array of shape (n, Q)
    """
    xp = array_module(F)
    n, N, W = F.shape
    h = N // 2
    neg = x < 0
    x = xp.abs(x)
    y = xp.where(neg, -y, y)
    x0, y0 = xp.floor(x), xp.floor(y)
    fx, fy = (x - x0).astype(xp.float32), (y - y0).astype(xp.float32)
    x0, y0 = x0.astype(xp.int64), y0.astype(xp.int64)
    flat = F.reshape(-1)  # (n * N * W,): one view, indexed below
    base = (xp.arange(n) * (N * W))[:, None] + x0
    # every neighbour inside the box (the usual case): no bounds to test
    inside = x0.size == 0 or (int(x0.max()) < h and int(xp.abs(y0).max()) < h)
    out = xp.zeros(x.shape, xp.result_type(F.dtype, xp.complex64))
    for dy in (0, 1):
        yi = y0 + dy
        row = xp.mod(yi, N) * W + base
        wy = fy if dy else 1 - fy
        for dx in (0, 1):
            b = (fx if dx else 1 - fx) * wy
            if inside:
                out += b * flat[row + dx]
            else:
                xi = x0 + dx
                b = xp.where((xp.abs(yi) <= h) & (xi <= h), b, 0)
                out += b * flat[row + dx - xp.maximum(xi - h, 0)]
    return xp.where(neg, out.conj(), out)
