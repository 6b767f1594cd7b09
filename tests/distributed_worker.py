"""What tests/test_distributed.py runs in several processes, to see what every rank holds.

Only rank 0 writes checkpoints, so the other ranks' weights are out of sight of a test that
reads the run folder. Two ways in:

- as a torchrun target: ``torchrun --nproc_per_node=2 tests/distributed_worker.py OUT_DIR
  [train.py flags]`` runs train.py's ``main`` unchanged and then has every process write the
  networks it holds to ``OUT_DIR/rank<R>.pth`` (``{"G": state dict, "D": state dict}``);
- :func:`take_steps`, started by ``torch.multiprocessing.spawn``: the pix2pix model alone,
  a few steps on random batches (different on each rank) for each set of flags given.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import train as train_script  # noqa: E402
import training.loop  # noqa: E402
from models import create_model  # noqa: E402
from options.train_options import TrainOptions  # noqa: E402
from util.runtime import setup_runtime  # noqa: E402


def train_and_save_each_rank(out_dir: Path, argv: list[str]) -> None:
    """train.py's ``main`` on ``argv``; then ``out_dir/rank<R>.pth`` with this process's networks."""
    made = []
    make_model = training.loop.create_model

    def make_and_keep(*args, **kwargs):
        made.append(make_model(*args, **kwargs))
        return made[-1]

    training.loop.create_model = make_and_keep  # the loop builds the model; keep a handle on it
    options = TrainOptions()
    opt = options.parse(argv)
    train_script.main(opt, options)
    (model,) = made
    rank = int(os.environ.get("RANK", "0"))
    torch.save({name: net.state_dict() for name, net in model.networks().items()}, out_dir / f"rank{rank}.pth")


def take_steps(rank: int, world_size: int, rendezvous: str, configs: dict[str, list[str]], out_dir: str,
               steps: int = 2, nan_at: tuple[int, int] | None = None) -> None:
    """One process of ``world_size``: for each config, build the model, take ``steps`` steps, save its networks.

    Writes ``out_dir/<config>_rank<R>.pth`` with the networks' state dicts, the names of the
    networks wrapped in DDP (``"replicas"``) and each step's non-finite flag (``"nonfinite"``).
    ``nan_at=(rank, step)`` puts a NaN into that rank's target at that step (from 0).
    """
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world_size)
    try:
        for name, argv in configs.items():
            opt = TrainOptions().parse(argv)
            runtime = setup_runtime(opt)  # seeds with --seed + rank: each rank starts from other weights
            model = create_model(opt, runtime.device)
            model.setup(opt)
            model.train()
            batches = torch.Generator().manual_seed(1000 + rank)  # each rank sees other slices
            nonfinite = []
            for step in range(steps):
                a = torch.rand(2, opt.input_nc, 128, 128, generator=batches) * 2 - 1
                b = torch.rand(2, opt.output_nc, 128, 128, generator=batches) * 2 - 1
                if nan_at == (rank, step):
                    b[0, 0, 0, 0] = float("nan")
                model.set_input({"A": a, "B": b, "A_paths": ["a", "b"]})
                model.optimize_parameters()
                nonfinite.append(float(model.step_nonfinite))
            saved = {net_name: net.state_dict() for net_name, net in model.networks().items()}
            saved["replicas"] = sorted(model.replicas)
            saved["nonfinite"] = nonfinite
            torch.save(saved, Path(out_dir) / f"{name}_rank{rank}.pth")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    train_and_save_each_rank(Path(sys.argv[1]), sys.argv[2:])
