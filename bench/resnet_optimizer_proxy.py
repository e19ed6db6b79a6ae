"""AdamW against SGD (Nesterov momentum 0.9) at the seed's learning rates, on a CPU-sized proxy.

No EMNIST and no ImageNet weights are available on the machine this was written on, so this
measures optimisation progress only, on a proxy: scikit-learn's 1,797 real handwritten 8x8
digits, upscaled and padded to EMNIST's 28x28, through resnet18.py's own code (build_model with
random backbone weights, as_layers, forward_all, WarmupCosine, the regimes' train
modes) at --img-size 32. It says which optimiser makes progress at lr 0.01 (linear probe, cached
features) and 5e-4 (partial unfreeze); it says nothing about EMNIST accuracy.

    python bench/resnet_optimizer_proxy.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import resnet18  # noqa: E402

IMG_SIZE, BATCH_SIZE = 32, 64


def digits_as_emnist() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    glyphs = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    images = torch.zeros(len(glyphs), 28, 28)
    images[:, 4:24, 4:24] = glyphs[:, 0]  # EMNIST-like: a centred glyph with a border
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), torch.tensor(digits.target)


def train(regime: str, optimizer_name: str, epochs: int, images, labels) -> list[tuple]:
    settings = resnet18.REGIME_DEFAULTS[regime]
    train_index, val_index = resnet18.stratified_split(labels, 0.25, seed=0)
    precision = resnet18.select_precision(torch.device("cpu"), True)
    torch.manual_seed(0)
    model = resnet18.build_model(regime, None, num_classes=10)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if optimizer_name == "AdamW":
        optimizer = torch.optim.AdamW(
            parameters, lr=settings["lr"], weight_decay=settings["weight_decay"]
        )
    else:
        optimizer = torch.optim.SGD(
            parameters,
            lr=settings["lr"],
            momentum=0.9,
            nesterov=True,
            weight_decay=settings["weight_decay"],
        )
    steps = -(-len(train_index) // BATCH_SIZE)
    warmup = round(settings["warmup_epochs"] * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, resnet18.WarmupCosine(steps * epochs, warmup)
    )
    # The linear probe trains on the frozen backbone's cached features, as resnet18.py does.
    layers = resnet18.as_layers(model, IMG_SIZE)
    first = resnet18.FIRST_TRAINED[regime] if regime == "linear_probe" else 0
    rows = resnet18.forward_all(layers[:first], images, IMG_SIZE, precision) if first else images
    splits = {
        "train": (rows[train_index], labels[train_index]),
        "val": (rows[val_index], labels[val_index]),
    }
    module = layers[first:]
    progress = []
    for epoch in range(epochs):
        resnet18.set_regime_mode(model, regime, training=True)
        generator = torch.Generator().manual_seed(epoch)
        for index in resnet18.epoch_batches(len(train_index), BATCH_SIZE, 1, generator, "cpu"):
            rows, batch_labels = splits["train"][0][index], splits["train"][1][index]
            with precision.autocast():
                logits = module(rows)
            loss = resnet18.classification_loss(logits, batch_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        train_loss = resnet18.evaluate(module, *splits["train"], precision, IMG_SIZE)["loss"]
        val_accuracy = resnet18.evaluate(module, *splits["val"], precision, IMG_SIZE)["accuracy"]
        progress.append((epoch + 1, round(train_loss, 3), round(val_accuracy, 3)))
    return progress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()  # no options: --help says what it does
    torch.set_num_threads(1)
    images, labels = digits_as_emnist()
    for regime, epochs in (("linear_probe", 15), ("partial_unfreeze", 4)):
        for optimizer_name in ("AdamW", "SGD"):
            progress = train(regime, optimizer_name, epochs, images, labels)
            shown = progress if len(progress) <= 4 else [progress[4], progress[-1]]
            print(
                f"{regime} lr {resnet18.REGIME_DEFAULTS[regime]['lr']:g} {optimizer_name}: "
                "(epoch, train loss, proxy val accuracy) "
                + " ".join(str(entry) for entry in shown),
                flush=True,
            )


if __name__ == "__main__":
    main()
