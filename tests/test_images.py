"""The Dockerfiles, checked statically (no Docker engine here): base images pinned by digest with their tag named,
every installed package pinned, the package the components import installed and checked, a non-root user, and
the image names the pipeline uses matching the Dockerfiles."""

import re
from pathlib import Path

import pytest

from caopd.config.images import CPU_IMAGE, GPU_IMAGE, IMAGE_CACHE_DIR

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": ROOT / "images" / "cpu" / "Dockerfile", "gpu": ROOT / "images" / "gpu" / "Dockerfile"}


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


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_every_installed_package_is_pinned(name):
    installs = [args for instruction, args in _instructions(DOCKERFILES[name]) if instruction == "RUN"
                for args in re.findall(r"pip install ([^&]+)", args)]
    assert installs
    for line in installs:
        for token in line.split():
            if token.startswith("-") or token.startswith("http"):
                continue  # options and their values (an index URL)
            # the project itself, whose own dependencies are pinned in pyproject.toml where they must be
            assert re.fullmatch(r"[\w.-]+==[\w.+-]+", token) or token in (".", '".[gpu]"'), token


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
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
