"""cryonb: see and steer GPU cryo-EM processing from a notebook.

Subpackages (each imported only when used):

- :mod:`cryonb.io` -- MRC/STAR files, RELION particle tables, atomic writers
- :mod:`cryonb.data` -- particle sets and RELION's conventions (Euler angles, origins, CTF)
- :mod:`cryonb.fourier`, :mod:`cryonb.ctf` -- projection, shifts, rotations, CTF
- :mod:`cryonb.simulate` -- phantom maps, particle stacks and micrographs with known truth
- :mod:`cryonb.em` -- 2D classification (maximum-likelihood EM)
- :mod:`cryonb.pick` -- template autopicking
- :mod:`cryonb.parallel` -- ipyparallel engines as MPI-style ranks, ``--gpu`` device maps
- :mod:`cryonb.viz`, :mod:`cryonb.widgets` -- notebook views and job panels
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "show"]


def show(path, **kwargs):
    """Display whatever ``path`` is in a notebook (STAR table, map viewer, class grid).

    See :func:`cryonb.viz.show`.
    """
    from .viz import show as _show

    return _show(path, **kwargs)
