"""Independent PyTorch references for the backbone tests.

`vovnet`: builds a VoVNet from the spec in shared/notes/vovnet.md with the parameter names of the authors'
vovnet-detectron2 code, randomises every weight (seeded), and writes the weights, an input, every stage output
and the gradients of a weighted sum of the outputs.
`resnet`: torchvision's resnet50 with random weights and BatchNorm statistics in eval mode (FrozenBN semantics),
writing the weights (without the classifier), an input and the outputs of layer1..layer4.
`densenet`: torchvision's densenet121/169/201/161 the same way (BatchNorm in eval mode, weights of `features`
only), writing the stem output (after pool0) and, as stage2..stage5, ReLU(norm(dense block K)) where the norm is
the one torchvision applies next: transitionK.norm for blocks 1..3, norm5 for block 4 (ReLU(features(x)), the
classifier's input).
Usage: reference.py vovnet OUT.safetensors NAME V1|V2 GN|BN GROUPS H W
       reference.py resnet OUT.safetensors H W
       reference.py densenet OUT.safetensors densenet201 H W
"""
import sys
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

SPECS = {
    # name: stem, stage channels, concat channels, layers per module, modules per stage, depthwise
    "V-19-slim-dw": ([64, 64, 64], [64, 80, 96, 112], [112, 256, 384, 512], 3, [1, 1, 1, 1], True),
    "V-19-dw": ([64, 64, 64], [128, 160, 192, 224], [256, 512, 768, 1024], 3, [1, 1, 1, 1], True),
    "V-19-slim": ([64, 64, 128], [64, 80, 96, 112], [112, 256, 384, 512], 3, [1, 1, 1, 1], False),
    "V-19": ([64, 64, 128], [128, 160, 192, 224], [256, 512, 768, 1024], 3, [1, 1, 1, 1], False),
    "V-27-slim": ([64, 64, 128], [64, 80, 96, 112], [128, 256, 384, 512], 5, [1, 1, 1, 1], False),
    "V-39": ([64, 64, 128], [128, 160, 192, 224], [256, 512, 768, 1024], 5, [1, 1, 2, 2], False),
    "V-57": ([64, 64, 128], [128, 160, 192, 224], [256, 512, 768, 1024], 5, [1, 1, 4, 3], False),
    "V-99": ([64, 64, 128], [128, 160, 192, 224], [256, 512, 768, 1024], 5, [1, 3, 9, 3], False),
}


def make_norm(kind, groups, channels):
    return nn.GroupNorm(groups, channels) if kind == "GN" else nn.BatchNorm2d(channels)


def unit(prefix, cin, cout, stride, depthwise, kernel, norm):
    """Conv-norm-ReLU (or depthwise 3x3, pointwise 1x1, norm, ReLU) as an ordered list of named layers."""
    if depthwise:
        return [
            (f"{prefix}/dw_conv3x3", nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)),
            (f"{prefix}/pw_conv1x1", nn.Conv2d(cin, cout, 1, 1, 0, bias=False)),
            (f"{prefix}/pw_norm", norm(cout)),
            (f"{prefix}/pw_relu", nn.ReLU()),
        ]
    return [
        (f"{prefix}/conv", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)),
        (f"{prefix}/norm", norm(cout)),
        (f"{prefix}/relu", nn.ReLU()),
    ]


class ESE(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x * F.relu6(self.fc(x.mean((2, 3), keepdim=True)) + 3.0) / 6.0


class OSA(nn.Module):
    def __init__(self, name, cin, stage_ch, concat_ch, layers, depthwise, ese, identity, norm):
        super().__init__()
        self.reduced = depthwise and cin != stage_ch
        if self.reduced:
            self.conv_reduction = nn.Sequential(OrderedDict(unit(f"{name}_reduction_0", cin, stage_ch, 1, False, 1, norm)))
        self.layers = nn.ModuleList()
        width = stage_ch if self.reduced else cin
        for i in range(layers):
            self.layers.append(nn.Sequential(OrderedDict(unit(f"{name}_{i}", width, stage_ch, 1, depthwise, 3, norm))))
            width = stage_ch
        self.concat = nn.Sequential(OrderedDict(unit(f"{name}_concat", cin + layers * stage_ch, concat_ch, 1, False, 1, norm)))
        self.ese = ESE(concat_ch) if ese else None
        self.identity = identity

    def forward(self, x):
        outputs = [x]
        y = self.conv_reduction(x) if self.reduced else x
        for layer in self.layers:
            y = layer(y)
            outputs.append(y)
        y = self.concat(torch.cat(outputs, 1))
        if self.ese is not None:
            y = self.ese(y)
        return y + x if self.identity else y


class VoVNet(nn.Module):
    def __init__(self, name, v2, norm_kind, groups):
        super().__init__()
        stem, stage_ch, concat_ch, layers, modules, dw = SPECS[name]
        norm = lambda c: make_norm(norm_kind, groups, c)
        layers_stem = unit("stem_1", 3, stem[0], 2, False, 3, norm)
        layers_stem += unit("stem_2", stem[0], stem[1], 1, dw, 3, norm)
        layers_stem += unit("stem_3", stem[1], stem[2], 2, dw, 3, norm)
        self.stem = nn.Sequential(OrderedDict(layers_stem))
        cin = stem[2]
        self.stage_names = []
        for i, count in enumerate(modules):
            s = i + 2
            stage = nn.Sequential()
            if s > 2:
                stage.add_module("Pooling", nn.MaxPool2d(3, 2, ceil_mode=True))
            for m in range(count):
                module = OSA(f"OSA{s}_{m + 1}", cin, stage_ch[i], concat_ch[i], layers, dw, v2, v2 and m > 0, norm)
                stage.add_module(f"OSA{s}_{m + 1}", module)
                cin = concat_ch[i]
            self.add_module(f"stage{s}", stage)
            self.stage_names.append(f"stage{s}")

    def forward(self, x):
        y = self.stem(x)
        outputs = []
        for name in self.stage_names:
            y = getattr(self, name)(y)
            outputs.append(y)
        return outputs


def randomise(model):
    """Random weights everywhere (norm affine and statistics too) so that every parameter matters."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                tensor.normal_(0, 0.1)
            elif tensor.dim() == 1:
                tensor.uniform_(0.5, 1.5) if name.endswith("weight") else tensor.normal_(0, 0.1)
            else:
                fan_in = tensor[0].numel()
                tensor.normal_(0, (2.0 / fan_in) ** 0.5)


def main():
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    kind, out = sys.argv[1], sys.argv[2]
    if kind == "vovnet":
        name, version, norm, groups, h, w = sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
        model = VoVNet(name, version == "V2", norm, groups)
        randomise(model)
        model.train()
        x = torch.randn(2, 3, h, w, requires_grad=True)
        outputs = model(x)
        weights = [torch.randn_like(o) for o in outputs]
        loss = sum((o * wgt).sum() for o, wgt in zip(outputs, weights))
        loss.backward()
        tensors = {f"param/{k}": v for k, v in model.state_dict().items()}
        tensors["input"] = x.detach()
        tensors["input_grad"] = x.grad
        tensors["stem_conv_grad"] = model.stem[0].weight.grad
        for i, (o, wgt) in enumerate(zip(outputs, weights)):
            tensors[f"output/stage{i + 2}"] = o.detach()
            tensors[f"loss_weight/stage{i + 2}"] = wgt
        tensors["param_count"] = torch.tensor([sum(p.numel() for p in model.parameters())], dtype=torch.int64)
    elif kind == "densenet":
        import torchvision

        arch, h, w = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        model = getattr(torchvision.models, arch)(weights=None)
        randomise(model)
        model.eval()
        x = torch.randn(1, 3, h, w)
        tensors = {"input": x}
        with torch.no_grad():
            y = x
            for name, module in model.features.named_children():
                if name.startswith("transition"):
                    tensors[f"output/stage{int(name[len('transition'):]) + 1}"] = F.relu(module.norm(y))
                elif name == "norm5":
                    tensors["output/stage5"] = F.relu(module(y))
                y = module(y)
                if name == "pool0":
                    tensors["output/stem"] = y
            assert torch.equal(tensors["output/stage5"], F.relu(model.features(x)))
        tensors.update({f"param/{k}": v for k, v in model.state_dict().items() if k.startswith("features.")})
        tensors["param_count"] = torch.tensor([sum(p.numel() for p in model.features.parameters())], dtype=torch.int64)
    else:
        import torchvision

        h, w = int(sys.argv[3]), int(sys.argv[4])
        model = torchvision.models.resnet50(weights=None)
        randomise(model)
        model.eval()
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            y = model.maxpool(model.relu(model.bn1(model.conv1(x))))
            tensors = {}
            for i, layer in enumerate([model.layer1, model.layer2, model.layer3, model.layer4]):
                y = layer(y)
                tensors[f"output/stage{i + 2}"] = y
        tensors.update({f"param/{k}": v for k, v in model.state_dict().items() if not k.startswith("fc.")})
        tensors["input"] = x
    save_file({k: v.contiguous() for k, v in tensors.items()}, out)


if __name__ == "__main__":
    main()
