"""PyTorch reference models, written from the published layouts (key names and shapes), so the
converter tests need no other repository. Each mirrors the torch code it is named after:

- `MLP`: Linear layers `dense.{i}` + `linear` on `x.flatten(1)` of an NCHW input.
- `ZipItResNet`: ZipIt! `models/resnets.py` (CIFAR ResNet, 3x3 conv + BN shortcut).
- `KuangliuVGG`: kuangliu / ZipIt! `models/vgg.py` (`features` Sequential, `classifier` Linear).
- `TorchvisionResNet50`: torchvision `resnet50` (Bottleneck v1.5), with a width multiplier.
- `TorchvisionVGG`: torchvision `vgg16` / `vgg16_bn`, with width / hidden size arguments.
"""

import torch
import torch.nn.functional as F
from torch import nn

VGG_CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class MLP(nn.Module):
    def __init__(self, in_features, hidden, num_classes):
        super().__init__()
        widths = [in_features, *hidden]
        self.dense = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.dense:
            x = F.relu(layer(x))
        return self.linear(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ZipItResNet(nn.Module):
    def __init__(self, depth=20, w=1, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.in_planes = 16 * w
        self.conv1 = nn.Conv2d(3, 16 * w, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16 * w)
        self.layer1 = self._make_layer(16 * w, n, 1)
        self.layer2 = self._make_layer(32 * w, n, 2)
        self.layer3 = self._make_layer(64 * w, n, 2)
        self.linear = nn.Linear(64 * w, num_classes)

    def _make_layer(self, planes, blocks, stride):
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def _vgg_features(cfg, batch_norm, channels):
    layers, in_channels = [], 3
    for x in cfg:
        if x == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(in_channels, channels(x), kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(channels(x)))
        layers.append(nn.ReLU(inplace=True))
        in_channels = channels(x)
    return layers


class KuangliuVGG(nn.Module):
    def __init__(self, depth=11, w=1, num_classes=10, batch_norm=True):
        super().__init__()
        layers = _vgg_features(VGG_CFGS[depth], batch_norm, lambda c: c * w)
        self.features = nn.Sequential(*layers, nn.AvgPool2d(kernel_size=1, stride=1))
        self.classifier = nn.Linear(512 * w, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).view(x.size(0), -1))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class TorchvisionResNet50(nn.Module):
    def __init__(self, width=1.0, layers=(3, 4, 6, 3), num_classes=1000):
        super().__init__()
        base = int(64 * width)
        self.inplanes = base
        self.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, blocks in enumerate(layers):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", self._make_layer(base * 2**i, blocks, stride))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(base * 2 ** (len(layers) - 1) * 4, num_classes)
        self.num_stages = len(layers)

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TorchvisionVGG(nn.Module):
    def __init__(self, depth=16, batch_norm=False, width=1.0, hidden=4096, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(
            *_vgg_features(VGG_CFGS[depth], batch_norm, lambda c: int(c * width)))
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(int(512 * width) * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, num_classes))

    def forward(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


@torch.no_grad()
def randomize(model, seed=0, num_batches_tracked=7):
    """Random weights that keep activations O(1) (He-normal convs / hidden linears), and random
    BatchNorm affine parameters and statistics (as in the golden); returns the model in eval."""
    g = torch.Generator().manual_seed(seed)
    uniform = lambda t, lo, hi: t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
            if module.bias is not None:
                uniform(module.bias, -0.1, 0.1)
        elif isinstance(module, nn.BatchNorm2d):
            uniform(module.weight, 0.5, 1.5)
            uniform(module.bias, -0.2, 0.2)
            uniform(module.running_mean, -0.5, 0.5)
            uniform(module.running_var, 0.5, 2.0)
            module.num_batches_tracked.fill_(num_batches_tracked)
    return model.eval()
