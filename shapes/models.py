"""The catalogued networks as code: ResNet50, VGG19, ResNet18 and SqueezeNet 1.1, written from
their papers and torchvision's public architecture (torchvision itself cannot be imported beside
the CPU torch build), module names as in torchvision so ``from_model`` yields the catalogs' layer
names. ``build(net, seed)`` returns one deterministically initialised, in eval mode."""

import torch
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        # ResNet v1.5: the stride sits on the 3x3 convolution.
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        # torchvision applies the projection shortcut after the main branch
        idt = x if self.downsample is None else self.downsample(x)
        return self.relu(out + idt)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        idt = x if self.downsample is None else self.downsample(x)
        return self.relu(out + idt)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, width=64):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make(block, width, layers[0], 1)
        self.layer2 = self._make(block, 2 * width, layers[1], 2)
        self.layer3 = self._make(block, 4 * width, layers[2], 2)
        self.layer4 = self._make(block, 8 * width, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)

    def _make(self, block, planes, blocks, stride):
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet50():
    return ResNet(Bottleneck, [3, 4, 6, 3])


def resnet18():
    return ResNet(BasicBlock, [2, 2, 2, 2])


def resnet50_tiny():
    """ResNet50's blocks, stem and strides at a quarter of its width with one block per stage:
    not a catalogued network, the stand-in the interpreter's dry run of a GPU lease can afford
    (``python -m harness lease --interpret``)."""
    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, width=16)


class VGG(nn.Module):
    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


class SqueezeNet(nn.Module):
    def forward(self, x):
        return self.classifier(self.features(x)).flatten(1)


def vgg19():
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
           512, 512, 512, 512, "M"]
    feats, c = [], 3
    for v in cfg:
        if v == "M":
            feats.append(nn.MaxPool2d(2, 2))
        else:
            feats += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
            c = v
    m = VGG()
    m.features = nn.Sequential(*feats)
    m.avgpool = nn.AdaptiveAvgPool2d(7)
    m.classifier = nn.Sequential(nn.Linear(512 * 49, 4096), nn.ReLU(True), nn.Linear(4096, 4096),
                                 nn.ReLU(True), nn.Linear(4096, 1000))
    return m


class Fire(nn.Module):
    def __init__(self, cin, squeeze, e1, e3):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.act(self.expand1x1(x)), self.act(self.expand3x3(x))], 1)


def squeezenet1_1():
    m = SqueezeNet()
    m.features = nn.Sequential(
        nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, ceil_mode=True), Fire(64, 16, 64, 64), Fire(128, 16, 64, 64),
        nn.MaxPool2d(3, 2, ceil_mode=True), Fire(128, 32, 128, 128), Fire(256, 32, 128, 128),
        nn.MaxPool2d(3, 2, ceil_mode=True), Fire(256, 48, 192, 192), Fire(384, 48, 192, 192),
        Fire(384, 64, 256, 256), Fire(512, 64, 256, 256))
    m.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(512, 1000, 1), nn.ReLU(inplace=True),
                                 nn.AdaptiveAvgPool2d(1))
    return m


MODELS = {"resnet50": resnet50, "vgg19": vgg19, "resnet18": resnet18,
          "squeezenet1_1": squeezenet1_1, "resnet50_tiny": resnet50_tiny}


def build(net: str, seed: int = 0) -> nn.Module:
    """The network ``net`` (one of ``MODELS``) in eval mode, initialised deterministically from
    ``seed``: He-normal convolution and linear weights, small random biases, and BatchNorm
    statistics and affine parameters drawn at random (not the identity defaults), so a folded
    BatchNorm really changes the weights. No weights are downloaded."""
    if net not in MODELS:
        raise ValueError(f"unknown net {net!r}; valid: {', '.join(MODELS)}")
    model = MODELS[net]()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()
