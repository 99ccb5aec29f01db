"""README's set-up and CI's set-up are one: both run scripts/setup.sh, the packages the
README shows are the script's, and the script installs every Debian package a lab
requirement names (so the preflight never asks for a package the set-up left out)."""

import re
import shlex
import subprocess

from tests.conftest import REPO
from tokenfabric.requirements import REQUIREMENTS, debian_packages

SCRIPT = "scripts/setup.sh"


def _script_packages() -> list[str]:
    done = subprocess.run(["bash", str(REPO / SCRIPT), "--list-packages"], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def _fenced_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.S | re.M)


def _commands(text: str) -> list[list[str]]:
    """Each shell command of a text (lines, then `&&` chains), as argv, comments dropped."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        for part in filter(None, (p.strip() for p in line.split("&&"))):
            out.append(shlex.split(part))
    return out


def test_readme_first_command_and_ci_run_the_same_set_up_script():
    readme = (REPO / "README.md").read_text()
    first = _commands(_fenced_blocks(readme.split("## Set-up", 1)[1])[0])
    assert first[0] == ["bash", SCRIPT], first
    assert first[1][:3] == [".venv/bin/tokenfabric", "lab", "run"]
    ci = _commands((REPO / ".ci" / "run").read_text())
    assert ["bash", SCRIPT] in ci
    # no second set-up path in CI: packages, venv and install come only from the script
    ci_text = " ".join(" ".join(c) for c in ci)
    for own_setup in ("apt-get install", "-m venv", "pip install"):
        assert own_setup not in ci_text, own_setup


def test_readme_shows_the_packages_the_script_installs():
    readme = (REPO / "README.md").read_text()
    shown = re.findall(r"apt-get install -y ([a-z0-9 .+-]+)", readme)
    assert shown, "the README shows no apt-get install line"
    packages = _script_packages()
    assert len(packages) == len(set(packages))
    for line in shown:
        assert sorted(line.split()) == sorted(packages)


def test_the_script_installs_every_debian_package_of_the_requirements():
    packages = set(_script_packages())
    assert debian_packages() <= packages, debian_packages() - packages
    # and every tool the lab needs has a Debian package or says how to get it
    for req in REQUIREMENTS:
        assert req.debian or req.how, req.name


def test_the_script_keeps_its_package_list_in_one_apt_packages_line():
    text = (REPO / SCRIPT).read_text()
    [line] = re.findall(r'^APT_PACKAGES="([^"]+)"$', text, flags=re.M)
    assert line.split() == _script_packages()
