"""Fourier tools: centred FFTs, radial shells, central-slice projection, rotations, shifts.

One code path for NumPy and CuPy: the array module is chosen per call from the data.
Conventions: half-plane transforms (``kx >= 0``), RELION's forward normalisation (divide by the
number of pixels), image origin at ``n // 2``.
"""

from ._project import (
    Projector,
    gridding_correct,
    pad_centered,
    rotate_2d,
    shift_2d,
    shift_phases_2d,
    window_2d,
)
from ._transforms import (
    fft2_centered,
    fft3_centered,
    frequency_grid_2d,
    ifft2_centered,
    ifft3_centered,
    radial_index_2d,
    shell_average,
    shell_sum,
)

__all__ = [
    "Projector",
    "fft2_centered",
    "fft3_centered",
    "frequency_grid_2d",
    "gridding_correct",
    "ifft2_centered",
    "ifft3_centered",
    "pad_centered",
    "radial_index_2d",
    "rotate_2d",
    "shell_average",
    "shell_sum",
    "shift_2d",
    "shift_phases_2d",
    "window_2d",
]
