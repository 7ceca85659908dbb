"""The repository keeps its promises: README's test command is CI's, one repository URL, Colab-safe
requirements, and quick mode read from the environment."""

import json
import os
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


def readme_device_job() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Refreshing the published results", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return next(block for block in blocks if '"$OUT"' in block)


def test_the_device_job_dry_runs_in_quick_mode(tmp_path):
    """README's GPU job, run as written on a copy of the repository in quick mode: each notebook
    executes in place and reaches $OUT with the model and the log, and quick mode ships nothing."""
    job = readme_device_job()
    assert len(job) < 2000, "the device tool takes commands of at most 2,000 characters"
    copy = tmp_path / "course"
    for name in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((ROOT / name).read_bytes())
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DDPM_QUICK": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("DDPM_EXPORT", None)
    done = subprocess.run(["bash", "-c", job], cwd=copy, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = ["04_training", "05_sampling", "06_ddim", "07_evaluation", "08_guidance"]
    models = ["fashion_mnist_ddpm.pt", "fashion_mnist_cfg.pt"]
    assert {p.name for p in out.iterdir()} == {f"{n}.ipynb" for n in names} | set(models) | {"log"}
    for name in names:
        executed = json.loads((copy / "notebooks" / f"{name}.ipynb").read_text())
        assert executed == json.loads((out / f"{name}.ipynb").read_text()), f"{name}: $OUT must hold the notebook as executed"
        code = [c for c in executed["cells"] if c["cell_type"] == "code"]
        assert all(c["execution_count"] for c in code), f"{name} did not run to the end"
        assert not [o for c in code for o in c["outputs"] if o["output_type"] == "error"], name
    for model in models:  # quick mode exports elsewhere: the shipped files come back unchanged
        assert (out / model).read_bytes() == (ROOT / "data" / "pretrained" / model).read_bytes()
    assert "failed=0" in (out / "log").read_text()


def test_deterministic_float32_makes_cudnn_repeatable_and_exact_then_restores_it():
    """What a CPU can check: the flags a GPU reads. cuDNN may otherwise pick algorithms whose sums
    change from run to run, and computes float32 convolutions in TF32 on Ampere and newer GPUs."""
    cudnn = torch.backends.cudnn
    before = (cudnn.enabled, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32)
    with ddpm_helpers.deterministic_float32():
        assert (cudnn.enabled, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32) == (before[0], False, True, False)
    assert (cudnn.enabled, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32) == before
