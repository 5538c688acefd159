"""Write the synthetic IRIS demo data set (``bundle/scripts/data/demo_data.py``) from the command line.

Example: ``python scripts/make_demo_data.py --output_dir data/demo``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUNDLE_ROOT = HERE.parent / "bundle"


def _load_make_demo_dataset() -> Callable[..., Path]:
    """Import ``scripts.data.demo_data`` from the bundle, not from this folder, which is also named ``scripts``."""
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]
    sys.path.insert(0, str(BUNDLE_ROOT))
    from scripts.data.demo_data import make_demo_dataset

    return make_demo_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder for dataset.json, imagesTr and labelsTr")
    parser.add_argument("--num_training", type=int, default=24)
    parser.add_argument("--num_validation", type=int, default=6)
    parser.add_argument("--num_test", type=int, default=6, help="labelled subjects kept out of model selection")
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64], metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, default=1.5, help="isotropic voxel size in mm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_demo_dataset = _load_make_demo_dataset()
    path = make_demo_dataset(
        args.output_dir,
        num_training=args.num_training,
        num_validation=args.num_validation,
        num_test=args.num_test,
        shape=tuple(args.shape),
        spacing=args.spacing,
        seed=args.seed,
    )
    logging.info("Wrote %s", path)


if __name__ == "__main__":
    main()
