"""Model registry. Pure torch; no torchvision (its PyPI wheel does not import beside the CPU torch).

| name       | input        | params (10 classes)                          |
|------------|--------------|----------------------------------------------|
| digits_cnn | 8x8x1        | 151,306                                      |
| convnet    | 32x32x3      | 320,010 (width 128, depth 3, GroupNorm)       |
| resnet20   | 32x32x3      | 269,722 (He et al. CIFAR ResNet, option A)   |
| resnet18   | any, >=32 px | 11,181,642 (torchvision architecture)        |
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gptfl_hpc.errors import ModelError


class DigitsCNN(nn.Module):
    """Conv(32)-ReLU-Conv(64)-ReLU-MaxPool-FC(128)-FC: the embedded default's classifier."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        h, w, c = in_shape
        self.conv1 = nn.Conv2d(c, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (h // 2) * (w // 2), 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class ConvNet(nn.Module):
    """The paper's ConvNet: depth x [conv3x3(width) - GroupNorm(width, width) - ReLU - AvgPool2]."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, width: int = 128,
                 depth: int = 3) -> None:
        super().__init__()
        h, w, c = in_shape
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            c, h, w = width, h // 2, w // 2
        if h < 1 or w < 1:
            raise ModelError(f"model convnet: depth {depth} halves a {in_shape[0]}x{in_shape[1]} "
                             "input below 1 pixel; lower model.depth")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class _ShortcutA(nn.Module):
    """Option A shortcut: subsample and zero-pad channels (parameter-free)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlock(nn.Module):
    def __init__(self, inp: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inp != planes:
            if shortcut == "A":
                self.shortcut = _ShortcutA(planes)
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(inp, planes, 1, stride, bias=False),
                                              nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c = in_shape[2]
        self.conv1 = nn.Conv2d(c, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        inp = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(_BasicBlock(inp, planes, stride if i == 0 else 1, "A"))
                inp = planes
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ResNet18(nn.Module):
    """torchvision's resnet18 architecture (7x7 stem, max-pool, 4 stages of 2 basic blocks)."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c = in_shape[2]
        self.conv1 = nn.Conv2d(c, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks: list[nn.Module] = []
        inp = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            for i in range(2):
                blocks.append(_BasicBlock(inp, planes, stride if i == 0 else 1, "B"))
                inp = planes
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.fc(F.adaptive_avg_pool2d(self.layers(x), 1).flatten(1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "convnet": ConvNet,
    "resnet20": ResNet20,
    "resnet18": ResNet18,
}


def build_model(model_cfg, in_shape: tuple[int, int, int] | list[int], num_classes: int
                ) -> nn.Module:
    """Instantiate `model_cfg.name` for images of shape (H, W, C); checks the input fits."""
    name = model_cfg.name
    if name not in MODELS:
        raise ModelError(f"config key model.name: unknown model {name!r}; known: "
                         + ", ".join(MODELS))
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) != 3:
        raise ModelError(f"model {name}: needs image inputs (H, W, C), got shape {in_shape}")
    kwargs = {"width": model_cfg.width, "depth": model_cfg.depth} if name == "convnet" else {}
    model = MODELS[name](in_shape, num_classes, **kwargs)
    h, w, c = in_shape
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, c, h, w))
    except RuntimeError as e:
        raise ModelError(f"model {name}: input shape (H,W,C)={in_shape} does not fit the "
                         f"model ({str(e).splitlines()[0]})") from None
    if tuple(out.shape) != (2, num_classes):
        raise ModelError(f"model {name}: output shape {tuple(out.shape)} for {num_classes} "
                         "classes")
    return model.train()


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
