"""Expert training of the zoo build, one job per expert, in worker processes when cores allow.

Once the base is saved and the encoders are pre-trained and frozen, the three experts no longer
depend on each other: each job loads the base and the encoders from the staged directory, draws its
own LoRA initialisation and training stream from its own seeds, trains, and saves its adapter.
A job therefore gives the same bytes whether it runs in this process or in a worker, and whatever
the number of workers (tested). Why processes: the tiny model's ops are too small for torch's
intra-op threads to use two cores well (an expert step took 0.37 s with two threads against 0.49 s
with one); one single-threaded process per expert keeps both cores busy.

Workers are started with ``spawn`` (no inherited torch or lock state) and exit on their own when
the building process dies (a server job that is cancelled is killed outright)."""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue as queue_module
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from es_merging.errors import EsMergingError
from es_merging.worker_process import exit_when_orphaned, may_start_processes, stdout_to_stderr

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class ExpertJob:
    """Everything one expert's training needs; plain values, so it crosses a process boundary."""

    staged: str  # the zoo directory being built: base/ and every encoder/ are already there
    name: str  # the modality, also the adapter's name
    index: int  # position among the experts: separates the seeds
    preset: str
    seed: int  # the build's seed (the world is regenerated from it)
    base_hash: str
    threads: int  # torch intra-op threads inside the job

    @property
    def init_seed(self) -> int:
        return self.seed + 1 + 1000 * self.index

    @property
    def train_seed(self) -> int:
        return self.seed + 2 + 101 * self.index


def run_expert_job(job: ExpertJob, progress: Progress | None = None) -> dict:
    """Train one expert and write ``staged/<name>/`` (adapter, expert.json; encoder/ is already there)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from es_merging.mllm import MultimodalModel
    from es_merging.zoo.presets import PRESETS
    from es_merging.zoo.train import train_experts
    from es_merging.zoo.world import MODALITIES, World

    torch.set_num_threads(job.threads)
    p = PRESETS[job.preset]
    staged = Path(job.staged)
    world = World.generate(job.seed, per_class=p.per_class)
    loaded = MultimodalModel.load(staged / "base", encoders={m: staged / m / "encoder" for m in MODALITIES
                                                              if (staged / m / "encoder").is_dir()})
    for encoder in loaded.encoders.values():
        encoder.requires_grad_(False)  # pre-trained and frozen: only the LoRA learns here
    lora = LoraConfig(r=p.lora_rank, lora_alpha=p.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    torch.manual_seed(job.init_seed)
    peft_model = get_peft_model(loaded.backbone, lora, adapter_name=job.name)
    model = MultimodalModel(peft_model, loaded.tokenizer, dict(loaded.encoders))
    stats = train_experts(model, world, [job.name], steps=p.expert_steps, batch=p.batch, lr=p.lr_expert,
                          seed=job.train_seed, progress=progress)
    _save_adapter(peft_model, job, staged / job.name)
    return {"steps": stats["steps"], "seconds": stats["seconds"], "final_loss": stats["final_loss"][job.name],
            "init_seed": job.init_seed, "train_seed": job.train_seed, "threads": job.threads}


def _save_adapter(peft_model, job: ExpertJob, out: Path) -> None:
    from es_merging.experts import EXPERT_FORMAT
    from es_merging.zoo.world import DESCRIPTORS

    scratch = out.parent / f".{job.name}.adapter"
    if scratch.exists():
        shutil.rmtree(scratch)
    peft_model.save_pretrained(str(scratch), selected_adapters=[job.name], safe_serialization=True)
    saved = scratch / job.name if (scratch / job.name).is_dir() else scratch
    out.mkdir(parents=True, exist_ok=True)
    for f in saved.iterdir():
        if f.is_file() and f.name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.move(str(f), out / f.name)
    shutil.rmtree(scratch)
    # peft records where the base was loaded from: here the build's temporary directory, which is
    # renamed at the end; the expert's base is named by expert.json's base_hash instead. peft also
    # writes target_modules from a set, in an order that changes from process to process: sorted,
    # the file is the same bytes in every build
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = None
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    manifest = {
        "format": EXPERT_FORMAT, "name": job.name, "modality": job.name, "kind": "lora", "base_hash": job.base_hash,
        "encoder": "encoder" if (out / "encoder").is_dir() else None,
        "description": f"embedded-world {job.name} expert: raw {job.name} input -> {'/'.join(DESCRIPTORS[job.name])}",
        "preset": job.preset,
    }
    (out / "expert.json").write_text(json.dumps(manifest, indent=2))


def run_expert_jobs(jobs: list[ExpertJob], *, processes: int, progress: Progress | None = None) -> dict[str, dict]:
    """Run ``jobs``: in this process one after the other (``processes`` <= 1, or where this process
    may not have children), else all at once in worker processes. Returns name -> training stats."""
    if processes <= 1 or len(jobs) <= 1 or not may_start_processes():
        counter = _StepCounter(jobs, progress)
        return {job.name: run_expert_job(job, counter.for_job(job.name)) for job in jobs}
    return _run_in_workers(jobs, progress)


class _StepCounter:
    """Turns per-job progress into one "train experts" count over every job's steps."""

    def __init__(self, jobs: list[ExpertJob], progress: Progress | None):
        from es_merging.zoo.presets import PRESETS

        self.progress = progress
        self.done = {job.name: 0 for job in jobs}
        self.total = sum(PRESETS[job.preset].expert_steps for job in jobs)

    def update(self, name: str, step: int, _steps: int) -> None:
        self.done[name] = step
        if self.progress:
            self.progress("train experts", sum(self.done.values()), self.total)

    def for_job(self, name: str) -> Progress:
        return lambda _stage, step, steps: self.update(name, step, steps)


def _run_in_workers(jobs: list[ExpertJob], progress: Progress | None) -> dict[str, dict]:
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    procs = {job.name: ctx.Process(target=_worker_main, args=(job, messages, os.getpid(), logging.getLogger().level),
                                   name=f"esm-expert-{job.name}", daemon=False) for job in jobs}
    counter = _StepCounter(jobs, progress)
    results: dict[str, dict] = {}
    try:
        for proc in procs.values():
            proc.start()
        while len(results) < len(jobs):
            try:
                kind, name, payload = messages.get(timeout=0.5)
            except queue_module.Empty:
                for name, proc in procs.items():
                    if name not in results and proc.exitcode is not None:
                        _drain_for(messages, name, results, counter)  # its last message may still be in flight
                        if name not in results:
                            raise EsMergingError(f"the {name} expert's training process stopped "
                                                 f"(exit code {proc.exitcode}) without a result; see the log above")
                continue
            _handle(kind, name, payload, results, counter)
        for proc in procs.values():
            proc.join(timeout=30)
        return results
    finally:
        for proc in procs.values():
            if proc.is_alive():
                proc.terminate()
        for proc in procs.values():
            proc.join(timeout=5)
        messages.close()


def _handle(kind: str, name: str, payload, results: dict, counter: _StepCounter) -> None:
    if kind == "progress":
        counter.update(name, *payload)
    elif kind == "done":
        results[name] = payload
    else:  # "error": the worker's message, its traceback is in the log
        raise EsMergingError(f"training the {name} expert failed: {payload}")


def _drain_for(messages, name: str, results: dict, counter: _StepCounter) -> None:
    deadline = time.time() + 2.0
    while name not in results and time.time() < deadline:
        try:
            _handle(*messages.get(timeout=0.2), results, counter)
        except queue_module.Empty:
            continue


def _worker_main(job: ExpertJob, messages, parent_pid: int, log_level: int) -> None:
    """Entry point of a spawned expert trainer: logs to stderr, results through ``messages``."""
    stdout_to_stderr()  # stdout may be an MCP stdio stream (the server builds the zoo in a job)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=log_level, stream=sys.stderr, format=f"%(levelname)s expert {job.name}: %(message)s")
    exit_when_orphaned(parent_pid)
    try:
        stats = run_expert_job(job, lambda _stage, step, steps: messages.put(("progress", job.name, (step, steps))))
        messages.put(("done", job.name, stats))
    except BaseException as exc:  # noqa: BLE001 - the builder must learn why, whatever it was
        log.error("training the %s expert failed:\n%s", job.name, traceback.format_exc())
        messages.put(("error", job.name, f"{type(exc).__name__}: {exc}"))
    finally:
        messages.close()
        messages.join_thread()  # the last message must leave before the process does
