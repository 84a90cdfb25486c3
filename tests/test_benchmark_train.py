"""Training end to end on benchmark replicas: the CLI on CUB-200 with ResNet-18, In-Shop's query/gallery test."""
from __future__ import annotations

import json

import numpy as np
import torch

from knnsolver.cli.main import main
from knnsolver.training import TrainConfig, embed_saved, train
from replicas import inshop_rows, write_cub, write_inshop
from helpers import results


def test_cli_trains_cub200_disjoint_resnet18_and_reports_recall(tmp_path, capsys):
    write_cub(tmp_path / "cub", classes=6, per_class=4)
    out = tmp_path / "run"
    code = main(["train", "--dataset", "cub200", "--data-dir", str(tmp_path / "cub"), "--split", "disjoint",
                 "--model", "resnet18", "--image-size", "16", "--augment", "true", "--epochs", "1", "--batch-size", "6",
                 "--val-fraction", "0", "--backbone-lr", "1e-4", "--plots", "false", "--progress", "false",
                 "--out", str(out)])
    printed, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(printed[: printed.rindex("}") + 1]) == summary
    assert summary["dataset"] == "cub200" and summary["split"] == "disjoint"
    for k in (1, 2, 4, 8):  # CUB's cut-offs; 3 test classes x 4 images leave 11 references per query
        assert 0.0 <= summary[f"recall_at_{k}"] <= 1.0
    assert summary["recall_at_8"] >= summary["recall_at_1"]
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "resnet18" and config["backbone_lr"] == 1e-4


def test_inshop_run_tests_queries_against_the_gallery(tmp_path):
    rows = inshop_rows(items=8, per_item=4)
    write_inshop(tmp_path / "inshop", rows)
    cfg = TrainConfig(dataset="inshop", data_dir=str(tmp_path / "inshop"), split="disjoint", model="resnet", width=4,
                      image_size=8, epochs=1, batch_size=8, val_fraction=0.0, plots=False, progress=False,
                      out=str(tmp_path / "run"))
    summary = train(cfg)
    assert "recall_at_10" in summary and "recall_at_20" not in summary  # In-Shop's cut-offs up to its 12-image gallery
    emb, labels = embed_saved(tmp_path / "run", "test")
    statuses = np.asarray([s for _, _, s in rows if s != "train"])  # test rows keep the list's order
    query = torch.as_tensor(statuses == "query")
    nearest = torch.cdist(emb[query].double(), emb[~query].double()).argmin(1)
    assert summary["recall_at_1"] == float((labels[~query][nearest] == labels[query]).double().mean())


def test_worker_processes_load_training_and_evaluation_alike(tmp_path):
    """Decoding in DataLoader workers (training, precise BN, embedding) gives the main process's result."""
    write_cub(tmp_path / "cub", classes=4, per_class=4)
    summaries = []
    for workers in (0, 2):
        cfg = TrainConfig(dataset="cub200", data_dir=str(tmp_path / "cub"), split="disjoint", model="resnet", width=4,
                          image_size=8, epochs=1, batch_size=4, val_fraction=0.0, plots=False, progress=False,
                          num_workers=workers, out=str(tmp_path / f"run{workers}"))
        summaries.append(train(cfg))
    assert results(summaries[0]) == results(summaries[1])
