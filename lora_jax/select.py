"""Import path of AntiPaSTO's data-driven dimension selection, which lives beside the
variant in :mod:`lora_jax.variants.antipasto_select`."""

from lora_jax.variants.antipasto_select import (
    ProjectionStats,
    full_svd,
    l1_trip,
    polarity_interleave,
    projection_stats,
    rebase,
    select_dimensions,
    top_indices,
    wanda_scores,
)

__all__ = [
    "ProjectionStats",
    "full_svd",
    "l1_trip",
    "polarity_interleave",
    "projection_stats",
    "rebase",
    "select_dimensions",
    "top_indices",
    "wanda_scores",
]
