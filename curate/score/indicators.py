"""Per-sample indicators of how related an input is to the teacher's task, from one forward pass.

Three families, all oriented so that higher means "looks more like the teacher's data":

- logits: max softmax probability, negative energy (logsumexp), negative entropy;
- BatchNorm statistics: how far each sample's per-channel feature means and
  variances fall from every BN layer's running statistics (negated);
- penultimate layer: feature norm, cosine to the predicted class's weight vector.

Output-only scores are not enough: a Fashion-MNIST teacher is more confident
on smooth photo patches than on its own data, while BN statistics separate
them (see the prototype facts in DESIGN.md). Forward hooks collect the BN and
penultimate quantities during the same pass that produces the logits.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from curate.models import final_linear

LOGIT_INDICATORS = ("msp", "neg_energy", "neg_entropy")
BN_INDICATORS = ("bn_mean", "bn_var")
FEATURE_INDICATORS = ("feat_norm", "cos_class")
INDICATORS = LOGIT_INDICATORS + BN_INDICATORS + FEATURE_INDICATORS

_EPS = 1e-5


@dataclass
class BatchScores:
    """Everything scoring stores for one batch, as CPU tensors with one row per sample."""

    logits: torch.Tensor
    embedding: torch.Tensor | None
    pred: torch.Tensor
    confidence: torch.Tensor
    margin: torch.Tensor
    entropy: torch.Tensor
    energy: torch.Tensor
    feat_norm: torch.Tensor
    indicators: dict[str, torch.Tensor]  # name -> N float32 (NaN where the teacher cannot provide it)


# The ops a BatchNorm layer becomes in an FX graph (``torch.export``, or TorchScript converted to it); the
# input is argument 0, the running mean and variance arguments 3 and 4, in all of them.
BATCHNORM_OPS = frozenset({torch.ops.aten.batch_norm.default,
                           torch.ops.aten._native_batch_norm_legit_no_training.default,
                           torch.ops.aten.native_batch_norm.default})
LINEAR_OPS = frozenset({torch.ops.aten.linear.default})


def _rows_of(parts: list[torch.Tensor]) -> torch.Tensor:
    """The rows of the passes' tensors, in order: the one tensor itself (no copy) when there was one pass."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class BatchNormMoments:
    """Per-sample channel means and variances at every BatchNorm input of one or more forward passes, with the
    layers' running statistics; at the end, how far each sample falls from them (squared z of the means, squared
    log-ratio of the variances, averaged over channels, then over layers), for every layer and pass at once.

    Two or three operations a layer, one concatenation a pass and a few for all of them, instead of about ten a
    layer and pass: on a GPU each is a kernel launch, and a small teacher's forward pass is not much more than that.
    """

    def __init__(self) -> None:
        self.means: list[torch.Tensor] = []
        self.variances: list[torch.Tensor] = []
        self.running: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.passes: list[tuple[torch.Tensor, torch.Tensor]] = []  # per finished pass: (means, variances), N x channels
        self.widths: tuple[int, ...] = ()
        self._constants: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def clear(self) -> None:
        self.means, self.variances, self.running, self.passes = [], [], [], []

    def __len__(self) -> int:
        """BatchNorm layers seen by the finished passes."""
        return len(self.widths) if self.passes else 0

    def add(self, x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> None:
        x = x.float()
        if x.shape[2] * x.shape[3] >= 256:
            # Large maps: every other row and column estimates the per-channel moments well enough
            # and halves the probe's share of the pass on memory-bound CPUs.
            x = x[:, :, ::2, ::2]
        if x.is_cuda:
            var, mean = torch.var_mean(x, (2, 3), correction=0)
        else:  # E[x^2] - E[x]^2: Welford's pass (var_mean) is 5-15x slower on these shapes on a CPU
            mean = x.mean((2, 3))
            var = (x.square().mean((2, 3)) - mean.square()).clamp_min(0)
        self.means.append(mean)
        self.variances.append(var)
        if len(self.running) < len(self.means):  # an eval-mode teacher's running statistics are the same every pass
            self.running.append((running_mean, running_var))

    def end_pass(self) -> None:
        """Close one forward pass: its layers' moments side by side, one row per sample."""
        if self.means:
            self.widths = tuple(m.shape[1] for m in self.means)
            self.passes.append((torch.cat(self.means, 1), torch.cat(self.variances, 1)))
            self.means, self.variances = [], []

    def deviations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean deviation, variance deviation) per sample of every finished pass, in order, each averaged over
        channels and layers."""
        mean, var = _rows_of([m for m, _ in self.passes]), _rows_of([v for _, v in self.passes])
        widths = self.widths
        key = (widths, mean.device)
        if key not in self._constants:  # an eval-mode teacher's running statistics do not change between batches
            self._constants[key] = (
                torch.cat([m for m, _ in self.running]).float(),
                torch.cat([v for _, v in self.running]).float() + _EPS,
                # 1 / (channels of its layer x layers) for each channel
                torch.cat([torch.full((w,), 1.0 / (w * len(widths))) for w in widths]).to(mean.device))
        running_mean, running_var, weights = self._constants[key]
        # products and sums, not a matmul: autocast would run a matmul in bf16
        mean_dev = ((mean - running_mean).square() / running_var).mul_(weights).sum(1)
        var_dev = torch.log((var + _EPS) / running_var).square_().mul_(weights).sum(1)
        return mean_dev, var_dev


class TeacherProbe:
    """Wraps a teacher so one call returns logits plus every indicator, whatever format it came in.

    Eager modules get hooks on each BatchNorm2d (its input) and on the final linear layer (its input is the
    penultimate feature vector). An exported program is a graph: it runs node by node (``GraphProbe``) and
    the same two kinds of values are read off its BatchNorm and final linear nodes. A TorchScript module is
    first converted to such a graph (``example`` gives the input shape to convert with); one that does not
    convert keeps the logit family, and the penultimate family when it has ``features`` and ``classifier``.
    The three formats of one model give the same columns and, within float tolerance, the same values.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor | None = None) -> None:
        self.model = model
        self.moments = BatchNormMoments()
        self._features: torch.Tensor | None = None
        self.classifier_weight: torch.Tensor | None = None
        self.split_forward = False
        self.graph: GraphProbe | None = None
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.batchnorm_layers = 0
        if isinstance(model, torch.jit.ScriptModule) and example is not None:
            model = _converted(model, example) or model
        if isinstance(model, torch.fx.GraphModule):
            self.graph = GraphProbe(model, self.moments.add, self._feature_input)
            self.batchnorm_layers = self.graph.batchnorm_layers
            self.classifier_weight = self.graph.classifier_weight
        elif isinstance(model, torch.jit.ScriptModule):
            if hasattr(model, "features") and hasattr(model, "classifier"):
                self.split_forward = True
                self.classifier_weight = model.classifier.weight
        else:
            batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]
            self.batchnorm_layers = len(batchnorms)
            self.hooks += [m.register_forward_pre_hook(self._bn_hook) for m in batchnorms]
            last_linear = final_linear(model)
            if last_linear is not None:
                self.classifier_weight = last_linear.weight
                self.hooks.append(last_linear.register_forward_pre_hook(
                    lambda module, inputs: self._feature_input(inputs[0])))

    def _bn_hook(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...]) -> None:
        self.moments.add(inputs[0], module.running_mean, module.running_var)

    def _feature_input(self, features: torch.Tensor) -> None:
        self._features = features

    def __call__(self, x: torch.Tensor) -> BatchScores:
        return self.launch(x).result()

    def launch(self, x: torch.Tensor, call_rows: int | None = None) -> PendingScores:
        """Queue the passes over ``x``, ``call_rows`` images at a time (default: one pass), and the copy of their
        outputs to the host; on a GPU, without waiting for either. The indicators of all the passes are computed
        once, together: their two dozen small operations cost as much as a small teacher's pass on 256 images."""
        self.moments.clear()
        logits, features = [], []
        for part in x.split(call_rows) if call_rows else (x,):
            part_logits, part_features = self._forward(part)
            self.moments.end_pass()
            logits.append(part_logits.float())
            features.append(None if part_features is None else part_features.float().flatten(1))
        return self._scores(_rows_of(logits), None if features[0] is None else _rows_of(features))

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pass: logits and penultimate features (None where the teacher gives none)."""
        self._features = None
        if self.graph is not None:
            return self.graph.logits(x), self._features
        if self.split_forward:
            features = self.model.features(x)
            return self.model.classifier(features), features
        return self.model(x), self._features

    def _scores(self, logits: torch.Tensor, features: torch.Tensor | None) -> PendingScores:
        n = logits.shape[0]
        log_probs = F.log_softmax(logits, dim=1)
        probs = log_probs.exp()
        top = probs.topk(min(2, probs.shape[1]), dim=1).values
        pred = logits.argmax(1)
        entropy = -(probs * log_probs).sum(1)
        energy = -torch.logsumexp(logits, dim=1)
        nan = torch.full((n,), float("nan"), device=logits.device)
        indicators = {"msp": top[:, 0], "neg_energy": -energy, "neg_entropy": -entropy}
        if len(self.moments):
            mean_dev, var_dev = self.moments.deviations()
            indicators["bn_mean"], indicators["bn_var"] = -mean_dev, -var_dev
        else:
            indicators["bn_mean"] = indicators["bn_var"] = nan
        if features is not None and self.classifier_weight is not None:
            feat_norm = features.norm(dim=1)
            weights = self.classifier_weight.float()[pred]
            indicators["feat_norm"] = feat_norm
            indicators["cos_class"] = F.cosine_similarity(features, weights, dim=1)
        else:
            feat_norm = nan
            indicators["feat_norm"] = indicators["cos_class"] = nan
        per_sample = {"confidence": top[:, 0], "margin": top[:, 0] - top[:, 1] if top.shape[1] > 1 else top[:, 0],
                      "entropy": entropy, "energy": energy, "feat_norm": feat_norm, "pred": pred,
                      **{f"indicator:{k}": v for k, v in indicators.items()}}
        return PendingScores({"logits": logits, "embedding": features, **per_sample}, tuple(indicators))

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


class GraphProbe(torch.fx.Interpreter):
    """Runs an FX graph node by node and hands each BatchNorm node's input with its running statistics, and the
    final linear node's input, to the probe's callbacks. The Python cost is per node and per batch (a few
    microseconds each), next to nothing beside the convolutions."""

    def __init__(self, module: torch.fx.GraphModule,
                 on_batchnorm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None],
                 on_features: Callable[[torch.Tensor], None]) -> None:
        super().__init__(module)
        nodes = [n for n in module.graph.nodes if n.op == "call_function"]
        # layers whose running statistics are buffers of the module (not a BatchNorm in training mode)
        self.batchnorms = {n for n in nodes if n.target in BATCHNORM_OPS
                           and all(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in n.args[3:5])}
        linears = [n for n in nodes if n.target in LINEAR_OPS]
        self.final_linear = linears[-1] if linears else None
        self.classifier_weight = None
        if self.final_linear is not None and getattr(self.final_linear.args[1], "op", None) == "get_attr":
            self.classifier_weight = self.fetch_attr(self.final_linear.args[1].target)
        self.batchnorm_layers = len(self.batchnorms)
        self.on_batchnorm, self.on_features = on_batchnorm, on_features

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.run(x)
        # an exported module's graph returns its outputs flattened: a one-tensor model gives (logits,)
        return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out

    def run_node(self, n: torch.fx.Node) -> Any:
        if n in self.batchnorms:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.on_batchnorm(args[0], args[3], args[4])
        elif n is self.final_linear:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.on_features(args[0])
        return super().run_node(n)


def _converted(model: torch.jit.ScriptModule, example: torch.Tensor) -> torch.fx.GraphModule | None:
    """A TorchScript module as the graph of an exported program, or None where the (experimental) converter
    cannot take it."""
    from torch._export.converter import TS2EPConverter

    logger = logging.getLogger("torch._export")  # logs each input dimension it specialises
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # it reports every unused buffer (num_batches_tracked) it carries over
            warnings.simplefilter("ignore")
            return TS2EPConverter(model, (example,)).convert().module()
    except Exception:  # noqa: BLE001 - any converter failure leaves the scripted module as it is
        return None
    finally:
        logger.setLevel(level)


class PendingScores:
    """A batch's outputs on their way to the host in one copy (one float32 buffer, split into contiguous views
    on the host) instead of one copy, and one synchronisation, per column. On a GPU the copy goes to page-locked
    memory without blocking, so the host can queue the next batch before it waits for this one (``result``).
    The class index travels as a float32, exact below 2**24 classes."""

    def __init__(self, tensors: dict[str, torch.Tensor | None], indicators: tuple[str, ...]) -> None:
        self.shapes = {name: None if tensor is None else tensor.shape for name, tensor in tensors.items()}
        self.indicators = indicators
        flat = torch.cat([t.float().reshape(-1) for t in tensors.values() if t is not None])
        self.ready: torch.cuda.Event | None = None
        if flat.is_cuda:
            self.flat = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self.flat.copy_(flat, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.flat = flat

    def result(self) -> BatchScores:
        if self.ready is not None:
            self.ready.synchronize()
        host, offset = {}, 0
        for name, shape in self.shapes.items():
            if shape is None:
                host[name] = None
                continue
            host[name] = self.flat[offset:offset + shape.numel()].view(shape)
            offset += shape.numel()
        return BatchScores(
            logits=host["logits"], embedding=host["embedding"], pred=host["pred"].long(),
            confidence=host["confidence"], margin=host["margin"], entropy=host["entropy"], energy=host["energy"],
            feat_norm=host["feat_norm"], indicators={k: host[f"indicator:{k}"] for k in self.indicators},
        )
