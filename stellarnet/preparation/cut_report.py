"""The report of a selection: for each cut applied, in order, its name, the criterion that ran (written
from the spec, so an override of a threshold shows), the config's reason, and the rows before, removed,
masked and kept — as a table, Markdown, text, or ``cut_report.csv`` / ``cut_report.md``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from stellarnet.common.files import atomic_write_text


@dataclass(frozen=True)
class CutRow:
    """One line of a :class:`CutReport` (row counts before/removed/kept by one cut)."""

    name: str
    reason: str
    before: int
    removed: int
    kept: int
    criterion: str = ""  # what was applied, from the spec itself (e.g. "SNR >= 50"): overrides show here
    masked: int = 0  # rows kept with columns blanked (a ``mask`` cut)


@dataclass
class CutReport:
    """Ordered record of the cuts applied: name, criterion (written from the spec that ran, so an
    override of a threshold shows), reason (the config's free text), rows before, removed, kept."""

    rows: list[CutRow] = field(default_factory=list)
    n_input: int = 0

    COLUMNS = ("name", "criterion", "reason", "before", "removed", "kept")

    @property
    def n_output(self) -> int:
        return self.rows[-1].kept if self.rows else self.n_input

    def to_frame(self, masked: bool = False) -> pd.DataFrame:
        """DataFrame with columns name, criterion, reason, before, removed, kept (one row per cut);
        with ``masked`` also the rows each ``mask`` cut kept with blanked columns (before ``kept``)."""
        cols = list(self.COLUMNS[:-1]) + (["masked"] if masked else []) + ["kept"]
        rows = [[r.name, r.criterion, r.reason, r.before, r.removed] + ([r.masked] if masked else []) + [r.kept]
                for r in self.rows]
        return pd.DataFrame(rows, columns=cols).astype({c: "int64" for c in cols[3:]})

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown table (plus input/output totals)."""

        def esc(s: object) -> str:
            return str(s).replace("|", "\\|").replace("\n", " ")

        lines = [
            "| # | cut | criterion | reason | before | removed | kept |",
            "| ---: | --- | --- | --- | ---: | ---: | ---: |",
        ]
        for i, r in enumerate(self.rows, 1):
            lines.append(
                f"| {i} | {esc(r.name)} | {esc(r.criterion)} | {esc(r.reason)} | {r.before} | {r.removed} | {r.kept} |"
            )
        lines.append("")
        lines.append(f"Input rows: {self.n_input}; kept after all cuts: {self.n_output}.")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        head = ("cut", "criterion", "reason", "before", "removed", "kept")
        body = [(r.name, r.criterion, r.reason, str(r.before), str(r.removed), str(r.kept)) for r in self.rows]
        w = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]

        def fmt(cells) -> str:
            return "  ".join(
                c.ljust(w[i]) if i < 3 else c.rjust(w[i]) for i, c in enumerate(cells)
            ).rstrip()

        out = [fmt(head), fmt(["-" * x for x in w])] + [fmt(b) for b in body]
        out.append(f"input {self.n_input} rows -> kept {self.n_output}")
        return "\n".join(out)

    def save(self, directory: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``cut_report.csv`` and ``cut_report.md`` into ``directory`` (created if needed),
        each atomically (temporary file + ``os.replace``). Returns the two paths."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        csv_path, md_path = d / "cut_report.csv", d / "cut_report.md"
        atomic_write_text(csv_path, self.to_frame().to_csv(index=False))
        atomic_write_text(md_path, self.to_markdown())
        return csv_path, md_path
