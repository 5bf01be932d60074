"""Simulated APOGEE-like survey in the real file formats (allStar, aspcapStar, GALAH DR3,
LAMOST DR7, truth). Only entry points may import this package; ``stellarnet.io``,
``stellarnet.network`` and ``stellarnet.evaluation`` never do.

Main entry: :func:`stellarnet.simulate.survey.simulate_survey`; CLI ``python -m stellarnet.simulate``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["simulate_survey", "KuruczEmulator", "load_emulator", "label_box"]


def __getattr__(name: str) -> Any:  # lazy: importing the package stays cheap
    if name == "simulate_survey":
        from stellarnet.simulate.survey import simulate_survey

        return simulate_survey
    if name in ("KuruczEmulator", "load_emulator", "label_box"):
        from stellarnet.physics import kurucz as emulator

        return getattr(emulator, name)
    raise AttributeError(name)
