"""ES-Merging's embedding-space signals (DESIGN section 3).

Coarse (layer-wise): pooled hidden states per (model, layer, modality) on the probe -> sliced
Wasserstein distance between base and expert -> layer increments -> lambda[E, L].
Fine (element-wise): per-layer gradient of the expert's own-modality deviation from the base
w.r.t. that layer's tensors, accumulated over probe batches -> S[e, k].

One base in memory with every LoRA adapter attached (switched by name; base = adapters off).
Dense (full-checkpoint) experts are swapped into that base one at a time and the base's tensors
restored after each (``dense_swap``); their element scores are taken w.r.t. every floating
checkpoint tensor of each decoder layer (projections and norms), keyed by checkpoint key as the
engine's dense plan merges them. LoRA and dense experts are not mixed (``plan_merge`` refuses it).
``torch.no_grad`` for layer signals; for element scores gradients flow only into the current
layer's tensors.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

from es_merging.coefficients import layer_coefficients, layer_increments, sliced_wasserstein, standardize_pair
from es_merging.dense_swap import dense_expert_swapped_in
from es_merging.errors import MergeError
from es_merging.experts import ExpertSpec
from es_merging.probe import DEFAULT_QUESTION, Probe, ProbeSample
from es_merging.signals_types import Signals

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_of(key: str) -> int | None:
    m = _LAYER.search(key)
    return int(m.group(1)) if m else None


def adapter_key(param_name: str, adapter: str) -> str:
    """Live PEFT parameter name -> the key PEFT writes in adapter_model.safetensors."""
    return param_name.replace(f".{adapter}.", ".")


def module_weight_key(param_name: str) -> str:
    """Live PEFT base-layer parameter name -> the base checkpoint key."""
    name = param_name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _seed_for(seed: int, *parts: int) -> int:
    value = seed
    for p in parts:
        value = (value * 1_000_003 + p + 1) % (2**63 - 1)
    return value


def _prepare_samples(probe: Probe, encodable: set[str], needed: set[str]) -> tuple[list[ProbeSample], list[str]]:
    """Drop raw inputs of modalities nobody can encode; the rest keep their spans."""
    keep = [m for m in probe.modalities() if m == "cell" or m in encodable]
    missing = sorted(needed - set(keep))
    if missing:
        raise MergeError(
            f"the probe has no usable span for modality {', '.join(missing)} owned by an expert; "
            f"build a probe whose samples include {', '.join(missing)} (probe modalities: {probe.modalities()})"
        )
    drop = {"molecule": "smiles", "protein": "protein", "cell": "cell"}
    samples = [
        s.model_copy(update={drop[m]: None for m in probe.modalities() if m not in keep}) for s in probe.samples
    ]
    return samples, keep


def _pooled(model, batches, modalities: list[str]) -> torch.Tensor:
    """Mean hidden state over each modality's tokens -> [L, T, N, H] (layers 1..L)."""
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for batch in batches:
            hs = model.hidden_states(batch)[1:]  # drop the embeddings
            per_layer = []
            for h in hs:
                per_mod = []
                for m in modalities:
                    mask = batch.masks[m].to(h.device).unsqueeze(-1).to(h.dtype)  # [B, S, 1]
                    count = mask.sum(1).clamp_min(1.0)
                    per_mod.append((h * mask).sum(1) / count)  # [B, H]
                per_layer.append(torch.stack(per_mod))  # [T, B, H]
            out.append(torch.stack(per_layer).float().cpu())  # [L, T, B, H]
    return torch.cat(out, dim=2)


def _layer_signal(pooled_base: torch.Tensor, pooled_expert: torch.Tensor, *, num_projections: int, p: float,
                  seed: int, expert_index: int, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """SWD per (layer, modality) between base and expert pooled states -> [L, T]."""
    L, T = pooled_base.shape[:2]
    swd = torch.zeros(L, T, dtype=torch.float64)
    modalities = list(rows)
    for l in range(L):
        for t in range(T):
            valid = rows[modalities[t]]  # samples that have this modality
            x, y = standardize_pair(pooled_base[l, t][valid], pooled_expert[l, t][valid])
            gen = torch.Generator().manual_seed(_seed_for(seed, expert_index, l, t))
            swd[l, t] = sliced_wasserstein(x, y, num_projections=num_projections, p=p, generator=gen)
    return swd


class _LayerInputsDetached:
    """Detach every decoder layer's input hidden states while active.

    Forward values are unchanged, but gradients can no longer cross layers, so one backward of
    sum_l Loss[e, l] yields exactly dLoss[e, l]/dphi_k for the tensors phi_k of layer l (the design's
    per-layer rule) instead of L separate backward passes."""

    def __init__(self, model):
        self.layers = _decoder_layers(model)
        self.handles: list[Any] = []

    @staticmethod
    def _hook(module, args, kwargs):
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            kwargs = dict(kwargs, hidden_states=kwargs["hidden_states"].detach())
        return args, kwargs

    def __enter__(self):
        self.handles = [layer.register_forward_pre_hook(self._hook, with_kwargs=True) for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _decoder_layers(model) -> list[torch.nn.Module]:
    for name, module in model.backbone.named_modules():
        if name.endswith(".layers") and isinstance(module, torch.nn.ModuleList):
            return list(module)
    raise MergeError("cannot find the decoder layers (a `.layers` ModuleList) in the backbone")


def _lora_targets(model, spec: ExpertSpec, mode: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(merged key, live tensor) of a LoRA expert: its A/B (factor) or the adapted module weights (delta)."""
    name = spec.name
    targets = []
    for pname, param in model.backbone.named_parameters():
        if layer_of(pname) is None:
            continue
        if mode == "factor" and "lora_" in pname and f".{name}." in pname:
            targets.append((adapter_key(pname, name), param))
        elif mode == "delta" and ".base_layer.weight" in pname:
            targets.append((module_weight_key(pname), param))
    if not targets:
        raise MergeError(f"expert {name!r}: no {'adapter' if mode == 'factor' else 'module'} tensors found in any layer")
    return targets


def _dense_targets(model, spec: ExpertSpec, swapped: dict[str, torch.Tensor]) -> list[tuple[str, torch.nn.Parameter]]:
    """(checkpoint key, live tensor) of every floating checkpoint tensor inside a decoder layer:
    the tensors the dense plan merges with per-layer coefficients (projections and norms alike)."""
    params = {id(p) for p in model.backbone.parameters()}
    targets = []
    for key, tensor in swapped.items():
        if layer_of(key) is None or not tensor.is_floating_point():
            continue
        if id(tensor) not in params:  # a buffer: no gradient to score it by
            raise MergeError(f"dense expert {spec.name!r}: tensor {key!r} is a buffer, not a parameter, so it has "
                             "no gradient score; use es_layer (layer coefficients only) or a baseline method")
        targets.append((key, tensor))
    if not targets:
        raise MergeError(f"dense expert {spec.name!r}: its checkpoint has no floating tensor in any decoder layer")
    return targets


def _grad_scores(model, targets: list[tuple[str, torch.nn.Parameter]], batches, base_states, own: str,
                 score: str) -> dict[str, torch.Tensor]:
    """S[k] for the active expert: per-layer gradients of Loss[e,l] w.r.t. that layer's tensors,
    summed over probe batches (|g| for grad_abs, g^2 for grad2)."""
    named = dict(model.backbone.named_parameters())
    sums = {key: torch.zeros_like(param, dtype=torch.float32, device="cpu") for key, param in targets}
    old_flags = {id(p): p.requires_grad for p in named.values()}
    try:
        for param in named.values():
            param.requires_grad_(False)
        for _, param in targets:
            param.requires_grad_(True)
        for batch, base_h in zip(batches, base_states):
            with torch.enable_grad(), _LayerInputsDetached(model):
                exp_h = model.hidden_states(batch)[1:]
                mask = batch.masks[own].to(exp_h[0].device)
                loss = sum(((h - b)[mask]).pow(2).mean() for h, b in zip(exp_h, base_h))
                grads = torch.autograd.grad(loss, [p for _, p in targets], allow_unused=True)
            for (key, _), g in zip(targets, grads):
                if g is not None:
                    g = g.detach().float().cpu()
                    sums[key] += g.abs() if score == "grad_abs" else g.pow(2)
    finally:
        for param in named.values():
            param.requires_grad_(old_flags[id(param)])
    return sums


@contextmanager
def _expert_active(model, spec: ExpertSpec) -> Iterator[dict[str, torch.Tensor]]:
    """The model computes as ``spec`` inside the block and as the base after it. Yields the dense
    expert's swapped tensors (empty for a LoRA expert, which is an adapter switch)."""
    if spec.kind == "dense":
        with dense_expert_swapped_in(model.backbone, spec) as swapped:
            yield swapped
        return
    model.set_adapter(spec.name)
    try:
        yield {}
    finally:
        model.set_adapter(None)


def _check_experts(experts: list[ExpertSpec], mode: str) -> None:
    kinds = {e.kind for e in experts}
    if len(kinds) > 1:  # as plan_merge: the element-score keys of the two kinds differ
        lora = [e.name for e in experts if e.kind == "lora"]
        dense = [e.name for e in experts if e.kind == "dense"]
        raise MergeError(f"cannot compute ES signals for LoRA experts {lora} with dense experts {dense} together")
    if kinds == {"dense"} and mode != "delta":
        raise MergeError("dense (full-checkpoint) experts are merged in delta mode only (--mode delta)")
    for e in experts:
        if not e.modality:
            raise MergeError(f"expert {e.name!r} declares no modality; ES-Merging needs one in its expert.json")


def _stack_scores(experts: list[ExpertSpec], per_expert: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """key -> S[E, *shape]; every expert must have scored the same tensors."""
    keys = sorted(per_expert[0])
    for i, sums in enumerate(per_expert[1:], start=1):
        if sorted(sums) != keys:
            diff = sorted(set(keys) ^ set(sums))
            raise MergeError(f"experts {experts[0].name!r} and {experts[i].name!r} differ in tensors: {diff[:3]}")
    return {k: torch.stack([s[k] for s in per_expert]) for k in keys}


def compute_signals(
    base_dir: str | Path,
    experts: list[ExpertSpec],
    probe_path: str | Path | Probe,
    *,
    mode: str,
    method,
    seed: int = 0,
    batch_size: int = 8,
    progress: Progress | None = None,
    device: str = "cpu",
) -> Signals:
    """Layer coefficients (always) and element scores (when ``method.needs_element_scores``)."""
    from es_merging.mllm import MultimodalModel

    timings: dict[str, float] = {}
    t0 = time.time()
    probe = probe_path if isinstance(probe_path, Probe) else Probe.load(probe_path)
    _check_experts(experts, mode)
    encoders: dict[str, Path] = {}
    for e in experts:
        if e.encoder_dir and e.modality not in encoders:
            encoders[e.modality] = e.encoder_dir
    samples, modalities = _prepare_samples(probe, set(encoders), {e.modality for e in experts})
    own = [modalities.index(e.modality) for e in experts]
    params = dict(method.values)
    num_projections = int(params.get("num_projections", 1024))
    p = float(params.get("p", 2.0))
    score = str(params.get("score", "grad_abs"))

    # dense experts are swapped into this one base in turn (dense_swap), so only LoRA ones attach
    adapters = {e.name: e.path for e in experts if e.kind == "lora"}
    model = MultimodalModel.load(base_dir, adapters=adapters, encoders=encoders, device=device)
    rendered = [model.renderer.render(s, question=DEFAULT_QUESTION) for s in samples]
    batches = [model.collate(rendered[i:i + batch_size]) for i in range(0, len(rendered), batch_size)]
    rows = {m: torch.tensor([m in r.masks for r in rendered]) for m in modalities}
    for m, present in rows.items():
        if int(present.sum()) < 2:
            raise MergeError(f"the probe has {int(present.sum())} sample(s) with a {m} span; SWD needs at least 2")
    timings["load"] = time.time() - t0

    t = time.time()
    total = len(experts) + 1
    needs_scores = bool(getattr(method, "needs_element_scores", False))
    model.set_adapter(None)
    pooled_base = _pooled(model, batches, modalities)
    if progress:
        progress("signals: hidden states", 1, total)
    timings["layer_signals"] = time.time() - t
    base_states = None
    if needs_scores:
        t = time.time()
        with torch.no_grad():  # the base's states are the same target for every expert
            base_states = [[h.detach() for h in model.hidden_states(b)[1:]] for b in batches]
        timings["element_scores"] = time.time() - t
    swd = torch.zeros(len(experts), model.num_layers, len(modalities), dtype=torch.float64)
    per_expert: list[dict[str, torch.Tensor]] = []
    for i, e in enumerate(experts):
        # one activation per expert for both signals: a dense expert's checkpoint is read once
        t = time.time()
        with _expert_active(model, e) as swapped:
            timings["activate"] = timings.get("activate", 0.0) + (time.time() - t)  # swap-in / adapter switch
            t = time.time()
            pooled = _pooled(model, batches, modalities)
            swd[i] = _layer_signal(pooled_base, pooled, num_projections=num_projections, p=p, seed=seed,
                                   expert_index=i, rows=rows)
            timings["layer_signals"] += time.time() - t
            if progress:
                progress("signals: hidden states", i + 2, total)
            if needs_scores:
                t = time.time()
                targets = _dense_targets(model, e, swapped) if e.kind == "dense" else _lora_targets(model, e, mode)
                per_expert.append(_grad_scores(model, targets, batches, base_states, e.modality, score))
                timings["element_scores"] += time.time() - t
                if progress:
                    progress("signals: element scores", i + 1, len(experts))
    delta = layer_increments(swd)
    if getattr(method, "needs_layer_coefficients", True):
        lam = method.layer_coefficients(delta, own) if hasattr(method, "layer_coefficients") else layer_coefficients(delta, own)
    else:  # es_element: lambda plays no part; uniform, and the manifest says so
        lam = torch.full((len(experts), model.num_layers), 1.0 / len(experts), dtype=torch.float64)
    scores = _stack_scores(experts, per_expert) if needs_scores else {}
    model.set_adapter(None)
    return Signals(
        expert_names=[e.name for e in experts],
        modalities=modalities,
        own=own,
        swd=swd.float(),
        delta_swd=delta.float(),
        lam=lam.float(),
        scores=scores,
        meta={
            "seed": seed,
            "probe_hash": probe.content_hash,
            "probe_samples": len(samples),
            "num_projections": num_projections,
            "p": p,
            "score": score,
            "mode": mode,
            "layer_coefficients_used": bool(getattr(method, "needs_layer_coefficients", True)),
            "batch_size": batch_size,
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
        },
    )


def signal_summary(signals: Signals) -> dict[str, Any]:
    return {
        "experts": signals.expert_names,
        "modalities": signals.modalities,
        "lambda": signals.lam.tolist(),
        "swd": signals.swd.tolist(),
    }
