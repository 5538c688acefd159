"""Learning-rate range test with the bundle's own trainer and data pool: a short run whose learning rate grows
exponentially from ``start_lr`` to ``end_lr`` while the (smoothed) episode loss is recorded, with ignite's
``FastaiLRFinder``. It writes ``lr_range_test.png`` (loss against learning rate) and ``lr_range_test.json`` with the
suggested ``base_learning_rate`` (where the loss falls fastest per decade, before its minimum). The network and
optimizer are left as they were; nothing is validated or checkpointed.

Example::

    python scripts/lr_range_test.py --config "['bundle/configs/train.json','bundle/configs/demo.json']" \\
        --out bundle/logs --num_iter 100

Any bundle id can be overridden as in ``monai.bundle run`` (``--dataset_dir``, ``--data_pool``, ``--batch_size``, ...).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import fire
import numpy as np

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))


def lr_range_test(
    config: str | list[str] = str(BUNDLE / "configs" / "train.json"),
    out: str = str(BUNDLE / "logs"),
    num_iter: int = 100,
    start_lr: float = 1e-6,
    end_lr: float = 1.0,
    **overrides,
) -> str:
    """Run the sweep; return the path of ``lr_range_test.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ignite.handlers import FastaiLRFinder
    from monai.bundle import ConfigParser
    from monai.handlers import from_engine

    if num_iter < 2 or not 0 < start_lr < end_lr:
        raise ValueError(f"Need num_iter >= 2 and 0 < start_lr < end_lr, got {num_iter}, {start_lr}, {end_lr}.")
    parser = ConfigParser()
    parser.read_config(config)  # a file or a list of files (fire reads "['a.json','b.json']" as a list)
    parser.update({"bundle_root": str(BUNDLE), **overrides})
    parser.update({"total_iterations": num_iter, "train#handlers": []})  # no schedule, validation or checkpoints
    parser.get_parsed_content("initialize", default=None)
    trainer = parser.get_parsed_content("train#trainer")
    to_save = {"network": parser.get_parsed_content("network"), "optimizer": parser.get_parsed_content("optimizer")}

    finder = FastaiLRFinder()
    loss = from_engine(["loss"], first=True)
    with finder.attach(
        trainer, to_save, output_transform=lambda output: float(loss(output)), num_iter=num_iter, start_lr=start_lr,
        end_lr=end_lr, step_mode="exp",
    ) as sweeping:  # fmt: skip
        sweeping.run()
    results = finder.get_results()
    summary = {
        "suggested_base_learning_rate": steepest_descent(results["lr"], results["loss"]),
        "min_loss_learning_rate": float(results["lr"][int(np.argmin(results["loss"]))]),
        "start_lr": start_lr,
        "end_lr": end_lr,
        "iterations": len(results["lr"]),
        "stopped_early": len(results["lr"]) < num_iter,  # the loss diverged before end_lr
        "lr": [float(lr) for lr in results["lr"]],
        "loss": [float(value) for value in results["loss"]],
    }
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lr_range_test.json").write_text(json.dumps(summary, indent=4) + "\n")
    figure, axis = plt.subplots(figsize=(8, 5))
    axis.plot(summary["lr"], summary["loss"], color="tab:red")
    if summary["suggested_base_learning_rate"] and math.isfinite(summary["suggested_base_learning_rate"]):
        axis.axvline(summary["suggested_base_learning_rate"], linestyle="--", label="suggested base_learning_rate")
        axis.legend()
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("smoothed training loss")
    figure.tight_layout()
    figure.savefig(out_dir / "lr_range_test.png", dpi=100)
    plt.close(figure)
    print(f"Suggested base_learning_rate: {summary['suggested_base_learning_rate']} ({out_dir / 'lr_range_test.png'})")
    return str(out_dir / "lr_range_test.json")


def steepest_descent(lrs: list[float], losses: list[float], skip: float = 0.1) -> float:
    """The learning rate where the smoothed loss falls fastest per decade, before its minimum.

    The first ``skip`` share of the points is left out: the loss is an exponential moving average that starts at the
    first (untrained) loss, so it falls steeply there whatever the learning rate (ignite's own suggestion, the
    steepest point over all of them, picks that start).
    """
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    end = int(np.argmin(losses)) + 1
    start = min(int(len(lrs) * skip), max(end - 2, 0))
    if end - start < 2:
        return float(lrs[max(end - 1, 0)])
    slopes = np.gradient(losses[start:end], np.log10(lrs[start:end]))
    return float(lrs[start + int(np.argmin(slopes))])


if __name__ == "__main__":
    fire.Fire(lr_range_test)
