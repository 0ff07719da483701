"""The figure of docs/dicom-results.md: a synthetic ultrasound DICOM through the bundled model
with ``busdx predict --dicom-out``, its Segmentation read back over the frame and its
Structured Report's content tree, plus what Debian's validator says of each object.

    python experiments/dicom_results_figure.py --out docs/figures/dicom-results.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import highdicom as hd
import matplotlib
import numpy as np
import pydicom

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from busdx.cli import main as busdx
from busdx.data.synthetic import make_lesion_image, ultrasound_dicom


def content_tree(dataset, depth: int = 0) -> list[str]:
    """One line per SR content item: relationship, concept name and value, indented."""
    lines = []
    for item in dataset.get("ContentSequence", []):
        name = (
            item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        )
        value = ""
        if item.ValueType == "NUM":
            measured = item.MeasuredValueSequence[0]
            unit = measured.MeasurementUnitsCodeSequence[0].CodeValue
            value = f"{float(measured.NumericValue):.3f} {unit}"
        elif item.ValueType == "CODE":
            value = item.ConceptCodeSequence[0].CodeMeaning
        elif item.ValueType in {"TEXT", "UIDREF"}:
            value = str(item.get("TextValue", item.get("UID", "")))[:28]
        elif item.ValueType == "SCOORD":
            value = f"{item.GraphicType}, {len(item.GraphicData) // 2} points"
        lines.append(f"{'  ' * depth}{item.RelationshipType[:3]} {item.ValueType} {name}"
                     + (f": {value}" if value else ""))  # fmt: skip
        lines += content_tree(item, depth + 1)
    return lines


def validate(path: Path) -> dict[str, int]:
    if shutil.which("dciodvfy") is None:
        return {}
    checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    lines = checked.stderr.splitlines()
    return {kind: sum(line.startswith(kind) for line in lines) for kind in ("Error", "Warning")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    scan = np.asarray(make_lesion_image(True, size=256, seed=1)[0].convert("L"))
    source = ultrasound_dicom([scan], region=(8, 8, 247, 247))
    source.save_as(work / "scan.dcm", enforce_file_format=True)
    assert busdx(["predict", str(work / "scan.dcm"), "--dicom-out", str(work / "out"),
                  "--out", str(work / "p.csv"), "--no-progress"]) == 0  # fmt: skip
    report_file = next((work / "out").glob("SR_*.dcm"))
    seg_file = next((work / "out").glob("SEG_*.dcm"))
    mask = hd.seg.segread(seg_file).get_pixels_by_source_instance(
        [source.SOPInstanceUID], segment_numbers=[1])[0, ..., 0]  # fmt: skip
    tree = content_tree(pydicom.dcmread(report_file))
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 6.5),
                                         gridspec_kw={"width_ratios": [1, 1.6]})  # fmt: skip
    left.imshow(scan, cmap="gray")
    left.imshow(np.ma.masked_where(mask == 0, mask), cmap="autumn", alpha=0.45)
    left.set_title("Segmentation (read back) over the source frame")
    left.axis("off")
    right.text(0, 1, "\n".join(tree), va="top", ha="left", family="monospace", fontsize=8)
    right.set_title("Structured Report (TID 1500) content tree")
    right.axis("off")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=130)
    checks = {"report": validate(report_file), "segmentation": validate(seg_file),
              "content_items": len(tree), "command": "python experiments/dicom_results_figure.py "
              f"--out {args.out}"}  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps(checks, indent=2) + "\n")
    print("\n".join(tree))
    print(checks)


if __name__ == "__main__":
    main()
