"""The vocabulary: label names and units, class tasks and their class names — defined here once.

Labels are the allStar names: ``TEFF`` (K), ``LOGG`` (dex, cgs), ``FE_H`` and ``ALPHA_FE`` (dex;
[α/Fe] = ``ALPHA_M + M_H − FE_H`` from DR17's [α/M], :data:`stellarnet.io.allstar_columns.DERIVED_COLUMNS`).
Class codes are indices into the class-name tuples; −1 means undefined. Adding a label or a class
task starts here (then the shard builder's label columns and the network's heads, which read the
dataset's ``data_spec``)."""

from __future__ import annotations

#: the network's regression labels, in this order
LABEL_NAMES: tuple[str, ...] = ("TEFF", "LOGG", "FE_H", "ALPHA_FE")
#: unit of every label (and of the allStar metallicity ``M_H`` the cross-survey tables use)
LABEL_UNITS: dict[str, str] = {"TEFF": "K", "LOGG": "dex", "FE_H": "dex", "ALPHA_FE": "dex", "M_H": "dex"}

SPECTRAL_TYPES: tuple[str, ...] = ("F", "G", "K", "M")
LUMINOSITY_CLASSES: tuple[str, ...] = ("I", "II", "III", "IV", "V")
#: evolutionary stages: main sequence, subgiant, red-giant branch, red clump (codes 0..3)
STAGES: tuple[str, ...] = ("MS", "SG", "RGB", "RC")
#: the network's classification tasks, in this order
CLASS_TASKS: tuple[str, ...] = ("spectral_type", "luminosity_class", "stage")
#: task → class names (code k is ``CLASS_NAMES[task][k]``)
CLASS_NAMES: dict[str, tuple[str, ...]] = {"spectral_type": SPECTRAL_TYPES, "luminosity_class": LUMINOSITY_CLASSES,
                                           "stage": STAGES}


def label_unit(name: str) -> str:
    """Unit of a label, case-insensitive (``""`` for a name not in :data:`LABEL_UNITS`)."""
    return LABEL_UNITS.get(name.upper(), "")
