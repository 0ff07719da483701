"""Tally ``mutmut results --all true`` by module: killed, survived, no test, timeout.

Run from the folder where ``mutmut run`` ran (its ``mutants/`` holds the verdicts)::

    mutmut run && python experiments/mutation_report.py --out docs/quality/mutation-after.json

Killed share = (killed + timeout) / all mutants; a mutant that no selected test reaches
("no tests") counts as not killed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path


def tally(lines: list[str]) -> dict[str, dict[str, float]]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for line in lines:
        name, sep, verdict = line.strip().rpartition(": ")
        if sep and name.startswith("busdx."):
            counts[name.split(".")[1]][verdict] += 1
    table = {}
    for module, verdicts in sorted(counts.items()):
        total = sum(verdicts.values())
        killed = verdicts["killed"] + verdicts["timeout"]
        table[module] = {**verdicts, "total": total, "killed_share": round(killed / total, 3)}
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mutmut", default=str(Path(sys.executable).parent / "mutmut"))
    args = parser.parse_args()
    output = subprocess.run([args.mutmut, "results", "--all", "true"], capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    table = tally(output.splitlines())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    for module, row in table.items():
        print(f"{module:<12} {row['killed_share']:.1%} killed of {row['total']} ({dict(row)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
