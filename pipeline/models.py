"""Building the classifier of an experiment and fingerprinting it.

A model is a torchvision architecture (``arch``, with ``num_classes`` and optional
torchvision ``weights``) or any ``module:callable`` factory. A ``checkpoint`` is a
state_dict (or a dict holding one under ``state_dict`` or ``model``), loaded with
``weights_only=True``; a ``module.`` prefix left by DataParallel is removed. A
checkpoint that does not fit the architecture fails here, naming the file and
the mismatching keys, before any shard runs.

:func:`apply_compute` applies the config's ``compute`` section to a built model: the forward
under :func:`torch.autocast` at ``precision`` and the ``channels_last`` layout.
"""
from __future__ import annotations

import importlib
import types
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .config import ComputeConfig, ModelConfig
from .digests import file_digest, json_digest
from .errors import PipelineError

__all__ = ["ModelError", "build_model", "load_checkpoint", "model_digest", "select_device", "apply_compute"]


class ModelError(PipelineError, ValueError):
    """The model cannot be built or its checkpoint does not fit."""


def _factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelError(f"model.factory: cannot import {module_name!r}: {error}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"model.factory: {module_name!r} has no callable {attr!r}")
    return factory


def _torchvision_model(config: ModelConfig) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if config.arch not in known:
        raise ModelError(f"model.arch: unknown torchvision architecture {config.arch!r}; known: {', '.join(known)}")
    kwargs: dict[str, Any] = dict(config.kwargs)
    if config.num_classes is not None and config.weights is None:
        kwargs["num_classes"] = config.num_classes
    model = torchvision.models.get_model(config.arch, weights=config.weights, **kwargs)
    if config.weights is not None and config.num_classes is not None:
        _replace_head(model, config.num_classes)
    return model


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last linear layer for one with ``num_classes`` outputs (fine-tuning setup)."""
    name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    if head.out_features == num_classes:
        return
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Linear(head.in_features, num_classes))


def _pickled_model_message(path: Path) -> str:
    """What to do with a checkpoint that pickles Python objects (a whole model) instead of a state_dict."""
    target = path.with_name(f"{path.stem}_state_dict.pt")
    load = f"torch.load({str(path)!r}, map_location='cpu', weights_only=False)"
    return (f"checkpoint {path} holds pickled Python objects (a whole model saved with torch.save(model)?), not a "
            "state_dict, and is not unpickled here: save model.state_dict() instead. For a file you trust, with "
            f"the model's code importable:\n  python -c \"import torch; torch.save({load}.state_dict(), "
            f"{str(target)!r})\"\nthen set model.checkpoint: {target}")


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a state_dict into ``model``; a mismatch names the file and the keys."""
    if not path.is_file():
        raise ModelError(f"model.checkpoint: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a bad file
        if "Unsupported global" in str(error):
            raise ModelError(_pickled_model_message(path)) from None
        raise ModelError(f"checkpoint {path} cannot be loaded with weights_only=True: {error}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ModelError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    problems = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    if problems:
        raise ModelError(f"checkpoint {path} does not fit the model:\n  " + "\n  ".join(problems))
    model.load_state_dict(state)


def build_model(config: ModelConfig) -> nn.Module:
    """The model in eval mode on the CPU, with its checkpoint loaded."""
    if config.factory is not None:
        kwargs = dict(config.kwargs)
        if config.num_classes is not None:
            kwargs["num_classes"] = config.num_classes
        try:
            model = _factory(config.factory)(**kwargs)
        except TypeError as error:
            raise ModelError(f"model.factory {config.factory!r} rejected its arguments {kwargs}: {error}") from None
    else:
        model = _torchvision_model(config)
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.factory {config.factory!r} returned a {type(model).__name__}, not a torch module")
    if config.checkpoint is not None:
        load_checkpoint(model, config.checkpoint)
    return model.eval()


def model_digest(config: ModelConfig) -> str:
    """A fingerprint of what determines the model's weights: its description and checkpoint bytes."""
    described = config.model_dump(mode="json", exclude={"checkpoint"})
    if config.checkpoint is not None:
        if not config.checkpoint.is_file():
            raise ModelError(f"model.checkpoint: {config.checkpoint} does not exist")
        described["checkpoint_sha256"] = file_digest(config.checkpoint)
    return json_digest(described)


def select_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {name!r} asked for, but CUDA is not available here")
    return device


_PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def apply_compute(model: nn.Module, compute: ComputeConfig, device: torch.device) -> nn.Module:
    """``model`` on ``device`` with the layout and forward precision of ``compute`` (module names unchanged)."""
    if compute.precision == "float16" and device.type != "cuda":
        raise ModelError("precision float16 needs a CUDA device; use bfloat16 on the CPU")
    model = model.to(device)
    if compute.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compute.precision in _PRECISIONS:
        autocast = torch.autocast(device_type=device.type, dtype=_PRECISIONS[compute.precision])
        # bound to the model as a method, so a deep copy's forward runs the copy's weights
        model.forward = types.MethodType(autocast(type(model).forward), model)  # type: ignore[method-assign]
    return model
