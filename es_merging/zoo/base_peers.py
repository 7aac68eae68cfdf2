"""Data-parallel training of the zoo's base: peer processes that each compute the gradient of their
share of every batch.

Why: the tiny base's ops are too small for torch's intra-op threads to use two cores (0.187 s a step
with two threads against 0.173 CPU-s with one), but a step over half the rows costs about half
(measured at one thread: 16 + 4 rows 0.123-0.131 s, 32 + 8 rows 0.242-0.247 s). So the builder
(rank 0) and ``ranks - 1`` spawned peers each take every ``ranks``-th row of the same stream.

Protocol, per step: the builder writes its parameters into one shared float32 buffer and tells each
peer the step; each peer copies them in, computes the summed loss of its rows, writes its gradient
into its own shared buffer and answers with its loss and how many positions it covered; the builder
adds the peers' gradients to its own in rank order (so a build is the same bytes every time for a
given number of ranks), divides by the total count and takes the optimiser step alone. Peers never
hold optimiser state. Buffers are stdlib ``SharedMemory`` blocks, unlinked when training ends however
it ends; peers exit on their own when the builder dies (``exit_when_orphaned``)."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import traceback
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import torch

from es_merging.errors import EsMergingError
from es_merging.worker_process import exit_when_orphaned, stdout_to_stderr

log = logging.getLogger(__name__)


class SharedFloats:
    """A float32 vector in a named shared-memory block, with views shaped like ``params``."""

    def __init__(self, size: int, name: str | None = None):
        self.block = shared_memory.SharedMemory(name=name, create=name is None, size=max(4, 4 * size))
        self.owner = name is None
        self.vector = torch.frombuffer(self.block.buf, dtype=torch.float32, count=size)

    @property
    def name(self) -> str:
        return self.block.name

    def views(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        out, offset = [], 0
        for p in params:
            out.append(self.vector[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    def close(self) -> None:
        self.vector = None  # no tensor may point into the block when it is closed
        self.block.close()
        if self.owner:
            self.block.unlink()


@dataclass
class PeerSpec:
    """What a peer needs to rebuild the builder's model and its training stream (pickled at spawn:
    objects this process made, never user data)."""

    config: Any  # the backbone's transformers config
    tokenizer: Any
    world: Any
    stream: dict  # base_batches' keyword arguments
    rank: int
    ranks: int
    params_name: str
    grads_name: str
    size: int


class BasePeers:
    """Ranks 1..ranks-1 of a data-parallel base training; rank 0 is the caller."""

    def __init__(self, model, world, params: list[torch.Tensor], ranks: int, stream: dict):
        size = sum(p.numel() for p in params)
        self.params = params
        self.shared_params = SharedFloats(size)
        self.param_views = self.shared_params.views(params)
        self.grads: list[SharedFloats] = []
        self.grad_views: list[list[torch.Tensor]] = []  # per peer, shaped like params
        self.procs, self.conns = [], []
        ctx = mp.get_context("spawn")
        try:
            for rank in range(1, ranks):
                grads = SharedFloats(size)
                self.grads.append(grads)
                self.grad_views.append(grads.views(params))
                spec = PeerSpec(config=model.backbone.config, tokenizer=model.tokenizer, world=world, stream=stream,
                                rank=rank, ranks=ranks, params_name=self.shared_params.name, grads_name=grads.name,
                                size=size)
                here, there = ctx.Pipe()
                proc = ctx.Process(target=_peer_main, args=(spec, there, os.getpid(), logging.getLogger().level),
                                   name=f"esm-base-rank{rank}", daemon=False)
                proc.start()
                there.close()
                self.procs.append(proc)
                self.conns.append(here)
        except BaseException:
            self.close()
            raise

    def begin(self, step: int) -> None:
        """Publish the current parameters and start every peer on ``step``."""
        with torch.no_grad():
            for p, view in zip(self.params, self.param_views):
                view.copy_(p)
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send(("step", step))
            except OSError:
                raise self._gone(rank) from None

    def collect(self, step: int) -> tuple[float, int]:
        """Add every peer's gradient of ``step`` to the parameters' own, in rank order; returns the
        peers' summed loss and position count."""
        loss, count = 0.0, 0
        for rank, (conn, views) in enumerate(zip(self.conns, self.grad_views), start=1):
            try:
                kind, *payload = conn.recv()
            except (EOFError, OSError):
                raise self._gone(rank) from None
            if kind == "error":
                raise EsMergingError(f"the base's training process rank {rank} failed: {payload[0]}")
            peer_step, peer_loss, peer_count = payload
            if peer_step != step:  # both ranks walk the same stream: a mismatch is a bug, not bad input
                raise EsMergingError(f"base training rank {rank} answered step {peer_step} for step {step}")
            with torch.no_grad():
                for p, g in zip(self.params, views):
                    if p.grad is None:
                        p.grad = g.clone()
                    else:
                        p.grad.add_(g)
            loss, count = loss + peer_loss, count + peer_count
        return loss, count

    def _gone(self, rank: int) -> EsMergingError:
        proc = self.procs[rank - 1]
        proc.join(timeout=2)  # its exit code, if it is on its way out
        return EsMergingError(f"the base's training process rank {rank} stopped (exit code {proc.exitcode}) "
                              "without a result; see the log above")

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.param_views, self.grad_views = [], []  # no view may outlive its block
        for block in [self.shared_params, *self.grads]:
            block.close()
        self.grads, self.conns, self.procs = [], [], []


def _peer_main(spec: PeerSpec, conn, parent_pid: int, log_level: int) -> None:
    """Entry point of a spawned base-training peer: logs to stderr, answers through ``conn``."""
    stdout_to_stderr()  # stdout may be an MCP stdio stream (the server builds the zoo in a job)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=log_level, stream=sys.stderr, format=f"%(levelname)s base rank {spec.rank}: %(message)s")
    exit_when_orphaned(parent_pid)
    shared_params = grads = None
    try:
        from transformers import AutoModelForCausalLM

        from es_merging.mllm import MultimodalModel
        from es_merging.zoo.train import base_batches, base_loss_sum

        torch.set_num_threads(1)
        model = MultimodalModel(AutoModelForCausalLM.from_config(spec.config), spec.tokenizer, {})
        model.train()
        params = [p for p in model.backbone.parameters() if p.requires_grad]
        if sum(p.numel() for p in params) != spec.size:
            raise EsMergingError(f"rebuilt base has {sum(p.numel() for p in params)} trainable values, not {spec.size}")
        shared_params, grads = SharedFloats(spec.size, spec.params_name), SharedFloats(spec.size, spec.grads_name)
        param_views, grad_views = shared_params.views(params), grads.views(params)
        stream = enumerate(base_batches(spec.world, **spec.stream))
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            step, (chunk, gene_rows) = next(stream)
            with torch.no_grad():
                for p, view in zip(params, param_views):
                    p.copy_(view)
            for p in params:
                p.grad = None
            total, count = base_loss_sum(model, chunk, gene_rows, rank=spec.rank, ranks=spec.ranks)
            if total is not None:
                total.backward()
            with torch.no_grad():
                for p, g in zip(params, grad_views):
                    g.copy_(p.grad) if p.grad is not None else g.zero_()
            conn.send(("grads", step, 0.0 if total is None else float(total.item()), count))
    except (EOFError, KeyboardInterrupt):
        pass  # the builder went away: nothing to report to
    except BaseException as exc:  # noqa: BLE001 - the builder must learn why, whatever it was
        log.error("base training rank %d failed:\n%s", spec.rank, traceback.format_exc())
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
    finally:
        param_views = grad_views = None  # noqa: F841 - release the views before the blocks close
        for block in (shared_params, grads):
            if block is not None:
                block.close()
        conn.close()
