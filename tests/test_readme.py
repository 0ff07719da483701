"""The README's two set-up commands are exactly what CI runs."""

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
