"""Prediction rate with the mask head against the same model without it (issue 22's target:
at least 80% of the rate), both through ``busdx predict``'s own path (decode, preprocess,
score, and for the mask head: map the mask back to the scan and describe the lesion).

The two runs are trained models of one recipe with and without the mask head (the cost of
describing a lesion grows with the lesion outlined, so an untrained head would not say what a
trained one costs), e.g. the BrEaST folds of ``runs/loso3-lite0`` and ``runs/loso3-lite0-mask``
(docs/lesions.md has their commands). The images are BrEaST's when ``../shared`` has them,
else synthetic. The two models alternate over ``--repeats`` rounds on the same files, in one
process, on the torch backend.

    python benchmarks/mask_head.py --with runs/loso3-lite0-mask/fold-2 \
        --without runs/loso3-lite0/fold-2 --out docs/benchmarks/mask_head.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from busdx.data.synthetic import make_lesion_image
from busdx.inference.batch import predict_files
from busdx.inference.predictor import Predictor, load_model

from _common import REPO, machine_info, write_json

BREAST = REPO.parent / "shared" / "data" / "breast_lesions_usg"


def images(count: int, folder: Path) -> list[Path]:
    found = sorted(BREAST.glob("*/case*.png"))[:count]
    if len(found) == count:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        make_lesion_image(index % 2 == 1, size=400, seed=index)[0].save(folder / f"{index}.png")
    return sorted(folder.glob("*.png"))


def rate(loaded: Predictor, files: list[Path]) -> float:
    started = time.perf_counter()
    rows = list(predict_files(loaded, files, batch_size=16, progress=False))
    assert not any(row.error for row in rows)
    return len(files) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--with", dest="with_head", type=Path, required=True, help="RUNDIR")
    parser.add_argument("--without", type=Path, required=True, help="RUNDIR")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "docs/benchmarks/mask_head.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    files = images(args.images, Path("/tmp/busdx-mask-bench"))
    models = {"without": load_model(args.without, backend="torch"),
              "with mask head": load_model(args.with_head, backend="torch")}  # fmt: skip
    assert models["with mask head"].outlines and not models["without"].outlines
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, loaded in models.items():  # alternate, so drift hits both alike
            rates[name].append(rate(loaded, files))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratio = medians["with mask head"] / medians["without"]
    result = {"machine": machine_info(), "images": len(files), "runs": {
                  "with mask head": str(args.with_head), "without": str(args.without)},
              "source": "BrEaST" if files[0].is_relative_to(BREAST) else "synthetic 400x400",
              "images_per_second": rates, "median": medians, "ratio": ratio,
              "target": ">= 0.80"}  # fmt: skip
    write_json(args.out, result)
    print(
        f"median img/s without {medians['without']:.1f}, with mask head "
        f"{medians['with mask head']:.1f}: ratio {ratio:.2f} (target >= 0.80)"
    )


if __name__ == "__main__":
    main()
