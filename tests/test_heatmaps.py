"""Heatmap methods checked against their math on small networks whose answers are known."""

import numpy as np
import pytest
import torch
from camlabel.workers.heatmaps import (
    METHODS,
    HeatmapError,
    class_maps,
    compute_heatmaps,
    eigen_projection,
    leading_eigenpair,
    leading_eigenpair_by_squaring,
)
from torch import nn


class GapNet(nn.Module):
    """conv -> ReLU -> conv -> ReLU(inplace) -> GAP -> linear: the architecture CAM was defined for."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class RedDetector(nn.Module):
    """Class 1's score is the mean of a channel that fires on red pixels; class 0 is constant."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.zero_()
            self.features[0].weight[0, 0] = 1.0
            self.features[0].weight[0, 1:] = -1.0
            self.features[0].bias.zero_()
            self.features[0].bias[1] = 1.0
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.0, 0.0], [20.0, 0.0]]))
            self.fc.bias.copy_(torch.tensor([0.5, 0.0]))

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def planted(size: int = 32, top: int = 8, left: int = 20, side: int = 8) -> torch.Tensor:
    x = torch.zeros(1, 3, size, size)
    x[0, 0, top : top + side, left : left + side] = 1.0
    return x


@pytest.fixture
def gapnet():
    torch.manual_seed(0)
    return GapNet().eval()


def test_cam_and_gradcam_agree_up_to_positive_scale_on_gap_linear(gapnet):
    x = torch.randn(4, 3, 32, 32)
    targets = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 2]])
    cam = compute_heatmaps(gapnet, x, target_layer="features", method="cam", targets=targets).maps
    grad = compute_heatmaps(gapnet, x, target_layer="features", method="gradcam", targets=targets).maps
    for a, b in zip(cam.flatten(0, 1), grad.flatten(0, 1), strict=True):
        if a.max() > 0:
            assert np.corrcoef(a.flatten(), b.flatten())[0, 1] > 0.999


def test_cam_equals_weighted_sum_of_feature_maps(gapnet):
    x = torch.randn(2, 3, 32, 32)
    heat = compute_heatmaps(gapnet, x, target_layer="features", method="cam", targets=torch.tensor([[3], [1]]))
    f = gapnet.features(x)
    for i, c in enumerate([3, 1]):
        expected = torch.einsum("c,chw->hw", gapnet.fc.weight[c], f[i]).clamp(min=0)
        expected = expected / expected.max()
        torch.testing.assert_close(heat.maps[i, 0], expected, atol=1e-5, rtol=1e-4)


class ReluHeadNet(nn.Module):
    """The head reads the GAP of the ReLU of the target layer's output, as DenseNet's does."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.features(x).relu().mean((2, 3)))


def test_cam_checks_the_head_on_a_layers_first_cam_only_and_keeps_what_it_found(monkeypatch):
    torch.manual_seed(0)
    model = ReluHeadNet().eval()
    checks = []
    real_allclose = torch.allclose
    monkeypatch.setattr(torch, "allclose", lambda *a, **kw: checks.append(1) or real_allclose(*a, **kw))
    for call in range(2):
        x = torch.randn(2, 3, 16, 16)
        heat = compute_heatmaps(model, x, target_layer="features", method="cam", targets=torch.tensor([[2], [0]]))
        if call == 0:
            assert checks == [1, 1]  # the layer's own GAP does not match, its ReLU's does
        else:
            assert checks == [1, 1], "the second pass compared again (a host sync per pass on a GPU)"
        f = model.features(x).relu()  # the ReLU'd activations, every time
        for i, c in enumerate([2, 0]):
            expected = torch.einsum("c,chw->hw", model.fc.weight[c], f[i]).clamp(min=0)
            torch.testing.assert_close(heat.maps[i, 0], expected / expected.max(), atol=1e-5, rtol=1e-4)


def test_every_class_map_of_one_pass_gives_what_compute_heatmaps_gives_for_any_targets(gapnet):
    x = torch.randn(3, 3, 32, 32)
    maps = class_maps(gapnet, x, target_layer="features")
    for targets in (torch.tensor([[0, 1], [2, -1], [4, 3]]), torch.tensor([[3], [1], [0]])):
        got, want = maps.heatmaps(targets), compute_heatmaps(gapnet, x, target_layer="features", targets=targets)
        torch.testing.assert_close(got.maps, want.maps)
        assert torch.equal(got.classes, want.classes)
        torch.testing.assert_close(got.scores, want.scores)
    assert (got.maps <= 1).all() and torch.equal(got.probs, want.probs)


def test_one_pass_gives_cam_and_layercam_at_an_earlier_layer_as_two_passes_would(gapnet):
    x = torch.randn(3, 3, 32, 32)
    targets = torch.tensor([[0, 1], [2, -1], [4, 3]])
    passes = []
    handle = gapnet.register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        both = compute_heatmaps(gapnet, x, target_layer="features", targets=targets, detail_layer="features.1")
    finally:
        handle.remove()
    assert len(passes) == 1
    cam = compute_heatmaps(gapnet, x, target_layer="features", targets=targets)
    layercam = compute_heatmaps(gapnet, x, target_layer="features.1", method="layercam", targets=targets)
    torch.testing.assert_close(both.maps, cam.maps)
    torch.testing.assert_close(both.detail, layercam.maps)
    assert both.detail.shape[-1] == 2 * both.maps.shape[-1]  # the layer before the stride-2 conv
    assert (both.detail[1, 1] == 0).all() and both.detail[0, 1].max() == 1  # padding stays empty
    assert all(p.grad is None for p in gapnet.parameters())
    with pytest.raises(HeatmapError, match="detail layer comes with method 'cam' only"):
        compute_heatmaps(gapnet, x, target_layer="features", method="gradcam", detail_layer="features.1")


def test_the_class_maps_pass_gives_the_detail_map_of_classes_chosen_after_it(gapnet):
    """The look's pass keeps its graph down to the detail layer: the classes its crops name get their LayerCAM
    there with no second forward pass, the same maps a pass of their own gives."""
    x = torch.randn(3, 3, 32, 32)
    targets = torch.tensor([[0, 1], [2, -1], [4, 3]])
    kept = class_maps(gapnet, x, target_layer="features", detail_layer="features.1")
    plain = class_maps(gapnet, x, target_layer="features")
    assert torch.equal(kept.cams, plain.cams) and torch.equal(kept.probs, plain.probs)
    passes = []
    handle = gapnet.register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        detail = kept.detail(targets)
    finally:
        handle.remove()
    assert not passes
    layercam = compute_heatmaps(gapnet, x, target_layer="features.1", method="layercam", targets=targets)
    torch.testing.assert_close(detail, layercam.maps)
    assert (detail[1, 1] == 0).all() and detail[0, 1].max() == 1
    assert all(p.grad is None and p.requires_grad for p in gapnet.parameters())  # no gradient kept, flags restored
    with pytest.raises(HeatmapError, match="no graph kept"):
        kept.detail(targets)  # the graph is gone
    with pytest.raises(HeatmapError, match="no graph kept"):
        plain.detail(targets)


def test_the_proposals_find_a_small_object_the_whole_images_softmax_buries():
    x = planted(side=2)  # 4 red pixels of 1024: class 1's whole-image logit 20 x 4/1024 < class 0's bias 0.5
    maps = class_maps(RedDetector().eval(), x, target_layer="features")
    assert maps.probs[0].argmax().item() == 0
    assert maps.proposals(torch.tensor([[32, 32]]), 32, 1)[0].tolist() == [1, 0]  # the red's class peaks highest
    # cells outside the image's valid region (padding) are not searched: the red lies in columns 20-21
    assert maps.proposals(torch.tensor([[32, 16]]), 32, 1)[0].tolist() == [0, -1]


def test_an_object_beside_one_with_near_synonyms_is_still_proposed():
    # classes 0 and 1 are near-synonyms of the red object (the same weights), class 2 names the blue one; where the
    # blue is, class 2 is the most probable class (0.45 against 0.27 each), yet both synonyms peak higher (0.5)
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, 0, 0, 0] = model[0].weight[1, 2, 0, 0] = 1.0
        model[0].bias.zero_()
        model[4].weight.copy_(torch.tensor([[10.0, 0.0], [10.0, 0.0], [0.0, 0.5]]))
        model[4].bias.zero_()
    x = torch.zeros(1, 3, 8, 8)
    x[0, 0, :, :6] = 1.0  # red: six columns
    x[0, 2, :, 6:] = 1.0  # blue: two
    maps = class_maps(model.eval(), x, target_layer="1")
    valid = torch.tensor([[8, 8]])
    two = maps.proposals(valid, 8, 2)[0].tolist()
    assert sorted(two[:2]) == [0, 1] and two[2] == 2  # the blue object's class, from its own cells
    assert sorted(maps.proposals(valid, 8, 3)[0].tolist()[:3]) == [0, 1, 2]
    assert maps.proposals(valid, 8, 3)[0, 3] == -1  # no class outside the three wins a cell
    # the padding's cells are no one's: with the blue columns outside the image, nothing more is proposed
    assert maps.proposals(torch.tensor([[8, 6]]), 8, 2)[0, 2] == -1


def test_cam_refuses_a_head_that_is_not_gap_linear():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 8), nn.ReLU(),
                          nn.Linear(8, 3)).eval()
    with pytest.raises(HeatmapError, match="gradcam"):
        compute_heatmaps(model, torch.randn(1, 3, 16, 16), target_layer="1", method="cam")
    maps = compute_heatmaps(model, torch.randn(1, 3, 16, 16), target_layer="1", method="gradcam").maps
    assert maps.shape == (1, 1, 14, 14)


def test_eigencam_stays_float32_under_bfloat16_autocast(gapnet):
    # the Gram product must not run in bfloat16 (CUDA's eigh refuses it; CPU's would get it rounded)
    acts = gapnet.features(torch.randn(2, 3, 32, 32)).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = eigen_projection(acts)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, eigen_projection(acts), rtol=1e-5, atol=1e-5)


def test_eigencam_is_the_first_principal_component_from_numpy(gapnet):
    x = torch.randn(3, 3, 32, 32)
    acts = gapnet.features(x).detach()
    ours = eigen_projection(acts)
    for i in range(3):
        m = acts[i].flatten(1).T.numpy().astype(np.float64)  # [hw, C]
        m = m - m.mean(0)
        _, _, vt = np.linalg.svd(m, full_matrices=False)
        expected = m @ vt[0]
        total = acts[i].sum(0).flatten().numpy()
        if np.dot(expected, total - total.mean()) < 0:
            expected = -expected
        np.testing.assert_allclose(ours[i].flatten().numpy(), expected, rtol=1e-3, atol=1e-4)
    heat = compute_heatmaps(gapnet, x, target_layer="features", method="eigencam", top_k=2)
    expected_maps = ours.clamp(min=0) / ours.flatten(1).amax(1).clamp(min=1e-7)[:, None, None]
    torch.testing.assert_close(heat.maps[:, 0], expected_maps, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(heat.maps[:, 0], heat.maps[:, 1])  # class-agnostic


def test_the_squared_gram_gives_eigh_s_leading_eigenpair():
    """CUDA's path (batched products) against the CPU's (LAPACK): on centred random activations, on a
    spectrum whose top two eigenvalues are 0.99 apart, and on an all-zero map (no NaN)."""
    torch.manual_seed(0)
    x = torch.randn(4, 49, 64)
    x = x - x.mean(1, keepdim=True)
    basis = torch.linalg.qr(torch.randn(3, 30, 30)).Q
    spectrum = torch.cat([torch.tensor([1.0, 0.99]), torch.rand(28) * 0.9])
    for gram in (x @ x.transpose(1, 2), basis @ torch.diag_embed(spectrum.expand(3, -1)) @ basis.transpose(1, 2)):
        vector, value = leading_eigenpair_by_squaring(gram)
        expected_vector, expected_value = leading_eigenpair(gram)
        torch.testing.assert_close(value, expected_value, rtol=1e-4, atol=0)
        torch.testing.assert_close(vector.abs(), expected_vector.abs(), rtol=0, atol=1e-3)
        assert ((vector * expected_vector).sum(1).abs() > 1 - 1e-5).all()
    vector, value = leading_eigenpair_by_squaring(torch.zeros(1, 5, 5))
    assert value.item() == 0 and not vector.isnan().any()


@pytest.mark.parametrize("method", ["occlusion", "scorecam", "cam", "gradcam", "guided"])
def test_map_peaks_on_the_planted_feature(method):
    model = RedDetector().eval()
    x = planted()
    heat = compute_heatmaps(model, x, target_layer="features", method=method, targets=torch.tensor([[1]]),
                            patch=8, stride=4)
    m = heat.maps[0, 0]
    y, xx = divmod(int(m.argmax()), m.shape[1])
    cy, cx = (y + 0.5) / m.shape[0] * 32, (xx + 0.5) / m.shape[1] * 32
    assert 6 <= cy <= 18 and 18 <= cx <= 30, (method, cy, cx)


def test_deconvnet_ignores_the_forward_mask_and_guided_backprop_keeps_it():
    model = RedDetector().eval()
    x = planted()
    kwargs = dict(target_layer="features", targets=torch.tensor([[1]]))
    deconv = compute_heatmaps(model, x, method="deconvnet", **kwargs).maps[0, 0]
    guided = compute_heatmaps(model, x, method="guided", **kwargs).maps[0, 0]
    # ReLU(signal) is passed back everywhere by deconvnet; guided backprop only where the unit fired
    assert torch.allclose(deconv, torch.ones_like(deconv))
    assert (guided[8:16, 20:28] == 1).all() and guided.sum() == 64


def test_occlusion_over_the_feature_drops_the_class_score():
    model = RedDetector().eval()
    x = planted()
    base = model(x).softmax(1)[0, 1]
    covered = x.clone()
    covered[..., 8:16, 20:28] = 0
    assert model(covered).softmax(1)[0, 1] < base - 0.2
    heat = compute_heatmaps(model, x, target_layer="features", method="occlusion", targets=torch.tensor([[1]]),
                            patch=8, stride=4)
    assert heat.maps[0, 0].max() == 1 and heat.maps[0, 0].min() == 0  # patches far from it change nothing


def test_occlusion_maps_tile_the_input_without_a_shift():
    # the planted feature spans rows 8-16 of 32: the occlusion map, read as cells that tile the input (as
    # every map is resampled), must centre on row 12 (maps indexed by patch corners put it at 11.4).
    # Rows only: its columns reach the last patch position, where fewer patches average.
    model = RedDetector().eval()
    heat = compute_heatmaps(model, planted(), target_layer="features", method="occlusion",
                            targets=torch.tensor([[1]]), patch=8, stride=4)
    m = heat.maps[0, 0]
    assert m.shape == (8, 8)  # cells of gcd(4, 8, 32) = 4 pixels
    centres = (torch.arange(8) + 0.5) * 4
    cy = float((m.sum(1) * centres).sum() / m.sum())
    assert abs(cy - 12) < 0.1, cy


@pytest.mark.parametrize("method", [m for m in METHODS if m != "scorecam"])
def test_a_batch_gives_the_same_maps_as_single_images(gapnet, method):
    x = torch.randn(3, 3, 32, 32)
    targets = torch.tensor([[1, 2], [0, -1], [4, 3]])
    batch = compute_heatmaps(gapnet, x, target_layer="features", method=method, targets=targets, patch=8, stride=8)
    for i in range(3):
        one = compute_heatmaps(gapnet, x[i : i + 1], target_layer="features", method=method,
                               targets=targets[i : i + 1], patch=8, stride=8)
        torch.testing.assert_close(batch.maps[i], one.maps[0], atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(batch.scores[i], one.scores[0], atol=1e-5, rtol=1e-4)
    assert batch.maps.min() >= 0 and batch.maps.max() <= 1
    assert (batch.maps[:2].flatten(2).amax(2) == torch.tensor([[1.0, 1.0], [1.0, 0.0]])).all()  # real maps,
    # each scaled to a max of 1, and none for the padded target (-1)


def test_top_k_targets_are_the_predicted_classes(gapnet):
    x = torch.randn(2, 3, 32, 32)
    heat = compute_heatmaps(gapnet, x, target_layer="features", method="gradcam", top_k=3)
    torch.testing.assert_close(heat.classes, gapnet(x).topk(3, 1).indices)
    torch.testing.assert_close(heat.scores, gapnet(x).softmax(1).topk(3, 1).values)


def test_model_is_left_as_found_even_when_a_call_raises(gapnet):
    gapnet.train()
    gapnet.features[0].weight.requires_grad_(False)
    with pytest.raises(HeatmapError):
        compute_heatmaps(gapnet, torch.randn(1, 3, 32, 32), target_layer="features", method="gradcam",
                         targets=torch.tensor([[99]]))

    class Boom(Exception):
        pass

    def explode(*_):
        raise Boom

    handle = gapnet.fc.register_forward_hook(explode)
    for method in ("gradcam", "guided", "eigencam"):
        with pytest.raises(Boom):
            compute_heatmaps(gapnet, torch.randn(1, 3, 32, 32), target_layer="features", method=method)
    handle.remove()
    for m in gapnet.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        assert m.training
    assert gapnet.features[3].inplace is True
    assert gapnet.features[0].weight.requires_grad is False
    assert gapnet.features[0].bias.requires_grad is True


def test_gradients_stop_at_the_target_layer(gapnet):
    compute_heatmaps(gapnet, torch.randn(2, 3, 32, 32), target_layer="features", method="gradcam++", top_k=2)
    assert all(p.grad is None for p in gapnet.parameters())


@pytest.mark.parametrize("bad", [5, -2])
def test_targets_outside_the_classes_fail_clearly(gapnet, bad):
    with pytest.raises(HeatmapError, match=r"\[0, 5\)"):
        compute_heatmaps(gapnet, torch.randn(2, 3, 32, 32), target_layer="features", targets=torch.tensor([[1], [bad]]))


def test_unknown_method_and_layer_fail_clearly(gapnet):
    with pytest.raises(HeatmapError, match="unknown method"):
        compute_heatmaps(gapnet, torch.randn(1, 3, 8, 8), target_layer="features", method="nope")
    with pytest.raises(HeatmapError, match="no layer 'layer9'"):
        compute_heatmaps(gapnet, torch.randn(1, 3, 8, 8), target_layer="layer9")


class SquareNet(nn.Module):
    """score_c = b_c + sum_k w_ck mean_ij(A_kij^2), with A the input itself: the gradient of class c at
    the target layer is G_k = w_ck A_k / 2 on a 2x2 map, so every weighting can be worked out by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, -0.5], [0.3, 0.2]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.features(x).pow(2).mean((2, 3)))


A = torch.tensor([[[[1.0, 2.0], [-1.0, 3.0]], [[2.0, -2.0], [1.0, 1.0]]]])  # [1, 2 channels, 2, 2]
G = torch.tensor([1.0, -0.5])[None, :, None, None] * A / 2  # d score_0 / dA


def by_formula(method: str) -> torch.Tensor:
    """Each paper's map for class 0, written out from A and G, before ReLU."""
    if method == "gradcam":  # Selvaraju et al.: channel weights = spatial mean of the gradients
        return (G.mean((2, 3), keepdim=True) * A).sum(1)
    if method == "gradcam++":  # Chattopadhay et al., exponential-score closed form
        alpha = G**2 / (2 * G**2 + A.sum((2, 3), keepdim=True) * G**3)
        return ((alpha * G.clamp(min=0)).sum((2, 3), keepdim=True) * A).sum(1)
    if method == "xgradcam":  # Fu et al.: sum(G A) / sum(A) per channel
        return ((G * A).sum((2, 3), keepdim=True) / A.sum((2, 3), keepdim=True) * A).sum(1)
    if method == "layercam":  # Jiang et al.: element-wise positive gradients times activations
        return (G.clamp(min=0) * A).sum(1)
    return (G * A).sum(1)  # hirescam, Draelos & Carin: element-wise gradients times activations


def test_gradcam_on_the_hand_worked_example():
    # alpha = mean(G_0) = 0.625, mean(G_1) = -0.125: 0.625 A_0 - 0.125 A_1 = [[0.375, 1.5], [-0.75, 1.75]]
    expected = torch.tensor([[0.375, 1.5], [0.0, 1.75]]) / 1.75
    maps = compute_heatmaps(SquareNet(), A, target_layer="features", method="gradcam", targets=[0]).maps
    torch.testing.assert_close(maps[0, 0], expected)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"])
def test_each_gradient_weighting_is_its_papers_formula(method):
    raw = by_formula(method)[0]
    assert raw.max() > 0 and raw.min() < raw.max()  # a real map, not one an all-zero answer would match
    maps = compute_heatmaps(SquareNet(), A, target_layer="features", method=method, targets=[0]).maps
    torch.testing.assert_close(maps[0, 0], raw.clamp(min=0) / raw.max(), atol=1e-5, rtol=1e-4)


def test_scorecam_passes_are_bounded_by_the_channels_that_fire_hardest(monkeypatch):
    """With a bound of one channel, only the channel that fires hardest gets a pass (plus the baseline),
    and its weight is what the unbounded call gives it; the other channel weighs 0."""
    from camlabel.workers import heatmaps

    model = RedDetector().eval()
    x = planted() * 2  # the red channel peaks at 2, the constant channel at 1
    calls = []
    model.register_forward_pre_hook(lambda _m, inputs: calls.append(len(inputs[0])))
    full = compute_heatmaps(model, x, target_layer="features", method="scorecam", targets=torch.tensor([[1]]))
    assert calls[1:] == [1, 2]  # the plain pass, the baseline, both channels in one chunk
    calls.clear()
    monkeypatch.setattr(heatmaps, "SCORECAM_CHANNELS", 1)
    bounded = compute_heatmaps(model, x, target_layer="features", method="scorecam", targets=torch.tensor([[1]]))
    assert calls[1:] == [1, 1]
    acts = model.features(x)[0]
    hardest = int(acts.flatten(1).amax(1).argmax())
    assert hardest == 0  # the red channel
    expected = acts[hardest] / acts[hardest].max()  # one channel: the map is its activation, scaled
    torch.testing.assert_close(bounded.maps[0, 0], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bounded.maps, full.maps)  # the dropped constant channel weighed 0 anyway
