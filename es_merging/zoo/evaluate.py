"""Quality of the zoo's models on held-out entities, with the constrained "describe, then answer"
protocol: per-modality slot accuracy (perception) and interactive answer accuracy (reasoning)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from es_merging.zoo.train import to_probe_sample
from es_merging.zoo.world import DESCRIPTORS, MODALITIES, World, interactive_rule


def evaluate_model(model, samples, *, spans: dict[str, str]) -> dict:
    """The "describe, then answer" protocol through :func:`es_merging.predict.predict` (the embedded
    task: the same slot choices and probabilities as :func:`es_merging.scoring.decide`, tested in
    test_predict.py), which runs each prompt once and scores the options on its cache, with the
    adapter folded in: the zoo build's evaluation took 49 s with ``decide`` on the tiny preset."""
    from es_merging.errors import EsMergingError
    from es_merging.predict import get_task, predict

    task = get_task("embedded").model_copy(update={"spans": dict(spans)})
    preds = predict(model, [to_probe_sample(ws, i) for i, ws in enumerate(samples)], task)
    bad = [p for p in preds if not p.ok]
    if bad:
        raise EsMergingError(f"{len(bad)} evaluation samples failed: {bad[0].error}")
    n = len(samples)
    slot_acc = {m: sum(p.slots[m] == ws.entity(m).descriptor for p, ws in zip(preds, samples)) / n
                for m in MODALITIES}
    answer_acc = sum(p.choice == ws.answer for p, ws in zip(preds, samples)) / n
    # does the answer follow the descriptors the model itself wrote? (the reasoning a merge relies on)
    follows = sum(p.choice == interactive_rule(*(p.slots[m] for m in MODALITIES)) for p in preds) / n
    return {"slot_accuracy": {m: round(v, 4) for m, v in slot_acc.items()}, "answer_accuracy": round(answer_acc, 4),
            "answer_follows_slots": round(follows, 4), "n": n}


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
