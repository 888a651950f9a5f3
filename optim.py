"""
The optimizers and the learning-rate schedule of a training run (train.py's and sft.py's): AdamW,
or Muon on the blocks' matrices with AdamW on the rest; linear warm-up, then cosine or wsd.
"""

import math

import torch

from model import BLOCK_MATRICES


def get_lr(step, cfg):
    """Linear warm-up (step 0 already has lr > 0), then
    cosine: a cosine decay to min_lr at max_steps;
    wsd:    max_lr until the last decay_frac of the steps, then a linear decay whose last step
            (max_steps - 1) runs at min_lr."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, cfg.max_steps - round(cfg.decay_frac * cfg.max_steps))
        if step < decay_start:
            return cfg.max_lr
        return cfg.max_lr - (cfg.max_lr - cfg.min_lr) * (step - decay_start + 1) / (cfg.max_steps - decay_start)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - cfg.min_lr)


EMBEDDINGS = ("transformer.wte.weight", "transformer.wpe.weight")


def param_groups(model, cfg):
    """Parameter names by optimizer group: {"muon": [...], "decay": [...], "no_decay": [...]}.
    muon: the 2-D matrices inside the blocks (under --optimizer muon); decay: AdamW with weight
    decay (the other 2-D tensors: the embeddings, one of them also the lm_head); no_decay:
    biases and LayerNorm (and the embeddings under --no-decay_embeddings)."""
    groups = {"muon": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.optimizer == "muon" and name.endswith(BLOCK_MATRICES) and p.dim() == 2:
            groups["muon"].append(name)
        elif p.dim() >= 2 and (cfg.decay_embeddings or name not in EMBEDDINGS):
            groups["decay"].append(name)
        else:
            groups["no_decay"].append(name)
    return groups


def build_optimizers(model, cfg, device_type):
    """[AdamW] or [AdamW, Muon], each group at its peak learning rate (the schedule scales them alike)."""
    named = dict(model.named_parameters())
    groups = param_groups(model, cfg)
    adamw_groups = [{"params": [named[n] for n in groups["decay"]], "weight_decay": cfg.weight_decay},
                    {"params": [named[n] for n in groups["no_decay"]], "weight_decay": 0.0}]
    kw = dict(lr=cfg.max_lr, betas=(0.9, 0.95), eps=1e-8)
    try:  # the fused kernel, where this PyTorch has one for the device
        optimizers = [torch.optim.AdamW(adamw_groups, fused=device_type in ("cuda", "cpu", "mps", "xpu"), **kw)]
    except (RuntimeError, TypeError):
        optimizers = [torch.optim.AdamW(adamw_groups, **kw)]
    if groups["muon"]:
        # match_rms_adamw: the update's RMS is AdamW's, so AdamW-scale learning rates and decay carry over
        optimizers.append(torch.optim.Muon([named[n] for n in groups["muon"]], lr=cfg.muon_lr,
                                           momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay,
                                           nesterov=True, adjust_lr_fn="match_rms_adamw"))
    return optimizers


def set_lr(optimizers, base_lrs, factor):
    for opt, lrs in zip(optimizers, base_lrs):
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr * factor
