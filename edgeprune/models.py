"""Model specs to nn.Module and an example input.

    from edgeprune.models import load_model
    m = load_model("torchvision:resnet18")          # random weights: fine for latency work
    m = load_model("my_pkg.nets:make_net", weights="net.pth", input_shape=(1, 3, 128, 128))

Specs: `example` (the bundled digits CNN; the default), `torchvision:NAME`, `timm:NAME` (when timm is installed),
`pkg.module:factory` or `path/to/file.py:factory` (a callable returning an nn.Module).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeprune.errors import EdgePruneError
from edgeprune.resources import asset

DEFAULT_SPEC = "example"


@dataclass
class LoadedModel:
    module: nn.Module
    example_input: torch.Tensor
    spec: str
    weights: str | None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.example_input.shape)


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' or '1x3x224x224' to a tuple of positive ints."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise EdgePruneError(f"input shape must be positive integers like 1,3,224,224, found {text!r}")
    return shape


def _torchvision(name: str) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise EdgePruneError(f"torchvision has no model {name!r}{hint}")
    return torchvision.models.get_model(name, weights=None)


def _timm(name: str) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise EdgePruneError(f"model spec timm:{name} needs timm, which is not installed (pip install timm)") from None
    try:
        return timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        raise EdgePruneError(f"timm cannot create {name!r}: {e}") from None


def _factory(spec: str) -> nn.Module:
    mod_name, _, fn_name = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise EdgePruneError(f"model file {path} does not exist")
            modspec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(modspec)
            sys.modules[path.stem] = module
            modspec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except EdgePruneError:
        raise
    except Exception as e:
        raise EdgePruneError(f"cannot import {mod_name!r} for model spec {spec!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise EdgePruneError(f"{mod_name} has no callable {fn_name!r} (model spec {spec!r})")
    model = fn()
    if not isinstance(model, nn.Module):
        raise EdgePruneError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _example() -> nn.Module:
    from edgeprune.example import WEIGHTS, ExampleNet

    model = ExampleNet()
    path = asset(WEIGHTS)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict (never a pickled model: `weights_only=True`) and say precisely what does not fit."""
    path = Path(path)
    if not path.is_file():
        raise EdgePruneError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EdgePruneError(f"cannot load weights {path} as a state dict (weights_only=True): {str(e).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise EdgePruneError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EdgePruneError(
            f"weights {path} do not fit the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )


def load_model(
    spec: str | None = None,
    weights: str | Path | None = None,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
) -> LoadedModel:
    """An eval-mode nn.Module and a deterministic example input for `spec`.

    Random initialisation is seeded, so the same spec and seed export to the same ONNX bytes (and hit the cache).
    """
    spec = spec or DEFAULT_SPEC
    torch.manual_seed(seed)
    if spec == "example":
        from edgeprune.example import INPUT_SHAPE

        model, default_shape = _example(), INPUT_SHAPE
    elif spec.startswith("torchvision:"):
        model, default_shape = _torchvision(spec.split(":", 1)[1]), (1, 3, 224, 224)
    elif spec.startswith("timm:"):
        model, default_shape = _timm(spec.split(":", 1)[1]), (1, 3, 224, 224)
    elif ":" in spec:
        model, default_shape = _factory(spec), (1, 3, 224, 224)
    else:
        raise EdgePruneError(
            f"unknown model spec {spec!r}; use example, torchvision:NAME (e.g. torchvision:resnet18), timm:NAME, "
            f"or pkg.module:factory / path/to/file.py:factory"
        )
    if weights is not None:
        load_weights(model, weights)
    model.eval()
    shape = tuple(input_shape) if input_shape else default_shape
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(shape, generator=gen)
    try:
        with torch.no_grad():
            model(example)
    except Exception as e:
        raise EdgePruneError(
            f"model {spec} does not run on an input of shape {list(shape)}: {str(e).splitlines()[0][:200]}; "
            f"pass --input-shape"
        ) from None
    return LoadedModel(module=model, example_input=example, spec=spec, weights=str(weights) if weights else None)
