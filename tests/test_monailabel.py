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

from scripts.networks import build_iris_net, extra_state
from scripts.segmentation.model_io import bundle_version, training_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = {"base_channels": 4, "num_heads": 4, "num_query_tokens": 3, "channel_multipliers": [1, 2, 4, 8]}
BANK = ["IrisDemo/sphere", "IrisDemo/box"]
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def relabelled(source: Path, values: dict[int, int], target: Path, shape: tuple[int, ...] | None = None) -> Path:
    """A copy of a label map that keeps only ``values`` (old -> new value), as 3D Slicer exports segments 1..N."""
    label = nib.load(source)
    array = np.asarray(label.dataobj)
    out = np.zeros(shape or array.shape, dtype=np.uint8)
    for old, new in values.items():
        out[array[tuple(slice(0, n) for n in out.shape)] == old] = new
    nib.save(nib.Nifti1Image(out, label.affine), target)
    return target


@pytest.fixture(scope="module")
def workspace(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four unlabelled demo volumes in a studies folder, label maps exported as Slicer does (each volume's segments as
    1..N, so value 1 names a different structure in case0 and case1), and a tiny checkpoint."""
    root = tmp_path_factory.mktemp("monailabel")
    studies = root / "studies"
    studies.mkdir()
    content = json.loads(demo_dataset.read_text())
    value_of = {name: int(value) for value, name in content["labels"].items()}
    for index, item in enumerate(content["training"][:4]):
        shutil.copy(demo_dataset.parent / item["image"], studies / f"case{index}.nii.gz")
    labels = [demo_dataset.parent / item["label"] for item in content["training"][:2]]
    present = [set(np.unique(np.asarray(nib.load(path).dataobj)).tolist()) - {0} for path in labels]
    first = [name for name, value in value_of.items() if value in present[0]][:2]  # case0: two structures
    second = next(name for name, value in value_of.items() if value in present[1] and name not in first)
    exports = {
        "case0": (relabelled(labels[0], {value_of[n]: i + 1 for i, n in enumerate(first)}, root / "case0_label.nii.gz"),
                  {name: i + 1 for i, name in enumerate(first)}),
        "case1": (relabelled(labels[1], {value_of[second]: 1}, root / "case1_label.nii.gz"), {second: 1}),
    }  # fmt: skip
    torch.manual_seed(0)
    net = build_iris_net(**SIZE, settings=training_settings([str(demo_dataset)], [32, 32, 32], None))
    net.memory_bank.update(BANK, torch.randn(2, *net.memory_bank.embeddings.shape[1:]))
    checkpoint = root / "model.pt"
    torch.save(net.state_dict(), checkpoint)
    return {"root": root, "studies": studies, "exports": exports, "checkpoint": checkpoint, "source": labels}


def label_info(names: dict[str, int]) -> dict:
    """The params 3D Slicer's MONAI Label plugin saves a label with."""
    return {"label_info": [{"name": name, "idx": value} for name, value in names.items()]}


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


def infer(server: dict, image: str, params: dict | None = None) -> tuple[dict, Path]:
    """``/infer`` through MONAI Label's own client, as 3D Slicer sends it; returns the params and the label map."""
    try:
        client = MONAILabelClient(server["url"], tmpdir=str(server["log"].parent))
        result, answer = client.infer("iris", image, params or {})
    except MONAILabelClientException as error:
        raise AssertionError(f"{error}\n{server['log'].read_text()[-4000:]}") from error
    return answer, Path(result)


def label_map(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def refused(call) -> str:
    """The message of a request that the server must refuse with a 4xx and a JSON ``detail``."""
    with pytest.raises(MONAILabelClientException) as caught:
        call()
    message = str(caught.value.msg)
    status = int(message.split("Status: ")[1].split(";")[0])
    assert 400 <= status < 500, message
    assert json.loads(message.split("Response: ", 1)[1])["detail"], message
    return message


@pytest.mark.slow
def test_label_one_segment_the_rest(server: dict, workspace: dict, tmp_path: Path) -> None:
    client = MONAILabelClient(server["url"], tmpdir=str(tmp_path))
    info = client.info()
    assert "iris" in info["models"] and "iris" in info["trainers"]
    assert info["datastore"]["total"] == 4 and info["version"] == bundle_version()
    bank = {name: i + 1 for i, name in enumerate(sorted(BANK))}  # the app's values: the memory classes come first
    assert info["labels"] == info["models"]["iris"]["labels"] == bank

    # no label yet: the memory bank answers, and says so
    params, result_file = infer(server, "case1")
    assert params["strategy"] == "memory" and params["references"] == [] and params["label_names"] == bank
    assert set(np.unique(label_map(result_file)).tolist()) <= {0, *bank.values()}

    # an image id the datastore does not hold is the client's mistake, not the server's
    unknown = requests.post(f"{server['url']}/infer/iris", params={"image": "case9"}, timeout=60)
    assert unknown.status_code == 404 and "case9" in unknown.json()["detail"]

    # the annotator submits one finished label with its names, as the 3D Slicer plugin does
    path, names = workspace["exports"]["case0"]
    client.save_label("case0", str(path), tag="final", params=label_info(names))
    values = {**bank, **{name: len(bank) + 1 + i for i, name in enumerate(names)}}  # new names, next values
    assert client.info()["labels"] == values

    started = time.perf_counter()
    params, result_file = infer(server, "case2")
    latency = time.perf_counter() - started
    assert params["strategy"] == "retrieval" and params["warnings"] == []
    assert params["references"] == [str(workspace["studies"] / "case0.nii.gz")]
    assert params["label_names"] == values and params["classes"] == list(names)
    result = label_map(result_file)
    assert result.shape == nib.load(workspace["studies"] / "case2.nii.gz").shape
    assert set(np.unique(result).tolist()) <= {0, *(values[name] for name in names)}

    # every request cleans up after itself: each sent label map soon after it is sent (by MONAI Label)
    deadline = time.perf_counter() + 10
    while list(server["tmp"].glob("iris_*.nii.gz")) and time.perf_counter() < deadline:
        time.sleep(0.2)
    assert not list(server["tmp"].glob("iris_*.nii.gz"))
    print(f"server start {server['start_s']:.1f} s, /infer retrieval latency {latency:.2f} s")


@pytest.mark.slow
def test_labels_are_matched_by_name_whatever_value_each_volume_used(server: dict, workspace: dict) -> None:
    """Slicer exports every volume's segments as 1..N: value 1 is one structure in case0, another in case1."""
    client = MONAILabelClient(server["url"])
    path, names = workspace["exports"]["case1"]
    (second,) = names
    client.save_label("case1", str(path), tag="final", params=label_info(names))
    values = client.info()["labels"]
    first = list(workspace["exports"]["case0"][1])
    assert len(set(values.values())) == len(values) and {*first, second} <= set(values)
    assert values[second] not in (values[first[0]], 1)  # its own value, not case0's value 1

    params, result_file = infer(server, "case3", {"result_extension": ".nrrd", "result_dtype": "uint8"})
    assert params["classes"] == [*first, second] and len(params["references"]) == 2
    assert params["label_names"] == values
    # what 3D Slicer asks for: NRRD, 8 bits, values that name the right segments
    assert result_file.name.endswith(".nrrd")
    header = result_file.read_bytes().split(b"\n\n", 1)[0].decode("latin-1")
    assert "type: unsigned char" in header or "type: uchar" in header, header
    # case1's reference is its structure in the app's values: value 1 of its file became the name's own value
    canonical = sorted((workspace["studies"] / ".iris" / "labels").glob("case1_*.nii.gz"))
    assert len(canonical) == 1
    original = label_map(path)
    assert np.array_equal(label_map(canonical[0]), np.where(original == 1, values[second], 0))


@pytest.mark.slow
def test_no_file_can_poison_the_datastore(server: dict, workspace: dict, tmp_path: Path) -> None:
    """Every bad upload is refused with a 4xx that says why; a bad file placed on disk is skipped with a warning."""
    client = MONAILabelClient(server["url"], tmpdir=str(tmp_path))
    empty_file = tmp_path / "empty.nii.gz"
    empty_file.write_bytes(b"")
    not_gzip = tmp_path / "not_gzip.nii.gz"
    not_gzip.write_bytes(b"this is not a gzip stream" * 10)
    small = relabelled(workspace["source"][0], {1: 1}, tmp_path / "small.nii.gz", shape=(32, 32, 32))
    nothing = relabelled(workspace["source"][0], {}, tmp_path / "nothing.nii.gz")
    unnamed = relabelled(workspace["source"][0], {1: 1, 2: 2}, tmp_path / "unnamed.nii.gz")
    cases = [
        (empty_file, {"names": {"x": 1}}, "empty file"),
        (not_gzip, {"names": {"x": 1}}, "gzip"),
        (small, {"names": {"x": 1}}, "shape"),
        (nothing, {"names": {"x": 1}}, "empty"),
        (unnamed, {"names": {"x": 1}}, "no name"),
    ]
    for path, info, reason in cases:
        message = refused(lambda: client.save_label("case2", str(path), tag="final", params=label_info(info["names"])))
        assert reason in message and "case2" in message, message
    assert "case2" not in client.datastore()["objects"] or not client.datastore()["objects"]["case2"]["labels"]
    message = refused(lambda: client.upload_image(str(not_gzip), "broken"))
    assert "gzip" in message and "broken" not in client.datastore()["objects"]

    # a label file damaged on disk (copied over by hand) is skipped, the others still answer
    damaged = workspace["studies"] / "labels" / "final" / "case1.nii.gz"
    damaged.write_bytes(b"damaged on disk")
    params, _ = infer(server, "case3")
    assert params["strategy"] == "retrieval" and len(params["references"]) == 1
    assert any("case1" in warning for warning in params["warnings"]), params["warnings"]
    client.save_label("case1", str(workspace["exports"]["case1"][0]), tag="final", params=label_info(
        workspace["exports"]["case1"][1]))  # fmt: skip


@pytest.mark.slow
def test_train_fine_tunes_on_the_datastore_labels(server: dict, workspace: dict) -> None:
    if not requests.head(f"{server['url']}/datastore/label", params={"image": "case1", "tag": "final"}).ok:
        pytest.fail("the tests above submit the labels this test trains on; run the module whole")
    client = MONAILabelClient(server["url"])
    client.train_start("iris", {"max_iterations": 2, "batch_size": 1})
    deadline = time.monotonic() + 900
    status = client.train_status()
    while status.get("status") in ("SUBMITTED", "RUNNING") and time.monotonic() < deadline:
        time.sleep(2)
        status = client.train_status()
    assert status.get("status") == "DONE", f"{status}\n{server['log'].read_text()[-4000:]}"
    stats = client.info()["train_stats"]["iris"]
    assert stats["epoch"] == stats["total_epochs"] == 2 and "total_time" in stats  # what 3D Slicer shows
    finetuned = workspace["root"] / "model" / "model_finetuned.pt"
    state = torch.load(finetuned, weights_only=True)
    names = extra_state.decode(state["memory_bank._extra_state"])["class_names"]
    learned = {name for name in names if name.startswith("monailabel/")}  # classes of the datastore's episodes
    values = client.info()["labels"]
    assert learned and learned <= {f"monailabel/{name}" for name in values}
    assert set(BANK) <= set(names)  # fine-tuned from the given weights: their classes are kept
    run = sorted((workspace["root"] / "model" / "train").glob("*/dataset.json"))[-1]
    pool = json.loads(run.read_text())
    assert {name: int(value) for value, name in pool["labels"].items() if value != "0"}.items() <= values.items()
    # two labelled volumes: both train, the one with more classes first (and validation scores them)
    assert [Path(item["image"]).name for item in pool["training"]] == ["case0.nii.gz", "case1.nii.gz"]

    params, _ = infer(server, "case2")
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


def test_the_split_keeps_the_most_completely_labelled_volumes_in_training() -> None:
    sys.path.insert(0, str(REPO_ROOT / "scripts" / "monailabel"))
    from lib.references import DatastoreReferences
    from lib.train import split

    few = DatastoreReferences(images=["a", "b", "c"], per_volume=[{"x": 1}, {"x": 1, "y": 2}, {"y": 2}])
    assert split(few) == ([1, 0, 2], [1, 0, 2])  # under five volumes every one trains, validation scores them all
    full = {"x": 1, "y": 2, "z": 3}
    volumes = [full, {"x": 1}, full, {"z": 3}, {"x": 1, "y": 2}, full, {"q": 4}]
    many = DatastoreReferences(images=[f"v{i}" for i in range(7)], per_volume=volumes)
    training, validation = split(many)
    assert validation == [3] and {0, 2, 5, 6} <= set(training)  # "q" is labelled once: that volume must train


def test_the_label_registry_gives_new_names_new_values_and_keeps_them(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT / "scripts" / "monailabel"))
    from lib.labels import LabelError, LabelRegistry, seg_nrrd_names

    registry = LabelRegistry(tmp_path / "values.json", {"liver": 1})
    assert registry.register(["spleen", "liver"]) == {"spleen": 2, "liver": 1}
    assert LabelRegistry(tmp_path / "values.json").values == {"liver": 1, "spleen": 2}  # kept across restarts
    with pytest.raises(LabelError, match="without gaps"):
        LabelRegistry(tmp_path / "other.json", {"liver": 1, "kidney": 3})
    with pytest.raises(LabelError, match="contradicts"):
        LabelRegistry(tmp_path / "values.json", {"spleen": 1})
    seg = tmp_path / "case.seg.nrrd"
    seg.write_bytes(b"NRRD0004\ntype: unsigned char\nSegment0_Name:=liver\nSegment0_LabelValue:=2\n"
                    b"Segment1_Name:=tumour\nSegment1_LabelValue:=1\n\n\x00\x01")  # fmt: skip
    assert seg_nrrd_names(seg) == {"liver": 2, "tumour": 1}


def test_fine_tuned_weights_are_used_when_newer_unless_the_checkpoint_is_pinned(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT / "scripts" / "monailabel"))
    from lib.bundle import IrisSettings

    given, model_dir = tmp_path / "given.pt", tmp_path / "model"
    model_dir.mkdir()
    given.write_bytes(b"weights")
    finetuned = model_dir / "model_finetuned.pt"
    finetuned.write_bytes(b"fine-tuned")
    os.utime(given, (time.time() - 60, time.time() - 60))  # the checkpoint is older than the fine-tuned weights
    conf = {"checkpoint": str(given), "model_dir": str(model_dir)}
    settings = IrisSettings.from_conf(str(tmp_path), conf)
    assert settings.active_checkpoint() == finetuned and "fine-tuned by /train" in settings.describe_weights()
    pinned = IrisSettings.from_conf(str(tmp_path), {**conf, "pin_checkpoint": "true"})
    assert pinned.active_checkpoint() == given and "pinned" in pinned.describe_weights()
    given.touch()  # a newer checkpoint (e.g. a new training run) takes over again
    assert settings.active_checkpoint() == given and "is not used" in settings.describe_weights()


def test_conf_values_become_bundle_overrides_of_their_json_type(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT / "scripts" / "monailabel"))
    from lib.bundle import IrisSettings, train_json_ids

    conf = {"keep_largest_component": "true", "sw_overlap": "0.25", "modality": "MRI", "unknown_key": "1"}
    settings = IrisSettings.from_conf(str(tmp_path), conf)
    assert settings.overrides == {"keep_largest_component": True, "sw_overlap": 0.25, "modality": "MRI"}
    # train.json has the network ids that inference.json keeps at its top level inside network_def
    ids = train_json_ids({"num_heads": 4, "channel_multipliers": [1, 2], "cache": "memory", "sw_overlap": 0.25})
    assert ids == {"network_def#num_heads": 4, "network_def#channel_multipliers": [1, 2], "train#pool#cache": "memory",
                   "sw_overlap": 0.25}  # fmt: skip
