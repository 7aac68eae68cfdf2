"""Quality of the zoo's models on held-out entities, with the constrained "describe, then answer"
protocol: per-modality slot accuracy (perception) and interactive answer accuracy (reasoning)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from es_merging.scoring import decide
from es_merging.zoo.train import to_probe_sample
from es_merging.zoo.world import ANSWERS, DESCRIPTORS, MODALITIES, QUESTION, World

SLOTS = [(m, DESCRIPTORS[m]) for m in MODALITIES]


def evaluate_model(model, samples, *, spans: dict[str, str]) -> dict:
    probe = [to_probe_sample(ws) for ws in samples]
    decisions = decide(model, probe, spans=spans, question=QUESTION, slots=SLOTS, answer_options=ANSWERS)
    n = len(samples)
    slot_acc = {m: sum(d.choices[m] == ws.entity(m).descriptor for d, ws in zip(decisions, samples)) / n
                for m in MODALITIES}
    answer_acc = sum(d.choices["answer"] == ws.answer for d, ws in zip(decisions, samples)) / n
    return {"slot_accuracy": {m: round(v, 4) for m, v in slot_acc.items()}, "answer_accuracy": round(answer_acc, 4), "n": n}


def evaluate_zoo(zoo_dir: Path, world: World, *, n: int, seed: int,
                 progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Reload everything from disk (proves the saved files are complete) and evaluate
    base and experts on held-out entities, raw inputs and true textual descriptors."""
    from es_merging.mllm import MultimodalModel

    model = MultimodalModel.load(
        zoo_dir / "base",
        adapters={m: zoo_dir / m for m in MODALITIES},
        encoders={m: zoo_dir / m / "encoder" for m in MODALITIES if (zoo_dir / m / "encoder").exists()},
    )
    samples = world.samples(n, "heldout", seed=seed + 7)
    out: dict = {}
    names = [None, *MODALITIES]
    for i, name in enumerate(names):
        model.set_adapter(name)
        out[name or "base"] = {
            "raw": evaluate_model(model, samples, spans={m: "raw" for m in MODALITIES}),
            "text": evaluate_model(model, samples, spans={m: "text" for m in MODALITIES}),
        }
        if progress:
            progress("evaluate", i + 1, len(names))
    out["chance"] = {"slot_accuracy": {m: round(1 / len(DESCRIPTORS[m]), 4) for m in MODALITIES},
                     "answer_accuracy": 0.5}
    return out
