"""The paper's CIFAR-10 networks with MPO layers (Gao et al. 2020, Table I, Fig. 3, Table II).

- ``vgg16`` / ``vgg19``: the CIFAR VGG (batch norm, FC 512-4096-4096-10, dropout 0.2 on the FC
  layers). MPO: the two replaced 3x3 convolutions act on the 2x2x512 map and become
  ``M^{2,8,8,8,2}_{2,8,8,8,2}(4)`` maps over the whole flattened map (conv5_1/conv5_2 in VGG-16,
  conv5_3/conv5_4 in VGG-19), and the three FC layers ``M^{4,4,8,8,4}_{4,4,4,4,2}(4)``,
  ``M^{4,4,8,8,4}_{4,4,8,8,4}(4)``, ``M^{1,10,1,1,1}_{4,4,8,8,4}(4)``: rho about 0.0005.
- ``resnet``: the pre-activation wide ResNet (channels 16k/32k/64k, depth 6n+2, k = 4); MPO:
  the classifier ``M^{1,5,2,1}_{4,4,4,4}(3)``, and with ``--mpo-last-unit`` the two convolutions of
  the last residual unit as ``M^{2,4,4,4,4,4,4,2}_{2,4,4,4,4,4,4,2}(4)`` maps over the 8x8x256 map.
- ``densenet``: DenseNet without bottleneck, (n, m, k) = (16, 12, 12) for depth 40; MPO: the
  classifier ``M^{1,5,2,1}_{4,4,7,4}(4)``.

CIFAR-10 is not on this machine: ``--data`` takes the folder of the binary version
(``data_batch_1.bin`` .. ``test_batch.bin``; read with NumPy, no pickle). ``--smoke N`` instead runs
N training steps on one random CIFAR-shaped batch and prints the loss (CI uses it).

    python -m benchmarks.paper.cifar --model vgg16 --data cifar-10-batches-bin --device cuda --epochs 300
    python -m benchmarks.paper.cifar --model resnet --depth 56 --mpo-last-unit --smoke 5
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tnlayers.backends.torch import MPOLinear
from torch import nn
from tqdm.auto import tqdm

from . import common

VGG_CONFIGS = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}  # fmt: skip
VGG_REPLACED = {"vgg16": (0, 1), "vgg19": (2, 3)}  # which convolutions of the last block become MPOs
PAPER = {"vgg16": "93.13 -> 93.76 (rho ~0.0005)", "vgg19": "93.36 -> 93.80 (rho ~0.0005)",
         "resnet": "same as dense (rho ~0.11)", "densenet": "93.56 -> 93.59 (rho 0.129)"}  # fmt: skip
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


class FeatureMapMPO(nn.Module):
    """A dense linear map of a whole ``(C, H, W)`` feature map, stored as an MPO (the paper's conv-as-MPO).

    The map is flattened channels-last, ``(H, W, C)``, as the authors' code does.
    """

    def __init__(self, shape: tuple[int, int, int], modes: Sequence[int], rank: int) -> None:
        super().__init__()
        self.shape = shape
        self.mpo = MPOLinear(modes, modes, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels, height, width = self.shape
        flat = x.permute(0, 2, 3, 1).reshape(len(x), -1)
        out: torch.Tensor = self.mpo(flat)
        return out.reshape(len(x), height, width, channels).permute(0, 3, 1, 2)


def _conv_bn(channels_in: int, channels_out: int) -> list[nn.Module]:
    return [nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False), nn.BatchNorm2d(channels_out), nn.ReLU()]


def vgg(name: str, mpo: bool) -> nn.Module:
    layers: list[nn.Module] = []
    channels, size = 3, 32
    last_block = [k for k, item in enumerate(VGG_CONFIGS[name]) if item != "M"][-4 if name == "vgg19" else -3 :]
    for index, item in enumerate(VGG_CONFIGS[name]):
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            size //= 2
        elif mpo and index in last_block and last_block.index(index) in VGG_REPLACED[name]:
            layers += [FeatureMapMPO((512, size, size), (2, 8, 8, 8, 2), 4), nn.BatchNorm2d(512), nn.ReLU()]
        else:
            layers += _conv_bn(channels, int(str(item)))
            channels = int(str(item))
    if mpo:
        head: list[nn.Module] = [
            MPOLinear((4, 4, 4, 4, 2), (4, 4, 8, 8, 4), 4), nn.ReLU(), nn.Dropout(0.2),
            MPOLinear((4, 4, 8, 8, 4), (4, 4, 8, 8, 4), 4), nn.ReLU(), nn.Dropout(0.2),
            MPOLinear((4, 4, 8, 8, 4), (1, 10, 1, 1, 1), 4),
        ]  # fmt: skip
    else:
        head = [nn.Linear(512, 4096), nn.ReLU(), nn.Dropout(0.2), nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.2),
                nn.Linear(4096, 10)]  # fmt: skip
    return nn.Sequential(*layers, nn.Flatten(), *head)


class PreActBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int, map_mpo: bool = False) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(channels_in), nn.BatchNorm2d(channels_out)
        if map_mpo:  # the last unit of ResNet-56: 8x8x256 maps (16,384 features) as MPOs
            modes = (2, 4, 4, 4, 4, 4, 4, 2)
            self.conv1: nn.Module = FeatureMapMPO((channels_out, 8, 8), modes, 4)
            self.conv2: nn.Module = FeatureMapMPO((channels_out, 8, 8), modes, 4)
        else:
            self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
            self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        needs_projection = stride != 1 or channels_in != channels_out
        self.shortcut = nn.Conv2d(channels_in, channels_out, 1, stride, bias=False) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        result: torch.Tensor = self.conv2(torch.relu(self.bn2(out))) + shortcut
        return result


def resnet(depth: int, mpo: bool, mpo_last_unit: bool, widen: int = 4) -> nn.Module:
    if (depth - 2) % 6:
        raise ValueError(f"ResNet depth must be 6n+2 (14, 20, ..., 56, 110), got {depth}")
    units = (depth - 2) // 6
    widths = [16 * widen, 32 * widen, 64 * widen]
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1, bias=False)]
    channels = 16
    for stage, width in enumerate(widths):
        for unit in range(units):
            last = mpo_last_unit and stage == 2 and unit == units - 1
            layers.append(PreActBlock(channels, width, 2 if stage and not unit else 1, map_mpo=last))
            channels = width
    classifier = MPOLinear((4, 4, 4, widen), (1, 5, 2, 1), 3) if mpo else nn.Linear(channels, 10)
    return nn.Sequential(*layers, nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         classifier)  # fmt: skip


class DenseBlock(nn.Module):
    def __init__(self, channels: int, layers: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(channels + k * growth), nn.ReLU(),
                          nn.Conv2d(channels + k * growth, growth, 3, padding=1, bias=False))
            for k in range(layers)
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


def densenet(mpo: bool, initial: int = 16, layers: int = 12, growth: int = 12) -> nn.Module:
    modules: list[nn.Module] = [nn.Conv2d(3, initial, 3, padding=1, bias=False)]
    channels = initial
    for block in range(3):
        modules.append(DenseBlock(channels, layers, growth))
        channels += layers * growth
        if block < 2:
            modules += [nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels, 1, bias=False),
                        nn.AvgPool2d(2)]  # fmt: skip
    if mpo and channels != 448:
        raise ValueError(f"the paper's classifier MPO M^(1,5,2,1)_(4,4,7,4) needs 448 features, got {channels}")
    classifier = MPOLinear((4, 4, 7, 4), (1, 5, 2, 1), 4) if mpo else nn.Linear(channels, 10)
    return nn.Sequential(*modules, nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         classifier)  # fmt: skip


def build(args: argparse.Namespace, mpo: bool) -> nn.Module:
    if args.model in VGG_CONFIGS:
        return vgg(args.model, mpo)
    if args.model == "resnet":
        return resnet(args.depth, mpo, mpo and args.mpo_last_unit)
    return densenet(mpo)


def read_cifar_binary(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, 32, 32)`` float32 in [0, 1] and labels from CIFAR-10's binary files."""
    names = [f"data_batch_{k}.bin" for k in range(1, 6)] if split == "train" else ["test_batch.bin"]
    chunks = []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: --data must be the folder of CIFAR-10's binary version")
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size % 3073:
            raise ValueError(f"{path} is not a CIFAR-10 binary batch: {raw.size} bytes is not a multiple of 3073")
        chunks.append(raw.reshape(-1, 3073))
    records = np.concatenate(chunks)
    if records[:, 0].max() > 9:
        raise ValueError(f"{folder}: labels above 9, not a CIFAR-10 binary batch")
    images = torch.from_numpy(records[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    return images, torch.from_numpy(records[:, 0].astype(np.int64))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pad 4, random 32x32 crop, random horizontal flip (the authors' augmentation)."""
    padded = nn.functional.pad(images, (4, 4, 4, 4))
    dy, dx = (int(v) for v in torch.randint(0, 9, (2,), generator=generator))
    out = padded[:, :, dy : dy + 32, dx : dx + 32]
    flip = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), out.flip(3), out)


def smoke(model: nn.Module, steps: int, batch: int, device: torch.device) -> list[float]:
    """Losses of ``steps`` Adam steps on one fixed random batch (the model must fit it: loss goes down)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(loss.item())
    return losses


def train_cifar(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """SGD with Nesterov momentum 0.9, weight decay 2e-4, cosine learning rate; final-epoch test accuracy."""
    x_train, y_train = read_cifar_binary(args.data, "train")
    x_test, y_test = read_cifar_binary(args.data, "test")
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=0.9, nesterov=True, weight_decay=2e-4)
    steps = args.epochs * -(-len(x_train) // args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    for _ in tqdm(range(args.epochs), desc=args.model):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(x_train), args.batch_size):
            batch = order[start : start + args.batch_size]
            x = ((augment(x_train[batch], generator) - MEAN) / STD).to(device)
            loss = nn.functional.cross_entropy(model(x), y_train[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            correct = sum(
                int(
                    (
                        model(((x_test[k : k + 500] - MEAN) / STD).to(device)).argmax(1).cpu() == y_test[k : k + 500]
                    ).sum()
                )
                for k in range(0, len(x_test), 500)
            )
        history.append(correct / len(x_test))
    return {"final_accuracy": history[-1], "best_epoch_accuracy": max(history), "accuracy_per_epoch": history}


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*VGG_CONFIGS, "resnet", "densenet"], required=True)
    parser.add_argument("--dense", action="store_true", help="the dense baseline instead of the MPO-Net")
    parser.add_argument("--depth", type=int, default=56, help="ResNet depth, 6n+2")
    parser.add_argument("--mpo-last-unit", action="store_true", help="ResNet: also the last unit's convolutions")
    parser.add_argument("--data", type=Path, help="folder of CIFAR-10's binary batches")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", type=int, default=0, metavar="STEPS", help="random-data steps instead of training")
    parser.add_argument("--out", type=Path, default=common.PROJECT / "results" / "paper")
    args = parser.parse_args(argv)
    if not args.smoke and args.data is None:
        parser.error("--data is required for training (CIFAR-10 is not available offline); or use --smoke STEPS")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = build(args, mpo=not args.dense).to(device)
    dense_total = sum(p.numel() for p in build(args, mpo=False).parameters())
    replaced, total = common.weight_params(model)
    label = f"{args.model}{args.depth if args.model == 'resnet' else ''} {'dense' if args.dense else 'MPO'}"
    print(f"{label}: {total:,} parameters ({total / dense_total:.3f} of the dense network); MPO cores {replaced:,}")
    result: dict[str, object] = {"model": label, "params": total, "dense_params": dense_total, "mpo_params": replaced,
                                 "paper": PAPER[args.model]}  # fmt: skip
    start = time.perf_counter()
    if args.smoke:
        losses = smoke(model, args.smoke, 8, device)
        print("smoke-run losses: " + " ".join(f"{loss:.3f}" for loss in losses))
        result["smoke_losses"] = losses
    else:
        result.update(train_cifar(model, args, device))
        print(f"test accuracy (final epoch) {100 * result['final_accuracy']:.2f}%; paper: {PAPER[args.model]}")  # type: ignore[operator]
        common.write_result(args.out, f"cifar-{label.replace(' ', '-')}", result)
    result["seconds"] = time.perf_counter() - start
    print(json.dumps({k: v for k, v in result.items() if k != "accuracy_per_epoch"}))
    return result


if __name__ == "__main__":
    main()
