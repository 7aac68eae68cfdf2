"""Option scoring: padding-invariant log-likelihoods and normalised slot decisions."""
from __future__ import annotations

import pytest
import torch

from es_merging.mllm import MultimodalModel
from es_merging.probe import response_segments
from es_merging.scoring import decide, score_targets
from es_merging.zoo.train import to_probe_sample
from es_merging.zoo.world import ANSWERS, DESCRIPTORS, MODALITIES, QUESTION

EXPERTS = ("molecule", "protein", "cell")


@pytest.fixture(scope="module")
def model(zoo_model) -> MultimodalModel:
    return zoo_model


@pytest.fixture(scope="module")
def world_samples(zoo_dir):
    from es_merging.zoo import zoo_world

    return zoo_world(zoo_dir).samples(6, "heldout", seed=3)


def _manual_score(model, rendered, target: str) -> float:
    """Independent reference: one unpadded sequence through the backbone, log p of the target tokens."""
    batch = model.collate([rendered])
    assert bool(batch.attention_mask.all())
    with torch.no_grad():
        logits = model.backbone(inputs_embeds=model.inputs_embeds(batch)).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    (s, e), = [(s, e) for name, s, e in rendered.target_spans if name == target]
    return float(sum(logp[j - 1, rendered.input_ids[j]] for j in range(s, e)))


@pytest.mark.parametrize("adapter", [None, "protein"])
def test_score_alone_equals_score_in_a_padded_batch(model, world_samples, adapter):
    model.set_adapter(adapter)
    samples = [to_probe_sample(ws) for ws in world_samples[:3]]
    # vary the protein lengths so that rows are padded by different amounts
    samples[0] = samples[0].model_copy(update={"protein": samples[0].protein[:12]})
    samples[1] = samples[1].model_copy(update={"protein": samples[1].protein + "ACDEFGHIKLMNPQRSTVWY"})
    rendered = [model.renderer.render(s, question=QUESTION, response=response_segments([], opt))
                for s in samples for opt in ANSWERS]
    lengths = [len(r.input_ids) for r in rendered]
    assert max(lengths) - min(lengths) > 20
    shortest = lengths.index(min(lengths))
    alone = torch.stack([score_targets(model, [r], "answer")[0] for r in rendered])
    batched = score_targets(model, rendered, "answer")
    chunked = score_targets(model, rendered, "answer", batch_size=4)
    assert batched.dtype == torch.float64 and batched.shape == (len(rendered),)
    assert torch.allclose(alone, batched, atol=1e-5, rtol=0), (alone - batched).abs().max()
    assert torch.allclose(chunked, batched, atol=1e-5, rtol=0)
    # the shortest row (most padding) against an independent computation
    assert alone[shortest].item() == pytest.approx(_manual_score(model, rendered[shortest], "answer"), abs=1e-4)
    assert (alone < 0).all()
    # options differ: the scores are not all the same number
    assert (alone.view(-1, 2)[:, 0] - alone.view(-1, 2)[:, 1]).abs().max() > 1e-3
    model.set_adapter(None)


def test_score_targets_uses_the_named_span(model, world_samples):
    model.set_adapter(None)
    s = to_probe_sample(world_samples[0])
    slots = [(m, s.descriptors[m]) for m in MODALITIES]
    r = model.renderer.render(s, spans={m: "text" for m in MODALITIES}, question=QUESTION,
                              response=response_segments(slots, "Yes"))
    for target in ("slot:molecule", "slot:protein", "slot:cell", "answer"):
        assert score_targets(model, [r], target)[0].item() == pytest.approx(_manual_score(model, r, target), abs=1e-4)
    with pytest.raises(ValueError, match="no target span 'slot:dose'"):
        score_targets(model, [r], "slot:dose")


def test_decide_probabilities_sum_to_one(model, world_samples):
    model.set_adapter("molecule")
    samples = [to_probe_sample(ws) for ws in world_samples[:4]]
    slots = [(m, DESCRIPTORS[m]) for m in MODALITIES]
    decisions = decide(model, samples, spans={m: "raw" for m in MODALITIES}, question=QUESTION, slots=slots,
                       answer_options=ANSWERS)
    assert len(decisions) == len(samples)
    for d in decisions:
        assert list(d.probabilities) == [*MODALITIES, "answer"]
        for name, options in [*slots, ("answer", ANSWERS)]:
            probs = d.probabilities[name]
            assert list(probs) == list(options)
            assert sum(probs.values()) == pytest.approx(1.0, abs=1e-9)
            assert all(0.0 <= p <= 1.0 for p in probs.values())
            assert d.choices[name] == max(probs, key=probs.get)
    # slots only, no answer
    only = decide(model, samples[:2], spans=None, question=QUESTION, slots=slots[:1], answer_options=None)
    assert [list(d.probabilities) for d in only] == [["molecule"], ["molecule"]]
    assert sum(only[0].probabilities["molecule"].values()) == pytest.approx(1.0, abs=1e-9)
    model.set_adapter(None)


def test_decide_answer_is_conditioned_on_the_chosen_slots(model, world_samples):
    """Given text descriptors, the base copies each into its slot; the answer is scored after them."""
    model.set_adapter(None)
    samples = [to_probe_sample(ws) for ws in world_samples[:2]]
    slots = [(m, DESCRIPTORS[m]) for m in MODALITIES]
    decisions = decide(model, samples, spans={m: "text" for m in MODALITIES}, question=QUESTION, slots=slots,
                       answer_options=ANSWERS)
    # the answer probability equals a direct score of the answer after the chosen slots
    d, s = decisions[0], samples[0]
    chosen = [(m, d.choices[m]) for m in MODALITIES]
    rendered = [model.renderer.render(s, spans={m: "text" for m in MODALITIES}, question=QUESTION,
                                      response=response_segments(chosen, opt)) for opt in ANSWERS]
    p = torch.softmax(score_targets(model, rendered, "answer"), dim=0)
    assert d.probabilities["answer"]["Yes"] == pytest.approx(float(p[0]), abs=1e-6)
