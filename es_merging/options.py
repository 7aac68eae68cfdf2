"""One options model for a merge, shared by the CLI, the Python API and the MCP tools."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class MergeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: Path = Field(description="base model directory (HF checkpoint, safetensors)")
    experts: list[Path] = Field(min_length=2, max_length=16, description="expert directories")
    method: str = Field("es", description="merge method name (see `es-merging merge --list-methods`)")
    mode: Literal["factor", "delta"] | None = Field(
        None, description="factor: merge LoRA A and B separately (published); delta: merge dW. Default: factor for LoRA experts, delta for dense"
    )
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters, validated by the method's declaration")
    probe: Path | None = Field(None, description="probe JSON (required by the ES family)")
    out: Path = Field(description="output directory (must not exist unless overwrite)")
    overwrite: bool = False
    seed: int = Field(0, ge=0, description="seed for every random step (SWD projections, DARE masks)")
    rank: int | None = Field(None, ge=1, le=4096, description="delta mode with LoRA experts: re-factor the merged dW by truncated SVD to this rank; None keeps dense")
    shard_size_mb: int = Field(512, ge=1, le=65536)
    batch_size: int = Field(8, ge=1, le=1024, description="probe batch size for signal collection")
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    bundle_base: bool | None = Field(
        None, description="LoRA outputs: copy the base into out/base (self-contained); None: when it is under 2 GB, "
                          "False: reference the base by path")
