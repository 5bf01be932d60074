"""Where the spectrum files of a survey live: the real SDSS directory layout of aspcapStar and
apStar files below a survey root (DR17 paths by default, any other release's as a format string)."""

from __future__ import annotations

from pathlib import Path

SPECTRA_LAYOUT = {
    "aspcapStar": "apogee/spectro/aspcap/dr17/synspec_rev1/{TELESCOPE}/{FIELD}/aspcapStar-dr17-{APOGEE_ID}.fits",
    "apStar": "apogee/spectro/redux/dr17/stars/{TELESCOPE}/{FIELD}/apStar-dr17-{APOGEE_ID}.fits",
}


def spectra_layout(kind: str, layout: str | None = None) -> str:
    """The path template of ``kind``'s spectrum files below the spectra root: ``layout`` when given
    (another data release or a local mirror; fields ``{TELESCOPE}``, ``{FIELD}``, ``{APOGEE_ID}``),
    else DR17's (:data:`SPECTRA_LAYOUT`). ValueError names a bad kind or template."""
    if kind not in SPECTRA_LAYOUT:
        raise ValueError(f"unknown spectra_kind {kind!r}; use one of {sorted(SPECTRA_LAYOUT)}")
    if not layout:
        return SPECTRA_LAYOUT[kind]
    try:
        layout.format(TELESCOPE="t", FIELD="f", APOGEE_ID="a")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"spectra_layout {layout!r} is not a path template with {{TELESCOPE}}, {{FIELD}} and "
                         f"{{APOGEE_ID}} fields ({type(exc).__name__}: {exc})") from None
    if "{APOGEE_ID}" not in layout:
        raise ValueError(f"spectra_layout {layout!r} must contain {{APOGEE_ID}} (one file per star)")
    return layout


def spectrum_path(root: str | Path, kind: str, telescope: str, field: str, apogee_id: str,
                  layout: str | None = None) -> Path:
    """Path of a star's spectrum file in the SDSS directory layout (DR17's, or ``layout``)."""
    rel = spectra_layout(kind, layout).format(TELESCOPE=telescope, FIELD=field, APOGEE_ID=apogee_id)
    return Path(root) / rel
