"""The k-shot evaluation protocol: references drawn from training subjects, every strategy, seen vs held-out classes.

For each draw and each k, every class gets k references (training subjects containing it, drawn with a fixed seed)
that are encoded once; every validation subject is then segmented for all its classes with each strategy, and Dice,
HD95 and surface Dice (NSD) are computed with ``monai.metrics``. Scores are averaged over subjects within a draw,
then reported as mean and standard deviation over draws. Every class with references is requested in every subject,
so the report also says whether the model follows its references (see :mod:`scripts.segmentation.metrics`): the
wrong-reference Dice and the false positives on absent classes per strategy and k, the k-independence of the decoder,
and the Dice of the trivial rules of :mod:`scripts.segmentation.controls` on the same subjects. Under torchrun each
rank scores a share of the subjects and rank 0 writes the gathered results.

Dice, HD95 and NSD are MONAI's functions; the aggregation is written here rather than with their metric buffers and
``MetricsSaver`` because each score belongs to a (strategy, k, draw, class, subject) and the report groups them by
seen and held-out class and by draw, which the buffers' one batch-by-class table does not hold.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from matplotlib.figure import Figure
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..data.pool import DatasetPool, Subject
from ..distributed import is_main_process, rank, world_size
from ..segmentation.controls import CONTROLS, control_dice
from ..segmentation.inferers import InContextInferer
from ..segmentation.match import cycle_dice, match_rates
from ..segmentation.metrics import (
    absent_fraction,
    binary_predictions,
    k_dice_change,
    mean_or_nan,
    off_diagonal,
    wrong_reference_dice,
)
from ..segmentation.model_io import load_model, read_model_settings
from ..segmentation.support import Reference
from ..segmentation.task_embeddings import encode_references, one_shot
from .strategies import TaskInputs, apply_strategy, strategy_inferer

logger = logging.getLogger(__name__)
METRICS = ("dice", "label_map_dice", "hd95", "nsd")  # label_map_dice: see scripts.segmentation.metrics


@dataclass
class Records:
    """Raw scores of an evaluation (one rank's share, or all of them merged)."""

    # (strategy, k, class name, draw) -> per-subject {"dice", "label_map_dice", "hd95", "nsd"} of a class it holds
    classes: dict = field(default_factory=lambda: defaultdict(list))
    # (strategy, k) -> wrong-reference Dice of every ordered class pair / FP fraction of every absent class, in its
    # own channel and in the label map of all requested classes
    wrong_reference: dict = field(default_factory=lambda: defaultdict(list))
    absent_fp: dict = field(default_factory=lambda: defaultdict(list))
    label_map_absent_fp: dict = field(default_factory=lambda: defaultdict(list))
    controls: dict = field(default_factory=lambda: defaultdict(list))  # class name -> [intensity, position] Dice
    k_changes: list = field(default_factory=list)  # Dice changes, class alone vs with all others
    # (strategy, k, "channels" or "label_map", "true" or "false") -> match scores of objects of requested classes the
    # subject holds / of classes it lacks (more than a tenth of a class volume)
    match: dict = field(default_factory=lambda: defaultdict(list))

    def extend(self, other: Records) -> None:
        for name in ("classes", "wrong_reference", "absent_fp", "label_map_absent_fp", "controls", "match"):
            for key, values in getattr(other, name).items():
                getattr(self, name)[key].extend(values)
        self.k_changes.extend(other.k_changes)


class KShotEvaluation:
    """Run the k-shot protocol and write ``metrics.json``, ``metrics.csv`` and ``dice_vs_k.png`` to ``output_dir``.

    Args:
        network: the IrisNet (weights loaded from ``ckpt_path`` when given).
        train_pool: subjects the references are drawn from.
        val_pool: subjects that are segmented and scored.
        inferer: sliding-window in-context inferer; each strategy's own inferer gets its window settings.
        output_dir: where results are written.
        ckpt_path: model to evaluate (``model.pt`` or a training checkpoint); None keeps the current weights. A
            network size, patch size or spacing that contradicts the model's own settings is refused before any
            subject is segmented.
        shots: the values of k.
        strategies: strategies to compare (``memory`` is k-independent and reported under every k).
        draws: independent reference draws averaged per k.
        seed: seed of the reference draws.
        nsd_tolerance_mm: surface-Dice tolerance.
        tuning_steps, tuning_lr: in-context tuning schedule.
        retrieval_top_k: references averaged by the retrieval strategy.
        k_independence_cases: subjects (per rank) that get the k-independence check.
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
        k_independence_cases: int = 2,
    ) -> None:
        self.inferers = {name: strategy_inferer(name, **inferer.window_settings) for name in strategies}
        self.strategies = list(strategies)
        if not shots or min(shots) < 1 or draws < 1:
            raise ValueError(f"eval_shots must be positive integers and eval_draws >= 1, got {shots} and {draws}.")
        self.network, self.train_pool, self.val_pool = network, train_pool, val_pool
        self.output_dir, self.ckpt_path = Path(output_dir), ckpt_path
        self.shots, self.draws, self.seed = list(shots), draws, seed
        self.nsd_tolerance_mm = nsd_tolerance_mm
        self.tuning_steps, self.tuning_lr, self.retrieval_top_k = tuning_steps, tuning_lr, retrieval_top_k
        self.patch_size = inferer.roi_size
        self.k_independence_cases = k_independence_cases
        self.mean_voxels = train_pool.mean_class_voxels()
        self.usage = {"patch_size": list(self.patch_size), "target_spacing": val_pool.target_spacing}
        self.match_threshold: float | None = None  # the model's (see scripts.segmentation.match), read in run()

    @torch.no_grad()
    def _score(
        self, subject: Subject, label: torch.Tensor, logits: torch.Tensor, values: Sequence[int], names: Sequence[str]
    ) -> tuple[dict[str, dict[str, float]], list[float], list[float], list[float]]:
        """Scores of one subject (its ``label`` 1 x D x H x W) segmented for ``values`` (logits K x D x H x W).

        Returns:
            Dice, label-map Dice, HD95 and NSD of each class the subject holds (by name; the subject's spacing is the
            resampled one), the wrong-reference Dice of every ordered pair of those classes, and the voxels predicted
            for each class it does not hold as a fraction of that class's mean volume, in the class's own channel and
            in the label map of all requested classes (see :func:`scripts.segmentation.metrics.binary_predictions`).
        """
        pred = logits > 0
        label_map = binary_predictions(logits[None], torch.arange(len(values))[None], "label_map")[0]
        held = [i for i, v in enumerate(values) if v in subject.classes]
        missing = [i for i, v in enumerate(values) if v not in subject.classes]
        absent = [absent_fraction(float(pred[i].sum()), names[i], self.mean_voxels) for i in missing]
        label_map_absent = [absent_fraction(float(label_map[i].sum()), names[i], self.mean_voxels) for i in missing]
        if not held:
            return {}, [], absent, label_map_absent
        held_pred = pred[held]
        truth = torch.stack([label[0] == values[i] for i in held])
        matrix = wrong_reference_dice(held_pred, truth)  # its diagonal is each class's Dice
        p, t, spacing = held_pred[None].float(), truth[None].float(), subject.spacing
        label_map_dice = compute_dice(label_map[held][None].float(), t, include_background=True, ignore_empty=False)[0]
        dice = matrix.diagonal()
        hd95 = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)[0]
        nsd = compute_surface_dice(p, t, [self.nsd_tolerance_mm] * len(held), include_background=True, spacing=spacing)
        scores = {
            names[i]: {"dice": float(d), "label_map_dice": float(m), "hd95": float(h), "nsd": float(n)}
            for i, d, m, h, n in zip(held, dice, label_map_dice, hd95, nsd[0])
        }
        return scores, off_diagonal(matrix).tolist(), absent, label_map_absent

    def run(self) -> dict:
        if self.ckpt_path:
            load_model(self.network, self.ckpt_path, self.usage)
            self.match_threshold = read_model_settings(self.ckpt_path).get("match_threshold")
        self.network.eval()
        records = Records()
        runs = [(draw, k) for draw in range(self.draws) for k in self.shots]
        with logging_redirect_tqdm(), tqdm(
            total=len(runs), desc="k-shot evaluation", disable=not is_main_process()
        ) as bar:
            for draw, k in runs:
                bar.set_postfix(draw=draw, k=k)
                self._evaluate_draw(draw, k, records)
                bar.update()
        merged = Records()
        for part in idist.all_gather(records):  # every rank's share, under torchrun
            merged.extend(part)
        results = self._summarise(merged)
        if is_main_process():
            self._write(results)
        return results

    def _evaluate_draw(self, draw: int, k: int, records: Records) -> None:
        rng = np.random.default_rng([self.seed, draw, k])
        first = draw == 0 and k == self.shots[0]  # the draw that also scores the trivial rules and k-independence
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
            subjects = [s for s in self.val_pool.subjects if s.dataset == dataset_index][rank() :: world_size()]
            if first:
                self._score_controls(subjects, references, values, names, one_shot(per_reference, holds), records)
            for strategy in self.strategies:
                columns = self._columns(strategy, names)  # the classes this strategy can segment
                if not columns:
                    continue
                task = TaskInputs(
                    self.network,
                    [names[i] for i in columns],  # memory: only the bank's classes, in column order
                    values,
                    self.patch_size,
                    references,
                    per_reference,
                    holds,
                    self.tuning_steps,
                    self.tuning_lr,
                    retrieval_top_k=self.retrieval_top_k,
                )
                inferer = self.inferers[strategy]
                apply_strategy(strategy, task, inferer)
                for subject in subjects:  # each rank scores its share of the subjects
                    if not any(values[i] in subject.classes for i in columns):
                        continue
                    image, label = subject.volumes()  # one read of the cache for both
                    with torch.no_grad():
                        logits = inferer(image[None].to(self._device), self.network)[0].cpu()
                    scores, wrong, absent, label_map_absent = self._score(
                        subject, label, logits, [values[i] for i in columns], [names[i] for i in columns]
                    )
                    self._score_match(subject, image, logits, references, [values[i] for i in columns], columns,
                                      (strategy, k), records)  # fmt: skip
                    for name, result in scores.items():
                        records.classes[(strategy, k, name, draw)].append(result)
                    records.wrong_reference[(strategy, k)].extend(wrong)
                    records.absent_fp[(strategy, k)].extend(absent)
                    records.label_map_absent_fp[(strategy, k)].extend(label_map_absent)
            logger.info(f"k-shot evaluation: draw {draw + 1}/{self.draws}, k={k}, {info.name} done")

    def _score_match(
        self,
        subject: Subject,
        image: torch.Tensor,
        logits: torch.Tensor,
        references: Sequence[Sequence[Reference]],
        values: Sequence[int],
        columns: Sequence[int],
        key: tuple[str, int],
        records: Records,
    ) -> None:
        """Match scores of the objects found for each class, in its own channel and in the label map, against the
        class's first reference; sorted into objects of classes the subject holds and false objects."""
        patches = [references[i][0].patch(value, self.patch_size) for i, value in zip(columns, values)]
        reference_images, reference_masks = (torch.stack([pair[i] for pair in patches]) for i in (0, 1))
        names = [self.val_pool.datasets[subject.dataset].class_name(value) for value in values]
        label_map = binary_predictions(logits[None], torch.arange(len(values))[None], "label_map")[0]
        for kind, objects in (("channels", logits > 0), ("label_map", label_map)):
            scores = cycle_dice(self.network, image, objects, reference_images, reference_masks.float(),
                                self.patch_size)  # fmt: skip
            for value, name, found, score in zip(values, names, objects, scores):
                if score is None:
                    continue
                if value in subject.classes:
                    records.match[(*key, kind, "true")].append(score)
                elif absent_fraction(float(found.sum()), name, self.mean_voxels) > 0.1:
                    records.match[(*key, kind, "false")].append(score)

    def _score_controls(
        self,
        subjects: Sequence[Subject],
        references: Sequence[Sequence[Reference]],
        values: Sequence[int],
        names: Sequence[str],
        embeddings: torch.Tensor,
        records: Records,
    ) -> None:
        """The trivial rules with each class's first reference, and the k-independence check of the first
        ``k_independence_cases`` subjects, with the one-shot ``embeddings`` (1 x K x T x C)."""
        first = [[volume[0].numpy() for volume in refs[0].subject.volumes()] for refs in references]
        for index, subject in enumerate(subjects):
            volumes = subject.volumes()
            image, label = (volume[0].numpy() for volume in volumes)
            for name, row in zip(names, control_dice(image, label, first, values)):
                if not np.isnan(row).any():
                    records.controls[name].append(row.tolist())
            if index < self.k_independence_cases:
                truth = torch.stack([torch.as_tensor(label == v) for v in values])[None].to(self._device)
                query = volumes[0][None].to(self._device)
                change = k_dice_change(self.network, query, truth, embeddings, self.patch_size)
                records.k_changes.extend(change[~change.isnan()].tolist())

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

    def _summarise(self, records: Records) -> dict:
        """Group into seen / held-out (per class mean and std over draws; per group the mean over classes), then add
        the reference-following measures and the trivial rules."""
        results = self._summarise_groups(records.classes)
        held_out = set(self.val_pool.held_out_class_names)
        results["reference_following"] = {
            strategy: {
                str(k): {
                    "wrong_reference_dice": mean_or_nan(records.wrong_reference[(strategy, k)]),
                    "absent_class_fp": mean_or_nan(records.absent_fp[(strategy, k)]),
                    "label_map_absent_class_fp": mean_or_nan(records.label_map_absent_fp[(strategy, k)]),
                }
                for k in self.shots
            }
            for strategy in self.strategies
        }
        results["k_independence"] = max(records.k_changes) if records.k_changes else float("nan")
        results["match"] = {
            strategy: {
                str(k): {
                    kind: match_rates(
                        records.match[(strategy, k, kind, "true")],
                        records.match[(strategy, k, kind, "false")],
                        self.match_threshold,
                    )
                    for kind in ("channels", "label_map")
                }
                for k in self.shots
            }
            for strategy in self.strategies
        }
        results["controls"] = {
            group: {
                rule: mean_or_nan(
                    [
                        np.mean([row[c] for row in rows])
                        for name, rows in records.controls.items()
                        if (name in held_out) == (group == "held_out")
                    ]
                )
                for c, rule in enumerate(CONTROLS)
            }
            for group in ("seen", "held_out")
        }
        return results

    def _summarise_groups(self, scores: dict) -> dict:
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
        groups = {group: results[group] for group in ("seen", "held_out") if group in results}
        with open(self.output_dir / "metrics.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["group", "strategy", "k", "class", *[f"{m}{s}" for m in METRICS for s in ("", "_std")]])
            for group, strategies in groups.items():
                for strategy, by_k in strategies.items():
                    for k, entry in by_k.items():
                        for name, values in [*entry["per_class"].items(), ("mean", entry["mean"])]:
                            row = [values[f"{m}{s}"] for m in METRICS for s in ("", "_std")]
                            writer.writerow([group, strategy, k, name, *[f"{v:.4f}" for v in row]])
        figure = Figure(figsize=(10, 4))
        axes = figure.subplots(1, 2, sharey=True)
        for axis, group in zip(axes, ("seen", "held_out")):
            for strategy, by_k in groups.get(group, {}).items():
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
        for group, strategies in groups.items():
            for strategy, by_k in strategies.items():
                summary = ", ".join(
                    f"k={k}: {v['mean']['dice']:.4f}" for k, v in sorted(by_k.items(), key=lambda x: int(x[0]))
                )
                logger.info(f"{group} Dice, {strategy}: {summary}")
        for strategy, by_k in results["reference_following"].items():
            summary = ", ".join(f"k={k}: " + " / ".join(f"{v[name]:.4f}" for name in v) for k, v in by_k.items())
            logger.info(f"wrong-reference Dice / absent-class FP / label-map absent-class FP, {strategy}: {summary}")
        controls = "; ".join(
            f"{group}: " + ", ".join(f"{rule} {value:.4f}" for rule, value in rules.items())
            for group, rules in results["controls"].items()
        )
        logger.info(f"k_independence {results['k_independence']:.4f}; trivial rules' Dice: {controls}")
