"""Every leaf of the default config, given a wrong type and an out-of-range value: one line, an error exit, and no
run left behind that claims anything."""

from __future__ import annotations

import json
import sys

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from fcexp.schema import _annotation, _schema
from fcexp.train import compose_config, main

WRONG_TYPE = {int: "abc", float: "abc", bool: "maybe", str: "[1,2]"}
# A value outside what each key allows; keys missing here take any value of their type (a name, a flag).
OUT_OF_RANGE = {
    "data.root": "/proc/fcexp",
    "data.batch_size": "0",
    "data.eval_batch_size": "-1",
    "data.normalize": "bogus",
    "data.labels": "bogus",
    "data.val_size": "60000",
    "data.limit_train": "0",
    "data.seed": "-1",
    "model._convert_": "bogus",
    "model.hidden": "[512,0]",
    "model.dropout": "1.5",
    "model.batch_norm": "[true,true,true]",
    "model.l2": "-0.1",
    "model.init": "bogus",
    "model.label_smoothing": "1.0",
    "model.activation": "bogus",
    "model.optimizer": "bogus",
    "activation.name": "relu6",
    "optimizer.lr": "0",
    "optimizer.eps": "-1",
    "trainer.accelerator": "bogus",
    "trainer.devices": "0",
    "trainer.max_epochs": "0",
    "trainer.precision": "bogus",
    "trainer.log_every_n_steps": "0",
    "callbacks.checkpoint.mode": "bogus",
    "callbacks.checkpoint.monitor": "bogus",
    "callbacks.progress.refresh_rate": "-1",
    "callbacks.grad_norms.every_n_steps": "0",
    "callbacks.unit_health.held_out": "0",
    "callbacks.unit_health.saturation": "2",
    "callbacks.train_accuracy.images": "0",
    "callbacks.histograms.held_out": "0",
    "callbacks.figures.mistakes": "0",
    "seed": "-1",
    "resume": "/nonexistent",
    "threads": "0",
    "replicates": "0",
    "runs_dir": "/proc/fcexp",
}
FREE = {
    "optimizer._partial_",
    "optimizer.fused",
    "trainer.deterministic",
    "trainer.enable_model_summary",
    "model.compile",
    "callbacks.checkpoint.best",
    "callbacks.checkpoint.last",
    "callbacks.figures.folder",
    "skip_finished",
}


def leaves(node, prefix: str = "") -> list[str]:
    if isinstance(node, DictConfig):
        return [k for key in node for k in leaves(node._get_node(key), f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


CFG = compose_config()
KEYS = leaves(OmegaConf.create(OmegaConf.to_container(CFG, resolve=False)))
SCHEMA = _schema(CFG)


def bad_values(key: str) -> list[str]:
    expected = _annotation(SCHEMA, key)
    base = next((t for t in (bool, int, float, str) if t in (expected, *getattr(expected, "__args__", ()))), None)
    wrong = WRONG_TYPE.get(base, "[[1]]" if key not in ("model.activation", "model.optimizer") else "5")
    if "List" in str(expected):
        wrong = "abc"
    out = "nowhere.Nothing" if key.endswith("._target_") else OUT_OF_RANGE.get(key)
    return [wrong, *([out] if out else [])]


CASES = [(key, value) for key in KEYS for value in bad_values(key)]


def test_every_leaf_has_a_range_or_is_free():
    assert {k for k in KEYS if not k.endswith("._target_")} - FREE <= set(OUT_OF_RANGE), (
        "say what is out of range for each new key, or mark it free"
    )
    assert len(KEYS) >= 40


@pytest.mark.parametrize(("key", "value"), CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_bad_value_is_one_line_and_leaves_no_run(key, value, tmp_path, monkeypatch, capsys, mnist_root):
    monkeypatch.chdir(tmp_path)
    short = [o for o in ("trainer.max_epochs=1", "data.limit_train=256") if not o.startswith(f"{key}=")]
    monkeypatch.setattr(sys, "argv", ["fcexp.train", f"{key}={value}", *short])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    assert exit_.value.code not in (0, None)
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    named = {key, key.rsplit(".", 1)[-1], value, value.strip("[]")}
    assert any(name in lines[0] for name in named), f"{lines[0]!r} names neither {key} nor {value}"
    assert "Traceback" not in out + err
    runs = [p for p in (tmp_path / "runs").glob("*") if (p / "metrics.json").is_file()]
    assert all(json.loads((p / "metrics.json").read_text())["status"] != "completed" for p in runs)
    assert not runs, f"a refused run left {runs}"
