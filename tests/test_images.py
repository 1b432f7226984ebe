"""The Dockerfiles, checked statically (no Docker engine here): base images pinned by digest with their tag named,
every installed package pinned, the package the components import installed and checked, a non-root user, and
the image names the pipeline uses matching the Dockerfiles. The MLflow server's image is the CPU image's base with
the MLflow caopd pins, the PostgreSQL and S3 clients, and caopd without its dependencies, whose `caopd-auth` server
app the build finds as `mlflow server --app-name` does; the chart runs it by default. The GPU image installs its lock
(images/gpu/requirements.txt, written by images/gpu/lock.py): every version is read from there, the lock agrees with
pyproject.toml and with the image's Python, and CI's set is the lock minus exactly the documented exclusions. (The
re-resolve that proves the lock is what its command gives needs the package index: tests/test_packaging.py, slow.)"""

import importlib.util
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from caopd.config.images import CPU_IMAGE, GPU_IMAGE, IMAGE_CACHE_DIR

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {name: ROOT / "images" / name / "Dockerfile" for name in ("cpu", "gpu", "mlflow")}
PINNED = re.compile(r"[\w.-]+(\[[\w,.-]+\])?==[\w.+-]+")  # name[extras]==version
LOCK_FILE = ROOT / "images" / "gpu" / "requirements.txt"
# images/ is no package: the lock script is loaded from its file
_spec = importlib.util.spec_from_file_location("gpu_lock", ROOT / "images" / "gpu" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)
# The Python each Ubuntu release ships as python3: the image's venv runs it, so the lock must be resolved for it.
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12", "26.04": "3.14"}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", "\n".join(line for line in path.read_text().splitlines()
                                               if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_base_image_is_pinned_by_digest_with_its_tag_in_a_comment(name):
    path = DOCKERFILES[name]
    [base] = [args for instruction, args in _instructions(path) if instruction == "FROM"]
    match = re.fullmatch(r"(?P<image>[\w./-]+):(?P<tag>[\w.-]+)@sha256:[0-9a-f]{64}", base)
    assert match, base
    comments = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"{match['image']}:{match['tag']}" in line for line in comments)


def _pip_installs(path: Path) -> list[list[str]]:
    """The arguments of every `pip install` the Dockerfile runs, in order."""
    return [[token.strip("'\"") for token in line.split()] for instruction, args in _instructions(path)
            if instruction == "RUN" for line in re.findall(r"pip install ([^&]+)", args)]


def _locked_lines(text: str) -> list[str]:
    """A requirements file's requirement lines: comments, annotations, options and blank lines dropped."""
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith(("#", "-"))]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_every_installed_package_is_pinned(name):
    installs = _pip_installs(DOCKERFILES[name])
    assert installs
    for tokens in installs:
        for i, token in enumerate(tokens):
            if token.startswith("-") or token.startswith("http"):
                continue  # options and their values (an index URL)
            if i and tokens[i - 1] in ("-r", "--requirement"):
                # a requirements file: every line in it is pinned
                lines = _locked_lines((ROOT / token).read_text())
                assert lines and all(PINNED.fullmatch(line) for line in lines), token
                continue
            # the project itself, whose own dependencies are pinned in pyproject.toml (and, for the GPU image, the lock)
            assert PINNED.fullmatch(token) or token == ".", token


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_the_image_installs_the_package_the_components_import_and_runs_as_non_root(name):
    instructions = _instructions(DOCKERFILES[name])
    copied = {args.split()[0] for instruction, args in instructions if instruction == "COPY"}
    assert {"pyproject.toml", "src", "components", "pipelines"} <= copied
    runs = " ".join(args for instruction, args in instructions if instruction == "RUN")
    assert "import caopd.components, caopd.pipelines" in runs
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1] not in ("0", "root")
    last_run = max(i for i, (instruction, _) in enumerate(instructions) if instruction == "RUN")
    assert max(i for i, (instruction, _) in enumerate(instructions) if instruction == "USER") > last_run


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_the_pipelines_download_volume_is_the_images_cache(name):
    home = re.search(r"^ENV HOME=(\S+)", (ROOT / "images" / name / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert IMAGE_CACHE_DIR == f"{home}/.cache"  # where caopd's sources and the hub cache go under $HOME


def test_the_pipeline_names_the_images_these_dockerfiles_build():
    for name, image in (("cpu", CPU_IMAGE), ("gpu", GPU_IMAGE)):
        repository, tag = image.rsplit(":", 1)
        assert repository.endswith(f"-{name}")
        assert f"-t {image} ." in DOCKERFILES[name].read_text()  # the build command the Dockerfile documents


def test_the_cpu_image_uses_the_torch_the_project_tests_with():
    ci = (ROOT / ".ci" / "run").read_text()
    pinned = re.search(r"torch==([\w.]+)", ci)[1]
    assert f"torch=={pinned}" in DOCKERFILES["cpu"].read_text()


# ---- the MLflow server's image ----


def _project_requirement(name: str) -> Requirement:
    [requirement] = [Requirement(r) for r in _pyproject()["project"]["dependencies"] if Requirement(r).name == name]
    return requirement


def test_the_mlflow_image_installs_the_pinned_server_then_caopd_without_dependencies():
    instructions = _instructions(DOCKERFILES["mlflow"])
    [base] = [args for instruction, args in instructions if instruction == "FROM"]
    [cpu_base] = [args for instruction, args in _instructions(DOCKERFILES["cpu"]) if instruction == "FROM"]
    assert base == cpu_base  # one slim Python base to keep current
    server, project = _pip_installs(DOCKERFILES["mlflow"])
    pins = {Requirement(token).name: Requirement(token) for token in server}
    assert set(pins) == {"mlflow", "psycopg2-binary", "boto3"} and pins["mlflow"].extras == {"auth"}
    # the MLflow caopd is tested with; a boto3 caopd itself accepts
    assert str(pins["mlflow"].specifier) == str(_project_requirement("mlflow").specifier)
    [boto3] = [Version(spec.version) for spec in pins["boto3"].specifier]
    assert _project_requirement("boto3").specifier.contains(boto3)
    assert project == ["--no-deps", "."]  # the server app imports MLflow and Flask only: no torch, no kfp
    copied = {args.split()[0] for instruction, args in instructions if instruction == "COPY"}
    assert {"pyproject.toml", "src"} <= copied
    runs = " ".join(args for instruction, args in instructions if instruction == "RUN")
    assert "import caopd.tracking.server_app" in runs and "_find_app('caopd-auth')" in runs
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1] == "1000"  # the chart's podSecurityContext.runAsUser
    last_run = max(i for i, (instruction, _) in enumerate(instructions) if instruction == "RUN")
    assert max(i for i, (instruction, _) in enumerate(instructions) if instruction == "USER") > last_run


def test_the_server_app_the_mlflow_image_checks_is_caopds_entry_point():
    entry_points = _pyproject()["project"]["entry-points"]["mlflow.app"]
    assert entry_points["caopd-auth"] == "caopd.tracking.server_app:create_app"


def test_the_chart_runs_the_mlflow_image_this_dockerfile_builds():
    import yaml

    chart = yaml.safe_load((ROOT / "charts" / "caopd" / "Chart.yaml").read_text())
    image = yaml.safe_load((ROOT / "charts" / "caopd" / "values.yaml").read_text())["mlflow"]["image"]
    assert image["tag"] == "" and chart["appVersion"] == CPU_IMAGE.rsplit(":", 1)[1]  # the tag is the appVersion
    assert f"-t {image['repository']}:{chart['appVersion']} ." in DOCKERFILES["mlflow"].read_text()


# ---- the GPU image and its lock ----


def _gpu_base() -> re.Match:
    [base] = [args for instruction, args in _instructions(DOCKERFILES["gpu"]) if instruction == "FROM"]
    match = re.fullmatch(r"nvidia/cuda:(?P<cuda>[\d.]+)-(?P<flavour>\w+)-ubuntu(?P<ubuntu>[\d.]+)@sha256:\w+", base)
    assert match, base
    return match


def _apt_installed(path: Path) -> set[str]:
    runs = " ".join(args for instruction, args in _instructions(path) if instruction == "RUN")
    return {package for line in re.findall(r"apt-get install ([^&]+)", runs) for package in line.split()
            if not package.startswith("-")}


def test_the_gpu_base_is_cuda_13_with_nvcc_compilers_and_python_headers():
    base = _gpu_base()
    assert base["cuda"].startswith("13.")  # torch 2.14.0's CUDA wheels: CUDA 13, driver >= 580
    assert base["flavour"] == "devel"  # nvcc and the CUDA headers FlashInfer's JIT compiles with
    # Triton's C launcher: gcc, libc headers, Python.h; FlashInfer: the C++ compiler; the image's Python and its venv
    assert {"gcc", "g++", "libc6-dev", "python3-dev", "python3", "python3-venv"} <= _apt_installed(DOCKERFILES["gpu"])
    text = DOCKERFILES["gpu"].read_text()
    assert "driver >= 580" in text


def test_the_gpu_image_checks_what_triton_and_flashinfer_compile_with():
    runs = [args for instruction, args in _instructions(DOCKERFILES["gpu"]) if instruction == "RUN"]
    checks = " ".join(runs)
    # Triton's own build of a C extension (its compiler lookup and its Python.h path), then FlashInfer's tools
    assert "from triton.runtime.build import _build" in checks and "#include <Python.h>" in checks
    assert "c++ --version" in checks and "nvcc --version" in checks


def test_the_lock_is_resolved_for_the_python_of_the_gpu_base():
    header = LOCK_FILE.read_text().split("\n\n", 1)[0]
    [python] = re.findall(r"--python-version (\S+)", header)
    assert python == lock.PYTHON_VERSION == UBUNTU_PYTHON[_gpu_base()["ubuntu"]]


def test_the_gpu_image_installs_the_lock_then_caopd_without_dependencies_and_not_editable():
    installs = _pip_installs(DOCKERFILES["gpu"])
    assert installs == [["-r", lock.LOCK], ["--no-deps", "."]]
    copied = [args.split()[0] for instruction, args in _instructions(DOCKERFILES["gpu"]) if instruction == "COPY"]
    assert lock.LOCK in copied
    # no version is written twice: the Dockerfile names none, the lock names them all
    assert not re.search(r"\w==\d", " ".join(args for _, args in _instructions(DOCKERFILES["gpu"])))


def test_the_gpu_image_frees_uid_1000_from_ubuntus_default_user():
    # ubuntu:24.04 (and the CUDA images built on it) ships a user `ubuntu` with uid 1000: useradd --uid 1000 fails
    runs = [args for instruction, args in _instructions(DOCKERFILES["gpu"]) if instruction == "RUN"]
    [create] = [run for run in runs if "useradd" in run]
    assert "--uid 1000" in create and create.index("userdel --remove ubuntu") < create.index("useradd")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_requirement_of_the_project_and_its_gpu_extra_is_satisfied_by_its_locked_version():
    locked = lock.pins(LOCK_FILE.read_text())
    project = _pyproject()["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["gpu"]]
    environment = {"python_version": lock.PYTHON_VERSION, "python_full_version": f"{lock.PYTHON_VERSION}.0"}
    for requirement in requirements:
        if requirement.marker and not requirement.marker.evaluate(environment):
            continue
        name = lock.canonical(requirement.name)
        assert name in locked, f"{requirement} is not in the lock: regenerate it (python images/gpu/lock.py)"
        assert requirement.specifier.contains(Version(locked[name]), prereleases=True), (
            f"{requirement} in pyproject.toml, {name}=={locked[name]} in the lock: regenerate it")


def test_the_lock_pins_vllm_torch_and_transformers_and_not_caopd():
    locked = lock.pins(LOCK_FILE.read_text())
    assert {"vllm", "torch", "transformers", "triton"} <= locked.keys()
    assert "caopd" not in locked and not re.search(r"^(-e|\.|file:)", LOCK_FILE.read_text(), re.MULTILINE)
    # transformers' lower bound in pyproject.toml is the oldest release CI tests: the lock's (vLLM caps it)
    [transformers] = [Requirement(r) for r in _pyproject()["project"]["dependencies"]
                      if Requirement(r).name == "transformers"]
    [lower] = [spec.version for spec in transformers.specifier if spec.operator == ">="]
    assert Version(lower).release[:2] == Version(locked["transformers"]).release[:2], (lower, locked["transformers"])


def test_the_locks_header_carries_the_command_lock_py_runs():
    header = LOCK_FILE.read_text().splitlines()[:2]
    assert header[0] == "# This file was autogenerated by uv via the following command:"
    assert header[1] == "#    " + " ".join(lock.COMMAND)
    assert f"--exclude-newer {lock.EXCLUDE_NEWER}" in header[1] and f"-o {lock.LOCK}" in header[1]


def test_ci_constraints_keep_every_pin_but_the_excluded_ones():
    lock_text = ("--index-url https://pypi.org/simple\n\nTorch==2.14.0\n    # via caopd (pyproject.toml)\n"
                 "nvidia-cublas==13.1.1.3\n    # via torch\ncuda-bindings==13.5.0\ntransformers==5.20.2\n"
                 "torch-c-dlpack-ext==0.1.5\nscipy==1.18.1\nNumPy==2.3.5\n")
    constraints = lock.ci_constraints(lock_text)
    assert _locked_lines(constraints) == ["numpy==2.3.5", "torch-c-dlpack-ext==0.1.5", "transformers==5.20.2"]
    assert lock.not_on_ci("Torch") == lock.NOT_ON_CI["torch"] and lock.not_on_ci("torch-c-dlpack-ext") is None


def test_the_ci_set_is_the_lock_minus_exactly_the_documented_exclusions():
    locked = lock.pins(LOCK_FILE.read_text())
    kept = lock.pins(lock.ci_constraints(LOCK_FILE.read_text()))
    assert kept == {name: version for name, version in locked.items() if lock.not_on_ci(name) is None}
    left_out = locked.keys() - kept.keys()
    named = {"torch", "torchvision", "torchaudio", "triton", "vllm", "contourpy", "networkx", "scipy"}
    assert left_out == named | {name for name in locked if name.startswith(("nvidia-", "cuda-"))}
    assert kept["transformers"] == locked["transformers"]
    # every exclusion still matches a locked package, and each says why
    for pattern, reason in lock.NOT_ON_CI.items():
        assert any(lock.not_on_ci(name) == reason for name in locked), pattern
        assert len(reason) > 20, pattern


def test_ci_runs_the_gpu_image_set_from_the_lock_in_a_gitignored_venv():
    ci = (ROOT / ".ci" / "run").read_text()
    venv = re.search(r"local venv=(\S+)", ci)[1]
    assert f"/{venv}/" in (ROOT / ".gitignore").read_text().splitlines()
    assert "images/gpu/lock.py --ci-constraints" in ci and '-c "$constraints" -e ".[dev]"' in ci
    assert "sed -n 's/^transformers==//p' images/gpu/requirements.txt" in ci  # the venv's transformers is the lock's
    # the venv sees the system's packages: what it runs must still be the lock's, checked package by package
    assert 'python3 -m venv --system-site-packages "$venv"' in ci
    assert '"$venv/bin/python" images/gpu/lock.py --verify-ci-set "$constraints"' in ci


def test_the_ci_set_check_names_each_dependency_installed_at_another_version_than_the_lock():
    from importlib.metadata import version

    closure = lock.installed_closure()
    assert {"transformers", "tokenizers", "huggingface-hub", "mlflow", "numpy"} <= closure.keys()
    assert "pytest" not in closure and "caopd" not in closure  # caopd's own requirements, not its dev extra
    here = {name: closure[name] for name in ("transformers", "numpy")}
    assert lock.ci_set_drift("".join(f"{name}=={v}\n" for name, v in here.items())) == []
    other = "transformers==5.20.2\n" if version("transformers") != "5.20.2" else "transformers==5.24.0\n"
    assert lock.ci_set_drift(other) == [f"transformers: {version('transformers')} installed, "
                                        f"{other.strip().split('==')[1]} in the lock"]
    assert lock.ci_set_drift("not-a-dependency-of-caopd==1.0\n") == []
