"""Particle data and RELION's conventions (Euler angles, origins, CTF parameters)."""

from .conventions import euler_to_matrix, inplane_matrix, matrix_to_euler, rotated_indices

__all__ = ["euler_to_matrix", "inplane_matrix", "matrix_to_euler", "rotated_indices"]
