"""The PACS round trip against ``busdx predict`` on the same files, side by side in one run.

A fresh Orthanc (Debian's, with its DICOMweb plugin) on loopback receives ``--instances``
synthetic ultrasound instances (256 x 256, one frame, B-mode region with spacing). Then:

- ``predict``: ``busdx predict`` (library call, the same code) over the same files on disk,
  writing the CSV and the DICOM results (``--dicom-out``): the reference;
- ``pacs``: the watcher over Orthanc, restarted half-way: a first process (ledger on disk)
  scores the first half of the instances, the second half is uploaded, and a new watcher with
  the same ledger scores what is new. Its time is fetch + predict + build + store, without the
  uploads.

It checks that every instance was scored exactly once (the ledger, and one SR and one SEG per
instance in Orthanc) and reports throughput (instances per second) of both, and their ratio
(target: the round trip at >= 80% of ``busdx predict``).

    python benchmarks/pacs_roundtrip.py --instances 100 --out docs/benchmarks/pacs-roundtrip.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from busdx.bundled import resolve_run
from busdx.data.inputs import InputSelection
from busdx.data.synthetic import make_lesion_image, ultrasound_dicom
from busdx.inference.batch import predict_images
from busdx.inference.predictor import load_model
from busdx.pacs.dicomweb import DicomWeb
from busdx.pacs.watch import Ledger, score_new

from _common import local_orthanc, machine_info, orthanc_installed, write_json


def instances(count: int) -> list:
    made = []
    for index in range(count):
        image = make_lesion_image(index % 2 == 1, size=256, seed=index)[0].convert("L")
        made.append(ultrasound_dicom([np.asarray(image)], region=(8, 8, 247, 247)))
    return made


def count(url: str, modality: str) -> int:
    with urllib.request.urlopen(f"{url}/instances?Modality={modality}&limit=100000") as answer:
        return len(json.loads(answer.read() or b"[]"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not orthanc_installed():
        raise SystemExit("needs Debian's orthanc and orthanc-dicomweb packages")
    work = Path(tempfile.mkdtemp(prefix="busdx-pacs-bench-"))
    made = instances(args.instances)
    files = []
    for index, dataset in enumerate(made):
        files.append(work / "files" / f"{index:04d}.dcm")
        files[-1].parent.mkdir(exist_ok=True)
        dataset.save_as(files[-1], enforce_file_format=True)
    run = resolve_run(None)
    load_model(run, backend="auto")  # warm the file cache for both arms
    started = time.perf_counter()
    predicted = predict_images(run, [str(work / "files")], work / "p.csv",
                               selection=InputSelection(), progress=False,
                               dicom_out=work / "dicom-out")  # fmt: skip
    predict_seconds = time.perf_counter() - started
    half = args.instances // 2
    with local_orthanc(work) as url:
        server, ledger_file = DicomWeb(url), work / "ledger.jsonl"
        server.store(made[:half])
        loaded = load_model(run, backend="auto")
        first = score_new(server, loaded, Ledger(ledger_file))
        server.store(made[half:])
        restarted = score_new(server, load_model(run, backend="auto"), Ledger(ledger_file))
        again = score_new(server, loaded, Ledger(ledger_file))
        stored = {"SR": count(url, "SR"), "SEG": count(url, "SEG")}
    ledger = [json.loads(line) for line in ledger_file.read_text().splitlines()]
    scored = [entry["instance"] for entry in ledger if entry["status"] == "scored"]
    pacs_seconds = first.seconds + restarted.seconds
    result = {
        "command": f"python benchmarks/pacs_roundtrip.py --instances {args.instances} "
        f"--out {args.out}",
        "machine": machine_info(),
        "instances": args.instances,
        "predict": {"seconds": predict_seconds, "per_second": predicted.predicted / predict_seconds,
                    "backend": predicted.backend, "model_file": predicted.model_file},
        "pacs": {"seconds": pacs_seconds, "per_second": len(scored) / pacs_seconds,
                 "passes": [first.__dict__, restarted.__dict__, again.__dict__]},
        "ratio_pacs_to_predict": (len(scored) / pacs_seconds)
        / (predicted.predicted / predict_seconds),
        "scored_once": len(scored) == len(set(scored)) == args.instances,
        "stored_in_orthanc": stored,
    }  # fmt: skip
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
