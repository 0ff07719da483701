"""A real PACS round trip (issue 30): Debian's Orthanc with its DICOMweb plugin, started on
loopback by the test; synthetic ultrasound instances uploaded, ``busdx pacs`` run, and the
Structured Reports and Segmentations read back from Orthanc. Skipped, with the reason, where
Orthanc or its plugin is not installed (``.ci/run`` installs them)."""

from __future__ import annotations

import json
import sys
import urllib.request

import numpy as np
import pydicom
import pytest

from busdx.bundled import resolve_run
from busdx.cli import main
from busdx.data.synthetic import make_lesion_image, ultrasound_dicom
from busdx.inference.predictor import load_model
from busdx.pacs.dicomweb import DicomWeb, NetworkError
from busdx.pacs.watch import Ledger, watch

from conftest import BENCHMARKS

sys.path.insert(0, str(BENCHMARKS))
from _common import free_port, local_orthanc, orthanc_installed

pytestmark = pytest.mark.skipif(
    not orthanc_installed(),
    reason="Orthanc and its DICOMweb plugin are not installed (apt install orthanc "
    "orthanc-dicomweb)",
)


@pytest.fixture
def orthanc(tmp_path):
    """A fresh Orthanc on loopback; its DICOMweb root."""
    with local_orthanc(tmp_path) as url:
        yield url


def _scans(count: int, seed: int = 0) -> list[pydicom.Dataset]:
    scans = []
    for index in range(seed, seed + count):
        image = np.asarray(make_lesion_image(index % 2 == 1, size=192, seed=index)[0].convert("L"))
        scans.append(ultrasound_dicom([image], region=(4, 4, 187, 187)))
    return scans


def _count(url: str, modality: str) -> int:
    with urllib.request.urlopen(f"{url}/instances?Modality={modality}&limit=1000") as answer:
        return len(json.loads(answer.read() or b"[]"))


def test_new_instances_are_scored_once_and_their_results_stored_back(orthanc, tmp_path, capsys):
    server = DicomWeb(orthanc)
    good = _scans(5)
    cine = ultrasound_dicom([np.asarray(make_lesion_image(True, size=192, seed=9)[0].convert("L"))
                             for _ in range(2)])  # fmt: skip
    broken = _scans(1, seed=20)[0]
    broken.PixelData = broken.PixelData[:100]  # stored by the PACS, unreadable by anyone
    other = _scans(1, seed=30)[0]
    other.Modality = "MR"  # not ultrasound: never fetched
    server.store([*good, cine, broken, other])
    ledger = tmp_path / "ledger.jsonl"
    assert main(["pacs", orthanc, "--state", str(ledger), "--frame", "all"]) == 0
    assert "6 instance(s) scored, 1 failed, 12 object(s) stored" in capsys.readouterr().out
    assert (_count(orthanc, "SR"), _count(orthanc, "SEG")) == (7, 5)  # cine: 2 SRs, no SEG
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    failed = [line for line in lines if line["status"] == "failed"]
    assert [line["instance"] for line in failed] == [broken.SOPInstanceUID]
    assert "frame" in failed[0]["reason"] or "pixel" in failed[0]["reason"].lower()
    # a report read back from the PACS belongs to its source's study and references it
    source = good[0]
    query = {"Modality": "SR", "StudyInstanceUID": source.StudyInstanceUID}
    found = list(server.search_instances(query))
    report = server.retrieve(found[0])
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # a second run, as after a restart: nothing is scored again
    assert main(["pacs", orthanc, "--state", str(ledger)]) == 0
    assert "0 instance(s) scored, 0 failed" in capsys.readouterr().out
    assert _count(orthanc, "SR") == 7


def test_the_watcher_scores_only_what_is_new_and_a_crash_adds_no_copies(orthanc, tmp_path):
    server, ledger_file = DicomWeb(orthanc), tmp_path / "ledger.jsonl"
    loaded = load_model(resolve_run(None), backend="auto")
    server.store(_scans(3))
    waits = []
    first = watch(server, loaded, Ledger(ledger_file), interval=5, passes=2, sleep=waits.append)
    assert [p.scored for p in first] == [3, 0] and waits == [5]
    server.store(_scans(2, seed=10))
    restarted = watch(server, loaded, Ledger(ledger_file), passes=1)  # a new process, same ledger
    assert restarted[0].scored == 2 and _count(orthanc, "SR") == 5
    # a crash after storing but before recording: the instance is scored again on restart, and
    # its results, which have the same UIDs, replace themselves
    lines = ledger_file.read_text().splitlines()
    ledger_file.write_text("\n".join(lines[:-1]) + "\n")
    again = watch(server, loaded, Ledger(ledger_file), passes=1)
    assert again[0].scored == 1 and (_count(orthanc, "SR"), _count(orthanc, "SEG")) == (5, 5)


def test_network_errors_are_retried_with_bounded_backoff_then_reported(tmp_path):
    waits = []
    server = DicomWeb(f"http://127.0.0.1:{free_port()}/dicom-web", retries=3, backoff=0.5,
                      sleep=waits.append)  # fmt: skip
    with pytest.raises(NetworkError, match="failed 4 times"):
        list(server.search_instances({"Modality": "US"}))
    assert waits == [0.5, 1.0, 2.0]
    loaded = load_model(resolve_run(None), backend="auto")
    passes = watch(server, loaded, Ledger(tmp_path / "l.jsonl"), interval=1, passes=2,
                   sleep=waits.append)  # fmt: skip
    assert [p.scored for p in passes] == [0, 0]  # reported, and the watcher went on
    assert main(["pacs", server.url, "--state", str(tmp_path / "l.jsonl")]) == 2  # one line


def test_a_server_that_asks_for_credentials_gets_them_or_a_clear_error(
    tmp_path, monkeypatch, capsys
):
    with local_orthanc(tmp_path, users={"reader": "s3cret"}) as url:
        assert main(["pacs", url, "--state", str(tmp_path / "l.jsonl")]) == 2
        assert "HTTP 401" in capsys.readouterr().err
        assert main(["pacs", url, "--user", "reader"]) == 2
        assert "BUSDX_DICOMWEB_PASSWORD" in capsys.readouterr().err
        DicomWeb(url, auth=("reader", "s3cret")).store(_scans(1))
        monkeypatch.setenv("BUSDX_DICOMWEB_PASSWORD", "s3cret")
        assert main(["pacs", url, "--user", "reader", "--state", str(tmp_path / "l.jsonl")]) == 0
        assert "1 instance(s) scored" in capsys.readouterr().out
