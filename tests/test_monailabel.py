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
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from scripts.networks import build_iris_net
from scripts.training.model_settings import bundle_version, training_settings

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
    net = build_iris_net(**SIZE, settings=training_settings([str(demo_dataset)], [32, 32, 32], None))
    net.memory_bank.update(BANK, torch.randn(2, *net.memory_bank.embeddings.shape[1:]))
    checkpoint = root / "model.pt"
    torch.save(net.state_dict(), checkpoint)
    return {"root": root, "studies": studies, "annotation": annotation, "names": names, "checkpoint": checkpoint}


@contextmanager
def running_server(app: Path, studies: Path, conf: dict[str, str], log_path: Path) -> Iterator[dict]:
    """``monailabel start_server`` on a free loopback port, offline, with its own temporary folder (``tmp``, next to
    the log); stopped with its children on exit."""
    port = free_port()
    tmp = log_path.parent / "server_tmp"
    tmp.mkdir(exist_ok=True)
    command = [
        sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
        "--host", "127.0.0.1", "--port", str(port),
        *[item for key, value in conf.items() for item in ("--conf", key, value)],
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        env = {**os.environ, "TMPDIR": str(tmp)}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
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
            yield {"url": url, "start_s": time.perf_counter() - started, "log": log_path, "tmp": tmp}
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(workspace: dict) -> Iterator[dict]:
    """The IRIS app started as docs/monailabel.md says: the weights only (they record their network and patch size),
    fine-tuned weights kept in the test's folder."""
    conf = {"checkpoint": str(workspace["checkpoint"]), "model_dir": str(workspace["root"] / "model")}
    app = REPO_ROOT / "scripts" / "monailabel"
    with running_server(app, workspace["studies"], conf, workspace["root"] / "server.log") as running:
        yield running


def infer(server: dict, image: str, model: str = "iris") -> tuple[dict, Path]:
    """``/infer`` through MONAI Label's own client, as 3D Slicer sends it; returns the params and the label map."""
    try:
        result, params = MONAILabelClient(server["url"], tmpdir=str(server["log"].parent)).infer(model, image, {})
    except MONAILabelClientException as error:
        raise AssertionError(f"{error}\n{server['log'].read_text()[-4000:]}") from error
    return params, Path(result)


def label_map(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.mark.slow
def test_label_one_segment_the_rest(server: dict, workspace: dict, tmp_path: Path) -> None:
    client = MONAILabelClient(server["url"], tmpdir=str(tmp_path))
    info = client.info()
    assert "iris" in info["models"] and "iris" in info["trainers"]
    assert info["datastore"]["total"] == 3 and info["version"] == bundle_version()

    # no label yet: the memory bank answers, and says so
    params, result_file = infer(server, "case1")
    assert params["strategy"] == "memory" and params["references"] == []
    assert params["label_names"] == {name: i + 1 for i, name in enumerate(sorted(BANK))}
    assert set(np.unique(label_map(result_file)).tolist()) <= {0, 1, 2}

    # an image id the datastore does not hold is the client's mistake, not the server's
    unknown = requests.post(f"{server['url']}/infer/iris", params={"image": "case9"}, timeout=60)
    assert unknown.status_code == 404 and "case9" in unknown.text

    # the annotator submits one finished label with its names, as the 3D Slicer plugin does
    label_info = [{"name": name, "idx": value} for name, value in workspace["names"].items()]
    client.save_label("case0", str(workspace["annotation"]), tag="final", params={"label_info": label_info})

    started = time.perf_counter()
    params, result_file = infer(server, "case2")
    latency = time.perf_counter() - started
    assert params["strategy"] == "retrieval"
    assert params["references"] == [str(workspace["studies"] / "case0.nii.gz")]
    assert params["label_names"] == workspace["names"]
    result = label_map(result_file)
    assert result.shape == nib.load(workspace["studies"] / "case2.nii.gz").shape
    found = set(np.unique(result).tolist()) - {0}
    assert found and found <= set(workspace["names"].values())  # the labelled classes, and only they

    # every request cleans up after itself: the run folders at once, each sent label map soon after (by MONAI Label)
    assert not list(server["tmp"].glob("iris_infer_*"))
    deadline = time.perf_counter() + 10
    while list(server["tmp"].glob("iris_*")) and time.perf_counter() < deadline:
        time.sleep(0.2)
    assert not list(server["tmp"].glob("iris_*"))
    print(f"server start {server['start_s']:.1f} s, /infer retrieval latency {latency:.2f} s")


@pytest.mark.slow
def test_train_fine_tunes_on_the_datastore_labels(server: dict, workspace: dict) -> None:
    if not requests.head(f"{server['url']}/datastore/label", params={"image": "case0", "tag": "final"}).ok:
        pytest.fail("test_label_one_segment_the_rest submits the label this test trains on; run the module whole")
    client = MONAILabelClient(server["url"])
    client.train_start("iris", {"max_iterations": 2, "batch_size": 1})
    deadline = time.monotonic() + 900
    status = client.train_status()
    while status.get("status") in ("SUBMITTED", "RUNNING") and time.monotonic() < deadline:
        time.sleep(2)
        status = client.train_status()
    assert status.get("status") == "DONE", f"{status}\n{server['log'].read_text()[-4000:]}"
    finetuned = workspace["root"] / "model" / "model_finetuned.pt"
    state = torch.load(finetuned, weights_only=True)
    names = state["memory_bank._extra_state"]["class_names"]
    learned = {name for name in names if name.startswith("monailabel/")}  # classes of the datastore's episodes
    assert learned and learned <= {f"monailabel/{name}" for name in workspace["names"]}
    assert set(BANK) <= set(names)  # fine-tuned from the given weights: their classes are kept

    params, _ = infer(server, "case1")
    assert params["checkpoint"] == str(finetuned)  # inference now uses the weights this server fine-tuned


@pytest.mark.slow
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
    shutil.copy(workspace["checkpoint"], bundle / "models" / "model.pt")  # it records its own network and patch size

    conf = {"models": "iris", "zoo_source": "github", "sam2": "false", "skip_trainers": "true"}
    with running_server(app, workspace["studies"], conf, tmp_path / "server.log") as stock_server:
        params, result_file = infer(stock_server, "case1")
    result = label_map(result_file)
    assert result.shape == nib.load(workspace["studies"] / "case1.nii.gz").shape
    found = set(np.unique(result).tolist()) - {0}
    assert found and found <= {1, 2}  # the checkpoint's two memory-bank classes, at label values 1 and 2
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    channels = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert params["label_names"] == {name.lower(): int(key) for key, name in channels.items()}  # see docs/monailabel.md


def test_explicit_checkpoint_wins_over_fine_tuned_weights_left_by_an_earlier_server(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT / "scripts" / "monailabel"))
    from lib.bundle import IrisSettings

    given, model_dir = tmp_path / "given.pt", tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model_finetuned.pt").write_bytes(b"left over")
    os.utime(model_dir / "model_finetuned.pt", (time.time() - 60, time.time() - 60))
    explicit = IrisSettings.from_conf(str(tmp_path), {"checkpoint": str(given), "model_dir": str(model_dir)})
    assert explicit.active_checkpoint() == given and "is not used" in explicit.describe_weights()
    implicit = IrisSettings.from_conf(str(tmp_path), {"model_dir": str(model_dir)})
    assert implicit.active_checkpoint() == model_dir / "model_finetuned.pt"
    assert "left by an earlier /train" in implicit.describe_weights()
    (model_dir / "model_finetuned.pt").touch()  # written by this server's /train: it takes over
    assert explicit.active_checkpoint() == model_dir / "model_finetuned.pt"
