"""Lightning module: losses, augmentation, optimisation and validation metrics around `GHISTNetwork`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, Timer

from .._stats import validation_score
from ._losses import ghist_losses, spot_sums
from ._network import GHISTNetwork, dihedral_view
from ._spec import TrainingSpec
from ._stain import hed_jitter
from ._uncertainty import head_param_groups, uncertainty_loss


class TrainingDivergedError(ValueError, FloatingPointError):
    """Training stopped at a non-finite loss or with non-finite weights (e.g. too high a learning rate)."""


def check_finite_weights(network: torch.nn.Module, lr: float) -> None:
    """Refuse to hand back a network whose weights hold NaN or infinities (it would predict them)."""
    bad = [
        name for name, value in network.state_dict().items() if value.is_floating_point() and not value.isfinite().all()
    ]
    if bad:
        raise TrainingDivergedError(
            f"Training diverged: the weights {bad[:3]} hold NaN or infinite values. Lower the learning rate "
            f"(`lr={lr:g}`, e.g. `lr={lr / 10:g}`)."
        )


def augment_batch(
    batch: dict[str, Any],
    generator: torch.Generator,
    color_jitter: float = 0.0,
    *,
    stain_jitter: float = 0.0,
    standardisation: tuple[Sequence[float], Sequence[float]] | None = None,
) -> dict[str, Any]:
    """Random flips and 90 degree rotations, drawn per tile and applied to image and labels alike.

    With ``stain_jitter`` > 0, each tile's haematoxylin, eosin and DAB concentrations are rescaled and shifted
    (:func:`~ghist._model._stain.hed_jitter`; needs the images' ``standardisation``, ``(mean, std)``). With
    ``color_jitter`` > 0, each tile's standardised channels are also scaled by ``1 + a`` and shifted by ``b`` (``a``,
    ``b`` uniform in ``[-color_jitter, color_jitter]``, per tile and channel). Both stand for stain and scanner
    differences between slides that the network should not learn.
    """
    images, labels = batch["image"], batch["labels"]
    out_images, out_labels = [], []
    draws = torch.randint(0, 8, (images.shape[0],), generator=generator).tolist()
    for image, label, draw in zip(images, labels, draws, strict=True):
        k, flip = draw % 4, draw >= 4
        out_images.append(dihedral_view(image, k, flip))
        out_labels.append(dihedral_view(label, k, flip))
    images = torch.stack(out_images)
    if stain_jitter > 0:
        if standardisation is None:
            raise ValueError("`stain_jitter` needs the images' standardisation (mean, std).")
        images = hed_jitter(images, *standardisation, stain_jitter, generator)
    if color_jitter > 0:
        draws = torch.rand((2, images.shape[0], images.shape[1], 1, 1), generator=generator)
        gain, shift = (draws * 2 - 1) * color_jitter
        images = images * (1 + gain.to(images)) + shift.to(images)
    return {**batch, "image": images, "labels": torch.stack(out_labels)}


def spot_pairs(
    expr_pred_scaled: torch.Tensor, cell_spot: torch.Tensor, spot_expr: torch.Tensor, expr_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """``log1p`` of each spot's summed predicted counts and of its target, for spots that hold a cell.

    The same comparison as :func:`ghist._model._losses.spot_loss` (both through
    :func:`~ghist._model._losses.spot_sums`), kept as arrays for the validation Pearson.
    """
    sums, keep = spot_sums(expr_pred_scaled, cell_spot, spot_expr, expr_scale)
    pred = torch.log1p(sums[keep]).cpu().numpy()
    true = torch.log1p(spot_expr[keep].float().clamp(min=0)).cpu().numpy()
    return pred, true


class GHISTModule(L.LightningModule):
    """Trains a :class:`GHISTNetwork`: AdamW with a linear decay to 0 over the training budget.

    The budget is whichever of the trainer's ``max_steps``, ``max_epochs`` and ``max_time`` ends first (the
    largest fraction used), so a time-limited run still ends with a fully decayed learning rate; on resume the
    steps and time already used count.
    """

    def __init__(
        self,
        network: GHISTNetwork,
        training: TrainingSpec | None = None,
        *,
        expr_scale: float,
        standardisation: tuple[Sequence[float], Sequence[float]] | None = None,
        uncertainty: torch.nn.Module | None = None,
        **settings: Any,
    ):
        super().__init__()
        # `settings`: fields of the TrainingSpec replacing those of `training` (e.g. `lr=1e-2`)
        training = TrainingSpec.build(**settings) if training is None else training.replace(**settings)
        self.training_spec = training
        self.network = network
        self.loss_weights = dict(training.loss_weights)
        # The variance head (`_uncertainty.py`): trained beside the network on detached inputs, never through it.
        self.uncertainty = uncertainty
        self.expr_scale = expr_scale
        self.lr = training.lr
        self.weight_decay = training.weight_decay
        self.augment = training.augment
        self.color_jitter = training.color_jitter
        self.stain_jitter = training.stain_jitter
        self.standardisation = standardisation
        self.seed = training.seed
        self._generator = torch.Generator().manual_seed(training.seed)
        self._val_outputs: list[dict[str, np.ndarray]] = []

    # The augmentation generator must survive checkpoint/resume for a resumed run to match an uninterrupted one.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ghist_generator_state"] = self._generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "ghist_generator_state" in checkpoint:
            self._generator.set_state(checkpoint["ghist_generator_state"])

    def _prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        expr = batch["expr"] * self.expr_scale
        image = batch["image"].contiguous(memory_format=torch.channels_last)
        return {**batch, "expr": expr, "image": image}

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.network(batch["image"], batch["labels"], batch["cell_batch"], int(batch["n_cells"]))
        return ghist_losses(out, batch, self.network, weights=self.loss_weights, expr_scale=self.expr_scale), out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.augment:
            batch = augment_batch(
                batch,
                self._generator,
                self.color_jitter,
                stain_jitter=self.stain_jitter,
                standardisation=self.standardisation,
            )
        batch = self._prepare(batch)
        losses, out = self._losses(batch)
        bs = batch["image"].shape[0]
        nll = None if self.uncertainty is None else uncertainty_loss(self.uncertainty, out, batch, self.expr_scale)
        if nll is not None:
            self.log(
                "train/uncertainty_nll", nll, batch_size=bs, on_step=False, on_epoch=True, sync_dist=self._distributed
            )
        self.log(
            "train_loss",
            losses["total"],
            prog_bar=True,
            batch_size=bs,
            on_step=True,
            on_epoch=True,
            sync_dist=self._distributed,
        )
        for name, value in losses.items():
            if name != "total":
                self.log(
                    f"train/{name}", value, batch_size=bs, on_step=False, on_epoch=True, sync_dist=self._distributed
                )
        # Not part of the logged `train_loss`: that stays the network's loss (it picks the best epoch without val).
        total = losses["total"] if nll is None else losses["total"] + nll
        # At the first non-finite loss, not after the budget: the weights are lost from here on.
        if not bool(torch.isfinite(total.detach())):
            terms = {**losses, **({} if nll is None else {"uncertainty_nll": nll})}
            raise TrainingDivergedError(self._diverged_message(terms))
        return total

    def _diverged_message(self, terms: Mapping[str, torch.Tensor]) -> str:
        bad = [name for name, value in terms.items() if name != "total" and not bool(torch.isfinite(value.detach()))]
        step = self._trainer.global_step if self._trainer is not None else "?"
        return (
            f"Training diverged at optimisation step {step}: the loss is not finite (terms {bad or ['total']}). "
            f"Lower the learning rate (`lr={self.lr:g}`, e.g. `lr={self.lr / 10:g}`), or the weights of those terms "
            "(`loss_weights`); check that the tiles' expression is finite."
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        batch = self._prepare(batch)
        losses, out = self._losses(batch)
        self.log(
            "val_loss", losses["total"], prog_bar=True, batch_size=batch["image"].shape[0], sync_dist=self._distributed
        )
        record = {
            "expr_pred": out["expr"].float().cpu().numpy(),
            "expr_true": batch["expr"].float().cpu().numpy(),
            "type_true": batch["cell_type"].cpu().numpy(),
        }
        if out.get("cell_logits") is not None:
            record["type_pred"] = out["cell_logits"].argmax(-1).cpu().numpy()
        if batch.get("spot_expr") is not None:
            record["spot_pred"], record["spot_true"] = spot_pairs(
                out["expr"], batch["cell_spot"], batch["spot_expr"], self.expr_scale
            )
        self._val_outputs.append(record)

    @property
    def _distributed(self) -> bool:
        trainer = self._trainer
        return trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized()

    def on_validation_epoch_end(self) -> None:
        outputs, self._val_outputs = self._val_outputs, []
        merged = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]} if outputs else None
        if self._distributed:
            # Each process validated its share of the tiles: score all of them together, the same on every process
            # (a Pearson or F1 of per-process scores would not be the score of the whole validation band).
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, merged)
            parts = [g for g in gathered if g]
            merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else None
        if merged is None:
            return
        # Spot-level supervision: the expression score is on the spots (summed cells vs measured spots).
        level = "spot" if "spot_pred" in merged else "expr"
        scores = validation_score(
            merged[f"{level}_pred"],
            merged[f"{level}_true"],
            merged.get("type_pred"),
            merged["type_true"],
            self.network.n_types,
        )
        for name, value in scores.items():
            self.log(f"val_{name}", value, prog_bar=name == "score")

    def configure_optimizers(self):
        # A frozen pretrained encoder's parameters (requires_grad False) stay out of the optimiser.
        params: Any = [p for p in self.network.parameters() if p.requires_grad]
        if self.uncertainty is not None:
            # Its own group, after the network's: the network's updates are what they were without the head.
            params = [{"params": params}, *head_param_groups(self.uncertainty, self.lr)]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: self._remaining_budget())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _remaining_budget(self) -> float:
        trainer = self._trainer
        if trainer is None:
            return 1.0
        used = 0.0
        total_steps = trainer.estimated_stepping_batches
        if total_steps and math.isfinite(total_steps) and total_steps > 0:
            used = trainer.global_step / total_steps
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if timer is not None and timer._duration:
            used = max(used, timer.time_elapsed("train") / timer._duration)
        return max(0.0, 1.0 - used)


class EpochHistory(Callback):
    """Collects the logged metrics of every epoch into a DataFrame (``GHISTModel.history_``).

    The rows are part of every checkpoint (plain floats), so that a resumed run's history starts at epoch 0.
    """

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        row = {"epoch": float(trainer.current_epoch), "step": float(trainer.global_step)}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        self.rows.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(row) for row in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(row) for row in state_dict.get("rows", [])]

    def frame(self) -> pd.DataFrame:
        """The metrics, one row per epoch."""
        return pd.DataFrame(self.rows)
