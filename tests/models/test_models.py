"""Every registered model: output shapes for all sizes imgrec meets, gradients, architecture, parameter counts.

The torchvision backbones (resnet18 ... convnext_tiny) have their own, lighter checks in test_transfer.py: a full
sweep of sizes and class counts through VGG-16's 138 M parameters would take minutes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from imgrec.errors import UsageError
from imgrec.models.registry import MODELS, build_model, count_parameters

# (channels, (H, W)): grey 28x28 (MNIST), colour 32x32 (CIFAR), 8x8 digits, odd and non-square sizes, tiny ones
SHAPES = [
    (1, (28, 28)),
    (3, (32, 32)),
    (1, (8, 8)),
    (1, (20, 20)),
    (3, (20, 20)),
    (3, (64, 48)),
    (1, (48, 64)),
    (3, (8, 8)),
    (1, (5, 7)),
    (3, (4, 4)),
]


# the models imgrec defines itself (not the torchvision backbones)
OWN_MODELS = [name for name, entry in MODELS.items() if not entry.pretrained]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("name", OWN_MODELS)
@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("num_classes", [2, 10, 37])
def test_forward_shape(name: str, channels: int, size: tuple[int, int], num_classes: int) -> None:
    model = build_model(name, num_classes, channels, size)
    x = torch.randn(3, channels, *size)
    logits = model(x)
    assert logits.shape == (3, num_classes)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", OWN_MODELS)
@pytest.mark.parametrize("channels,size", [(1, (28, 28)), (3, (32, 32)), (1, (8, 8)), (3, (64, 48))])
def test_forward_channels_last_matches(name: str, channels: int, size: tuple[int, int]) -> None:
    """The trainer feeds channels-last batches; the model must accept them and give the same logits."""
    model = build_model(name, 10, channels, size).eval()
    x = torch.randn(4, channels, *size)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    got = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", OWN_MODELS)
@pytest.mark.parametrize("channels,size", [(1, (28, 28)), (3, (32, 32)), (1, (8, 8)), (3, (20, 20))])
def test_backward_reaches_every_parameter(name: str, channels: int, size: tuple[int, int]) -> None:
    model = build_model(name, 5, channels, size).train()
    x = torch.randn(6, channels, *size)
    y = torch.arange(6) % 5
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for pname, p in model.named_parameters():
        if not p.requires_grad:  # frozen by design (a whitening stem, BatchNorm scales fixed at 1)
            assert p.grad is None, pname
            continue
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


@pytest.mark.parametrize("name", OWN_MODELS)
def test_one_step_lowers_the_loss(name: str) -> None:
    model = build_model(name, 3, 1, (8, 8)).eval()  # eval: no dropout noise between the two losses
    x = torch.randn(12, 1, 8, 8)
    y = torch.arange(12) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = nn.functional.cross_entropy(model(x), y)
    before.backward()
    opt.step()
    after = nn.functional.cross_entropy(model(x), y)
    assert after < before


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_lenet_grey_architecture() -> None:
    model = build_model("lenet", 10, 1, (28, 28))
    convs = _convs(model)
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 20, (5, 5)), (20, 50, (5, 5))]
    assert all(c.padding == (0, 0) for c in convs)  # 28 -> 24 -> 12 -> 8 -> 4, as in the tutorial
    linears = _linears(model)
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(50 * 4 * 4, 500), (500, 10)]
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1 and dropouts[0].p == 0.5
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2


def test_lenet_colour_architecture() -> None:
    model = build_model("lenet", 10, 3, (32, 32))
    convs = _convs(model)
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 16, (3, 3)), (16, 32, (3, 3)), (32, 64, (3, 3))
    ]
    assert all(c.padding == (1, 1) for c in convs)  # 32 -> 16 -> 8 -> 4 after three pools
    linears = _linears(model)
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(64 * 4 * 4, 500), (500, 10)]
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1 and dropouts[0].p == 0.5


@pytest.mark.parametrize("shape", [(100, 500), (3, 7), (1,)])
def test_lenet_dropout_keeps_half_the_values_doubled(shape: tuple[int, ...]) -> None:
    from imgrec.models.lenet import Dropout

    drop = Dropout(0.5).train()
    x = torch.rand(*shape) + 0.5  # no zeros: a zero in the output means dropped
    x.requires_grad_(True)
    out = drop(x)
    kept = out != 0
    torch.testing.assert_close(out[kept], (x * 2)[kept])
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * 2)  # the gradient passes only where the value was kept
    if x.numel() >= 1000:
        assert abs(kept.float().mean().item() - 0.5) < 0.01  # 50,000 fair coins: within 0.01 by 4.5 sigma
        # the coins are independent of their position: each column and each row keeps about half
        assert (kept.float().mean(0) - 0.5).abs().max() < 0.25 and (kept.float().mean(1) - 0.5).abs().max() < 0.1
    torch.manual_seed(5)
    first = drop(x.detach())
    torch.manual_seed(5)
    assert torch.equal(drop(x.detach()), first)  # reproducible under a seed
    with torch.no_grad():
        assert torch.equal(drop.eval()(x), x)


def test_lenet_dropout_with_another_rate_is_torchs() -> None:
    from imgrec.models.lenet import Dropout

    x = torch.rand(50, 40) + 0.5
    torch.manual_seed(1)
    expected = nn.functional.dropout(x, 0.3, training=True)
    torch.manual_seed(1)
    assert torch.equal(Dropout(0.3).train()(x), expected)


def test_lenet_dropout_only_in_training() -> None:
    model = build_model("lenet", 10, 1, (28, 28))
    x = torch.randn(8, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("channels,size", [(1, (28, 28)), (3, (32, 32)), (3, (64, 48))])
def test_mlp_architecture(channels: int, size: tuple[int, int]) -> None:
    model = build_model("mlp", 7, channels, size)
    assert not _convs(model)
    linears = _linears(model)
    flat = channels * size[0] * size[1]
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(flat, 125), (125, 65), (65, 7)]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 2


# Parameter counts by hand: weights + biases of every layer.
LENET_GREY_28 = (1 * 20 * 25 + 20) + (20 * 50 * 25 + 50) + (50 * 4 * 4 * 500 + 500) + (500 * 10 + 10)
LENET_COLOUR_32 = (3 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + (64 * 4 * 4 * 500 + 500) + (500 * 10 + 10)
# 8x8 digits: "same" padding keeps 8x8 -> pool 4x4 -> conv (pad 2) 4x4 -> pool 2x2: 50 * 2 * 2 features
LENET_DIGITS_8 = (1 * 20 * 25 + 20) + (20 * 50 * 25 + 50) + (50 * 2 * 2 * 500 + 500) + (500 * 10 + 10)
# 20x20 grey: 20 -> 16 -> 8 -> 4 -> 2
LENET_GREY_20_37 = (1 * 20 * 25 + 20) + (20 * 50 * 25 + 50) + (50 * 2 * 2 * 500 + 500) + (500 * 37 + 37)


@pytest.mark.parametrize(
    "name,num_classes,channels,size,expected",
    [
        ("mlp", 10, 1, (28, 28), 784 * 125 + 125 + 125 * 65 + 65 + 65 * 10 + 10),
        ("mlp", 10, 3, (32, 32), 3072 * 125 + 125 + 125 * 65 + 65 + 65 * 10 + 10),
        ("mlp", 2, 1, (8, 8), 64 * 125 + 125 + 125 * 65 + 65 + 65 * 2 + 2),
        ("mlp", 37, 3, (64, 48), 3 * 64 * 48 * 125 + 125 + 125 * 65 + 65 + 65 * 37 + 37),
        ("lenet", 10, 1, (28, 28), LENET_GREY_28),
        ("lenet", 10, 3, (32, 32), LENET_COLOUR_32),
        ("lenet", 10, 1, (8, 8), LENET_DIGITS_8),
        ("lenet", 37, 1, (20, 20), LENET_GREY_20_37),
    ],
)
def test_parameter_counts(name: str, num_classes: int, channels: int, size: tuple[int, int], expected: int) -> None:
    model = build_model(name, num_classes, channels, size)
    assert count_parameters(model) == expected
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_known_counts_match_the_tutorial_numbers() -> None:
    assert LENET_GREY_28 == 431_080
    assert LENET_COLOUR_32 == 541_094
    assert count_parameters(build_model("mlp", 10, 1, (28, 28))) == 106_975


def test_count_parameters_skips_frozen() -> None:
    model = build_model("mlp", 10, 1, (28, 28))
    first = _linears(model)[0]
    for p in first.parameters():
        p.requires_grad_(False)
    assert count_parameters(model) == 106_975 - (784 * 125 + 125)


def test_builders_are_deterministic_under_a_seed() -> None:
    for name in OWN_MODELS:
        torch.manual_seed(3)
        a = build_model(name, 10, 3, (32, 32)).state_dict()
        torch.manual_seed(3)
        b = build_model(name, 10, 3, (32, 32)).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_registry_has_the_tutorial_models_with_descriptions() -> None:
    assert {"mlp", "lenet"} <= set(MODELS)
    for entry in MODELS.values():
        assert entry.description


def test_image_size_may_be_a_list() -> None:
    """Weights files store image_size as a list; building from it must work."""
    model = build_model("lenet", 4, 1, [28, 28])
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 4)


def test_unknown_model_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"unknown model 'resnet9000'.*mlp.*lenet"):
        build_model("resnet9000", 10, 1, (28, 28))
    assert UsageError.exit_code == 2


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("num_classes", [1, 0, -3])
def test_too_few_classes_is_a_usage_error(name: str, num_classes: int) -> None:
    with pytest.raises(UsageError, match="at least 2 classes"):
        build_model(name, num_classes, 1, (28, 28))


@pytest.mark.parametrize("channels,size", [(1, (28, 28)), (3, (32, 32)), (1, (8, 8))])
def test_lenet_pools_before_its_relu_and_computes_what_relu_then_pool_does(channels: int, size: tuple[int, int]) -> None:
    """max-pool then ReLU is the tutorial's ReLU then max-pool on a quarter of the values: the same logits and the
    same gradients, with the weights under the same names."""
    torch.manual_seed(0)
    model = build_model("lenet", 5, channels, size).eval()  # eval: no dropout draws to tell the two apart
    reference = copy.deepcopy(model)
    layers = list(reference.features)
    for i in range(len(layers) - 1):  # swap each (MaxPool2d, ReLU) pair back into the tutorial's order
        if isinstance(layers[i], nn.MaxPool2d) and isinstance(layers[i + 1], nn.ReLU):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    reference.features = nn.Sequential(*layers)
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert any(isinstance(m, nn.MaxPool2d) for m in model.features)
    x = torch.randn(6, channels, *size)
    for net in (model, reference):
        net(x).square().sum().backward()
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
