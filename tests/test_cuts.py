"""apply_cuts / CutReport and the shipped data/cuts configs."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from stellarnet.io.catalogs import MissingColumnError
from stellarnet.preparation.cut_report import CutReport
from stellarnet.preparation.cuts import CutSpecError, EmptySelectionError, apply_cuts, load_cuts
from stellarnet.common.paths import CONF_DIR

STAR_BAD = 1 << 23
DUP = 1 << 4


@pytest.fixture
def df() -> pd.DataFrame:
    """10 rows, one property per row so every cut's effect is predictable."""
    return pd.DataFrame(
        {
            "APOGEE_ID": ["a", "b", "c", "d", "e", "a", "f", "g", "b", "h"],
            "SNR": np.array([250, 100, 50, 300, 80, 120, np.nan, 210, 150, 90], dtype=np.float32),
            "TEFF": np.array([4500, 5000, 5200, 3800, np.nan, 4600, 4800, 6000, 5100, 4400], np.float32),
            "LOGG": [2.5, 4.4, 2.0, 4.7, 2.2, 2.6, np.inf, 4.2, 4.3, 1.5],
            "FE_H": [0.0, -0.2, 0.1, 0.3, 0.0, 0.0, 0.0, np.nan, -0.1, -0.5],
            "VSCATTER": [0.2, np.nan, 0.5, 3.0, 0.1, 0.3, 0.2, 0.9, 1.0, np.nan],
            "ASPCAPFLAG": np.array(
                [0, STAR_BAD, 0, 1 << 40, 1, 0, 0, STAR_BAD | (1 << 40), 0, -(2**63)], np.int64
            ),
            "STARFLAG": np.array([0, 0, 1 << 4, 0, 0, 1 << 9, 0, 1, 0, 0], np.int64),
            "EXTRATARG": np.array([0, 0, 0, 0, 0, DUP, 0, 0, DUP, 0], np.int32),
            "PARAMFLAG_LOGG": np.array([1 << 24, 0, 0, 0, 1 << 25, 0, 0, 0, 0, 0], np.int32),
        },
        index=np.arange(100, 110),
    )


def rows(report: CutReport) -> list[tuple]:
    return [(r.name, r.before, r.removed, r.kept) for r in report.rows]


def test_range_cut_strict_nan_and_inclusive(df):
    kept, rep = apply_cuts(df, {"snr": {"column": "SNR", "min": 100}})
    assert list(kept.index) == [100, 103, 105, 107, 108]  # 100 itself fails '>'; NaN removed
    assert rows(rep) == [("snr", 10, 5, 5)]
    kept, _ = apply_cuts(df, {"snr": {"column": "SNR", "min": 100, "inclusive": True}})
    assert 101 in kept.index
    kept, rep = apply_cuts(df, {"vs": {"column": "VSCATTER", "max": 1.0, "keep_nan": True}})
    assert list(kept.index) == [100, 101, 102, 104, 105, 106, 107, 109]  # 3.0, 1.0 removed
    kept, _ = apply_cuts(df, {"vs": {"column": "VSCATTER", "max": 1.0}})
    assert 101 not in kept.index and 109 not in kept.index
    kept, _ = apply_cuts(df, {"t": {"column": "TEFF", "min": 4000, "max": 5500}})
    assert list(kept.index) == [100, 101, 102, 105, 106, 108, 109]


def test_flag_cut_names_numbers_and_high_bits(df):
    kept, rep = apply_cuts(df, {"sb": {"flag": "ASPCAPFLAG", "bits": ["STAR_BAD"]}})
    assert 101 not in kept.index and 107 not in kept.index and len(kept) == 8
    assert rep.rows[0].reason == "ASPCAPFLAG: none of STAR_BAD set"
    kept, _ = apply_cuts(df, {"pt": {"flag": "ASPCAPFLAG", "bits": ["PROBLEM_TARGET"]}})
    assert set(df.index) - set(kept.index) == {103, 107}
    kept, _ = apply_cuts(df, {"b63": {"flag": "ASPCAPFLAG", "bits": [63]}})
    assert set(df.index) - set(kept.index) == {109}
    kept, _ = apply_cuts(df, {"sf": {"flag": "STARFLAG", "bits": [0, 1, 2, 3, "LOW_SNR"]}})
    assert set(df.index) - set(kept.index) == {102, 107}  # PERSIST_HIGH (bit 9) row kept
    kept, _ = apply_cuts(df, {"dup": {"flag": "EXTRATARG", "bits": ["DUPLICATE"]}})
    assert set(df.index) - set(kept.index) == {105, 108}
    # PARAMFLAG_LOGG uses the PARAMFLAG bit table
    kept, _ = apply_cuts(df, {"rc": {"flag": "PARAMFLAG_LOGG", "bits": ["SPEC_RC"]}})
    assert set(df.index) - set(kept.index) == {100}


def test_flag_cut_all_bad_and_modes(df):
    kept, rep = apply_cuts(df, {"clean": {"flag": "ASPCAPFLAG", "bits": "all"}})
    assert set(df.index) - set(kept.index) == {101, 103, 104, 107, 109}
    assert "== 0" in rep.rows[0].reason
    kept2, _ = apply_cuts(df, {"clean": {"flag": "ASPCAPFLAG", "mode": "any_set"}})
    assert kept2.index.equals(kept.index)
    kept, _ = apply_cuts(df, {"bad": {"flag": "ASPCAPFLAG", "bits": "bad"}})
    assert set(df.index) - set(kept.index) == {101, 103, 107}  # bits 23, 40 are bad; 0 and 63 not
    kept, _ = apply_cuts(
        df, {"both": {"flag": "ASPCAPFLAG", "bits": ["STAR_BAD", 40], "mode": "all_set"}}
    )
    assert set(df.index) - set(kept.index) == {107}


def test_finite_and_unique(df):
    kept, rep = apply_cuts(df, {"fin": {"finite": ["TEFF", "LOGG", "FE_H"]}})
    assert set(df.index) - set(kept.index) == {104, 106, 107}  # NaN TEFF, inf LOGG, NaN FE_H
    kept, rep = apply_cuts(df, {"uniq": {"unique": "APOGEE_ID", "by": "SNR"}})
    # 'a': rows 100 (SNR 250) and 105 (120) → 100; 'b': 101 (100) and 108 (150) → 108
    assert list(kept.index) == [100, 102, 103, 104, 106, 107, 108, 109]
    assert rows(rep) == [("uniq", 10, 2, 8)]


def test_unique_nan_score_loses_and_ties_keep_first():
    d = pd.DataFrame({"APOGEE_ID": ["x", "x", "y", "y", "z"], "SNR": [np.nan, 5.0, 7.0, 7.0, np.nan]})
    kept, _ = apply_cuts(d, {"u": {"unique": "APOGEE_ID"}})  # 'by' defaults to SNR
    assert list(kept.index) == [1, 2, 4]


def test_report_numbers_in_order_and_outputs(df, tmp_path):
    cuts = {
        "snr": {"column": "SNR", "min": 70, "reason": "SNR > 70"},
        "star_bad": {"flag": "ASPCAPFLAG", "bits": ["STAR_BAD"]},
        "finite": {"finite": ["TEFF", "LOGG", "FE_H"]},
        "unique": {"unique": "APOGEE_ID", "by": "SNR"},
    }
    kept, rep = apply_cuts(df, cuts)
    # snr removes 102 (50) and 106 (NaN); star_bad removes 101, 107; finite removes 104;
    # unique removes 105 (a, lower SNR than 100)
    assert rows(rep) == [
        ("snr", 10, 2, 8),
        ("star_bad", 8, 2, 6),
        ("finite", 6, 1, 5),
        ("unique", 5, 1, 4),
    ]
    assert list(kept.index) == [100, 103, 108, 109]
    assert rep.n_input == 10 and rep.n_output == 4
    frame = rep.to_frame()
    assert list(frame.columns) == ["name", "criterion", "reason", "before", "removed", "kept"]
    assert frame["reason"][0] == "SNR > 70" and frame["kept"].tolist() == [8, 6, 5, 4]
    md = rep.to_markdown()
    assert "| 1 | snr | SNR > 70 | SNR > 70 | 10 | 2 | 8 |" in md and "kept after all cuts: 4" in md
    text = str(rep)
    assert "star_bad" in text and text.splitlines()[0].split()[:3] == ["cut", "criterion", "reason"]
    csv_path, md_path = rep.save(tmp_path / "out" / "reports")
    assert csv_path.name == "cut_report.csv" and md_path.name == "cut_report.md"
    pd.testing.assert_frame_equal(pd.read_csv(csv_path), frame)
    assert md_path.read_text() == md
    assert sorted(p.name for p in csv_path.parent.iterdir()) == ["cut_report.csv", "cut_report.md"]
    # saving again replaces the files (atomic os.replace, no leftovers)
    rep.save(tmp_path / "out" / "reports")
    assert len(list(csv_path.parent.iterdir())) == 2


def test_dictconfig_and_null_spec(df):
    cfg = OmegaConf.create(
        {
            "snr": {"column": "SNR", "min": 70},
            "off": None,
            "disabled": {"column": "SNR", "min": 1e9, "enabled": False},
            "sf": {"flag": "STARFLAG", "bits": [4]},
        }
    )
    kept, rep = apply_cuts(df, cfg)
    assert [r.name for r in rep.rows] == ["snr", "sf"]
    kept2, _ = apply_cuts(df, OmegaConf.to_container(cfg))
    assert kept.index.equals(kept2.index)


def test_empty_selection_names_the_cut(df):
    with pytest.raises(EmptySelectionError, match="'too_strict'") as ei:
        apply_cuts(df, {"ok": {"column": "SNR", "min": 10}, "too_strict": {"column": "SNR", "min": 1e6}})
    assert ei.value.cut == "too_strict"
    assert rows(ei.value.report)[-1] == ("too_strict", 9, 9, 0)


@pytest.mark.parametrize(
    "spec, exc, pattern",
    [
        ({"colum": "SNR", "min": 1}, CutSpecError, r"cut 'bad'.*no spec kind"),
        ({"column": "SNR", "flag": "STARFLAG"}, CutSpecError, r"cut 'bad'.*several"),
        ({"column": "SNR", "mni": 1}, CutSpecError, r"cut 'bad'.*unknown key.*'mni'"),
        ({"column": "SNR"}, CutSpecError, r"cut 'bad'.*needs 'min' and/or 'max'"),
        ({"column": "SNR", "min": 5, "max": 1}, CutSpecError, r"cut 'bad'.*min 5.0 > max 1.0"),
        ({"column": "APOGEE_ID", "min": 1}, CutSpecError, r"cut 'bad'.*not numeric"),
        ({"flag": "ASPCAPFLAG", "bits": ["STARBAD"]}, CutSpecError, r"cut 'bad'.*no flag 'STARBAD'"),
        ({"flag": "ASPCAPFLAG", "bits": [64]}, CutSpecError, r"cut 'bad'.*outside 0..63"),
        ({"flag": "ASPCAPFLAG", "mode": "some"}, CutSpecError, r"cut 'bad'.*mode"),
        ({"flag": "SNR", "bits": [1]}, CutSpecError, r"cut 'bad'.*no bit table for 'SNR'"),
        ({"column": "J", "min": 5}, MissingColumnError, r"'J'.*cut 'bad'"),
        ({"finite": ["TEFF", "M_H"]}, MissingColumnError, r"'M_H'.*cut 'bad'"),
        ({"unique": "APOGEE_ID", "by": "SNREV"}, MissingColumnError, r"'SNREV'.*cut 'bad'"),
        ({"flag": "ANDFLAG", "bits": [0]}, MissingColumnError, r"'ANDFLAG'.*cut 'bad'"),
    ],
)
def test_bad_specs_name_the_cut(df, spec, exc, pattern):
    with pytest.raises(exc, match=pattern):
        apply_cuts(df, {"fine": {"column": "SNR", "min": 0}, "bad": spec})


def test_not_a_mapping(df):
    with pytest.raises(CutSpecError, match="mapping"):
        apply_cuts(df, [{"column": "SNR", "min": 1}])
    with pytest.raises(CutSpecError, match="cut 'x'.*mapping"):
        apply_cuts(df, {"x": "SNR > 5"})


def test_shipped_cut_configs(df):
    files = sorted(p.stem for p in (CONF_DIR / "data" / "cuts").glob("*.yaml"))
    assert {"dr17_science", "astronn"} <= set(files)
    sci = load_cuts("dr17_science")
    assert list(sci)[:2] == ["snr", "star_bad"]
    kept, rep = apply_cuts(df, sci)
    # SNR>70 drops 102,106; STAR_BAD drops 101,107; DUPLICATE drops 105,108; finite drops 104;
    # VSCATTER<1 (NaN kept) drops 103 (3.0); STARFLAG 0-4, Teff, logg, unique: nothing more.
    assert list(kept.index) == [100, 109]
    assert [r.removed for r in rep.rows] == [2, 2, 2, 1, 1, 0, 0, 0, 0]
    astronn = load_cuts("astronn")
    kept, rep = apply_cuts(df, astronn)
    # SNR>200 keeps 100, 103, 107; STARFLAG=0 drops 107; ASPCAPFLAG=0 drops 103 (bit 40)
    assert list(kept.index) == [100]
    assert [r.name for r in rep.rows] == ["snr", "starflag", "aspcapflag", "teff_range", "finite_labels"]
    assert [r.removed for r in rep.rows] == [7, 1, 1, 0, 0]
    d = df.copy()
    d.loc[100, "TEFF"] = 3900.0  # outside 4000 < Teff < 5500
    with pytest.raises(EmptySelectionError, match="'teff_range'"):
        apply_cuts(d, astronn)


def test_load_cuts_unknown_name():
    with pytest.raises(FileNotFoundError, match="dr17_science"):
        load_cuts("no_such_cut_set")


def test_report_shows_the_threshold_that_ran_not_the_configs_text():
    """An override of a threshold (data.cuts.snr.min=50) keeps the YAML's reason text; the report's
    criterion column is written from the spec that ran."""
    df = pd.DataFrame({"SNR": [10.0, 60.0, 80.0, 200.0]})
    kept, report = apply_cuts(df, {"snr": {"column": "SNR", "min": 50, "reason": "SNR > 70 (per pixel)"}})
    assert len(kept) == 3
    row = report.to_frame().iloc[0]
    assert row["criterion"] == "SNR > 50" and row["reason"] == "SNR > 70 (per pixel)"
    assert "| snr | SNR > 50 | SNR > 70 (per pixel) | 4 | 1 | 3 |" in report.to_markdown()
    assert "SNR > 50" in str(report)


@pytest.mark.parametrize("fractions,message", [
    ({"train": 0.9, "val": -0.1, "test": 0.2}, "split.fractions.val must be a number in [0, 1], got -0.1"),
    ({"train": 0.8, "val": 0.1}, "must sum to 1"),
    ({"train": 0.8, "val": 0.1, "tset": 0.1}, "unknown split(s) ['tset']"),
    ({"train": 0.0, "val": 0.5, "test": 0.5}, "split.fractions.train must be > 0"),
    ({"train": "0.8", "val": 0.1, "test": 0.1}, "split.fractions.train must be a number in [0, 1], got '0.8'"),
])
def test_bad_split_fractions_are_refused(fractions, message):
    from stellarnet.preparation.splits import assign_splits

    df = pd.DataFrame({"FIELD": list("abcdefgh"), "APOGEE_ID": [f"s{i}" for i in range(8)]})
    with pytest.raises(ValueError, match=re.escape(message)):
        assign_splits(df, fractions)


# ------------------------------------------------------------------ mutation-benchmark survivors
def test_physical_ranges_are_the_documented_ones_and_inclusive():
    """docs/robustness.md: Teff 2,000–50,000 K, logg −1…6, [Fe/H] and [M/H] −5…1.5, [α/M] and [α/Fe]
    −1…1.5, ends included; NaN kept; a column without a range gets no cut."""
    from stellarnet.preparation.cuts import physical_range_cuts

    cuts = physical_range_cuts(["TEFF", "LOGG", "FE_H", "M_H", "ALPHA_M", "ALPHA_FE", "VSINI", "TEFF"])
    assert list(cuts) == [f"physical_{c}" for c in ("TEFF", "LOGG", "FE_H", "M_H", "ALPHA_M", "ALPHA_FE")]
    assert {k: (v["min"], v["max"]) for k, v in cuts.items()} == {
        "physical_TEFF": (2000.0, 50000.0), "physical_LOGG": (-1.0, 6.0), "physical_FE_H": (-5.0, 1.5),
        "physical_M_H": (-5.0, 1.5), "physical_ALPHA_M": (-1.0, 1.5), "physical_ALPHA_FE": (-1.0, 1.5)}
    frame = pd.DataFrame({"LOGG": [-1.0, 6.0, 6.01, np.nan, 0.5], "ALPHA_M": [1.5, -1.0, 0.0, 0.0, 1.51]})
    kept, report = apply_cuts(frame, physical_range_cuts(["LOGG", "ALPHA_M"]))
    assert kept.index.tolist() == [0, 1, 3]
    assert report.n_output == 3 and "[-1, 6]" in report.rows[0].reason


def test_all_set_flag_cut_is_described_with_and():
    kept, report = apply_cuts(pd.DataFrame({"ASPCAPFLAG": np.array([0, STAR_BAD, STAR_BAD | (1 << 40)], np.int64)}),
                              {"both": {"flag": "ASPCAPFLAG", "bits": ["STAR_BAD", 40], "mode": "all_set"}})
    assert kept.index.tolist() == [0, 1]
    assert " and " in report.rows[0].criterion and "not all of" in report.rows[0].criterion


def test_text_report_aligns_names_left_and_counts_right():
    frame = pd.DataFrame({"SNR": [10.0, 100.0, 200.0, 300.0]})
    _, report = apply_cuts(frame, {"snr": {"column": "SNR", "min": 50}})
    lines = str(report).splitlines()
    header, row = lines[0], lines[2]
    assert header.startswith("cut ") and row.startswith("snr ")
    at = header.index("before")
    assert row[at:at + len("before")] == "     4"  # counts right-aligned under their heading


def test_one_engine_takes_comparisons_and_masks():
    """The survey configurations' forms (``eq``/``gt`` comparisons, ``mask``) run through apply_cuts."""
    import numpy as np
    import pandas as pd

    from stellarnet.preparation.cuts import CutSpecError, apply_cuts

    df = pd.DataFrame({"flag": [0, 1, 0, 0], "snr": [50.0, 60.0, np.nan, 10.0], "alpha": [0.1, 0.2, 0.3, 0.4],
                       "alpha_flag": [0, 0, 1, 0]})
    kept, rep = apply_cuts(df, {"flag": {"column": "flag", "eq": 0},
                                "alpha": {"column": "alpha_flag", "eq": 0, "mask": ["ALPHA"]},
                                "snr": {"column": "snr", "gt": 20}},
                           mask_targets={"ALPHA": ["alpha"]})
    assert kept.index.tolist() == [0]  # flag != 0 (row 1), NaN S/N (row 2), S/N 10 (row 3) removed
    frame = rep.to_frame(masked=True).set_index("name")
    assert frame.loc["alpha", "masked"] == 1 and frame.loc["alpha", "removed"] == 0
    assert frame.loc["snr", "criterion"] == "snr > 20"
    with pytest.raises(CutSpecError, match="not both"):
        apply_cuts(df, {"bad": {"column": "snr", "gt": 20, "min": 10}})
    empty, _ = apply_cuts(df, {"none": {"column": "snr", "gt": 1e9}}, allow_empty=True)
    assert len(empty) == 0


def test_unique_never_merges_rows_without_an_id():
    import pandas as pd

    from stellarnet.preparation.cuts import apply_cuts

    df = pd.DataFrame({"ID": ["a", "a", "", ""], "SNR": [10.0, 20.0, 5.0, 6.0]})
    kept, _ = apply_cuts(df, {"u": {"unique": "ID", "by": "SNR"}})
    assert kept.index.tolist() == [1, 2, 3]
