"""The README's set-up commands are what CI runs; the evidence it and docs/ link is committed."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(lines):
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _block(readme: str, name: str) -> list[str]:
    block = readme.split(f"<!-- {name}:start -->")[1].split(f"<!-- {name}:end -->")[0]
    return _commands(line for line in block.splitlines() if not line.startswith("```"))


def test_ci_runs_the_readme_setup_commands_verbatim():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup, browser = _block(readme, "setup"), _block(readme, "browser")
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    ci_commands = [c for c in _commands(ci_lines) if not c.startswith(("set ", "cd "))]
    assert len(setup) == 2 and len(browser) == 1
    assert ci_commands == [setup[0], *browser, setup[1]]


def test_every_evidence_link_in_the_readme_and_docs_is_committed():
    """A number is only as good as its evidence: each relative link of README.md and docs/*.md
    must point at a file that git tracks (not one that .gitignore hides)."""
    tracked = set(
        subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.splitlines()
    )
    missing = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path = (page.parent / target).resolve().relative_to(ROOT)
            if not (ROOT / path).is_dir() and str(path) not in tracked:
                missing.append(f"{page.name}: {target}")
    assert not missing, missing
