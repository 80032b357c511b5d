"""Per-backend kernels: the only place with separate CPU (Numba) and GPU (CuPy) code.

Each public function dispatches on its arguments' array module and has a plain NumPy reference
(``*_reference``) that the tests compare both implementations against.
"""

from ._bins import add_bincount, weighted_bincounts, weighted_bincounts_reference
from ._coarse import (
    PRECISIONS,
    coarse_log_posterior,
    coarse_log_posterior_reference,
    cross_products,
    split_tf32,
    split_tf32_reference,
    tf32_enabled,
)
from ._ctfvals import ctf_values, ctf_values_reference, ctf_weights, ctf_weights_reference
from ._fine import (
    FineSamples,
    fine_sample_terms,
    fine_sample_terms_reference,
    fine_weights,
    fine_weights_reference,
)
from ._host import host_empty, to_host
from ._insert import (
    insert_accumulated_2d,
    insert_rows_2d,
    insert_slices_2d,
    insert_slices_2d_reference,
)
from ._peaks import (
    find_peaks_2d,
    find_peaks_2d_reference,
    prune_peak_clusters,
    prune_peak_clusters_reference,
    remove_close_peaks,
    remove_close_peaks_reference,
    update_best_2d,
    update_best_2d_reference,
)
from ._pose import (
    pose_neighbours,
    pose_neighbours_reference,
    refine_pose,
    refine_pose_reference,
)
from ._prepare import (
    mask_images_2d,
    mask_images_2d_reference,
    mask_outside,
    shifted_images_ri,
    shifted_images_ri_reference,
    window_shift,
    window_shift_reference,
)
from ._sampled import (
    ShiftedBlocks,
    block_order,
    residual_sums_blocks,
    residual_sums_reference,
    sampled_dot,
    sampled_dot_blocks,
    sampled_dot_reference,
    scatter_blocks,
    scatter_blocks_residual,
    scatter_products,
    scatter_products_reference,
    scatter_shifted_residual,
    shifted_blocks,
    shifted_dot_blocks,
)
from ._segments import nonzero_each, segment_argmax, segment_starts, segment_sums
from ._select import (
    significant_in_segments,
    significant_indices,
    significant_samples,
    significant_samples_reference,
)
from ._shells import ShellTable, shell_power, shell_power_reference, shell_sums, shell_table

__all__ = [
    "PRECISIONS",
    "FineSamples",
    "ShellTable",
    "ShiftedBlocks",
    "add_bincount",
    "block_order",
    "coarse_log_posterior",
    "coarse_log_posterior_reference",
    "cross_products",
    "ctf_values",
    "ctf_values_reference",
    "ctf_weights",
    "ctf_weights_reference",
    "find_peaks_2d",
    "find_peaks_2d_reference",
    "fine_sample_terms",
    "fine_sample_terms_reference",
    "fine_weights",
    "fine_weights_reference",
    "host_empty",
    "insert_accumulated_2d",
    "insert_rows_2d",
    "insert_slices_2d",
    "insert_slices_2d_reference",
    "mask_images_2d",
    "mask_images_2d_reference",
    "mask_outside",
    "nonzero_each",
    "pose_neighbours",
    "pose_neighbours_reference",
    "prune_peak_clusters",
    "prune_peak_clusters_reference",
    "refine_pose",
    "refine_pose_reference",
    "remove_close_peaks",
    "remove_close_peaks_reference",
    "residual_sums_blocks",
    "residual_sums_reference",
    "sampled_dot",
    "sampled_dot_blocks",
    "sampled_dot_reference",
    "scatter_blocks",
    "scatter_blocks_residual",
    "scatter_products",
    "scatter_products_reference",
    "scatter_shifted_residual",
    "segment_argmax",
    "segment_starts",
    "segment_sums",
    "shell_power",
    "shell_power_reference",
    "shell_sums",
    "shell_table",
    "shifted_blocks",
    "shifted_dot_blocks",
    "shifted_images_ri",
    "shifted_images_ri_reference",
    "significant_in_segments",
    "significant_indices",
    "significant_samples",
    "significant_samples_reference",
    "split_tf32",
    "split_tf32_reference",
    "tf32_enabled",
    "to_host",
    "update_best_2d",
    "update_best_2d_reference",
    "weighted_bincounts",
    "weighted_bincounts_reference",
    "window_shift",
    "window_shift_reference",
]
