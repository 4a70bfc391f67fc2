"""The README's quick start is what CI and the tests run: its test command is .ci/run's, and its
first command installs what .ci/run installs (without the test extra) and runs ``rayk demo``,
which tests/test_cli.py runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_the_quick_start_has_the_demo_then_the_tests():
    demo, tests = quick_start_commands()
    assert demo.endswith("&& rayk demo")
    assert tests.endswith("&& python -m pytest -q")


def test_the_test_command_is_the_one_ci_runs():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert quick_start_commands()[1] == ci_command


def test_the_demo_command_installs_what_ci_installs_and_the_demo_is_tested():
    demo, tests = quick_start_commands()
    install = tests.removesuffix(" && python -m pytest -q").replace('-e ".[test]"', "-e .")
    assert demo == f"{install} && rayk demo"
    assert '"demo"' in (ROOT / "tests" / "test_cli.py").read_text()
