"""The allStar columns the pipeline uses (docs/architecture.md, "allStar schema") and the label columns
allStar lacks but can be derived from ones it has (``ALPHA_FE`` = [α/Fe] = ``ALPHA_M + M_H − FE_H``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

#: Default columns the pipeline reads (architecture.md, "allStar schema"); absent ones are
#: skipped when ``columns=None``. The ``*FLAGS`` name strings (S256) are not read by default:
#: the integer bitmasks carry the same information at a fraction of the memory.
#: Label columns allStar does not hold, derived from ones it does: name → (terms, error column).
#: ``ALPHA_FE`` = [α/Fe] = ``ALPHA_M + M_H − FE_H`` (DR17 reports [α/M]; [α/Fe] = [α/M] + [M/H] −
#: [Fe/H]); its error is ``ALPHA_M_ERR`` (the errors of M_H and FE_H are strongly correlated and
#: largely cancel in the difference). Terms are (sign, column).
DERIVED_COLUMNS: dict[str, tuple[tuple[tuple[int, str], ...], str]] = {
    "ALPHA_FE": (((1, "ALPHA_M"), (1, "M_H"), (-1, "FE_H")), "ALPHA_M_ERR"),
}


def columns_to_read(names: Sequence[str], available: Sequence[str]) -> list[str]:
    """The file columns needed for ``names``: a name the file has is read as it is; a
    :data:`DERIVED_COLUMNS` name it lacks is replaced by its terms (and ``<name>_ERR`` by its error
    column); anything else is kept, so that :func:`read_allstar` names it as missing."""
    have = {str(a).upper() for a in available}
    out: list[str] = []
    for name in names:
        base = name[:-4] if name.endswith("_ERR") else name
        if name.upper() not in have and base in DERIVED_COLUMNS:
            terms, err = DERIVED_COLUMNS[base]
            out += [err] if name.endswith("_ERR") else [c for _, c in terms]
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def add_derived_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with each :data:`DERIVED_COLUMNS` column (and its ``_ERR``) added where the file did
    not have it and its terms are present (NaN where a term is NaN)."""
    for name, (terms, err) in DERIVED_COLUMNS.items():
        if name in df.columns or not all(c in df.columns for _, c in terms):
            continue
        value = sum(sign * df[c].to_numpy(np.float64) for sign, c in terms)
        df[name] = value
        if err in df.columns and name + "_ERR" not in df.columns:
            df[name + "_ERR"] = df[err].to_numpy(np.float64)
    return df


ALLSTAR_COLUMNS: tuple[str, ...] = (
    "APOGEE_ID", "TELESCOPE", "FIELD",
    "RA", "DEC", "GLON", "GLAT",
    "J", "J_ERR", "H", "H_ERR", "K", "K_ERR",
    "AK_TARG", "AK_WISE", "SFD_EBV",
    "GAIAEDR3_SOURCE_ID",
    "GAIAEDR3_PARALLAX", "GAIAEDR3_PARALLAX_ERROR", "GAIAEDR3_PMRA", "GAIAEDR3_PMDEC",
    "GAIAEDR3_PHOT_G_MEAN_MAG", "GAIAEDR3_PHOT_BP_MEAN_MAG", "GAIAEDR3_PHOT_RP_MEAN_MAG",
    "SNR", "NVISITS", "VHELIO_AVG", "VSCATTER", "VERR",
    "STARFLAG", "ANDFLAG", "EXTRATARG", "ASPCAPFLAG",
    "TEFF", "TEFF_ERR", "LOGG", "LOGG_ERR", "M_H", "M_H_ERR", "ALPHA_M", "ALPHA_M_ERR",
    "FE_H", "FE_H_ERR",
    "C_FE", "C_FE_ERR", "N_FE", "N_FE_ERR", "MG_FE", "MG_FE_ERR",
    "PARAM", "PARAMFLAG",
)
