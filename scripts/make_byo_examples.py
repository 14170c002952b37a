"""Make the "your own model and data" examples under configs/: model folders, weights and data files.

    PYTHONPATH=. .venv/bin/python scripts/make_byo_examples.py [text] [photos]   # minutes on 2 cores

Run once; its outputs are committed (each file well under 2 MB) and the tests use them as they are.
Everything is made here, offline and seeded:

- configs/sentiment/: sentences written from templates (subjects, adjectives, negations, "but"
  clauses; the held-out split uses subjects the training split never has), a WordPiece tokenizer
  trained on them, and a 2-layer BERT (hidden 64) fine-tuned as a positive/negative classifier, saved
  with save_pretrained. data/train.txt is calibration text, data/dev.csv the labelled held-out split.
- configs/embedding/: the classifier's encoder saved as a sentence-transformers folder (modules.json,
  1_Pooling mean pooling, 2_Normalize), with data/sentences.txt.
- configs/photos/: 80 px patches of real photos bundled with scikit-image (brick, grass and gravel
  textures, immunohistochemistry cells, the Hubble deep field) and scikit-learn (flower), one class
  each. Training patches come from the left 60 % of each photo, the held-out ones (test/<class>/)
  from the right 40 %; calibration/ holds unlabelled training-region patches. Three classifiers
  are trained on them: a Hugging Face ResNet (hf/, with its image processor), torchvision's
  mobilenet_v3_small (width 0.5) and timm's test_efficientnet, the last two at 64 px.

torchvision and timm come from .venv/zoo with the registration stub, as in the tests.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "zoo_site"), str(ROOT / ".venv" / "zoo"), str(ROOT)]
import sitecustomize  # noqa: E402,F401  (stubs torchvision's C++ registrations: see tests/zoo_site)
import torch  # noqa: E402

from quantcli.loading.preprocess import transform  # noqa: E402
from quantcli.recipe import ImageOptions  # noqa: E402
from tests import hf_folders  # noqa: E402

CONFIGS = ROOT / "configs"
SUBJECTS = [
    "the film",
    "this movie",
    "the book",
    "the novel",
    "the meal",
    "the service",
    "our hotel",
    "the concert",
    "the game",
    "the show",
    "the acting",
    "the plot",
    "the soundtrack",
    "the staff",
    "the room",
    "the food",
    "the trip",
    "the museum",
    "the lecture",
    "the album",
    "the sequel",
    "the interview",
]
HELD_OUT_SUBJECTS = ["the play", "the podcast", "the cafe", "the tour"]
POSITIVE = [
    "good",
    "great",
    "wonderful",
    "excellent",
    "delightful",
    "superb",
    "charming",
    "brilliant",
    "lovely",
    "enjoyable",
    "fantastic",
    "pleasant",
    "solid",
    "moving",
    "fun",
]
NEGATIVE = [
    "bad",
    "awful",
    "terrible",
    "boring",
    "dull",
    "disappointing",
    "poor",
    "weak",
    "mediocre",
    "tedious",
    "horrible",
    "bland",
    "messy",
    "annoying",
    "forgettable",
]
ADVERBS = ["", "really ", "very ", "quite ", "truly ", "rather ", "so "]
VERBS = ["was", "is", "felt", "seemed", "turned out"]
NEGATED = ["was not", "was never", "is not", "did not seem"]
LABELS = ["negative", "positive"]
PHOTO_CLASSES = ["brick", "cells", "flower", "galaxies", "grass", "gravel"]
ZOO_IMAGE = ImageOptions(
    size=64, resize=72, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], interpolation="bilinear"
)


# ---------------------------------------------------------------------------------------------- text
def clause(rng: random.Random, subjects: list[str]) -> tuple[str, int]:
    """One judgement and its label: an adjective, possibly negated."""
    positive = rng.random() < 0.5
    word = rng.choice(POSITIVE if positive else NEGATIVE)
    if rng.random() < 0.3:
        return f"{rng.choice(subjects)} {rng.choice(NEGATED)} {rng.choice(ADVERBS)}{word}", int(not positive)
    return f"{rng.choice(subjects)} {rng.choice(VERBS)} {rng.choice(ADVERBS)}{word}", int(positive)


def sentence(rng: random.Random, subjects: list[str]) -> tuple[str, int]:
    """A sentence; with "but", the second clause decides the label."""
    text, label = clause(rng, subjects)
    if rng.random() < 0.3:
        second, label = clause(rng, subjects)
        text = f"{text} but {second}"
    return text, label


def corpus(rng: random.Random, subjects: list[str], count: int, exclude: set[str]) -> list[tuple[str, int]]:
    seen, out = set(exclude), []
    while len(out) < count:
        text, label = sentence(rng, subjects)
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    return out


def train_text_classifier(folder: Path, train: list[tuple[str, int]], dev: list[tuple[str, int]]) -> object:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    tokenizer = hf_folders.wordpiece([t for t, _ in train], vocab_size=300)
    model = BertForSequenceClassification(hf_folders.bert_config(len(tokenizer), **hf_folders.labelled(LABELS)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    encode = lambda rows: tokenizer([t for t, _ in rows], padding=True, return_tensors="pt")  # noqa: E731
    for epoch in range(6):
        model.train()
        random.Random(epoch).shuffle(train)
        for start in range(0, len(train), 32):
            rows = train[start : start + 32]
            out = model(**encode(rows), labels=torch.tensor([y for _, y in rows]))
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            correct = (model(**encode(dev)).logits.argmax(-1) == torch.tensor([y for _, y in dev])).float().mean()
        print(f"sentiment epoch {epoch}: dev accuracy {correct:.3f}", flush=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def make_text() -> None:
    rng = random.Random(0)
    dev = corpus(rng, HELD_OUT_SUBJECTS + SUBJECTS[:4], 300, set())
    train = corpus(rng, SUBJECTS, 3000, {t for t, _ in dev})
    data = CONFIGS / "sentiment" / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.txt").write_text("".join(f"{t}\n" for t, _ in train[:256]))
    with open(data / "dev.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sentence", "label"])
        writer.writerows((t, LABELS[y]) for t, y in dev)
    model = train_text_classifier(CONFIGS / "sentiment" / "model", train, dev)
    embedding = CONFIGS / "embedding"
    (embedding / "data").mkdir(parents=True, exist_ok=True)
    model.bert.save_pretrained(embedding / "model")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(CONFIGS / "sentiment" / "model").save_pretrained(embedding / "model")
    hf_folders.sentence_transformers_files(embedding / "model", pooling="mean", normalize=True, dim=64)
    (embedding / "data" / "calibration.txt").write_text("".join(f"{t}\n" for t, _ in train[:128]))
    (embedding / "data" / "sentences.txt").write_text("".join(f"{t}\n" for t, _ in dev[:200]))


# -------------------------------------------------------------------------------------------- photos
def photos() -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_image

    gray = lambda a: np.repeat(a[..., None], 3, axis=2)  # noqa: E731
    return {
        "brick": gray(skimage.data.brick()),
        "cells": skimage.data.immunohistochemistry(),
        "flower": load_sample_image("flower.jpg"),
        "galaxies": skimage.data.hubble_deep_field(),
        "grass": gray(skimage.data.grass()),
        "gravel": gray(skimage.data.gravel()),
    }


def patch(rng: np.random.Generator, image: np.ndarray, columns: tuple[float, float]) -> object:
    """A random square patch (side 48-128 px) from a column band of `image`, resized to 80 px."""
    from PIL import Image

    h, w = image.shape[:2]
    lo, hi = int(columns[0] * w), int(columns[1] * w)
    side = int(rng.integers(48, min(128, hi - lo, h) + 1))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(lo, hi - side + 1))
    return Image.fromarray(image[top : top + side, left : left + side]).resize((80, 80), Image.BILINEAR)


def make_photo_data() -> tuple[list, list]:
    """(training patches with labels, held-out patches with labels); writes the held-out and calibration files."""
    rng = np.random.default_rng(0)
    root = CONFIGS / "photos" / "data"
    train, test = [], []
    for label, (name, image) in enumerate(sorted(photos().items())):
        train += [(patch(rng, image, (0.0, 0.6)), label) for _ in range(250)]
        test += [(patch(rng, image, (0.6, 1.0)), label) for _ in range(20)]
        (root / "test" / name).mkdir(parents=True, exist_ok=True)
        for i, (img, _) in enumerate(test[-20:]):
            img.save(root / "test" / name / f"{i:02d}.jpg", quality=90)
    (root / "calibration").mkdir(parents=True, exist_ok=True)
    for i in range(32):
        img, _ = train[int(rng.integers(len(train)))]
        img.save(root / "calibration" / f"{i:02d}.jpg", quality=90)
    return train, test


def augment(rng: random.Random, img: object) -> object:
    from PIL import Image

    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_TOP_BOTTOM)
    return img


def fit_images(name: str, model: torch.nn.Module, prep: object, train: list, test: list, epochs: int = 6) -> None:
    """Train on the patches through the model's own preprocessing `prep` (PIL images -> float array)."""
    torch.manual_seed(0)
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    logits = lambda out: out.logits if hasattr(out, "logits") else out  # noqa: E731
    x_test = torch.from_numpy(prep([img for img, _ in test]))
    y_test = torch.tensor([y for _, y in test])
    for epoch in range(epochs):
        model.train()
        rng.shuffle(train)
        for start in range(0, len(train), 64):
            rows = train[start : start + 64]
            x = torch.from_numpy(prep([augment(rng, img) for img, _ in rows]))
            loss = torch.nn.functional.cross_entropy(logits(model(x)), torch.tensor([y for _, y in rows]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"{name} epoch {epoch}: loss {loss.item():.3f}", flush=True)
    recalibrate_bn(model, prep, train)
    model.eval()
    with torch.no_grad():
        accuracy = (logits(model(x_test)).argmax(-1) == y_test).float().mean()
    print(f"{name}: held-out accuracy {accuracy:.3f}", flush=True)


def recalibrate_bn(model: torch.nn.Module, prep: object, train: list) -> None:
    """Batch-norm running statistics as the plain average over the training data (torchvision's
    MobileNetV3 uses momentum 0.01, too slow for a short run from scratch)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for start in range(0, len(train), 100):
            model(torch.from_numpy(prep([img for img, _ in train[start : start + 100]])))


def make_photo_models(train: list, test: list) -> None:
    import safetensors.torch
    import timm
    import torchvision
    from transformers import ResNetForImageClassification

    folder = CONFIGS / "photos"
    zoo_prep = lambda imgs: np.stack([transform(i, ZOO_IMAGE) for i in imgs])  # noqa: E731
    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v3_small(num_classes=len(PHOTO_CLASSES), width_mult=0.5)
    fit_images("torchvision", tv, zoo_prep, train, test)
    torch.save(tv.state_dict(), folder / "mobilenet_v3_small.pt")
    torch.manual_seed(0)
    tm = timm.create_model("test_efficientnet", num_classes=len(PHOTO_CLASSES))
    fit_images(
        "timm",
        tm,
        lambda imgs: np.stack([transform(i, ZOO_IMAGE.model_copy(update={"interpolation": "bicubic"})) for i in imgs]),
        train,
        test,
    )
    safetensors.torch.save_file(tm.state_dict(), folder / "test_efficientnet.safetensors")
    torch.manual_seed(0)
    hf = ResNetForImageClassification(hf_folders.resnet_config(PHOTO_CLASSES))
    processor = hf_folders.image_processor(64)
    fit_images("huggingface", hf, lambda imgs: processor(images=imgs, return_tensors="np")["pixel_values"], train, test)
    hf_folders.resnet_folder(folder / "hf", PHOTO_CLASSES, model=hf)


def main(parts: list[str]) -> None:
    """Make the examples named in `parts` (text, photos; default both)."""
    torch.set_num_threads(2)
    if "text" in parts:
        make_text()
    if "photos" in parts:
        train, test = make_photo_data()
        make_photo_models(train, test)
    sizes = {
        str(p.relative_to(CONFIGS)): p.stat().st_size
        for p in CONFIGS.rglob("*")
        if p.is_file() and p.parts[-3:-1] != ("data", "test")
    }
    print(json.dumps({k: v for k, v in sizes.items() if v > 100_000}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:] or ["text", "photos"])
