"""Memory bank: EMA and FIFO updates, lookups, and save/load through ``torch.load(weights_only=True)``."""

from __future__ import annotations

import pytest
import torch

from scripts.networks import build_iris_net
from scripts.networks.memory import MemoryBank
from scripts.training.embedding_map import memory_bank_embeddings


def test_first_update_sets_then_ema_blends() -> None:
    bank = MemoryBank(num_tokens=2, embed_dim=3, momentum=0.9)
    first, second = torch.ones(1, 2, 3), torch.full((1, 2, 3), 3.0)
    bank.update(["ds/a"], first)
    torch.testing.assert_close(bank.get(["ds/a"]), first)
    bank.update(["ds/a"], second)
    torch.testing.assert_close(bank.get(["ds/a"]), 0.9 * first + 0.1 * second)
    assert bank.counts.tolist() == [2]


def test_repeated_class_in_a_batch_is_one_averaged_step() -> None:
    bank = MemoryBank(num_tokens=1, embed_dim=2, momentum=0.5)
    bank.update(["ds/a", "ds/b"], torch.zeros(2, 1, 2))
    bank.update(["ds/a", "ds/a", "ds/b"], torch.tensor([[[2.0, 2.0]], [[4.0, 4.0]], [[8.0, 8.0]]]))
    torch.testing.assert_close(bank.get(["ds/a", "ds/b"]), torch.tensor([[[1.5, 1.5]], [[4.0, 4.0]]]))
    assert bank.class_names == ["ds/a", "ds/b"]


def test_unknown_class_and_empty_bank_raise() -> None:
    bank = MemoryBank(num_tokens=1, embed_dim=1)
    with pytest.raises(RuntimeError, match="empty"):
        bank.get()
    bank.update(["ds/a"], torch.zeros(1, 1, 1))
    with pytest.raises(ValueError, match="ds/zzz"):
        bank.get(["ds/zzz"])
    with pytest.raises(ValueError, match="memory_momentum"):
        MemoryBank(num_tokens=1, embed_dim=1, momentum=1.0)


def test_bank_survives_save_and_weights_only_load(tmp_path) -> None:
    torch.manual_seed(0)
    net = build_iris_net(base_channels=4, num_query_tokens=2, num_heads=4)
    net.memory_bank.update(["ds/a", "ds/b"], torch.randn(2, *net.memory_bank.embeddings.shape[1:]))
    net.memory_bank.update(["ds/c"], torch.randn(1, *net.memory_bank.embeddings.shape[1:]))
    path = tmp_path / "model.pt"
    torch.save(net.state_dict(), path)

    fresh = build_iris_net(base_channels=4, num_query_tokens=2, num_heads=4)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.memory_bank.class_names == ["ds/a", "ds/b", "ds/c"]
    for name in ("embeddings", "counts"):
        torch.testing.assert_close(getattr(fresh.memory_bank, name), getattr(net.memory_bank, name))


def test_models_with_the_old_fifo_queue_still_load() -> None:
    """Models saved before 0.7.0 hold a queue buffer that nothing read: it is dropped on loading, strictly."""
    net = build_iris_net(base_channels=4, num_query_tokens=2, num_heads=4)
    net.memory_bank.update(["ds/a"], torch.randn(1, *net.memory_bank.embeddings.shape[1:]))
    state = net.state_dict()
    state["memory_bank.queue"] = torch.zeros(1, 64, *net.memory_bank.embeddings.shape[1:])
    fresh = build_iris_net(base_channels=4, num_query_tokens=2, num_heads=4)
    fresh.load_state_dict(state)
    assert "queue" not in dict(fresh.memory_bank.named_buffers())
    torch.testing.assert_close(fresh.memory_bank.embeddings, net.memory_bank.embeddings)


def test_bank_rows_stay_sorted_by_class_name() -> None:
    bank = MemoryBank(num_tokens=1, embed_dim=1)
    bank.update(["ds/c"], torch.full((1, 1, 1), 3.0))
    bank.update(["ds/a", "ds/b"], torch.tensor([[[1.0]], [[2.0]]]))
    assert bank.class_names == ["ds/a", "ds/b", "ds/c"]
    assert bank.get().flatten().tolist() == [1.0, 2.0, 3.0]
    assert bank.counts.tolist() == [1, 1, 1]


def test_reserved_classes_give_the_query_only_forward_its_channels(tmp_path) -> None:
    torch.manual_seed(0)
    kwargs = dict(base_channels=4, num_query_tokens=2, num_heads=2, channel_multipliers=(1, 2, 4))
    fresh = build_iris_net(**kwargs, memory_classes=["x/b", "x/a"]).eval()
    assert fresh.memory_bank.class_names == ["x/a", "x/b"]
    assert fresh(torch.rand(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)

    trained = build_iris_net(**kwargs)
    trained.memory_bank.update(["y/a", "y/b", "y/c"], torch.randn(3, *trained.memory_bank.embeddings.shape[1:]))
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert fresh.memory_bank.class_names == ["y/a", "y/b", "y/c"]
    assert fresh(torch.rand(1, 1, 16, 16, 16)).shape[1] == 3


def test_update_rows_skips_padding_and_matches_the_update_by_name() -> None:
    """The device-side update that training uses: rows of -1 (padded slots) are skipped, repeated rows averaged."""
    by_name, by_row = (MemoryBank(num_tokens=1, embed_dim=2, momentum=0.5) for _ in range(2))
    for bank in (by_name, by_row):
        bank.add_classes(["ds/a", "ds/b", "ds/c"])
    first, second = torch.tensor([[[2.0, 2.0]], [[4.0, 0.0]]]), torch.tensor([[[6.0, 2.0]], [[9.0, 9.0]], [[0.0, 4.0]]])
    by_name.update(["ds/a", "ds/c"], first)
    by_name.update(["ds/a", "ds/a"], second[[0, 2]])
    by_row.update_rows(torch.tensor([0, -1, 2]), torch.cat([first[:1], torch.full((1, 1, 2), 99.0), first[1:]]))
    by_row.update_rows(torch.tensor([0, -1, 0]), second)
    torch.testing.assert_close(by_row.embeddings, by_name.embeddings)
    assert by_row.counts.tolist() == by_name.counts.tolist() == [2, 0, 1]
    torch.testing.assert_close(by_row.embeddings[0], torch.tensor([[2.5, 2.5]]))  # 0.5 * (2, 2) + 0.5 * (3, 3)


def test_the_embedding_map_skips_rows_that_training_never_filled() -> None:
    net = build_iris_net(base_channels=4, num_query_tokens=2, num_heads=4)
    net.memory_bank.add_classes(["ds/a", "ds/b", "ds/c"])
    net.memory_bank.update(["ds/b"], torch.randn(1, *net.memory_bank.embeddings.shape[1:]))
    names, embeddings = memory_bank_embeddings(net.state_dict())
    assert names == ["ds/b"]
    torch.testing.assert_close(embeddings, net.memory_bank.embeddings[1:2].flatten(1))
