"""The README's commands and code run as shown, on the run the quick start's demo trains.

The demo's run folder is made here from the very training command of ``quickstart.sh`` (with
untrained weights and the tiny phantom), so a change of the demo's flags that the README's
snippets do not follow fails here.
"""

from __future__ import annotations

import json
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference.volume import load_generator
from models.networks import define_G
from options.train_options import TrainOptions
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
DEMO_NAME = "ct_phase0_demo"

pytestmark = pytest.mark.usefixtures("one_thread")


def readme_blocks(heading: str, language: str) -> list[str]:
    """The ``language`` code blocks of the README section that starts with ``heading``."""
    start = README.index(heading)
    end = README.find("\n## ", start + len(heading))
    section = README[start : end if end > 0 else None]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)


def quickstart_training_flags() -> list[str]:
    """The flags of quickstart.sh's ``train.py`` command, its shell variables left in."""
    script = (REPO / "quickstart.sh").read_text().replace("\\\n", " ")
    (command,) = [line for line in script.splitlines() if line.strip().startswith('"$PY" train.py')]
    return shlex.split(command)[2:]


def make_demo_run(checkpoints_dir: Path, dataroot: Path) -> Path:
    """``<checkpoints_dir>/ct_phase0_demo`` as the quick start leaves it, with untrained weights
    (the output layer not zeroed, so that a residual network differs from a plain one)."""
    flags = [{"$DATA": str(dataroot), "$NAME": DEMO_NAME}.get(flag, flag) for flag in quickstart_training_flags()]
    options = TrainOptions()
    opt = options.parse([*flags, "--checkpoints_dir", str(checkpoints_dir), "--gpu_ids", "-1"])
    run_folder = checkpoints_dir / DEMO_NAME
    options.save(opt, run_folder, "train")
    torch.manual_seed(0)
    net = define_G(opt.input_nc, opt.output_nc, opt.ngf, opt.netG, opt.norm, not opt.no_dropout)
    torch.save(net.state_dict(), run_folder / "latest_net_G.pth")
    return run_folder


def test_the_model_export_snippet_rebuilds_the_demos_generator(tmp_path, phantom_root, monkeypatch):
    run_folder = make_demo_run(tmp_path / "checkpoints", phantom_root)
    (snippet,) = readme_blocks("**Model Export**", "python")
    monkeypatch.chdir(tmp_path)  # the snippet's paths are relative to the repository root
    (tmp_path / "snippet.py").write_text(snippet)

    generator = runpy.run_path(str(tmp_path / "snippet.py"))["generator"]  # loads strictly: same architecture

    # The same network as the run folder describes (residual included), weights and all.
    expected = load_generator(run_folder.parent, DEMO_NAME).net
    channels = json.loads((run_folder / "train_opt.json").read_text())["input_nc"]
    batch = torch.rand(2, channels, 128, 128) * 2 - 1
    with torch.no_grad():
        assert torch.equal(generator(batch), expected(batch))
    production = torch.load(tmp_path / "ct_phase_generator_production.pth", weights_only=True)
    assert production.keys() == expected.state_dict().keys()


def test_the_readme_shows_the_onnx_example_as_it_is():
    shown = readme_blocks("## Exported models describe themselves", "python")
    assert (REPO / "examples" / "run_onnx_export.py").read_text() in shown


def test_the_environment_file_makes_the_environment_the_reference_activates():
    # The reference's Step 1: `conda env create -f environment.yml; conda activate pytorch-img2img`
    assert "\nname: pytorch-img2img\n" in (REPO / "environment.yml").read_text()


def readme_commands(*headings: str) -> list[list[str]]:
    """The ``python ...`` commands of the bash blocks in the README sections ``headings``, but training."""
    commands = []
    for heading in headings:
        for block in readme_blocks(heading, "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line)
                if words[:1] == ["python"] and words[1] != "train.py":
                    commands.append(words[1:])
    return commands


@pytest.mark.slow
def test_the_commands_after_training_run_on_the_demos_run(tmp_path, phantom_root):
    """Step 7, batch, export and the ONNX example, as the README writes them, right after the
    quick start (its data set at ./datasets/ct_phases_dataset, its run in ./checkpoints)."""
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "ct_phases_dataset").symlink_to(phantom_root)
    make_demo_run(tmp_path / "checkpoints", tmp_path / "datasets" / "ct_phases_dataset")
    commands = readme_commands("## The reference's commands", "## Exported models describe themselves")
    scripts = [command[0] for command in commands]
    assert scripts == ["test.py", "use_model.py", "batch_process_patients.py", "export_model.py",
                       "examples/run_onnx_export.py"]

    for script, *args in commands:
        result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=tmp_path, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, f"{script}: {result.stderr}"
    for output in ("results/ct_phase0_demo/test_latest/index.html", "results/patient_1_phase0.nii.gz",
                   "processed_results/patient_1_phase0.nii.gz", "exports/ct_phase0_demo_latest_G.onnx",
                   "exports/ct_phase0_demo_latest_G.json", "results/patient_1_phase0_onnx.nii.gz"):
        assert (tmp_path / output).is_file(), output


def test_the_recommended_command_is_the_references_with_the_preset(phantom_root):
    (command,) = [
        block.replace("\\\n", " ") for block in readme_blocks("### The recommended recipe", "bash")
        if block.startswith("python train.py")
    ]
    words = shlex.split(command)[2:]
    opt = TrainOptions().parse([*words, "--dataroot", str(phantom_root), "--gpu_ids", "-1"])
    # the preset's measured values, with the reference's resolution and generator
    assert (opt.residual, opt.intensity, opt.context_slices, opt.input_nc, opt.gan_mode, opt.l1_region) == (
        True, "hu", 1, 3, "lsgan", "body")
    assert (opt.netG, opt.resize_to, opt.lr, opt.lambda_L1) == ("unet_512", 512, 0.0002, 1000.0)


@pytest.mark.slow
def test_the_whole_cycle_commands_run_as_written(tmp_path, cycle_root, monkeypatch):
    """The section's commands in order, from the repository root's point of view: the phantom command
    is the fixture's layout (all phases, 4D files; made smaller), training is its options saved with
    untrained weights, and test.py, use_model.py and batch_process_patients.py run as written."""
    commands = []
    for block in readme_blocks("## The whole breathing cycle", "bash"):
        commands += [shlex.split(line)[1:] for line in block.replace("\\\n", " ").splitlines() if line.startswith("python ")]
    phantom, train, *after = commands
    assert [phantom[0], train[0], *(command[0] for command in after)] == [
        "datasets/make_phantom.py", "train.py", "test.py", "use_model.py", "batch_process_patients.py"]
    assert "--write_all_phases" in phantom
    dataroot = phantom[phantom.index("--output_dir") + 1]
    (tmp_path / dataroot).parent.mkdir(parents=True)
    (tmp_path / dataroot).symlink_to(cycle_root)

    monkeypatch.chdir(tmp_path)
    options = TrainOptions()
    opt = options.parse([*train[1:], "--gpu_ids", "-1"])
    assert (opt.dataroot, opt.phase_list, opt.num_phases) == (dataroot, [0, 1, 2, 3], 4)
    run_folder = Path(opt.checkpoints_dir) / opt.name
    options.save(opt, run_folder, "train")
    torch.manual_seed(0)
    net = define_G(opt.input_nc, opt.output_nc, opt.ngf, opt.netG, opt.norm, not opt.no_dropout)
    torch.save(net.state_dict(), run_folder / "latest_net_G.pth")

    for script, *args in after:
        result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=tmp_path, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, f"{script}: {result.stderr}"
    metrics = json.loads((tmp_path / "results" / opt.name / "test_latest" / "metrics.json").read_text())
    assert [row["phase"] for row in metrics["phase_rows"][:5]] == [0, 1, 2, 3, "mip"]
    for output in ("results/patient_1_phases.nii.gz", "results/patient_1_mip.nii.gz",
                   "results/patient_1_average.nii.gz", "processed_cycle/patient_2_phase3.nii.gz",
                   "processed_cycle/summary.csv"):
        assert (tmp_path / output).is_file(), output
