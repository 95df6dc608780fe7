"""Routing surgery on transformers MoE routers: record, ARR (Eq. 6) and expert masking.

One :class:`RoutingController` per model owns a forward pre-hook and an always-call forward hook
on every router. While a router runs, a ``TorchFunctionMode`` catches

* the linear op whose output width is the expert count: the raw router logits z. Edits add
  ``delta`` here (ARR: -lam*phi_l; masking: -inf), so the architecture's own scoring, bias,
  group limiting, top-k and renormalisation run unchanged on the edited logits;
* the selection top-k (input width E, k == top_k): masked experts get -inf there too, the
  ``selection`` ARR target subtracts lam*phi_l there, and the chosen indices are recorded.

Edits are context managers (:class:`Recorder`, :class:`ARR`, :class:`ExpertMask`) that register
with the controller and compose; the hooks are removed when the last edit exits, leaving the
model exactly as it was. Shared experts are never touched: only router outputs change.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from fare_core.adapters import MoELayer, adapter_for, model_type_of, moe_layers
from fare_core.errors import FareError
from fare_core.files import atomic_write

_LINEAR_OPS = (F.linear, torch.mm, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)
_TOPK_OPS = (torch.topk, torch.Tensor.topk)


class _RouterMode(TorchFunctionMode):
    """Active only while one router runs (see module docstring)."""

    def __init__(self, E, top_k, delta, mask, sel_delta):
        super().__init__()
        self.E, self.top_k, self.delta, self.mask, self.sel_delta = E, top_k, delta, mask, sel_delta
        self.logits = self.edited = self.indices = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        is_topk = func in _TOPK_OPS and args[0].shape[-1] == self.E and (
            (args[1] if len(args) > 1 else kwargs.get("k")) == self.top_k
        )
        if is_topk and (self.mask is not None or self.sel_delta is not None):
            scores = args[0]
            if self.sel_delta is not None:
                scores = torch.where(torch.isfinite(scores), scores + self.sel_delta.to(scores.dtype), scores)
            if self.mask is not None:
                scores = scores.masked_fill(self.mask, float("-inf"))
            args = (scores, *args[1:])
        out = func(*args, **kwargs)
        if self.logits is None and func in _LINEAR_OPS and out.shape[-1] == self.E:
            self.logits = out
            if self.delta is not None:
                out = out + self.delta.to(out.dtype)
            self.edited = out
        elif is_topk and self.indices is None:
            self.indices = out[1]
        return out


class _LayerPlan:
    """Combined edits of all active context managers for one MoE layer, on one device."""

    __slots__ = ("delta", "mask", "sel_delta", "observers", "biases")

    def __init__(self):
        self.delta = self.mask = self.sel_delta = None
        self.observers = []
        self.biases = []

    @property
    def active(self) -> bool:
        return self.delta is not None or self.mask is not None or self.sel_delta is not None or bool(self.observers)


class RoutingController:
    """Owns the router hooks of one model; edits register and unregister with it."""

    _ATTR = "_fare_routing_controller"

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers: list[MoELayer] = moe_layers(model)
        self.by_index = {layer.index: layer for layer in self.layers}
        self.adapter = adapter_for(model)
        self.model_type = model_type_of(model)
        self.edits: list = []
        self._handles: list = []
        self._plans: dict[int, _LayerPlan] = {}

    @classmethod
    def of(cls, model: nn.Module) -> RoutingController:
        ctrl = model.__dict__.get(cls._ATTR)
        if ctrl is None:
            ctrl = cls(model)
            model.__dict__[cls._ATTR] = ctrl
        return ctrl

    def layer(self, index: int) -> MoELayer:
        if index not in self.by_index:
            raise FareError(
                f"layer {index!r} is not an MoE layer of this {self.model_type} model; "
                f"MoE layers: {sorted(self.by_index)}"
            )
        return self.by_index[index]

    # ---------------------------------------------------------------- edit registry
    def add(self, edit) -> None:
        self.edits.append(edit)
        self._rebuild()
        if not self._handles:
            self._attach()

    def remove(self, edit) -> None:
        if edit in self.edits:
            self.edits.remove(edit)
        self._rebuild()
        if not self.edits:
            self._detach()

    def _rebuild(self) -> None:
        plans = {}
        for layer in self.layers:
            plan = _LayerPlan()
            for edit in self.edits:
                d = edit.delta(layer)
                if d is not None:
                    plan.delta = d if plan.delta is None else plan.delta + d
                m = edit.mask(layer)
                if m is not None:
                    plan.mask = m if plan.mask is None else plan.mask | m
                s = edit.selection_delta(layer)
                if s is not None:
                    plan.sel_delta = s if plan.sel_delta is None else plan.sel_delta + s
                if edit.observes(layer):
                    plan.observers.append(edit)
            if plan.mask is not None:
                inf = torch.zeros(layer.num_experts).masked_fill(plan.mask, float("-inf"))
                plan.delta = inf if plan.delta is None else plan.delta + inf
                plan.biases = [t for _, t in layer.selection_biases]
            dev = layer.router.weight.device if hasattr(layer.router, "weight") else None
            for name in ("delta", "mask", "sel_delta"):
                t = getattr(plan, name)
                if t is not None and dev is not None:
                    setattr(plan, name, t.to(dev))
            plans[layer.index] = plan
        self._plans = plans

    # ---------------------------------------------------------------- hooks
    def _attach(self) -> None:
        for layer in self.layers:
            pre, post = self._hooks(layer)
            self._handles.append(layer.router.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
            self._handles.append(layer.router.register_forward_hook(post, with_kwargs=True, always_call=True))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hooks(self, layer: MoELayer):
        """(pre, post) hooks of one router, sharing the per-call state."""
        state = {}

        def pre(module, args, kwargs):
            plan = self._plans.get(layer.index)
            if plan is None or not plan.active:
                return None
            if plan.mask is not None:
                state["saved"] = [t.data for t in plan.biases]
                for t in plan.biases:
                    t.data = t.data.masked_fill(plan.mask.to(t.device), float("-inf"))
                args = tuple(
                    a.masked_fill(plan.mask.to(a.device), float("-inf"))
                    if torch.is_tensor(a) and a.dim() == 1 and a.shape[0] == layer.num_experts
                    else a
                    for a in args
                )
            mode = _RouterMode(layer.num_experts, layer.top_k, plan.delta, plan.mask, plan.sel_delta)
            state["mode"] = mode
            mode.__enter__()
            return args, kwargs

        def post(module, args, kwargs, output):
            mode = state.pop("mode", None)
            if mode is None:
                return None
            mode.__exit__(None, None, None)
            for t, d in zip(self._plans[layer.index].biases, state.pop("saved", [])):
                t.data = d
            if mode.logits is None:
                raise RuntimeError(
                    f"{type(module).__name__} in layer {layer.index}: no router logits op was seen "
                    "(a hub kernel replaced the router? load with use_kernels=False)"
                )
            indices = mode.indices
            if indices is None and isinstance(output, tuple) and len(output) > 2:
                indices = output[2]
            for obs in self._plans[layer.index].observers:
                obs.observe(layer, mode.logits.detach(), mode.edited.detach(), indices.detach())
            return None

        return pre, post


class RoutingEdit:
    """Base class of composable routing context managers."""

    def __init__(self, model: nn.Module):
        self.controller = RoutingController.of(model)
        self.model = model

    def delta(self, layer: MoELayer):
        return None

    def mask(self, layer: MoELayer):
        return None

    def selection_delta(self, layer: MoELayer):
        return None

    def observes(self, layer: MoELayer) -> bool:
        return False

    def __enter__(self):
        self.controller.add(self)
        return self

    def __exit__(self, *exc):
        self.controller.remove(self)
        return False

    # attach()/detach() aliases for long-lived use (e.g. inside an lm-eval model)
    def attach(self):
        return self.__enter__()

    def detach(self):
        self.__exit__(None, None, None)


def _phi_rows(controller: RoutingController, phi, profile_layers: Sequence[int] | None) -> dict[int, torch.Tensor]:
    if isinstance(phi, Mapping):
        rows = {int(k): torch.as_tensor(v, dtype=torch.float32) for k, v in phi.items()}
    else:
        phi = torch.as_tensor(phi, dtype=torch.float32)
        layer_ids = list(profile_layers) if profile_layers is not None else [la.index for la in controller.layers]
        if phi.dim() != 2 or phi.shape[0] != len(layer_ids):
            raise FareError(f"phi must have shape [{len(layer_ids)}, E] (one row per MoE layer), got {tuple(phi.shape)}")
        rows = dict(zip(layer_ids, phi))
    for index, row in rows.items():
        layer = controller.layer(index)
        if not torch.isfinite(row).all():
            raise FareError(f"phi row for layer {index} has non-finite values ({row.tolist()}); phi must be finite")
        if row.shape != (layer.num_experts,):
            raise FareError(
                f"phi row for layer {index} has shape {tuple(row.shape)}, the model has {layer.num_experts} experts there"
            )
    return rows


class ARR(RoutingEdit):
    """Adaptive Routing Reweighting, Eq. 6: p'(e|h_t) = softmax(z_t - lam*phi_l) before top-k.

    phi: [n_moe_layers, E] (rows in MoE-layer order, or for ``profile_layers``) or {layer: [E]}.
    layers: decoder-layer indices to steer (default: every layer phi covers).
    target: "logits" (the paper's definition) or "selection" (subtract lam*phi from the selection
        score of bias-after-score routers, the only way ARR can remove an expert there).
    """

    def __init__(self, model, phi, lam: float, layers: Iterable[int] | None = None, target: str = "logits",
                 profile_layers: Sequence[int] | None = None):
        super().__init__(model)
        if target not in ("logits", "selection"):
            raise FareError(f"arr_target={target!r} is not allowed; use 'logits' or 'selection'")
        if target == "selection" and not self.controller.adapter.bias_after_score:
            raise FareError(
                f"arr_target='selection' applies to routers that add a correction bias after the score "
                f"function (e.g. ernie4_5_moe, deepseek_v3); {self.controller.model_type} has none: use 'logits'"
            )
        lam = float(lam)
        if not lam >= 0:
            raise FareError(f"lam={lam!r} is not allowed; lam must be a number >= 0")
        rows = _phi_rows(self.controller, phi, profile_layers)
        chosen = sorted(rows) if layers is None else [int(x) for x in layers]
        for index in chosen:
            self.controller.layer(index)
            if index not in rows:
                raise FareError(f"layer {index} has no phi row; the profile covers layers {sorted(rows)}")
        self.lam, self.target, self.layers = lam, target, chosen
        self._penalty = {i: -lam * rows[i] for i in chosen}
        if target == "logits" and self.controller.adapter.bias_after_score and lam > 0:
            self._warn_bias_floor(rows)

    def _warn_bias_floor(self, rows) -> None:
        """Warn where an expert's correction bias alone can keep it selected under any lam."""
        stuck = {}
        for index in self.layers:
            layer = self.controller.layer(index)
            biases = layer.selection_biases
            if not biases:
                continue
            b = biases[0][1].detach().float().reshape(-1).cpu()
            phi = rows[index].float().cpu()
            penalised = phi > phi.min()
            pen_ids = torch.nonzero(penalised).flatten()
            slots = layer.top_k - int((~penalised).sum())
            if slots <= 0:  # enough unpenalised experts: a penalised one survives only on its bias
                floor = b[~penalised].topk(layer.top_k).values[-1]
                bad = [int(e) for e in pen_ids if b[e] >= floor]
            else:  # as lam grows the remaining slots go by bias, not by phi
                by_bias = set(pen_ids[b[pen_ids].topk(slots).indices].tolist())
                by_phi = set(pen_ids[(-phi[pen_ids]).topk(slots).indices].tolist())
                bad = sorted(by_bias - by_phi)
            if bad:
                stuck[index] = bad
        if stuck:
            warnings.warn(
                f"{self.controller.model_type} adds a correction bias after the score function, so ARR on the "
                f"logits cannot remove experts whose bias outranks the unpenalised ones: {stuck} "
                "(layer: experts). Use arr_target=selection or intervention=mask for hard exclusion.",
                stacklevel=3,
            )

    def delta(self, layer):
        return self._penalty.get(layer.index) if self.target == "logits" else None

    def selection_delta(self, layer):
        return self._penalty.get(layer.index) if self.target == "selection" else None


class ExpertMask(RoutingEdit):
    """Chosen (layer, expert) pairs can never be selected: -inf on logits, selection bias and top-k."""

    def __init__(self, model, pairs: Iterable[tuple[int, int]]):
        super().__init__(model)
        masks: dict[int, torch.Tensor] = {}
        for pair in pairs:
            try:
                index, expert = (int(v) for v in pair)
            except (TypeError, ValueError):
                raise FareError(f"mask entry {pair!r} is not a (layer, expert) pair of integers") from None
            layer = self.controller.layer(index)
            if not 0 <= expert < layer.num_experts:
                raise FareError(f"expert {expert} out of range for layer {index}: allowed 0..{layer.num_experts - 1}")
            masks.setdefault(index, torch.zeros(layer.num_experts, dtype=torch.bool))[expert] = True
        for index, m in masks.items():
            layer = self.controller.layer(index)
            left = int((~m).sum())
            if left < layer.top_k:
                raise FareError(
                    f"masking {int(m.sum())} experts in layer {index} leaves {left}, fewer than top_k={layer.top_k}"
                )
            n_group = getattr(layer.router, "num_group", None) or 1
            if self.controller.adapter.group_limited and n_group > 1:
                per_group = (~m).view(n_group, -1).sum(-1)
                if int(per_group.min()) < 2:
                    raise FareError(
                        f"masking leaves fewer than 2 experts in a routing group of layer {index} "
                        f"(unmasked per group: {per_group.tolist()})"
                    )
        self.masks = masks

    def mask(self, layer):
        return self.masks.get(layer.index)


class Recorder(RoutingEdit):
    """Records routing at every MoE layer, padding excluded.

    Default: streaming aggregates per layer x group x expert (selection counts, probability sums,
    token counts), so memory does not grow with the number of tokens. ``trace_dir`` additionally
    writes every token's raw logits and selected experts to safetensors shards.

    Padding: the attention mask passed to the model's forward is used; callers that run without
    one (lm-eval's right-padded log-likelihood batches) call :meth:`set_token_mask` first.
    Groups: ``set_groups`` labels each sequence of the next forward with a group id.
    Probabilities are the adapter's score function (softmax/sigmoid) of the logits the router
    actually used (after any ARR edit); raw logits are the pre-edit ones.
    """

    def __init__(self, model, groups: Sequence[str] = ("all",), trace_dir: str | os.PathLike | None = None,
                 shard_tokens: int = 200_000, model_id: str | None = None):
        super().__init__(model)
        self.model_id = model_id or getattr(getattr(model, "config", None), "name_or_path", None)
        self.group_names = list(groups)
        L, G = len(self.controller.layers), len(self.group_names)
        E = max(layer.num_experts for layer in self.controller.layers)
        self.num_experts = E
        self._pos = {layer.index: layer.position for layer in self.controller.layers}
        self._counts = torch.zeros(L, G, E, dtype=torch.int64)
        self._prob_sums = torch.zeros(L, G, E, dtype=torch.float64)
        self._tokens = torch.zeros(L, G, dtype=torch.int64)
        self._acc: dict = {}
        self._pending_mask = None
        self._groups = None
        self._valid = None
        self._token_groups = None
        self._on_device: dict = {}
        self._hook = None
        self.trace_dir = Path(trace_dir) if trace_dir else None
        self.shard_tokens = shard_tokens
        self._trace: dict[str, list[torch.Tensor]] = {}
        self._trace_tokens = 0
        self._shard = 0
        self._score = torch.sigmoid if self.controller.adapter.score_fn == "sigmoid" else (lambda z: z.softmax(-1))

    # ------------------------------------------------------------ inputs for the next forward
    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """[B, T] bool/int mask of real tokens for the next forward without an attention mask."""
        self._pending_mask = mask

    def set_groups(self, groups: torch.Tensor | Sequence[int] | None) -> None:
        """Group id per sequence ([B]) for the following forwards (None: group 0)."""
        self._groups = None if groups is None else torch.as_tensor(groups, dtype=torch.int64)

    def _on_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            self._valid = self._token_groups = None
            return None
        B, T = ids.shape[0], ids.shape[1]
        mask = self._pending_mask
        self._pending_mask = None
        am = kwargs.get("attention_mask")
        if mask is None and torch.is_tensor(am) and am.dim() == 2 and am.shape[0] == B and am.shape[1] >= T:
            mask = am[:, -T:]
        valid = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.to("cpu").bool()
        groups = self._groups if self._groups is not None else torch.zeros(B, dtype=torch.int64)
        if groups.shape[0] != B:
            raise ValueError(f"set_groups got {groups.shape[0]} group ids for a batch of {B} sequences")
        if int(groups.max()) >= len(self.group_names) or int(groups.min()) < 0:
            raise ValueError(f"group ids must be in 0..{len(self.group_names) - 1}, got {groups.tolist()}")
        self._valid = valid.reshape(-1)
        self._token_groups = groups[:, None].expand(B, T).reshape(-1)
        self._on_device = {}
        return None

    def _forward_masks(self, dev) -> tuple[torch.Tensor, torch.Tensor]:
        """(valid-token mask, group id per token) of the current forward, moved to ``dev`` once."""
        if dev not in self._on_device:
            self._on_device[dev] = (self._valid.to(dev), self._token_groups.to(dev))
        return self._on_device[dev]

    def __enter__(self):
        self._hook = self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        return super().__enter__()

    def __exit__(self, *exc):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.trace_dir is not None:
            self._flush_trace()
        return super().__exit__(*exc)

    # ------------------------------------------------------------ hook callback
    def observes(self, layer):
        return True

    def observe(self, layer: MoELayer, raw: torch.Tensor, edited: torch.Tensor, indices: torch.Tensor) -> None:
        n = raw.shape[0]
        dev = raw.device
        if self._valid is not None and self._valid.numel() == n:
            valid, groups = self._forward_masks(dev)
            groups = groups[valid]
            raw, edited, indices = raw[valid], edited[valid], indices[valid]
        else:  # decode steps of generate() and calls without a top-level forward: all tokens count
            groups = torch.zeros(n, dtype=torch.int64, device=dev)
            if self._groups is not None and self._groups.numel() == n:
                groups = self._groups.to(dev)
        G, E = len(self.group_names), layer.num_experts
        p = layer.position
        acc = self._device_acc(dev)
        probs = self._score(edited.float())
        if G == 1:  # the common lm-eval case: no per-group bookkeeping
            acc["counts"][p, 0, :E] += torch.bincount(indices.reshape(-1), minlength=E)
            acc["prob_sums"][p, 0, :E] += probs.sum(0, dtype=torch.float64)
            acc["tokens"][p, 0] += indices.shape[0]
        else:
            key = (groups[:, None] * E + indices).reshape(-1)
            acc["counts"][p, :, :E] += torch.bincount(key, minlength=G * E).view(G, E)
            acc["prob_sums"][p, :, :E] += torch.zeros(G, E, device=dev).index_add_(0, groups, probs).double()
            acc["tokens"][p] += torch.bincount(groups, minlength=G)
        if self.trace_dir is not None:
            self._trace.setdefault(f"layer{layer.index}.logits", []).append(raw.float().cpu())
            self._trace.setdefault(f"layer{layer.index}.selected", []).append(indices.to(torch.int32).cpu())
            self._trace.setdefault(f"layer{layer.index}.group", []).append(groups.to(torch.int32).cpu())
            if layer.position == len(self.controller.layers) - 1:
                self._trace_tokens += raw.shape[0]
                if self._trace_tokens >= self.shard_tokens:
                    self._flush_trace()

    def _device_acc(self, dev) -> dict[str, torch.Tensor]:
        """Accumulators on the routers' device (no host sync per layer call)."""
        acc = self._acc.get(dev)
        if acc is None:
            acc = self._acc[dev] = {
                "counts": torch.zeros_like(self._counts, device=dev),
                "prob_sums": torch.zeros_like(self._prob_sums, device=dev),
                "tokens": torch.zeros_like(self._tokens, device=dev),
            }
        return acc

    def _total(self, name: str) -> torch.Tensor:
        total = getattr(self, f"_{name}").clone()
        for acc in self._acc.values():
            total += acc[name].cpu()
        return total

    # ------------------------------------------------------------ results
    @property
    def counts(self) -> torch.Tensor:
        """[L, E, G] tokens of group g whose top-k includes expert e."""
        return self._total("counts").permute(0, 2, 1).contiguous()

    @property
    def prob_sums(self) -> torch.Tensor:
        """[L, E, G] summed routing probabilities."""
        return self._total("prob_sums").permute(0, 2, 1).contiguous()

    @property
    def tokens(self) -> torch.Tensor:
        """[L, G] tokens seen per layer and group."""
        return self._total("tokens")

    @property
    def layer_indices(self) -> list[int]:
        return [layer.index for layer in self.controller.layers]

    def metadata(self, complete: bool = True) -> dict:
        return {
            "format": "fare-routing/1",
            "complete": complete,
            "model": self.model_id,
            "model_type": self.controller.model_type,
            "layers": self.layer_indices,
            "num_experts": self.num_experts,
            "top_k": [layer.top_k for layer in self.controller.layers],
            "groups": self.group_names,
            "score_fn": self.controller.adapter.score_fn,
        }

    def save(self, path: str | os.PathLike, complete: bool = True) -> Path:
        """Write aggregates atomically: ``<path>/routing.safetensors`` (+ JSON metadata) and a long CSV.

        ``complete=False`` marks a snapshot of a run still in progress (``"complete": false`` in
        routing.json and the safetensors metadata); a run that stops there leaves it marked partial.
        """
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        meta = self.metadata(complete)
        tensors = {"counts": self.counts, "prob_sums": self.prob_sums, "tokens": self.tokens}
        atomic_write(out / "routing.safetensors", lambda p: save_file(tensors, str(p), metadata={"fare": json.dumps(meta)}))
        atomic_write(out / "routing.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))

        def write_csv(p):
            c, s, t = self.counts, self.prob_sums, self.tokens
            with open(p, "w") as f:
                f.write("layer,expert,group,selected,prob_sum,tokens\n")
                for li, layer_index in enumerate(self.layer_indices):
                    for g, gname in enumerate(self.group_names):
                        for e in range(self.num_experts):
                            f.write(f"{layer_index},{e},{gname},{int(c[li, e, g])},{float(s[li, e, g])!r},{int(t[li, g])}\n")

        atomic_write(out / "routing.csv", write_csv)
        return out

    def _flush_trace(self) -> None:
        if not self._trace:
            return
        from safetensors.torch import save_file

        self.trace_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: torch.cat(v) for k, v in self._trace.items()}
        target = self.trace_dir / f"trace-{self._shard:05d}.safetensors"
        atomic_write(target, lambda p: save_file(tensors, str(p), metadata={"fare": json.dumps(self.metadata())}))
        self._shard += 1
        self._trace = {}
        self._trace_tokens = 0


def load_routing(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read aggregates written by :meth:`Recorder.save` (directory or .safetensors file)."""
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        p = p / "routing.safetensors"
    with safe_open(str(p), framework="pt") as f:
        meta = json.loads(f.metadata()["fare"])
        return {k: f.get_tensor(k) for k in f.keys()}, meta
