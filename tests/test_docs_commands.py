"""Every command in README.md and docs/*.md parses as written: documentation that rots fails CI.

Commands are taken from fenced code blocks and inline code spans (``python -m stellarnet.<entry>
...``, ``stellarnet <command> ...``, ``python scripts/<script>.py ...``). For an entry point the
command's overrides are composed into its Hydra config exactly as the command line would (an
unknown key, a group that does not exist, a value Hydra cannot parse — e.g. ``refine=false`` when
``refine`` was a config group, ``logger=null`` — fails here); placeholders such as ``<run>`` and
``$SLURM_NNODES`` become dummy values. For a script, every ``--flag`` it is given must be one its
``--help`` lists. That the commands *run* is covered by the end-to-end tests of each entry point
(``test_train``, ``test_predict``, ``test_evaluate``, ``test_pipeline``, ...) and README command 1.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from stellarnet.cli import COMMANDS
from stellarnet.common.paths import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: entry module → the config it composes
CONFIG_OF = {"train": "train", "build_shards": "train", "predict": "predict", "evaluate": "evaluate",
             "baselines": "baselines", "crossval": "crossval", "pipeline": "pipeline", "refinement": "refinement",
             "simulate": "simulate", "build_features": "build_features"}
_COMMAND = re.compile(r"(?:^|[\s(])((?:python -m stellarnet(?:\.[a-z_]+)?|stellarnet [a-z][a-z-]+|python scripts/[\w.]+)"
                      r"(?: [^`\n]*)?)")


def _commands() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for doc in DOCS:
        text = doc.read_text()
        pieces = [re.sub(r"\\\n\s*", " ", b) for b in re.findall(r"```[a-z]*\n(.*?)```", text, re.S)]
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        pieces += re.findall(r"`([^`\n]+)`", prose)
        for piece in pieces:
            for line in piece.splitlines():
                if line.lstrip().startswith("#"):  # a shell comment
                    continue
                for m in _COMMAND.finditer(line):
                    cmd = m.group(1).strip()
                    if cmd.startswith("stellarnet ") and cmd.split()[1].replace("_", "-") not in COMMANDS:
                        continue  # prose such as "stellarnet supports"
                    found.append((doc.name, cmd))
    return sorted(set(found))


def _args(cmd: str) -> tuple[str, list[str]]:
    """(entry or script, arguments) with placeholders made concrete and shell comments removed."""
    cmd = re.sub(r"<[^<>]+>", "PLACEHOLDER", cmd)
    cmd = re.sub(r"\$\{?[A-Z_]+\}?", "1", cmd)
    words = [w for w in shlex.split(cmd, comments=True) if w not in ("...", "…")]
    if words[:2] == ["python", "-m"]:
        module = words[2]
        entry = "cli" if module == "stellarnet" else module.split(".", 1)[1]
        args = words[3:]
    elif words[0] == "stellarnet":
        entry, args = "cli", words[1:]
    else:
        return words[1], words[2:]
    if entry == "cli":
        if not args or args[0].startswith("-"):
            return "cli", args
        entry, args = args[0].replace("-", "_"), args[1:]
    return entry, args


COMMANDS_IN_DOCS = _commands()


def test_the_docs_hold_the_commands_users_need():
    entries = {_args(c)[0] for _, c in COMMANDS_IN_DOCS}
    assert {"train", "predict", "evaluate", "build_shards", "baselines", "crossval", "refinement"} <= entries
    assert any("refine=false" in c for _, c in COMMANDS_IN_DOCS)  # the network alone, from the CLI
    assert not any("checkpoints/last.ckpt" in c and "predict" in c for _, c in COMMANDS_IN_DOCS)  # model folders


@pytest.mark.parametrize("doc,cmd", COMMANDS_IN_DOCS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS_IN_DOCS])
def test_documented_command_parses(doc, cmd):
    entry, args = _args(cmd)
    if entry.startswith("scripts/"):
        script = ROOT / entry
        assert script.is_file(), f"{doc}: {cmd}: no {entry}"
        flags = [a.split("=")[0] for a in args if a.startswith("--")]
        if flags:
            out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                                 timeout=120, cwd=ROOT)
            assert out.returncode == 0, out.stderr
            for flag in flags:
                assert flag in out.stdout, f"{doc}: {cmd}: {flag} is not an option of {entry}"
        return
    if entry == "cli":
        return  # `stellarnet --help`: covered by test_cli_errors
    assert entry in CONFIG_OF, f"{doc}: {cmd}: unknown entry point {entry!r}"
    overrides = [a for a in args if not a.startswith("-")]
    hydra_overrides = [a for a in overrides if a.startswith("hydra.")]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose(config_name=CONFIG_OF[entry], overrides=overrides,
                          return_hydra_config=bool(hydra_overrides))
    finally:
        GlobalHydra.instance().clear()
    assert cfg is not None
