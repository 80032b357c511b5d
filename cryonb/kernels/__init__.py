"""Per-backend kernels: the only place with separate CPU (Numba) and GPU (CuPy) code.

Each public function dispatches on its arguments' array module and has a plain NumPy reference
(``*_reference``) that the tests compare both implementations against.
"""

from ._insert import insert_slices_2d, insert_slices_2d_reference

__all__ = ["insert_slices_2d", "insert_slices_2d_reference"]
