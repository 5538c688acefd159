"""Speed settings: the memory layout changes no output or checkpoint; mixed precision is on where it is fast."""

from __future__ import annotations

from pathlib import Path

import torch

from scripts.networks import build_iris_net
from scripts.performance import channels_last, mixed_precision_is_fast


def test_channels_last_keeps_outputs_and_state_dict() -> None:
    torch.manual_seed(0)
    net = build_iris_net(base_channels=4, num_query_tokens=3, num_heads=4, channel_multipliers=(1, 2, 4)).eval()
    support, masks = torch.randn(1, 1, 1, 16, 16, 16), (torch.rand(1, 1, 2, 16, 16, 16) > 0.5).float()
    query = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = net(query, net.encode_support(support, masks))
        fast = channels_last(
            build_iris_net(base_channels=4, num_query_tokens=3, num_heads=4, channel_multipliers=(1, 2, 4))
        )
        fast.load_state_dict(net.state_dict())
        fast.eval()
        result = fast(query, fast.encode_support(support, masks))
    assert fast.encoder.stages[0][0].conv1.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)
    assert channels_last(net, enabled=False).encoder.stages[0][0].conv1.conv.weight.is_contiguous()


def test_mixed_precision_is_on_by_default_only_where_it_is_fast() -> None:
    """CUDA always; a CPU only with the native bf16 instructions that /proc/cpuinfo lists (Linux)."""
    assert mixed_precision_is_fast("cuda") and mixed_precision_is_fast(torch.device("cuda", 1))
    assert not mixed_precision_is_fast("meta")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = set(cpuinfo.read_text().split())
        assert mixed_precision_is_fast("cpu") == bool({"avx512_bf16", "amx_tile"} & flags)
    assert isinstance(mixed_precision_is_fast("cpu"), bool)
