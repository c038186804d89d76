"""Training diagnostics as Lightning callbacks: gradient norms, unit health, histograms and figures in TensorBoard.

Each is one entry of conf/callbacks/default.yaml; `~callbacks.<name>` switches one off, `callbacks=plain` all of them.
Scalars go straight to the loggers (not `self.log`), only when measured, so a run pays nothing between measurements.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from fcexp.module import class_indices
from fcexp.net import ACTIVATION_TYPES, PackedMLP, linear_layers

log = logging.getLogger("fcexp")
# Evenly spaced histogram bins: TensorBoard's default (~1,500 exponential edges) takes 10x longer on a 784x512 weight.
BINS = 64


def layer_tag(i: int) -> str:
    # Zero-padded so TensorBoard sorts layer10 after layer09, not after layer1.
    return f"layer{i + 1:02d}"


def measured_net(pl_module: L.LightningModule) -> nn.Module:
    """The net a diagnostic measures: a pack's member as fcexp.pack.MemberModule shows it to its callbacks, or a
    pack of one's only member when the module trains in a plain Trainer."""
    net = pl_module.net
    return net.member(0) if isinstance(net, PackedMLP) else net


def log_scalars(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def held_out_images(trainer: L.Trainer, size: int) -> torch.Tensor:
    """The first `size` validation images: the same examples at every measurement, so any change is the net's."""
    if trainer.datamodule is None:
        raise ValueError("the diagnostics read their held-out batch from a datamodule; pass one to trainer.fit")
    chunks, n = [], 0
    for x, _ in trainer.datamodule.val_dataloader():
        chunks.append(x)
        n += len(x)
        if n >= size:
            break
    return torch.cat(chunks)[:size]


def record_activations(net: nn.Module, x: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """(activation module, its input = the pre-activation, its output) for every hidden layer, in eval mode."""
    captured = []
    hooks = [
        m.register_forward_hook(lambda m, inputs, out: captured.append((m, inputs[0].detach(), out.detach())))
        for m in net.modules()
        if isinstance(m, ACTIVATION_TYPES)
    ]
    was_training = net.training
    net.eval()  # no dropout noise, BatchNorm on its running statistics: what validation sees
    try:
        with torch.no_grad():
            net(x)
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    return captured


def unit_stats(activation: nn.Module, pre: torch.Tensor, post: torch.Tensor, saturation: float) -> dict[str, float]:
    """Fractions of one layer's units (columns) over a batch (rows).

    dead: output exactly 0 for every example (a ReLU unit that no example switches on gets no gradient);
    inactive: pre-activation <= 0 for every example (what would be dead under ReLU; leaky ReLU still trains it);
    saturated: local derivative, averaged over the batch, below `saturation` (sigmoid's is at most 0.25, tanh's 1);
    sparsity: fraction of all outputs that are exactly 0.
    """
    x = pre.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        # The activations are elementwise, so the gradient of the sum is each element's own derivative.
        (derivative,) = torch.autograd.grad(activation(x).sum(), x)
    zero = post == 0
    return {
        "dead": zero.all(0).float().mean().item(),
        "inactive": (pre <= 0).all(0).float().mean().item(),
        "saturated": (derivative.mean(0) < saturation).float().mean().item(),
        "sparsity": zero.float().mean().item(),
    }


class EpochLine:
    """One line per epoch: its losses, accuracy and elapsed time. train.log holds it wherever stdout goes."""

    def __init__(self):
        self.started = 0.0
        self.first_epoch = self.printed = -1

    def start(self, trainer: L.Trainer) -> None:
        self.started = time.monotonic()
        self.first_epoch = trainer.current_epoch  # a resumed run prints only the epochs it trains

    def text(self, trainer: L.Trainer, epoch: int) -> str | None:
        """Epoch `epoch`'s line, once; None before it has its metrics or once it was given."""
        m = trainer.callback_metrics
        if epoch < max(self.first_epoch, self.printed + 1) or "val/acc" not in m:
            return None
        self.printed = epoch
        members = getattr(trainer.lightning_module, "members", 1)
        return (
            f"epoch {epoch + 1}/{trainer.max_epochs}{f' (means of a pack of {members})' if members > 1 else ''}: "
            f"train loss {m.get('train/loss', float('nan')):.4f}, val loss {m['val/loss']:.4f}, "
            f"val acc {m['val/acc']:.4f}, {time.monotonic() - self.started:.1f} s"
        )


def _to_log_files(text: str) -> None:
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class EpochLines(ProgressBar):
    """The progress display for a log file: one line per epoch (EpochLine), to stdout (unless not `console`) and
    train.log."""

    def __init__(self, console: bool = True):
        super().__init__()
        self.enabled, self.console = True, console
        self.line = EpochLine()

    def disable(self) -> None:  # Lightning disables the display on every rank but 0
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.line.start(trainer)

    # As in RunRecord: an epoch's train metrics are logged after its last hook, so it is printed when the next
    # one starts, and the last one when training ends.
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, trainer.current_epoch - 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, trainer.current_epoch - 1)

    def _print(self, trainer: L.Trainer, epoch: int) -> None:
        if self.enabled and (text := self.line.text(trainer, epoch)):
            log.info(text) if self.console else _to_log_files(text)


class TerminalBars(TQDMProgressBar):
    """tqdm's bars for a terminal, which show each epoch there; its line (EpochLine) goes to train.log only."""

    def __init__(self, refresh_rate: int):
        super().__init__(refresh_rate=refresh_rate)
        self.line = EpochLine()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.line.start(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._write(trainer, trainer.current_epoch - 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._write(trainer, trainer.current_epoch - 1)

    def _write(self, trainer: L.Trainer, epoch: int) -> None:
        if trainer.is_global_zero and (text := self.line.text(trainer, epoch)):
            _to_log_files(text)


def progress_bar(refresh_rate: int = 25) -> ProgressBar:
    """tqdm's bars on a terminal; when stdout goes to a file, one line per epoch instead of a bar's redraws. Either
    way train.log holds one line per epoch.

    `refresh_rate` is in steps; 0 turns the progress display off (the epoch lines still go to train.log).
    """
    if not isinstance(refresh_rate, int) or refresh_rate < 0:
        raise ValueError(f"callbacks.progress.refresh_rate must be an integer >= 0 (0: off), got {refresh_rate!r}")
    if sys.stdout.isatty():
        return TerminalBars(refresh_rate)
    return EpochLines(console=refresh_rate > 0)


class GradientNorms(L.Callback):
    """L2 norm of each Linear weight's gradient every `every_n_steps` (default: the trainer's log_every_n_steps).

    `grad_norm/first_over_last` is the first layer's norm over the output layer's: the vanishing-gradient signal.
    """

    def __init__(self, every_n_steps: int | None = None):
        if every_n_steps is not None and every_n_steps <= 0:
            raise ValueError(
                f"callbacks.grad_norms.every_n_steps must be a positive integer or null, got {every_n_steps}"
            )
        self.every_n_steps = every_n_steps

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if trainer.global_step % (self.every_n_steps or trainer.log_every_n_steps):
            return
        grads = [layer.weight.grad for layer in linear_layers(measured_net(pl_module))]
        if any(g is None for g in grads):
            return  # e.g. a frozen layer: no profile to report
        norms = torch.stack([g.norm() for g in grads]).tolist()  # one device sync, not one per layer
        metrics = {f"grad_norm/{layer_tag(i)}": v for i, v in enumerate(norms)}
        metrics["grad_norm/first_over_last"] = norms[0] / norms[-1] if norms[-1] else float("inf")
        log_scalars(trainer, metrics)


class UnitHealth(L.Callback):
    """Dead, inactive and saturated units and sparsity per hidden layer (see `unit_stats`), on a fixed held-out batch
    of `held_out` validation images, when training starts and at every validation end."""

    def __init__(self, held_out: int = 1000, saturation: float = 0.01):
        if held_out <= 0 or not 0 < saturation < 1:
            raise ValueError(
                f"callbacks.unit_health needs held_out > 0 and saturation in (0, 1), got {held_out} and {saturation}"
            )
        self.held_out, self.saturation = held_out, saturation
        self.batch: torch.Tensor | None = None

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.batch is None:
            self.batch = held_out_images(trainer, self.held_out)
        metrics = {}
        for i, (act, pre, post) in enumerate(record_activations(measured_net(pl_module), self.batch)):
            for name, value in unit_stats(act, pre, post, self.saturation).items():
                metrics[f"units/{name}/{layer_tag(i)}"] = value
        log_scalars(trainer, metrics)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.measure(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.measure(trainer, pl_module)


class Histograms(L.Callback):
    """TensorBoard histograms of each Linear weight and of each hidden layer's pre-activations and activations
    (on `held_out` validation images) at every training epoch end."""

    def __init__(self, held_out: int = 1000):
        if held_out <= 0:
            raise ValueError(f"callbacks.histograms.held_out must be > 0, got {held_out}")
        self.held_out = held_out
        self.batch: torch.Tensor | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tb = tensorboard(trainer)
        if tb is None or not trainer.is_global_zero:
            return
        if self.batch is None:
            self.batch = held_out_images(trainer, self.held_out)
        writer, step = tb.experiment, trainer.global_step
        for i, layer in enumerate(linear_layers(measured_net(pl_module))):
            writer.add_histogram(f"weights/{layer_tag(i)}", layer.weight.detach(), step, bins=BINS)
        for i, (_, pre, post) in enumerate(record_activations(measured_net(pl_module), self.batch)):
            writer.add_histogram(f"preactivations/{layer_tag(i)}", pre, step, bins=BINS)
            writer.add_histogram(f"activations/{layer_tag(i)}", post, step, bins=BINS)


class Figures(L.Callback):
    """PNGs in `<run folder>/<folder>/` and the same images in TensorBoard: a 3x3 grid of training digits with their
    labels (when training starts), the test confusion matrix and the `mistakes` most confident test mistakes (at
    test end).

    Under DDP the test figures show rank zero's share of the test set.
    """

    def __init__(self, mistakes: int = 16, folder: str = "figures"):
        if mistakes <= 0:
            raise ValueError(f"callbacks.figures.mistakes must be > 0, got {mistakes}")
        self.mistakes, self.folder = mistakes, folder
        self.probs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.images: list[torch.Tensor] = []

    def save(self, trainer: L.Trainer, name: str, fig) -> Path:
        import matplotlib.pyplot as plt

        path = Path(trainer.default_root_dir) / self.folder / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        if (tb := tensorboard(trainer)) is not None:
            # The PNG read back, not add_figure: drawing a figure twice is most of this callback's cost.
            tb.experiment.add_image(
                f"figures/{name}", plt.imread(path)[..., :3], trainer.global_step, dataformats="HWC"
            )
        return path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.global_step > 0:
            return  # a resumed run drew them when it started
        x, y = next(iter(trainer.datamodule.train_dataloader()))
        labels = class_indices(y[:9]).tolist()
        titles = [f"label {label}" for label in labels]
        self.save(trainer, "train_digits", digit_grid(x[:9].cpu(), titles, "Training digits"))

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.probs, self.targets, self.images = [], [], []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        probs = pl_module.predict_step(batch, batch_idx)  # softmax: the seed's output rule
        targets = class_indices(batch[1])
        wrong = probs.argmax(1) != targets
        self.probs.append(probs.cpu())
        self.targets.append(targets.cpu())
        self.images.append(batch[0][wrong].cpu())  # only the mistakes are ever drawn

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.probs:
            return
        probs, targets, images = torch.cat(self.probs), torch.cat(self.targets), torch.cat(self.images)
        confidence, preds = probs.max(1)
        n = probs.shape[1]
        counts = torch.bincount(targets * n + preds, minlength=n * n).reshape(n, n)
        self.save(trainer, "confusion_matrix", confusion_figure(counts))
        wrong = (preds != targets).nonzero().squeeze(1)
        order = confidence[wrong].argsort(descending=True)[: self.mistakes]
        titles = [
            f"pred {preds[wrong[k]]} ({confidence[wrong[k]]:.2f})\ntrue {targets[wrong[k]]}" for k in order.tolist()
        ]
        self.save(trainer, "confident_mistakes", digit_grid(images[order], titles, "Most confident test mistakes"))


def digit_grid(images: torch.Tensor, titles: list[str], suptitle: str):
    """A square grid of 28x28 digits, each titled; imshow rescales, so any input normalization displays alike."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = max(1, int(len(images) ** 0.5 + 0.999))
    fig, axes = plt.subplots(side, side, figsize=(1.9 * side, 2.1 * side), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k].reshape(28, 28).numpy(), cmap="gray")
            ax.set_title(titles[k], fontsize=9)
    fig.suptitle(suptitle if len(images) else f"{suptitle}: none")
    fig.tight_layout()
    return fig


def confusion_figure(counts: torch.Tensor):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(counts)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(counts.numpy(), cmap="Blues")
    for t in range(n):
        for p in range(n):
            value = counts[t, p].item()
            ax.text(
                p, t, value, ha="center", va="center", fontsize=7, color="white" if value > counts.max() / 2 else "k"
            )
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true")
    accuracy = counts.diag().sum().item() / max(1, counts.sum().item())
    ax.set_title(f"Test confusion matrix (accuracy {accuracy:.4f})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig
