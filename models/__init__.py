"""Model plug-ins: ``--model X`` finds ``models/X_model.py``.

A plug-in module defines a :class:`models.base_model.BaseModel` subclass and registers it
with ``@MODELS.register("X")``. This package knows tensors, never files of data: it does
not import ``data``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from util.registry import PluginRegistry

MODELS = PluginRegistry("model", "models", Path(__file__).parent, "_model")
MODEL_NAMES = MODELS.names


def find_model_using_name(model_name: str):
    """The model class registered as ``model_name`` (imports its module)."""
    return MODELS.load(model_name)


def get_option_setter(model_name: str):
    return find_model_using_name(model_name).modify_commandline_options


def create_model(opt: argparse.Namespace, device: torch.device):
    """Build the model named by ``opt.model`` on ``device``; call ``model.setup(opt)`` next."""
    return find_model_using_name(opt.model)(opt, device)
