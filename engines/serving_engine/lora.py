"""Many LoRA adapters over one base model, each row of a batch through its own.

peft's mixed-batch path loops over the batch's adapters in each of the ~200
LoRA modules (a step of 16 rows over 16 adapters measured 1.97x one adapter's),
and once any adapter is loaded even bare-base rows pay its wrapper (~1.9x a
step). Here each targeted Linear is wrapped once; a generate call routes its
rows (`AdapterSet.route`) and each wrapped Linear then runs:

- no adapter in the batch: the base Linear alone;
- one adapter: the base plus B(A(x)) * scale, the ops peft runs;
- several: every adapter's A and B stacked per module (slot 0 all zeros for
  bare-base rows, ranks zero-padded, scale folded into B), gathered by row
  once per call, two `bmm` a step.

One adapter runs in float32 with the input cast to it, as peft does; the
stacks are in the base's dtype (a step reads every row's weights). An adapter whose weights are not plain LoRA matrices of Linear layers is
refused before anything changes."""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """The adapter cannot be served over this base (the message says why)."""


@dataclass
class Factor:
    a: torch.Tensor  # r x in
    b: torch.Tensor  # out x r
    scale: float


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # peft's own rule (peft.utils.other.get_pattern_key): a key matches the end of the module's name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(model: nn.Module, folder: Path) -> dict[str, Factor]:
    """The adapter's A, B and scale per module name of `model`, checked
    against the model: every weight a LoRA matrix of one of its Linear layers."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{folder}/{CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or config.get("use_dora"):
        kind = config.get("peft_type") if isinstance(config, dict) else None
        dora = " with DoRA" if isinstance(config, dict) and config.get("use_dora") else ""
        raise AdapterError(f"{folder} is not a plain LoRA adapter (peft_type {kind!r}{dora})")
    unsupported = [
        key for key in ("modules_to_save", "trainable_token_indices", "layer_replication") if config.get(key)
    ]
    if config.get("fan_in_fan_out"):
        unsupported.append("fan_in_fan_out")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        unsupported.append("bias")
    if unsupported:
        raise AdapterError(f"{folder} uses {', '.join(unsupported)}, which the engine does not serve")
    try:
        weights = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"could not read {folder}/{WEIGHTS}: {exc}") from exc

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise AdapterError(f"adapter {folder} holds {key}, which is not a LoRA matrix")
        pairs.setdefault(match.group(1).removeprefix(_PREFIX), {})[match.group(2)] = tensor
    if not pairs:
        raise AdapterError(f"adapter {folder} holds no LoRA weights")

    modules = dict(model.named_modules())
    alpha = float(config.get("lora_alpha") or 8)
    factors: dict[str, Factor] = {}
    for name, pair in pairs.items():
        target = modules.get(name)
        if isinstance(target, LoRALinear):  # another adapter's already
            target = target.base
        if not isinstance(target, nn.Linear):
            raise AdapterError(
                f"adapter {folder} targets {name}, which is not a Linear layer of this base model"
            )
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None:
            raise AdapterError(f"adapter {folder} has lora_A without lora_B (or the reverse) for {name}")
        r = a.shape[0]
        if (
            a.dim() != 2
            or b.dim() != 2
            or a.shape[1] != target.in_features
            or b.shape != (target.out_features, r)
        ):
            raise AdapterError(
                f"adapter {folder} does not fit this base model: {name} has A {list(a.shape)}, "
                f"B {list(b.shape)} for a Linear of {target.in_features} -> {target.out_features}"
            )
        module_alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, alpha))
        scale = module_alpha / math.sqrt(r) if config.get("use_rslora") else module_alpha / r
        device = target.weight.device
        factors[name] = Factor(a.float().to(device), b.float().to(device), scale)
    return factors


@dataclass(eq=False)  # compared by identity: the gathered weights belong to one call's routing
class _Routing:
    """Which adapter each row of the running call uses."""

    single: str | None  # the one adapter of the whole batch
    rows: Sequence[str | None] | None  # per row, when the batch mixes adapters (None: the bare base)


class LoRALinear(nn.Module):
    """A base Linear and the adapters loaded over it."""

    _owner: AdapterSet

    def __init__(self, base: nn.Linear, owner: AdapterSet) -> None:
        super().__init__()
        self.base = base
        self.factors: dict[str, Factor] = {}
        # Not a submodule: the set owns this layer, not the reverse.
        object.__setattr__(self, "_owner", owner)
        self._stack: tuple[list[str], torch.Tensor, torch.Tensor] | None = None
        self._gathered: tuple[_Routing, tuple[torch.Tensor, torch.Tensor] | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        routing = self._owner.routing
        if routing is None:
            return out
        if routing.single is not None:
            factor = self.factors.get(routing.single)
            if factor is None:
                return out
            lora = nn.functional.linear(nn.functional.linear(x.to(factor.a.dtype), factor.a), factor.b)
            return (out + lora * factor.scale).to(out.dtype)
        gathered = self._rows(routing)
        if gathered is None:  # none of the batch's adapters touches this layer
            return out
        a, b = gathered
        h = torch.bmm(x.to(a.dtype).reshape(x.shape[0], -1, x.shape[-1]), a)
        lora = torch.bmm(h, b).reshape(*out.shape)
        return (out + lora).to(out.dtype)

    def _rows(self, routing: _Routing) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each row's A (in x r) and scaled B (r x out), gathered once per call."""
        if self._gathered is not None and self._gathered[0] is routing:
            return self._gathered[1]
        names, a_stack, b_stack = self.stack()
        slot = {name: i + 1 for i, name in enumerate(names)}
        index = [slot.get(name, 0) if name else 0 for name in routing.rows or ()]
        gathered = None
        if any(index):
            at = torch.tensor(index, device=a_stack.device)
            gathered = (a_stack.index_select(0, at), b_stack.index_select(0, at))
        self._gathered = (routing, gathered)
        return gathered

    def stack(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        if self._stack is None:
            names = list(self.factors)
            rank = max(f.a.shape[0] for f in self.factors.values())
            weight = self.base.weight
            # In the base's dtype: a step reads every row's weights, and bf16 halves that traffic.
            a_stack = torch.zeros(
                len(names) + 1, self.base.in_features, rank, device=weight.device, dtype=weight.dtype
            )
            b_stack = torch.zeros(
                len(names) + 1, rank, self.base.out_features, device=weight.device, dtype=weight.dtype
            )
            for i, name in enumerate(names, 1):
                f = self.factors[name]
                r = f.a.shape[0]
                a_stack[i, :, :r] = f.a.T
                b_stack[i, :r, :] = (f.b * f.scale).T
            self._stack = (names, a_stack, b_stack)
        return self._stack

    def changed(self) -> None:
        self._stack = None
        self._gathered = None


class AdapterSet:
    """The adapters loaded over one base model, and the routing of the call
    that runs. Load, unload and route only while no other call runs on the
    model (the engine's model lock)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: dict[str, LoRALinear] = {}
        self.names: list[str] = []
        self.routing: _Routing | None = None

    def __len__(self) -> int:
        return len(self.names)

    def add(self, name: str, factors: dict[str, Factor]) -> None:
        """Wrap the modules of an adapter `read_adapter` read and checked."""
        if name in self.names:
            raise AdapterError(f"adapter {name!r} is already loaded")
        for module, factor in factors.items():
            layer = self.layers.get(module)
            if layer is None:
                parent_name, _, child = module.rpartition(".")
                parent = self.model.get_submodule(parent_name)
                layer = LoRALinear(getattr(parent, child), self)
                setattr(parent, child, layer)
                self.layers[module] = layer
            layer.factors[name] = factor
            layer.changed()
        self.names.append(name)

    def unload(self, name: str) -> None:
        """Take the adapter out; a module no adapter uses any more is the plain Linear again."""
        if name not in self.names:
            return
        self.names.remove(name)
        for module, layer in list(self.layers.items()):
            if layer.factors.pop(name, None) is None:
                continue
            layer.changed()
            if not layer.factors:
                parent_name, _, child = module.rpartition(".")
                setattr(self.model.get_submodule(parent_name), child, layer.base)
                del self.layers[module]

    @contextlib.contextmanager
    def route(self, rows: Sequence[str | None]) -> Iterator[None]:
        """Run the model with row i through adapter rows[i] (None: the bare base)."""
        kinds = set(rows)
        if kinds == {None} or not kinds:
            routing = None
        elif len(kinds) == 1:
            routing = _Routing(next(iter(kinds)), None)
        else:
            routing = _Routing(None, list(rows))
        self.routing = routing
        try:
            yield
        finally:
            self.routing = None
            if routing is not None and routing.rows is not None:
                for layer in self.layers.values():
                    layer._gathered = None
