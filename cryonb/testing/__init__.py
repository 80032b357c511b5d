"""Reference data and scores for tests and benchmarks.

- :mod:`cryonb.testing.relion`: data sets and runs made by RELION's own programs
  (:func:`make_class2d_set`, :func:`run_relion_class2d`);
- :mod:`cryonb.testing.metrics`: class purity, in-plane and offset errors against truth.

Nothing here is imported by the rest of cryonb; it needs RELION only when its functions run.
"""

from __future__ import annotations

from .metrics import (
    InplaneErrors,
    OffsetErrors,
    circular_median_deg,
    class_purity,
    inplane_errors,
    majority_views,
    offset_errors,
    rotate_2d,
    score_class2d,
)
from .relion import (
    RIBOSOME_70S_PIXEL_SIZE,
    ClassSet,
    RelionCommandError,
    RelionRun,
    default_map_path,
    fibonacci_views,
    find_relion_tool,
    make_class2d_set,
    oracle_purity,
    read_relion_data,
    run_relion_class2d,
    score_relion_run,
    view_templates,
    write_relion31_star,
)

__all__ = [
    "RIBOSOME_70S_PIXEL_SIZE",
    "ClassSet",
    "InplaneErrors",
    "OffsetErrors",
    "RelionCommandError",
    "RelionRun",
    "circular_median_deg",
    "class_purity",
    "default_map_path",
    "fibonacci_views",
    "find_relion_tool",
    "inplane_errors",
    "majority_views",
    "make_class2d_set",
    "offset_errors",
    "oracle_purity",
    "read_relion_data",
    "rotate_2d",
    "run_relion_class2d",
    "score_class2d",
    "score_relion_run",
    "view_templates",
    "write_relion31_star",
]
