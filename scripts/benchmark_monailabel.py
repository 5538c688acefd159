"""Latency of the IRIS MONAI Label app as an annotator meets it: a real server on 127.0.0.1, requests through MONAI
Label's client, volumes of several sizes.

Example::

    python scripts/benchmark_monailabel.py --output monailabel_latency.json [--checkpoint bundle/models/model.pt]

A datastore of CT-like volumes (64³, 96³, 128³ at 1.5 mm, and 512x512x300 at 0.8x0.8x1.0 mm) and one reference volume
labelled with 3 structures (saved as 3D Slicer saves it). For each volume: the first ``/infer/iris`` after the label
was saved (the task is set up: weights loaded, references encoded) and the median of the next ``repeats`` requests
(the task kept), with the app's default settings (no mirrored windows). Without ``--checkpoint``, a network of the
demo's size with random weights answers (the cost does not depend on the weights; its settings: 1.5 mm, 32³).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import requests
import torch
from monailabel.client import MONAILabelClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))

from scripts.networks import build_iris_net  # noqa: E402
from scripts.segmentation.model_io import DEFAULT_SETTINGS  # noqa: E402

VOLUMES = {"64": ((64, 64, 64), 1.5), "96": ((96, 96, 96), 1.5), "128": ((128, 128, 128), 1.5),
           "512x512x300": ((512, 512, 300), (0.8, 0.8, 1.0))}  # fmt: skip
DEMO = {key: DEFAULT_SETTINGS[key] for key in ("base_channels", "num_query_tokens", "channel_multipliers")}


def volume(shape: tuple[int, ...], spacing, path: Path, label_path: Path | None = None) -> None:
    """A CT-like volume with three ellipsoids (and, with ``label_path``, their label map as Slicer exports it)."""
    rng = np.random.default_rng(len(str(path)))
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    image = rng.normal(40, 20, shape).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    for value, (centre, hu) in enumerate((((0.35, 0.4, 0.5), 200), ((0.65, 0.5, 0.45), -80), ((0.5, 0.7, 0.6), 120))):
        inside = sum(((axis - c * n) / (0.12 * n)) ** 2 for axis, c, n in zip(grid, centre, shape)) <= 1
        image[inside] += hu
        label[inside] = value + 1
    affine = np.diag([*(spacing if isinstance(spacing, tuple) else (spacing,) * 3), 1.0])
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), path)
    if label_path is not None:
        nib.save(nib.Nifti1Image(label, affine), label_path)


def main(output: str = "monailabel_latency.json", checkpoint: str | None = None, repeats: int = 3) -> None:
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        studies = root / "studies"
        studies.mkdir()
        for name, (shape, spacing) in VOLUMES.items():
            volume(shape, spacing, studies / f"case{name}.nii.gz")
        volume((96, 96, 96), 1.5, studies / "reference.nii.gz", root / "reference_label.nii.gz")
        if checkpoint is None:
            from scripts.segmentation.model_io import bundle_version

            settings = {
                "patch_size": [32, 32, 32],
                "target_spacing": [1.5] * 3,
                "bundle_version": bundle_version(),
                "mirror_axes": [0, 1, 2],
                "datasets": {"Bench": {"modality": "CT", "labels": {}, "held_out": []}},
            }
            checkpoint = str(root / "model.pt")
            torch.save(build_iris_net(**DEMO, settings=settings).state_dict(), checkpoint)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        app = str(REPO / "scripts" / "monailabel")
        command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", app,
                   "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port), "--conf", "checkpoint",
                   checkpoint, "--conf", "model_dir", str(root / "model")]  # fmt: skip
        log = open(root / "server.log", "w")
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        results: dict = {"checkpoint": checkpoint, "threads": torch.get_num_threads(), "latency_seconds": {}}
        try:
            for _ in range(300):
                try:
                    if requests.get(f"{url}/info/", timeout=5).ok:
                        break
                except requests.ConnectionError:
                    time.sleep(1)
            client = MONAILabelClient(url, tmpdir=str(root))
            names = {"bright": 1, "dark": 2, "mid": 3}
            params = {"label_info": [{"name": n, "idx": v} for n, v in names.items()]}
            client.save_label("reference", str(root / "reference_label.nii.gz"), tag="final", params=params)
            for name in VOLUMES:
                times = []
                for _ in range(repeats + 1):
                    start = time.perf_counter()
                    client.infer("iris", f"case{name}", {"result_extension": ".nrrd", "result_dtype": "uint8"})
                    times.append(time.perf_counter() - start)
                results["latency_seconds"][name] = {"first": round(times[0], 2), "next": round(statistics.median(
                    times[1:]), 2)}  # fmt: skip
                print(f"{name}: first {times[0]:.2f} s, next {statistics.median(times[1:]):.2f} s", flush=True)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
            log.close()
    Path(output).write_text(json.dumps(results, indent=4) + "\n")


if __name__ == "__main__":
    fire.Fire(main)
