"""Mutation testing benchmark (not in CI): does the test suite notice a small bug?

Each mutant changes one thing in one module — a comparison flipped (``<`` ↔ ``>=``, ``==`` ↔ ``!=``),
an arithmetic operator swapped (``+`` ↔ ``-``, ``*`` ↔ ``/``), a numeric constant changed (``c`` →
``c + 1``, ``0`` → ``1``), ``and`` ↔ ``or``, ``not x`` → ``x``, ``True`` ↔ ``False``, a ``return x``
→ ``return None`` — written over the module file, then the given tests run (``pytest -x -q``);
the mutant is **killed** when they fail (or time out), **survived** when they pass. The original
file is always restored. mutmut / cosmic-ray are not installable on this machine; this is the same
idea in ~150 lines (AST based, so every mutant is syntactically valid).

    python scripts/bench_mutation.py --module stellarnet/evaluation/calibration.py \
        --tests tests/test_eval.py tests/test_refinement.py --max-mutants 40 --out mutation.json

Writes JSON: per mutant the line, the change and killed/survived; the score = killed / (killed +
survived). Survivors are listed for review (some are equivalent mutants: no behaviour change).
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

_CMP_SWAP = {ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
             ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
_BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult}


@dataclass
class Mutant:
    index: int
    line: int
    change: str
    outcome: str = ""
    seconds: float = 0.0


def _sites(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    """Every (node, kind) a mutation can apply to, in source order; docstrings and type
    annotations are skipped."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
                skip.add(id(first.value))
        for ann in ("annotation", "returns"):
            sub = getattr(node, ann, None)
            if sub is not None:
                skip.update(id(n) for n in ast.walk(sub))
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Compare) and type(node.ops[0]) in _CMP_SWAP:
            out.append((node, "compare"))
        elif isinstance(node, ast.BinOp) and type(node.op) in _BIN_SWAP:
            out.append((node, "binop"))
        elif isinstance(node, ast.BoolOp):
            out.append((node, "boolop"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            out.append((node, "not"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            out.append((node, "bool"))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            out.append((node, "number"))
        elif isinstance(node, ast.Return) and node.value is not None:
            out.append((node, "return"))
    return sorted(out, key=lambda s: (getattr(s[0], "lineno", 0), getattr(s[0], "col_offset", 0)))


def _mutate(source: str, index: int) -> tuple[str, int, str]:
    """(mutated source, line, description) of mutation site ``index``."""
    tree = ast.parse(source)
    node, kind = _sites(tree)[index]
    line = getattr(node, "lineno", 0)
    if kind == "compare":
        old = type(node.ops[0])
        node.ops[0] = _CMP_SWAP[old]()
        desc = f"{old.__name__} -> {type(node.ops[0]).__name__}"
    elif kind == "binop":
        old = type(node.op)
        node.op = _BIN_SWAP[old]()
        desc = f"{old.__name__} -> {type(node.op).__name__}"
    elif kind == "boolop":
        old = type(node.op)
        node.op = ast.Or() if old is ast.And else ast.And()
        desc = f"{old.__name__} -> {type(node.op).__name__}"
    elif kind == "not":
        parent_fix = node.operand
        node.op = ast.UAdd()  # `+x` keeps the truth value of x: "not x" becomes "x" for bools
        node.operand = ast.Call(func=ast.Name(id="bool", ctx=ast.Load()), args=[parent_fix], keywords=[])
        desc = "not x -> x"
    elif kind == "bool":
        node.value = not node.value
        desc = f"{not node.value} -> {node.value}"
    elif kind == "number":
        old = node.value
        node.value = 1 if old == 0 else old + 1 if isinstance(old, int) else old * 2
        desc = f"{old!r} -> {node.value!r}"
    else:
        node.value = ast.Constant(value=None)
        desc = "return x -> return None"
    return ast.unparse(ast.fix_missing_locations(tree)), line, desc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", required=True, help="module file to mutate")
    ap.add_argument("--tests", nargs="+", required=True, help="pytest paths / node ids to run per mutant")
    ap.add_argument("--max-mutants", type=int, default=40, help="a seeded random sample of the mutation sites")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant (a hang counts as killed)")
    ap.add_argument("--out", default="mutation.json")
    args = ap.parse_args()

    path = Path(args.module)
    original = path.read_text()
    n_sites = len(_sites(ast.parse(original)))
    chosen = sorted(random.Random(args.seed).sample(range(n_sites), min(args.max_mutants, n_sites)))
    base = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args.tests],
                          capture_output=True, text=True)
    if base.returncode != 0:
        print(base.stdout[-2000:], file=sys.stderr)
        raise SystemExit("the tests fail on the unmutated code: fix them first")
    mutants: list[Mutant] = []
    try:
        for k, index in enumerate(chosen):
            mutated, line, desc = _mutate(original, index)
            m = Mutant(index, line, desc)
            path.write_text(mutated)
            t0 = time.perf_counter()
            try:
                r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args.tests],
                                   capture_output=True, text=True, timeout=args.timeout)
                m.outcome = "killed" if r.returncode != 0 else "survived"
            except subprocess.TimeoutExpired:
                m.outcome = "killed"
            m.seconds = round(time.perf_counter() - t0, 1)
            mutants.append(m)
            print(f"[{k + 1}/{len(chosen)}] line {line}: {desc}: {m.outcome} ({m.seconds} s)", flush=True)
    finally:
        path.write_text(original)
    killed = sum(m.outcome == "killed" for m in mutants)
    survived = [asdict(m) for m in mutants if m.outcome == "survived"]
    report = {"module": str(path), "tests": args.tests, "sites": n_sites, "sampled": len(mutants),
              "killed": killed, "survived": len(survived),
              "score": killed / max(1, len(mutants)), "survivors": survived, "mutants": [asdict(m) for m in mutants]}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"{path}: {killed}/{len(mutants)} killed (score {report['score']:.2f}); survivors: "
          + "; ".join(f"line {s['line']} {s['change']}" for s in survived))
    return 0


if __name__ == "__main__":
    sys.exit(main())
