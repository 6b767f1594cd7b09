"""Model export: the reference's snippet runs on a CPU machine; export_model.py writes checked exports."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

import export_model
from inference.export import VERIFY_BATCH, example_input
from inference.volume import load_generator
from models.networks import define_G
from options.cli import run_cli
from tests.conftest import REPO, run_script

# The reference's "Model Export" snippet exactly as written there, except gpu_ids=[0] -> gpu_ids=[]
# (the reference's own instruction for a machine without a GPU).
REFERENCE_SNIPPET = textwrap.dedent("""
    # Load trained model
    import torch
    from models.networks import define_G

    generator = define_G(input_nc=1, output_nc=1, ngf=64,
                        netG="unet_512", norm="instance",
                        use_dropout=False, init_gain=0.02, gpu_ids=[])

    # Load weights
    state_dict = torch.load("checkpoints/ct_phase0_generator_optimized/latest_net_G.pth")
    generator.load_state_dict(state_dict)
    generator.eval()

    # Save for deployment
    torch.save(generator.state_dict(), "ct_phase_generator_production.pth")
""")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_reference_export_snippet_runs_on_cpu(tmp_path):
    """A checkpoint as the reference's training command leaves it (unet_512, ngf 64, instance
    norm, dropout on: dropout has no weights, so the snippet's use_dropout=False still fits)."""
    run_folder = tmp_path / "checkpoints" / "ct_phase0_generator_optimized"
    run_folder.mkdir(parents=True)
    torch.manual_seed(0)
    trained = define_G(1, 1, 64, "unet_512", "instance", True, "normal", 0.02, [])
    torch.save(trained.state_dict(), run_folder / "latest_net_G.pth")
    (tmp_path / "snippet.py").write_text(REFERENCE_SNIPPET)

    environment = {**os.environ, "PYTHONPATH": str(REPO)}  # users run it from the repository root
    result = subprocess.run(
        [sys.executable, "snippet.py"], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )

    assert result.returncode == 0, result.stderr
    production = torch.load(tmp_path / "ct_phase_generator_production.pth", weights_only=True)
    expected = trained.state_dict()
    assert production.keys() == expected.keys()
    assert all(torch.equal(production[k], expected[k]) for k in expected)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_run) -> tuple[Path, subprocess.CompletedProcess]:
    output_dir = tmp_path_factory.mktemp("exports")
    result = run_script(
        "export_model.py",
        "--model_name",
        tiny_run.name,
        "--epoch",
        "latest",
        "--checkpoints_dir",
        tiny_run.parent,
        "--output_dir",
        output_dir,
        cwd=output_dir,
        timeout=300,
    )
    return output_dir, result


@pytest.mark.slow
def test_export_model_writes_both_formats_and_checks_them(exported, tiny_run):
    output_dir, result = exported
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in output_dir.iterdir()) == ["tiny_latest_G.json", "tiny_latest_G.onnx", "tiny_latest_G.pt"]
    report = result.stdout.splitlines()
    assert any(line.startswith("torchscript:") and line.endswith("ok") for line in report), result.stdout
    assert any(line.startswith("onnx:") and line.endswith("ok") for line in report), result.stdout

    # Check again here, independently of the script: same input, eager vs exported.
    generator = load_generator(tiny_run.parent, tiny_run.name, "latest")
    batch = example_input(generator, VERIFY_BATCH, seed=7)  # (3, 1, 128, 128) in [-1, 1]
    with torch.no_grad():
        expected = generator.net(batch).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated upstream
        scripted = torch.jit.load(str(output_dir / "tiny_latest_G.pt"), map_location="cpu")
    with torch.no_grad():
        from_torchscript = scripted(batch).numpy()
    session = onnxruntime.InferenceSession(str(output_dir / "tiny_latest_G.onnx"), providers=["CPUExecutionProvider"])
    (onnx_input,) = session.get_inputs()
    assert onnx_input.name == "real_A" and isinstance(onnx_input.shape[0], str)  # dynamic batch axis
    assert onnx_input.shape[1:] == [1, 128, 128]
    from_onnx = session.run(["fake_B"], {"real_A": batch.numpy()})[0]

    assert expected.shape == from_torchscript.shape == from_onnx.shape == (3, 1, 128, 128)
    assert np.abs(from_torchscript - expected).max() <= 1e-4
    assert np.abs(from_onnx - expected).max() <= 1e-4


def test_export_above_tolerance_fails(tmp_path, tiny_run, capsys):
    argv = [
        "--model_name",
        tiny_run.name,
        "--checkpoints_dir",
        str(tiny_run.parent),
        "--output_dir",
        str(tmp_path),
        "--format",
        "torchscript",
        "--tolerance",
        "-1",
    ]  # no difference is below -1
    assert run_cli(export_model.main, export_model.get_args_parser(), argv) == 1
    error = capsys.readouterr().err
    assert error.startswith("export_model.py: error: ") and "tiny_latest_G.pt" in error and error.count("\n") == 1


def test_export_of_a_missing_checkpoint_gives_one_line(tmp_path, tiny_run, capsys):
    argv = [
        "--model_name",
        tiny_run.name,
        "--epoch",
        "3",
        "--checkpoints_dir",
        str(tiny_run.parent),
        "--output_dir",
        str(tmp_path / "exports"),
    ]
    assert run_cli(export_model.main, export_model.get_args_parser(), argv) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"export_model.py: error: {tiny_run / '3_net_G.pth'}: ") and error.count("\n") == 1
    assert not (tmp_path / "exports").exists()
