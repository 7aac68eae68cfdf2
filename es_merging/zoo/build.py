"""`es-merging zoo build`: the embedded default world, built offline and reproducibly.

Writes (atomically: a temporary directory renamed at the end)::

    DIR/base/        tiny LlamaForCausalLM + tokenizer (safetensors)
    DIR/molecule/    LoRA adapter + expert.json + encoder/ (fingerprint -> 8 soft tokens)
    DIR/protein/     LoRA adapter + expert.json + encoder/ (tiny EsmModel + 2-layer adapter)
    DIR/cell/        LoRA adapter + expert.json (genes as text)
    DIR/zoo.json     preset, seed, timings and the measured quality
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from es_merging.errors import EsMergingError
from es_merging.experts import base_hash
from es_merging.probe import MODALITY_ORDER
from es_merging.staging import staged_directory
from es_merging.worker_process import may_start_processes
from es_merging.zoo.expert_jobs import ExpertJob, run_expert_jobs
from es_merging.zoo.presets import PRESETS, Preset
from es_merging.zoo.world import DESCRIPTORS, MODALITIES, World

log = logging.getLogger(__name__)
ZOO_FORMAT = "es-merging-zoo/1"


def idle_cores(window_s: float = 0.5) -> int:
    """Cores not busy with other work right now (at least 1).

    Measured from /proc/stat over ``window_s`` where it exists: the 1-minute load average lags by a
    minute, so a build started right after other work took one thread on an idle machine (~14 min
    instead of ~9 for the tiny preset). Elsewhere, the load average."""
    cores = os.cpu_count() or 1
    busy = _busy_cores(window_s)
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:  # not available on every platform
            return cores
    return max(1, min(cores, int(cores - busy + 0.5)))


def _busy_cores(window_s: float) -> float | None:
    """Average number of busy cores over ``window_s`` from /proc/stat's aggregate line (Linux)."""
    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        if len(fields) < 5:
            return None
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]), idle  # user..steal (guest time is already in user)

    first = sample()
    if first is None:
        return None
    time.sleep(window_s)
    second = sample()
    if second is None or second[0] <= first[0]:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    cpus = os.cpu_count() or 1
    return cpus * (1.0 - idle / total)


def _corpus(world: World, n: int = 3000) -> list[str]:
    """Text the tokenizer is trained on: replies, descriptors, gene lists and the prompt frame."""
    from es_merging.probe import response_segments
    from es_merging.zoo.world import QUESTION

    lines = []
    for ws in world.samples(n, "train", seed=999):
        reply = "".join(t for t, _ in response_segments([(m, ws.entity(m).descriptor) for m in MODALITIES], ws.answer))
        cell = ", ".join(ws.cell.raw)
        lines.append(f"Molecule: {ws.molecule.descriptor}\nProtein: {ws.protein.descriptor}\nCell: {cell}\n"
                     f"Question: {QUESTION}\n{reply}")
    return lines


def _new_base(preset: Preset, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=preset.hidden, intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads, num_key_value_heads=preset.heads,
        max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(cfg)


def _new_encoder(modality: str, preset: Preset):
    from es_merging.encoders import EsmProteinEncoder, FingerprintEncoder

    if modality == "molecule":
        return FingerprintEncoder(preset.hidden, n_tokens=8, n_bits=preset.fp_bits)
    if modality == "protein":
        return EsmProteinEncoder(preset.hidden, esm_hidden=preset.esm_hidden, esm_layers=preset.esm_layers,
                                position_embedding="rotary")
    return None


def _encoder_corpus(world: World, modality: str, preset: Preset, seed: int):
    """What an encoder is pre-trained on. The fingerprint MLP generalises from the training molecules
    (held-out linear probe 1.00); the protein encoder needs a corpus (see World.pretraining_corpus)."""
    if modality == "protein":
        return world.pretraining_corpus(modality, preset.corpus_per_class, seed=seed)
    return world.train[modality]


@contextmanager
def torch_threads(threads: int | str | None):
    """torch intra-op threads inside the block, restored after: a number; ``None`` keeps torch's
    setting; ``"auto"`` takes the cores that other work leaves idle right now (:func:`idle_cores`,
    at least one: under a load of ~10 on 2 cores, one thread built the test preset in 41 s against
    426 s with two, spinning threads fighting over busy cores)."""
    previous = torch.get_num_threads()
    if threads == "auto":
        threads = idle_cores()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def build_zoo(out: str | Path, *, preset: str = "tiny", seed: int = 0, overwrite: bool = False,
              progress: Callable[[str, int, int], None] | None = None, threads: int | str | None = "auto") -> dict:
    """Build the zoo into ``out`` (atomically). ``threads``: see :func:`torch_threads`; with two or
    more, the experts train in one single-thread process each (es_merging/zoo/expert_jobs.py)."""
    with torch_threads(threads):
        return _build_zoo(out, preset=preset, seed=seed, overwrite=overwrite, progress=progress)


def _build_zoo(out: str | Path, *, preset: str, seed: int, overwrite: bool,
               progress: Callable[[str, int, int], None] | None) -> dict:
    from es_merging.mllm import MultimodalModel
    from es_merging.zoo.evaluate import evaluate_zoo
    from es_merging.zoo.tokenizer import train_tokenizer
    from es_merging.zoo.train import pretrain_encoder, train_base

    if preset not in PRESETS:
        raise EsMergingError(f"unknown zoo preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise EsMergingError(f"{out} already exists; choose another --out or pass --overwrite")
    timings: dict[str, float] = {}
    t_all = time.time()
    with staged_directory(out) as tmp:
        torch.manual_seed(seed)
        t = time.time()
        world = World.generate(seed, per_class=p.per_class)
        tokenizer = train_tokenizer(_corpus(world), vocab_size=p.vocab)
        timings["world_and_tokenizer"] = round(time.time() - t, 2)

        t = time.time()
        base = MultimodalModel(_new_base(p, tokenizer, seed), tokenizer, {})
        ranks = base_ranks(torch.get_num_threads())
        with torch_threads(1 if ranks > 1 else None):  # one core per rank
            base_stats = train_base(base, world, steps=p.base_steps, batch=p.batch, lr=p.lr_base, seed=seed,
                                    progress=progress, ranks=ranks)
            if p.base_rule_check is not None:
                base_stats["rule_check"] = ensure_base_learnt_rule(base, world, p, seed=seed, ranks=ranks,
                                                                   threshold=p.base_rule_check, progress=progress)
        base_dir = tmp / "base"
        base.backbone.save_pretrained(str(base_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(base_dir))
        digest = base_hash(base_dir)
        timings["base"] = round(time.time() - t, 2)

        t = time.time()
        torch.manual_seed(seed + 1)  # encoder initialisation
        encoders = {m: e for m in MODALITIES if (e := _new_encoder(m, p)) is not None}
        with torch.no_grad():  # soft tokens as long as the base's own token embeddings
            target_norm = float(base.backbone.get_input_embeddings().weight.norm(dim=-1).mean())
        encoder_stats = {}
        with torch_threads(1):  # 26 s at one thread in the tiny build, 45 s at two (ops too small to share)
            for m, enc in encoders.items():
                encoder_stats[m] = pretrain_encoder(enc, _encoder_corpus(world, m, p, seed), DESCRIPTORS[m],
                                                    steps=p.encoder_steps, batch=p.batch, lr=1e-3, seed=seed + 3,
                                                    target_norm=target_norm, heldout=world.heldout[m])
                enc.save(tmp / m / "encoder")
        timings["encoders"] = round(time.time() - t, 2)
        missed = [g for g, ok in encoder_gates(encoder_stats).items() if not ok]
        if missed and p.gates:
            log.warning("encoder pre-training missed %s (held-out accuracy %s): its expert will likely miss "
                        "its gate too; another --seed draws another initialisation", ", ".join(missed),
                        {m: s["heldout_accuracy"] for m, s in encoder_stats.items()})

        t = time.time()
        threads = torch.get_num_threads()
        jobs = [ExpertJob(staged=str(tmp), name=m, index=i, preset=p.name, seed=seed, base_hash=digest,
                          threads=expert_threads(threads, len(MODALITIES)))
                for i, m in enumerate(MODALITIES)]
        processes = len(jobs) if threads >= 2 else 1
        expert_stats = run_expert_jobs(jobs, processes=processes, progress=progress)
        timings["experts"] = round(time.time() - t, 2)

        t = time.time()
        quality = evaluate_zoo(tmp, world, n=p.eval_n, seed=seed, progress=progress)
        timings["evaluate"] = round(time.time() - t, 2)
        timings["total"] = round(time.time() - t_all, 2)
        gates = quality_gates(quality, encoder_stats)
        report = {
            "format": ZOO_FORMAT,
            "preset": p.to_dict(),
            "seed": seed,
            "world": {"seed": world.seed, "per_class": p.per_class, "descriptors": DESCRIPTORS,
                      "train_entities": {m: len(v) for m, v in world.train.items()},
                      "heldout_entities": {m: len(v) for m, v in world.heldout.items()}},
            "base_hash": digest,
            "experts": {m: {"path": m, "modality": m, "encoder": m in encoders} for m in MODALITY_ORDER},
            "training": {"base": base_stats, "encoders": encoder_stats, "experts": expert_stats,
                         "expert_processes": processes},
            "quality": quality,
            "gates": gates,
            "timings_s": timings,
            "versions": _versions(),
            "threads": torch.get_num_threads(),
        }
        (tmp / "zoo.json").write_text(json.dumps(report, indent=2))
    return report


def ensure_base_learnt_rule(base, world: World, p: Preset, *, seed: int, ranks: int, threshold: float,
                            progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Check the trained base answers the rule from true descriptors on training-split samples it has
    not been scored on (never held-out entities: those are for the gates); below ``threshold``, train
    one more, gentler round (a third of the steps at a third of the learning rate) and check again.

    Why: learning the rule within ``base_steps`` is marginal for some trajectories. Tiny preset,
    seed 1, two ranks: 0.95 here after 1,200 steps (0.923 on held-out samples, a missed gate); after
    400 more steps at 1e-3, 1.000 on both. Seed 0's base passes the check, so its bytes are unchanged.
    (1,600 steps from the start fixed seed 1 too, but cost every seed the extra steps and lowered the
    base's answer-follows-slots on seed 0 from 0.973 to 0.80.)"""
    from es_merging.zoo.evaluate import evaluate_model
    from es_merging.zoo.train import train_base

    samples = world.samples(p.eval_n, "train", seed=seed + 11)
    text = {m: "text" for m in MODALITIES}
    before = evaluate_model(base, samples, spans=text)["answer_accuracy"]
    report = {"samples": len(samples), "threshold": threshold, "answer_accuracy": before, "extra_steps": 0}
    if before >= threshold:
        return report
    extra, lr = max(1, p.base_steps // 3), p.lr_base / 3
    log.warning("the base answers the rule at %.3f on its check (< %.2f): %d more steps at lr %.1e",
                before, threshold, extra, lr)
    stats = train_base(base, world, steps=extra, batch=p.batch, lr=lr, seed=seed + 1000, ranks=ranks,
                       progress=progress)
    after = evaluate_model(base, samples, spans=text)["answer_accuracy"]
    return report | {"extra_steps": extra, "extra_lr": lr, "extra_seed": seed + 1000,
                     "extra_final_loss": stats["final_loss"], "answer_accuracy_after": after}


def base_ranks(threads: int) -> int:
    """Processes the base trains in (data-parallel, es_merging/zoo/base_peers.py): one per core, up
    to 4 (each keeps 8 + 2 rows of the tiny preset's batch); one where this process may not start
    children (a daemonic process)."""
    if not may_start_processes():
        return 1
    return max(1, min(int(threads), 4))


def expert_threads(threads: int, experts: int) -> int:
    """Torch threads inside each expert job: one each up to one core per expert (the jobs run side by
    side), the cores shared out above that. With 1 to 5 threads every job has one thread, so the
    experts come out the same bytes whatever --threads says (the base still depends on it)."""
    return max(1, threads // experts)


ENCODER_HELDOUT_GATE = 0.97


def encoder_gates(encoder_stats: dict) -> dict:
    """Each pre-trained encoder's descriptor classifier on held-out entities. Not one of the issue's
    bars, but an early sign: a protein encoder at held-out 0.951 capped its expert at 0.883 (0.98 with
    an encoder at 1.000), and this is known minutes before the experts are trained and evaluated."""
    return {f"{m}_encoder_heldout_ge_{ENCODER_HELDOUT_GATE}": (s.get("heldout_accuracy") or 0.0) >= ENCODER_HELDOUT_GATE
            for m, s in encoder_stats.items()}


def quality_gates(q: dict, encoder_stats: dict | None = None) -> dict:
    """The issue's quality bars, evaluated on held-out entities (and :func:`encoder_gates`)."""
    base_text = q["base"]["text"]["answer_accuracy"]
    gates = {
        "base_text_answer_ge_0.95": base_text >= 0.95,
    }
    for m in MODALITIES:
        gates[f"{m}_expert_own_slot_ge_0.90"] = q[m]["raw"]["slot_accuracy"][m] >= 0.90
        gates[f"{m}_expert_text_answer_within_5pts"] = q[m]["text"]["answer_accuracy"] >= base_text - 0.05
    gates.update(encoder_gates(encoder_stats or {}))
    gates["all_pass"] = all(gates.values())
    return gates


def _versions() -> dict:
    import peft
    import transformers

    import es_merging

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "es_merging": es_merging.__version__}
