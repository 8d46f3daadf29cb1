"""The training configuration: one dataclass, validated before anything is touched."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..core.errors import ConfigError, did_you_mean

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    """Everything :func:`peftkit.train.train` needs besides the model and the data.

    ``batch_size`` is the batch per process (per rank): under ``torchrun`` with N processes the
    global batch is ``batch_size × N`` and one optimizer step sees ``batch_size × N × grad_accum``
    examples. ``warmup`` below 1 is a fraction of the total optimizer steps, otherwise a step count.
    ``metric`` is the eval metric for early stopping and for picking the best adapter: lower is
    better when its name contains ``loss`` (or ``perplexity``), higher otherwise.
    ``max_steps``, when given, sets the length of the run and ``epochs`` is not used.
    ``head_lr``: the learning rate of the adapters' ``modules_to_save`` copies and the ``trainable_extra``
    modules (a classification head, which starts from random values and wants a higher lr than the
    adapter); ``None`` means ``lr``.
    ``eval_each_epoch``: evaluate at the end of every epoch (besides every ``eval_every`` steps).
    ``progress``: ``None`` shows a progress bar when stderr is a terminal and a plain line every
    ``log_every`` steps otherwise (a log file, CI); ``False`` is silent.
    ``fsdp``: under ``torchrun``, shard the model with FSDP2 (every transformer block, then the root)
    instead of replicating it with DDP — for models that do not fit one device. Checkpoints
    (``save_every``, ``resume``) are not available with it yet; the final adapter is saved.
    ``chunked_loss``: causal LMs in one process compute the loss over chunks of labelled positions
    (:mod:`peftkit.train.loss`; same value and gradients, a fraction of the memory).
    ``optimizer``: ``adamw``, ``galore`` (low-rank gradient projection, for large 2-D parameters such as
    ``--method full``) or ``lora-fa`` (LoRA's ``A`` frozen, only ``B`` trained); see :mod:`peftkit.optim`.
    """

    output: str
    lr: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup: float = 0.0
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int | None = None
    eval_each_epoch: bool = False
    save_every: int | None = None
    early_stopping_patience: int | None = None
    metric: str = "eval_loss"
    gradient_checkpointing: bool = False
    loraplus_ratio: float | None = None
    head_lr: float | None = None
    log_every: int = 10
    resume: bool = False
    progress: bool | None = None
    fsdp: bool = False
    chunked_loss: bool = True
    optimizer: str = "adamw"

    def validate(self) -> None:
        """Raise :class:`peftkit.ConfigError` naming the first bad option."""
        if not str(self.output):
            raise ConfigError("output: a directory is required")
        _positive("lr", self.lr, allow_zero=True)
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        _positive_int("grad_accum", self.grad_accum)
        _positive_int("log_every", self.log_every)
        for name in ("max_steps", "eval_every", "save_every", "early_stopping_patience"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        _positive("warmup", self.warmup, allow_zero=True)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        if self.max_grad_norm is not None:
            _positive("max_grad_norm", self.max_grad_norm)
        if self.loraplus_ratio is not None:
            _positive("loraplus_ratio", self.loraplus_ratio)
        if self.head_lr is not None:
            _positive("head_lr", self.head_lr)

        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: unknown value {self.schedule!r}{did_you_mean(self.schedule, SCHEDULES)}; "
                              f"choose one of {', '.join(SCHEDULES)}")
        if self.fsdp and (self.save_every or self.resume):
            raise ConfigError("fsdp: checkpoints (save_every / resume) are not supported with FSDP yet; "
                              "drop them (the final adapter is still saved) or train without fsdp")
        from ..optim import check_optimizer

        check_optimizer(self.optimizer)
        if not self.metric:
            raise ConfigError("metric: a metric name such as 'eval_loss' is required")

    @property
    def lower_is_better(self) -> bool:
        m = self.metric.lower()
        return "loss" in m or "perplexity" in m

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a plain dict; an unknown key raises ConfigError naming the closest option."""
        names = [f.name for f in fields(cls)]
        for k in data:
            if k not in names:
                raise ConfigError(f"unknown training option {k!r}{did_you_mean(k, names)}")
        cfg = cls(**data)
        cfg.validate()
        return cfg


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        need = "a number >= 0" if allow_zero else "a number > 0"
        raise ConfigError(f"{name}: expected {need}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: expected an integer >= 1, got {value!r}")
