"""A model's leading affine layers folded into one dense map, for models on tiny inputs (CPU sampling).

A model f = rest o A whose first operations A (normalization by constants, convolutions, linear layers,
flattening and reshaping, batch norm in eval mode, average pooling, dropout in eval mode: everything up to
the first operation that is not affine) form an affine map R^d -> R^m has A(z) = c + M z with c = A(0) and
the i-th column of M equal to A(e_i) - A(0). Both are computed once in float64 from the model's own
operations. For a small input (d * m <= ``FOLD_MAX_ENTRIES``) one GEMM of the noisy batch with M, whose
matrix stays in cache, replaces A's operations: for Levine et al.'s small MNIST net (normalization and a
1 -> 4 channel 2x2 convolution on 1x7x7 inputs: d = 49, m = 144) the CPU sampling rate goes from 1.96x to
2.19x the original code's loop (same machine and session, ``benchmarks/tiny_model_cpu.py``). In the folded
model every linear layer, the folded map included, is a ``DenseLayer``: one oneDNN GEMM with the bias and
the ReLU that alone reads it in its epilogue (with the sampler's per-batch noise, 2.7-3.1x); the other
ReLUs run in place.

Exactness: the folded model is the same function of the noisy input z as the model in exact arithmetic;
in float32 it differs from the eager model only by rounding (as another convolution kernel does), and it
is a fixed function of z (the image and the noise are added first, as for the eager model), so it is a
base classifier like any other and every certificate of its smoothed classifier is valid. Whether to fold
depends on the model and the sample shape only, so every actor folds alike and the counts stay a function
of (seed, idx, stream, shard). A probe (logits of folded and eager model on fixed random inputs agreeing
to rounding) guards against an operation wrongly taken as affine: the model is then left unfolded.

The prefix is found on the ``torch.fx`` graph of the model; a model that fx cannot trace is not folded.
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F  # noqa: N812 - the usual name
from torch.utils import flop_counter

FOLD_MAX_ENTRIES = 2**16
"""Largest d * m folded: a 256 KiB float32 matrix, resident in a core's L2 cache while a batch runs."""

PROBE_INPUTS = 64
PROBE_RELATIVE_TOLERANCE = 1e-3
"""Folded and eager logits on the probe must agree to this fraction of the logits' scale (rounding gives
~1e-6; an operation wrongly taken as affine gives differences of the logits' own size)."""

AFFINE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Flatten, nn.Unflatten, nn.Identity,
                  nn.Dropout, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.AvgPool1d, nn.AvgPool2d,
                  nn.AvgPool3d)
"""Module types (exactly these, not subclasses, which may override ``forward``) affine in eval mode."""

AFFINE_FUNCTIONS = (F.linear, F.conv1d, F.conv2d, F.conv3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                    torch.flatten, torch.reshape)
"""Functions affine in their first argument when every other tensor argument is a constant."""

AFFINE_METHODS = ("flatten", "view", "reshape", "contiguous")
SCALAR_OPS = {operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
              torch.add: "add", torch.sub: "sub", torch.mul: "mul", torch.div: "div",
              "add": "add", "sub": "sub", "mul": "mul", "div": "div"}
"""Elementwise operations affine in the chain when the other operand is a constant (a number or a
parameter / buffer of the model), and for division when the chain is the numerator."""


ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
"""Whether this torch has oneDNN's linear with fused epilogue (``mkldnn::_linear_pointwise``, the kernel
inductor's CPU backend calls)."""


def _linear_pointwise_flops(x_shape: Sequence[int], w_shape: Sequence[int], *_: Any, **__: Any) -> int:
    """FLOPs of ``mkldnn::_linear_pointwise`` (2 per multiply-add, as ``torch.utils.flop_counter`` counts
    ``mm``), so that ``cpu_speed.cpu_batch_size`` sees a ``DenseLayer``'s work."""
    return 2 * math.prod(x_shape) * int(w_shape[0])


if ONEDNN_LINEAR and torch.ops.mkldnn._linear_pointwise not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(torch.ops.mkldnn._linear_pointwise)(_linear_pointwise_flops)


class DenseLayer(nn.Module):
    """``relu(z W^T + b)`` (or without the ReLU) on the last axis: on fp32 CPU tensors outside autocast one
    oneDNN call with the bias and the ReLU applied in the GEMM's epilogue (no separate passes over the
    output: ~1.3x for the small MNIST net's layers), else ``F.linear`` then an in-place ReLU (under bf16
    autocast the layer runs in bf16, as the model's own would). ``float32``: always in float32, autocast
    or not (a model's float32 head, ``float32_output`` on its class). The same function up to rounding."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool,
                 float32: bool = False) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.relu, self.float32 = relu, float32

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float() if self.float32 else z
        if ONEDNN_LINEAR and z.device.type == "cpu" and z.dtype == torch.float32 and \
                (self.float32 or not torch.is_autocast_enabled("cpu")):  # oneDNN's op ignores autocast
            rows = z.reshape(-1, z.shape[-1])
            out = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias,
                                                     "relu" if self.relu else "none", [], "")
            return out.view(*z.shape[:-1], out.shape[-1])
        with torch.autocast(z.device.type, enabled=False) if self.float32 else contextlib.nullcontext():
            out = F.linear(z, self.weight, self.bias)
        return out.relu_() if self.relu else out

    def extra_repr(self) -> str:
        return (f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, relu={self.relu}, "
                f"float32={self.float32}")


class FoldedModel(nn.Module):
    """``rest(c + z M)``: the model with its affine prefix replaced by one dense map (see the module); the
    ReLU the rest begins with, if any, fused into it."""

    def __init__(self, offset: torch.Tensor, matrix: torch.Tensor, prefix_shape: Sequence[int],
                 rest: nn.Module, relu: bool = False) -> None:
        super().__init__()
        self.prefix = DenseLayer(matrix.t(), offset, relu)
        self.prefix_shape = tuple(prefix_shape)
        self.rest = rest

    @property
    def matrix(self) -> torch.Tensor:
        """M (d x m): the prefix's value is c + z M for the flattened input z."""
        return self.prefix.weight.t()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.prefix(z.reshape(z.shape[0], -1))
        return self.rest(h.view(z.shape[0], *self.prefix_shape))


class _LeafTracer(fx.Tracer):
    """fx's tracer, also keeping subclasses of the affine module types whole (their ``forward`` may be
    untraceable, e.g. an autocast block; as a subclass it is not taken as affine)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, AFFINE_MODULES) or super().is_leaf_module(m, module_qualified_name)


def _constant(arg: Any, graph_constants: set[fx.Node]) -> bool:
    """Whether ``arg`` is a number or a node holding a parameter / buffer of the model."""
    return isinstance(arg, (int, float)) and not isinstance(arg, bool) or arg in graph_constants


def _affine_module(module: nn.Module) -> bool:
    """Whether ``module`` (in eval mode) is affine: one of ``AFFINE_MODULES`` exactly, and a batch norm
    only with running statistics (without them it normalizes by the batch's own)."""
    if type(module) not in AFFINE_MODULES:
        return False
    return not isinstance(module, nn.modules.batchnorm._BatchNorm) or module.running_mean is not None


def _static_shape_args(args: Sequence[Any]) -> bool:
    """Whether reshape-style arguments are plain integers (no size read from a tensor at run time)."""
    flat = [a for arg in args for a in (arg if isinstance(arg, (tuple, list)) else (arg,))]
    return all(isinstance(a, int) and not isinstance(a, bool) for a in flat)


def _affine_step(node: fx.Node, chain: fx.Node, modules: dict[str, nn.Module],
                 constants: set[fx.Node]) -> bool:
    """Whether ``node`` is affine in ``chain`` (its only non-constant tensor input)."""
    args, kwargs = list(node.args), dict(node.kwargs)
    if not args or args[0] is not chain and not (node.target in SCALAR_OPS and chain in args[:2]):
        return False
    if node.op == "call_module":
        return _affine_module(modules[str(node.target)]) and len(args) == 1 and not kwargs
    if node.target in SCALAR_OPS and node.op in ("call_function", "call_method"):
        if len(args) != 2 or kwargs:
            return False
        other = args[1] if args[0] is chain else args[0]
        return _constant(other, constants) and (SCALAR_OPS[node.target] != "div" or args[0] is chain)
    if node.op == "call_method" and node.target in AFFINE_METHODS:
        return _static_shape_args(args[1:]) and not kwargs
    if node.op == "call_function" and node.target in AFFINE_FUNCTIONS:
        if node.target in (torch.flatten, torch.reshape):
            return _static_shape_args(args[1:]) and _static_shape_args(list(kwargs.values()))
        others = [a for a in args[1:] + list(kwargs.values()) if isinstance(a, fx.Node)]
        return all(other in constants for other in others)
    return False


def _split(traced: fx.GraphModule) -> tuple[list[fx.Node], fx.Node] | None:
    """The affine prefix's nodes (placeholder first) and its last node, or None if there is nothing to
    fold: no step that computes (only reshapes), or a lone linear layer (already one GEMM)."""
    nodes = list(traced.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None
    modules = dict(traced.named_modules())
    constants = {n for n in nodes if n.op == "get_attr"}
    chain, prefix = inputs[0], [inputs[0]]
    for node in nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if len(chain.users) != 1 or node not in chain.users or not _affine_step(node, chain, modules,
                                                                               constants):
            break
        chain = node
        prefix.append(node)
    computing = [node for node in prefix[1:] if not _reshapes(node, modules)]
    if not computing or len(computing) == 1 and _is_linear(computing[0], modules):
        return None
    return prefix, chain


RESHAPE_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)


def _reshapes(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the step only moves values (flatten, view, reshape, identity): nothing to fold."""
    if node.op == "call_module":
        return type(modules[str(node.target)]) in RESHAPE_MODULES
    return node.target in AFFINE_METHODS or node.target in (torch.flatten, torch.reshape)


def _is_linear(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and type(modules[str(node.target)]) is nn.Linear or \
        node.op == "call_function" and node.target is F.linear


def _subgraph(traced: fx.GraphModule, prefix: list[fx.Node], cut: fx.Node, *,
              rest: bool) -> fx.GraphModule:
    """The prefix (input -> cut's value) or the rest (cut's value -> output) as a module of its own."""
    graph, env = fx.Graph(), {}
    inside = set(prefix)
    if rest:
        env[cut] = graph.placeholder("prefix_value")
    for node in traced.graph.nodes:
        if rest and node in inside:  # the prefix, its input included
            continue
        if not rest and node not in inside and node.op != "get_attr":
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    if not rest:
        graph.output(env[cut])
    module = fx.GraphModule(traced, graph)
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


def _rest_module(traced: fx.GraphModule, prefix: list[fx.Node], cut: fx.Node) -> tuple[fx.GraphModule, bool]:
    """The rest (cut's value -> output) set up for sampling, and whether the ReLU it began with was taken
    out (for the folded map to apply in its GEMM): linear layers as ``DenseLayer``s with the ReLU that
    alone reads each fused in, the other ReLUs in place where that is safe."""
    module = _subgraph(traced, prefix, cut, rest=True)
    _dense_layers(module)
    leading_relu = _take_leading_relu(module)
    _relu_in_place(module)
    module.recompile()
    return module, leading_relu


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a plain ReLU of one tensor (``torch.relu``, ``F.relu`` or ``nn.ReLU``)."""
    if node.op == "call_module":
        return type(modules.get(str(node.target))) is nn.ReLU
    return node.op == "call_function" and node.target in (torch.relu, F.relu) and len(node.args) == 1 \
        and node.kwargs in ({}, {"inplace": False})  # fx records F.relu(x) as relu(x, inplace=False)


def _linear_weights(node: fx.Node, module: fx.GraphModule,
                    modules: dict[str, nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None, bool] | None:
    """(weight, bias, float32) of a linear layer of the model (an ``nn.Linear``, a subclass declaring
    ``float32_output``, or ``F.linear`` of the model's own weights), else None."""
    layer = modules.get(str(node.target)) if node.op == "call_module" else None
    float32 = isinstance(layer, nn.Linear) and bool(getattr(layer, "float32_output", False))
    plain = type(layer) is nn.Linear
    if layer is not None and len(node.args) == 1 and not node.kwargs and (plain or float32):
        return layer.weight, layer.bias, float32
    if node.op != "call_function" or node.target is not F.linear or node.kwargs or \
            len(node.args) not in (2, 3):
        return None
    weights = node.args[1:]
    if not all(isinstance(w, fx.Node) and w.op == "get_attr" for w in weights):
        return None
    weight, *bias = (operator.attrgetter(str(w.target))(module) for w in weights)
    return weight, bias[0] if bias else None, False


def _dense_layers(module: fx.GraphModule) -> None:
    """Each linear layer of ``module`` becomes a ``DenseLayer``, with the ReLU that alone reads it fused."""
    modules = dict(module.named_modules())
    for index, node in enumerate(list(module.graph.nodes)):
        layer = _linear_weights(node, module, modules)
        if layer is None:
            continue
        weight, bias, float32 = layer
        reader = next(iter(node.users)) if len(node.users) == 1 else None
        relu = reader is not None and _is_relu(reader, modules)
        name = f"folded_dense_{index}"
        module.add_submodule(name, DenseLayer(weight, bias, relu=relu, float32=float32))
        with module.graph.inserting_after(node):
            dense = module.graph.call_module(name, (node.args[0],))
        replaced = reader if relu else node
        replaced.replace_all_uses_with(dense)
        if relu:
            module.graph.erase_node(reader)
        module.graph.erase_node(node)
    module.delete_all_unused_submodules()


def _take_leading_relu(module: fx.GraphModule) -> bool:
    """Removes the ReLU that alone reads the rest's input, if there is one (the folded map applies it)."""
    modules = dict(module.named_modules())
    (placeholder,) = (node for node in module.graph.nodes if node.op == "placeholder")
    reader = next(iter(placeholder.users)) if len(placeholder.users) == 1 else None
    if reader is None or not _is_relu(reader, modules):
        return False
    reader.replace_all_uses_with(placeholder)
    module.graph.erase_node(reader)
    return True


FRESH_OUTPUT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d,
                        nn.BatchNorm3d, DenseLayer)
FRESH_OUTPUT_FUNCTIONS = (F.linear, F.conv1d, F.conv2d, F.conv3d, torch.addmm, operator.add, operator.mul)


def _relu_in_place(module: fx.GraphModule) -> None:
    """ReLUs of the rest run in place where their input is a new tensor used by nothing else (a linear or
    convolution output): the same values, without a fresh activation tensor per batch."""
    modules = dict(module.named_modules())
    for node in module.graph.nodes:
        source = node.args[0] if node.args else None
        if not _is_relu(node, modules) or not isinstance(source, fx.Node) or len(source.users) != 1:
            continue
        # (a lone ReLU of the rest's input is never here: _take_leading_relu gave it to the folded map)
        fresh = source.op == "call_module" and type(modules[str(source.target)]) in FRESH_OUTPUT_MODULES or \
            source.op == "call_function" and source.target in FRESH_OUTPUT_FUNCTIONS
        if fresh:
            node.op, node.target, node.kwargs = "call_function", torch.relu_, {}


@torch.inference_mode()
def fold_affine_prefix(model: nn.Module, sample_shape: Sequence[int]) -> FoldedModel | None:
    """``model`` (eval mode, on CPU) with its affine prefix folded for samples of ``sample_shape``, or None
    when there is nothing worth folding: no affine prefix, d * m > ``FOLD_MAX_ENTRIES``, a model fx cannot
    trace, or a probe on which the folded logits differ from the model's beyond rounding."""
    if model.training:
        raise ValueError("model.training=True: call model.eval() first (batch norm and dropout are affine "
                         "only in eval mode)")
    try:
        traced = fx.GraphModule(model, _LeafTracer().trace(model))
    except Exception:  # noqa: BLE001 - data-dependent control flow and the like: not folded, not an error
        return None
    split = _split(traced)
    if split is None or math.prod(sample_shape) > FOLD_MAX_ENTRIES:
        return None
    try:
        return _fold(model, traced, *split, tuple(sample_shape))
    except Exception:  # noqa: BLE001 - a prefix or rest that does not run on this shape: not folded
        return None


def _fold(model: nn.Module, traced: fx.GraphModule, prefix: list[fx.Node], cut: fx.Node,
          sample_shape: tuple[int, ...]) -> FoldedModel | None:
    """The folded model (c and M from the prefix in float64), if d * m is small and the probe agrees."""
    d = math.prod(sample_shape)
    prefix_model = copy.deepcopy(_subgraph(traced, prefix, cut, rest=False)).double()
    m = prefix_model(torch.zeros((1, *sample_shape), dtype=torch.float64))[0].numel()
    if d * m > FOLD_MAX_ENTRIES:  # the output size first (one sample), the basis only for a small map
        return None
    basis = torch.cat([torch.zeros(1, d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)])
    values = prefix_model(basis.view(d + 1, *sample_shape))
    offset = values[0].reshape(-1)
    matrix = (values[1:].reshape(d, -1) - offset)
    rest, relu = _rest_module(traced, prefix, cut)
    folded = FoldedModel(offset.float(), matrix.float(), values.shape[1:], rest, relu=relu).eval()
    return folded if _agrees(model, folded, sample_shape) else None


def _agrees(model: nn.Module, folded: nn.Module, sample_shape: Sequence[int]) -> bool:
    """Logits of ``folded`` equal ``model``'s to rounding on ``PROBE_INPUTS`` fixed inputs in [-1, 2]."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand((PROBE_INPUTS, *sample_shape), generator=generator) * 3 - 1
    expected, got = model(probe).float(), folded(probe).float()
    if expected.shape != got.shape or not torch.isfinite(expected).all():
        return False
    scale = max(1.0, float(expected.abs().max()))
    return float((expected - got).abs().max()) <= PROBE_RELATIVE_TOLERANCE * scale


__all__ = ["FOLD_MAX_ENTRIES", "ONEDNN_LINEAR", "DenseLayer", "FoldedModel", "fold_affine_prefix"]
