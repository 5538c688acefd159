"""The k-shot evaluation protocol: references drawn from training subjects, every strategy, seen vs held-out classes.

For each draw and each k, every class gets k references (training subjects containing it, drawn with a fixed seed)
that are encoded once; every validation subject is then segmented for all its classes with each strategy, and Dice,
HD95 and surface Dice (NSD) are computed with ``monai.metrics``. Scores are averaged over subjects within a draw,
then reported as mean and standard deviation over draws. Under torchrun each rank scores a share of the subjects
and rank 0 writes the gathered results.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from torch import nn

from .distributed import gather_objects, is_main_process, rank, world_size
from .inferers import InContextInferer
from .pool import DatasetPool, Subject
from .strategies import check_strategy, encode_references, ensemble, memory, one_shot, tune, tuning_patches
from .support import Reference

logger = logging.getLogger(__name__)
METRICS = ("dice", "hd95", "nsd")


class KShotEvaluation:
    """Run the k-shot protocol and write ``metrics.json``, ``metrics.csv`` and ``dice_vs_k.png`` to ``output_dir``.

    Args:
        network: the IrisNet (weights loaded from ``ckpt_path`` when given).
        train_pool: subjects the references are drawn from.
        val_pool: subjects that are segmented and scored.
        inferer: sliding-window in-context inferer.
        output_dir: where results are written.
        ckpt_path: checkpoint (network state dict, e.g. ``model.pt``) to evaluate; None keeps the current weights.
        shots: the values of k.
        strategies: strategies to compare (``memory`` is k-independent and reported under every k).
        draws: independent reference draws averaged per k.
        seed: seed of the reference draws.
        nsd_tolerance_mm: surface-Dice tolerance.
        tuning_steps, tuning_lr: in-context tuning schedule.
        retrieval_top_k: references averaged by the retrieval strategy.
    """

    def __init__(
        self,
        network: nn.Module,
        train_pool: DatasetPool,
        val_pool: DatasetPool,
        inferer: InContextInferer,
        output_dir: str,
        ckpt_path: str | None = None,
        shots: Sequence[int] = (1, 3, 5),
        strategies: Sequence[str] = ("one_shot", "ensemble", "retrieval", "tuning"),
        draws: int = 3,
        seed: int = 0,
        nsd_tolerance_mm: float = 2.0,
        tuning_steps: int = 20,
        tuning_lr: float = 1e-3,
        retrieval_top_k: int = 1,
    ) -> None:
        self.strategies = [check_strategy(s) for s in strategies]
        if not shots or min(shots) < 1 or draws < 1:
            raise ValueError(f"eval_shots must be positive integers and eval_draws >= 1, got {shots} and {draws}.")
        self.network, self.train_pool, self.val_pool, self.inferer = network, train_pool, val_pool, inferer
        self.output_dir, self.ckpt_path = Path(output_dir), ckpt_path
        self.shots, self.draws, self.seed = list(shots), draws, seed
        self.nsd_tolerance_mm = nsd_tolerance_mm
        self.tuning_steps, self.tuning_lr, self.retrieval_top_k = tuning_steps, tuning_lr, retrieval_top_k
        self.patch_size = inferer.roi_size

    def _embeddings(
        self,
        strategy: str,
        per_reference: torch.Tensor,
        present: torch.Tensor,
        references: list[list[Reference]],
        values: Sequence[int],
        names: Sequence[str],
    ) -> torch.Tensor:
        """1 x K x T x C embeddings of a fixed (query-independent) strategy."""
        if strategy == "memory":
            return memory(self.network, [n for n in names if n in self.network.memory_bank.class_names])
        if strategy == "one_shot":
            return one_shot(per_reference, present)
        mean = ensemble(per_reference, present)
        if strategy == "tuning":
            patches = tuning_patches(references, values, self.patch_size)
            return tune(self.network, mean, patches, self.tuning_steps, self.tuning_lr)
        return mean

    @torch.no_grad()
    def _score(self, subject: Subject, logits: torch.Tensor, values: Sequence[int]) -> list[dict[str, float]]:
        """Dice, HD95 and NSD of every class of one subject (the subject's own voxel spacing is the resampled one)."""
        pred = (logits > 0).float().cpu()  # 1 x K x D x H x W
        label = subject.label[0]
        truth = torch.stack([label == v for v in values])[None].float()
        spacing = subject.spacing
        dice = compute_dice(pred, truth, include_background=True, ignore_empty=False)[0]
        hd95 = compute_hausdorff_distance(pred, truth, include_background=True, percentile=95, spacing=spacing)[0]
        nsd = compute_surface_dice(
            pred, truth, [self.nsd_tolerance_mm] * len(values), include_background=True, spacing=spacing
        )[0]
        return [{"dice": float(d), "hd95": float(h), "nsd": float(n)} for d, h, n in zip(dice, hd95, nsd)]

    def run(self) -> dict:
        if self.ckpt_path:
            self.network.load_state_dict(torch.load(self.ckpt_path, map_location="cpu", weights_only=True))
        self.network.eval()
        scores: dict = defaultdict(list)  # (strategy, k, class, draw) -> per-subject scores
        for draw in range(self.draws):
            for k in self.shots:
                self._evaluate_draw(draw, k, scores)
        merged: dict = defaultdict(list)
        for part in gather_objects(dict(scores)):  # every rank's share, under torchrun
            for key, values in part.items():
                merged[key].extend(values)
        results = self._summarise(merged)
        if is_main_process():
            self._write(results)
        return results

    def _evaluate_draw(self, draw: int, k: int, scores: dict) -> None:
        rng = np.random.default_rng([self.seed, draw, k])
        for dataset_index, info in enumerate(self.val_pool.datasets):
            values = [v for v in sorted(info.labels) if self.train_pool.holders(info.name, v)]
            if not values:
                continue
            references = [
                [Reference(s.image_path, s) for s in self._draw(rng, self.train_pool.holders(info.name, v), k)]
                for v in values
            ]
            # k x K x T x C, each class from its own k references
            per_reference, holds = encode_references(self.network, references, values, self.patch_size)
            names = [info.class_name(v) for v in values]
            for strategy in self.strategies:
                columns = self._columns(strategy, names)  # the classes this strategy can segment
                if not columns:
                    continue
                if strategy == "retrieval":
                    self.inferer.set_retrieval(per_reference, holds, self.retrieval_top_k)
                else:
                    embeddings = self._embeddings(strategy, per_reference, holds, references, values, names)
                    self.inferer.set_task(embeddings)  # memory: only the bank's classes, in column order
                subjects = [s for s in self.val_pool.subjects if s.dataset == dataset_index]
                for subject in subjects[rank() :: world_size()]:  # each rank scores its share of the subjects
                    present = [c for c, i in enumerate(columns) if values[i] in subject.classes]  # logit channels
                    if not present:
                        continue
                    with torch.no_grad():
                        logits = self.inferer(subject.image[None].to(self._device), self.network)
                    classes = [columns[c] for c in present]
                    for i, result in zip(
                        classes, self._score(subject, logits[:, present], [values[i] for i in classes])
                    ):
                        scores[(strategy, k, names[i], draw)].append(result)
            logger.info(f"k-shot evaluation: draw {draw + 1}/{self.draws}, k={k}, {info.name} done")

    def _columns(self, strategy: str, names: Sequence[str]) -> list[int]:
        """Indices of the classes a strategy can segment: all, or the memory bank's classes for ``memory``."""
        if strategy != "memory":
            return list(range(len(names)))
        bank = self.network.memory_bank
        known = set(bank.class_names) if bank is not None else set()
        return [i for i, name in enumerate(names) if name in known]

    @property
    def _device(self) -> torch.device:
        return next(self.network.parameters()).device

    @staticmethod
    def _draw(rng: np.random.Generator, holders: list[Subject], k: int) -> list[Subject]:
        replace = len(holders) < k
        return [holders[i] for i in rng.choice(len(holders), size=k, replace=replace)]

    def _summarise(self, scores: dict) -> dict:
        """Group into seen / held-out; per class mean and std over draws; per group the mean over classes."""
        held_out = set(self.val_pool.held_out_class_names)
        per_class: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
        for strategy in self.strategies:
            for k in self.shots:
                names = sorted({name for (s, kk, name, _) in scores if s == strategy and kk == k})
                for name in names:
                    group = "held_out" if name in held_out else "seen"
                    entry = {}
                    for metric in METRICS:
                        by_draw = [
                            np.nanmean([r[metric] for r in scores[(strategy, k, name, d)]])
                            for d in range(self.draws)
                            if scores.get((strategy, k, name, d))
                        ]
                        entry[metric] = float(np.mean(by_draw))
                        entry[f"{metric}_std"] = float(np.std(by_draw))
                    per_class[group][strategy][str(k)][name] = entry
        results: dict = {}
        for group, strategies in per_class.items():
            results[group] = {}
            for strategy, by_k in strategies.items():
                results[group][strategy] = {}
                for k, classes in by_k.items():
                    mean = {m: float(np.nanmean([c[m] for c in classes.values()])) for m in METRICS}
                    mean.update(
                        {f"{m}_std": float(np.nanmean([c[f"{m}_std"] for c in classes.values()])) for m in METRICS}
                    )
                    results[group][strategy][k] = {"mean": mean, "per_class": classes}
        return results

    def _write(self, results: dict) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "metrics.json").write_text(json.dumps(results, indent=4))
        with open(self.output_dir / "metrics.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["group", "strategy", "k", "class", *[f"{m}{s}" for m in METRICS for s in ("", "_std")]])
            for group, strategies in results.items():
                for strategy, by_k in strategies.items():
                    for k, entry in by_k.items():
                        for name, values in [*entry["per_class"].items(), ("mean", entry["mean"])]:
                            row = [values[f"{m}{s}"] for m in METRICS for s in ("", "_std")]
                            writer.writerow([group, strategy, k, name, *[f"{v:.4f}" for v in row]])
        figure = Figure(figsize=(10, 4))
        axes = figure.subplots(1, 2, sharey=True)
        for axis, group in zip(axes, ("seen", "held_out")):
            for strategy, by_k in results.get(group, {}).items():
                ks = sorted(by_k, key=int)
                axis.errorbar(
                    [int(k) for k in ks],
                    [by_k[k]["mean"]["dice"] for k in ks],
                    yerr=[by_k[k]["mean"]["dice_std"] for k in ks],
                    marker="o",
                    capsize=3,
                    label=strategy,
                )
            axis.set_title(f"{group.replace('_', '-')} classes")
            axis.set_xlabel("k (references per class)")
            axis.set_xticks(self.shots)
            axis.grid(alpha=0.3)
        axes[0].set_ylabel("Dice")
        axes[0].legend()
        figure.tight_layout()
        figure.savefig(self.output_dir / "dice_vs_k.png", dpi=100)
        for group, strategies in results.items():
            for strategy, by_k in strategies.items():
                summary = ", ".join(
                    f"k={k}: {v['mean']['dice']:.4f}" for k, v in sorted(by_k.items(), key=lambda x: int(x[0]))
                )
                logger.info(f"{group} Dice, {strategy}: {summary}")
