"""Engineered features for tabular models: spectral indices, colour–magnitude features,
abundance ratios, and the per-star feature table (``stellarnet.features.tabular``).

Never imports ``stellarnet.simulate``: features do not know whether their input is simulated.
"""

from stellarnet.features.derived import abundance_ratios, colour_magnitude_features, reduced_proper_motion
from stellarnet.features.indices import (
    CONTINUUM_MODES,
    KINDS,
    IndexMeasurer,
    IndexWindow,
    air_to_vacuum,
    brackett_wavelength,
    default_windows,
    load_windows,
    measure_indices,
)
from stellarnet.features.tabular import (
    build_feature_table,
    default_output_path,
    load_features_config,
    read_features,
    write_features,
)

__all__ = [
    "CONTINUUM_MODES",
    "KINDS",
    "IndexMeasurer",
    "IndexWindow",
    "abundance_ratios",
    "air_to_vacuum",
    "brackett_wavelength",
    "build_feature_table",
    "colour_magnitude_features",
    "default_output_path",
    "default_windows",
    "load_features_config",
    "load_windows",
    "measure_indices",
    "read_features",
    "reduced_proper_motion",
    "write_features",
]
