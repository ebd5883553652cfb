"""scripts/mutate.py makes the mutants it claims, and only outside strings and comments."""
import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "mutate", Path(__file__).resolve().parents[1] / "scripts" / "mutate.py")
mutate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutate)


def test_mutants_swap_operators_and_constants_but_not_text():
    src = ('def f(a, b):\n'
           '    """a + b < 2"""\n'
           '    x = f"{a + 1}"  # a - b\n'
           '    return min(a + 1, b) <= 2.5 and True\n')
    ms = mutate.mutants(src)
    assert {(m["line"], m["old"], m["new"]) for m in ms} == {
        (4, "min", "max"), (4, "+", "-"), (4, "1", "2"), (4, "<=", "<"), (4, "2.5", "5.0"),
        (4, "and", "or"), (4, "True", "False")}
    plus = next(m for m in ms if m["old"] == "+")
    assert mutate.apply(src, plus).splitlines()[3] == "    return min(a - 1, b) <= 2.5 and True"


SCOPED = '''LIMIT = 3 + 1


def outer(a, b=2 * 3):
    """doc"""
    c = a + b

    def inner(d=c - 1):
        return d * 2
    return inner() + LIMIT


class Op:
    size = 4 - 1

    def __call__(self, x):
        return x + self.size
'''


def test_function_scopes_map_body_lines_to_their_function_and_import_time_lines_to_none():
    scope = mutate.function_scopes(SCOPED)
    assert scope(1) is None                 # a module constant: evaluated at import
    assert scope(4) is None                 # a top-level def's default: evaluated at import
    assert scope(6) == (5, 10)              # outer's body (from its docstring to its end)
    assert scope(8) == (5, 10)              # inner's default: evaluated when outer runs
    assert scope(9) == (9, 9)               # inner's body
    assert scope(10) == (5, 10)
    assert scope(14) is None                # a class attribute: evaluated at import
    assert scope(17) == (17, 17)            # a method's body


def test_selection_takes_the_tests_that_run_the_function_fastest_first(tmp_path):
    path = tmp_path / "scoped.py"
    path.write_text(SCOPED)
    spec = importlib.util.spec_from_file_location("scoped", path)
    scoped = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scoped)
    tracer = mutate._LineTracer(path)
    for test, call, secs in (("t_outer", lambda: scoped.outer(1), 2.0),
                             ("t_op", lambda: scoped.Op()(1), 1.0),
                             ("t_both", lambda: (scoped.outer(1), scoped.Op()(1)), 0.5)):
        sink = tracer.lines.setdefault(test, set())
        sys.settrace(tracer._tracer(sink))
        try:
            call()
        finally:
            sys.settrace(None)
        tracer.seconds[test] = secs
    assert tracer.lines["t_op"] == {17}
    assert mutate.select((9, 9), tracer) == ["t_both", "t_outer"]
    assert mutate.select((17, 17), tracer) == ["t_both", "t_op"]
    assert mutate.select(None, tracer) is None  # import-time lines: every test
