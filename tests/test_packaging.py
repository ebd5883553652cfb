"""The package as a user installs it: a wheel built from the repository, installed with
``--no-deps`` into a fresh virtual environment, run from a folder with its own ``models/`` and
``pipeline.py`` (names our import name ``tricks`` must not collide with)."""
import importlib.util
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the folders pyproject.toml maps into the package `tricks` (its [tool.setuptools.package-dir])
PACKAGE_DIRS = ["errors", "pipeline", "models", "train", "benchmarks", "configs"]
# what the wheel needs at run time, found where this interpreter finds it (the venv sees the
# project's torch through a .pth file, as the brief of issue 15 asks)
DEPENDENCIES = ["torch", "torchvision", "numpy", "PIL", "yaml", "tqdm", "matplotlib"]


def _run(cmd, cwd, env):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, tricks script, env) of a fresh venv holding only the wheel."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the wheel needs setuptools (the project's `test` extra has it)")
    tmp = tmp_path_factory.mktemp("wheel")
    # build from a copy, so the build's own folders (build/, *.egg-info) stay out of the checkout
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in PACKAGE_DIRS:
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(tmp / "dist"), str(src)], tmp, env)
    wheel, = (tmp / "dist").glob("tricks-*.whl")

    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     tmp, env).strip())
    dirs = {str(Path(importlib.util.find_spec(m).origin).parents[1]) for m in DEPENDENCIES}
    (site / "project-deps.pth").write_text("".join(f"{d}\n" for d in sorted(dirs)))
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
          "--no-index", str(wheel)], tmp, env)
    return python, env_dir / "bin" / "tricks", site, env


@pytest.fixture()
def user_project(tmp_path):
    """A user's project with its own top-level `models` package and `pipeline` module."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("OWNER = 'user'\n")
    (tmp_path / "pipeline.py").write_text("OWNER = 'user'\n")
    return tmp_path


@pytest.mark.slow
def test_the_wheel_runs_from_its_own_copy_beside_a_users_models_and_pipeline(installed,
                                                                             user_project):
    python, tricks, site, env = installed
    where = _run([python, "-c", "import models, pipeline, tricks.train.cli as cli, "
                  "tricks.models as zoo, tricks.benchmarks.results as r; "
                  "print(cli.__file__, zoo.__file__, models.OWNER, pipeline.OWNER, "
                  "r.default_results_dir(), sep='\\n')"], user_project, env).splitlines()
    # the CLI is the wheel's copy in the venv, not the source tree (nor an editable install)
    assert Path(where[0]).resolve() == (site / "tricks" / "train" / "cli.py").resolve()
    assert Path(where[1]).is_relative_to(site)
    # the user's own names stay theirs (python -c puts the current folder first on sys.path)
    assert where[2:4] == ["user", "user"]
    # benchmarks without --out write under the current folder, not into site-packages
    assert Path(where[4]) == user_project / "benchmarks-results"

    # the presets are package data: the paper's whole recipe resolves from the installed copy,
    # and a misspelt one lists all four
    out = _run([tricks, "train", "-c", "baseline", "-c", "efficient", "-c", "refined",
                "--print-config"], user_project, env)
    assert "name: mixup" in out and "label_smoothing: 0.1" in out and "batch: 1024" in out
    wrong = subprocess.run([tricks, "train", "-c", "refind", "--print-config"], cwd=user_project,
                           env=env, capture_output=True, text=True)
    assert wrong.returncode == 1
    presets = ", ".join(sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
    assert "refined" in presets and f"presets: {presets} " in wrong.stderr  # every one shipped
