"""IrisNet: shapes, adjoint foreground pooling, gradients, class isolation and permutation, memory-bank forward,
overfitting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scripts.networks import build_iris_net, extra_state
from scripts.networks.task_encoder import foreground_pooling, upsampling_adjoint
from scripts.segmentation.losses import DiceBCELoss
from scripts.training.optimizers import Lamb

PATCH = (32, 32, 32)


def tiny_net(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    options = {"base_channels": 4, "num_query_tokens": 3, "num_heads": 4}
    options.update(overrides)
    return build_iris_net(**options)


def random_episode(batch: int, shots: int, classes: int, size=PATCH, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    support = torch.randn(batch, shots, 1, *size, generator=generator)
    masks = (torch.rand(batch, shots, classes, *size, generator=generator) > 0.8).float()
    query = torch.randn(batch, 1, *size, generator=generator)
    return support, masks, query


@pytest.mark.parametrize("classes", [1, 2, 3, 4])
@pytest.mark.parametrize("shots", [1, 2, 3])
def test_shapes_for_classes_and_shots(classes: int, shots: int) -> None:
    net = tiny_net().eval()
    support, masks, query = random_episode(2, shots, classes)
    with torch.no_grad():
        embeddings = net.encode_support(support, masks)
        logits = net(query, embeddings)
    assert net.token_shape == (1 + 3 + 4, 4 * 10)  # T_f, 3 context tokens, a prototype for each of 4 finer stages
    assert embeddings.shape == (2, classes, *net.token_shape)
    assert logits.shape == (2, classes, *PATCH)


def test_stage_prototypes_are_the_mask_weighted_means_of_the_stage_features() -> None:
    net = tiny_net().eval()
    support, masks, _ = random_episode(1, 1, 2)
    with torch.no_grad():
        embeddings = net.encode_support(support, masks)[0]  # K x T x C
        features = net.encoder(support[:, 0])
        stages = net.stages(support[:, 0], features)
    torch.testing.assert_close(stages[0][:, :1], support[:, 0])  # the image intensities join the finest features
    for stage, feature in enumerate(stages):
        prototype = embeddings[:, 4 + stage]  # after T_f and the 3 context tokens
        width = feature.shape[1]
        torch.testing.assert_close(prototype[:, :width], foreground_pooling(feature, masks[:, 0])[0])
        assert torch.count_nonzero(prototype[:, width:]) == 0


def test_kshot_embeddings_are_the_mean_of_single_shots() -> None:
    net = tiny_net().eval()
    support, masks, _ = random_episode(1, 3, 2)
    with torch.no_grad():
        joint = net.encode_support(support, masks)
        single = [net.encode_support(support[:, s : s + 1], masks[:, s : s + 1]) for s in range(3)]
    torch.testing.assert_close(joint, torch.stack(single).mean(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("low, full", [((2, 2, 2), (32, 32, 32)), ((3, 5, 4), (40, 72, 61)), ((1, 4, 4), (1, 64, 64))])
def test_adjoint_foreground_pooling_equals_upsample_then_pool(low, full) -> None:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 6, *low, generator=generator)
    masks = (torch.rand(2, 3, *full, generator=generator) > 0.6).float()
    upsampled = F.interpolate(features, size=full, mode="trilinear", align_corners=False)
    explicit = torch.einsum("nkdhw,ncdhw->nkc", masks, upsampled) / masks.flatten(2).sum(-1, keepdim=True)
    torch.testing.assert_close(foreground_pooling(features, masks), explicit, atol=1e-5, rtol=1e-5)
    # the adjoint identity itself: <up(F), M> == <F, up^T(M)>
    lhs = (upsampled[:, :1] * masks[:, :1]).sum()
    rhs = (features[:, :1] * upsampling_adjoint(masks[:, :1], low)).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-3, rtol=1e-5)


def test_empty_support_mask_gives_zero_foreground_token() -> None:
    features = torch.randn(1, 4, 2, 2, 2)
    assert torch.count_nonzero(foreground_pooling(features, torch.zeros(1, 2, 32, 32, 32))) == 0


def test_gradients_reach_every_parameter() -> None:
    net = tiny_net()
    support, masks, query = random_episode(2, 1, 2)
    target = (torch.rand(2, 2, *PATCH) > 0.8).float()
    logits = net(query, net.encode_support(support, masks))
    DiceBCELoss()(logits, target).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_a_class_decodes_the_same_alone_or_with_other_classes() -> None:
    net = tiny_net().eval()
    support, masks, query = random_episode(2, 1, 4)
    with torch.no_grad():
        embeddings = net.encode_support(support, masks)
        together = net(query, embeddings)
        alone = torch.cat([net(query, embeddings[:, [k]]) for k in range(4)], dim=1)
        embeddings[:, 3] = torch.randn_like(embeddings[:, 3]) * 10  # another class, even a wild one, changes nothing
        changed = net(query, embeddings)
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(changed[:, :3], together[:, :3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed[:, 3], together[:, 3])


def test_permuting_the_support_classes_permutes_the_logits() -> None:
    net = tiny_net().eval()
    support, masks, query = random_episode(1, 2, 4, seed=5)
    order = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        logits = net(query, net.encode_support(support, masks))
        permuted = net(query, net.encode_support(support, masks[:, :, order]))
    torch.testing.assert_close(permuted, logits[:, order], atol=1e-5, rtol=1e-5)


def test_plain_forward_uses_the_memory_bank() -> None:
    net = tiny_net().eval()
    support, masks, query = random_episode(1, 1, 2)
    with pytest.raises(RuntimeError, match="memory bank is empty"):
        net(query)
    with torch.no_grad():
        embeddings = net.encode_support(support, masks)
        net.memory_bank.update(["demo/a", "demo/b"], embeddings[0])
        torch.testing.assert_close(net(query), net(query, embeddings))
    with pytest.raises(RuntimeError, match="no memory bank"):
        tiny_net(use_memory_bank=False)(query)


def test_single_slice_input_keeps_its_shape() -> None:
    net = tiny_net().eval()
    support, masks, query = random_episode(1, 1, 2, size=(1, 32, 32))
    with torch.no_grad():
        logits = net(query, net.encode_support(support, masks))
    assert logits.shape == (1, 2, 1, 32, 32)


def test_overfitting_one_episode_drives_the_loss_down() -> None:
    net = tiny_net()
    support, _, query = random_episode(1, 1, 2, seed=3)
    grid = torch.stack(torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij"))

    def ball(centre: tuple[int, int, int], radius: float) -> torch.Tensor:
        return ((grid - torch.tensor(centre)[:, None, None, None]) ** 2).sum(0) < radius**2

    masks = torch.stack([ball((10, 10, 10), 6), ball((22, 20, 18), 5)]).float()  # K x D x H x W
    support_masks, target = masks[None, None], masks[None]
    loss_fn = DiceBCELoss()
    optimizer = Lamb(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = loss_fn(net(query, net.encode_support(support, support_masks)), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_support_shapes_raise_a_clear_error() -> None:
    net = tiny_net()
    with pytest.raises(ValueError, match="encode_support expects"):
        net.encode_support(torch.zeros(1, 1, *PATCH), torch.zeros(1, 1, 1, *PATCH))


def test_the_state_dict_records_the_settings_and_older_models_still_load() -> None:
    settings = {"patch_size": [32, 32, 32], "target_spacing": None}
    net = build_iris_net(
        base_channels=4, num_heads=2, num_query_tokens=3, channel_multipliers=(1, 2, 4, 8), settings=settings
    )
    state = net.state_dict()
    assert all(isinstance(value, torch.Tensor) for value in state.values())  # as MONAI's copy_model_state needs
    saved = extra_state.decode(state["_extra_state"])
    assert saved["network"]["base_channels"] == 4 and saved["patch_size"] == [32] * 3
    fresh = build_iris_net(base_channels=4, num_heads=2, num_query_tokens=3, channel_multipliers=(1, 2, 4, 8))
    fresh.load_state_dict(state)
    assert fresh.settings == net.settings
    state["_extra_state"] = saved  # as saved by bundle 0.5.0-0.7.8: plain types
    state["memory_bank._extra_state"] = extra_state.decode(state["memory_bank._extra_state"])
    fresh = build_iris_net(base_channels=4, num_heads=2, num_query_tokens=3, channel_multipliers=(1, 2, 4, 8))
    fresh.load_state_dict(state)
    assert fresh.settings == net.settings
    del state["_extra_state"]  # as saved before bundle 0.5.0
    fresh.load_state_dict(state)  # strict
    assert fresh.settings == {}
