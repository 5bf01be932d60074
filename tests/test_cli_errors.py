"""The entry points' error discipline (stellarnet.common.errors): a failure is one line on stderr that
names the cause, exit status 1, no traceback; HYDRA_FULL_ERROR=1 gives the traceback back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stellarnet.common.errors import EXIT_FAILURE, one_line, report_errors

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                          capture_output=True, text=True, env=full_env, timeout=120)


def test_predict_with_a_missing_model_is_one_line(tmp_path):
    r = _run(["stellarnet.predict", f"ckpt_path={tmp_path / 'nope'}", f"input={tmp_path / 'x.fits'}"], tmp_path)
    assert r.returncode == EXIT_FAILURE
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: no checkpoint at ") and "ckpt_path=<run>/model" in lines[-1]
    assert "Traceback" not in r.stderr


def test_full_error_gives_the_traceback(tmp_path):
    r = _run(["stellarnet.predict", f"ckpt_path={tmp_path / 'nope'}", f"input={tmp_path / 'x.fits'}"], tmp_path,
             HYDRA_FULL_ERROR="1")
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "CheckpointError: no checkpoint at" in r.stderr


def test_bad_config_value_fails_before_work(tmp_path):
    r = _run(["stellarnet.build_shards", "data.shards.split.fractions.val=-0.1"], tmp_path)
    assert r.returncode == EXIT_FAILURE
    assert r.stderr.strip().splitlines()[-1] == (
        "error: data.shards.split.fractions.val must be a number in [0, 1], got -0.1")
    assert not (tmp_path / "data").exists()  # nothing simulated or built


def test_unexpected_errors_say_so_and_user_errors_are_verbatim(capsys):
    assert one_line(ValueError("input is required")) == "input is required"
    assert one_line(KeyError("missing key 'x'")) == "missing key 'x'"
    text = one_line(TypeError("unsupported operand"))
    assert text.startswith("unexpected TypeError: unsupported operand") and "HYDRA_FULL_ERROR=1" in text

    @report_errors
    def main():
        raise FileNotFoundError("spectra_root /x is not a directory")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == EXIT_FAILURE
    assert capsys.readouterr().err == "error: spectra_root /x is not a directory\n"


def test_console_command_lists_and_dispatches(tmp_path):
    import importlib

    from stellarnet.cli import COMMANDS, main

    for name, (module, _) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), name
    assert main([]) == 0 and main(["no-such-command"]) == 2
    r = subprocess.run([sys.executable, "-m", "stellarnet", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(f"  {name}" in r.stdout for name in COMMANDS)
    r = subprocess.run([sys.executable, "-m", "stellarnet", "predict", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0
    assert "ckpt_path    the model folder a training run writes" in r.stdout and "refine       true:" in r.stdout
    r = _run(["stellarnet", "predict", f"ckpt_path={tmp_path / 'nope'}", f"input={tmp_path / 'x.fits'}"], tmp_path)
    assert r.returncode == EXIT_FAILURE and r.stderr.strip().splitlines()[-1].startswith("error: no checkpoint at")


@pytest.mark.parametrize("name", ["predict", "train", "evaluate", "refinement", "baselines", "crossval", "pipeline",
                                  "simulate", "build_features"])
def test_every_entry_has_a_help_text_that_names_its_keys(name):
    from omegaconf import OmegaConf

    from stellarnet.common.paths import CONF_DIR

    help_cfg = OmegaConf.load(CONF_DIR / f"{name}.yaml").hydra.help
    assert help_cfg.app_name == f"stellarnet {name.replace('_', '-')}"
    assert "Main keys" in help_cfg.template and "$APP_CONFIG_GROUPS" in help_cfg.template
