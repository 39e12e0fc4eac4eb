"""Model registry. Pure torch; no torchvision (its PyPI wheel does not import beside the CPU torch).

Every model takes ``(in_shape, num_classes)`` with ``in_shape`` the model's input (H, W, C) and is
fed float (B, C, H, W). The torchvision architectures use torchvision's module names, so a
torchvision state_dict saved as .safetensors loads with matching keys
(:func:`load_pretrained_backbone`).

| name       | input                    | parameters                                             |
|------------|--------------------------|--------------------------------------------------------|
| digits_cnn | 8x8x1                    | 151,306 (10 classes)                                   |
| simple_cnn | HxWxC, H,W >= 6          | 1,626,442 at 32x32x3, 10 classes (pfl-research CNN)     |
| convnet    | 32x32x3, 224x224x3       | 320,010 / 504,420 at 32 px, 10 / 100 classes;          |
|            |                          | 10,535,526 at 224 px, 102 classes (depth 3)            |
| resnet20   | 32x32x3                  | 269,722 (He et al. CIFAR ResNet, option A; 10 classes) |
| resnet18   | any, >= 32 px            | 11,181,642 (torchvision; 10 classes)                   |
| resnet50   | any, >= 32 px            | 23,712,932 (torchvision; 100 classes)                  |
| vgg19      | any, >= 32 px            | 139,611,210 (torchvision VGG-19, no BN; 10 classes)    |
| audio_crnn | n_mels x frames x 1      | 285,028 (FedAudio Conv1d+BiGRU, 128 mels, 36 labels)   |
| audio_cnn  | n_mels x frames x 1      | 1,247,427 at 35 labels (1,238,432 + 257 x K)           |

Dropout: simple_cnn, vgg19 and audio_crnn contain ``nn.Dropout`` (as their references do); its
masks come from torch's global RNG, so a caller that wants results independent of how clients are
placed on ranks seeds that RNG per (client, round) before local training.

Thread count: in the invariant numerics mode (:mod:`gptfl_hpc.numerics`), two SGD steps of every
model but digits_cnn (32 px images, 1 s audio) gave the same bits at 1 and 2 CPU threads
(measured; tests/test_models.py checks resnet18, audio_cnn, audio_crnn and simple_cnn). Two torch
CPU kernels are not invariant and are avoided: BatchNorm on 1x1 maps (see :class:`BatchNorm2d`,
used by all ResNets) and GroupNorm's backward with 4 channels per group (see :class:`AudioCNN`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) as it is used today: Conv5x5(6, same)-ReLU-MaxPool2-
    Conv5x5(16, valid)-ReLU-MaxPool2-FC(120)-ReLU-FC(84)-ReLU-FC. ReLU and max pooling replace
    the original's scaled tanh and trainable subsampling. configs/mnist.yaml's classifier:
    61,706 parameters for 28x28x1 and 10 classes, about 0.4 M multiply-adds per image (DigitsCNN
    at 28x28 takes 16 M), which keeps the MNIST default within its CPU time budget."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        h, w, c = in_shape
        fh, fw = (h // 2 - 4) // 2, (w // 2 - 4) // 2
        if fh < 1 or fw < 1:
            raise ModelError(f"model lenet5: input {h}x{w} is too small; valid: H, W >= 12")
        self.conv1 = nn.Conv2d(c, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * fh * fw, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class SimpleCNN(nn.Sequential):
    """pfl-research's CIFAR-10 benchmark CNN (``benchmarks/model/pytorch/cnn.py::simple_cnn``).

    Conv3x3(32, valid)-ReLU-Conv3x3(64, valid)-ReLU-MaxPool2-Dropout(0.25)-Flatten-FC(128)-ReLU-
    Dropout(0.5)-FC, Glorot-uniform weights (biases keep torch's default init), as there. The
    reference's first layer only permutes NHWC to NCHW (our transforms already emit NCHW), so the
    module indices here are the reference's minus one. The reference computes the flatten size
    from H for both sides (square inputs); here H and W are used separately.
    1,626,442 parameters for 32x32x3 and 10 classes.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        h, w, c = in_shape
        flat = ((h - 4) // 2) * ((w - 4) // 2) * 64
        if flat < 64:
            raise ModelError(f"model simple_cnn: input {h}x{w} is too small; needs H, W >= 6")
        super().__init__(
            nn.Conv2d(c, 32, kernel_size=3), nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=3), nn.ReLU(),
            nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(),
            nn.Linear(flat, 128), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(128, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(m.weight)


class ConvNet(nn.Module):
    """The paper's ConvNet: depth x [conv3x3(width) - GroupNorm(width, width) - ReLU - AvgPool2].

    Module names and layout equal the reference's (``EasyFL/model/convnet.py``, net_norm
    'instancenorm' = GroupNorm(width, width)), so its checkpoints load with matching keys. For
    224 px inputs (Flowers-102) the reference keeps the default depth 3 (``ConvNet(num_classes,
    im_size=(224, 224))`` in ``EasyFL/server/server_sim.py``): 28x28x128 features into a
    100,352-wide linear head, 10,535,526 parameters for 102 classes. We keep that default;
    ``model.depth`` can deepen it (depth 5 gives a 7x7x128 head).
    """

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


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and maths) whose training step on 1x1 maps
    gives the same bits at any CPU thread count.

    torch's CPU kernel treats a contiguous (N, C, 1, 1) input as channels-last and then splits
    the batch over the threads, reducing the partial sums in a thread-count-dependent order
    (measured: another forward output, gradient and running_var at 1 and 2 threads). That is
    the last stage of resnet18/resnet50 on 32 px inputs. For such inputs in training mode the
    batch statistics are computed here with plain tensor ops, whose reductions keep one thread
    per channel; every other case is torch's kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.dim() != 4 or x.shape[2] * x.shape[3] != 1 or x.is_cuda:
            return super().forward(x)
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got input "
                             f"size {tuple(x.shape)}")
        x2 = x.reshape(n, -1)
        mean = x2.mean(dim=0)
        centred = x2 - mean
        var = centred.square().mean(dim=0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(var.detach(), alpha=f * n / (n - 1))
        y = centred * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.reshape(x.shape)


class _ShortcutA(nn.Module):
    """Option A shortcut: subsample and zero-pad channels (parameter-free)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlockA(nn.Module):
    """ResNet-20's basic block with the parameter-free option-A shortcut."""

    def __init__(self, inp: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inp != planes:
            self.shortcut = _ShortcutA(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c = in_shape[2]
        self.conv1 = nn.Conv2d(c, 16, 3, 1, 1, bias=False)
        self.bn1 = BatchNorm2d(16)
        blocks: list[nn.Module] = []
        inp = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(_BasicBlockA(inp, planes, stride if i == 0 else 1))
                inp = planes
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ------------------------------------------------------------------ torchvision architectures


def _downsample(inp: int, out: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and inp == out:
        return None
    return nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), BatchNorm2d(out))


class BasicBlock(nn.Module):
    """torchvision ``resnet.BasicBlock`` (same attribute names)."""

    expansion = 1

    def __init__(self, inp: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.downsample = _downsample(inp, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """torchvision ``resnet.Bottleneck`` (ResNet v1.5: the stride sits on the 3x3 conv)."""

    expansion = 4

    def __init__(self, inp: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inp, planes, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inp, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class TorchvisionResNet(nn.Module):
    """torchvision ``resnet.ResNet``: 7x7/2 stem, 3x3/2 max-pool, four stages, global avg-pool.

    Same module names (conv1, bn1, layer1..layer4, fc) and the same initialisation (Kaiming-normal
    fan-out convolutions, BatchNorm weight 1 / bias 0, no zero-init of the last BN).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...],
                 in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c = in_shape[2]
        self.conv1 = nn.Conv2d(c, 64, 7, 2, 3, bias=False)
        self.bn1 = BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inp = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks: list[nn.Module] = []
            for j in range(n):
                blocks.append(block(inp, planes, 2 if (j == 0 and i > 0) else 1))
                inp = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(in_shape: tuple[int, int, int], num_classes: int) -> TorchvisionResNet:
    """torchvision resnet18: 11,181,642 parameters for 10 classes."""
    return TorchvisionResNet(BasicBlock, (2, 2, 2, 2), in_shape, num_classes)


def resnet50(in_shape: tuple[int, int, int], num_classes: int) -> TorchvisionResNet:
    """torchvision resnet50: 23,712,932 parameters for 100 classes."""
    return TorchvisionResNet(Bottleneck, (3, 4, 6, 3), in_shape, num_classes)


_VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M")


class VGG19(nn.Module):
    """torchvision ``vgg19`` (configuration E, no BatchNorm), same module names and init.

    features -> AdaptiveAvgPool2d(7x7) -> classifier 25088-4096-4096-K with ReLU + Dropout(0.5).
    On 32 px inputs the 1x1 feature map is replicated to 7x7 by the adaptive pool, exactly as
    torchvision (and the paper's code, which used torchvision's vgg19) does: 139,611,210
    parameters for 10 classes.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c = in_shape[2]
        layers: list[nn.Module] = []
        for v in _VGG19:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


# ------------------------------------------------------------------------- audio (log-mel)


def _audio_input(name: str, in_shape: tuple[int, int, int]) -> tuple[int, int]:
    n_mels, frames, c = in_shape
    if c != 1:
        raise ModelError(f"model {name}: needs log-mel inputs (n_mels, frames, 1), got "
                         f"{in_shape}; set the dataset kind to audio")
    return n_mels, frames


class AudioCRNN(nn.Module):
    """FedAudio's ``audio_conv_rnn`` (model/conv_model.py), as the GPT-FL audio runs used it.

    Input (B, 1, n_mels, frames); the mel bins are Conv1d channels over time:
    Conv1d(n_mels, 64, 3)-ReLU-MaxPool(2)-Conv1d(64, 128, 3)-ReLU-MaxPool(2)-Dropout(p) ->
    one-layer bidirectional GRU(128, 128) -> mean over time -> FC(256, 128)-ReLU-FC(128, K).
    FedAudio built it with dropout 0.1 (experiment/distributed_main.py). 285,028 parameters for
    128 mel bins and 36 labels.

    Differences from the reference, both without effect on the function it computes:
    * the reference's ``init_weight`` loops over ``self._modules`` (the child *names*, strings),
      so its Kaiming-uniform init (weights) and 0.01 (biases) of the Linear/Conv1d layers never
      ran and torch's defaults were used. Here it does run, on every Linear and Conv1d.
    * the reference passes ``dropout=p`` to a one-layer GRU, where torch ignores it (and warns);
      it is left out.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, hidden: int = 128,
                 dropout: float = 0.1) -> None:
        super().__init__()
        n_mels, frames = _audio_input("audio_crnn", in_shape)
        if frames < 4:
            raise ModelError(f"model audio_crnn: needs >= 4 frames, got {frames}")
        self.pred_layer = nn.Sequential(nn.Linear(hidden * 2, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))
        self.conv = nn.Sequential(
            nn.Conv1d(n_mels, hidden // 2, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(hidden // 2, hidden, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
            nn.Dropout(dropout),
        )
        self.rnn = nn.GRU(input_size=hidden, hidden_size=hidden, num_layers=1, batch_first=True,
                          bidirectional=True)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv1d):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                nn.init.constant_(m.bias, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.squeeze(1))              # (B, hidden, T/4)
        out, _ = self.rnn(x.transpose(1, 2))     # (B, T/4, 2*hidden)
        return self.pred_layer(out.mean(dim=1))


class AudioCNN(nn.Module):
    """A CNN10-style log-mel classifier (after PANNs' CNN10, Kong et al. 2020), stronger than
    the CRNN on Speech Commands / ESC-50 class problems.

    Four blocks of 2 x [conv3x3 - GroupNorm(8) - ReLU] with 32, 64, 128, 256 channels, each but
    the last followed by 2x2 average pooling; then mean over the mel axis, mean + max over time,
    FC(256, 256)-ReLU-FC(256, K). GroupNorm instead of PANNs' BatchNorm: per-sample statistics,
    so training does not depend on the batch composition and FedAvg averages no running
    statistics from label-skewed clients; no dropout, so no global-RNG draws. Groups of 8
    channels: torch's CPU GroupNorm backward gives thread-count-dependent input gradients with 4
    channels per group (measured on torch 2.13 for C=32/G=8, C=64/G=16, C=128/G=32; not for 1,
    2, 8, 16, 32 or 64 channels per group). Works for any
    input of >= 8 mel bins and >= 8 frames. 1,238,432 + 257 x K parameters (1,247,427 for 35
    labels, 1,251,282 for 50).
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        n_mels, frames = _audio_input("audio_cnn", in_shape)
        if n_mels < 8 or frames < 8:
            raise ModelError(f"model audio_cnn: needs >= 8 mel bins and frames, got {in_shape}")
        blocks: list[nn.Module] = []
        c = 1
        for i, width in enumerate((32, 64, 128, 256)):
            groups = width // 8
            blocks += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.GroupNorm(groups, width),
                       nn.ReLU(inplace=True),
                       nn.Conv2d(width, width, 3, padding=1, bias=False),
                       nn.GroupNorm(groups, width), nn.ReLU(inplace=True)]
            if i < 3:
                blocks.append(nn.AvgPool2d(2))
            c = width
        self.features = nn.Sequential(*blocks)
        self.fc1 = nn.Linear(256, 256)
        self.fc = nn.Linear(256, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=2)              # (B, 256, T/8): mean over mel bins
        x = x.mean(dim=2) + x.amax(dim=2)             # mean + max over time
        return self.fc(F.relu(self.fc1(x)))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "lenet5": LeNet5,
    "convnet": ConvNet,
    "resnet20": ResNet20,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vgg19": VGG19,
    "simple_cnn": SimpleCNN,
    "audio_crnn": AudioCRNN,
    "audio_cnn": AudioCNN,
}


def build_model(model_cfg, in_shape: tuple[int, int, int] | list[int], num_classes: int
                ) -> nn.Module:
    """Instantiate `model_cfg.name` for inputs of shape (H, W, C); checks the input fits.

    Audio models take (n_mels, frames, 1), the ``output_shape`` of the audio transform.
    """
    name = model_cfg.name
    if name not in MODELS:
        raise ModelError(f"config key model.name: unknown model {name!r}; known: "
                         + ", ".join(MODELS))
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) != 3:
        raise ModelError(f"model {name}: needs inputs (H, W, C), got shape {in_shape}")
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
    from gptfl_hpc.train.invconv import adopt

    adopt(model)  # thread-invariant oneDNN convolutions under run.cpu_kernels=invariant
    return model.train()


def classifier_head(model: nn.Module) -> nn.Linear:
    """The final classifier layer: the last ``nn.Linear`` in registration order (for every
    registry model the layer that outputs the class logits; tests/test_models.py checks it).
    fl.body_lr_scale scales the client lr of every other parameter."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"model {type(model).__name__}: no nn.Linear classifier layer; "
                         "fl.body_lr_scale needs one (valid: fl.body_lr_scale=1.0)")
    return linears[-1]


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------ pretrained weights

_WRAPPER_PREFIXES = ("module.", "backbone.", "model.")
"""One of these is stripped when EVERY key of a file starts with it (DDP, the GPT-FL reference's
``Resnet.backbone``, Lightning-style wrappers) and the stripped keys match the model better."""


@dataclass
class BackboneLoad:
    """What :func:`load_pretrained_backbone` did, key by key (model state_dict names)."""

    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """model key -> why it kept its own value (shape differs, e.g. another class count)."""
    missing: list[str] = field(default_factory=list)
    """model keys the file does not have (they keep their initial values)."""
    unexpected: list[str] = field(default_factory=list)
    """file keys (after prefix stripping) the model does not have (ignored)."""
    stripped_prefix: str = ""

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        if self.stripped_prefix:
            parts.append(f"stripped prefix {self.stripped_prefix!r}")
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{k} ({v})" for k, v in self.skipped.items()))
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({', '.join(self.missing[:4])}"
                         + (", ..." if len(self.missing) > 4 else "") + ")")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({', '.join(self.unexpected[:4])}"
                         + (", ..." if len(self.unexpected) > 4 else "") + ")")
        return "; ".join(parts)


def load_pretrained_backbone(model: nn.Module, path: str | Path) -> BackboneLoad:
    """Copy the tensors of a local .safetensors file into `model` where names and shapes match.

    Never unpickles: the file is read with safetensors only. Tensors whose name matches but whose
    shape differs (typically the classifier head of a model trained for another class count) are
    skipped and reported; so are model keys absent from the file and file keys the model lacks.
    Values are copied into the existing tensors (cast to their dtype), so views into a flat
    parameter buffer stay intact. If every file key starts with one of ``module.``,
    ``backbone.``, ``model.`` and stripping it matches more keys, it is stripped.

    Raises:
        DataError: the file is missing or not readable safetensors, or a matching tensor is
            not finite.
        ModelError: no tensor of the file fits the model (wrong architecture or naming).
    """
    from gptfl_hpc.errors import DataError
    from gptfl_hpc.fsio import load_safetensors

    tensors, _ = load_safetensors(path)
    own = model.state_dict()
    prefix = ""
    for p in _WRAPPER_PREFIXES:
        if tensors and all(k.startswith(p) for k in tensors):
            if sum(k[len(p):] in own for k in tensors) > sum(k in own for k in tensors):
                prefix = p
            break
    if prefix:
        tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    report = BackboneLoad(stripped_prefix=prefix)
    report.unexpected = sorted(k for k in tensors if k not in own)
    updates: dict[str, torch.Tensor] = {}
    for key, dst in own.items():
        src = tensors.get(key)
        if src is None:
            report.missing.append(key)
        elif tuple(src.shape) != tuple(dst.shape):
            report.skipped[key] = (f"shape {tuple(src.shape)} in the file, "
                                   f"{tuple(dst.shape)} in the model")
        else:
            if src.is_floating_point() and not bool(torch.isfinite(src).all()):
                raise DataError(f"pretrained weights {path}: tensor {prefix}{key} is not finite")
            updates[key] = src
    if not updates:
        raise ModelError(f"pretrained weights {path}: no tensor matches the model by name and "
                         f"shape (file keys e.g. {', '.join(list(tensors)[:3]) or 'none'}; model "
                         f"keys e.g. {', '.join(list(own)[:3])})")
    with torch.no_grad():
        for key, src in updates.items():
            own[key].copy_(src.to(dtype=own[key].dtype))
            report.loaded.append(key)
    return report
