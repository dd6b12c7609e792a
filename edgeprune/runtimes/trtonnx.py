"""The ONNX file each TensorRT version builds from, and what TensorRT needs to know of it (shared by the `tensorrt`
and `trtexec` backends).

    from edgeprune.runtimes.trtonnx import parse_version, prepare_onnx
    model = prepare_onnx("model.onnx", "fp16", parse_version(tensorrt.__version__), work_dir)

Up to TensorRT 10.x the model is built as it is and the builder flags set the precision. 11 removed weak typing:
every network is strongly typed, so an fp16 target is built from an fp16 copy of the model (`fp16_onnx`) and an
int8 target needs a model that already carries Q/DQ nodes. `onnx` and onnxruntime's float16 converter are imported
only inside the functions that need them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeprune.errors import EdgePruneError

if TYPE_CHECKING:
    import onnx

TrtVersion = tuple[int, int, int]


def parse_version(text: str) -> TrtVersion:
    """(major, minor, patch) from a version string such as `tensorrt.__version__` ("10.3.0.26")."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    if m is None:
        raise EdgePruneError(f"cannot read a TensorRT version from {text!r}; expected MAJOR.MINOR.PATCH")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def input_shapes(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Each graph input's shape to time (symbolic dimensions become 1, as in the ONNX Runtime backend) and whether it
    had a symbolic dimension; initializers listed as inputs (old IR versions) are left out."""
    initializers = {init.name for init in model.graph.initializer}
    out: dict[str, tuple[tuple[int, ...], bool]] = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        dims = inp.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in dims)
        dynamic = any(not (d.HasField("dim_value") and d.dim_value > 0) for d in dims)
        out[inp.name] = (shape, dynamic)
    return out


def has_qdq(model: onnx.ModelProto) -> bool:
    """Whether the model is explicitly quantized (QuantizeLinear/DequantizeLinear pairs carry the INT8 scales): a
    build for an int8 target hands TensorRT such a model, quantised on the recipe's data (`quantize.py`, symmetric
    int8 as TensorRT's Q/DQ layers need), so its engine needs no calibrator."""
    from edgeprune.export.quantize import has_qdq as qdq

    return qdq(model)


def _topological_order(graph: Any) -> None:
    """Sort `graph.node` in place so every node follows its producers (onnx's checker and TensorRT's parser insist).

    onnxruntime's float16 converter appends its input Casts at the end of the node list."""
    produced_by: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.output:
            produced_by[name] = i
    waiting = [0] * len(graph.node)
    users: dict[int, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            p = produced_by.get(name)
            if p is not None and p != i:
                waiting[i] += 1
                users.setdefault(p, []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    order: list[int] = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for u in users.get(i, ()):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if len(order) != len(graph.node):
        return  # a cycle cannot be sorted; leave the order as the converter wrote it and let the checker speak
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def fp16_onnx(src: str | Path, dst: str | Path) -> Path:
    """An fp16 copy of `src` for TensorRT 11's strong typing: weights and activations in fp16, inputs and outputs
    kept fp32 (as `--fp16` kept them in TensorRT 8-10), so the engine is fed and timed like an fp16 engine of 10.x.

    Converted with onnxruntime's float16 converter (it ships with onnxruntime, a dependency), which keeps numerically
    risky operators in fp32; NVIDIA's ModelOpt AutoCast is the heavier alternative."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    try:
        converted = convert_float_to_float16(model, keep_io_types=True)
    except Exception as e:  # the converter raises plain Exceptions on unsupported graphs
        raise EdgePruneError(
            f"cannot convert {src} to fp16 for TensorRT 11 strong typing ({type(e).__name__}: {str(e)[:200]}); "
            f"convert it yourself (for example with NVIDIA ModelOpt AutoCast) and measure it with precision fp32"
        ) from None
    _topological_order(converted.graph)
    onnx.checker.check_model(converted)
    dst = Path(dst)
    onnx.save(converted, str(dst))
    return dst


def prepare_onnx(onnx_path: str | Path, precision: str, trt_version: TrtVersion, work_dir: str | Path) -> Path:
    """The ONNX file TensorRT `trt_version` should build for `precision`: the file itself up to 10.x; from 11 on an
    fp16 copy for fp16, and for int8 the file itself when it carries Q/DQ nodes (else an error naming the way out)."""
    onnx_path = Path(onnx_path)
    if trt_version[0] < 11 or precision == "fp32":
        return onnx_path
    if precision == "fp16":
        return fp16_onnx(onnx_path, Path(work_dir) / f"{onnx_path.stem}.fp16.onnx")
    import onnx

    if not has_qdq(onnx.load(str(onnx_path), load_external_data=False)):
        raise EdgePruneError(
            f"TensorRT {'.'.join(map(str, trt_version))} removed implicit INT8 calibration: an int8 target needs a "
            f"model with QuantizeLinear/DequantizeLinear nodes, and {onnx_path.name} has none; quantize it (`edgeprune "
            f"export --int8 --calibration RECIPE --device jetson-orin-nano-int8`; `edgeprune build` quantises its "
            f"models itself) or use an fp16 target, or TensorRT 10.x for calibrated INT8"
        )
    return onnx_path
