"""Print docker/constraints.txt: pins for the image's Python libraries.

The pins are the closure of fedsilo's runtime requirements (pyproject.toml, with the ``server``
extra the image installs for the bundled MLflow server) as installed in the current environment, the one the tests pass in. torch and its CUDA wheels are left out: the
Dockerfile pins torch to match its CUDA base, and torch pins its CUDA wheels.

    python scripts/docker-constraints.py > docker/constraints.txt
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
HEADER = """\
# Version pins for the container image (pip -c): the closure of fedsilo's runtime requirements
# exactly as installed in the environment the tests pass in, so an image built next month gets
# the same libraries. torch is pinned in the Dockerfile itself (it must match the CUDA base),
# and its CUDA wheels come pinned by torch.
#
# Regenerate after changing dependencies in pyproject.toml:
#   python scripts/docker-constraints.py > docker/constraints.txt
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: list[str]) -> dict[str, str]:
    """Installed version of every distribution the requirements pull in, with the extras they
    name (psycopg[binary] pulls psycopg-binary)."""
    environment = {**default_environment(), "extra": ""}
    versions: dict[str, str] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = canonical(requirement.name)
        if name in versions:
            continue
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{requirement.name} is not installed here: install the project first")
        versions[name] = dist.version
        for line in dist.requires or []:
            sub = Requirement(line)
            extras = ["", *requirement.extras]
            if sub.marker is None or any(sub.marker.evaluate({**environment, "extra": e}) for e in extras):
                todo.append(sub)
    return versions


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    # The image also carries the bundled MLflow server's PostgreSQL and S3 clients.
    versions = closure(project["dependencies"] + project["optional-dependencies"]["server"])
    skipped = ("torch", "triton", "nvidia-", "cuda-")
    sys.stdout.write(HEADER)
    for name, version in sorted(versions.items()):
        if not name.startswith(skipped):
            # A local version label (+cpu) names a build, not a release on PyPI.
            print(f"{name}=={version.split('+')[0]}")


if __name__ == "__main__":
    main()
