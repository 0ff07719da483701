"""Observed malignancy per likelihood category at each held-out site (issue 22).

Each fold of a leave-one-site-out ``busdx cv`` folder tested one site with a model trained,
calibrated and thresholded on the others; its ``predictions.csv`` holds the calibrated
probability of every image of that site. Each probability is mapped to its BI-RADS range
(:mod:`busdx.stats.likelihood`), and each category's observed rate of malignancy is reported with
its exact 95% interval, beside the readers' own BI-RADS categories on the same images where the
site records them (BrEaST's ``labels.csv``, BUS-BRA's ``bus_data.csv``).

    python experiments/likelihood_categories.py --cv runs/loso3-lite0 \
        --data busi=../shared/data/busi --data bus_bra=../shared/data/bus_bra \
        --data breast=../shared/data/breast_lesions_usg/labels.csv \
        --out docs/lesions/likelihood-loso3-lite0.json
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import asdict
from pathlib import Path

from busdx.config import load_config
from busdx.runs import prepare_dataset
from busdx.stats.likelihood import CATEGORY_LABEL, category_table, likelihood_category


def site_tables(fold: Path, birads: dict[str, str | None]) -> dict:
    with (fold / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    truth = [int(r["label"] == "malignant") for r in rows]
    model = [likelihood_category(float(r["probability_malignant"])) for r in rows]
    table = {"site": rows[0]["site"], "n": len(rows), "n_malignant": sum(truth),
             "model": [asdict(row) for row in category_table(model, truth)]}  # fmt: skip
    readers = [birads.get(r["path"]) for r in rows]
    if all(readers):
        categories = [str(c).lower() for c in readers]
        table["readers"] = [asdict(row) for row in category_table(categories, truth)]
    return table


def markdown(table: dict) -> str:
    lines = [f"**{table['site']}** (n = {table['n']}, {table['n_malignant']} malignant)", "",
             "| category | BI-RADS range | model: n | malignant (95% CI) | outside by | "
             "readers: n | malignant (95% CI) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    readers = {row["category"]: row for row in table.get("readers", [])}
    for row in table["model"]:
        theirs = readers.get(row["category"])
        lines.append(
            f"| {row['category']} | {row['low']:.0%} to {row['high']:.0%} | {row['n']} | "
            f"{_rate(row)} | {_distance(row)} | {theirs['n'] if theirs else '—'} | "
            f"{_rate(theirs) if theirs else '—'} |"
        )
    for name in sorted(set(readers) - {row["category"] for row in table["model"]}):
        lines.append(f"| {name} (readers only) | — | — | — | — | {readers[name]['n']} | "
                     f"{_rate(readers[name])} |")  # fmt: skip
    return "\n".join(lines)


def _rate(row: dict) -> str:
    if not row["n"]:
        return "—"
    return f"{row['rate']:.1%} [{row['rate_low']:.1%}, {row['rate_high']:.1%}]"


def _distance(row: dict) -> str:
    if row["distance"] is None:
        return "—"
    return "inside" if row["distance"] == 0 else f"{row['distance']:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cv", type=Path, required=True, help="a leave-one-site-out CV folder")
    parser.add_argument("--data", action="append", required=True, help="NAME=DIR, as for cv")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dataset = prepare_dataset(load_config(args.cv / "config.yaml"), args.data)
    birads = {s.relpath: s.birads for s in dataset.samples}
    tables = [site_tables(fold, birads) for fold in sorted(args.cv.glob("fold-*"))]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cv": str(args.cv), "label": CATEGORY_LABEL,
                                    "sites": tables}, indent=2) + "\n")  # fmt: skip
    print("\n\n".join(markdown(table) for table in tables))


if __name__ == "__main__":
    main()
