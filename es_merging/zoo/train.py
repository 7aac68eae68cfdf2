"""Training of the embedded zoo: the base learns *reasoning* over textual descriptors, each expert
learns *perception* of its raw modality (raw input -> descriptor) without breaking the reasoning.

Expert batches mix three kinds of example (DESIGN section 7 records why):
  own   - own modality raw, others as text: CE on the whole reply (perception + reasoning replay);
  raw   - every modality raw: CE on the own slot, KL to the base on every other reply position, so the
          expert's delta stays near zero outside its modality (others' soft tokens come from the
          other experts' encoders, pre-trained and frozen before any expert trains);
  text  - every modality as text: CE on the whole reply (the base's reasoning, replayed).
"""
from __future__ import annotations

import logging
import math
import random
import time
from typing import Callable

import torch
import torch.nn.functional as F

from es_merging.probe import ProbeSample, RenderedPrompt, response_segments
from es_merging.zoo.world import DESCRIPTORS, MODALITIES, QUESTION, World, WorldSample

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


def to_probe_sample(ws: WorldSample, index: int | None = None) -> ProbeSample:
    return ProbeSample(
        id=None if index is None else f"w{index}",
        smiles=ws.molecule.raw,
        protein=ws.protein.raw,
        cell=list(ws.cell.raw),
        descriptors={m: ws.entity(m).descriptor for m in MODALITIES},
        answer=ws.answer,
    )


def render_example(renderer, ws: WorldSample, spans: dict[str, str], eos: str,
                   shown: dict[str, str] | None = None) -> RenderedPrompt:
    """``shown``: descriptors the prompt's text spans show instead of the true ones (the reply keeps
    the true descriptors and the true answer)."""
    sample = to_probe_sample(ws)
    if shown:
        sample = sample.model_copy(update={"descriptors": {**sample.descriptors, **shown}})
    reply = response_segments([(m, ws.entity(m).descriptor) for m in MODALITIES], ws.answer, eos)
    return renderer.render(sample, spans=spans, question=QUESTION, response=reply)


def targets(model, rendered: list[RenderedPrompt], ce_names: list[set[str] | None], kl_rest: list[bool]):
    """labels [B, S] (-100 = ignored) aligned with logits, and a KL mask over reply positions.

    ce_names[i] None -> CE on every reply token of example i; else CE on the named target spans
    only, and (kl_rest[i]) KL to the base on the other reply positions."""
    batch = model.collate(rendered)
    labels = torch.full_like(batch.input_ids, -100)
    kl_mask = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    for row, r in enumerate(rendered):
        n = len(r.input_ids)
        ids = batch.input_ids[row]
        reply = range(r.prompt_length, n)
        if ce_names[row] is None:
            for j in reply:
                labels[row, j - 1] = ids[j]
            continue
        chosen = set()
        for name, s, e in r.target_spans:
            if name in ce_names[row]:
                chosen.update(range(s, e))
        for j in reply:
            if j in chosen:
                labels[row, j - 1] = ids[j]
            elif kl_rest[row]:
                kl_mask[row, j - 1] = True
    return batch, labels, kl_mask


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the positions whose label is not -100."""
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy and the number of positions it covers (to average over groups)."""
    total = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100, reduction="sum")
    return total, int((labels != -100).sum())


def split_rows(flags: list[bool]) -> list[list[int]]:
    """Row indices grouped by ``flags`` (True rows first); empty groups dropped.

    A training batch mixes rows of very different lengths (tiny zoo: text-only prompts 49 tokens,
    gene-list rows 79, all-raw rows ~118); one forward per group pads each group to its own width
    instead of every row to the longest, ~25-30% fewer token positions for the same loss."""
    groups = [[i for i, f in enumerate(flags) if f], [i for i, f in enumerate(flags) if not f]]
    return [g for g in groups if g]


def optimizer_step(opt, params, loss: torch.Tensor, step: int, steps: int, lr: float) -> float:
    """One AdamW step with warm-up + cosine learning rate and gradient clipping; returns the loss."""
    set_learning_rate(opt, step, steps, lr)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()


def set_learning_rate(opt, step: int, steps: int, lr: float) -> None:
    """Warm-up then cosine decay to a tenth of ``lr``, set on every parameter group."""
    for g in opt.param_groups:
        g["lr"] = _cosine_lr(step, steps, lr, warmup=max(1, steps // 20))


def _cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_base(model, world: World, *, steps: int, batch: int, lr: float, seed: int, gene_lm: float = 0.25,
               progress: Progress | None = None, ranks: int = 1) -> dict:
    """Base: every span as text; CE on the whole reply (it learns to copy descriptors into the slots
    and to answer the rule from them). ``gene_lm`` x batch extra rows show the cell
    as its gene list and trains plain next-token prediction on those genes (no cell-type label):
    like an LLM's pre-training, the base knows gene symbols as words (markers of one cell type
    co-occur) without ever being taught to name a cell type from them. (Measured on the tiny preset:
    the cell expert's own-slot accuracy went from 0.35 to 0.90 with it.)

    The same rows teach the answer to follow the reply's slots, not the prompt: their prompt shows
    random descriptors for the molecule and the protein (and genes for the cell), their reply the
    true descriptors, and the answer after them is trained (CE on the answer only). Without them the
    base answered from the prompt's descriptor words; with raw inputs (soft tokens, no words) its
    answer was then a constant, whatever the slots said, and every merge scored chance on the
    interactive task even where it filled all three slots correctly (task arithmetic, delta: slots
    0.94 / 0.98 / 0.96, interactive 0.491, one answer for every sample).

    ``ranks`` > 1: data-parallel over this process and ``ranks - 1`` spawned peers, each taking every
    ``ranks``-th row of the same stream (es_merging/zoo/base_peers.py); the weights depend on
    ``ranks`` (the order gradients are summed in), on nothing else of the machine's."""
    torch.manual_seed(seed)
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    stream = {"steps": steps, "batch": batch, "seed": seed, "gene_lm": gene_lm}
    model.train()
    t0, losses = time.time(), []
    peers = None
    try:
        if ranks > 1:
            from es_merging.zoo.base_peers import BasePeers

            peers = BasePeers(model, world, params, ranks, stream)
        for step, (chunk, gene_rows) in enumerate(base_batches(world, **stream)):
            set_learning_rate(opt, step, steps, lr)
            opt.zero_grad(set_to_none=True)
            if peers:
                peers.begin(step)
            total, count = base_loss_sum(model, chunk, gene_rows, rank=0, ranks=ranks)
            if total is not None:
                total.backward()
            loss = 0.0 if total is None else float(total.item())
            if peers:
                peer_loss, peer_count = peers.collect(step)
                loss, count = loss + peer_loss, count + peer_count
            with torch.no_grad():  # summed over rows and ranks: the mean over every position here
                for p in params:
                    if p.grad is not None:
                        p.grad.div_(max(1, count))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss / max(1, count))
            if progress and (step % 20 == 0 or step == steps - 1):
                progress("train base", step + 1, steps)
    finally:
        if peers:
            peers.close()
    model.eval()
    return {"steps": steps, "seconds": round(time.time() - t0, 1), "final_loss": sum(losses[-20:]) / min(20, len(losses)),
            "ranks": ranks}


def base_batches(world: World, *, steps: int, batch: int, seed: int, gene_lm: float):
    """The base's training stream, step by step: (reasoning rows, gene-list rows with the descriptors
    each one's prompt shows). Every data-parallel rank draws the same stream and keeps its share.
    ``gene_lm`` x batch gene-list rows come on top of the reasoning rows (the rule gets its full budget)."""
    rng = random.Random(seed)
    pool = world.samples(steps * batch, "train", seed=seed)
    for step in range(steps):
        chunk = pool[step * batch:(step + 1) * batch]
        rng.shuffle(chunk)
        extra = [rng.choice(pool) for _ in range(int(round(batch * gene_lm)))]
        yield chunk, [(ws, {m: rng.choice(DESCRIPTORS[m]) for m in ("molecule", "protein")}) for ws in extra]


def base_loss_sum(model, chunk: list[WorldSample], gene_rows: list[tuple[WorldSample, dict]], *, rank: int = 0,
                  ranks: int = 1) -> tuple[torch.Tensor | None, int]:
    """Summed loss of rank ``rank``'s rows of one step (every ``ranks``-th row of each kind) and the
    number of positions it covers; ``(None, 0)`` when the rank has no rows. Gene-list rows are longer
    than reasoning rows: a forward each (split_rows' reason)."""
    eos = model.tokenizer.eos_token
    spans = {m: "text" for m in MODALITIES}
    groups = []
    if mine := gene_rows[rank::ranks]:
        groups.append((True, [render_example(model.renderer, ws, dict(spans, cell="raw"), eos, shown=shown)
                              for ws, shown in mine]))
    if mine := chunk[rank::ranks]:
        groups.append((False, [render_example(model.renderer, ws, spans, eos) for ws in mine]))
    total, count = None, 0
    for genes, rendered in groups:
        b, labels, _ = targets(model, rendered, [{"answer"} if genes else None] * len(rendered), [False] * len(rendered))
        if genes:  # plain next-token prediction on the genes too (after the first)
            for row in range(len(rendered)):
                for j in b.masks["cell"][row].nonzero(as_tuple=True)[0].tolist()[1:]:
                    labels[row, j - 1] = b.input_ids[row, j]
        part, n = lm_loss_sum(model.forward(b).logits, labels)
        total, count = (part if total is None else total + part), count + n
    return total, count


def pretrain_encoder(encoder, entities, descriptors: tuple[str, ...], *, steps: int, batch: int, lr: float,
                     seed: int, target_norm: float, heldout=None) -> dict:
    """Perception features first, then a fixed projector (DESIGN section 7).

    The encoder is trained as a descriptor classifier on its pooled features; its projector into the
    LLM's embedding space is then re-drawn at random and everything is frozen. Were the encoder
    trained through the LLM, it would learn to emit the descriptor words' own embeddings, the base
    would simply copy them, and the LoRA (what merging combines) would carry no perception at all.
    With a random fixed projector the features are informative but unreadable without the adapter.
    ``heldout`` entities (never trained on) only measure the classifier: its accuracy is reported."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    head = torch.nn.Linear(encoder.summary_dim, len(descriptors))
    params = [p for n, p in encoder.named_parameters() if not n.startswith(_projector_prefix(encoder))]
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=lr, weight_decay=0.01)
    labels = {d: i for i, d in enumerate(descriptors)}
    encoder.train()
    t0, losses = time.time(), []
    for step in range(steps):
        chunk = [rng.choice(entities) for _ in range(batch)]
        logits = head(encoder.summary_features([e.raw for e in chunk]))
        loss = F.cross_entropy(logits, torch.tensor([labels[e.descriptor] for e in chunk]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    encoder.eval()
    with torch.no_grad():
        def accuracy(items) -> float:  # one item at a time: no padding effects
            hits = sum(int(head(encoder.summary_features([e.raw])).argmax()) == labels[e.descriptor] for e in items)
            return round(hits / max(1, len(items)), 4)

        train_accuracy = accuracy(rng.sample(entities, min(200, len(entities))))
        heldout_accuracy = accuracy(heldout) if heldout else None
        projector = encoder.projector()
        for module in projector.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features ** -0.5)
                torch.nn.init.zeros_(module.bias)
        soft = torch.cat(encoder([e.raw for e in rng.sample(entities, min(64, len(entities)))]))
        scale = target_norm / soft.norm(dim=-1).mean().clamp_min(1e-6)
        last = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(scale)
    encoder.requires_grad_(False)
    return {"steps": steps, "seconds": round(time.time() - t0, 1), "final_loss": sum(losses[-20:]) / min(20, len(losses)),
            "train_accuracy": train_accuracy, "heldout_accuracy": heldout_accuracy, "corpus_size": len(entities),
            "soft_token_norm": round(target_norm, 4)}


def _projector_prefix(encoder) -> str:
    projector = encoder.projector()
    for name, module in encoder.named_modules():
        if module is projector:
            return name + "."
    raise ValueError("projector is not a sub-module of the encoder")


def train_experts(model, world: World, experts: list[str], *, steps: int, batch: int, lr: float, seed: int,
                  mix: tuple[float, float, float] = (0.45, 0.45, 0.1), kl_weight: float = 1.0,
                  progress: Progress | None = None) -> dict:
    """Training of one LoRA adapter per expert (named after its modality), and of its encoder where
    that is not frozen.

    ``model`` carries every adapter and every encoder; each step visits each expert once. The zoo
    build and ``adapt`` pass one expert at a time (see es_merging/zoo/expert_jobs.py)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    eos = model.tokenizer.eos_token
    opts = {}
    for name in experts:
        model.set_adapter(name)
        params = [p for n, p in model.backbone.named_parameters() if f".{name}." in n and "lora_" in n]
        if name in model.encoders:  # a pre-trained, frozen encoder contributes nothing here
            params += [p for p in model.encoders[name].parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(True)
        opts[name] = (torch.optim.AdamW(params, lr=lr, weight_decay=0.0), params)
    pools = {name: world.samples(steps * batch, "train", seed=seed + 17 * (i + 1)) for i, name in enumerate(experts)}
    stats = {name: [] for name in experts}
    t0 = time.time()
    model.train()
    for encoder in model.encoders.values():
        if not any(p.requires_grad for p in encoder.parameters()):
            encoder.eval()  # frozen: deterministic, and its soft tokens can be cached
    for step in range(steps):
        for name in experts:
            chunk = pools[name][step * batch:(step + 1) * batch]
            rendered, ce, kl = [], [], []
            for ws in chunk:
                u = rng.random()
                if u < mix[0]:
                    spans = {m: ("raw" if m == name else "text") for m in MODALITIES}
                    ce.append(None), kl.append(False)
                elif u < mix[0] + mix[1]:
                    spans = {m: "raw" for m in MODALITIES}
                    ce.append({f"slot:{name}"}), kl.append(True)
                else:
                    spans = {m: "text" for m in MODALITIES}
                    ce.append(None), kl.append(False)
                rendered.append(render_example(model.renderer, ws, spans, eos))
            model.set_adapter(name)
            model.zero_grad(set_to_none=True)
            ce_total, ce_count, kl_total, kl_count = 0.0, 0, 0.0, 0
            for group in split_rows(kl):  # all-raw rows (KL) are the longest: a forward each
                b, labels, kl_mask = targets(model, [rendered[i] for i in group], [ce[i] for i in group],
                                             [kl[i] for i in group])
                base_logits = None
                if kl_mask.any():  # the base's reply distribution, on the KL rows only
                    model.set_adapter(None)
                    with torch.no_grad():
                        base_logits = model.forward(b).logits
                    model.set_adapter(name)
                logits = model.forward(b).logits
                part, n = lm_loss_sum(logits, labels)
                ce_total, ce_count = ce_total + part, ce_count + n
                if base_logits is not None:
                    lp = torch.log_softmax(logits[kl_mask], -1)
                    lq = torch.log_softmax(base_logits[kl_mask], -1)
                    kl_total = kl_total + F.kl_div(lp, lq, log_target=True, reduction="sum")
                    kl_count += int(kl_mask.sum())
            # per-position means over the whole batch, as one forward over all rows would give
            loss = ce_total / max(1, ce_count)
            if kl_count:
                loss = loss + kl_weight * kl_total / kl_count
            opt, params = opts[name]
            set_learning_rate(opt, step, steps, lr)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            stats[name].append(loss.item())
        if progress and (step % 10 == 0 or step == steps - 1):
            progress("train experts", step + 1, steps)
    model.eval()
    return {
        "steps": steps,
        "seconds": round(time.time() - t0, 1),
        "final_loss": {n: sum(v[-20:]) / min(20, len(v)) for n, v in stats.items()},
    }
