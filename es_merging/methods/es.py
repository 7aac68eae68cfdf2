"""The ES-Merging family (DESIGN section 3): `es`, `es_layer` (lam only), `es_element` (w only).

The engine computes the signals once (layer coefficients lam[E, L] from the probe's SWD increments,
with ``layer_coefficients`` below; raw gradient scores S[e, k] per tensor) and passes, per tensor,
``ctx.layer_lambda`` = lam[:, layer] and ``ctx.element_scores`` = S[:, k]. The method turns them
into what[e, k] (``combine``) and returns sum_e what[e] * delta_e.

Tensors outside any decoder layer (ctx.layer is None: embeddings, final norm, lm_head of dense
experts) have no layer coefficient and no element score by DESIGN, so they take the uniform
average; the rule is recorded as ``ctx.extras["rule"] = "non_layer_average"``, never silent.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from es_merging.coefficients import combine, element_coefficients, layer_coefficients, merge_weighted
from es_merging.errors import MergeError
from es_merging.methods.average import check_deltas, uniform_average
from es_merging.methods.base import MergeMethod, Param, TensorContext, register

# Declared once; each method lists the ones it actually uses (an unused one is refused by name).
# Temperatures must be > 0: the declared minimum 1e-6 is "effectively one-hot" already.
T_LAYER = Param("temperature_layer", float, 0.5, "T_L: softmax temperature over experts of the layer scores G (> 0)", min=1e-6, max=1e6)
T_ELEMENT = Param("temperature_element", float, 0.1, "T_E: softmax temperature over experts of the z-scored gradient scores (> 0)", min=1e-6, max=1e6)
ALPHA = Param("alpha", float, 1.0, "weight of the other modalities' SWD-increment z-scores in G[e,l] (own modality has weight 1)")
NUM_PROJECTIONS = Param("num_projections", int, 1024, "K: random unit directions of the sliced Wasserstein distance", min=1)
ORDER_P = Param("p", float, 2.0, "order p of the sliced Wasserstein distance", min=1.0)
SCORE = Param("score", str, "grad_abs", "element score: sum of |dLoss/dphi| (grad_abs) or of its square (grad2)", choices=("grad_abs", "grad2"))


class _EsFamily(MergeMethod):
    needs_probe = True

    # ----- the engine's side: turn signals into coefficients with this method's parameters
    def layer_coefficients(self, delta_swd: torch.Tensor, own: Sequence[int]) -> torch.Tensor:
        """lam[E, L] from layer increments [E, L, T] (DESIGN layer steps 4-6) with alpha, T_L."""
        if not self.needs_layer_coefficients:
            raise MergeError(f"method {self.name!r} uses no layer coefficients")
        return layer_coefficients(delta_swd, own, alpha=self.alpha, temperature=self.temperature_layer)

    def element_coefficients(self, scores: torch.Tensor) -> torch.Tensor:
        """w[E, *shape] from one tensor's raw scores (DESIGN element step 3) with T_E."""
        if not self.needs_element_scores:
            raise MergeError(f"method {self.name!r} uses no element scores")
        return element_coefficients(scores, temperature=self.temperature_element)

    # ----- per tensor
    def merge_tensor(self, deltas: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        check_deltas(deltas, ctx)
        if ctx.layer is None:
            ctx.extras["rule"] = "non_layer_average"
            return uniform_average(deltas)
        n_exp = deltas.shape[0]

        if self.needs_layer_coefficients:
            lam = ctx.layer_lambda
            if lam is None:
                raise MergeError(f"tensor {ctx.key!r} (layer {ctx.layer}): method {self.name!r} needs layer coefficients, none were given")
            if lam.dim() != 1 or lam.shape[0] != n_exp:
                raise MergeError(f"tensor {ctx.key!r}: layer coefficients have shape {tuple(lam.shape)}, expected [{n_exp}] (one per expert)")
        else:
            lam = torch.ones(n_exp, device=deltas.device)

        if self.needs_element_scores:
            scores = ctx.element_scores
            if scores is None:
                raise MergeError(f"tensor {ctx.key!r} (layer {ctx.layer}): method {self.name!r} needs element scores, none were given")
            if tuple(scores.shape) != tuple(deltas.shape):
                raise MergeError(f"tensor {ctx.key!r}: element scores have shape {tuple(scores.shape)}, deltas have {tuple(deltas.shape)}")
            w = self.element_coefficients(scores.to(deltas.device))
            ctx.extras["element_coefficients"] = w  # for coefficients.safetensors, if the engine keeps it
            what = combine(w, lam)
        else:
            # es_layer: element weights are all 1, so what[e] = lam[e] / (sum lam + 1e-12) per expert
            what = combine(torch.ones(n_exp, device=deltas.device), lam)
        return merge_weighted(deltas, what)


@register
class Es(_EsFamily):
    name = "es"
    summary = "ES-Merging: layer coefficients from embedding-space SWD x element coefficients from gradient scores, product-then-normalise."
    params = (T_LAYER, T_ELEMENT, ALPHA, NUM_PROJECTIONS, ORDER_P, SCORE)
    needs_layer_coefficients = True
    needs_element_scores = True


@register
class EsLayer(_EsFamily):
    name = "es_layer"
    summary = "ES-Merging ablation: layer-wise coefficients only (one weight per expert and layer)."
    params = (T_LAYER, ALPHA, NUM_PROJECTIONS, ORDER_P)
    needs_layer_coefficients = True
    needs_element_scores = False


@register
class EsElement(_EsFamily):
    name = "es_element"
    summary = "ES-Merging ablation: element-wise coefficients from gradient scores only."
    params = (T_ELEMENT, SCORE)
    needs_layer_coefficients = False
    needs_element_scores = True
