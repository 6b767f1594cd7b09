"""Visdom for real: a server on loopback, train.py and a Visualizer posting to it, windows read back.

visdom is a requirement, so in CI (CI is set) and in the project's own ./.venv its absence is a
failure; in any other Python these tests skip and say why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, TINY_TRAIN_FLAGS, run_script
from test_visualizer import METRICS, training_options

from training.visualizer import CURVES_PNG, Visualizer, images_window, loss_window, validation_window

pytestmark = [
    pytest.mark.slow,
    # visdom 0.2.4's client calls the deprecated logger.warn when told not to open a socket.
    pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning"),
]

# The server without `python -m visdom.server`'s download of browser scripts (offline it fails).
SERVER_CODE = "from visdom.server.run_server import main; main()"
SERVER_START_S = 30


def visdom_or_skip() -> None:
    if importlib.util.find_spec("visdom") is not None:
        return
    in_project_venv = Path(sys.prefix).resolve() == (REPO / ".venv").resolve()
    if os.environ.get("CI") or in_project_venv:
        pytest.fail("visdom is not installed, though requirements.txt installs it (bash quickstart.sh test)")
    pytest.skip("visdom is not installed in this Python (bash quickstart.sh test installs it into ./.venv)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(port: int, env: str):
    import visdom

    logging.getLogger("visdom").setLevel(logging.ERROR)
    return visdom.Visdom(
        server="http://127.0.0.1", port=port, env=env, raise_exceptions=True, use_incoming_socket=False
    )


@contextlib.contextmanager
def visdom_server(folder: Path) -> Iterator[int]:
    """A Visdom server on 127.0.0.1 (its envs and log in ``folder``), answering; yields its port."""
    port = free_port()
    log_path = folder / "server.log"
    with open(log_path, "w") as log:
        command = [sys.executable, "-c", SERVER_CODE, "-port", str(port), "-env_path", str(folder), "-bind_local"]
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"the Visdom server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                if client(port, "main").check_connection():
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"no answer from the Visdom server in {SERVER_START_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def server_port(tmp_path_factory) -> Iterator[int]:
    visdom_or_skip()
    with visdom_server(tmp_path_factory.mktemp("visdom")) as port:
        yield port


def window(port: int, env: str, win: str) -> dict:
    """What Visdom holds for ``win`` in ``env`` (its reply is empty for a window that does not exist)."""
    reply = client(port, env).get_window_data(win, env)
    assert reply, f"no window {win!r} in env {env!r}"
    return json.loads(reply)


def lines(plot: dict) -> dict[str, dict]:
    """A plot window's lines by legend name: ``{"G_GAN": {"x": [...], "y": [...]}, ...}``."""
    return {trace["name"]: trace for trace in plot["content"]["data"]}


LOG_LINE = re.compile(
    r"^\(epoch: (\d+), step: \d+/\d+, slices: \d+, compute: [\d.]+ s/slice, data: [\d.]+ s/step\) (.*)$"
)


def logged_losses(loss_log: Path) -> list[tuple[int, dict[str, str]]]:
    """``(epoch, {"G_GAN": "0.693", ...})`` for each line of loss_log.txt, values as printed."""
    points = []
    for line in loss_log.read_text().splitlines():
        if match := LOG_LINE.match(line):
            pairs = match.group(2).split()  # "G_GAN:", "0.693", "G_L1:", "8.812", ...
            values = {name.rstrip(":"): value for name, value in zip(pairs[::2], pairs[1::2])}
            points.append((int(match.group(1)), values))
    return points


def without_display_id(flags: list[str]) -> list[str]:
    i = flags.index("--display_id")
    return flags[:i] + flags[i + 2 :]


def test_training_posts_losses_images_and_validation(server_port, phantom_root, tmp_path, one_thread):
    env = f"live_train_{os.getpid()}"
    result = run_script(
        "train.py", "--dataroot", phantom_root, "--name", "live", *without_display_id(TINY_TRAIN_FLAGS),
        "--display_id", "1", "--display_server", "http://127.0.0.1", "--display_port", server_port,
        "--display_env", env, "--print_freq", "4", "--display_freq", "8", "--max_dataset_size", "16",
        "--n_epochs", "1", "--n_epochs_decay", "1",
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Visdom" not in result.stdout + result.stderr  # no "no server" warning

    logged = logged_losses(tmp_path / "checkpoints" / "live" / "loss_log.txt")
    assert len(logged) == 2 * 4  # 16 slices, 4 a batch, a line every batch, two epochs
    losses = window(server_port, env, loss_window(1))
    assert losses["type"] == "plot" and losses["title"] == "live: training losses"
    plotted = lines(losses)
    assert list(plotted) == list(logged[0][1])  # G_GAN, G_L1, D_real, D_fake, in the log's order
    for name, line in plotted.items():
        assert [f"{y:.3f}" for y in line["y"]] == [values[name] for _, values in logged], name
        # x = epochs done: epoch E's points within (E - 1, E], increasing
        assert all(epoch - 1 < x <= epoch for x, (epoch, _) in zip(line["x"], logged, strict=True)), line["x"]
        assert line["x"] == sorted(line["x"])

    images = window(server_port, env, images_window(1))
    assert images["type"] == "image" and images["title"] == "live: real_A | fake_B | real_B"

    # The phantom has testA/ + testB/, so each epoch ends with a validation (the default --val_freq).
    for metric in ("mae_hu", "psnr_db", "ssim"):
        validation = lines(window(server_port, env, validation_window(1, metric)))
        assert list(validation) == ["model", "input average"], metric
        assert validation["model"]["x"] == validation["input average"]["x"] == [1, 2], metric


def test_validation_curves_show_each_metric_beside_its_baseline(server_port, tmp_path):
    env = f"live_validation_{os.getpid()}"
    options = training_options(tmp_path, display_id=3, display_port=server_port, display_env=env)
    visualizer = Visualizer(options)
    assert visualizer.vis is not None
    for epoch in (1, 2):
        visualizer.plot_validation(epoch, {key: value + epoch for key, value in METRICS.items()})

    mae = window(server_port, env, validation_window(3, "mae_hu"))
    assert mae["title"].startswith("run: validation: MAE (HU)")
    assert {name: (line["x"], line["y"]) for name, line in lines(mae).items()} == {
        "model": ([1, 2], [METRICS["mae_hu"] + 1, METRICS["mae_hu"] + 2]),
        "input average": ([1, 2], [METRICS["baseline_mae_hu"] + 1, METRICS["baseline_mae_hu"] + 2]),
    }
    for metric in ("psnr_db", "ssim"):
        assert list(lines(window(server_port, env, validation_window(3, metric)))) == ["model", "input average"]
    assert list(lines(window(server_port, env, validation_window(3, "lpips")))) == ["model"]  # no baseline given
    assert client(server_port, env).get_window_data(validation_window(3, "n_patients"), env) == ""  # not a metric

    # A run resumed at epoch 2 shows epoch 1 at once, in a fresh env here to tell it apart.
    resumed_env = env + "_resumed"
    options.display_env, options.continue_train, options.epoch_count = resumed_env, True, 2
    Visualizer(options)
    assert lines(window(server_port, resumed_env, validation_window(3, "mae_hu")))["model"]["x"] == [1]


def test_a_server_that_goes_away_turns_visdom_off_with_one_warning(tmp_path, caplog):
    visdom_or_skip()
    with visdom_server(tmp_path) as port:
        visualizer = Visualizer(training_options(tmp_path, display_id=1, display_port=port))
        assert visualizer.vis is not None
    with caplog.at_level(logging.WARNING):
        visualizer.plot_validation(1, METRICS)
        visualizer.plot_validation(2, METRICS)
    assert visualizer.vis is None
    warnings = [r.getMessage() for r in caplog.records if "Visdom" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("Visdom stopped answering"), warnings
    assert (visualizer.web_dir / "images" / CURVES_PNG).is_file()  # the page goes on without Visdom
