"""Model specs to nn.Module and an example input.

    from edgeprune.inputs.models import load_model
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
from typing import Any

import torch
from torch import nn

from edgeprune.common.resources import asset, install_hint
from edgeprune.errors import EdgePruneError, first_line
from edgeprune.inputs.outputs import check_outputs

DEFAULT_SPEC = "example"
ZOOS = ("torchvision:", "timm:", "ultralytics:")  # specs built here with random weights unless --weights


@dataclass
class LoadedModel:
    module: nn.Module
    example_input: torch.Tensor
    spec: str
    weights: str | None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.example_input.shape)

    @property
    def random_weights(self) -> bool:
        """A zoo model without --weights: its seeded random initialisation (nothing is downloaded). A factory's or
        the example's weights are the user's, trained as far as edgeprune can tell."""
        return self.weights is None and self.spec.startswith(ZOOS)


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' or '1x3x224x224' to a tuple of positive ints."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise EdgePruneError(f"input shape must be positive integers like 1,3,224,224, found {text!r}")
    return shape


MAX_SEED = 2**63 - 1  # torch, NumPy and Python's generators all take it


def check_seed(seed: int, what: str = "--seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise EdgePruneError(f"{what} must be an integer in 0..2**63-1, found {seed!r}")


def _one_stage() -> tuple[str, ...]:
    from edgeprune.inputs.detection import ONE_STAGE

    return ONE_STAGE


def _torchvision(name: str) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise EdgePruneError(f"torchvision has no model {name!r}{hint}")
    import inspect

    # segmentation and detection builders fetch an ImageNet backbone by default (weights_backbone): nothing is ever
    # downloaded unless --weights asks for it. Segmenters with an auxiliary head (fcn, deeplabv3) are built with it,
    # as torchvision's trained weights are: their outputs are `out` and `aux`
    params = inspect.signature(torchvision.models.get_model_builder(name)).parameters
    extra = {"weights_backbone": None} if "weights_backbone" in params else {}
    if "aux_loss" in params:
        extra["aux_loss"] = True
    return torchvision.models.get_model(name, weights=None, **extra)


def _ultralytics(name: str) -> nn.Module:
    """An Ultralytics YOLO built from its config (`yolov8n.yaml`, `yolo11n-seg.yaml`: nothing downloaded; trained
    weights come with --weights as a state dict), its head in export mode: forward returns the decoded predictions
    (N x (4 + classes) x anchors, and the mask coefficients and prototypes for -seg), as Ultralytics' ONNX export
    does; NMS stays on the host (`ultralytics.utils.nms.non_max_suppression`)."""
    if not name.endswith((".yaml", ".yml")):
        raise EdgePruneError(f"model spec ultralytics:{name} must name a model config such as yolov8n.yaml or "
                             "yolo11n.yaml (built without a download); give trained weights with --weights")
    try:
        from ultralytics.nn import tasks
    except ImportError:
        raise EdgePruneError(f"model spec ultralytics:{name} needs ultralytics, which is not installed: "
                             f"{install_hint('yolo')}") from None
    classes = {"detect": tasks.DetectionModel, "segment": tasks.SegmentationModel, "pose": tasks.PoseModel,
               "obb": tasks.OBBModel, "classify": tasks.ClassificationModel}
    import contextlib

    try:
        # Ultralytics logs to stdout, which --json keeps for the report
        with contextlib.redirect_stdout(sys.stderr):
            cfg = tasks.yaml_model_load(name)
            model = classes[tasks.guess_model_task(cfg)](cfg, verbose=False)
    except (FileNotFoundError, KeyError, AssertionError) as e:
        raise EdgePruneError(f"ultralytics cannot build {name!r}: {type(e).__name__}: {first_line(e)}") from None
    for m in model.modules():
        if hasattr(m, "export") and hasattr(m, "format"):  # Detect and its subclasses
            m.export, m.format = True, "onnx"
    return model.eval()


def _timm(name: str) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise EdgePruneError(f"model spec timm:{name} needs timm, which is not installed: {install_hint('timm')}"
                             ) from None
    try:
        return timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        raise EdgePruneError(f"timm cannot create {name!r}: {e}") from None


def load_callable(spec: str, what: str = "model spec") -> Any:
    """The callable `pkg.module:function` or `path/to/file.py:function` names."""
    mod_name, _, fn_name = spec.rpartition(":")
    if not mod_name or not fn_name:
        raise EdgePruneError(f"{what} {spec!r} must look like pkg.module:function or path/to/file.py:function")
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
        raise EdgePruneError(f"cannot import {mod_name!r} for {what} {spec!r}: {type(e).__name__}: "
                             f"{first_line(e)}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise EdgePruneError(f"{mod_name} has no callable {fn_name!r} ({what} {spec!r})")
    return fn


def _factory(spec: str) -> nn.Module:
    fn = load_callable(spec)
    try:
        model = fn()
    except Exception as e:
        first = first_line(e, default="")
        raise EdgePruneError(f"model factory {spec} failed: {type(e).__name__}{': ' + first if first else ''}; it must "
                             f"return a torch.nn.Module when called without arguments") from None
    if not isinstance(model, nn.Module):
        raise EdgePruneError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _example() -> nn.Module:
    from edgeprune.inputs.example import WEIGHTS, ExampleNet

    model = ExampleNet()
    path = asset(WEIGHTS)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict (never a pickled model: `weights_only=True`) and say precisely what does not fit."""
    path = Path(path)
    if path.is_dir():
        raise EdgePruneError(f"weights {path} is a folder; give the state dict file saved with "
                             f"torch.save(model.state_dict(), PATH)")
    if not path.is_file():
        raise EdgePruneError(f"weights file {path} does not exist")
    state = read_checkpoint(path, "weights")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise EdgePruneError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    shapes = [f"{k} {list(v.shape)} in the file, {list(own[k].shape)} in the model" for k, v in state.items()
              if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if shapes or missing or unexpected:
        parts = [f"{len(shapes)} tensors of other shapes (e.g. {'; '.join(shapes[:2])})"] if shapes else []
        parts += [f"{len(missing)} missing keys (e.g. {missing[:3]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"] if unexpected else []
        raise EdgePruneError(f"weights {path} do not fit the model: {', '.join(parts)}; were they saved from another "
                             f"model or another configuration of it (e.g. another number of classes)?")
    model.load_state_dict(state)


def read_checkpoint(path: Path, what: str) -> object:
    """`torch.load(weights_only=True)` with one-line errors that never advise loading unsafely."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        raise EdgePruneError(f"cannot read {what} file {path}: {e.strerror}") from None
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":  # torch.save's zip archive, or a legacy pickle
        raise EdgePruneError(f"{what} file {path} is not a PyTorch checkpoint (neither torch.save's zip archive nor "
                             f"a pickle); save a state dict with torch.save(model.state_dict(), PATH)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        refused = next((ln.strip() for ln in text.splitlines() if "Unsupported global" in ln or "Unsupported operand"
                        in ln), None)
        if "Weights only load failed" in text or refused:
            raise EdgePruneError(f"{what} file {path} holds Python objects that a safe load refuses "
                                 f"({refused or 'not tensors and plain containers'}): loading them could run code; "
                                 f"save a state dict with torch.save(model.state_dict(), PATH) instead") from None
        first = first_line(e)
        raise EdgePruneError(f"cannot load {what} {path} (truncated or damaged?): {first}; save it again with "
                             f"torch.save(model.state_dict(), PATH)") from None


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
    check_seed(seed)
    torch.manual_seed(seed)
    if spec == "example":
        from edgeprune.inputs.example import INPUT_SHAPE

        model, default_shape = _example(), INPUT_SHAPE
    elif spec.split(":", 1)[1:] and spec.startswith("torchvision:") and spec.split(":", 1)[1] in _one_stage():
        from edgeprune.inputs.detection import build as raw_detector

        model, default_shape = raw_detector(spec.split(":", 1)[1])  # the network; decoding and NMS stay on the host
    elif spec.startswith("torchvision:"):
        model, default_shape = _torchvision(spec.split(":", 1)[1]), (1, 3, 224, 224)
    elif spec.startswith("ultralytics:"):
        model, default_shape = _ultralytics(spec.split(":", 1)[1]), (1, 3, 640, 640)
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
            out = model(example)
    except Exception as e:
        raise EdgePruneError(
            f"model {spec} does not run on an input of shape {list(shape)}: {first_line(e)}; "
            f"pass --input-shape"
        ) from None
    check_outputs(out, spec)
    return LoadedModel(module=model, example_input=example, spec=spec, weights=str(weights) if weights else None)


def from_module(module: nn.Module, example_input: torch.Tensor | None = None,
                input_shape: tuple[int, ...] | None = None, seed: int = 0) -> LoadedModel:
    """A live `nn.Module` as a loaded model (the Python API): a deep copy in eval mode, so that nothing edgeprune
    does (eval(), pruning, hooks) touches the caller's module. The example input is the one given, else a seeded
    normal tensor of `input_shape`. Its spec, `python:module.Class`, names it in reports; no spec loader rebuilds it
    (a job's pruned.pt keeps the module itself: `artifacts.save_pruned`)."""
    import copy

    if not isinstance(module, nn.Module):
        raise EdgePruneError(f"model must be an nn.Module or a spec string, found {type(module).__name__}")
    if example_input is None and input_shape is None:
        raise EdgePruneError("an nn.Module needs example_input= (one batch of one sample) or input_shape=, or "
                             "calibration data in memory whose first sample can serve")
    check_seed(seed)
    name = f"{type(module).__module__}.{type(module).__qualname__}"
    if isinstance(module, torch.jit.ScriptModule):
        raise EdgePruneError(f"model {name} is a TorchScript module (torch.jit.script or trace): edgeprune prunes "
                             "the Python nn.Module's layers; pass the module you scripted or traced")
    try:
        model = copy.deepcopy(module).cpu().eval()
    except Exception as e:  # the cause stays chained: the user's module, the user's traceback
        meta = next((n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta), None)
        if meta is not None:
            raise EdgePruneError(f"model {name} holds tensors on the meta device (first: {meta}), which have no "
                                 "values to prune by; load its weights first (module.to_empty(device='cpu') then "
                                 "load_state_dict, or load_state_dict(..., assign=True))") from e
        raise EdgePruneError(f"model {name} cannot be copied to the CPU ({type(e).__name__}: {first_line(e)}); "
                             "edgeprune works on a copy and never changes yours: pass a module that "
                             "copy.deepcopy can copy") from e
    if example_input is None:
        example_input = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    example = example_input.detach().cpu().float()
    spec = f"python:{type(module).__module__}.{type(module).__qualname__}"
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as e:
        raise EdgePruneError(f"model {spec} does not run on its example input of shape {list(example.shape)}: "
                             f"{first_line(e)}; pass example_input= of the shape it expects") from None
    check_outputs(out, spec)
    return LoadedModel(module=model, example_input=example, spec=spec, weights=None)
