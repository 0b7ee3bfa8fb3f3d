"""The repository's own rules: pinned requirements in step with their .in files, linted scripts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def _pins(txt: Path) -> dict[str, tuple[str, list[str]]]:
    """{package: (version, [what it is 'via'])} from a pip-compile output file."""
    pins, current = {}, None
    for line in txt.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s\\;]+)", line)
        if m:
            current = canonicalize_name(m.group(1))
            pins[current] = (m.group(2), [])
        elif current and line.strip().startswith("#"):
            via = line.strip().lstrip("#").strip()
            via = via.removeprefix("via").strip()
            if via:
                pins[current][1].append(via)
    return pins


def _direct(infile: Path) -> list[Requirement]:
    lines = [ln.split("#")[0].strip() for ln in infile.read_text().splitlines()]
    return [Requirement(ln) for ln in lines if ln and not ln.startswith("-")]


@pytest.mark.parametrize("name", ["requirements", "requirements-dev", "requirements-gpu", "bench/peers/requirements"])
def test_compiled_requirements_match_their_in_file(name):
    """Fails when a .in file was edited without recompiling (see docs/development.md, Dependencies)."""
    infile, txt = REPO / f"{name}.in", REPO / f"{name}.txt"  # bench/peers: the peers benchmark's own (bench/peers/install.sh)
    pins = _pins(txt)
    direct = _direct(infile)
    for req in direct:
        key = canonicalize_name(req.name)
        assert key in pins, f"{req.name} is in {infile.name} but not pinned in {txt.name}: recompile"
        assert req.specifier.contains(pins[key][0], prereleases=True), f"{req} does not admit the pinned {pins[key][0]}"
        assert any(f"-r {infile.name}" in v for v in pins[key][1]), f"{txt.name} does not list {req.name} as direct: recompile"
    direct_names = {canonicalize_name(r.name) for r in direct}
    for key, (_, via) in pins.items():
        if any(f"-r {infile.name}" in v for v in via):
            assert key in direct_names, f"{key} is no longer in {infile.name} but still pinned as direct: recompile"
    assert all(re.search(r"--hash=sha256:[0-9a-f]{64}", block) for block in txt.read_text().split("==")[1:])


def test_package_dependencies_admit_the_locked_versions():
    """pyproject.toml's ranges (for `pip install .`) agree with requirements.txt's pins."""
    import tomllib

    declared = [Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    pins = _pins(REPO / "requirements.txt")
    direct = {canonicalize_name(r.name) for r in _direct(REPO / "requirements.in")}
    for req in declared:
        key = canonicalize_name(req.name)
        assert key in pins, f"{req.name} is a dependency in pyproject.toml but not locked in requirements.txt"
        assert req.specifier.contains(pins[key][0]), f"pyproject.toml's {req} does not admit the locked {pins[key][0]}"
    assert direct <= {canonicalize_name(r.name) for r in declared}, "requirements.in names a package pyproject.toml lacks"


def test_lock_files_name_no_package_index():
    """Lock files and their sources say how to recompile (scripts/lock), not where from."""
    locks = [*REPO.glob("requirements*.in"), *REPO.glob("requirements*.txt"), *REPO.glob("bench/peers/requirements.*")]
    for path in [*locks, REPO / "README.md", *REPO.glob("docs/*.md")]:
        text = path.read_text()
        assert not re.search(r"--(extra-)?index-url|--find-links|https?://[^\s]*/simple", text), path.name
    for txt in [*REPO.glob("requirements*.txt"), REPO / "bench/peers/requirements.txt"]:
        assert "scripts/lock" in txt.read_text()[:400], f"{txt.name} was not compiled by scripts/lock"


def test_gpu_requirements_differ_only_in_tensorflow():
    def names(infile):
        return {canonicalize_name(r.name): r for r in _direct(REPO / infile)}

    cpu, gpu = names("requirements.in"), names("requirements-gpu.in")
    assert set(cpu) - {"tensorflow-cpu"} == set(gpu) - {"tensorflow"}
    assert all(str(cpu[n].specifier) == str(gpu[n].specifier) for n in set(cpu) & set(gpu))
    assert cpu["tensorflow-cpu"].specifier == gpu["tensorflow"].specifier and "and-cuda" in gpu["tensorflow"].extras


def _tool(name: str) -> str | None:
    """A tool from this environment's bin folder (requirements-dev.txt), else from PATH."""
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


@pytest.mark.parametrize(
    "tool, args",
    [
        ("shellcheck", ["download_datasets.sh", ".ci/run", "scripts/lock", "scripts/prune-slim", "bench/peers/install.sh"]),
        ("hadolint", ["--failure-threshold", "warning", "Dockerfile"]),
    ],
)
def test_scripts_and_dockerfile_are_lint_clean(tool, args):
    path = _tool(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (pip install -r requirements-dev.txt)")
    result = subprocess.run([path, *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
