"""The recipe on its own stack (Keras / TensorFlow), for the speed benchmarks only.

Runs under a Python that has TensorFlow (``pip install tensorflow-cpu pillow``), separate from
busdx's environment; the other benchmarks call it with ``--keras-python`` and read the JSON it
prints. The network is the recipe's: VGG16 convolutional base (frozen) -> Flatten -> Dense 512
ReLU -> Dropout 0.5 -> Dense 1 sigmoid, Adam, binary cross-entropy, 224x224, batch 32. Weights
are random: they do not change the speed.

    python keras_vgg16.py infer --batch-sizes 1 8 32 --min-seconds 10
    python keras_vgg16.py train --split split.csv --data BUSI/ --epochs 30
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from PIL import Image

SIZE = 224


def recipe_model() -> tf.keras.Model:
    base = tf.keras.applications.VGG16(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
    base.trainable = False
    model = tf.keras.Sequential([
        tf.keras.Input((SIZE, SIZE, 3)), base, tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(512, activation="relu"), tf.keras.layers.Dropout(0.5),
        tf.keras.layers.Dense(1, activation="sigmoid")])  # fmt: skip
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    return model


def infer(args: argparse.Namespace) -> dict:
    model = recipe_model()
    result = {}
    for batch in args.batch_sizes:
        images = np.random.default_rng(0).uniform(-120, 150, (batch, SIZE, SIZE, 3))
        images = images.astype("float32")
        model.predict_on_batch(images)  # warm-up
        done, started = 0, time.perf_counter()
        while done < 2 or time.perf_counter() - started < args.min_seconds:
            model.predict_on_batch(images)
            done += 1
        result[str(batch)] = done * batch / (time.perf_counter() - started)
    return {"img_per_s": result}


def _load(path: str) -> np.ndarray:
    with Image.open(path) as image:
        rgb = image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    return np.asarray(rgb, dtype="float32")


def train(args: argparse.Namespace) -> dict:
    """ImageDataGenerator-style augmentation on the fly, then fit with validation each epoch."""
    with open(args.split, newline="") as handle:
        rows = list(csv.DictReader(handle))
    split = {"train": [], "val": []}
    for row in rows:
        label = float(row["label"] == "malignant")
        split[row["split"]].append((_load(str(Path(args.data) / row["path"])), label))
    x_train = np.stack([x for x, _ in split["train"]])
    y_train = np.array([y for _, y in split["train"]])
    x_val = tf.keras.applications.vgg16.preprocess_input(np.stack([x for x, _ in split["val"]]))
    y_val = np.array([y for _, y in split["val"]])
    augment = tf.keras.Sequential([
        tf.keras.layers.RandomRotation(20 / 360), tf.keras.layers.RandomTranslation(0.2, 0.2),
        tf.keras.layers.RandomZoom(0.2), tf.keras.layers.RandomFlip("horizontal")])  # fmt: skip
    data = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=0)
        .batch(32)
        .map(lambda x, y: (tf.keras.applications.vgg16.preprocess_input(augment(x)), y))
    )
    model = recipe_model()
    started = time.perf_counter()
    history = model.fit(data, validation_data=(x_val, y_val), batch_size=32,
                        epochs=args.epochs, verbose=0)  # fmt: skip
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "epochs": args.epochs,
        "train_images": len(x_train),
        "val_images": len(x_val),
        "final_val_accuracy": history.history["val_accuracy"][-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    infer_parser = commands.add_parser("infer")
    infer_parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    infer_parser.add_argument("--min-seconds", type=float, default=10)
    train_parser = commands.add_parser("train")
    train_parser.add_argument("--split", required=True)
    train_parser.add_argument("--data", required=True)
    train_parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    result = infer(args) if args.command == "infer" else train(args)
    result["tensorflow"] = tf.__version__
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
