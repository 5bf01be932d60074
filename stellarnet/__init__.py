"""stellarnet: stellar parameters and classes from APOGEE spectra."""

__version__ = "0.1.0"
