"""File input/output: MRC maps and stacks, STAR tables, RELION particle tables.

Layer 0: NumPy and pandas only. Every reader fails on bad input with a
:class:`cryonb.errors.InputError` that names the file, the field or line at fault and what to
do; every writer is atomic (the target appears complete or not at all).

MRC (through :mod:`mrcfile`)
    :func:`read_mrc`, :func:`read_mrc_header`, :func:`read_map`, :func:`read_stack`,
    :func:`write_mrc`, :class:`MrcVolume`. Arrays are float32 in ``(z, y, x)`` order for
    volumes and ``(n, y, x)`` for image stacks; voxel sizes in Angstrom.
STAR (through :mod:`starfile`)
    :func:`read_star`, :func:`write_star`: ``{block name: DataFrame}``.
RELION particles and micrographs
    :func:`read_particles` -> :class:`ParticleTable` (optics merged per particle, images,
    CTF parameters), :func:`write_particles`, :func:`split_optics`,
    :func:`read_micrographs` -> :class:`MicrographTable`, :func:`parse_image_name`,
    :func:`resolve_stack_path`.
Other
    :func:`atomic_write`, :func:`atomic_path`, :func:`describe`.
"""

from __future__ import annotations

from ._atomic import atomic_path, atomic_write, output_folder
from ._describe import describe
from ._mrc import MrcVolume, read_map, read_mrc, read_mrc_header, read_stack, write_mrc
from ._particles import (
    OPTICS_LABELS,
    MicrographTable,
    ParticleTable,
    parse_image_name,
    project_name,
    read_micrographs,
    read_particles,
    resolve_stack_path,
    split_optics,
    write_particles,
)
from ._star import RELION_STRING_LABELS, read_star, write_star

__all__ = [
    "OPTICS_LABELS",
    "RELION_STRING_LABELS",
    "MicrographTable",
    "MrcVolume",
    "ParticleTable",
    "atomic_path",
    "atomic_write",
    "describe",
    "output_folder",
    "parse_image_name",
    "project_name",
    "read_map",
    "read_micrographs",
    "read_mrc",
    "read_mrc_header",
    "read_particles",
    "read_stack",
    "read_star",
    "resolve_stack_path",
    "split_optics",
    "write_mrc",
    "write_particles",
    "write_star",
]
