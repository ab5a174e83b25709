"""Joint training (``maml.method: joint``): one model trained on every task at once, no inner loop.

The standard ablation that tells whether MAML's inner loop does anything: ordinary multi-task
training on the support and query slices of the meta-batch, evaluated with the same inner loop
as plain MAML (:mod:`metafx.engines.maml`), so "after adaptation" means the same thing for both.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from metafx.config import MAMLConfig
from metafx.engines.base import NonFiniteLossError, device_dtype, episode_tensors
from metafx.engines.maml import MAMLEngine
from metafx.metrics import crop_like, l1, make_loss


class JointEngine(MAMLEngine):
    """Plain MAML's learner and adaptation; training is supervised on all slices of the meta-batch."""

    def meta_step(self, learner: nn.Module, episodes: Sequence[Any], cfg: MAMLConfig,
                  optimizer: torch.optim.Optimizer, step: int, *, with_stats: bool = True) -> dict[str, float]:
        if not episodes:
            raise ValueError("meta_step: empty meta-batch")
        device, dtype = device_dtype(learner)
        tensors = [episode_tensors(e, device, dtype) for e in episodes]  # [sx, sy, qx, qy] per episode
        xs = torch.cat([torch.cat([t[0], t[2]]) for t in tensors])  # (B*(Ks+Kq), 1, L)
        ys = torch.cat([torch.cat([t[1], t[3]]) for t in tensors])
        pred = learner(xs)
        loss = make_loss(cfg.outer_loss)(pred, crop_like(ys, pred))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss at meta-step {step} (tasks {[getattr(e, 'task', '?') for e in episodes]}); "
                "lower maml.outer_lr or set maml.grad_clip")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(learner.parameters(), cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            # Support and query L1 of the same forward pass (no adaptation: pre == post).
            n_s = [t[0].shape[0] for t in tensors]
            parts = pred.split([k + t[2].shape[0] for k, t in zip(n_s, tensors)])  # per episode
            sup = torch.cat([p[:k] for p, k in zip(parts, n_s)])
            qry = torch.cat([p[k:] for p, k in zip(parts, n_s)])
            s_l1 = float(l1(sup, torch.cat([t[1] for t in tensors])))
            q_l1 = float(l1(qry, torch.cat([t[3] for t in tensors])))
        return {"support_l1_pre": s_l1, "support_l1_post": s_l1, "query_l1_post": q_l1,
                "outer_loss": loss.detach().item(), "grad_norm": float("nan"),
                "lr": float(optimizer.param_groups[0]["lr"])}


ENGINE = JointEngine()

__all__ = ["ENGINE", "JointEngine"]
