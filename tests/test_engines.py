"""EpisodicTrainer / EpisodicEvaluator with their handlers, on real episodes of a small demo data set."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines.utils import IterationEvents
from monai.inferers import SlidingWindowInferer

from scripts.data.episodes import EpisodeDataset, OneShotValidationDataset
from scripts.data.pool import DatasetPool
from scripts.networks import build_iris_net
from scripts.segmentation.controls import CONTROLS, control_dice
from scripts.segmentation.losses import DiceBCELoss
from scripts.segmentation.metrics import AbsentClassFalsePositives, ClassGroupDice, KIndependence, WrongReferenceDice
from scripts.training.engines import EpisodicEvaluator, EpisodicTrainer
from scripts.training.fine_tuning import EncoderFreeze
from scripts.training.handlers import LossWeightSchedule, MemoryBankUpdateHandler, NonFiniteLossGuard
from scripts.training.optimizers import Lamb
from scripts.training.visuals import ValidationOverlays

PATCH = (32, 32, 32)


@pytest.fixture(scope="module")
def pools(demo_dataset: Path) -> tuple[DatasetPool, DatasetPool]:
    return DatasetPool([str(demo_dataset)], "training", num_workers=1), DatasetPool([str(demo_dataset)], "validation")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_iris_net(base_channels=4, num_query_tokens=3, num_heads=4, channel_multipliers=(1, 2, 4, 8))


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks, 1 when both are empty; written out here rather than taken from the code under
    test."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2 * int((pred & truth).sum()) / total


def _trainer(pool: DatasetPool, net: torch.nn.Module, iterations: int, loader=None, **options) -> EpisodicTrainer:
    loader = loader or DataLoader(EpisodeDataset(pool, 2 * iterations, PATCH, max_classes=3, seed=0), batch_size=2)
    loss = options.pop("loss_function", DiceBCELoss())
    handlers = [MemoryBankUpdateHandler(net, pool), NonFiniteLossGuard(pool)]
    return EpisodicTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=iterations,
        train_data_loader=loader,
        network=net,
        optimizer=Lamb(net.parameters(), lr=1e-3),
        loss_function=loss,
        train_handlers=handlers,
        **options,
    )


def test_training_updates_weights_and_memory_bank(pools) -> None:
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    trainer = _trainer(pools[0], net, iterations=2, gradient_clip_norm=0.05)
    norms = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda engine: norms.append(torch.norm(torch.stack([p.grad.norm() for p in net.parameters()])).item()),
    )
    trainer.run()
    assert all(n <= 0.05 + 1e-4 for n in norms)  # clipped before the step
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    output = trainer.state.output  # decollated, one dict per episode, as MONAI's trainers leave it
    assert len(output) == 2 and output[0]["task_embeddings"].shape == (3, *net.token_shape)
    bank = net.memory_bank  # a row for every class training may request, none for the held-out ones
    assert bank.class_names == sorted(set(pools[0].class_names) - set(pools[0].held_out_class_names))
    requested = {pools[0].class_names[i] for episode in output for i in episode["class_ids"].tolist() if i >= 0}
    updated = {name for name, count in zip(bank.class_names, bank.counts.tolist()) if count > 0}
    assert requested and requested <= updated


@pytest.mark.parametrize("unfreeze_after", [None, 1])
def test_a_frozen_encoder_keeps_its_weights_while_the_rest_trains(pools, unfreeze_after) -> None:
    net = _net()
    encoder = [p.detach().clone() for p in net.encoder.parameters()]
    decoder = [p.detach().clone() for p in net.mask_decoder.parameters()]
    trainer = _trainer(pools[0], net, iterations=3)
    EncoderFreeze(net, unfreeze_after=unfreeze_after).attach(trainer)
    trainer.run()
    encoder_changed = any(not torch.equal(a, b) for a, b in zip(encoder, net.encoder.parameters()))
    assert encoder_changed == (unfreeze_after is not None)  # frozen throughout, or trained after iteration 1
    assert any(not torch.equal(a, b) for a, b in zip(decoder, net.mask_decoder.parameters()))


def test_the_loss_weight_schedule_sets_the_weights_before_each_iteration(pools) -> None:
    loss = DiceBCELoss()
    trainer = _trainer(pools[0], _net(), iterations=2, loss_function=loss)
    LossWeightSchedule(loss, {"dice": [0.2, 0.8]}, total_iterations=2).attach(trainer)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: seen.append(loss.dice_weight))
    trainer.run()
    assert seen == pytest.approx([0.2, 0.8]) and loss.bce_weight == 1.0


def test_accumulation_steps_the_optimizer_every_other_iteration(pools) -> None:
    net = _net()
    trainer = _trainer(pools[0], net, iterations=2, accumulation_steps=2)
    snapshots = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda _: snapshots.append(net.encoder.stages[0][0].conv1.conv.weight.clone())
    )
    initial = net.encoder.stages[0][0].conv1.conv.weight.clone()
    trainer.run()
    assert torch.equal(snapshots[0], initial)
    assert not torch.equal(snapshots[1], initial)


def test_bf16_autocast_on_cpu_trains(pools) -> None:
    net = _net()
    trainer = _trainer(pools[0], net, iterations=1, amp=True)
    dtypes = []
    trainer.add_event_handler(
        IterationEvents.FORWARD_COMPLETED, lambda engine: dtypes.append(engine.state.output["pred"].dtype)
    )
    trainer.run()
    assert dtypes == [torch.bfloat16]
    assert np.isfinite(trainer.state.output[0]["loss"])  # decollated: a float, as in MONAI's trainers


def test_non_finite_loss_stops_before_the_step(pools) -> None:
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]

    def nan_loss(logits, target, valid, unlabelled):
        return logits.mean() * float("nan")

    trainer = _trainer(pools[0], net, iterations=1, loss_function=nan_loss)
    with pytest.raises(FloatingPointError, match="iteration 1") as error:
        trainer.run()
    assert "IrisDemo/" in str(error.value) and ".nii.gz" in str(error.value)  # names classes and subjects
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_evaluator_encodes_each_reference_once_and_measures_reference_following(pools) -> None:
    train_pool, val_pool = pools
    net = _net()
    calls = []
    net.task_encoder.register_forward_hook(lambda *args: calls.append(1))
    names, held_out = val_pool.class_names, val_pool.held_out_class_names
    metrics = {
        "val_seen_dice": ClassGroupDice(names, held_out, "seen"),
        "val_held_out_dice": ClassGroupDice(names, held_out, "held_out"),
        "val_wrong_reference_dice": WrongReferenceDice(),
        "val_absent_class_fp": AbsentClassFalsePositives(names, train_pool.mean_class_voxels()),
        "k_independence": KIndependence(),
        "position_rule_seen_dice": ClassGroupDice(names, held_out, "seen", scores="position_rule"),
    }
    dataset = OneShotValidationDataset(val_pool, train_pool, PATCH, controls=control_dice)
    evaluator = EpisodicEvaluator(
        device="cpu",
        val_data_loader=DataLoader(dataset, batch_size=1),
        network=net,
        inferer=SlidingWindowInferer(roi_size=PATCH, sw_batch_size=2, overlap=0.5),
        key_val_metric={"val_seen_dice": metrics["val_seen_dice"]},
        additional_metrics={name: metric for name, metric in metrics.items() if name != "val_seen_dice"},
        patch_size=PATCH,
        k_independence_cases=1,
    )
    overlays = ValidationOverlays(evaluator, summary_writer=None, max_cases=1, class_names=names)
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, overlays.capture)
    cases = []  # the evaluator's output of every case, to recompute the metrics from
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: cases.append(dict(engine.state.output)))
    evaluator.run()
    assert len(calls) == len(dataset)  # one support encoding per case, not per sliding window
    last_case = [names[i] for i in dataset[len(dataset) - 1]["class_ids"].tolist()]
    assert overlays.legend_names(evaluator.state.output, len(last_case)) == last_case  # the legend names classes
    assert len(overlays.cases) == 1 and overlays.cases[0].shape[0] >= 512
    # every metric recomputed from the cases' logits and masks: per class Dice, wrong-reference pairs, absent classes
    dice, position, wrong, absent = defaultdict(list), defaultdict(list), [], []
    mean_voxels = train_pool.mean_class_voxels()
    for case in cases:
        pred, truth = (case["pred"][0] > 0).numpy(), (case["label"][0] > 0).numpy()  # K x D x H x W each
        ids, present = case["class_ids"][0].tolist(), case["class_present"][0].tolist()
        held = [k for k, (i, holds) in enumerate(zip(ids, present)) if i >= 0 and holds]
        for k in held:
            dice[names[ids[k]]].append(_dice(pred[k], truth[k]))
            position[names[ids[k]]].append(float(case["control_dice"][0, k, CONTROLS.index("position_rule")]))
        wrong += [_dice(pred[b], truth[a]) for a in held for b in held if a != b]  # class b's reference, a's truth
        for k, (i, holds) in enumerate(zip(ids, present)):
            if i >= 0 and not holds:
                absent.append(int(pred[k].sum()) / max(mean_voxels.get(names[i], 1.0), 1.0))

    def group_mean(per_case: dict, group: str) -> float:
        return float(
            np.mean([np.mean(v) for name, v in per_case.items() if (name in held_out) == (group == "held_out")])
        )

    scores = evaluator.state.metrics
    held_out_dice = {name: float(np.mean(values)) for name, values in dice.items() if name in held_out}
    assert held_out_dice and len(held_out_dice) < len(dice) and wrong and absent  # every measure has cases
    assert metrics["val_held_out_dice"].per_class() == pytest.approx(held_out_dice)
    assert scores["val_seen_dice"] == pytest.approx(group_mean(dice, "seen"))
    assert scores["val_held_out_dice"] == pytest.approx(group_mean(dice, "held_out"))
    assert scores["val_wrong_reference_dice"] == pytest.approx(np.mean(wrong))
    assert scores["val_absent_class_fp"] == pytest.approx(np.mean(absent))
    assert scores["position_rule_seen_dice"] == pytest.approx(group_mean(position, "seen"))
    assert 0.0 <= scores["k_independence"] < 1e-6  # measured (not NaN), and classes are decoded independently
    with pytest.raises(ValueError, match="one case per batch"):
        EpisodicEvaluator(device="cpu", val_data_loader=DataLoader(dataset, batch_size=2), network=net)


def test_bf16_loss_follows_fp32_on_a_fixed_episode(pools) -> None:
    episode = EpisodeDataset(pools[0], 2, PATCH, max_classes=3, seed=5)
    batch = [episode[0], episode[1]]
    losses = {}
    for amp in (False, True):
        net = _net()
        same_episode = DataLoader([batch[0], batch[1]] * 6, batch_size=2)  # the same batch every step
        trainer = _trainer(pools[0], net, iterations=6, loader=same_episode, amp=amp)
        history = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: history.append(e.state.output[0]["loss"]))
        trainer.run()
        losses[amp] = history
    assert losses[True][-1] < losses[True][0]
    assert abs(losses[True][-1] - losses[False][-1]) < 0.05 * losses[False][-1]
