"""Per-class Dice of in-context predictions, averaged over a group of classes (seen or held-out)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from ignite.metrics import Metric
from monai.metrics import compute_dice

from .distributed import gather_objects

GROUPS = ("seen", "held_out", "all")


class ClassGroupDice(Metric):
    """Mean over classes of each class's mean Dice, for the classes of one group.

    Classes are identified by ``class_ids`` in the engine output (indices into ``class_names``); a class counts as
    held-out when its name is in ``held_out``. Predictions are thresholded at ``sigmoid(logit) > 0.5``.

    Args:
        class_names: global class names, ``dataset/label``.
        held_out: names of held-out classes.
        group: ``"seen"``, ``"held_out"`` or ``"all"``.
        output_transform: ignite output transform.
    """

    required_output_keys = ("pred", "label", "class_ids")

    def __init__(
        self,
        class_names: Sequence[str],
        held_out: Sequence[str] = (),
        group: str = "seen",
        output_transform: Callable = lambda output: output,
    ) -> None:
        if group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got '{group}'.")
        self.class_names = list(class_names)
        self.held_out = set(held_out)
        self.group = group
        self._scores: dict[str, list[float]] = defaultdict(list)
        super().__init__(output_transform=output_transform)

    def _in_group(self, name: str) -> bool:
        return self.group == "all" or (name in self.held_out) == (self.group == "held_out")

    def reset(self) -> None:
        self._scores = defaultdict(list)

    def update(self, output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        logits, label, class_ids = output  # B x K x spatial, B x K x spatial, B x K
        dice = compute_dice((logits > 0).float(), label.float(), include_background=True, ignore_empty=False)
        for score, class_id in zip(dice.flatten().tolist(), class_ids.flatten().tolist()):
            if class_id >= 0 and self._in_group(self.class_names[class_id]):
                self._scores[self.class_names[class_id]].append(score)

    def per_class(self) -> dict[str, float]:
        """Mean Dice of each class of the group seen since the last reset, over the cases of every rank."""
        merged: dict[str, list[float]] = defaultdict(list)
        for scores in gather_objects(dict(self._scores)):
            for name, values in scores.items():
                merged[name].extend(values)
        return {name: sum(scores) / len(scores) for name, scores in sorted(merged.items())}

    def compute(self) -> float:
        means = list(self.per_class().values())
        return sum(means) / len(means) if means else float("nan")
