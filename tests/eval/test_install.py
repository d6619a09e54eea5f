"""A wheel of the package, installed (not editable) in a fresh environment, runs ``hf-globalres-eval`` offline.

The environment gets only the wheel; its dependencies (torch, transformers, datasets, ...) come from
the environment running the tests through a ``.pth`` line, which adds that ``site-packages`` to
``sys.path`` without running its own ``.pth`` files (so an editable install there stays inactive).
The run has no network (``HF_HUB_OFFLINE=1``, an empty Hub cache), no GSM8K copy and no repository
checkout around it: GSM8K falls back to the embedded math sample, MT-Bench reads the packaged
questions, ``--config`` finds the packaged configs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Variables that would let the run find data or code outside the installed wheel.
_CLEARED = ("HF_GLOBALRES_GSM8K", "HF_GLOBALRES_MTBENCH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{command} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment holding a wheel built from this checkout; returns its root."""
    # Located, not imported: importing setuptools here would clash with distutils already loaded by the tests.
    for module in ("pip", "setuptools"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"building and installing the wheel offline needs {module} in the test environment")
    root = tmp_path_factory.mktemp("install")
    # setuptools builds inside the source tree (build/, *.egg-info): build a copy, not the checkout.
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "hf_globalres", source / "hf_globalres", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(root / "dist"), "./source"],
         cwd=root)  # fmt: skip
    (wheel,) = (root / "dist").glob("hf_globalres-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)])
    own_site = Path(_run([str(python), "-c", "import site; print(site.getsitepackages()[0])"]).stdout.strip())
    (own_site / "_test_dependencies.pth").write_text("".join(f"{path}\n" for path in site.getsitepackages()))
    return venv


def _offline_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    # An empty Hub cache: a GSM8K cached by an earlier online run must not answer.
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(root / "hf-home"))
    return env


def test_the_package_comes_from_the_wheel(installed):
    python = installed / "bin" / "python"
    code = "import importlib.util as u; print(u.find_spec('hf_globalres').origin)"
    origin = Path(_run([str(python), "-c", code], cwd=installed).stdout.strip())
    assert origin.is_relative_to(installed) and not origin.is_relative_to(REPO)


def test_installed_eval_runs_offline_on_the_embedded_prompts(installed, tiny_pair_dirs, tmp_path):
    work = tmp_path / "work"  # no eval/configs, no ../shared/data here
    work.mkdir()
    target, draft = tiny_pair_dirs
    command = [
        str(installed / "bin" / "hf-globalres-eval"), "--limit", "2", "--datasets", "gsm8k,mtbench",
        "--target", str(target), "--draft", str(draft), "--no-progress", "--threads", "1",
    ]  # fmt: skip
    result = _run(command, cwd=work, env=_offline_env(tmp_path))
    notes = [line for line in result.stderr.splitlines() if "embedded sample" in line]
    assert len(notes) == 1 and "GSM8K could not be reached" in notes[0], result.stderr
    assert "running 2 of the 32 embedded sample problems instead" in notes[0]
    (run_dir,) = (work / "eval" / "reports").iterdir()
    records = [json.loads(line) for line in (run_dir / "records.0.jsonl").read_text().splitlines()]
    prompts = {dataset: {r["prompt"] for r in records if r["dataset"] == dataset} for dataset in ("gsm8k", "mtbench")}
    assert prompts == {"gsm8k": {"math-sample-0", "math-sample-1"}, "mtbench": {"mtbench-81", "mtbench-82"}}
    assert (run_dir / "report.md").is_file()
    assert "embedded math sample" in (run_dir / "report.md").read_text()  # the report says GSM8K did not run


def test_installed_eval_finds_the_packaged_configs(installed, tmp_path):
    command = [str(installed / "bin" / "hf-globalres-eval"), "--config", "accuracy", "--dump-config"]
    result = _run(command, cwd=tmp_path, env=_offline_env(tmp_path))
    config = json.loads(result.stdout)
    assert config["limit"] == 20 and config["run_name"] == "accuracy"
