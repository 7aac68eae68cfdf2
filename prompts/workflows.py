"""Three workflows agents ask for: screening a compound library against a target panel in a cell
context, merging chosen experts and explaining the coefficients, and explaining one prediction.
Each prompt is a user message that names the tools to call, in order, and what to report."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from mcp.server import MCPServer


def _items(text: str) -> list[str]:
    """Split a comma/semicolon/newline separated argument (MCP prompt arguments are strings)."""
    parts = [p.strip() for chunk in text.replace(";", "\n").splitlines() for p in chunk.split(",")]
    return [p for p in parts if p]


def screen_compound_library(compounds: str, targets: str, cell_context: str, model: str = "") -> str:
    mols, prots = _items(compounds), _items(targets)
    model_line = (f"Use the model `{model}`." if model else
                  "Pick the model with list_models (prefer a merged model that covers molecule, protein and cell; "
                  "if none exists, merge the experts first: see the merge_and_explain prompt).")
    return f"""Screen a compound library against a target panel in a cell context with the es-merging tools.

Compounds ({len(mols)}): {', '.join(mols)}
Targets ({len(prots)}): {', '.join(p[:40] + ('...' if len(p) > 40 else '') for p in prots)}
Cell context: {cell_context}

Steps:
1. inspect_molecules on the compounds and inspect_proteins on the targets; drop invalid items and
   tell me which ones and why. Describe the cell context as ranked genes (inspect_cell_profiles
   with ranked_genes) - if it is a cell-type name, use its canonical marker genes, most expressed first.
2. {model_line}
3. start_screen with smiles, proteins and cells=[the ranked genes], task "triple_effect".
4. Follow it with get_job(job_id, wait_s=30) until it succeeds; if it fails, read the error and fix the input.
5. Read the ranked table (resource esm://screens/<job_id>/results.csv) and report the top 10
   combinations with their probabilities, grouped by target. Note that scores come from a small merged
   model: treat them as hypotheses to test, and say how they were produced (model id, task)."""


def merge_and_explain(experts: str, method: str = "es", probe: str = "") -> str:
    names = _items(experts)
    probe_line = (f"Use the probe `{probe}`." if probe else
                  "Build a probe with build_probe (from_zoo=true, n=64, strategy 'random'), or from my own samples "
                  "if I gave any; every expert's modality must appear in it.")
    return f"""Merge these experts with es-merging and explain the result.

Experts: {', '.join(names) if names else '(choose with list_experts: one molecule, one protein, one cell expert)'}
Method: {method}

Steps:
1. list_experts: check that the experts exist and share one base (same base_hash); say which modality each covers.
2. {probe_line}
3. start_merge with experts, method "{method}" and the probe; then get_job(job_id, wait_s=30) until it ends,
   reporting the stages as they pass.
4. describe_model on the new model. Explain the coefficients:
   - layer-wise lambda[expert][layer] comes from how far each expert's hidden states drift from the base's
     on the probe (sliced Wasserstein distance, its per-layer increase, z-scored, own modality plus alpha times
     the others, softmax over experts at temperature T_L): say which expert leads which layers and what that
     suggests about where each skill lives;
   - element-wise weights come from gradient sensitivity of each expert's own-modality drift; the final
     coefficient multiplies both and renormalises over experts.
5. Read esm://models/<id>/heatmap.png and esm://models/<id>/report and point at anything surprising
   (an expert that never leads, a flat row, uniform coefficients). Keep the explanation under 300 words."""


def explain_prediction(model: str, smiles: str, protein: str, cell: str, task: str = "triple_effect") -> str:
    return f"""Explain one interaction prediction made with es-merging.

Model: {model}   Task: {task}
Drug (SMILES): {smiles}
Protein: {protein[:60] + ('...' if len(protein) > 60 else '')}
Cell (ranked genes): {cell}

Steps:
1. inspect_molecules, inspect_proteins and inspect_cell_profiles (ranked_genes) on the three inputs;
   summarise the descriptors that matter (LogP, size, family motifs, cell type markers).
2. predict_interaction with model "{model}", task "{task}" and this one item; report the probability of
   each option and the answer.
3. Compare with the single experts and the base (list_models kind "expert"/"base", same call) to show
   which modality's perception the answer depends on.
4. describe_model "{model}": relate the answer to which experts lead the layers.
5. Conclude with the answer, how confident the model is (probabilities, agreement across models), and
   what experiment would check it. Do not overstate: these are small models."""


def register(server: "MCPServer") -> None:
    server.prompt(name="screen_compound_library", title="Screen a compound library",
                  description="Screen compounds (comma-separated SMILES) against targets (comma-separated sequences) "
                              "in a cell context, then rank and report the hits.")(screen_compound_library)
    server.prompt(name="merge_and_explain", title="Merge experts and explain the coefficients",
                  description="Merge chosen experts (comma-separated ids) with a method and explain the "
                              "layer- and element-wise coefficients.")(merge_and_explain)
    server.prompt(name="explain_prediction", title="Explain one prediction",
                  description="Predict one drug-protein-cell interaction and explain what drives the answer.")(explain_prediction)
