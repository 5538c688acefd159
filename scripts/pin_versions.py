"""Record the versions of the environment the tests ran in as the bundle's pins, for the model zoo.

Example (in the environment that ``pip install -r requirements-dev.txt`` made, after the tests pass)::

    python scripts/pin_versions.py

The zoo installs exactly ``metadata.json``'s ``monai_version``, ``pytorch_version``, ``numpy_version`` and
``required_packages_version`` (on Python 3.10 in its CI). This writes the installed versions there, and each one's
``Requires-Python`` to ``tests/tested_versions.json``, which ``tests/test_zoo.py`` checks: every pin must install on
Python 3.10-3.12 and fit ``requirements.txt``.
"""

from __future__ import annotations

import json
from importlib.metadata import distribution
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METADATA = REPO / "bundle" / "configs" / "metadata.json"
TESTED = REPO / "tests" / "tested_versions.json"
PINNED = {"monai_version": "monai", "pytorch_version": "torch", "numpy_version": "numpy"}


def main() -> None:
    metadata = json.loads(METADATA.read_text())
    packages = [*PINNED.values(), *metadata["required_packages_version"]]
    installed = {name: distribution(name) for name in packages}
    for key, name in PINNED.items():
        metadata[key] = installed[name].version
    metadata["required_packages_version"] = {
        name: installed[name].version for name in metadata["required_packages_version"]
    }
    METADATA.write_text(json.dumps(metadata, indent=4) + "\n")
    tested = {
        name: {"version": dist.version, "requires_python": dist.metadata.get("Requires-Python") or ""}
        for name, dist in installed.items()
    }
    TESTED.write_text(json.dumps(tested, indent=4) + "\n")
    print(
        "\n".join(f"{name}=={entry['version']} (Python {entry['requires_python']})" for name, entry in tested.items())
    )


if __name__ == "__main__":
    main()
