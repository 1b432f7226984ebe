"""Package discovery: every package under src/, plus components/ and pipelines/ installed as caopd.components and
caopd.pipelines (pyproject.toml maps their folders). Everything else about the build is in pyproject.toml."""

from setuptools import find_packages, setup

TOP_LEVEL = ("components", "pipelines")

setup(packages=find_packages("src") + [f"caopd.{name}" for name in find_packages(".", include=TOP_LEVEL)])
