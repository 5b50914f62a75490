"""Model registry: image classifiers for small inputs, built by name.

Every model is a :class:`Classifier`: ``features(x)`` gives the penultimate
(pooled) features, ``classifier`` is the final linear layer, and
``forward(x) == classifier(features(x))``. Scoring reads embeddings through
``features``; distillation matches student features to them.

    model = build_model("resnet8", num_classes=10, in_channels=1, image_size=28)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from curate.errors import UserError
from curate.zoo import LibraryModel, is_library_name


class Classifier(nn.Module):
    """A body mapping images to an N x D feature vector, and a linear classifier on top."""

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.feature_dim = feature_dim
        self.classifier = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _pooled(trunk: nn.Module) -> nn.Sequential:
    return nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _scaled(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


class BasicBlock(nn.Module):
    """Post-activation residual block of the CIFAR ResNets (He et al. 2016), projection shortcut on change."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class WideBlock(nn.Module):
    """Pre-activation block of Wide ResNets (Zagoruyko & Komodakis 2016)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (stride == 1 and cin == cout) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


def _stages(block: Callable[[int, int, int], nn.Module], cin: int, widths: list[int], depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for stage, cout in enumerate(widths):
        for i in range(depth):
            layers.append(block(cin, cout, 2 if (stage > 0 and i == 0) else 1))
            cin = cout
    return nn.Sequential(*layers)


def cifar_resnet(depth: int, num_classes: int, in_channels: int, width: float = 1.0) -> Classifier:
    if (depth - 2) % 6:
        raise UserError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    widths = [_scaled(c, width) for c in (16, 32, 64)]
    trunk = nn.Sequential(
        nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
        _stages(BasicBlock, widths[0], widths, (depth - 2) // 6),
    )
    return Classifier(_pooled(trunk), widths[-1], num_classes)


def wide_resnet(depth: int, widen: int, num_classes: int, in_channels: int, width: float = 1.0) -> Classifier:
    if (depth - 4) % 6:
        raise UserError(f"Wide ResNet depth must be 6n+4, got {depth}")
    stem = _scaled(16, width)
    widths = [_scaled(c * widen, width) for c in (16, 32, 64)]
    trunk = nn.Sequential(
        nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False),
        _stages(WideBlock, stem, widths, (depth - 4) // 6),
        nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True),
    )
    return Classifier(_pooled(trunk), widths[-1], num_classes)


def small_resnet18(num_classes: int, in_channels: int, width: float = 1.0) -> Classifier:
    """torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool, the usual form for 32x32 inputs."""
    if width != 1.0:
        raise UserError("resnet18 has no width option: use resnet8/20/56 or wrn for other widths")
    from torchvision.models import resnet18  # here: importing torchvision costs every command seconds

    net = resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.layer1, net.layer2, net.layer3, net.layer4)
    return Classifier(_pooled(trunk), 512, num_classes)


def small_mobilenetv2(num_classes: int, in_channels: int, width: float = 1.0) -> Classifier:
    """torchvision's MobileNetV2 with the CIFAR strides: stride-1 stem and first stride-2 stage, so 8x down."""
    from torchvision.models import MobileNetV2
    from torchvision.ops import Conv2dNormActivation

    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
               [6, 320, 1, 1]]
    net = MobileNetV2(num_classes=num_classes, width_mult=width, inverted_residual_setting=setting)
    first = net.features[0]
    stem_out = first[0].out_channels
    net.features[0] = Conv2dNormActivation(in_channels, stem_out, stride=1, norm_layer=nn.BatchNorm2d,
                                           activation_layer=nn.ReLU6)
    return Classifier(_pooled(net.features), net.last_channel, num_classes)


_SHUFFLE_CHANNELS = {0.5: [24, 48, 96, 192, 1024], 1.0: [24, 116, 232, 464, 1024],
                     1.5: [24, 176, 352, 704, 1024], 2.0: [24, 244, 488, 976, 2048]}


def small_shufflenetv2(num_classes: int, in_channels: int, width: float = 1.0) -> Classifier:
    """torchvision's ShuffleNetV2 with a stride-1 stem and no max-pool (8x down in all)."""
    if width not in _SHUFFLE_CHANNELS:
        raise UserError(f"shufflenetv2 width must be one of {sorted(_SHUFFLE_CHANNELS)}, got {width}")
    from torchvision.models import ShuffleNetV2
    from torchvision.ops import Conv2dNormActivation

    channels = _SHUFFLE_CHANNELS[width]
    net = ShuffleNetV2([4, 8, 4], channels, num_classes=num_classes)
    stem = Conv2dNormActivation(in_channels, channels[0], stride=1, norm_layer=nn.BatchNorm2d)
    trunk = nn.Sequential(stem, net.stage2, net.stage3, net.stage4, net.conv5)
    return Classifier(_pooled(trunk), channels[-1], num_classes)


def lenet5(num_classes: int, in_channels: int, image_size: int, width: float = 1.0) -> Classifier:
    """LeNet-5 with ReLU and max-pool; the first convolution pads so 28x28 and 32x32 both work."""
    c1, c2, f1, f2 = (_scaled(c, width) for c in (6, 16, 120, 84))
    side = (image_size // 2 - 4) // 2  # after conv(pad 2), pool, conv(5), pool
    if side < 1:
        raise UserError(f"lenet5 needs images of at least 12x12, got {image_size}")
    body = nn.Sequential(
        nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(c2 * side * side, f1), nn.ReLU(inplace=True), nn.Linear(f1, f2), nn.ReLU(inplace=True),
    )
    return Classifier(body, f2, num_classes)


def conv1(num_classes: int, in_channels: int, width: float = 1.0) -> Classifier:
    """One convolution over 4x4 patches with BatchNorm, pooled, and the linear classifier: a teacher that costs
    next to nothing, so a benchmark with it times the scoring pipeline's own work (reading, hooks, indicators,
    writing)."""
    channels = _scaled(8, width)
    trunk = nn.Sequential(nn.Conv2d(in_channels, channels, 4, stride=4, bias=False),
                          nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
    return Classifier(_pooled(trunk), channels, num_classes)


Builder = Callable[[int, int, int, float], Classifier]

MODELS: dict[str, Builder] = {
    "lenet5": lambda k, c, s, w: lenet5(k, c, s, w),
    "resnet8": lambda k, c, s, w: cifar_resnet(8, k, c, w),
    "resnet20": lambda k, c, s, w: cifar_resnet(20, k, c, w),
    "resnet56": lambda k, c, s, w: cifar_resnet(56, k, c, w),
    "resnet18": lambda k, c, s, w: small_resnet18(k, c, w),
    "wrn-16-2": lambda k, c, s, w: wide_resnet(16, 2, k, c, w),
    "wrn-40-2": lambda k, c, s, w: wide_resnet(40, 2, k, c, w),
    "mobilenetv2": lambda k, c, s, w: small_mobilenetv2(k, c, w),
    "shufflenetv2": lambda k, c, s, w: small_shufflenetv2(k, c, w),
    "conv1": lambda k, c, s, w: conv1(k, c, w),
}


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                width: float = 1.0) -> nn.Module:
    """Build architecture ``name``; ``width`` scales channel counts (0.5 gives a half-width student). A library
    name (``torchvision:mobilenet_v3_small``, ``timm:resnet10t``) builds that library's model, randomly
    initialised (curate/zoo.py)."""
    if is_library_name(name):
        if width != 1.0:
            raise UserError(f"--width applies to this project's models, not to {name}: choose a smaller library model")
        return LibraryModel.parse(name).build(num_classes)
    if name not in MODELS:
        raise UserError(f"unknown architecture {name!r}: choose one of {', '.join(MODELS)}, or a library model "
                        "such as torchvision:mobilenet_v3_small or timm:resnet10t")
    if num_classes < 2:
        raise UserError(f"num_classes must be at least 2, got {num_classes}")
    return MODELS[name](num_classes, in_channels, image_size, width)


def channels_last_is_safe(model: nn.Module, device: torch.device) -> bool:
    """Whether channels-last may be used for ``model`` on ``device``.

    oneDNN's AVX2 1x1 convolution with stride 2 writes past its workspace in channels-last when it has
    fewer than 8 input channels (uxlfoundation/oneDNN#6035): with torch 2.14.1 on this CPU a half-width
    resnet8's 4-channel shortcut hangs backward with two threads and corrupts the heap with one. Such
    models run in the default layout on the CPU.
    """
    if device.type != "cpu":
        return True
    return not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels < 8
                   for m in model.modules())


def final_linear(model: nn.Module) -> nn.Linear | None:
    """The layer that maps penultimate features to logits: ``model.classifier`` or the last nn.Linear."""
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Linear):
        return classifier
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None
