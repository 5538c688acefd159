"""Draw a trained model's class-embedding map: its memory bank's class embeddings in 2D (PCA, and t-SNE when
scikit-learn is installed), coloured by dataset, with the cosine-similarity matrix as CSV.

Example::

    python scripts/plot_embeddings.py --model bundle/models/model.pt --out bundle/logs
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))
from scripts.segmentation.model_io import load_network_state  # noqa: E402
from scripts.training.embedding_map import memory_bank_embeddings, write_embedding_map  # noqa: E402


def plot_embeddings(model: str = str(BUNDLE / "models" / "model.pt"), out: str = ".") -> list[str]:
    """Write ``class_embeddings_*.png`` and ``class_similarity.csv`` into ``out`` and return their paths."""
    names, embeddings = memory_bank_embeddings(load_network_state(model))
    return [str(path) for path in write_embedding_map(names, embeddings, out)]


if __name__ == "__main__":
    fire.Fire(plot_embeddings)
