"""Training diagnostics as Lightning callbacks: gradient norms, unit health, histograms and figures in TensorBoard.

Each is one entry of conf/callbacks/default.yaml; `~callbacks.<name>` switches one off, `callbacks=plain` all of them.
Each is an ordinary callback on the pack's trainer (a single run is a pack of one): it computes for every member at
once and writes to each member's TensorBoard run and folder only at the end. Scalars go straight to the members'
loggers (not `self.log`), read from the device once per measurement, so a run pays nothing between measurements.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

from fcexp.module import class_indices
from fcexp.net import PackedMLP
from fcexp.pack import runs_of

log = logging.getLogger("fcexp")
# Evenly spaced histogram bins: TensorBoard's default (~1,500 exponential edges) takes 10x longer on a 784x512 weight.
BINS = 64


def layer_tag(i: int) -> str:
    # Zero-padded so TensorBoard sorts layer10 after layer09, not after layer1.
    return f"layer{i + 1:02d}"


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


def hidden_activity(net: PackedMLP, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pre-activation, activation) of every hidden layer, each (members, batch, units), from one forward pass of
    the whole pack in eval mode: no dropout noise, batch norm on its running statistics, what validation sees."""
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            # forward, not the call: a compiled net (model.compile) would compile a graph of its own for the capture.
            net.forward(x.to(net.weights[0].device), capture=captured)
    finally:
        net.train(was_training)
    return captured


def unit_stats(net: PackedMLP, pre: torch.Tensor, post: torch.Tensor, saturation: float) -> dict[str, torch.Tensor]:
    """Fractions of one layer's units (columns) over a batch (rows), per member (members,).

    dead: output exactly 0 for every example (a ReLU unit that no example switches on gets no gradient);
    inactive: pre-activation <= 0 for every example (what would be dead under ReLU; leaky ReLU still trains it);
    saturated: local derivative, averaged over the batch, below `saturation` (sigmoid's is at most 0.25, tanh's 1);
    sparsity: fraction of all outputs that are exactly 0.
    """
    x = pre.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        # The activations are elementwise, so the gradient of the sum is each element's own derivative.
        (derivative,) = torch.autograd.grad(net.activate(x).sum(), x)
    zero = post == 0
    return {
        "dead": zero.all(1).float().mean(-1),
        "inactive": (pre <= 0).all(1).float().mean(-1),
        "saturated": (derivative.mean(1) < saturation).float().mean(-1),
        "sparsity": zero.float().mean((1, 2)),
    }


def histograms(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Each member's histogram of `values` (members, ...) over `bins` equal bins from its min to its max, as one
    tensor (members, 5 + 2 * bins): min, max, count, sum, sum of squares, the bins' right edges, their counts.
    A range of one value is widened by 0.5 either side, as numpy does."""
    flat = values.detach().flatten(1).float()
    members, n = flat.shape
    low, high = flat.min(1).values, flat.max(1).values
    lo, hi = torch.where(low == high, low - 0.5, low), torch.where(low == high, high + 0.5, high)
    width = (hi - lo) / bins
    index = ((flat - lo[:, None]) / width[:, None]).long().clamp_(0, bins - 1)
    index += torch.arange(members, device=flat.device)[:, None] * bins
    counts = torch.bincount(index.flatten(), minlength=members * bins).view(members, bins).float()
    edges = lo[:, None] + width[:, None] * torch.arange(1, bins + 1, device=flat.device)
    stats = [low, high, torch.full_like(lo, n), flat.sum(1), flat.square().sum(1)]
    stats = torch.stack(stats)
    return torch.cat([stats.t(), edges, counts], 1)


class EpochLine:
    """One line per epoch: its losses, accuracy and elapsed time. train.log holds it wherever stdout goes."""

    def __init__(self):
        self.started = 0.0
        self.first_epoch = self.printed = -1
        self.total: int | None = None  # the run's epochs, where its trainer stops short of them (a race's rung)

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
        pack = f" (means of a pack of {members})" if members > 1 else ""
        return (
            f"epoch {epoch + 1}/{self.total or trainer.max_epochs}{pack}: "
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
    """L2 norm of each Linear weight's gradient every `every_n_steps` (default: the trainer's log_every_n_steps), for
    every member at once.

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
        grads = [w.grad for w in pl_module.net.weights]
        if any(g is None for g in grads):
            return  # e.g. a frozen layer: no profile to report
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads])  # (layers, members): one reduction each
        metrics = {f"grad_norm/{layer_tag(k)}": norm for k, norm in enumerate(norms)}
        metrics["grad_norm/first_over_last"] = torch.where(norms[-1] > 0, norms[0] / norms[-1], math.inf)
        pl_module.log_members(metrics)


class UnitHealth(L.Callback):
    """Dead, inactive and saturated units and sparsity per hidden layer (see `unit_stats`), on a fixed held-out batch
    of `held_out` validation images, when training starts and at every validation end: one forward pass of the pack
    for all its members."""

    def __init__(self, held_out: int = 1000, saturation: float = 0.01):
        if held_out <= 0 or not 0 < saturation < 1:
            raise ValueError(
                f"callbacks.unit_health needs held_out > 0 and saturation in (0, 1), got {held_out} and {saturation}"
            )
        self.held_out, self.saturation = held_out, saturation
        self.batch: torch.Tensor | None = None

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int | None = None) -> None:
        if self.batch is None:
            self.batch = held_out_images(trainer, self.held_out)
        metrics = {}
        for k, (pre, post) in enumerate(hidden_activity(pl_module.net, self.batch)):
            for name, value in unit_stats(pl_module.net, pre, post, self.saturation).items():
                metrics[f"units/{name}/{layer_tag(k)}"] = value
        if metrics:  # a linear classifier has no hidden units to count
            pl_module.log_members(metrics, step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:  # a resumed run's nets were measured at the validation its checkpoint followed
            self.measure(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.measure(trainer, pl_module, validated_step(trainer))


def validated_step(trainer: L.Trainer) -> int:
    """Where a validation's measurements go in TensorBoard: the step just trained, as the epoch's metrics
    (Classifier.end_epoch). At an epoch's end the next step is its checkpoint's, from which a resumed run logs anew
    (TensorBoard drops what a killed run logged from there): logged there, they would be lost."""
    return max(0, trainer.global_step - 1)


class TrainAccuracy(L.Callback):
    """Loss and accuracy on the first `images` training images (all of them, where there are fewer) in eval mode, at
    every validation end, for every member at once: `train/loss_eval` and `train/acc_eval`. The net is measured as
    validation sees it (no dropout, batch norm on its running statistics), so `train/acc_eval` minus `val/acc` is
    the gap a net that overfits opens; `train/acc` is the mean over the epoch's batches, with dropout, while the net
    was still changing."""

    def __init__(self, images: int = 1000):
        if images <= 0:
            raise ValueError(f"callbacks.train_accuracy.images must be > 0, got {images}")
        self.images = images

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        loss = acc = 0.0
        seen = 0
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                for x, y in trainer.datamodule.train_eval_dataloader():
                    x, y = x[: self.images - seen], y[: self.images - seen]
                    logits = pl_module.net(x)
                    loss = loss + pl_module.losses(logits, y) * len(x)
                    acc = acc + pl_module.accuracies(logits, y) * len(x)
                    seen += len(x)
                    if seen == self.images:
                        break
        finally:
            pl_module.train(was_training)
        metrics = {"train/loss_eval": loss / seen, "train/acc_eval": acc / seen}
        pl_module.log_members(metrics, validated_step(trainer))


class Histograms(L.Callback):
    """TensorBoard histograms of each Linear weight and of each hidden layer's pre-activations and activations
    (on `held_out` validation images) at every training epoch end: every member's counted at once, written to each
    member's TensorBoard run."""

    def __init__(self, held_out: int = 1000):
        if held_out <= 0:
            raise ValueError(f"callbacks.histograms.held_out must be > 0, got {held_out}")
        self.held_out = held_out
        self.batch: torch.Tensor | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        runs = [r for r in runs_of(trainer, pl_module) if r.logger is not None]
        if not runs or not trainer.is_global_zero:
            return
        if self.batch is None:
            self.batch = held_out_images(trainer, self.held_out)
        net = pl_module.net
        tensors = {f"weights/{layer_tag(k)}": w for k, w in enumerate(net.weights)}
        for k, (pre, post) in enumerate(hidden_activity(net, self.batch)):
            tensors[f"preactivations/{layer_tag(k)}"] = pre
            tensors[f"activations/{layer_tag(k)}"] = post
        # Every histogram of every member, read from the device at once.
        stats = torch.stack([histograms(t, BINS) for t in tensors.values()]).tolist()
        for run in runs:
            writer = run.logger.experiment
            for tag, per_member in zip(tensors, stats, strict=True):
                lo, hi, n, total, squares, *rest = per_member[run.index]
                writer.add_histogram_raw(tag, lo, hi, n, total, squares, rest[:BINS], rest[BINS:], trainer.global_step)


class Figures(L.Callback):
    """PNGs in `<run folder>/<folder>/` and the same images in TensorBoard: a 3x3 grid of training digits with their
    labels (when training starts; drawn once for the members that share a batch order), the test confusion matrix
    and the `mistakes` most confident test mistakes (at test end; counted and ranked for all members at once).

    Under DDP the test figures show rank zero's share of the test set.
    """

    def __init__(self, mistakes: int = 16, folder: str = "figures"):
        if mistakes <= 0:
            raise ValueError(f"callbacks.figures.mistakes must be > 0, got {mistakes}")
        self.mistakes, self.folder = mistakes, folder
        self.confidence: list[torch.Tensor] = []
        self.preds: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.images: list[torch.Tensor] = []

    def save(self, step: int, runs: list, name: str, fig) -> None:
        """The figure as a PNG in each of `runs`' folders (drawn once, copied) and in each one's TensorBoard run, at
        `step`."""
        import matplotlib.pyplot as plt

        paths = [run.run_dir / self.folder / f"{name}.png" for run in runs]
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(paths[0], dpi=100)
        plt.close(fig)
        for path in paths[1:]:
            shutil.copyfile(paths[0], path)
        image = plt.imread(paths[0])[..., :3]  # the PNG read back, not add_figure: no second drawing
        for run in runs:
            if run.logger is not None:
                run.logger.experiment.add_image(f"figures/{name}", image, step, dataformats="HWC")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.global_step > 0:
            return  # a resumed run drew them when it started
        x, y = next(iter(trainer.datamodule.train_dataloader()))
        runs = runs_of(trainer, pl_module)
        if x.dim() == 2:  # one batch order for all members
            x, y = x.expand(pl_module.members, *x.shape), y.expand(pl_module.members, *y.shape)
        drawn: list[tuple[torch.Tensor, list]] = []  # each distinct first batch and the runs it starts
        for run in runs:
            same = next((runs_ for first, runs_ in drawn if torch.equal(first, x[run.index, :9])), None)
            if same is None:
                drawn.append((x[run.index, :9], [run]))
            else:
                same.append(run)
        for first, group in drawn:
            labels = class_indices(y[group[0].index, :9]).tolist()
            titles = [f"label {label}" for label in labels]
            self.save(0, group, "train_digits", digit_grid(first.cpu(), titles, "Training digits"))

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.confidence, self.preds, self.targets, self.images = [], [], [], []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        _, probs = pl_module.test_probs  # softmax, the seed's output rule: (members, batch, classes)
        confidence, preds = probs.max(-1)
        self.confidence.append(confidence)
        self.preds.append(preds)
        self.targets.append(class_indices(batch[1]))
        self.images.append(batch[0])  # shared by all members: kept once

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.preds:
            return
        confidence, preds, targets = torch.cat(self.confidence, 1), torch.cat(self.preds, 1), torch.cat(self.targets)
        members, n = preds.shape[0], pl_module.hparams.num_classes
        # Every member's confusion counts in one count, and its most confident mistakes in one ranking.
        cells = torch.arange(members, device=preds.device)[:, None] * n * n + targets * n + preds
        counts = torch.bincount(cells.flatten(), minlength=members * n * n).view(members, n, n).cpu()
        wrong = preds != targets
        top = torch.where(wrong, confidence, -1.0).topk(min(self.mistakes, preds.shape[1]), dim=1)
        values, order = top.values.cpu(), top.indices.cpu()
        preds, targets = preds.cpu(), targets.cpu()
        images = torch.cat(self.images).cpu()
        for run in runs_of(trainer, pl_module):
            i = run.index
            self.save(pl_module.steps_trained, [run], "confusion_matrix", confusion_figure(counts[i]))
            picked = order[i][values[i] >= 0]  # fewer mistakes than asked for: only those
            titles = [
                f"pred {preds[i, k]} ({values[i, j]:.2f})\ntrue {targets[k]}" for j, k in enumerate(picked.tolist())
            ]
            grid = digit_grid(images[picked], titles, "Most confident test mistakes")
            self.save(pl_module.steps_trained, [run], "confident_mistakes", grid)


def digit_grid(images: torch.Tensor, titles: list[str], suptitle: str):
    """A square grid of 28x28 digits, each titled, each scaled to its own range (any input normalization displays
    alike). Drawn as one image with a text per digit: a tenth of the time of one subplot per digit, which a sweep
    pays for every member."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = max(1, int(len(images) ** 0.5 + 0.999))
    pad, top, scale, header = 4, 24, 3, 50  # pixels of the mosaic (pad, title room), its scale, the title's pixels
    cell_w, cell_h = 28 + pad, 28 + top
    mosaic = torch.ones(side * cell_h + pad, side * cell_w)
    x = images.reshape(-1, 28, 28).float()
    if len(x):
        lo, hi = x.flatten(1).min(1).values, x.flatten(1).max(1).values
        x = (x - lo[:, None, None]) / (hi - lo).clamp_min(1e-12)[:, None, None]
    for k in range(len(x)):
        r, c = divmod(k, side)
        mosaic[r * cell_h + top : r * cell_h + top + 28, c * cell_w + pad // 2 : c * cell_w + pad // 2 + 28] = x[k]
    height, width = mosaic.shape[0] * scale, mosaic.shape[1] * scale
    fig = plt.figure(figsize=(width / 100, (height + header) / 100))
    ax = fig.add_axes((0, 0, 1, height / (height + header)))
    ax.axis("off")
    ax.imshow(mosaic.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for k, title in enumerate(titles):
        r, c = divmod(k, side)
        ax.text(c * cell_w + cell_w / 2, r * cell_h + top - 1, title, ha="center", va="bottom", fontsize=9)
    fig.suptitle(suptitle if len(images) else f"{suptitle}: none", y=1 - 12 / (height + header), va="top")
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
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.09, top=0.93)  # fixed: tight_layout would measure every text
    return fig
