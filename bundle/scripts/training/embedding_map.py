"""The class-embedding map: the memory bank's class embeddings drawn in 2D, as the paper's figure of how anatomical
structures relate, with their cosine similarities as CSV."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils import optional_import
from torch import nn

from ..distributed import unwrap
from ..networks import extra_state

TSNE, has_tsne = optional_import("sklearn.manifold", name="TSNE")
logger = logging.getLogger(__name__)


def memory_bank_embeddings(state: Mapping[str, object]) -> tuple[list[str], torch.Tensor]:
    """Class names and flattened embeddings (N x T*C) of the memory bank in a network state dict, without the rows
    that training reserved but never filled (count 0)."""
    extra = extra_state.decode(state.get("memory_bank._extra_state"), {})
    embeddings, counts = state.get("memory_bank.embeddings"), state.get("memory_bank.counts")
    names = list(extra.get("class_names", []))
    filled = [row for row in range(len(names)) if counts is None or int(counts[row]) > 0]
    if embeddings is None or not filled:
        raise ValueError("The model has no filled memory bank: train with --use_memory_bank True.")
    return [names[row] for row in filled], embeddings[filled].flatten(1).float()


def cosine_similarity_matrix(embeddings: torch.Tensor) -> np.ndarray:
    """N x N cosine similarities between the rows of ``embeddings``."""
    unit = torch.nn.functional.normalize(embeddings.float(), dim=1)
    return (unit @ unit.T).numpy()


def project_2d(embeddings: torch.Tensor, method: str = "pca") -> np.ndarray:
    """N x 2 coordinates: PCA (always available) or t-SNE (with scikit-learn, perplexity below N)."""
    data = embeddings.float().numpy()
    if method == "tsne":
        if not has_tsne:
            raise ImportError("t-SNE needs scikit-learn: pip install scikit-learn, or use method='pca'.")
        perplexity = max(1.0, min(30.0, (len(data) - 1) / 3))
        return TSNE(n_components=2, perplexity=perplexity, random_state=0, init="pca").fit_transform(data)
    if method != "pca":
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}.")
    centred = data - data.mean(0)
    _, _, directions = np.linalg.svd(centred, full_matrices=False)
    coordinates = centred @ directions[:2].T
    return np.pad(coordinates, ((0, 0), (0, 2 - coordinates.shape[1])))  # a single class still gets 2 columns


def write_embedding_map(names: Sequence[str], embeddings: torch.Tensor, output_dir: str | Path) -> list[Path]:
    """Write ``class_embeddings_pca.png`` (and ``class_embeddings_tsne.png`` with scikit-learn), each class named and
    coloured by its dataset (the part of ``dataset/class`` before the slash), and ``class_similarity.csv``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [output_dir / "class_similarity.csv"]
    similarity = cosine_similarity_matrix(embeddings)
    with written[0].open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["class", *names])
        for name, row in zip(names, similarity):
            writer.writerow([name, *(f"{value:.4f}" for value in row)])
    datasets = sorted({name.split("/")[0] for name in names})
    colours = plt.get_cmap("tab10")
    for method in ["pca", "tsne"] if has_tsne and len(names) > 2 else ["pca"]:
        points = project_2d(embeddings, method)
        figure, axis = plt.subplots(figsize=(8, 7))
        for index, dataset in enumerate(datasets):
            rows = [i for i, name in enumerate(names) if name.split("/")[0] == dataset]
            axis.scatter(points[rows, 0], points[rows, 1], color=colours(index % 10), label=dataset, s=60)
        for (x, y), name in zip(points, names):
            axis.annotate(name.split("/", 1)[-1], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
        axis.set_title(f"Memory-bank class embeddings ({method.upper()})")
        axis.set_xlabel("component 1" if method == "pca" else "t-SNE 1")
        axis.set_ylabel("component 2" if method == "pca" else "t-SNE 2")
        axis.legend(title="dataset", fontsize="small")
        figure.tight_layout()
        path = output_dir / f"class_embeddings_{method}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


class EmbeddingMap:
    """At the end of training, draw the memory bank's class embeddings (see :func:`write_embedding_map`) into
    ``output_dir``; nothing when the network has no memory bank or it is empty."""

    def __init__(self, network: nn.Module, output_dir: str) -> None:
        self.network = network
        self.output_dir = output_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        bank = unwrap(self.network).memory_bank
        if bank is None or not bool((bank.counts > 0).any()):
            return
        names, embeddings = memory_bank_embeddings(bank.state_dict(prefix="memory_bank."))
        written = write_embedding_map(names, embeddings.detach().cpu(), self.output_dir)
        logger.info(f"Class-embedding map: {', '.join(str(path) for path in written)}.")
