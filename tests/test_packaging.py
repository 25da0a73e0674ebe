"""The wheel carries what users and type checkers need: the C++ source, py.typed, the licence, true metadata."""

import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents_and_metadata(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "deprecat" not in (p.stdout + p.stderr).lower(), p.stdout + p.stderr
    (wheel,) = tmp_path.glob("normscope-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
    assert "normscope/py.typed" in names
    assert "normscope/ops/csrc/norm_cpu.cpp" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert meta["License-Expression"] == "Apache-2.0"
    from importlib.metadata import version

    assert meta["Version"] == version("normscope")
    assert meta["Requires-Python"] == ">=3.10"


def test_the_workflow_runs_what_ci_runs():
    yaml = __import__("yaml")
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith(("#", "set ", "cd "))]
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    runs = " ".join(step.get("run", "") for step in wf["jobs"]["test"]["steps"])
    assert ci, "Expected commands in .ci/run"
    for cmd in ci:
        assert cmd in runs, f"Expected the workflow to run {cmd!r} like .ci/run, but got: {runs}"
    assert wf["jobs"]["test"]["env"]["CI"] == "true"
    assert wf["jobs"]["gpu"]["if"] == "github.event_name == 'workflow_dispatch'"


def test_python_classifiers_are_the_versions_the_workflow_checks():
    import re

    tomllib = __import__("tomllib") if sys.version_info >= (3, 11) else __import__("tomli")
    yaml = __import__("yaml")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pattern = re.compile(r"Programming Language :: Python :: (3\.\d+)")
    found = (pattern.fullmatch(c) for c in project["classifiers"])
    classified = sorted((m.group(1) for m in found if m), key=lambda v: tuple(map(int, v.split("."))))
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    checked = wf["jobs"]["python-versions"]["strategy"]["matrix"]["python"]
    assert classified == checked, f"Expected classifiers for the checked Pythons {checked}, but got {classified}"
    assert project["requires-python"] == f">={classified[0]}"
    assert "Typing :: Typed" in project["classifiers"]  # py.typed ships in the wheel (test above)
