"""The IRIS inference strategies, in one registry: how a task's embeddings are obtained and which inferer uses them.

Adding a strategy is one function ``(TaskInputs) -> 1 x K x T x C embeddings`` and one line in ``STRATEGIES``.
Both inference (:class:`scripts.inference.task_setup.TaskSetupHandler`) and the k-shot evaluation
(:class:`scripts.inference.evaluation.KShotEvaluation`) go through :func:`apply_strategy`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import IrisInputError
from ..segmentation.inferers import InContextInferer, RetrievalInferer
from ..segmentation.support import Reference
from ..segmentation.task_embeddings import ensemble, memory, one_shot, tune, tuning_patches


@dataclass
class TaskInputs:
    """What a strategy may draw on for the K requested classes.

    Args:
        network: the (unwrapped) IrisNet.
        class_names: the classes' global names (the memory bank's keys).
        values: the classes' label values in the references.
        patch_size: the training patch size, as references are encoded.
        references: each class's references (empty for strategies without references).
        per_reference: R x K x T x C embeddings of each reference, with ``present`` (R x K) marking the slots that
            hold one (see :func:`scripts.segmentation.task_embeddings.encode_references`); None without references.
        tuning_steps, tuning_lr, on_tuning_step: in-context tuning schedule, and a ``(step, loss)`` callback.
        retrieval_top_k: references averaged per class by retrieval.
    """

    network: nn.Module
    class_names: Sequence[str]
    values: Sequence[int] = ()
    patch_size: Sequence[int] = ()
    references: Sequence[Sequence[Reference]] = ()
    per_reference: torch.Tensor | None = None
    present: torch.Tensor | None = None
    tuning_steps: int = 20
    tuning_lr: float = 1e-3
    on_tuning_step: Callable[[int, float], None] | None = field(default=None, repr=False)
    retrieval_top_k: int = 1


@dataclass(frozen=True)
class Strategy:
    """A strategy: ``embed`` gives the task embeddings, which ``inferer`` (a class) segments queries with.
    ``needs_references``: False when it can run from the network alone; ``per_query``: its embeddings depend on each
    query, so an embeddings file can only hold its first pass."""

    embed: Callable[[TaskInputs], torch.Tensor]
    inferer: type[InContextInferer] = InContextInferer
    needs_references: bool = True
    per_query: bool = False


def _one_shot(task: TaskInputs) -> torch.Tensor:
    return one_shot(task.per_reference, task.present)


def _ensemble(task: TaskInputs) -> torch.Tensor:
    return ensemble(task.per_reference, task.present)


def _tuning(task: TaskInputs) -> torch.Tensor:
    patches = tuning_patches(task.references, task.values, task.patch_size)
    return tune(task.network, _ensemble(task), patches, task.tuning_steps, task.tuning_lr, task.on_tuning_step)


def _memory(task: TaskInputs) -> torch.Tensor:
    return memory(task.network, task.class_names)


STRATEGIES: dict[str, Strategy] = {
    "one_shot": Strategy(_one_shot),
    "ensemble": Strategy(_ensemble),
    "retrieval": Strategy(_ensemble, inferer=RetrievalInferer, per_query=True),  # the first pass; then per query
    "tuning": Strategy(_tuning),
    "memory": Strategy(_memory, needs_references=False),
}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise IrisInputError(f"Unknown strategy '{name}'; choose one of {tuple(STRATEGIES)}.")
    return STRATEGIES[name]


def default_strategy(
    strategy: str | None, support_images: Sequence[str] = (), embeddings_file: str | None = None
) -> str:
    """``strategy`` if given; otherwise ``one_shot`` when there are references or saved embeddings, ``memory`` (the
    model's own classes) when there are none."""
    if strategy:
        return strategy
    return "one_shot" if support_images or embeddings_file else "memory"


def strategy_inferer(strategy: str, exact_probabilities: bool = False, **window_settings) -> InContextInferer:
    """The inferer that ``strategy`` segments with, built with ``window_settings`` (see :class:`InContextInferer`);
    ``exact_probabilities`` stitches windows in the inputs' dtype (``stitch_dtype`` serves label maps only)."""
    if exact_probabilities:
        window_settings["stitch_dtype"] = None
    return get_strategy(strategy).inferer(**window_settings)


def apply_strategy(name: str, task: TaskInputs, inferer: InContextInferer) -> torch.Tensor:
    """Compute the task embeddings of strategy ``name`` and give them to ``inferer``; return them (1 x K x T x C,
    the first pass for a per-query strategy)."""
    strategy = get_strategy(name)
    if not isinstance(inferer, strategy.inferer):
        raise TypeError(f"Strategy '{name}' needs a {strategy.inferer.__name__}, got a {type(inferer).__name__}.")
    embeddings = strategy.embed(task)
    references = None if task.per_reference is None else (task.per_reference, task.present)
    inferer.use_task(embeddings, references, task.retrieval_top_k)
    return embeddings
