"""The repository keeps its promises: README's test command is CI's, one repository URL, Colab-safe
requirements, and quick mode read from the environment."""

import json
import os
import re
import subprocess
import sys
import tempfile
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


# Stand-ins for notebooks 04-08 in the dry run of README's GPU job: the job is tested, not the notebooks
# (nbval executes those), so each stand-in does only what the job relies on, in two cells.
TINY_UNET = "dict(image_size=28, base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[], dropout=0.0, norm_groups=4)"
STAND_IN_SETUP = "import os, sys, tempfile\nfrom pathlib import Path\nsys.path.insert(0, str(Path.cwd().parent))  # the course folder, as the set-up cells do\nimport ddpm_helpers as h\nimages, labels = h.load_fashion_mnist('train')\nprint(len(images), 'training images from', os.environ.get('DDPM_DATA_DIR'))"
STAND_IN_EXPORT = """resumable = Path(tempfile.mkdtemp()) / 'run.pt'
config = h.TrainConfig(steps=2, batch_size=4, warmup_steps=1, timesteps=50, checkpoint_every=2, seed={seed})
h.train(h.UNet(**{unet}{classes}), images, config, checkpoint_path=resumable, device='cpu', progress=False{labels})
print('exported to', h.in_course(h.export_checkpoint(resumable, h.export_target({variable}))))"""
STAND_IN_LOAD = "model, schedule, checkpoint = h.load_course_model(device='cpu')\nprint('loaded the model trained with seed', checkpoint['train_config']['seed'])"
STAND_INS = {
    "04_training": STAND_IN_EXPORT.format(seed=404, unet=TINY_UNET, classes="", labels="", variable=""),
    "05_sampling": STAND_IN_LOAD,
    "06_ddim": STAND_IN_LOAD,
    "07_evaluation": STAND_IN_LOAD,
    "08_guidance": STAND_IN_EXPORT.format(seed=808, unet=TINY_UNET, classes=", num_classes=10", labels=", labels=labels", variable="h.GUIDANCE_EXPORT_VARIABLE"),
    "09_fast_samplers": STAND_IN_LOAD,
}
JOB_NOTEBOOKS = list(STAND_INS)
JOB_MODELS = ["fashion_mnist_ddpm.pt", "fashion_mnist_cfg.pt"]


def run_device_job(folder: Path, failing: str | None = None) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """README's GPU job, run as written on a copy of the repository whose notebooks 04-08 are stand-ins
    (``failing`` raises in its second cell) and whose data/fashion-mnist holds 8 images: the copy and $OUT."""
    import nbformat

    job = readme_device_job()
    assert len(job) < 2000, "the device tool takes commands of at most 2,000 characters"
    copy = folder / "course"
    for name in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((ROOT / name).read_bytes())
    for name, code in STAND_INS.items():
        code = "raise RuntimeError('a stand-in that fails')" if name == failing else code
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(STAND_IN_SETUP), nbformat.v4.new_code_cell(code)])
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(notebook, copy / "notebooks" / f"{name}.ipynb")
    generator = torch.Generator().manual_seed(0)
    for stem, shape in (("train-images-idx3-ubyte", (8, 28, 28)), ("train-labels-idx1-ubyte", (8,))):
        ddpm_helpers.write_idx(copy / "data" / "fashion-mnist" / f"{stem}.gz", torch.randint(0, 10 if len(shape) == 1 else 256, shape, generator=generator).numpy())
    out = folder / "out"
    env = {**os.environ, "OUT": str(out), "DDPM_QUICK": "0", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for variable in ("DDPM_EXPORT", "DDPM_CFG_EXPORT", "DDPM_WORK_DIR", "DDPM_MODEL", "DDPM_DATA_DIR"):
        env.pop(variable, None)
    done = subprocess.run(["bash", "-c", job], cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    return done, copy, out


def cell_text(cell) -> str:
    return "".join("".join(o.get("text", "")) + "".join(o.get("traceback", [])) for o in cell["outputs"])


def test_the_device_job_runs_the_notebooks_in_order_and_their_exports_reach_out(tmp_path):
    """04's export is what 05-07 load and what reaches $OUT, 08's too; each notebook executes in place
    and $OUT holds it as executed; the data folder reaches the notebooks."""
    done, copy, out = run_device_job(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {f"{n}.ipynb" for n in JOB_NOTEBOOKS} | set(JOB_MODELS) | {"log"}
    log = (out / "log").read_text()
    assert [line.split()[1] for line in log.splitlines() if line.startswith("== 0")] == JOB_NOTEBOOKS and "failed=0" in log
    for name in JOB_NOTEBOOKS:
        executed = json.loads((copy / "notebooks" / f"{name}.ipynb").read_text())
        assert executed == json.loads((out / f"{name}.ipynb").read_text()), f"{name}: $OUT must hold the notebook as executed"
        setup, work = executed["cells"]
        assert f"8 training images from {copy / 'data' / 'fashion-mnist'}" in cell_text(setup), name
        if name in ("05_sampling", "06_ddim", "07_evaluation", "09_fast_samplers"):
            assert "loaded the model trained with seed 404" in cell_text(work), name
    for model, seed in zip(JOB_MODELS, (404, 808)):  # the exports went over the copy's shipped files, and on to $OUT
        assert (out / model).read_bytes() == (copy / "data" / "pretrained" / model).read_bytes()
        assert ddpm_helpers.read_checkpoint(out / model)["train_config"]["seed"] == seed


def test_the_device_job_reports_a_failed_notebook_and_keeps_what_it_ran(tmp_path):
    """A notebook that fails: the job goes on to the next, exits 1, and $OUT has the failed notebook up
    to the failing cell (it is copied after every cell)."""
    done, _, out = run_device_job(tmp_path, failing="06_ddim")
    assert done.returncode == 1 and "failed=1" in (out / "log").read_text()
    setup, failed = json.loads((out / "06_ddim.ipynb").read_text())["cells"]
    assert "8 training images" in cell_text(setup) and "a stand-in that fails" in cell_text(failed)
    later = json.loads((out / "08_guidance.ipynb").read_text())["cells"]
    assert "exported to data/pretrained/fashion_mnist_cfg.pt" in cell_text(later[1])


def test_quick_mode_exports_to_a_temporary_file_whatever_the_environment_says(tmp_path):
    """So a quick run of notebooks 04 and 08 (the test command, or the GPU job run in quick mode) never
    replaces the model that later notebooks load or that the course ships."""
    code = "import ddpm_helpers as h; print(h.export_target()); print(h.export_target(h.GUIDANCE_EXPORT_VARIABLE, 'mine.pt'))"
    targets = {"DDPM_EXPORT": str(tmp_path / "a.pt"), "DDPM_CFG_EXPORT": str(tmp_path / "b.pt")}
    for quick, env in (("0", targets), ("0", {}), ("1", targets)):
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env, "DDPM_QUICK": quick}, capture_output=True, text=True, check=True)
        first, second = map(Path, done.stdout.split())
        if quick == "1":
            assert first.parent != second.parent and tempfile.gettempdir() == str(first.parent.parent) == str(second.parent.parent)
        elif env:
            assert (first, second) == (tmp_path / "a.pt", tmp_path / "b.pt")
        else:
            assert (first, second) == (ddpm_helpers.student_model_path(), Path("mine.pt"))


def test_deterministic_float32_makes_cudnn_repeatable_and_exact_then_restores_it():
    """What a CPU can check: the flags a GPU reads. cuDNN may otherwise pick algorithms whose sums
    change from run to run, and computes float32 convolutions in TF32 on Ampere and newer GPUs."""
    cudnn = torch.backends.cudnn
    before = (cudnn.enabled, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32)
    with ddpm_helpers.deterministic_float32():
        assert (cudnn.enabled, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32) == (before[0], False, True, False)
    assert (cudnn.enabled, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32) == before
