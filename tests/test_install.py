"""requirements.txt on a machine that already has torch: an installed torch in the supported range is kept.

pip is asked, offline (--no-index), to install requirements.txt's torch line into a throwaway environment
whose only package is a stand-in "torch 2.11.0+cu128" (the GPU image's CUDA build: its metadata, no code).
A requirement it satisfies needs nothing from an index; one it does not (the old pin torch==2.13.0)
would have to download a replacement and fails here.
"""
import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _requirement(name: str) -> str:
    for line in (REPO / "requirements.txt").read_text().splitlines():
        spec = line.split("#")[0].strip()
        if spec.startswith(name) and spec[len(name):][:1] in "<>=!~ ":
            return spec
    raise AssertionError(f"requirements.txt has no {name} line")


@pytest.fixture(scope="module")
def env_with_cuda_torch(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu-image")
    venv.create(root, with_pip=False)
    site = next(root.glob("lib/python*/site-packages"))
    info = site / "torch-2.11.0+cu128.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.11.0+cu128\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")
    return root / "bin" / "python"


def _pip_install(python: Path, requirement: str, report: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--no-index",
                           "--no-deps", "--report", str(report), requirement],
                          capture_output=True, text=True, timeout=120, env={"PIP_CONFIG_FILE": "/dev/null",
                                                                           "PATH": "/usr/bin:/bin"})


def test_an_existing_cuda_torch_in_the_range_is_kept(env_with_cuda_torch, tmp_path):
    result = _pip_install(env_with_cuda_torch, _requirement("torch"), tmp_path / "report.json")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "report.json").read_text())["install"] == []  # nothing downloaded or replaced
    assert "Requirement already satisfied: torch" in result.stdout


def test_the_old_exact_pin_would_have_replaced_it(env_with_cuda_torch, tmp_path):
    result = _pip_install(env_with_cuda_torch, "torch==2.13.0", tmp_path / "report.json")
    assert result.returncode != 0 and "No matching distribution found for torch==2.13.0" in result.stderr


def test_the_supported_range_is_the_tested_one():
    from packaging.requirements import Requirement

    torch_range = Requirement(_requirement("torch")).specifier
    assert [v for v in ("2.5.1", "2.6.0", "2.11.0+cu128", "2.13.0+cpu", "2.14.1") if torch_range.contains(v)] == [
        "2.6.0", "2.11.0+cu128", "2.13.0+cpu"]
    assert Requirement(_requirement("transformers")).specifier.contains("5.17.0")  # the GPU image's
