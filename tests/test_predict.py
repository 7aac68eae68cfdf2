"""Prediction: option probabilities, padding invariance, agreement with whole-sequence scoring,
slot filling as in the zoo's evaluation, k-shot retrieval, per-item errors, the CLI."""
from __future__ import annotations

import json
import math

import pytest

from es_merging.errors import EsMergingError
from es_merging.predict import (
    SupportSet,
    Task,
    auroc,
    build_prompt,
    get_task,
    load_support,
    load_zoo_model,
    macro_f1,
    predict,
    task_names,
)
from es_merging.probe import ProbeSample, response_segments

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"


@pytest.fixture(scope="module")
def model(zoo_dir):
    return load_zoo_model(zoo_dir, "molecule")


@pytest.fixture(scope="module")
def world_samples(zoo_dir):
    from es_merging.zoo import zoo_world
    from es_merging.zoo.train import to_probe_sample

    world = zoo_world(zoo_dir)
    out = []
    for i, ws in enumerate(world.samples(10, "heldout", seed=5)):
        out.append(to_probe_sample(ws, i).model_copy(update={"descriptors": {}, "answer": None}))
    return out


def test_builtin_tasks():
    assert set(task_names()) >= {"dti", "drug_response", "triple_effect", "embedded"}
    assert get_task("dti").options == ("Interacts", "Does not interact")
    assert get_task("drug_response").options == ("Sensitive", "Resistant")
    assert len(get_task("triple_effect").options) == 3
    assert get_task("embedded").slots
    with pytest.raises(EsMergingError, match="unknown task"):
        get_task("nope")
    with pytest.raises(ValueError):
        Task(name="x", question="q", options=("A", "A"), modalities=("molecule",))


@pytest.mark.parametrize("task", ["dti", "drug_response", "triple_effect", "embedded"])
def test_probabilities_sum_to_one(model, world_samples, task):
    preds = predict(model, world_samples[:4], task, batch_size=3)
    for p in preds:
        assert p.ok, p.error
        assert set(p.probabilities) == set(get_task(task).options)
        assert math.isclose(sum(p.probabilities.values()), 1.0, abs_tol=1e-9)
        assert p.choice == max(p.probabilities, key=p.probabilities.get)
        for probs in p.slot_probabilities.values():
            assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-9)


@pytest.mark.parametrize("task", ["dti", "triple_effect", "embedded"])
def test_alone_equals_batched(model, world_samples, task):
    """Padding (prompts of different lengths: proteins of different lengths) never changes a score."""
    assert len({len(s.protein) for s in world_samples}) > 1
    batched = predict(model, world_samples, task, batch_size=len(world_samples))
    for sample, b in zip(world_samples[:4], batched):
        alone = predict(model, [sample], task)[0]
        assert alone.slots == b.slots and alone.choice == b.choice
        for o in get_task(task).options:
            assert alone.log_likelihoods[o] == pytest.approx(b.log_likelihoods[o], abs=1e-4)


def test_scores_equal_whole_sequence_scoring(model, world_samples):
    """The cached incremental scorer gives the log-likelihood that re-running each whole sequence
    (es_merging.scoring.score_targets) gives."""
    from es_merging.scoring import score_targets

    task = get_task("triple_effect")
    preds = predict(model, world_samples[:3], task)
    for o in task.options:
        rendered = [model.renderer.render(s, question=task.question, response=response_segments([], o))
                    for s in world_samples[:3]]
        ref = score_targets(model, rendered, "answer", batch_size=1)
        for p, r in zip(preds, ref):
            assert p.log_likelihoods[o] == pytest.approx(float(r), abs=1e-4)


def test_embedded_matches_zoo_decide(model, world_samples):
    """The embedded task is the zoo evaluation's protocol: same slot choices and probabilities."""
    from es_merging.scoring import decide

    task = get_task("embedded")
    preds = predict(model, world_samples[:5], task)
    ref = decide(model, world_samples[:5], spans=None, question=task.question,
                 slots=[(n, list(o)) for n, o in task.slots], answer_options=list(task.options))
    for p, r in zip(preds, ref):
        assert p.slots == {k: v for k, v in r.choices.items() if k != "answer"}
        assert p.choice == r.choices["answer"]
        for o in task.options:
            assert p.probabilities[o] == pytest.approx(r.probabilities["answer"][o], abs=1e-5)


def test_any_model_same_code_path(zoo_dir, world_samples):
    base = load_zoo_model(zoo_dir, "base")
    a = predict(base, world_samples[:2], "embedded")
    base.set_adapter("protein")
    b = predict(base, world_samples[:2], "embedded")
    assert a[0].probabilities != b[0].probabilities


def test_invalid_items_do_not_sink_the_batch(model, world_samples):
    good = world_samples[0]
    items = [good, {"smiles": "C1CC", "protein": good.protein}, {"smiles": ASPIRIN, "protein": "MKV1T"},
             {"smiles": ASPIRIN}, {"smiles": ASPIRIN, "protein": good.protein}]
    preds = predict(model, items, "dti")
    assert [p.ok for p in preds] == [True, False, False, False, True]
    assert "C1CC" in preds[1].error and "molecule" in preds[1].error
    assert "position" in preds[2].error
    assert "needs protein" in preds[3].error
    assert [p.index for p in preds] == list(range(5))


def _support(world_samples):
    labels = ["Interacts", "Does not interact"]
    return [s.model_copy(update={"id": f"s{i}", "answer": labels[i % 2]}) for i, s in enumerate(world_samples)]


def test_kshot_retrieval_returns_nearest(world_samples):
    support = SupportSet(_support(world_samples))
    query = world_samples[3]
    # the identical example is the nearest; then by decreasing mean similarity
    sims = support.similarity(query)
    nearest = support.nearest(query, 3)
    assert nearest[0] == 3
    assert list(sims[nearest]) == sorted(sims, reverse=True)[:3]
    # molecule-only query: pure Tanimoto ranking
    from es_merging.modalities.molecule import tanimoto

    q = ProbeSample(smiles=world_samples[5].smiles)
    expect = sorted(range(len(world_samples)), key=lambda i: (-tanimoto(q.smiles, world_samples[i].smiles), i))
    assert support.nearest(q, 4) == expect[:4]
    # gene-set Jaccard for cells
    from es_merging.modalities.cell import gene_jaccard

    qc = ProbeSample(cell=list(world_samples[7].cell))
    expect = sorted(range(len(world_samples)), key=lambda i: (-gene_jaccard(qc.cell, world_samples[i].cell), i))
    assert support.nearest(qc, 3) == expect[:3]
    assert support.similarity(qc)[expect[0]] == 1.0


def test_kshot_prediction_uses_support(model, world_samples):
    support = _support(world_samples)
    preds = predict(model, world_samples[:3], "dti", support=support, k=2)
    for i, p in enumerate(preds):
        assert p.ok and len(p.support_ids) == 2 and p.support_ids[0] == f"s{i}"
    # the prompt carries two labelled turns before the query, each raw input as soft tokens
    sup = SupportSet(support)
    prompt = build_prompt(model, world_samples[0], get_task("dti"), [sup.samples[1], sup.samples[2]])
    assert len(prompt.soft) == 6
    assert prompt.ids.count(model.tokenizer.bos_token_id) == 1
    with pytest.raises(EsMergingError, match="not options"):
        predict(model, world_samples[:1], "drug_response", support=support, k=1)
    with pytest.raises(EsMergingError, match="support"):
        predict(model, world_samples[:1], "dti", k=2)


def test_load_support(tmp_path):
    path = tmp_path / "support.csv"
    path.write_text("id,smiles,protein,cell,label\n"
                    f"a,{ASPIRIN},MKTAYIAK,\"CD3D,CD3E\",Interacts\n"
                    f"b,CCO,,,Does not interact\n")
    rows = load_support(path)
    assert [r.id for r in rows] == ["a", "b"]
    assert rows[0].cell == ["CD3D", "CD3E"] and rows[1].protein is None and rows[1].answer == "Does not interact"
    (tmp_path / "bad.csv").write_text("smiles\nCCO\n")
    with pytest.raises(EsMergingError, match="label"):
        load_support(tmp_path / "bad.csv")


def test_metrics_by_hand():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))
    # classes Yes/No: Yes P=1/2 R=1/1 F1=2/3; No P=1/1 R=1/2 F1=2/3
    assert macro_f1(["Yes", "Yes", "No"], ["Yes", "No", "No"], ["Yes", "No"]) == pytest.approx(2 / 3)


def test_predict_cli(zoo_dir, world_samples, capsys):
    from es_merging.cli import main

    s = world_samples[0]
    rc = main(["predict", "--zoo", str(zoo_dir), "--expert", "protein", "--task", "dti",
               "--smiles", s.smiles, "C1CC", "--protein", s.protein])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1  # one invalid item
    preds = out["predictions"]
    assert preds[0]["ok"] and not preds[1]["ok"]
    assert sum(preds[0]["probabilities"].values()) == pytest.approx(1.0)
    rc = main(["predict", "--zoo", str(zoo_dir), "--expert", "nope", "--smiles", s.smiles, "--protein", s.protein])
    assert rc == 2


def test_fused_adapter_is_exactly_undone(model, world_samples):
    import torch

    from es_merging.predict import fused_adapter

    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    fused = predict(model, world_samples[:4], "triple_effect", fuse=True)
    plain = predict(model, world_samples[:4], "triple_effect", fuse=False)
    for a, b in zip(fused, plain):
        for o in a.log_likelihoods:
            assert a.log_likelihoods[o] == pytest.approx(b.log_likelihoods[o], abs=1e-3)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.active_adapter == "molecule"
    with pytest.raises(RuntimeError):
        with fused_adapter(model, True):
            raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    model.set_adapter(None)
    with fused_adapter(model) as did:  # the base: nothing to fuse
        assert did is False
    model.set_adapter("molecule")


@pytest.mark.parametrize("task", ["triple_effect", "embedded"])
def test_shared_prefixes_change_no_score(model, world_samples, task):
    """Rows sharing drug and protein (a screen) run their common prefix once: same scores."""
    rows = [ProbeSample(smiles=d.smiles, protein=p.protein, cell=c.cell)
            for d in world_samples[:2] for p in world_samples[2:4] for c in world_samples[4:8]]
    shared = predict(model, rows, task, batch_size=7)
    plain = predict(model, rows, task, batch_size=7, share_prefixes=False)
    for a, b in zip(shared, plain):
        assert a.slots == b.slots and a.choice == b.choice
        for o in a.log_likelihoods:
            assert a.log_likelihoods[o] == pytest.approx(b.log_likelihoods[o], abs=1e-4)


def test_plan_batches_groups_screen_rows(model, world_samples):
    from es_merging.predict import _plan_batches

    task = get_task("triple_effect")
    rows = [ProbeSample(smiles=d.smiles, protein=p.protein, cell=c.cell)
            for d in world_samples[:2] for p in world_samples[2:4] for c in world_samples[4:8]]
    prompts = [(i, build_prompt(model, r, task)) for i, r in enumerate(rows)]
    batches = _plan_batches(prompts, 32, 0)
    chunk, groups = batches[0]
    assert sorted(len(g[0]) for g in groups) == [4, 4, 4, 4]  # one group per (drug, protein)
    for members, n in groups:
        ids = [chunk[j][1].ids for j in members]
        assert all(x[:n] == ids[0][:n] for x in ids) and n >= 16
    distinct = [(i, build_prompt(model, s, task)) for i, s in enumerate(world_samples)]
    assert all(g is None for _, g in _plan_batches(distinct, 4, 0))
