"""The healing recipe: one validated configuration, recorded in ``heal.json``.

Defaults follow the recovery recipe of the SLM paper, which takes LLM-Pruner's: LoRA of
rank 8, alpha 16, dropout 0.05 on every linear projection of the decoder layers, learning
rate 1e-4, 2 epochs, 256-token blocks, an effective batch of 64 (4 per step times 16
accumulated), linear decay after a warm-up of 100 steps (here capped at a tenth of the run,
so that a short run still decays).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from layerfold.errors import LayerfoldError
from layerfold.recover.selftext import SelfTextRecipe

# Fields that change what is trained: a checkpoint can only be resumed under the same values.
TRAINING_FIELDS = ("data", "rank", "alpha", "dropout", "lr", "epochs", "cutoff", "batch_size", "grad_accum",
                   "max_steps", "max_tokens", "warmup_steps", "weight_decay", "max_grad_norm", "seed", "distill",
                   "temperature", "kl_weight", "ce_weight", "hidden_weight", "train", "mixed_precision",
                   "self_text")
SELF = "self"  # --data self: text written by the original model (layerfold.recover.selftext)


class HealConfig(BaseModel):
    """How to heal a pruned model (LoRA or the decoder layers themselves, optionally distilling from a teacher)."""

    model_config = ConfigDict(extra="forbid")

    data: str = "books"
    # what trains: LoRA adapters (merged back), or every weight of the decoder layers the plan kept or fused;
    # None: layers for self-written text (what benchmarks/recovery measured), LoRA otherwise
    train: Literal["lora", "layers"] | None = None
    # --data self: the recipe of the text the teacher writes, and how many tokens of it (None: the token budget)
    self_text: SelfTextRecipe = Field(default_factory=SelfTextRecipe)
    self_tokens: int | None = Field(None, ge=1)
    # bfloat16 autocast for the forward passes on CUDA (weights and optimizer state stay as loaded); no effect on CPU
    mixed_precision: bool = True
    compile: bool = False  # torch.compile the student's and the teacher's forward passes
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    lr: float | None = Field(None, gt=0)  # None: 1e-4 for LoRA (LLM-Pruner's), 2e-4 for the layers
    epochs: float = Field(2.0, gt=0)
    cutoff: int = Field(256, ge=2)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(16, ge=1)
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 1234
    # distillation: teacher model (path or hub id; "default" = the embedded model); None = plain LoRA
    distill: str | None = None
    temperature: float = Field(1.0, gt=0)
    kl_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.0, ge=0)
    hidden_weight: float = Field(0.0, ge=0)
    # bookkeeping (free to change between an interrupted run and its resumption)
    checkpoint_every: int = Field(50, ge=0)
    eval_sources: tuple[str, ...] = ("ptb",)
    eval_windows: int | None = Field(40, ge=1)
    eval_seq_len: int = Field(128, ge=2)
    eval_batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> HealConfig:
        if self.train is None:
            self.train = "layers" if self.self_written else "lora"
        if self.lr is None:
            self.lr = 2e-4 if self.train == "layers" else 1e-4
        if self.max_steps is not None and self.max_tokens is not None:
            raise ValueError("give only one of max_steps and max_tokens")
        if self.distill is None and not self.self_written and (self.hidden_weight > 0 or self.ce_weight > 0):
            raise ValueError("hidden_weight and ce_weight weigh distillation terms: they need --distill")
        if self.self_written and self.data != SELF:
            raise ValueError(f"'{SELF}' cannot be joined with other data: give --data {SELF} alone")
        if self.distill is not None and self.kl_weight + self.ce_weight + self.hidden_weight == 0:
            raise ValueError("distillation with every loss weight at zero trains nothing")
        return self

    @property
    def self_written(self) -> bool:
        return SELF in [p.strip() for p in self.data.split(",")]

    @property
    def mode(self) -> str:
        """``lora`` or ``layers`` (what trains), ``+distill`` when a teacher's logits are the target."""
        return self.train + ("+distill" if self.distill is not None or self.self_written else "")

    @property
    def distilling(self) -> bool:
        return self.distill is not None or self.self_written

    def training_fingerprint(self) -> dict:
        fields = {k: getattr(self, k) for k in TRAINING_FIELDS}
        fields["self_text"] = self.self_text.model_dump() if self.self_written else None
        return fields


def make_config(**options) -> HealConfig:
    """Build a :class:`HealConfig`, turning validation errors into one-line user errors."""
    try:
        return HealConfig(**options)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        where = f"option '{loc}': " if loc else ""
        raise LayerfoldError(f"heal: {where}{first['msg'].removeprefix('Value error, ')}") from exc
