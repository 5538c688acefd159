"""Episodic engines: MONAI's SupervisedTrainer / SupervisedEvaluator with an in-context iteration."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer, SimpleInferer
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.utils.data import DataLoader

from ..distributed import unwrap
from ..segmentation.metrics import k_dice_change

REQUIRED_KEYS = ("support_image", "support_mask", "query_image", "query_mask", "class_ids")


def autocast_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype of ``amp``: fp16 on CUDA (with a GradScaler in training), bf16 elsewhere (no scaler needed)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def prepare_episode(batch: dict, device: torch.device, non_blocking: bool = False) -> dict[str, torch.Tensor]:
    """Move an episode batch to ``device``; masks become float, support/query images stay float32."""
    missing = [key for key in REQUIRED_KEYS if key not in batch]
    if missing:
        raise KeyError(f"Episode batch lacks {missing}; got keys {sorted(batch)}.")
    episode = {key: torch.as_tensor(value).to(device, non_blocking=non_blocking) for key, value in batch.items()}
    for key in ("support_mask", "query_mask"):
        episode[key] = episode[key].float()
    return episode


class EpisodicTrainer(SupervisedTrainer):
    """One iteration = one batch of episodes: one forward (encode support, decode query), loss, backward, clip, step.

    ``amp`` uses fp16 autocast with a GradScaler on CUDA and bf16 autocast on CPU. ``engine.state.output`` holds,
    besides MONAI's ``image``/``label``/``pred``/``loss``, the episode's ``task_embeddings``
    (B x K x T x C, detached), ``class_ids`` and ``class_valid`` for handlers such as the memory-bank update.
    As in MONAI's trainers, it is decollated after the iteration (one dict per episode, the loss in each), so
    MONAI's ``from_engine(["loss"], first=True)`` and the bundle's ``--tracking mlflow`` read it.

    Args:
        device, max_epochs, train_data_loader, network, optimizer, loss_function, epoch_length, inferer,
        train_handlers, amp, accumulation_steps: as in ``monai.engines.SupervisedTrainer``; the ``inferer`` (MONAI's
            ``SimpleInferer`` by default) passes the whole episode to the network in one call,
            ``network(query, support_image=..., support_mask=..., class_valid=...)``, which returns the logits and
            keeps the task embeddings (``IrisNet.episode_embeddings``); ``loss_function`` is
            called as ``loss(logits, target, class_valid, unlabelled)`` (``unlabelled``: the episode's
            ``query_unlabelled`` voxels, or None).
        gradient_clip_norm: maximum global gradient norm, applied to unscaled gradients; None or <= 0 disables it.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable,
        epoch_length: int | None = None,
        inferer: Inferer | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        accumulation_steps: int = 1,
        gradient_clip_norm: float | None = 1.0,
        key_train_metric: dict | None = None,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            epoch_length=epoch_length,
            prepare_batch=prepare_episode,
            inferer=inferer or SimpleInferer(),
            key_train_metric=key_train_metric,
            train_handlers=train_handlers,
            accumulation_steps=accumulation_steps,
        )
        # MONAI's own ``amp`` stays off: its Trainer.run would make a CUDA GradScaler whenever it is on, but bf16
        # autocast on a CPU needs none; the scaler here is for fp16 on CUDA only.
        self.mixed_precision = amp
        self.amp_dtype = autocast_dtype(device)
        fp16 = amp and self.amp_dtype == torch.float16
        self.grad_scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.gradient_clip_norm = gradient_clip_norm

    def _iteration(self, engine: EpisodicTrainer, batchdata: dict) -> dict:
        episode = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        query, target, valid = episode["query_image"], episode["query_mask"], episode["class_valid"]
        engine.state.output = {
            Keys.IMAGE: query,
            Keys.LABEL: target,
            "class_ids": episode["class_ids"],
            "class_valid": valid,
            "subject_ids": episode.get("subject_ids"),
        }
        acc = engine.accumulation_steps
        local_iter = (engine.state.iteration - 1) % acc
        engine.network.train()
        if local_iter == 0:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        with torch.autocast(engine.state.device.type, dtype=engine.amp_dtype, enabled=engine.mixed_precision):
            logits = engine.inferer(  # the whole episode in one forward, as DDP must see it
                query,
                engine.network,
                support_image=episode["support_image"],
                support_mask=episode["support_mask"],
                class_valid=valid,
            )
            engine.state.output[Keys.PRED] = logits
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = engine.loss_function(logits, target, valid, episode.get("query_unlabelled"))
            engine.state.output[Keys.LOSS] = loss
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.state.output["task_embeddings"] = unwrap(engine.network).episode_embeddings.float()

        scaled = loss / acc
        (engine.grad_scaler.scale(scaled) if engine.grad_scaler is not None else scaled).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if local_iter == acc - 1:
            self._step(engine)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    @staticmethod
    def _step(engine: EpisodicTrainer) -> None:
        if engine.grad_scaler is not None:
            engine.grad_scaler.unscale_(engine.optimizer)
        if engine.gradient_clip_norm and engine.gradient_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), engine.gradient_clip_norm)
        if engine.grad_scaler is not None:
            engine.grad_scaler.step(engine.optimizer)
            engine.grad_scaler.update()
        else:
            engine.optimizer.step()


class EpisodicEvaluator(SupervisedEvaluator):
    """Evaluate in-context segmentation: each case brings its own references, encoded once per case.

    The task embeddings go through the inferer unchanged (MONAI's sliding-window inferer forwards extra arguments
    to every window), so a whole volume is segmented with one support encoding. For the first
    ``k_independence_cases`` cases, one window around the query's structures is also decoded with each class alone,
    and ``k_dice_change`` (1 x K) holds each class's Dice change against decoding all classes together (NaN for
    classes the window lacks, and for the other cases).

    Args:
        device, val_data_loader, network, inferer, key_val_metric, additional_metrics, val_handlers, amp: as in
            ``monai.engines.SupervisedEvaluator``; the loader must give one case per batch.
        patch_size: the window of the k-independence check, the training patch size.
        k_independence_cases: cases that get the k-independence check (each costs K + 1 window passes).
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: DataLoader,
        network: nn.Module,
        inferer: Inferer | None = None,
        key_val_metric: dict | None = None,
        additional_metrics: dict | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        patch_size: Sequence[int] | None = None,
        k_independence_cases: int = 0,
    ) -> None:
        if getattr(val_data_loader, "batch_size", 1) != 1:
            raise ValueError(
                f"EpisodicEvaluator segments one case per batch (each with its own references); got a validation "
                f"DataLoader with batch_size={val_data_loader.batch_size}."
            )
        if k_independence_cases and not patch_size:
            raise ValueError("k_independence_cases needs the patch_size of its window.")
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network,
            prepare_batch=prepare_episode,
            inferer=inferer or SimpleInferer(),
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            val_handlers=val_handlers,
            decollate=False,
        )
        self.amp = amp
        self.amp_dtype = autocast_dtype(device)
        self.patch_size = None if patch_size is None else tuple(patch_size)
        self.k_independence_cases = k_independence_cases

    def _iteration(self, engine: EpisodicEvaluator, batchdata: dict) -> dict:
        case = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        engine.network.eval()
        with torch.no_grad(), torch.autocast(engine.state.device.type, dtype=engine.amp_dtype, enabled=engine.amp):
            # every class has its own reference (1 x K x 1 x 1 x P): 1 x K x T x C
            embeddings = unwrap(engine.network).encode_classes(case["support_image"], case["support_mask"])
            k = embeddings.shape[1]
            logits = engine.inferer(case["query_image"], engine.network, task_embeddings=embeddings)
            change = torch.full((1, k), float("nan"), device=logits.device)
            if engine.state.iteration <= engine.k_independence_cases:
                change = k_dice_change(
                    engine.network, case["query_image"], case["query_mask"], embeddings, engine.patch_size
                )
        engine.state.output = {
            Keys.IMAGE: case["query_image"],
            Keys.LABEL: case["query_mask"],
            Keys.PRED: logits.float(),
            "class_ids": case["class_ids"],
            "class_present": case.get("class_present", torch.ones_like(case["class_ids"], dtype=torch.bool)),
            "control_dice": case.get("control_dice"),
            "k_dice_change": change,
        }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
