"""Training adapters: :func:`train` with a :class:`TrainConfig` (AdamW, schedules, accumulation, checkpoints, DDP).

    from peftkit.train import TrainConfig, train
    metrics = train(model, TrainConfig(output="runs/x", lr=1e-3, max_steps=100), examples, collate=my_collate)
"""

from .checkpoint import load_extra
from .config import TrainConfig
from .loop import default_evaluate, train
from .schedule import lr_multiplier, make_scheduler, warmup_steps

__all__ = ["TrainConfig", "default_evaluate", "load_extra", "lr_multiplier", "make_scheduler", "train", "warmup_steps"]
