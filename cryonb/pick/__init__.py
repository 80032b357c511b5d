"""Template autopicking and particle extraction, as RELION 3.1 does them.

Autopicking (``cryonb autopick``; RELION's ``relion_autopick``) slides 2D references over each
micrograph at every in-plane angle and scores each position with RELION's figure of merit
(:mod:`cryonb.pick._fom`): the probability ratio of "the local background-normalised micrograph
is this (CTF-modulated) reference plus unit noise" over "it is pure noise", as a fraction of
the ratio expected for a true particle. Peaks above ``--threshold``, at least
``--min_distance`` apart, become picks: ``<odir><micrograph>_<pickname>.star`` per micrograph
(``rlnCoordinateX/Y`` in micrograph pixels, ``rlnClassNumber``, ``rlnAutopickFigureOfMerit``,
``rlnAnglePsi``), ``<odir><pickname>.star`` (their list) and ``<odir>summary.star``.

The references must be in units of the micrograph noise sigma (as 2D class averages of
``--norm``-extracted particles are): the figure of merit compares absolute amplitudes, so
references k times too bright score about ``2/k - 1`` on true particles. White references pick
dark particles with ``--invert``.

Extraction (``cryonb extract``; ``relion_preprocess --extract``) cuts boxes at picked
coordinates, optionally rescales, normalises and inverts them, and writes a stack per
micrograph with a RELION 3.1 particles STAR file carrying each micrograph's CTF
(:mod:`cryonb.pick.extract`).

Layer 3: the array code runs on NumPy or CuPy (per call), the per-backend hot loops are in
:mod:`cryonb.kernels`; nothing here imports :mod:`cryonb.parallel` (device maps are resolved by
the caller and passed as one device per rank).
"""

from ._config import AutopickConfig
from ._fom import (
    COORDINATE_COLUMNS,
    PeakOptions,
    PickGeometry,
    PickMaps,
    TemplatePicker,
    good_fourier_size,
    prepare_micrograph,
)
from ._io import (
    MicrographSet,
    coordinate_path,
    micrograph_root,
    read_coordinates,
    write_coordinate_list,
    write_coordinates,
)
from ._score import match_picks, score_picks
from ._sim import PickSet, simulate_pick_set, sphere_views
from ._templates import (
    PickTemplates,
    estimate_particle_diameter,
    read_references,
    relion_fourier_rows,
    relion_round,
    resize_images_fourier,
)
from .autopick import (
    AutopickResult,
    MicrographPicks,
    RankWork,
    autopick_engine,
    autopick_result,
    divide_equally,
    open_autopick_rank,
    open_picker,
    pick_micrographs,
    run_autopick,
    write_summary,
)
from .extract import (
    ExtractConfig,
    ExtractResult,
    extract_boxes,
    extract_micrographs,
    extract_result,
    normalise_particles,
    open_extract_rank,
    run_extract,
    write_particle_star,
)

__all__ = [
    "COORDINATE_COLUMNS",
    "AutopickConfig",
    "AutopickResult",
    "ExtractConfig",
    "ExtractResult",
    "MicrographPicks",
    "MicrographSet",
    "PeakOptions",
    "PickGeometry",
    "PickMaps",
    "PickSet",
    "PickTemplates",
    "RankWork",
    "TemplatePicker",
    "autopick_engine",
    "autopick_result",
    "coordinate_path",
    "divide_equally",
    "estimate_particle_diameter",
    "extract_boxes",
    "extract_micrographs",
    "extract_result",
    "good_fourier_size",
    "match_picks",
    "micrograph_root",
    "normalise_particles",
    "open_autopick_rank",
    "open_extract_rank",
    "open_picker",
    "pick_micrographs",
    "prepare_micrograph",
    "read_coordinates",
    "read_references",
    "relion_fourier_rows",
    "relion_round",
    "resize_images_fourier",
    "run_autopick",
    "run_extract",
    "score_picks",
    "simulate_pick_set",
    "sphere_views",
    "write_coordinate_list",
    "write_coordinates",
    "write_particle_star",
    "write_summary",
]
