"""The README's two set-up commands are exactly what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(lines):
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_the_readme_setup_commands_verbatim():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- setup:start -->")[1].split("<!-- setup:end -->")[0]
    readme_commands = _commands(line for line in block.splitlines() if not line.startswith("```"))
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    ci_commands = [c for c in _commands(ci_lines) if not c.startswith(("set ", "cd "))]
    assert len(readme_commands) == 2
    assert readme_commands == ci_commands
