"""scripts/mutate.py makes the mutants it claims, and only outside strings and comments."""
import importlib.util
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
