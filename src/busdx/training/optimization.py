"""What updates the weights during training: Adam, the learning-rate schedule, the fp16 loss
scaler and the optional moving average of the weights (``train.ema_epochs``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from busdx.config import Config

__all__ = ["Optimization", "average_weights", "build_optimizer"]


@dataclass
class Optimization:
    """Optimizer, learning-rate schedule, (fp16 only) loss scaler and (``train.ema_epochs``)
    the exponential moving average of the weights, of one run."""

    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    ema: AveragedModel | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict()}
        state |= {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}
        return state | ({"ema": self.ema.state_dict()} if self.ema is not None else {})


def build_optimizer(config: Config, model: nn.Module, device: torch.device) -> Optimization:
    """Adam over the trainable parameters (a mask decoder's at ``train.decoder_lr_scale``
    times the learning rate), a constant or cosine schedule, and a loss scaler for fp16."""
    decoder = getattr(getattr(model, "module", model), "mask_decoder", None)
    scaled = decoder is not None and config.train.decoder_lr_scale != 1.0
    own = {id(p) for p in decoder.parameters()} if scaled else set()  # one group otherwise
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in own]}]
    if own:
        lr = config.train.lr * config.train.decoder_lr_scale
        groups.append({"params": [p for p in trainable if id(p) in own], "lr": lr})
    optimizer = torch.optim.Adam(groups, lr=config.train.lr, weight_decay=config.train.weight_decay)
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.train.epochs)
        if config.train.schedule == "cosine"
        else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    )
    scaler = torch.amp.GradScaler(device.type) if config.train.precision == "fp16" else None
    return Optimization(optimizer, schedule, scaler)


def average_weights(
    model: nn.Module, optimization: Optimization, epochs: float, steps_per_epoch: int
) -> AveragedModel:
    """An exponential moving average of ``model``'s weights and BatchNorm statistics, updated
    after every optimizer step with decay ``1 - 1 / (epochs * steps_per_epoch)`` (so it
    averages over about ``epochs`` epochs; as timm's ModelEma). Validation and ``model.pt``
    then use the average, which is smoother than the last step's weights."""
    decay = 1 - 1 / max(1.0, epochs * steps_per_epoch)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.eval()
    optimization.optimizer.register_step_post_hook(lambda *_: ema.update_parameters(model))
    optimization.ema = ema
    return ema
