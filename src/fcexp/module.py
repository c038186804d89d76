"""The LightningModule: loss, Keras-style L2, optimizer from config, metrics. The Trainer does the rest.

One module trains one net or a pack of them (`members`): nets of one shape that differ in their activation,
dropout, batch norm, L2, init, label smoothing, seed and optimizer settings, trained as one vectorized model
(fcexp.net.PackedMLP). A single net is a pack of one: every feature has one implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torchmetrics import Metric

from fcexp.net import OUTPUT_ACTIVATIONS, PackedMLP, check_hidden, check_per_layer, per_layer
from fcexp.record import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_KEY

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]

# A checkpoint's list of each member's dropout generator state (fcexp.net.DropoutStreams).
DROPOUT_STREAMS = "dropout_streams"

# What members of a pack may differ in; everything else of the model they share.
MEMBER_KNOBS = ("activation", "dropout", "batch_norm", "l2", "init", "label_smoothing", "seed")


def class_indices(y: torch.Tensor) -> torch.Tensor:
    """Targets arrive one-hot (the seed) or as class indices; metrics want indices."""
    return y.argmax(dim=-1) if y.is_floating_point() else y


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


def optimizer_settings(factory: OptimizerFactory | None) -> tuple:
    """What makes two optimizer factories the same: their class and keyword arguments."""
    return (getattr(factory, "func", factory), sorted(getattr(factory, "keywords", {}).items()))


class PerMember(Metric):
    """The mean over an epoch's examples of a value measured per member: one entry per member. Updates never
    wait for the device."""

    full_state_update = False

    def __init__(self, members: int):
        super().__init__()
        self.add_state("total", torch.zeros(members, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, examples: int) -> None:
        self.total += value.detach() * examples
        self.count += examples

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()


class Classifier(L.LightningModule):
    """Fully connected classifiers trained with cross-entropy on logits; softmax where probabilities are reported.

    The arguments describe one net. `members`, a list of mappings of MEMBER_KNOBS plus `optimizer`, makes a pack
    of several nets that take the other arguments from here and each of those knobs from its own mapping.
    """

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
        seed: int | None = None,
        members: Sequence[Mapping[str, Any]] = (),
    ):
        super().__init__()
        # The optimizer is a factory (Hydra's _partial_), not a hyperparameter a checkpoint can hold.
        self.save_hyperparameters(ignore=["optimizer", "members"], logger=False)
        own = {"activation": activation, "dropout": dropout, "batch_norm": batch_norm, "l2": l2, "init": init}
        own |= {"label_smoothing": label_smoothing, "seed": seed, "optimizer": optimizer}
        specs = [own | dict(m) for m in members] or [own]
        if members:
            self.hparams["members"] = [{k: m[k] for k in MEMBER_KNOBS} for m in specs]
        depth = len(check_hidden(hidden))
        for m in specs:
            knobs = {"model.dropout": (m["dropout"], float), "model.batch_norm": (m["batch_norm"], bool)}
            check_per_layer(depth, knobs | {"model.l2": (m["l2"], float)})
            for lam in per_layer("model.l2", m["l2"], depth):
                if lam < 0:
                    raise ValueError(f"model.l2 must be >= 0, got {lam}")
            if not 0.0 <= m["label_smoothing"] < 1.0:
                raise ValueError(f"model.label_smoothing must be in [0, 1), got {m['label_smoothing']}")
            if m["optimizer"] is not None:
                check_optimizer(m["optimizer"])
        if len({optimizer_settings(m["optimizer"])[0] for m in specs}) > 1:
            raise ValueError("the members of a pack share their optimizer's type; only its settings may differ")
        self.net = PackedMLP(in_features, hidden, num_classes, specs)
        self.members = len(specs)
        self.factories = [m["optimizer"] for m in specs]
        # Runs of members with the same optimizer settings share a parameter group (configure_optimizers).
        self.ranges: list[tuple[int, int]] = []
        for i, factory in enumerate(self.factories):
            if self.ranges and optimizer_settings(self.factories[self.ranges[-1][0]]) == optimizer_settings(factory):
                self.ranges[-1] = (self.ranges[-1][0], i + 1)
            else:
                self.ranges.append((i, i + 1))
        l2 = [per_layer("l2", m["l2"], depth) for m in specs]
        self.register_buffer("l2", torch.tensor(l2), persistent=False)
        self.l2_layers = [k for k in range(depth) if any(lam[k] for lam in l2)]
        smoothing = torch.tensor([float(m["label_smoothing"]) for m in specs]).view(-1, 1)
        self.register_buffer("smoothing", smoothing, persistent=False)
        # One image: the model summary shows each layer's shapes and the FLOPs of one forward pass.
        self.example_input_array = torch.zeros(1, in_features)
        if compile:
            # A cache of its own: in a sweep, earlier jobs' graphs counted against torch's recompile limit (8), past
            # which later jobs ran uncompiled without a word.
            torch.compiler.reset()
            # In place: the parameters keep their names, so checkpoints load with or without it.
            self.net.compile()
        self.output_activation = OUTPUT_ACTIVATIONS["multiclass"]
        self.metrics = torch.nn.ModuleDict(
            {
                f"{stage}_{name}": PerMember(self.members)
                for stage in ("train", "val", "test")
                for name in ("loss", "acc")
            }
        )
        for name in ("train_loss", "train_acc"):  # in checkpoints: a run resumed mid-epoch keeps the epoch's sums
            self.metrics[name].persistent(True)
        # In checkpoints: a resumed run remembers its best epoch so far.
        self.register_buffer("best_val_acc", torch.zeros(self.members))
        # Training on: a member whose loss stopped being finite is taken out of the pack (fcexp.train records it).
        self.register_buffer("alive", torch.ones(self.members, dtype=torch.bool), persistent=False)
        self.alive_host = [True] * self.members  # the same, known on the host
        self.all_alive = True
        # The step at which each member's loss first stopped being finite (-1: never), kept on the device so that
        # no step waits for it; read on logging steps. Not a buffer: DDP would overwrite each rank's with rank 0's
        # at every forward, and a NaN on another rank would go unseen.
        self.diverged_at = torch.full((self.members,), -1)
        self.member_metrics: list[dict[str, float]] = [{} for _ in range(self.members)]  # each one's latest epoch
        self.runs: list = []  # the pack's runs (fcexp.pack.Member), set by fcexp.train: where each member's numbers go
        self.test_probs: tuple[torch.Tensor, torch.Tensor] | None = None
        # A test of a checkpoint's nets (a race's stopped runs, fcexp.train): that checkpoint's step, which
        # Lightning's test does not restore (its global_step is then 0).
        self.checkpoint_step: int | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_FORMAT_KEY] = CHECKPOINT_FORMAT  # what fcexp.record.read_checkpoint checks
        checkpoint[DROPOUT_STREAMS] = self.net.dropout.states()  # a resumed run draws the masks it would have

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.net.dropout.load(checkpoint.get(DROPOUT_STREAMS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: (batch, classes) for a single net, (members, batch, classes) for a pack."""
        logits = self.net(x)
        return logits[0] if self.members == 1 and x.dim() == 2 else logits

    def losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each member's mean cross-entropy over the batch, with its label smoothing: (members,).

        Targets are one-hot probabilities or class indices, the same for every member (batch, ...) or per member
        (members, batch, ...); the loss is the same either way, as in F.cross_entropy."""
        logp = logits.float().log_softmax(-1)
        if y.is_floating_point():
            nll = -(y * logp).sum(-1)
        else:
            nll = -logp.gather(-1, y.expand(*logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        return ((1 - self.smoothing) * nll - self.smoothing * logp.mean(-1)).mean(-1)

    def accuracies(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(-1) == class_indices(y)).float().mean(-1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        losses = self.losses(logits, y)
        if self.diverged_at.device != losses.device:  # once: it follows the module to its device
            self.diverged_at = self.diverged_at.to(losses.device)
        self.diverged_at = torch.where(
            ~torch.isfinite(losses) & (self.diverged_at < 0), self.global_step, self.diverged_at
        )
        examples = x.shape[-2]
        if batch_idx == 0:  # an epoch's first batch; a run resumed mid-epoch continues its sums
            for name in ("train_loss", "train_acc"):
                self.metrics[name].reset()
        self.metrics["train_loss"].update(losses, examples)
        self.metrics["train_acc"].update(self.accuracies(logits.detach(), y), examples)
        # Step curves go straight to each member's logger every log_every_n_steps: self.log on every step costs
        # about a millisecond of bookkeeping, and reading a value makes the host wait for the device.
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.check_finite()
            with torch.no_grad():
                self.log_members({"train/loss_step": losses.detach(), "train/l2": self.l2_penalties()})
        if self.l2_in_loss():
            losses = losses + self.l2_penalties()
        # A member out of the pack contributes nothing: no gradient, no update (its numbers may be NaN).
        return torch.where(self.alive, losses, 0).sum()

    def l2_penalties(self) -> torch.Tensor:
        """Each member's L2 penalty (members,)."""
        return self.net.l2_penalty(self.l2, self.l2_layers)

    def l2_in_loss(self) -> bool:
        """Whether the L2 penalty goes into the loss for autograd. Otherwise (the rule) its gradient, 2λw, is added
        to the weights' gradients after the backward pass (on_after_backward): the same step without squaring
        every weight each step. fp16's loss scaling (16-mixed) has scaled gradients there, so it takes the loss."""
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def on_after_backward(self) -> None:
        if self.l2_layers and not self.l2_in_loss():
            # Lightning divides each micro-batch's loss by the accumulation: so is the penalty's gradient.
            self.add_l2_gradients(2 / self.trainer.accumulate_grad_batches)
        if not self.all_alive:  # a member out of the pack: its gradients (NaN through its loss) become zeros
            for p in self.parameters():
                if p.grad is not None:
                    p.grad = torch.where(self.alive.view(-1, *[1] * (p.dim() - 1)), p.grad, 0)

    def add_l2_gradients(self, share: float = 2.0) -> None:
        """Add share·λ·w to each L2-penalized weight's gradient: with the default 2, the gradient of λ‖w‖²."""
        with torch.no_grad():
            for k in self.l2_layers:
                w = self.net.weights[k]
                w.grad.addcmul_(w, self.l2[:, k].view(-1, 1, 1), value=share)

    def check_finite(self) -> None:
        """Take out of the pack every member whose loss stopped being finite; when none is left, stop the run."""
        # Under DDP every rank takes the first step at which any rank diverged, so all stop at the same step.
        never = torch.iinfo(self.diverged_at.dtype).max
        pending = torch.where(self.diverged_at < 0, never, self.diverged_at)
        first = self.trainer.strategy.reduce(pending, reduce_op="min")
        self.diverged_at = torch.where(first == never, -1, first)
        diverged = (self.diverged_at >= 0) & self.alive
        if not diverged.any():
            return
        self.alive &= ~diverged
        self.all_alive = False
        for i in diverged.nonzero().flatten().tolist():
            self.alive_host[i] = False
            step = int(self.diverged_at[i])
            epoch = step // max(1, self.trainer.num_training_batches)
            error = FloatingPointError(
                f"loss is nan at step {step} (epoch {epoch}): training diverged; try a lower optimizer.lr"
            )
            if self.members == 1:
                raise error
            self.on_member_failed(i, error)
        if not self.alive.any():
            raise FloatingPointError("every member of the pack diverged")

    def on_member_failed(self, member: int, error: BaseException) -> None:
        """Set by fcexp.train: records the member as failed."""

    def log_members(self, metrics: Mapping[str, torch.Tensor], step: int | None = None) -> list[list[float]]:
        """Per-member values (members,) to each living member's own logger, at `step` (default: the global step),
        read from the device at once; returns them as read (one list per metric)."""
        values = torch.stack([v.detach().float() for v in metrics.values()]).tolist()  # one wait for the device
        # A pack of one in a plain Trainer (no fcexp.train around it) logs to the trainer's loggers.
        loggers = [[m.logger] if m.logger else [] for m in self.runs] or ([self.loggers] if self.members == 1 else [])
        step = self.global_step if step is None else step
        for i, member_loggers in enumerate(loggers):
            if self.alive_host[i]:
                for logger in member_loggers:
                    logger.log_metrics({k: v[i] for k, v in zip(metrics, values, strict=True)}, step=step)
        return values

    @property
    def steps_trained(self) -> int:
        """The optimizer steps the nets have taken, where their numbers and figures are logged."""
        return self.global_step if self.checkpoint_step is None else self.checkpoint_step

    def end_epoch(self, stage: str) -> None:
        """An epoch's per-member means: to each member's metrics and logger; their mean over the living members to
        the trainer's (what its progress display shows; a pack of one shows its own)."""
        # reshape: torchmetrics returns a pack of one's single value as a scalar.
        values = {f"{stage}/{m}": self.metrics[f"{stage}_{m}"].compute().reshape(self.members) for m in ("loss", "acc")}
        for metric in ("loss", "acc"):
            self.metrics[f"{stage}_{metric}"].reset()
        if self.trainer.sanity_checking:  # Lightning's check that validation runs: nothing to record
            return
        if stage == "val":
            self.best_val_acc = torch.maximum(self.best_val_acc, values["val/acc"])
            values["val/acc_best"] = self.best_val_acc.clone()
        # At the epoch's last step, as Lightning logs epoch metrics: the next epoch's first step is a checkpoint's
        # step, from which a resumed run logs anew.
        epoch = torch.full((self.members,), float(self.current_epoch), device=self.best_val_acc.device)
        read = self.log_members(values | {"epoch": epoch}, step=max(0, self.steps_trained - 1))
        for i, metrics in enumerate(self.member_metrics):
            metrics.update({k: v[i] for k, v in zip(values, read, strict=False)})
        # Every rank holds the same synced values; sync_dist only silences Lightning's DDP warning.
        alive = self.alive if any(self.alive_host) else torch.ones_like(self.alive)
        self.log_dict({k: v[alive].mean() for k, v in values.items()}, prog_bar=stage == "val", sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:  # before the members' checkpoints are written at validation end
            self.check_finite()

    def on_train_epoch_end(self) -> None:
        self.check_finite()
        self.end_epoch("train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.end_epoch("val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        logits = self._evaluate(batch, "test")
        self.test_probs = (batch[0], self.output_activation(logits))  # what Figures draws, per member

    def on_test_epoch_end(self) -> None:
        self.end_epoch("test")

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        self.metrics[f"{stage}_loss"].update(self.losses(logits, y), x.shape[-2])
        self.metrics[f"{stage}_acc"].update(self.accuracies(logits, y), x.shape[-2])
        return logits

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Class probabilities: the seed's output-activation rule (softmax for several classes)."""
        return self.output_activation(self(batch[0]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if any(f is None for f in self.factories):
            raise ValueError("Classifier needs an optimizer factory to train (Hydra passes `optimizer` with _partial_)")
        # A pack whose members agree on the optimizer's settings holds its tensors whole, as a single net does.
        params = list(self.parameters())
        if len(self.ranges) == 1:
            return self.factories[0](params)
        # Views of each run of members: the optimizer updates them in place, in the pack's own tensors.
        self.views = [[torch.nn.Parameter(p.detach()[a:b]) for p in params] for a, b in self.ranges]
        groups = [
            {"params": views, **getattr(self.factories[a], "keywords", {})}
            for views, (a, _) in zip(self.views, self.ranges, strict=True)
        ]
        return self.factories[0](groups)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        if len(self.ranges) > 1:  # the pack's own tensors are not the optimizer's: their gradients go here
            for p in self.parameters():
                p.grad = None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if len(self.ranges) > 1:  # the views take this step's gradients of their members
            for views, (a, b) in zip(self.views, self.ranges, strict=True):
                for view, p in zip(views, self.parameters(), strict=True):
                    view.grad = None if p.grad is None else p.grad[a:b]
