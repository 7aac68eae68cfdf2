"""Build presets of the embedded zoo. ``tiny`` is the embedded default (quality-gated);
``test`` is a smaller, faster world for the test suite (same structure, no quality gate)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    per_class: int  # entities per descriptor class
    base_steps: int
    expert_steps: int  # per expert (each expert is its own job)
    encoder_steps: int  # encoder pre-training (descriptor classifier), per encoder
    corpus_per_class: int  # protein encoder pre-training corpus (fresh generated entities), per class
    batch: int
    lr_base: float
    lr_expert: float
    lora_rank: int
    lora_alpha: int
    esm_hidden: int
    esm_layers: int
    fp_bits: int
    eval_n: int
    gates: bool  # the quality gates apply (a miss is warned about; zoo.json records every gate)
    base_rule_check: float | None = None  # see build.ensure_base_learnt_rule; None: no check

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "tiny": Preset("tiny", hidden=128, layers=4, heads=4, intermediate=384, vocab=1024, per_class=300,
                   base_steps=1200, expert_steps=400, encoder_steps=1000, corpus_per_class=1000, batch=32, lr_base=3e-3, lr_expert=3e-3, lora_rank=8,
                   lora_alpha=16, esm_hidden=64, esm_layers=2, fp_bits=1024, eval_n=300, gates=True,
                   base_rule_check=0.97),
    "test": Preset("test", hidden=64, layers=2, heads=4, intermediate=128, vocab=1024, per_class=40,
                   base_steps=120, expert_steps=90, encoder_steps=120, corpus_per_class=200, batch=16, lr_base=4e-3, lr_expert=3e-3, lora_rank=4,
                   lora_alpha=8, esm_hidden=32, esm_layers=1, fp_bits=512, eval_n=48, gates=False),
}
