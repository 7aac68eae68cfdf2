"""The embedded zoo: files on disk, zoo.json, the world (reproducible, balanced, every modality
needed, held-out entities disjoint) and the build's refusal/atomicity."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from es_merging.errors import EsMergingError
from es_merging.experts import base_hash
from es_merging.zoo.world import (
    ANSWERS,
    CELL_TOP_K,
    DESCRIPTORS,
    MODALITIES,
    PROTEIN_LENGTH,
    World,
    cell_descriptor,
    interactive_rule,
    molecule_descriptor,
    protein_descriptor,
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


# ----------------------------------------------------------------------------- files


def test_zoo_layout_is_safetensors_only(zoo_dir):
    names = sorted(p.name for p in zoo_dir.iterdir())
    assert names == ["base", "cell", "molecule", "protein", "zoo.json"]
    every = [p for p in zoo_dir.rglob("*") if p.is_file()]
    assert not [p for p in every if p.suffix in PICKLE_SUFFIXES]
    assert not [p for p in zoo_dir.rglob(".*")], "temporary files left behind"
    for p in every:  # every weight file really is safetensors (an 8-byte header length + JSON)
        if p.suffix == ".safetensors":
            head = p.read_bytes()[:9]
            assert head[8:9] == b"{", p
    base = zoo_dir / "base"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (base / f).is_file(), f
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 64
    digest = base_hash(base)
    for m in MODALITIES:
        d = zoo_dir / m
        for f in ("adapter_config.json", "adapter_model.safetensors", "expert.json"):
            assert (d / f).is_file(), f"{m}/{f}"
        manifest = json.loads((d / "expert.json").read_text())
        assert manifest["format"] == "es-merging-expert/1"
        assert manifest["modality"] == m and manifest["name"] == m and manifest["kind"] == "lora"
        assert manifest["base_hash"] == digest
        adapter = json.loads((d / "adapter_config.json").read_text())
        assert adapter["peft_type"] == "LORA" and adapter["r"] == 4
        assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}
        if m == "cell":
            assert manifest["encoder"] is None and not (d / "encoder").exists()
        else:
            assert manifest["encoder"] == "encoder"
            enc = json.loads((d / "encoder" / "config.json").read_text())
            assert enc["modality"] == m and enc["type"] == {"molecule": "fingerprint", "protein": "esm"}[m]
            assert enc["hidden_size"] == 64
            assert (d / "encoder" / "model.safetensors").is_file()


def test_zoo_adapters_hold_every_layer(zoo_dir):
    from safetensors import safe_open

    for m in MODALITIES:
        with safe_open(str(zoo_dir / m / "adapter_model.safetensors"), framework="pt") as fh:
            keys = list(fh.keys())
            # 2 layers x 7 modules x (A, B)
            assert len(keys) == 2 * 7 * 2
            assert all(".lora_A." in k or ".lora_B." in k for k in keys)
            # trained: no lora_B left at its zero initialisation
            for k in keys:
                if ".lora_B." in k:
                    assert fh.get_tensor(k).abs().sum() > 0, k


def test_zoo_json_quality(zoo_dir):
    report = json.loads((zoo_dir / "zoo.json").read_text())
    assert report["format"] == "es-merging-zoo/1"
    assert report["preset"]["name"] == "test" and report["seed"] == 0
    assert report["base_hash"] == base_hash(zoo_dir / "base")
    assert report["world"]["seed"] == 0 and report["world"]["descriptors"] == {k: list(v) for k, v in DESCRIPTORS.items()}
    q = report["quality"]
    assert set(q) == {"base", *MODALITIES, "chance"}
    for model in ("base", *MODALITIES):
        for spans in ("raw", "text"):
            r = q[model][spans]
            assert r["n"] == report["preset"]["eval_n"]
            assert set(r["slot_accuracy"]) == set(MODALITIES)
            for v in [*r["slot_accuracy"].values(), r["answer_accuracy"]]:
                assert 0.0 <= v <= 1.0
                assert v * r["n"] == pytest.approx(round(v * r["n"]), abs=0.01)  # a fraction of n
    assert q["chance"] == {"slot_accuracy": {"molecule": 0.5, "protein": 0.3333, "cell": 0.3333}, "answer_accuracy": 0.5}
    # even the test preset learns something: the base copies true descriptors into their slots,
    # and the molecule expert reads the fingerprint soft tokens far above chance
    assert min(q["base"]["text"]["slot_accuracy"].values()) >= 0.9
    assert q["molecule"]["raw"]["slot_accuracy"]["molecule"] >= 0.7
    gates = report["gates"]
    assert set(gates) >= {"base_text_answer_ge_0.95", "all_pass"}
    assert gates["all_pass"] == all(v for k, v in gates.items() if k != "all_pass")
    assert gates["base_text_answer_ge_0.95"] == (q["base"]["text"]["answer_accuracy"] >= 0.95)
    encoders = report["training"]["encoders"]
    assert set(encoders) == {"molecule", "protein"}
    for m, stats in encoders.items():
        assert gates[f"{m}_encoder_heldout_ge_0.97"] == (stats["heldout_accuracy"] >= 0.97)
    assert report["training"]["base"]["ranks"] >= 1
    for key in ("world_and_tokenizer", "base", "experts", "evaluate", "total"):
        assert report["timings_s"][key] >= 0
    assert report["versions"]["torch"] and report["training"]["base"]["steps"] == report["preset"]["base_steps"]


def test_an_encoder_that_generalises_poorly_fails_its_gate():
    """The protein encoder once reached held-out 0.951 and capped its expert at 0.883: its gate fails."""
    from es_merging.zoo.build import quality_gates

    r = {"slot_accuracy": {m: 1.0 for m in MODALITIES}, "answer_accuracy": 1.0, "n": 1}
    q = {k: {"raw": r, "text": r} for k in ("base", *MODALITIES)}
    good = quality_gates(q, {"molecule": {"heldout_accuracy": 0.98}, "protein": {"heldout_accuracy": 1.0}})
    assert good["all_pass"] and good["protein_encoder_heldout_ge_0.97"]
    bad = quality_gates(q, {"molecule": {"heldout_accuracy": 0.98}, "protein": {"heldout_accuracy": 0.951}})
    assert not bad["all_pass"] and not bad["protein_encoder_heldout_ge_0.97"] and bad["molecule_encoder_heldout_ge_0.97"]


def test_zoo_tokenizer(zoo_dir):
    from transformers import AutoTokenizer

    from es_merging.probe import CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(str(zoo_dir / "base"))
    assert tok.chat_template == CHAT_TEMPLATE
    for t in ("<mol>", "<prot>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    # byte-level: nothing outside the world is ever unknown
    text = " ZNF_unknown-gene, Ωμέγα 42"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.decode(ids) == text


# ----------------------------------------------------------------------------- world


def _fingerprint(world: World) -> str:
    payload = json.dumps({split: {m: [(e.raw, e.descriptor) for e in es] for m, es in getattr(world, split).items()}
                          for split in ("train", "heldout")}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@pytest.fixture(scope="module")
def world() -> World:
    return World.generate(0, per_class=20)


def test_pretraining_corpus_is_fresh_labelled_and_never_held_out(world, monkeypatch):
    from es_merging.zoo import world as world_module
    from es_merging.zoo.world import protein_descriptor

    corpus = world.pretraining_corpus("protein", 50, seed=3)
    assert corpus == world.pretraining_corpus("protein", 50, seed=3)  # seeded
    assert {e.raw for e in corpus} != {e.raw for e in world.pretraining_corpus("protein", 50, seed=4)}
    assert {e.descriptor for e in corpus} == set(DESCRIPTORS["protein"])
    assert all(protein_descriptor(e.raw) == e.descriptor for e in corpus)
    # a held-out protein the generator happens to produce again is dropped from the corpus
    held = world.heldout["protein"][0]
    real = world_module._proteins
    monkeypatch.setattr(world_module, "_proteins", lambda rng, n: [held] + real(rng, n))
    assert held.raw not in {e.raw for e in world.pretraining_corpus("protein", 50, seed=3)}
    with pytest.raises(ValueError, match="unknown modality 'dna'"):
        world.pretraining_corpus("dna", 5)


def test_world_is_reproducible(world):
    again = World.generate(0, per_class=20)
    assert _fingerprint(again) == _fingerprint(world)
    other = World.generate(1, per_class=20)
    for m in MODALITIES:
        assert {e.raw for e in other.train[m]} != {e.raw for e in world.train[m]}
    a = [(s.molecule.raw, s.protein.raw, s.cell.raw) for s in world.samples(20, "train", seed=5)]
    b = [(s.molecule.raw, s.protein.raw, s.cell.raw) for s in world.samples(20, "train", seed=5)]
    c = [(s.molecule.raw, s.protein.raw, s.cell.raw) for s in world.samples(20, "train", seed=6)]
    assert a == b and a != c


def test_world_is_reproducible_across_processes(world):
    code = ("from es_merging.zoo.world import World; import hashlib, json; w = World.generate(0, per_class=20); "
            "print(hashlib.sha256(json.dumps({s: {m: [(e.raw, e.descriptor) for e in es] for m, es in "
            "getattr(w, s).items()} for s in ('train', 'heldout')}, sort_keys=True).encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == _fingerprint(world)


def test_zoo_world_is_regenerated_from_zoo_json(zoo_dir):
    from es_merging.zoo import zoo_world

    report = json.loads((zoo_dir / "zoo.json").read_text())
    w = zoo_world(zoo_dir)
    assert {m: len(v) for m, v in w.train.items()} == report["world"]["train_entities"]
    assert {m: len(v) for m, v in w.heldout.items()} == report["world"]["heldout_entities"]
    assert _fingerprint(w) == _fingerprint(World.generate(report["world"]["seed"], per_class=report["world"]["per_class"]))


def test_zoo_report_errors(tmp_path):
    from es_merging.zoo import load_zoo_report

    with pytest.raises(EsMergingError, match="zoo.json not found: build the zoo first"):
        load_zoo_report(tmp_path)
    (tmp_path / "zoo.json").write_text("{")
    with pytest.raises(EsMergingError, match="not valid JSON"):
        load_zoo_report(tmp_path)


def test_every_answer_needs_all_three_descriptors():
    triples = list(itertools.product(*(DESCRIPTORS[m] for m in MODALITIES)))
    assert len(triples) == 18
    answers = {t: interactive_rule(*t) for t in triples}
    assert set(answers.values()) == set(ANSWERS)
    assert sum(a == "Yes" for a in answers.values()) == 9  # balanced over the triples
    for t in triples:
        for i, m in enumerate(MODALITIES):
            flipped = {answers[t[:i] + (alt,) + t[i + 1:]] for alt in DESCRIPTORS[m] if alt != t[i]}
            assert any(a != answers[t] for a in flipped), f"flipping the {m} of {t} can never change the answer"
    # no pair of modalities decides the answer on its own
    for i, j in itertools.combinations(range(3), 2):
        k = 3 - i - j
        for t in triples:
            varied = {answers[u] for u in triples if u[i] == t[i] and u[j] == t[j]}
            assert varied == set(ANSWERS), f"{MODALITIES[k]} is not needed for {t}"


def test_answers_are_balanced_in_samples(world):
    for split in ("train", "heldout"):
        samples = world.samples(900, split, seed=0)
        yes = sum(s.answer == "Yes" for s in samples) / len(samples)
        assert 0.44 <= yes <= 0.56, (split, yes)
        for m in MODALITIES:
            counts = {d: sum(s.entity(m).descriptor == d for s in samples) for d in DESCRIPTORS[m]}
            assert min(counts.values()) >= 0.7 * len(samples) / len(DESCRIPTORS[m]), (m, counts)
        for s in samples:
            assert s.answer == interactive_rule(s.molecule.descriptor, s.protein.descriptor, s.cell.descriptor)


def test_heldout_entities_are_disjoint_from_training(world):
    for m in MODALITIES:
        train = {e.raw for e in world.train[m]}
        held = {e.raw for e in world.heldout[m]}
        assert train and held and not train & held, m
        assert len(train) == len(world.train[m]) and len(held) == len(world.heldout[m])  # no duplicates either
        for d in DESCRIPTORS[m]:  # every class in both splits, about a quarter held out
            n_train = sum(e.descriptor == d for e in world.train[m])
            n_held = sum(e.descriptor == d for e in world.heldout[m])
            assert n_held == 5 and n_train == 15
        samples = world.samples(200, "heldout", seed=1)
        assert {s.entity(m).raw for s in samples} <= held
        assert {s.entity(m).raw for s in world.samples(200, "train", seed=1)} <= train


def test_descriptor_functions_agree_with_labels(world):
    from rdkit import Chem

    for split in ("train", "heldout"):
        entities = getattr(world, split)
        for e in entities["molecule"]:
            assert molecule_descriptor(e.raw) == e.descriptor
            assert Chem.MolToSmiles(Chem.MolFromSmiles(e.raw)) == e.raw  # canonical
        for e in entities["protein"]:
            assert protein_descriptor(e.raw) == e.descriptor
            assert PROTEIN_LENGTH[0] + 1 <= len(e.raw) <= PROTEIN_LENGTH[1] + 1 and e.raw[0] == "M"
            assert set(e.raw) <= set("ACDEFGHIKLMNPQRSTVWY")
        for e in entities["cell"]:
            assert cell_descriptor(e.raw) == e.descriptor
            assert len(e.raw) == CELL_TOP_K == len(set(e.raw))
    # the descriptors themselves: margins and ambiguity
    assert molecule_descriptor("CCCCCCCCCCCC") == "lipophilic"
    assert molecule_descriptor("OCC(O)CO") == "hydrophilic"
    assert molecule_descriptor("c1ccccc1") is None  # LogP ~1.7: inside the margin
    assert molecule_descriptor("C1CC") is None
    assert protein_descriptor("MAAAGSGAFGEVAAA") == "kinase"
    assert protein_descriptor("MGSGAFGEVDRYLAIVH") is None  # two families
    assert protein_descriptor("MAAAA") is None
    assert cell_descriptor(["CD3D", "CD3E", "CD14", "ACTB"]) == "T-cell"
    assert cell_descriptor(["CD3D", "CD14"]) is None  # tie
    assert cell_descriptor(["ACTB", "GAPDH"]) is None


# ----------------------------------------------------------------------------- building


def test_build_refuses_an_existing_dir(tmp_path, capsys):
    from es_merging.cli import main
    from es_merging.zoo.build import build_zoo

    out = tmp_path / "zoo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EsMergingError, match="already exists; choose another --out or pass --overwrite"):
        build_zoo(out, preset="test")
    assert main(["zoo", "build", "--preset", "test", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(EsMergingError, match="unknown zoo preset 'huge'"):
        build_zoo(tmp_path / "other", preset="huge")


def _fast_training(monkeypatch, fail_in: str | None = None, exc: type[BaseException] = RuntimeError):
    """Replace training and evaluation by no-ops (the real ones are covered by the session zoo)."""
    import es_merging.zoo.build as build_mod
    import es_merging.zoo.evaluate as evaluate_mod
    import es_merging.zoo.train as train_mod

    calls: list[str] = []

    def fake_base(model, world, **kw):
        calls.append("base")
        if fail_in == "base":
            raise exc("interrupted in base training")
        return {"steps": 0}

    def fake_experts(model, world, experts, **kw):
        if "experts" not in calls:
            calls.append("experts")
        if fail_in == "experts":
            raise exc("interrupted in expert training")
        return {"steps": 0, "seconds": 0.0, "final_loss": {n: 0.0 for n in experts}}

    def fake_evaluate(zoo_dir, world, **kw):
        calls.append("evaluate")
        if fail_in == "evaluate":
            raise exc("interrupted in evaluation")
        assert sorted(p.name for p in Path(zoo_dir).iterdir()) == ["base", "cell", "molecule", "protein"]
        r = {"slot_accuracy": {m: 0.5 for m in MODALITIES}, "answer_accuracy": 0.5, "n": 1}
        return {k: {"raw": r, "text": r} for k in ("base", *MODALITIES)} | {"chance": r}

    real_jobs = build_mod.run_expert_jobs  # in this process, where the fakes are in place

    monkeypatch.setattr(build_mod, "run_expert_jobs",
                        lambda jobs, processes, progress=None: real_jobs(jobs, processes=1, progress=progress))
    monkeypatch.setattr(train_mod, "train_base", fake_base)
    monkeypatch.setattr(train_mod, "train_experts", fake_experts)
    monkeypatch.setattr(evaluate_mod, "evaluate_zoo", fake_evaluate)
    return calls


@pytest.mark.parametrize("fail_in,exc", [("base", RuntimeError), ("experts", KeyboardInterrupt),
                                         ("evaluate", RuntimeError)])
def test_interrupted_build_leaves_no_directory(tmp_path, monkeypatch, fail_in, exc):
    from es_merging.zoo.build import build_zoo

    calls = _fast_training(monkeypatch, fail_in, exc)
    out = tmp_path / "zoo"
    threads = torch.get_num_threads()
    with pytest.raises(exc, match="interrupted"):
        build_zoo(out, preset="test", seed=0)
    assert calls[-1] == fail_in
    assert torch.get_num_threads() == threads
    assert list(tmp_path.iterdir()) == [], "a half-built zoo or its temporary directory was left behind"


def test_overwrite_replaces_atomically_via_cli(tmp_path, monkeypatch, capsys):
    from es_merging.cli import main

    calls = _fast_training(monkeypatch)
    threads = torch.get_num_threads()
    out = tmp_path / "zoo"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(["zoo", "build", "--preset", "test", "--out", str(out), "--overwrite", "--seed", "3"]) == 0
    assert calls == ["base", "experts", "evaluate"]
    summary = json.loads(capsys.readouterr().out)
    assert summary["preset"] == "test" and summary["seed"] == 3 and "all_pass" in summary["gates"]
    assert sorted(p.name for p in out.iterdir()) == ["base", "cell", "molecule", "protein", "zoo.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]
    report = json.loads((out / "zoo.json").read_text())
    assert report["seed"] == 3 and report["world"]["seed"] == 3
    from es_merging.zoo.build import idle_cores

    # "auto": the cores other work leaves idle (the load may move by one while it builds)
    assert 1 <= report["threads"] <= (os.cpu_count() or 1)
    assert abs(report["threads"] - idle_cores()) <= 1
    assert torch.get_num_threads() == threads  # ... and torch gets its setting back
    assert report["base_hash"] == base_hash(out / "base")


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_zoo_build_threads_must_be_auto_or_positive(value, tmp_path, capsys):
    from es_merging.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["zoo", "build", "--preset", "test", "--out", str(tmp_path / "zoo"), "--threads", value])
    assert exc.value.code == 2
    assert "--threads must be 'auto' or a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "zoo").exists()


def test_idle_cores_reads_current_cpu_use():
    from es_merging.zoo.build import _busy_cores, idle_cores

    busy = _busy_cores(0.2)
    if busy is not None:  # Linux: /proc/stat
        assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9
    assert 1 <= idle_cores(0.2) <= (os.cpu_count() or 1)


# ----------------------------------------------------------------------------- expert jobs
def _staged_copy(zoo_dir: Path, out: Path) -> Path:
    """base/ and every encoder/ of the zoo: what the build has staged when the expert jobs start."""
    import shutil

    shutil.copytree(zoo_dir / "base", out / "base")
    for m in MODALITIES:
        if (zoo_dir / m / "encoder").is_dir():
            shutil.copytree(zoo_dir / m / "encoder", out / m / "encoder")
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_expert_jobs_give_the_same_bytes_in_workers_and_in_process(zoo_dir, tmp_path):
    """An expert job depends only on the staged files and its seeds: retrained in worker processes or
    in this process, each adapter is byte for byte the session zoo's (built by the same jobs)."""
    from es_merging.zoo.expert_jobs import ExpertJob, run_expert_jobs

    report = json.loads((zoo_dir / "zoo.json").read_text())
    assert report["training"]["experts"]["molecule"]["threads"] == 1  # what makes the bytes comparable

    def jobs(staged: Path, names):
        return [ExpertJob(staged=str(staged), name=m, index=MODALITIES.index(m), preset="test", seed=0,
                          base_hash=report["base_hash"], threads=1) for m in names]

    workers = _staged_copy(zoo_dir, tmp_path / "workers")
    seen = []
    stats = run_expert_jobs(jobs(workers, ["molecule", "cell"]), processes=2,
                            progress=lambda stage, done, total: seen.append((stage, done, total)))
    inproc = _staged_copy(zoo_dir, tmp_path / "inproc")
    stats_in = run_expert_jobs(jobs(inproc, ["protein"]), processes=1)
    for staged, names in ((workers, ["molecule", "cell"]), (inproc, ["protein"])):
        for m in names:
            assert _sha(staged / m / "adapter_model.safetensors") == _sha(zoo_dir / m / "adapter_model.safetensors"), m
            assert json.loads((staged / m / "expert.json").read_text()) == json.loads((zoo_dir / m / "expert.json").read_text())
            config = (staged / m / "adapter_config.json").read_bytes()
            assert config == (zoo_dir / m / "adapter_config.json").read_bytes()  # target_modules sorted
            assert json.loads(config)["base_model_name_or_path"] is None  # not the build's temporary directory
        assert not list(staged.glob(".*")), "scratch directories left behind"
    assert set(stats) == {"molecule", "cell"} and set(stats_in) == {"protein"}
    assert stats["cell"]["train_seed"] != stats["molecule"]["train_seed"]
    assert seen and seen[-1][0] == "train experts" and seen[-1][1] == seen[-1][2]  # progress reached the end


def test_a_failing_expert_worker_is_reported_by_name(zoo_dir, tmp_path):
    from es_merging.zoo.expert_jobs import ExpertJob, run_expert_jobs

    staged = _staged_copy(zoo_dir, tmp_path / "staged")
    (staged / "base" / "model.safetensors").write_bytes(b"not a safetensors file")
    jobs = [ExpertJob(staged=str(staged), name=m, index=i, preset="test", seed=0, base_hash="x", threads=1)
            for i, m in enumerate(["molecule", "cell"])]
    with pytest.raises(EsMergingError, match=r"training the (molecule|cell) expert failed"):
        run_expert_jobs(jobs, processes=2)
    import multiprocessing

    assert not multiprocessing.active_children(), "a worker outlived the failed build"


# ----------------------------------------------------------------------------- training rows and measures
def test_prompt_can_show_other_descriptors_than_the_reply(zoo_model, world):
    """The base's gene-list rows show random descriptors in the prompt and the true ones in the reply,
    so that the answer learns to follow the reply's slots (see train_base)."""
    from es_merging.zoo.train import render_example

    ws = world.samples(1, "train", seed=3)[0]
    true = ws.entity("molecule").descriptor
    decoy = next(d for d in DESCRIPTORS["molecule"] if d != true)
    spans = {m: "text" for m in MODALITIES}
    eos = zoo_model.tokenizer.eos_token
    plain = render_example(zoo_model.renderer, ws, spans, eos)
    shown = render_example(zoo_model.renderer, ws, spans, eos, shown={"molecule": decoy})
    tok = zoo_model.tokenizer

    def prompt(r):
        return tok.decode(r.input_ids[:r.prompt_length])

    def reply(r):
        return tok.decode(r.input_ids[r.prompt_length:])

    assert decoy in prompt(shown) and true not in prompt(shown) and true in prompt(plain)
    assert reply(shown) == reply(plain) and f"molecule: {true}" in reply(shown).replace("  ", " ")


def test_answer_follows_slots_is_measured_against_the_rule(monkeypatch, world):
    """evaluate_model's answer_follows_slots: the share of answers that the rule gives for the slots
    the model itself wrote (right or wrong), next to the accuracies."""
    import es_merging.predict as predict_mod
    from es_merging.predict import Prediction
    from es_merging.zoo.evaluate import evaluate_model

    samples = world.samples(4, "heldout", seed=1)
    wrong_cell = {ws.cell.descriptor: next(d for d in DESCRIPTORS["cell"] if d != ws.cell.descriptor) for ws in samples}

    def fake_predict(model, items, task, **kw):
        out = []
        for i, ws in enumerate(samples):
            slots = {m: ws.entity(m).descriptor for m in MODALITIES}
            if i >= 2:  # a wrong cell slot...
                slots["cell"] = wrong_cell[ws.cell.descriptor]
            choice = interactive_rule(*(slots[m] for m in MODALITIES))  # ...and an answer that follows it
            if i == 3:
                choice = next(a for a in ANSWERS if a != choice)  # this one does not follow its slots
            out.append(Prediction(index=i, task="embedded", slots=slots, choice=choice,
                                  probabilities={a: 0.5 for a in ANSWERS}))
        return out

    monkeypatch.setattr(predict_mod, "predict", fake_predict)
    r = evaluate_model(None, samples, spans={m: "raw" for m in MODALITIES})
    assert r["slot_accuracy"]["cell"] == 0.5 and r["slot_accuracy"]["molecule"] == 1.0
    assert r["answer_follows_slots"] == 0.75
    assert r["n"] == 4


def _start_killable_build(tmp_path) -> subprocess.Popen:
    """A CLI build of the test preset on two threads (base peers, then expert workers), output discarded."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    return subprocess.Popen([sys.executable, "-m", "es_merging", "zoo", "build", "--preset", "test",
                             "--threads", "2", "--out", str(tmp_path / "zoo")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when_spawned(builder: subprocess.Popen, count: int, settle_s: float = 0.0) -> list:
    """Wait until ``builder`` has ``count`` spawned children, SIGKILL it, and return the children
    still running 15 s later (they should all have exited on their own); kills every one either way."""
    import signal
    import time

    import psutil

    children: list = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(children) < count and builder.poll() is None:
            time.sleep(0.1)
            children = [p for p in psutil.Process(builder.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(children) == count, f"the build did not start {count} worker process(es)"
        time.sleep(settle_s)
        builder.send_signal(signal.SIGKILL)
        builder.wait(timeout=10)
        return psutil.wait_procs(children, timeout=15)[1]
    finally:
        for proc in [builder, *[c for c in children if c.is_running()]]:
            try:
                proc.kill()
            except (psutil.Error, OSError):
                pass


def test_expert_workers_exit_when_the_builder_is_killed(tmp_path):
    """A cancelled server job kills its worker outright (no clean-up runs): the expert trainers it
    started must notice and exit on their own, not train on as orphans."""
    alive = _kill_when_spawned(_start_killable_build(tmp_path), 3, settle_s=1.0)  # base peer gone by then
    assert not alive, f"expert workers still running after the builder died: {[p.pid for p in alive]}"
    assert not (tmp_path / "zoo").exists()  # nothing published (the staging directory may remain)


# ----------------------------------------------------------------------------- data-parallel base
@pytest.fixture(scope="module")
def small_base(world):
    """(test preset, a maker of fresh untrained bases): one tokenizer for every test that needs one."""
    from es_merging.mllm import MultimodalModel
    from es_merging.zoo.build import _corpus, _new_base
    from es_merging.zoo.presets import PRESETS
    from es_merging.zoo.tokenizer import train_tokenizer

    p = PRESETS["test"]
    tokenizer = train_tokenizer(_corpus(world, n=400), vocab_size=p.vocab)
    return p, lambda: MultimodalModel(_new_base(p, tokenizer, 0), tokenizer, {})


def _weights(model) -> torch.Tensor:
    return torch.cat([q.detach().flatten() for q in model.backbone.parameters()])


def test_data_parallel_base_is_reproducible_and_follows_one_process(world, small_base):
    """Two ranks give the same bytes every time, and the same training as one process up to the
    order floats are summed in (each rank's gradient of its rows, added in rank order)."""
    from es_merging.zoo.train import train_base

    p, new_model = small_base
    runs = {}
    for label, ranks in (("one", 1), ("two", 2), ("two again", 2)):
        model = new_model()
        with torch.no_grad():
            start = _weights(model).clone()
        stats = train_base(model, world, steps=4, batch=p.batch, lr=p.lr_base, seed=0, ranks=ranks)
        assert stats["ranks"] == ranks
        runs[label] = (_weights(model), stats["final_loss"])
    assert not torch.equal(runs["one"][0], start), "training changed nothing"
    assert torch.equal(runs["two"][0], runs["two again"][0])
    assert torch.allclose(runs["one"][0], runs["two"][0], atol=1e-4, rtol=0)
    assert not torch.equal(runs["one"][0], runs["two"][0])  # the peer really computed half the rows
    assert runs["one"][1] == pytest.approx(runs["two"][1], rel=1e-5)


def test_a_dead_base_peer_is_reported_and_its_shared_memory_freed(world, small_base):
    from es_merging.zoo.base_peers import BasePeers

    p, new_model = small_base
    model = new_model()
    params = [q for q in model.backbone.parameters() if q.requires_grad]
    peers = BasePeers(model, world, params, 2, {"steps": 2, "batch": p.batch, "seed": 0, "gene_lm": 0.25})
    names = [peers.shared_params.name, *(g.name for g in peers.grads)]
    assert all(Path("/dev/shm", n).exists() for n in names)
    try:
        peers.procs[0].kill()
        peers.procs[0].join(timeout=10)
        with pytest.raises(EsMergingError, match=r"base's training process rank 1 stopped \(exit code -9\)"):
            peers.begin(0)
            peers.collect(0)
    finally:
        peers.close()
    assert not any(Path("/dev/shm", n).exists() for n in names), "shared memory left behind"
    import multiprocessing

    assert not multiprocessing.active_children()


def test_base_peer_exits_when_the_builder_is_killed(tmp_path):
    """Like the expert workers: a base-training peer whose builder was killed outright exits."""
    import time

    shm_before = set(Path("/dev/shm").glob("psm_*"))
    alive = _kill_when_spawned(_start_killable_build(tmp_path), 1)
    assert not alive, "the base-training peer still runs after the builder died"
    # nobody is left to unlink the gradient buffers but Python's resource tracker, which does
    # once every process that shared it is gone
    deadline = time.monotonic() + 15
    while set(Path("/dev/shm").glob("psm_*")) - shm_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(Path("/dev/shm").glob("psm_*")) - shm_before, "shared memory left behind"


def test_base_rule_check_trains_a_second_round_only_below_its_threshold(world, small_base):
    """A base that passes its check is left as it is (the committed zoo's bytes do not move); one
    that does not gets a gentler second round, recorded with what it reached."""
    from dataclasses import replace

    from es_merging.zoo.build import ensure_base_learnt_rule
    from es_merging.zoo.train import train_base

    p, new_model = small_base
    p = replace(p, base_steps=6, eval_n=16)
    model = new_model()
    train_base(model, world, steps=p.base_steps, batch=p.batch, lr=p.lr_base, seed=0)
    before = _weights(model).clone()
    passed = ensure_base_learnt_rule(model, world, p, seed=0, ranks=1, threshold=0.0)
    assert passed["extra_steps"] == 0 and passed["samples"] == 16 and 0.0 <= passed["answer_accuracy"] <= 1.0
    assert torch.equal(_weights(model), before)
    failed = ensure_base_learnt_rule(model, world, p, seed=0, ranks=1, threshold=1.01)
    assert failed["extra_steps"] == 2 and failed["extra_lr"] == pytest.approx(p.lr_base / 3)
    assert failed["answer_accuracy"] == passed["answer_accuracy"]  # the same check samples
    assert 0.0 <= failed["answer_accuracy_after"] <= 1.0
    assert not torch.equal(_weights(model), before)
