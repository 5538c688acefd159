"""Validation metrics of in-context segmentation: does the model segment what its reference shows?

Dice alone cannot tell a model that reads its reference from one that segments "the object in the middle" or "every
object". So besides the per-group Dice (:class:`ClassGroupDice`), validation measures:

- :class:`WrongReferenceDice`: Dice of the prediction made with class B's reference against class A's truth, for
  classes A != B of the same query. A model that follows its reference scores near 0; one that ignores it scores
  about its Dice.
- :class:`AbsentClassFalsePositives`: voxels predicted for a class whose reference is given but which the query does
  not hold, as a fraction of that class's mean volume.
- :class:`KIndependence`: the largest Dice change of a class decoded alone vs together with the query's other classes.
- :class:`ClassGroupDice` with ``scores="intensity_rule"`` / ``"position_rule"``: the trivial rules of
  :mod:`scripts.segmentation.controls` on the same cases, to read the model's Dice against.

The Dice and false-positive metrics score each class's own channel (``predictions="channels"``: logit > 0, as the
class decodes alone) or the label map of all requested classes (``"label_map"``: each voxel goes to its most likely
class if that one is above 0.5, as ``inference.json`` writes it), where a structure claimed by its own class's
reference is no false positive of a similar one.

Every metric reads the evaluator output of :class:`scripts.training.engines.EpisodicEvaluator` (``pred`` logits,
``label`` masks, ``class_ids``, ``class_present``, ``control_dice``, ``k_dice_change``) and gathers its values over
ranks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import ignite.distributed as idist
import numpy as np
import torch
from ignite.metrics import Metric
from monai.metrics import compute_dice

from ..data.patches import bounding_box_centre, crop_patch
from ..data.transforms import label_map
from .controls import CONTROLS

GROUPS = ("seen", "held_out", "all")
SCORES = ("model", *CONTROLS)
PREDICTIONS = ("channels", "label_map")


def checked_predictions(predictions: str) -> str:
    if predictions not in PREDICTIONS:
        raise ValueError(f"predictions must be one of {PREDICTIONS}, got '{predictions}'.")
    return predictions


def binary_predictions(logits: torch.Tensor, class_ids: torch.Tensor, predictions: str = "channels") -> torch.Tensor:
    """``B x K x spatial`` logits -> the voxels of each class: its channel above 0 (``"channels"``) or the voxels it
    wins in the label map of the requested classes (``"label_map"``: :func:`scripts.data.transforms.label_map` of
    the channels with ``class_ids >= 0``, the decision that inference makes)."""
    if checked_predictions(predictions) == "channels":
        return logits > 0
    requested = (class_ids >= 0).view(*class_ids.shape, *([1] * (logits.ndim - 2))).to(logits.device)
    channels = torch.arange(1, logits.shape[1] + 1, dtype=torch.int16, device=logits.device)
    winners = label_map(torch.where(requested, logits, -torch.inf).transpose(0, 1), channels)[0]  # B x spatial
    return winners.unsqueeze(1) == channels.view(1, -1, *([1] * (logits.ndim - 2)))


def _gathered(values: list) -> list:
    return [value for part in idist.all_gather(values) for value in part]


def _gathered_by_class(scores: Mapping[str, list[float]]) -> dict[str, list[float]]:
    """Each class's scores over the cases of every rank, by class name."""
    merged: dict[str, list[float]] = defaultdict(list)
    for part in idist.all_gather(dict(scores)):
        for name, values in part.items():
            merged[name].extend(values)
    return dict(sorted(merged.items()))


class EvaluatorMetric(Metric):
    """An ignite metric that reads the named entries ``required_output_keys`` of the evaluator output.

    Not MONAI's ``CumulativeIterationMetric``/``IgniteMetricHandler``: those buffer one tensor per iteration and reduce
    it; these keep Python lists per class name (a query requests a different set of classes each time) and gather the
    lists of every rank with ignite's ``idist.all_gather``.
    """

    required_output_keys: tuple[str, ...] = ()

    def update(self, output: Sequence[torch.Tensor]) -> None:  # ignite passes the entries in key order
        self.update_entries(dict(zip(self.required_output_keys, output)))

    def update_entries(self, output: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError


class ClassGroupDice(EvaluatorMetric):
    """Mean over classes of each class's mean Dice, for the classes of one group that the query holds.

    Classes are identified by ``class_ids`` in the engine output (indices into ``class_names``); a class counts as
    held-out when its name is in ``held_out``. Classes absent from the query (``class_present`` False) are scored by
    :class:`AbsentClassFalsePositives` instead.

    Args:
        class_names: global class names, ``dataset/label``.
        held_out: names of held-out classes.
        group: ``"seen"``, ``"held_out"`` or ``"all"``.
        scores: ``"model"`` scores the predictions; ``"intensity_rule"`` / ``"position_rule"`` the trivial rules'
            Dice on the same cases (``control_dice`` of the output).
        predictions: the model's voxels of a class, ``"channels"`` or ``"label_map"`` (see :func:`binary_predictions`).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        held_out: Sequence[str] = (),
        group: str = "seen",
        scores: str = "model",
        predictions: str = "channels",
    ) -> None:
        if group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got '{group}'.")
        if scores not in SCORES:
            raise ValueError(f"scores must be one of {SCORES}, got '{scores}'.")
        self.predictions = checked_predictions(predictions)
        self.class_names = list(class_names)
        self.held_out = set(held_out)
        self.group = group
        self.scores = scores
        self.required_output_keys = (
            ("pred", "label", "class_ids", "class_present")
            if scores == "model"
            else ("control_dice", "class_ids", "class_present")
        )
        self._scores: dict[str, list[float]] = defaultdict(list)
        super().__init__()

    def _in_group(self, name: str) -> bool:
        return self.group == "all" or (name in self.held_out) == (self.group == "held_out")

    def reset(self) -> None:
        self._scores = defaultdict(list)

    def update_entries(self, output: Mapping[str, torch.Tensor]) -> None:
        class_ids, present = output["class_ids"], output["class_present"]  # B x K each
        if self.scores == "model":
            pred = binary_predictions(output["pred"], class_ids, self.predictions)  # B x K x spatial
            dice = compute_dice(pred.float(), output["label"].float(), include_background=True, ignore_empty=False)
        elif output["control_dice"] is not None:
            dice = output["control_dice"][..., CONTROLS.index(self.scores)]  # B x K
        else:  # the validation cases carry no control scores
            return
        for score, class_id, holds in zip(dice.flatten().tolist(), class_ids.flatten().tolist(), present.flatten()):
            if class_id >= 0 and holds and self._in_group(self.class_names[class_id]):
                self._scores[self.class_names[class_id]].append(score)

    def per_class(self) -> dict[str, float]:
        """Mean Dice of each class of the group seen since the last reset, over the cases of every rank."""
        return {name: sum(scores) / len(scores) for name, scores in _gathered_by_class(self._scores).items()}

    def compute(self) -> float:
        means = list(self.per_class().values())
        return sum(means) / len(means) if means else float("nan")


def wrong_reference_dice(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Dice of every class's prediction against every other class's truth.

    Args:
        pred: K x N binary predictions (one row per reference).
        truth: K x N binary truths.

    Returns:
        K x K matrix, entry ``[b, a]`` = Dice(pred of b, truth of a); the diagonal is the ordinary Dice.
    """
    pred, truth = pred.flatten(1).float(), truth.flatten(1).float()
    overlap = pred @ truth.T
    total = pred.sum(1)[:, None] + truth.sum(1)[None, :]
    return torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.ones_like(total))


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The entries of a square matrix off its diagonal: the wrong-reference pairs of :func:`wrong_reference_dice`."""
    return matrix[~torch.eye(len(matrix), dtype=torch.bool, device=matrix.device)]


def absent_fraction(predicted_voxels: float, name: str, mean_voxels: Mapping[str, float]) -> float:
    """Voxels predicted for an absent class as a fraction of that class's mean volume (at least one voxel)."""
    return predicted_voxels / max(mean_voxels.get(name, 1.0), 1.0)


def mean_or_nan(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


class WrongReferenceDice(EvaluatorMetric):
    """Mean Dice against class A's truth of the prediction made with class B's reference, over ordered pairs A != B
    of classes that the same query holds. Near 0 when the model follows its reference."""

    required_output_keys = ("pred", "label", "class_present")

    def reset(self) -> None:
        self._values: list[float] = []

    def update_entries(self, output: Mapping[str, torch.Tensor]) -> None:
        for pred, label, present in zip(output["pred"], output["label"], output["class_present"]):
            rows = present.nonzero().flatten()
            if len(rows) < 2:
                continue
            self._values.extend(off_diagonal(wrong_reference_dice(pred[rows] > 0, label[rows] > 0)).tolist())

    def compute(self) -> float:
        return mean_or_nan(_gathered(self._values))


class AbsentClassFalsePositives(EvaluatorMetric):
    """Mean, over (case, class) pairs where the reference's class is absent from the query, of the voxels predicted
    for it as a fraction of that class's mean volume.

    Args:
        class_names: global class names that ``class_ids`` index.
        mean_voxels: mean voxel count of each class (by name) where it is present, e.g. over the reference pool.
        predictions: the model's voxels of a class, ``"channels"`` or ``"label_map"`` (see :func:`binary_predictions`).
    """

    required_output_keys = ("pred", "class_ids", "class_present")

    def __init__(
        self, class_names: Sequence[str], mean_voxels: Mapping[str, float], predictions: str = "channels"
    ) -> None:
        self.class_names = list(class_names)
        self.mean_voxels = dict(mean_voxels)
        self.predictions = checked_predictions(predictions)
        super().__init__()

    def reset(self) -> None:
        self._values: dict[str, list[float]] = defaultdict(list)  # class name -> fraction per case that lacks it

    def update_entries(self, output: Mapping[str, torch.Tensor]) -> None:
        voxels = binary_predictions(output["pred"], output["class_ids"], self.predictions)
        for pred, ids, present in zip(voxels, output["class_ids"], output["class_present"]):
            for k in (~present & (ids >= 0)).nonzero().flatten().tolist():
                name = self.class_names[int(ids[k])]
                self._values[name].append(absent_fraction(float(pred[k].sum()), name, self.mean_voxels))

    def per_class(self) -> dict[str, float]:
        """Mean false positives of each requested absent class, over the cases of every rank: which references the
        model matches to something else."""
        return {name: mean_or_nan(values) for name, values in _gathered_by_class(self._values).items()}

    def compute(self) -> float:
        return mean_or_nan([value for values in _gathered_by_class(self._values).values() for value in values])


@torch.no_grad()
def k_dice_change(
    network: torch.nn.Module,
    query: torch.Tensor,
    truth: torch.Tensor,
    embeddings: torch.Tensor,
    patch_size: Sequence[int],
) -> torch.Tensor:
    """Each class's Dice change between decoding it alone and with all other classes, on one window of the query.

    The window (``patch_size``) is centred on the query's labelled structures, so it holds several of them.

    Args:
        network: the IrisNet (or a wrapper with the same forward).
        query: 1 x 1 x D x H x W query volume.
        truth: 1 x K x D x H x W binary masks of the K classes.
        embeddings: 1 x K x T x C task embeddings.
        patch_size: window size, the training patch size.

    Returns:
        1 x K absolute Dice changes, NaN for classes the window does not hold.
    """
    foreground = truth[0].any(0).nonzero()
    centre = bounding_box_centre(foreground) if len(foreground) else [n // 2 for n in truth.shape[2:]]
    window = crop_patch(query[0], centre, patch_size)[None]  # 1 x 1 x P
    target = crop_patch(truth[0], centre, patch_size)[None].float()  # 1 x K x P
    together = network(window, embeddings) > 0  # 1 x K x P
    alone = torch.cat([network(window, embeddings[:, [k]]) > 0 for k in range(embeddings.shape[1])], dim=1)
    dice_together = compute_dice(together.float(), target, include_background=True, ignore_empty=True)
    dice_alone = compute_dice(alone.float(), target, include_background=True, ignore_empty=True)
    return (dice_alone - dice_together).abs()


class KIndependence(EvaluatorMetric):
    """The largest Dice change of a class decoded alone vs together with every other class of the query
    (``k_dice_change`` of the output, NaN where not measured)."""

    required_output_keys = ("k_dice_change",)

    def reset(self) -> None:
        self._values: list[float] = []

    def update_entries(self, output: Mapping[str, torch.Tensor]) -> None:
        changes = output["k_dice_change"].flatten()
        self._values.extend(changes[~changes.isnan()].tolist())

    def compute(self) -> float:
        values = _gathered(self._values)
        return float(max(values)) if values else float("nan")


# the validation metrics where lower is better: how much a prediction ignores its reference
LOWER_IS_BETTER = ("val_wrong_reference_dice", "val_absent_class_fp", "val_label_map_absent_class_fp", "k_independence")


def is_trivial_rule(name: str) -> bool:
    """Whether validation metric ``name`` is a trivial rule's Dice (a control), not the model's."""
    return name.startswith(tuple(f"{rule}_" for rule in CONTROLS))


def validation_metrics(
    class_names: Sequence[str], held_out: Sequence[str], mean_voxels: Mapping[str, float]
) -> dict[str, EvaluatorMetric]:
    """Every metric of training's validation, by name: Dice of the seen and the held-out classes, false positives on
    absent classes (each class's channel, and the label map as inference writes it), wrong-reference Dice,
    k-independence, and the trivial rules' Dice on the same cases (:mod:`scripts.segmentation.controls`).

    Args:
        class_names: global class names that ``class_ids`` index (the validation pool's).
        held_out: names of held-out classes.
        mean_voxels: mean voxel count of each class where present (the training pool's), for the false positives.
    """
    metrics: dict[str, EvaluatorMetric] = {
        "val_seen_dice": ClassGroupDice(class_names, held_out, "seen"),
        "val_held_out_dice": ClassGroupDice(class_names, held_out, "held_out"),
        "val_wrong_reference_dice": WrongReferenceDice(),
        "val_absent_class_fp": AbsentClassFalsePositives(class_names, mean_voxels),
        "k_independence": KIndependence(),
        "val_label_map_seen_dice": ClassGroupDice(class_names, held_out, "seen", predictions="label_map"),
        "val_label_map_held_out_dice": ClassGroupDice(class_names, held_out, "held_out", predictions="label_map"),
        "val_label_map_absent_class_fp": AbsentClassFalsePositives(class_names, mean_voxels, predictions="label_map"),
    }
    for rule in CONTROLS:
        for group in ("seen", "held_out"):
            metrics[f"{rule}_{group}_dice"] = ClassGroupDice(class_names, held_out, group, scores=rule)
    return metrics
