"""Training handlers on a stub ignite engine: fast checks of what the end-to-end runs also exercise."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ignite.engine import Engine

from scripts.training.training_summary import TrainingProgress


class LossWindow:
    value = math.nan


def test_training_progress_is_rewritten_while_training_and_marked_finished(tmp_path: Path) -> None:
    window = LossWindow()
    seen: list[dict] = []
    progress = TrainingProgress(str(tmp_path), loss=window, every=3)

    def step(engine: Engine, batch: int) -> None:
        window.value = 1.0 / engine.state.iteration
        if engine.state.iteration in (1, 4, 6):  # during the step, before this iteration's handlers
            seen.append(json.loads(progress.path.read_text()))

    engine = Engine(step)
    progress.attach(engine)
    engine.run(range(7), max_epochs=1)
    started, third, still = seen  # the file of the start until iteration 3, that of iteration 3 until iteration 6
    assert started["iteration"] == 0 and started["train_loss"] is None
    assert third == still and third["iteration"] == 3 and third["total_iterations"] == 7 and not third["finished"]
    assert abs(third["train_loss"] - 1 / 3) < 1e-9
    final = json.loads(progress.path.read_text())
    assert final["iteration"] == 7 and final["finished"] and abs(final["train_loss"] - 1 / 7) < 1e-9
    assert final["elapsed_seconds"] >= 0 and final["started"] > 0
