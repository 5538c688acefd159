"""The MONAI Label app, run as an annotator runs it: a real server on 127.0.0.1 over a datastore of demo volumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch

from scripts.networks import build_iris_net

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = {"base_channels": 4, "num_heads": 4, "num_query_tokens": 3, "channel_multipliers": [1, 2, 4, 8]}
BANK = ["IrisDemo/sphere", "IrisDemo/box"]
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three unlabelled demo volumes in a studies folder, one label map to submit, and a tiny checkpoint."""
    root = tmp_path_factory.mktemp("monailabel")
    studies = root / "studies"
    studies.mkdir()
    content = json.loads(demo_dataset.read_text())
    for index, item in enumerate(content["training"][:3]):
        shutil.copy(demo_dataset.parent / item["image"], studies / f"case{index}.nii.gz")
    label = nib.load(demo_dataset.parent / content["training"][0]["label"])
    values = np.asarray(label.dataobj)
    kept = [int(v) for v in np.unique(values) if v != 0][:2]  # the annotator labelled two structures
    names = {content["labels"][str(v)]: v for v in kept}
    annotation = root / "case0_label.nii.gz"
    nib.save(nib.Nifti1Image(np.where(np.isin(values, kept), values, 0).astype(np.uint8), label.affine), annotation)

    torch.manual_seed(0)
    net = build_iris_net(**SIZE)
    net.memory_bank.update(BANK, torch.randn(2, *net.memory_bank.embeddings.shape[1:]))
    checkpoint = root / "model.pt"
    torch.save(net.state_dict(), checkpoint)
    return {"root": root, "studies": studies, "annotation": annotation, "names": names, "checkpoint": checkpoint}


@contextmanager
def running_server(app: Path, studies: Path, conf: dict[str, str], log_path: Path) -> Iterator[dict]:
    """``monailabel start_server`` on a free loopback port, offline; stopped with its children on exit."""
    port = free_port()
    command = [
        sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
        "--host", "127.0.0.1", "--port", str(port),
        *[item for key, value in conf.items() for item in ("--conf", key, value)],
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while time.perf_counter() - started < START_TIMEOUT_S:
                assert process.poll() is None, log_path.read_text()[-4000:]
                try:
                    if requests.get(f"{url}/info/", timeout=5).ok:
                        break
                except requests.ConnectionError:
                    time.sleep(1)
            else:
                pytest.fail(f"MONAI Label did not start in {START_TIMEOUT_S} s")
            yield {"url": url, "start_s": time.perf_counter() - started, "log": log_path}
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(workspace: dict) -> Iterator[dict]:
    """The IRIS app with the tiny network, its fine-tuned weights kept in the test's folder."""
    conf = {
        "checkpoint": str(workspace["checkpoint"]),
        "model_dir": str(workspace["root"] / "model"),
        "patch_size": "[32,32,32]",
        "target_spacing": "null",
        **{key: json.dumps(value) for key, value in SIZE.items()},
    }
    app = REPO_ROOT / "scripts" / "monailabel"
    with running_server(app, workspace["studies"], conf, workspace["root"] / "server.log") as running:
        yield running


def infer(server: dict, image: str, model: str = "iris") -> tuple[dict, bytes]:
    response = requests.post(f"{server['url']}/infer/{model}", params={"image": image, "output": "all"}, timeout=600)
    assert response.ok, response.text[-2000:] + server["log"].read_text()[-4000:]
    parts = {}
    boundary = response.headers["content-type"].split("boundary=")[1].encode()
    for part in response.content.split(b"--" + boundary)[1:-1]:
        head, body = part.split(b"\r\n\r\n", 1)
        name = head.split(b'name="')[1].split(b'"')[0].decode()
        parts[name] = body[: -len(b"\r\n")]
    return json.loads(parts["params"]), parts["image"]


def label_map(tmp_path: Path, content: bytes) -> np.ndarray:
    path = tmp_path / "result.nii.gz"
    path.write_bytes(content)
    return np.asarray(nib.load(path).dataobj)


def test_label_one_segment_the_rest(server: dict, workspace: dict, tmp_path: Path) -> None:
    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    assert "iris" in info["models"] and "iris" in info["trainers"]
    assert info["datastore"]["total"] == 3

    # no label yet: the memory bank answers, and says so
    params, content = infer(server, "case1")
    assert params["strategy"] == "memory" and params["references"] == []
    assert params["label_names"] == {name: i + 1 for i, name in enumerate(sorted(BANK))}
    assert set(np.unique(label_map(tmp_path, content)).tolist()) <= {0, 1, 2}

    # the annotator submits one finished label with its names, as the 3D Slicer plugin does
    label_info = [{"name": name, "idx": value} for name, value in workspace["names"].items()]
    with open(workspace["annotation"], "rb") as annotation:
        saved = requests.put(
            f"{server['url']}/datastore/label",
            params={"image": "case0", "tag": "final"},
            files={"label": ("case0.nii.gz", annotation)},
            data={"params": json.dumps({"label_info": label_info})},
            timeout=60,
        )
    assert saved.ok, saved.text

    started = time.perf_counter()
    params, content = infer(server, "case2")
    latency = time.perf_counter() - started
    assert params["strategy"] == "retrieval"
    assert params["references"] == [str(workspace["studies"] / "case0.nii.gz")]
    assert params["label_names"] == workspace["names"]
    result = label_map(tmp_path, content)
    assert result.shape == nib.load(workspace["studies"] / "case2.nii.gz").shape
    found = set(np.unique(result).tolist()) - {0}
    assert found and found <= set(workspace["names"].values())  # the labelled classes, and only they
    print(f"server start {server['start_s']:.1f} s, /infer retrieval latency {latency:.2f} s")


def test_train_fine_tunes_on_the_datastore_labels(server: dict, workspace: dict) -> None:
    if not requests.head(f"{server['url']}/datastore/label", params={"image": "case0", "tag": "final"}).ok:
        pytest.fail("test_label_one_segment_the_rest submits the label this test trains on; run the module whole")
    response = requests.post(
        f"{server['url']}/train/iris",
        params={"run_sync": "true"},
        json={"max_iterations": 2, "batch_size": 1},
        timeout=900,
    )
    assert response.ok, response.text[-2000:] + server["log"].read_text()[-4000:]
    finetuned = workspace["root"] / "model" / "model_finetuned.pt"
    state = torch.load(finetuned, weights_only=True)
    names = state["memory_bank._extra_state"]["class_names"]
    learned = {name for name in names if name.startswith("monailabel/")}  # classes of the datastore's episodes
    assert learned and learned <= {f"monailabel/{name}" for name in workspace["names"]}
    assert set(BANK) <= set(names)  # fine-tuned from the given weights: their classes are kept

    params, _ = infer(server, "case1")
    assert params["checkpoint"] == str(finetuned)  # inference now uses the fine-tuned weights


def test_stock_monaibundle_app_serves_the_memory_bank(workspace: dict, tmp_path: Path) -> None:
    """MONAI Label's own bundle app runs the bundle's inference.json: the query-only forward, every bank class."""
    stock = Path(sys.prefix) / "monailabel" / "sample-apps" / "monaibundle"  # where pip installs the sample apps
    assert stock.is_dir(), f"MONAI Label's sample apps are missing from {stock.parent}"
    app = tmp_path / "app"
    shutil.copytree(stock, app)
    bundle = app / "model" / "iris"
    for part in ("configs", "scripts"):
        shutil.copytree(REPO_ROOT / "bundle" / part, bundle / part)
    (bundle / "models").mkdir()
    shutil.copy(workspace["checkpoint"], bundle / "models" / "model.pt")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config.update(SIZE, patch_size=[32, 32, 32], target_spacing=None)  # the deployed bundle's own network size
    (bundle / "configs" / "inference.json").write_text(json.dumps(config, indent=4))

    conf = {"models": "iris", "zoo_source": "github", "sam2": "false", "skip_trainers": "true"}
    with running_server(app, workspace["studies"], conf, tmp_path / "server.log") as stock_server:
        params, content = infer(stock_server, "case1")
    result = label_map(tmp_path, content)
    assert result.shape == nib.load(workspace["studies"] / "case1.nii.gz").shape
    found = set(np.unique(result).tolist()) - {0}
    assert found and found <= {1, 2}  # the checkpoint's two memory-bank classes, at label values 1 and 2
    assert len(params["label_names"]) == len(config["memory_classes"])  # named from metadata.json's channel_def
