"""A small mutation tester: does the test suite notice when the code is subtly wrong?

For each target module it makes one-token mutants (an operator, comparison, boolean, min/max
or integer/float constant replaced by a plausible mistake; never inside strings, f-strings or
comments), runs the given tests against each mutant in a copy of the source tree (the working
tree is never touched), and reports the mutants no test kills.

    .venv/bin/python scripts/mutate.py train/schedule.py -- tests/test_schedule.py
    .venv/bin/python scripts/mutate.py pipeline/mix.py --sample 40 -- tests/test_mix.py

``--sample N`` tests a seeded random sample of N mutants (for large modules on a slow
machine). Results go to ``--out`` as JSON (every mutant, its line, its outcome).

Test selection (mutmut's idea, done with a line tracer rather than coverage.py): the clean run
records which lines of the module each test executes, and how long each test takes. A mutant
inside a function body then runs only the tests that execute some line of that function,
fastest first, so a killing test comes early and a survivor costs only the tests that could see
it. A mutant outside any function body (module constants, class bodies, a ``def`` line's
defaults: all evaluated at import) runs every test, fastest first. A survivor of a selection then
runs the tests left out, before it is reported: every survivor has passed every given test, so
selection only saves time and never turns a kill into a survival (code run only in a worker
process or an untraced thread is invisible to the tracer; the second run covers it).
``--no-select`` runs every test against every mutant.
"""
from __future__ import annotations

import argparse
import ast
import io
import json
import os
import contextlib
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "models", "train", "benchmarks", "configs")

SWAPS = {"+": "-", "-": "+", "*": "/", "/": "*", "//": "/", "%": "//", "**": "*",
         "<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "==",
         "and": "or", "or": "and", "True": "False", "False": "True", "min": "max", "max": "min",
         "is": "is not", "in": "not in"}


def _number(text: str) -> str | None:
    try:
        v = int(text, 0)
        return str(v + 1)
    except ValueError:
        pass
    try:
        v = float(text)
    except ValueError:
        return None
    return repr(v * 2 if v else 1.0)


def mutants(source: str) -> list[dict]:
    """Every one-token mutant of ``source``: line, column, old and new text."""
    out, fstring = [], 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        kind = tokenize.tok_name[tok.type]
        if kind == "FSTRING_START":
            fstring += 1
        elif kind == "FSTRING_END":
            fstring -= 1
        if fstring:
            continue
        new = None
        if tok.type in (tokenize.OP, tokenize.NAME) and tok.string in SWAPS:
            new = SWAPS[tok.string]
        elif tok.type == tokenize.NUMBER:
            new = _number(tok.string)
        if new is not None and tok.start[0] == tok.end[0]:
            out.append({"line": tok.start[0], "col": tok.start[1], "old": tok.string,
                        "new": new})
    return out


def apply(source: str, m: dict) -> str:
    lines = source.splitlines(keepends=True)
    ln = lines[m["line"] - 1]
    c = m["col"]
    assert ln[c:c + len(m["old"])] == m["old"], (m, ln)
    lines[m["line"] - 1] = ln[:c] + m["new"] + ln[c + len(m["old"]):]
    return "".join(lines)


def make_copy(dst: Path) -> Path:
    """The tracked and untracked source (no .venv, no .git) plus a ``tricks`` package of links
    for PYTHONPATH (ahead of the editable install's finder)."""
    tree = dst / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__",
                                                              "runs", "*.pyc"))
    pkg = dst / "src" / "tricks"
    pkg.mkdir(parents=True)
    for d in PACKAGES:
        os.symlink(tree / d, pkg / d)
    return tree


def function_scopes(source: str):
    """A map from a line of ``source`` to the line range (first, last) of the innermost
    function whose body holds it, or None where the line runs at import (module and class
    level, a top-level ``def``'s signature and decorators). A nested ``def``'s signature maps
    to its enclosing function, which evaluates it."""
    spans = [(node.body[0].lineno, node.end_lineno) for node in ast.walk(ast.parse(source))
             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]

    def scope(line: int) -> tuple[int, int] | None:
        inside = [s for s in spans if s[0] <= line <= s[1]]
        return max(inside) if inside else None  # innermost: the latest start
    return scope


class _LineTracer:
    """pytest plugin: the lines of ``path`` each test executes (setup, call and teardown, in
    this thread and threads it starts), and each test's duration."""

    def __init__(self, path: Path):
        self.path, self.lines, self.seconds, self._real = str(path.resolve()), {}, {}, {}

    def _tracer(self, sink: set):
        def local(frame, event, arg):
            if event == "line":
                sink.add(frame.f_lineno)
            return local

        def call(frame, event, arg):
            name = frame.f_code.co_filename
            real = self._real.get(name)
            if real is None:
                real = self._real[name] = os.path.realpath(name)
            return local if real == self.path else None
        return call

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        sink = self.lines.setdefault(item.nodeid, set())
        tracer = self._tracer(sink)
        t0 = time.perf_counter()
        sys.settrace(tracer)
        threading.settrace(tracer)
        try:
            yield
        finally:
            sys.settrace(None)
            threading.settrace(None)
            self.seconds[item.nodeid] = time.perf_counter() - t0


class _Only:
    """pytest plugin: run only the tests ``keep`` (node ids), in that order."""

    def __init__(self, keep: list[str]):
        self.keep = {nodeid: k for k, nodeid in enumerate(keep)}

    def pytest_collection_modifyitems(self, session, config, items):
        drop = [it for it in items if it.nodeid not in self.keep]
        items[:] = sorted((it for it in items if it.nodeid in self.keep),
                          key=lambda it: self.keep[it.nodeid])
        if drop:
            config.hook.pytest_deselected(items=drop)


def select(scope: tuple[int, int] | None, tracer: _LineTracer) -> list[str] | None:
    """The tests (fastest first) that execute a line of ``scope``; None: all of them."""
    if scope is None:
        return None
    lo, hi = scope
    hit = [t for t, lines in tracer.lines.items() if any(lo <= ln <= hi for ln in lines)]
    return sorted(hit, key=lambda t: tracer.seconds[t])


class _Timeout(Exception):
    pass


def run_tests(tree: Path, tests: list[str], timeout: float,
              plugins: list | None = None) -> tuple[str, float]:
    """pytest in this process (torch is imported once, not once per mutant): every ``tricks``
    and test module is dropped first, so the mutant is imported afresh from the copy."""
    for name in [n for n in sys.modules if n == "tricks" or n.startswith("tricks.")
                 or n.startswith("test_") or n == "conftest"]:
        del sys.modules[name]

    def alarm(*_):
        raise _Timeout()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(timeout))
    t0 = time.perf_counter()
    try:
        code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "--no-header", "-W",
                            "ignore", *tests], plugins=plugins or [])
        if code == pytest.ExitCode.NO_TESTS_COLLECTED:  # a selection that matched nothing
            raise RuntimeError(f"no test of {tests} was run (selected by {plugins})")
        outcome = "survived" if code == 0 else "killed"
    except _Timeout:
        outcome = "killed (timeout)"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return outcome, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tests = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("module", help="source file, relative to the repository root")
    p.add_argument("--sample", type=int, default=None, help="test only N mutants (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per mutant (default: three clean runs and a minute)")
    p.add_argument("--no-select", action="store_true",
                   help="run every test against every mutant (no coverage-based selection)")
    p.add_argument("--out", default=None, help="JSON report (default: print only)")
    args = p.parse_args(argv)
    if not tests:
        p.error("give the tests after --")
    source = (ROOT / args.module).read_text()
    todo = mutants(source)
    total = len(todo)
    if args.sample is not None and args.sample < total:
        todo = sorted(random.Random(args.seed).sample(todo, args.sample),
                      key=lambda m: (m["line"], m["col"]))
    out = Path(args.out).resolve() if args.out else None
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        tree = make_copy(Path(tmp))
        sys.path.insert(0, str(Path(tmp) / "src"))  # ahead of the editable install's finder
        sys.dont_write_bytecode = True  # a mutant written in the same second is re-read
        os.chdir(tree)
        target = tree / args.module
        log = io.StringIO()
        quiet = lambda: contextlib.redirect_stdout(log)  # noqa: E731
        tracer = _LineTracer(target)
        with quiet():
            base, secs = run_tests(tree, tests, args.timeout or 3600, [tracer])
        if base != "survived":
            print(f"error: the tests fail on the unmutated {args.module}", file=sys.stderr)
            return 1
        timeout = args.timeout or 3 * secs + 60
        print(f"{args.module}: {total} mutants, testing {len(todo)}; clean run {secs:.0f} s "
              f"({len(tracer.seconds)} tests, traced)", flush=True)
        scope = function_scopes(source)
        everything = sorted(tracer.seconds, key=tracer.seconds.get)
        lines = source.splitlines()
        for k, m in enumerate(todo, 1):
            target.write_text(apply(source, m))
            chosen = None if args.no_select else select(scope(m["line"]), tracer)
            t0 = time.perf_counter()
            with quiet():
                if chosen is None:  # every test, fastest first
                    m["outcome"], _ = run_tests(tree, tests, timeout, [_Only(everything)])
                elif chosen:
                    m["outcome"], _ = run_tests(tree, tests, timeout, [_Only(chosen)])
                else:
                    m["outcome"] = "survived"  # no test executes this function
                m["tests_run"] = "all" if chosen is None else len(chosen)
                rest = [] if chosen is None else [t for t in everything if t not in chosen]
                if m["outcome"] == "survived" and rest:  # confirm with the tests left out
                    m["outcome"], _ = run_tests(tree, tests, timeout, [_Only(rest)])
                    m["confirmed_with_the_rest"] = len(rest)
            m["seconds"] = time.perf_counter() - t0
            m["code"] = lines[m["line"] - 1].strip()
            print(f"[{k}/{len(todo)}] line {m['line']}: {m['old']!r} → {m['new']!r}: "
                  f"{m['outcome']} ({m['tests_run']} tests, {m['seconds']:.0f} s)"
                  + (f"   | {m['code']}" if m["outcome"] == "survived" else ""), flush=True)
            if out:  # after each mutant: a stopped run keeps what it found
                out.write_text(json.dumps({"module": args.module, "tests": tests,
                                           "mutants_total": total, "sample": args.sample,
                                           "seed": args.seed, "select": not args.no_select,
                                           "clean_run_seconds": round(secs, 1),
                                           "tested": todo[:k]}, indent=1))
        target.write_text(source)
    survived = [m for m in todo if m["outcome"] == "survived"]
    print(f"{args.module}: {len(todo) - len(survived)}/{len(todo)} killed, "
          f"{len(survived)} survived")
    return 0


if __name__ == "__main__":
    sys.exit(main())
