"""Speed and memory of the IRIS bundle against a plain MONAI UNet, measured side by side in one process.

Every timing is a median over repeats after warm-up, and every target is a ratio of two timings taken in the same
process, so the numbers stay meaningful on a busy machine. See ``docs/benchmarks.md`` for the method.

Examples::

    python scripts/benchmark.py --quick --output bench_quick.json   # ~2 minutes on a 2-core CPU
    python scripts/benchmark.py --output bench_full.json            # paper preset on a GPU, demo preset on a CPU
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import inspect
import json
import logging
import math
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.networks.nets import UNet
from torch import nn
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
BUNDLE_ROOT = HERE.parent / "bundle"
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]  # `scripts` = the bundle's
sys.path.insert(0, str(BUNDLE_ROOT))

from scripts.data.demo_data import make_demo_dataset  # noqa: E402
from scripts.data.episodes import EpisodeDataset  # noqa: E402
from scripts.data.pool import DatasetPool  # noqa: E402
from scripts.networks import IrisNet, build_iris_net  # noqa: E402
from scripts.performance import channels_last  # noqa: E402
from scripts.segmentation.inferers import InContextInferer  # noqa: E402
from scripts.segmentation.losses import DiceBCELoss  # noqa: E402
from scripts.training.engines import EpisodicTrainer  # noqa: E402
from scripts.training.optimizers import Lamb  # noqa: E402

logger = logging.getLogger("benchmark")

NETWORK_IDS = ("base_channels", "num_query_tokens", "num_heads", "decoder_depth", "channel_multipliers")


def config_network(*config_files: str) -> dict:
    """The network size that the bundle configs (later files override earlier ones) give ``build_iris_net``, so the
    benchmark measures the networks that the Quick start and the paper recipe train: its defaults, the configs'
    top-level ids and their ``network_def#...`` ids."""
    merged: dict = {}
    for name in config_files:
        merged.update(json.loads((BUNDLE_ROOT / "configs" / name).read_text()))
    defaults = inspect.signature(build_iris_net).parameters
    network = {}
    for key in NETWORK_IDS:
        value = merged.get(f"network_def#{key}", merged.get(key, defaults[key].default))
        network[key] = list(value) if isinstance(value, tuple) else value
    return network


PRESETS = {"demo": config_network("train.json", "demo.json"), "paper": config_network("train.json")}


@dataclass(frozen=True)
class Setting:
    """What one benchmark run measures; ``quick`` and ``full`` below are the two documented settings."""

    preset: str
    patch: tuple[int, int, int]
    batch_size: int
    k_shot: int
    max_classes: int
    query_volume: tuple[int, int, int]  # volume of the 15-vs-1-class inference ratio
    large_volume: tuple[int, int, int]  # volume of the peak-memory and voxels/s inference measurement
    sw_batch_size: int
    warmup: int
    repeats: int  # timed iterations per run
    rounds: int  # interleaved runs of each compared side
    data_iterations: int
    num_workers: int
    demo_subjects: int
    demo_shape: tuple[int, int, int] = (64, 64, 64)
    matmul_size: int = 2048  # square matmul that measures the device's dense FLOP/s


QUICK = Setting("demo", (32, 32, 32), 2, 1, 4, (64, 64, 64), (128, 128, 75), 4, 1, 3, 2, 8, 1, 6)
FULL_CPU = replace(
    QUICK, query_volume=(128, 128, 128), large_volume=(512, 512, 300), repeats=5, rounds=3, data_iterations=30
)
FULL_GPU = replace(
    FULL_CPU, preset="paper", patch=(128, 128, 128), demo_shape=(160, 160, 160), num_workers=4, matmul_size=8192
)


def count_parameters(network: torch.nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


def comparable_unet(target_parameters: int, out_channels: int, num_stages: int) -> UNet:
    """A MONAI UNet with ``base * 2**i`` channels, ``base`` chosen so its parameter count is closest to the target."""

    def unet(base: int) -> UNet:
        channels = [base * 2**i for i in range(num_stages)]
        return UNet(3, 1, out_channels, channels=channels, strides=[2] * (num_stages - 1), num_res_units=2)

    base, previous = 2, unet(2)
    while count_parameters(previous) < target_parameters:  # the count grows with base: stop at the first above
        base, current = base + 1, unet(base + 1)
        if count_parameters(current) >= target_parameters:
            closer = abs(count_parameters(current) - target_parameters) < target_parameters - count_parameters(previous)
            return current if closer else previous
        previous = current
    return previous


class OwnBackbone(nn.Module):
    """IRIS's encoder and U-Net decoder with a 1x1x1 head to K classes: the same backbone as a plain segmenter.

    Trained like the UNet (every patch of the episode is a segmentation sample), it separates the cost of the episodic
    machinery (task encoding, two-way attention, per-class dot products, memory bank) from the cost of the backbone.
    """

    def __init__(self, network: IrisNet, out_channels: int) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(network.encoder)
        self.decoder = copy.deepcopy(network.mask_decoder)  # only its U-Net part runs (the rest gets no gradient)
        self.head = nn.Conv3d(network.encoder.channels[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        return self.head(self.decoder.pixel_embeddings(features))


def episode_batches(pool: DatasetPool, setting: Setting, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` collated episode batches from the real episode pipeline, loaded once (data time excluded later)."""
    dataset = EpisodeDataset(pool, count * setting.batch_size, setting.patch, setting.k_shot, setting.max_classes)
    return list(DataLoader(dataset, batch_size=setting.batch_size, num_workers=0))


def as_plain_batch(episode: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same patches (supports + queries, ``B*(K*S+1)`` of them) as a plain supervised ``image``/``label`` batch.

    A reference patch of class k is labelled in channel k only (its other classes are unknown to the episode).
    """
    support_image, support_mask = episode["support_image"], episode["support_mask"]  # B x K x S x 1 x P
    num_classes = support_mask.shape[1]
    one_hot = torch.eye(num_classes, dtype=support_mask.dtype).view(1, num_classes, 1, num_classes, *[1] * 3)
    support_labels = support_mask * one_hot  # B x K x S x K x P
    images = torch.cat([support_image.flatten(0, 2), episode["query_image"]])
    labels = torch.cat([support_labels.flatten(0, 2), episode["query_mask"]])
    return {"image": images, "label": labels.float()}


@contextmanager
def iteration_timer(engine: Engine, skip: int) -> Iterator[dict[str, list[float]]]:
    """Collect per-iteration compute time and batch-wait time from ignite events, ignoring the first ``skip``."""
    times: dict[str, list[float]] = {"compute": [], "wait": []}
    marks: dict[str, float] = {}

    def mark(name: str) -> Callable[[Engine], None]:
        return lambda _: marks.__setitem__(name, time.perf_counter())

    def record(key: str, start: str) -> Callable[[Engine], None]:
        def handler(e: Engine) -> None:
            if e.state.iteration > skip:
                times[key].append(time.perf_counter() - marks[start])

        return handler

    handles = [
        engine.add_event_handler(Events.GET_BATCH_STARTED, mark("get")),
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, record("wait", "get")),
        engine.add_event_handler(Events.ITERATION_STARTED, mark("iteration")),
        engine.add_event_handler(Events.ITERATION_COMPLETED, record("compute", "iteration")),
    ]
    try:
        yield times
    finally:
        for handle in handles:
            handle.remove()


def median_iteration(trainer: SupervisedTrainer, warmup: int) -> float:
    """Median compute time of one iteration over a run of the trainer (its loader holds preloaded batches)."""
    with iteration_timer(trainer, skip=warmup) as times:
        trainer.run()
    return statistics.median(times["compute"])


def iris_trainer(network: IrisNet, batches: list[dict], device: torch.device, amp: bool = False) -> EpisodicTrainer:
    loader = TorchDataLoader(batches, batch_size=None)  # preloaded, already collated episodes
    return EpisodicTrainer(
        device, 1, loader, network, Lamb(network.parameters(), lr=1e-4), DiceBCELoss(), len(batches), amp=amp
    )


def unet_trainer(network: nn.Module, batches: list[dict], device: torch.device) -> SupervisedTrainer:
    loader = TorchDataLoader([as_plain_batch(b) for b in batches], batch_size=None)
    optimizer = Lamb(network.parameters(), lr=1e-4)
    return SupervisedTrainer(device, 1, loader, network, optimizer, DiceBCELoss(), len(batches), decollate=False)


def interleaved_medians(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Alternate the runs ``rounds`` times and keep each one's median, so load changes hit all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            samples[name].append(run())
    return {name: statistics.median(values) for name, values in samples.items()}


def train_step_ratio(network: IrisNet, unet: UNet, batches: list[dict], setting: Setting, device) -> dict:
    """One EpisodicTrainer iteration against one plain SupervisedTrainer iteration of the UNet on the same patches.

    IRIS and the UNet run as their bundles run them by default (fp32, default memory layout). IRIS with channels-last
    convolutions (config ``channels_last: true``) and IRIS's own backbone as a plain segmenter (``OwnBackbone``) are
    timed in the same rounds: they give the channels-last speed-up and split the ratio into backbone cost and
    episodic overhead.
    """
    backbone = OwnBackbone(network, setting.max_classes).to(device)
    trainers = {
        "iris": iris_trainer(network, batches, device),
        "iris_channels_last": iris_trainer(channels_last(copy.deepcopy(network)), batches, device),
        "own_backbone": unet_trainer(backbone, batches, device),
        "unet": unet_trainer(unet, batches, device),
    }
    runs = {name: (lambda t=trainer: median_iteration(t, setting.warmup)) for name, trainer in trainers.items()}
    medians = interleaved_medians(runs, setting.rounds)
    return {
        "train_step_s_iris": medians["iris"],
        "train_step_s_iris_channels_last": medians["iris_channels_last"],
        "train_step_s_unet": medians["unet"],
        "train_step_ratio_vs_unet": medians["iris"] / medians["unet"],
        "train_step_ratio_vs_unet_channels_last": medians["iris_channels_last"] / medians["unet"],
        "channels_last_speedup": medians["iris"] / medians["iris_channels_last"],
        "train_step_s_own_backbone": medians["own_backbone"],
        "train_step_ratio_own_backbone_vs_unet": medians["own_backbone"] / medians["unet"],
        "episodic_overhead_vs_own_backbone": medians["iris"] / medians["own_backbone"],
    }


def amp_speedup(network: IrisNet, batches: list[dict], setting: Setting, device: torch.device) -> dict:
    """Training-step speed-up of autocast (bf16 on CPU, fp16 + GradScaler on CUDA) over fp32."""
    batches = batches[: setting.warmup + 1] if device.type == "cpu" else batches  # CPU bf16 is slow: one sample
    fp32, mixed = iris_trainer(network, batches, device), iris_trainer(network, batches, device, amp=True)
    medians = interleaved_medians(
        {
            "fp32": lambda: median_iteration(fp32, setting.warmup),
            "amp": lambda: median_iteration(mixed, setting.warmup),
        },
        max(1, setting.rounds - 1),
    )
    name = "fp16_speedup" if device.type == "cuda" else "bf16_speedup"
    return {name: medians["fp32"] / medians["amp"]}


@contextmanager
def cudnn_mode(mode: str) -> Iterator[None]:
    """cuDNN as ``default`` leaves it, as ``deterministic`` (what ``monai.utils.set_determinism`` sets), or with
    ``benchmark`` autotuning."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = mode == "deterministic", mode == "benchmark"
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def cuda_step_options(network: IrisNet, batches: list[dict], setting: Setting) -> dict:
    """CUDA only: IRIS training step under each cuDNN mode, and fp16 autocast with channels-last, against the default.

    The bundle's ``initialize`` calls ``set_determinism``, which makes cuDNN deterministic; this shows its cost.
    """
    device = next(network.parameters()).device
    layouts = {"contiguous": network, "channels_last": channels_last(copy.deepcopy(network))}
    runs = {}
    for mode in ("default", "deterministic", "benchmark"):
        trainer = iris_trainer(network, batches, device)
        runs[mode] = lambda t=trainer, m=mode: timed_in_mode(t, m, setting.warmup)
    for layout, net in layouts.items():
        trainer = iris_trainer(net, batches, device, amp=True)
        runs[f"amp_{layout}"] = lambda t=trainer: timed_in_mode(t, "default", setting.warmup)
    medians = interleaved_medians(runs, setting.rounds)
    return {
        "train_step_s_iris_cudnn_deterministic": medians["deterministic"],
        "cudnn_deterministic_slowdown": medians["deterministic"] / medians["default"],
        "cudnn_benchmark_speedup": medians["default"] / medians["benchmark"],
        "fp16_channels_last_speedup": medians["default"] / medians["amp_channels_last"],
        "fp16_contiguous_speedup": medians["default"] / medians["amp_contiguous"],
    }


def timed_in_mode(trainer: SupervisedTrainer, mode: str, warmup: int) -> float:
    with cudnn_mode(mode):
        return median_iteration(trainer, warmup)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def infer_seconds(network: IrisNet, inferer: InContextInferer, volume: torch.Tensor, classes: int) -> float:
    """Time of one sliding-window inference of ``volume`` with ``classes`` task embeddings (encoded beforehand)."""
    tokens, width = network.token_shape
    inferer.set_task(torch.randn(1, classes, tokens, width, device=volume.device))
    synchronize(volume.device)
    start = time.perf_counter()
    with torch.no_grad():
        inferer(volume, network)
    synchronize(volume.device)
    return time.perf_counter() - start


def infer_cost_ratio(network: IrisNet, setting: Setting, device: torch.device) -> dict:
    """Sliding-window inference of one query volume with 15 classes against 1 class."""
    network.eval()
    inferer = InContextInferer(setting.patch, sw_batch_size=setting.sw_batch_size)
    volume = torch.randn(1, 1, *setting.query_volume, device=device)
    infer_seconds(network, inferer, volume, 15)  # warm-up
    runs = {k: (lambda k=k: infer_seconds(network, inferer, volume, k)) for k in (1, 15)}
    medians = interleaved_medians(runs, setting.rounds + 1)
    return {
        "infer_s_1_class": medians[1],
        "infer_s_15_classes": medians[15],
        "infer_cost_ratio_15_vs_1_classes": medians[15] / medians[1],
    }


def release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``), so RSS growth measures what a block allocates."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measurement then only counts growth beyond reused memory
        pass


@contextmanager
def peak_memory(device: torch.device, interval: float = 0.005) -> Iterator[dict[str, int]]:
    """Peak memory growth of the block: CUDA ``max_memory_allocated``; on CPU, peak RSS sampled by a thread."""
    result = {"bytes": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["bytes"] = torch.cuda.max_memory_allocated(device) - base
        return
    release_free_heap()
    process = psutil.Process()
    base = process.memory_info().rss
    peak, stop = [base], threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["bytes"] = max(peak[0], process.memory_info().rss) - base


def large_volume_inference(network: IrisNet, setting: Setting, device: torch.device) -> dict:
    """Peak memory and voxels/s of inferring ``large_volume`` with 15 classes (the volume is allocated outside).

    Also measured with a float16 stitching buffer (``stitch_dtype``, the label-map default of ``inference.json``)
    and, on a GPU, with the logits stitched in CPU memory (``cpu_thresh=0``).
    """
    network.eval()
    volume = torch.randn(1, 1, *setting.large_volume, device=device)
    results: dict = {"infer_large_volume": list(setting.large_volume)}
    variants = {"": {}, "_float16_stitching": {"stitch_dtype": "float16"}}
    if device.type == "cuda":
        variants["_cpu_stitching"] = {"cpu_thresh": 0}
    for suffix, options in variants.items():
        inferer = InContextInferer(setting.patch, sw_batch_size=setting.sw_batch_size, **options)
        with peak_memory(device) as memory:
            seconds = infer_seconds(network, inferer, volume, 15)
        results[f"infer_peak_memory_mb_15_classes{suffix}"] = memory["bytes"] / 2**20
        results[f"infer_voxels_per_s_15_classes{suffix}"] = volume.numel() / seconds
    return results


def train_memory(network: IrisNet, unet: UNet, batches: list[dict], device: torch.device) -> dict:
    """Peak memory of one training iteration (one batch), IRIS and UNet, after a warm-up iteration."""
    result = {}
    for name, make in (("iris", iris_trainer), ("unet", unet_trainer)):
        trainer = make(network if name == "iris" else unet, batches[:1], device)
        trainer.run()  # warm-up: optimizer state and allocator pools exist before measuring
        with peak_memory(device) as memory:
            trainer.run()
        result[f"train_peak_memory_mb_{name}"] = memory["bytes"] / 2**20
    return result


def matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of a large square matmul on ``device`` (the machine's practical peak for dense math)."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def iteration_flops(trainer: SupervisedTrainer) -> int:
    """FLOPs of one training iteration of ``trainer`` (its loader holds one batch), counted by ``FlopCounterMode``."""
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.run()
    return counter.get_total_flops()


def training_flops(network: IrisNet, unet: UNet, batches: list[dict], setting: Setting, device, results: dict) -> dict:
    """FLOPs of one training iteration, IRIS and UNet; IRIS's divided by its measured median time."""
    flops = iteration_flops(iris_trainer(network, batches[:1], device))
    unet_flops = iteration_flops(unet_trainer(unet, batches[:1], device))
    achieved = flops / results["train_step_s_iris"]
    peak = matmul_flops(device, size=setting.matmul_size)
    return {
        "train_step_gflop": flops / 1e9,
        "train_step_gflop_unet": unet_flops / 1e9,
        "train_flop_ratio_vs_unet": flops / unet_flops,
        "train_achieved_gflops": achieved / 1e9,
        "train_achieved_gflops_unet": unet_flops / results["train_step_s_unet"] / 1e9,
        "matmul_gflops": peak / 1e9,
        "train_flops_fraction_of_matmul": achieved / peak,
    }


def data_wait_fraction(network: IrisNet, pool: DatasetPool, setting: Setting, device: torch.device) -> dict:
    """Share of training wall time spent waiting for the next episode batch from the real episode DataLoader."""
    iterations = setting.data_iterations + setting.warmup
    dataset = EpisodeDataset(pool, iterations * setting.batch_size, setting.patch, setting.k_shot, setting.max_classes)
    loader = DataLoader(
        dataset,
        batch_size=setting.batch_size,
        num_workers=setting.num_workers,
        persistent_workers=setting.num_workers > 0,
    )
    trainer = EpisodicTrainer(
        device, 1, loader, network, Lamb(network.parameters(), lr=1e-4), DiceBCELoss(), iterations
    )
    with iteration_timer(trainer, skip=setting.warmup) as times:
        trainer.run()
    wait, compute = sum(times["wait"]), sum(times["compute"])
    return {"data_wait_fraction": wait / (wait + compute), "data_loader_workers": setting.num_workers}


def versions(device: torch.device) -> dict:
    import ignite
    import monai

    info = {
        "torch": torch.__version__,
        "monai": monai.__version__,
        "ignite": ignite.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{psutil.cpu_count()}",
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    return info


def run_benchmark(
    setting: Setting, device: torch.device, dataset_json: str | Path, output: str | Path | None = None
) -> dict:
    """Every measurement of ``setting`` on ``device`` with episodes of ``dataset_json``; returns JSON-ready results.

    With ``output``, the results so far are written there after every step, so a run stopped early keeps them.
    """
    start = time.perf_counter()
    torch.manual_seed(0)
    pool = DatasetPool([str(dataset_json)], "training", num_workers=2)
    network = build_iris_net(**PRESETS[setting.preset]).to(device)
    stages = len(PRESETS[setting.preset]["channel_multipliers"])
    unet = comparable_unet(count_parameters(network), setting.max_classes, stages).to(device)
    batches = episode_batches(pool, setting, setting.warmup + setting.repeats)
    logger.info("%-28s %6.1f s", "setup", time.perf_counter() - start)
    results: dict = {"setting": asdict(setting), "versions": versions(device)}
    results["params_iris"], results["params_unet"] = count_parameters(network), count_parameters(unet)
    results["unet_channels"] = list(unet.channels)
    steps: list[tuple[str, Callable[[], dict]]] = [
        ("train step ratio", lambda: train_step_ratio(network, unet, batches, setting, device)),
        ("mixed precision", lambda: amp_speedup(network, batches, setting, device)),
        ("training FLOP/s", lambda: training_flops(network, unet, batches, setting, device, results)),
        ("training memory", lambda: train_memory(network, unet, batches, device)),
        ("data wait", lambda: data_wait_fraction(network, pool, setting, device)),
        ("inference 15 vs 1 classes", lambda: infer_cost_ratio(network, setting, device)),
        ("large-volume inference", lambda: large_volume_inference(network, setting, device)),
    ]
    if device.type == "cuda":
        steps.append(("cuDNN modes, fp16 layouts", lambda: cuda_step_options(network, batches, setting)))
    for name, step in steps:
        start = time.perf_counter()
        results.update(step())
        logger.info("%-28s %6.1f s", name, time.perf_counter() - start)
        if output is not None:
            Path(output).write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_table(results: dict) -> str:
    """Every scalar result as ``name | value`` rows."""
    rows = [(k, v) for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric':<{width}} | value", f"{'-' * width}-|------------"]
    lines += [f"{k:<{width}} | {v:.4g}" if isinstance(v, float) else f"{k:<{width}} | {v}" for k, v in rows]
    return "\n".join(lines)


def finite_positive(results: dict, keys: Sequence[str]) -> bool:
    return all(isinstance(results.get(k), (int, float)) and math.isfinite(results[k]) and results[k] > 0 for k in keys)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="demo network, scaled-down volumes (~2 min on a CPU)")
    parser.add_argument("--output", default="benchmark.json", help="where to write the JSON results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data_dir", default=None, help="demo data folder (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--num_workers", type=int, default=None, help="DataLoader workers of the data-wait run")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    device = torch.device(args.device)
    setting = QUICK if args.quick else FULL_GPU if device.type == "cuda" else FULL_CPU
    if args.num_workers is not None:
        setting = replace(setting, num_workers=args.num_workers)
    with tempfile.TemporaryDirectory() as tmp:
        dataset_json = make_demo_dataset(args.data_dir or tmp, setting.demo_subjects, 0, setting.demo_shape)
        results = run_benchmark(setting, device, dataset_json, args.output)
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
