"""Option scoring: log-likelihood of each answer option after a prompt (no free-text parsing, so
no invalid outputs), and constrained greedy slot filling (the "state the descriptors, then answer"
protocol of the embedded world)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from es_merging.probe import ProbeSample, RenderedPrompt, response_segments


@torch.no_grad()
def score_targets(model, rendered: Sequence[RenderedPrompt], target: str, batch_size: int = 64) -> torch.Tensor:
    """Sum of log p(token) over the span named ``target`` in each rendered sequence -> [N]."""
    out = torch.empty(len(rendered), dtype=torch.float64)
    for start in range(0, len(rendered), batch_size):
        chunk = rendered[start:start + batch_size]
        batch = model.collate(chunk)
        logits = model.forward(batch).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        for row, r in enumerate(chunk):
            spans = [(s, e) for name, s, e in r.target_spans if name == target]
            if not spans:
                raise ValueError(f"rendered sequence {start + row} has no target span {target!r}")
            s, e = spans[-1]
            ids = batch.input_ids[row, s:e].to(logp.device)
            out[start + row] = logp[row, s - 1:e - 1].gather(-1, ids[:, None]).sum().double()
    return out


@dataclass
class SlotDecision:
    choices: dict[str, str]  # slot name -> chosen option
    probabilities: dict[str, dict[str, float]]  # slot name -> option -> probability


def decide(
    model,
    samples: Sequence[ProbeSample],
    *,
    spans: dict[str, str] | None,
    question: str,
    slots: Sequence[tuple[str, Sequence[str]]],
    answer_options: Sequence[str] | None,
    batch_size: int = 64,
) -> list[SlotDecision]:
    """Fill ``slots`` in order by constrained greedy decoding (argmax over each slot's options, the
    chosen value then conditions the next), then score ``answer_options`` after "Final answer:"."""
    chosen: list[list[tuple[str, str]]] = [[] for _ in samples]
    probs: list[dict[str, dict[str, float]]] = [{} for _ in samples]
    steps = [(name, list(opts)) for name, opts in slots]
    if answer_options is not None:
        steps.append(("answer", list(answer_options)))
    for name, options in steps:
        rendered = []
        for i, sample in enumerate(samples):
            for option in options:
                if name == "answer":
                    segs = response_segments(chosen[i], option)
                else:
                    segs = response_segments(chosen[i] + [(name, option)], None)
                rendered.append(model.renderer.render(sample, spans=spans, question=question, response=segs))
        target = "answer" if name == "answer" else f"slot:{name}"
        scores = score_targets(model, rendered, target, batch_size).view(len(samples), len(options))
        p = torch.softmax(scores, dim=-1)
        for i in range(len(samples)):
            best = int(torch.argmax(scores[i]))
            probs[i][name] = {o: float(p[i, k]) for k, o in enumerate(options)}
            if name != "answer":
                chosen[i].append((name, options[best]))
            else:
                chosen[i].append(("answer", options[best]))
    return [SlotDecision(dict(c), pr) for c, pr in zip(chosen, probs)]
