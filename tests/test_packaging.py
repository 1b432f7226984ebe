"""The package as it installs from its wheel, not from this checkout: the wheel is built from a clean copy of the
source, installed (non-editable, no dependencies) into a fresh virtualenv that borrows this machine's packages, and
used from a folder outside the repository with PYTHONPATH cleared. Every module imports from the venv, the
Dockerfiles' own import checks pass, the console script runs, and the data files (the tiny and stand-in checkpoints, the
compiled pipeline) are in the wheel. The images build from what their Dockerfiles COPY: that context must give the same
wheel. The GPU image's lock is what its command resolves to today (this needs the package index)."""

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": ROOT / "images" / "cpu" / "Dockerfile", "gpu": ROOT / "images" / "gpu" / "Dockerfile"}
# What a checkout may hold besides the source: build outputs (a stale build/lib would leak into the wheel), caches,
# runs. The wheel is built from a copy without them, and the build writes nothing into the checkout.
NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache",
                                    ".ruff_cache", "runs", "out", "mlruns", "mlflow", "shared", ".venv-gpu-set")
# Installed and importable in the GPU image, but not here: vLLM and Triton (CUDA-only; the CPU torch needs no Triton).
NOT_INSTALLED_HERE = {"vllm", "triton"}
LOCK_FILE = ROOT / "images" / "gpu" / "requirements.txt"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", "\n".join(line for line in path.read_text().splitlines()
                                               if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def _build_wheel(source: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w",
                    str(out)], cwd=source, check=True, capture_output=True, text=True, timeout=600)
    [wheel] = out.glob("caopd-*.whl")
    return wheel


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "VIRTUAL_ENV": str(venv)}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, outside, wheel): the wheel of a clean copy of the source, installed into a fresh virtualenv."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    wheel = _build_wheel(source, base / "dist")
    venv = base / "venv"
    # --system-site-packages: the dependencies come from this machine (nothing is downloaded); so does pip.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    # --force-reinstall: this machine's editable install is the same version; pip leaves it alone (outside the env)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q",
                    str(wheel)], check=True, capture_output=True, text=True, env=_env(venv), timeout=300)
    outside = base / "elsewhere"
    outside.mkdir()
    return venv, outside, wheel


def _run(installed, args, **kwargs) -> subprocess.CompletedProcess:
    venv, outside, _ = installed
    result = subprocess.run(args, cwd=outside, env=_env(venv), capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def _source_modules() -> set[str]:
    """Every module of the package as the repository lays it out (src/caopd, components/, pipelines/)."""
    modules = set()
    for package, folder in (("caopd", ROOT / "src" / "caopd"), ("caopd.components", ROOT / "components"),
                            ("caopd.pipelines", ROOT / "pipelines")):
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules.add(".".join((package, *parts)))
    return modules


IMPORT_EVERYTHING = """
import importlib, json, pkgutil, sys
import caopd
names = []
for info in pkgutil.walk_packages(caopd.__path__, "caopd."):
    if info.name.rsplit(".", 1)[-1] == "__main__":
        continue  # a script: importing it runs the CLI (run as `python -m caopd.cli` instead)
    names.append(info.name)
    importlib.import_module(info.name)
files = {name: getattr(module, "__file__", None) for name, module in sys.modules.items()
         if name == "caopd" or name.startswith("caopd.")}
print(json.dumps({"package": caopd.__file__, "walked": names, "files": files}))
"""


def test_every_module_imports_from_the_installed_wheel_not_the_checkout(installed):
    venv = installed[0]
    result = json.loads(_run(installed, [str(venv / "bin" / "python"), "-c", IMPORT_EVERYTHING]).stdout)
    assert Path(result["package"]).is_relative_to(venv), result["package"]
    # Every loaded module is the venv's: a module missing from the wheel would otherwise be found by this machine's
    # editable install (its finder sits on the borrowed site-packages) and pass unnoticed.
    elsewhere = {name: file for name, file in result["files"].items() if not Path(file).is_relative_to(venv)}
    assert not elsewhere, elsewhere
    expected = {name for name in _source_modules() if not name.endswith(".__main__")} - {"caopd"}
    assert set(result["walked"]) == expected, (sorted(expected - set(result["walked"])),
                                               sorted(set(result["walked"]) - expected))


def _import_check(dockerfile: Path) -> str:
    """The `python -c "import ..."` check a Dockerfile runs after installing the package, as written there."""
    runs = " && ".join(args for instruction, args in _instructions(dockerfile) if instruction == "RUN")
    [check] = [c.strip() for c in runs.split("&&") if re.match(r"\s*python3? -c ['\"]import ", c)]
    return check


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_dockerfiles_import_check_passes_against_the_wheel(installed, name):
    command = _import_check(DOCKERFILES[name])
    python, flag, code = shlex.split(command)
    imported = [module.strip() for module in code.removeprefix("import ").split(",")]
    assert python in ("python", "python3") and flag == "-c" and code.startswith("import ") and "caopd.cli" in imported
    # The GPU image imports vllm and triton too, which this machine does not have: exactly those are left out here.
    kept = [module for module in imported if module not in NOT_INSTALLED_HERE]
    assert name == "gpu" or kept == imported, imported
    if kept != imported:
        command = shlex.join([python, flag, "import " + ", ".join(kept)])
    # run as the Dockerfile does, by the shell: `python` on PATH is the venv's
    _run(installed, ["bash", "-c", command])


def test_the_console_script_and_python_m_run_from_the_venv(installed):
    venv = installed[0]
    script = venv / "bin" / "caopd"
    assert script.is_file() and str(venv) in script.read_text().splitlines()[0]  # its shebang: the venv's python
    out = _run(installed, [str(script), "--help"]).stdout
    assert "usage: caopd" in out and all(command in out for command in ("run", "prepare", "submit", "register"))
    assert "usage: caopd" in _run(installed, [str(venv / "bin" / "python"), "-m", "caopd.cli", "--help"]).stdout


CHECK_DATA = """
import json
from caopd.models import tiny
from caopd.models.loading import load_model
from caopd.pipelines import COMPILED_PIPELINE
loaded = load_model("tiny")
files = sorted(p.name for p in tiny.CHECKPOINT_DIR.iterdir())
print(json.dumps({"checkpoint": str(tiny.CHECKPOINT_DIR), "files": files, "pipeline": str(COMPILED_PIPELINE),
                  "parameters": sum(p.numel() for p in loaded.model.parameters())}))
"""


def test_the_tiny_checkpoint_and_the_compiled_pipeline_are_in_the_wheel_and_load(installed):
    venv, _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    checkpoint = ROOT / "src" / "caopd" / "models" / "tiny_checkpoint"
    expected = {p.name for p in checkpoint.iterdir() if p.is_file()}
    assert expected >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert {f"caopd/models/tiny_checkpoint/{name}" for name in expected} <= names
    assert "caopd/pipelines/caopd_pipeline.yaml" in names
    result = json.loads(_run(installed, [str(venv / "bin" / "python"), "-c", CHECK_DATA]).stdout)
    assert Path(result["checkpoint"]).is_relative_to(venv) and set(result["files"]) == expected
    assert result["parameters"] > 0  # the installed checkpoint loads
    pipeline = Path(result["pipeline"])
    assert pipeline.is_relative_to(venv)
    assert pipeline.read_bytes() == (ROOT / "pipelines" / "caopd_pipeline.yaml").read_bytes()


STANDIN_FILES = ("caopd.json", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                 "tokenizer.json", "tokenizer_config.json")
CHECK_STANDIN = """
import json
from caopd.models import standin
from caopd.models.loading import load_model
loaded = load_model("standin")
print(json.dumps({"checkpoint": str(standin.CHECKPOINT_DIR), "template": loaded.template,
                  "files": sorted(p.name for p in standin.CHECKPOINT_DIR.iterdir()),
                  "eos": loaded.tokenizer.eos_token}))
"""


def test_the_standin_checkpoint_is_in_the_wheel_and_loads(installed):
    venv, _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"caopd/models/standin_checkpoint/{name}" for name in STANDIN_FILES}
    assert expected <= names, sorted(expected - names)
    result = json.loads(_run(installed, [str(venv / "bin" / "python"), "-c", CHECK_STANDIN]).stdout)
    assert Path(result["checkpoint"]).is_relative_to(venv) and result["files"] == sorted(STANDIN_FILES)
    assert result["template"] == "paper" and result["eos"] == "<|im_end|>"  # the metadata and the tokenizer load


def _copied(dockerfile: Path) -> list[str]:
    """The paths a Dockerfile COPYs from the build context into the folder it installs from."""
    paths = []
    for instruction, args in _instructions(dockerfile):
        if instruction == "COPY":
            sources = [a for a in args.split()[:-1] if not a.startswith("--")]
            paths += sources
    return paths


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_images_build_context_gives_the_same_wheel(installed, tmp_path, name):
    # `pip install .` in the image sees only what the Dockerfile copied: a build file left out changes the wheel
    context = tmp_path / "context"
    context.mkdir()
    for path in _copied(DOCKERFILES[name]):
        source = ROOT / path
        if source.is_dir():
            shutil.copytree(source, context / path, ignore=NOT_SOURCE)
        else:
            (context / path).parent.mkdir(parents=True, exist_ok=True)  # the GPU image's lock sits in images/gpu/
            shutil.copy2(source, context / path)
    image_wheel = _build_wheel(context, tmp_path / "dist")
    files = {n for n in zipfile.ZipFile(image_wheel).namelist() if ".dist-info/" not in n}
    expected = {n for n in zipfile.ZipFile(installed[2]).namelist() if ".dist-info/" not in n}
    assert files == expected, (f"the image's wheel lacks {sorted(expected - files)[:10]} and adds "
                               f"{sorted(files - expected)[:10]}; the Dockerfile copies {_copied(DOCKERFILES[name])}")


def test_the_committed_gpu_lock_is_what_its_command_resolves_to(tmp_path):
    """The real drift check: the command in images/gpu/lock.py (uv, from the dev extra; the index, as of the date it
    records) resolves pyproject.toml to exactly the committed lock, header and annotations included."""
    spec = importlib.util.spec_from_file_location("gpu_lock", ROOT / "images" / "gpu" / "lock.py")
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    committed = LOCK_FILE.read_text()
    fresh = lock.resolve(tmp_path)
    assert fresh == committed, "\n".join(["regenerate: python images/gpu/lock.py", *lock.drift(committed, fresh)])
