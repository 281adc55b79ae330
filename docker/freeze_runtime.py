"""Print the pinned runtime closure of sr-batch as installed here: docker/constraints.txt.

The images install exactly the versions the test suite ran against. Regenerate after a dependency
change, from an environment made by `make install`:

    .venv/bin/python docker/freeze_runtime.py > docker/constraints.txt
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement


def runtime_closure(root: str = "sr-batch") -> dict[str, str]:
    """Installed name -> version of every package sr-batch needs at run time (no test extras)."""
    pinned: dict[str, str] = {}
    pending: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, extras = pending.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # a requirement for another platform or Python; the marker check below keeps these rare
        canonical = _canonical(dist.metadata["Name"])
        if canonical != _canonical(root):
            pinned[canonical] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            wanted = any(requirement.marker is None or requirement.marker.evaluate({"extra": extra}) for extra in extras | {""})
            if wanted:
                pending.append((requirement.name, frozenset(requirement.extras)))
    return pinned


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> None:
    print("# sr-batch runtime dependencies, pinned for the images (regenerate: .venv/bin/python docker/freeze_runtime.py > docker/constraints.txt)")
    for name, version in sorted(runtime_closure().items()):
        print(f"{name}=={version.split('+')[0]}")


if __name__ == "__main__":
    main()
