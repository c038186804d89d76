"""The LightningModule: loss, Keras-style L2, optimizer from config, metrics. The Trainer does the rest."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from fcexp.net import OUTPUT_ACTIVATIONS, build_mlp, check_hidden, check_per_layer, l2_penalty, linear_layers, per_layer

# Lightning sets this at import so CUDA stays uninitialized across forks; but then every optimizer step
# re-probes NVML (a dlopen, ~0.3 ms a step on a machine without a GPU). fcexp's DDP launches
# subprocesses instead of forking, so torch's cached CUDA check is safe.
os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def class_indices(y: torch.Tensor) -> torch.Tensor:
    """Targets arrive one-hot (the seed) or as class indices; metrics want indices."""
    return y.argmax(dim=1) if y.ndim == 2 else y


def check_optimizer(factory: OptimizerFactory) -> None:
    """Refuse bad optimizer settings now, with the optimizer's own reason, not when training starts."""
    settings = getattr(factory, "keywords", {})
    if "lr" in settings and not (isinstance(settings["lr"], (int, float)) and settings["lr"] > 0):
        raise ValueError(f"optimizer.lr must be > 0, got {settings['lr']!r}")
    try:
        factory([torch.zeros(1, requires_grad=True)])
    except (ValueError, TypeError, RuntimeError) as err:
        name = getattr(getattr(factory, "func", factory), "__name__", "optimizer")
        raise ValueError(f"optimizer {name} refuses {dict(settings)}: {err}") from None


class Classifier(L.LightningModule):
    """A fully connected classifier trained with cross-entropy on logits; softmax where probabilities are reported."""

    def __init__(
        self,
        hidden: Sequence[int] = (512, 512),
        activation: str | Mapping[str, Any] = "relu",
        dropout: float | Sequence[float] = 0.0,
        batch_norm: bool | Sequence[bool] = False,
        l2: float | Sequence[float] = 0.0,
        init: str = "torch",
        label_smoothing: float = 0.0,
        in_features: int = 784,
        num_classes: int = 10,
        optimizer: OptimizerFactory | None = None,
        compile: bool = False,
    ):
        super().__init__()
        # The optimizer is a factory (Hydra's _partial_), not a hyperparameter a checkpoint can hold.
        self.save_hyperparameters(ignore=["optimizer"], logger=False)
        knobs = {"model.dropout": (dropout, float), "model.batch_norm": (batch_norm, bool), "model.l2": (l2, float)}
        check_per_layer(len(check_hidden(hidden)), knobs)
        self.net = build_mlp(in_features, hidden, num_classes, activation, dropout, batch_norm, init)
        # One image: the model summary shows each layer's shapes and the FLOPs of one forward pass.
        self.example_input_array = torch.zeros(1, in_features)
        if compile:
            # In place: the parameters keep their names, so checkpoints load with or without it.
            self.net.compile()
        for lam in per_layer("model.l2", l2, len(linear_layers(self.net)) - 1):
            if lam < 0:
                raise ValueError(f"model.l2 must be >= 0, got {lam}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")
        if optimizer is not None:
            check_optimizer(optimizer)
        self.optimizer = optimizer
        self.output_activation = OUTPUT_ACTIVATIONS["multiclass"]
        # validate_args=False: the per-step input checks cost more than the update itself.
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_classes, average="micro", validate_args=False) for _ in range(3)
        )
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # in checkpoints: a resumed run remembers its best epoch so far

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # cross_entropy takes one-hot probabilities and class indices alike, with identical results.
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        loss = self.loss(logits, y)
        l2 = l2_penalty(self.net, self.hparams.l2)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}): training diverged; "
                "try a lower optimizer.lr"
            )
        self.train_loss.update(loss.detach(), weight=len(x))
        self.train_acc.update(logits.detach(), class_indices(y))
        # Step curves go straight to the loggers every log_every_n_steps: self.log on every step
        # costs about a millisecond of bookkeeping, a tenth of the step itself on a CPU.
        if self.global_step % self.trainer.log_every_n_steps == 0:
            step_metrics = {"train/loss_step": loss.item(), "train/l2": l2.item()}
            for logger in self.loggers:
                logger.log_metrics(step_metrics, step=self.global_step)
        return loss + l2

    def on_train_epoch_end(self) -> None:
        self.log_dict({"train/loss": self.train_loss, "train/acc": self.train_acc})

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss, self.val_acc)

    def on_validation_epoch_end(self) -> None:
        self.log_dict({"val/loss": self.val_loss, "val/acc": self.val_acc}, prog_bar=True)
        if not self.trainer.sanity_checking:
            self.val_acc_best(self.val_acc.compute())
            # Every rank holds the same synced value; sync_dist only silences Lightning's DDP warning.
            self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss, self.test_acc)

    def on_test_epoch_end(self) -> None:
        self.log_dict({"test/loss": self.test_loss, "test/acc": self.test_acc})

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], loss: MeanMetric, acc: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self.net(x)
        loss.update(self.loss(logits, y), weight=len(x))
        acc.update(logits, class_indices(y))

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Class probabilities: the seed's output-activation rule (softmax for several classes)."""
        return self.output_activation(self.net(batch[0]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            raise ValueError("Classifier needs an optimizer factory to train (Hydra passes `optimizer` with _partial_)")
        return self.optimizer(self.parameters())
