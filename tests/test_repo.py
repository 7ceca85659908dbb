"""The repository keeps its promises: README's test command is CI's, one repository URL, Colab-safe
requirements, and quick mode read from the environment."""

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

import ddpm_helpers

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^.*DDPM_QUICK=1 python -m pytest.*$", readme, flags=re.M)
    assert commands, "README must give the test command"
    return commands[0].split("&& ")[-1].strip()


def test_ci_runs_exactly_the_readme_test_command():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert readme_test_command() in ci


def test_every_badge_and_colab_setup_uses_the_one_repository_url():
    owner_repo = ddpm_helpers.REPO_URL.removeprefix("https://github.com/")
    texts = {"README.md": (ROOT / "README.md").read_text()}
    texts.update({nb.name: nb.read_text() for nb in NOTEBOOKS})
    for name, text in texts.items():
        for url in re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", text):
            assert url == ddpm_helpers.REPO_URL, f"{name} uses {url}"
        for path in re.findall(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)", text):
            assert path == owner_repo, f"{name} has a Colab badge for {path}"


def test_each_notebook_has_its_own_colab_badge_and_set_up_cell_first():
    assert len(NOTEBOOKS) >= 2
    for notebook in NOTEBOOKS:
        cells = json.loads(notebook.read_text())["cells"]
        assert f"blob/main/notebooks/{notebook.name})" in "".join(cells[0]["source"]), notebook.name
        first_code = next(c for c in cells if c["cell_type"] == "code")
        assert "google.colab" in "".join(first_code["source"]), f"{notebook.name}: set-up cell must come first"


def test_notebooks_are_committed_executed_and_small():
    for notebook in NOTEBOOKS:
        cells = json.loads(notebook.read_text())["cells"]
        unrun = [c for c in cells if c["cell_type"] == "code" and c["execution_count"] is None and "".join(c["source"]).strip()]
        assert not unrun, f"{notebook.name} has code cells without outputs"
        assert notebook.stat().st_size < 5e6, f"{notebook.name} is too big to render on GitHub"


def test_requirements_keep_colabs_preinstalled_torch():
    lines = [l.split("#")[0].strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    for line in filter(None, lines):
        assert "==" not in line and "<" not in line, f"{line!r} would force a reinstall on Colab"
    names = {re.split(r"[<>=!~ ]", line)[0].lower() for line in lines if line}
    assert {"torch", "torchvision", "datasets", "einops", "matplotlib", "tqdm", "jupyter", "nbval", "numpy"} <= names


def test_quick_mode_is_read_from_the_environment():
    code = "import ddpm_helpers as h; print(h.QUICK, h.by_mode(full='full', quick='quick'))"
    for value, expected in (("1", "True quick"), ("0", "False full"), ("", "False full")):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"DDPM_QUICK": value}, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


def test_seed_everything_reproduces_random_draws():
    generator = ddpm_helpers.seed_everything(7)
    first = (torch.randn(3), torch.randn(3, generator=generator))
    generator = ddpm_helpers.seed_everything(7)
    second = (torch.randn(3), torch.randn(3, generator=generator))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], torch.randn(3))


def test_colab_set_up_installs_only_runtime_packages_and_retries_a_failed_install():
    requirements = {line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()}
    for notebook in NOTEBOOKS:
        cells = json.loads(notebook.read_text())["cells"]
        setup = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
        packages = re.search(r"RUNTIME_PACKAGES = (\[.*\])", setup)
        assert packages, f"{notebook.name}: the set-up cell must name its RUNTIME_PACKAGES"
        listed = eval(packages.group(1))
        assert set(listed) <= requirements, f"{notebook.name}: {listed} must match requirements.txt"
        assert not {"jupyter", "nbval", "pytest"} & {re.split(r"[<>=]", p)[0] for p in listed}
        # the install sits outside the `if not ROOT.exists()` that guards the clone, so it runs every time
        clone_guard = setup.index("if not ROOT.exists():")
        install = setup.index('"pip", "install"')
        guarded_block = setup[clone_guard:install]
        assert "\n    subprocess.run([sys.executable" in setup[clone_guard:], notebook.name
        assert guarded_block.count("\n        ") == 1, f"{notebook.name}: the install must not depend on the clone"


def test_requirements_name_a_torch_with_the_device_type_grad_scaler():
    torch_line = next(l for l in (ROOT / "requirements.txt").read_text().splitlines() if l.startswith("torch>="))
    minimum = tuple(int(part) for part in torch_line.split("#")[0].strip().removeprefix("torch>=").split("."))
    assert minimum >= (2, 3), "torch.amp.GradScaler(device_type, ...) needs torch 2.3"
