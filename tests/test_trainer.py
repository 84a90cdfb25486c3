import json

import pytest
import torch

from knnsolver.errors import ConfigError
from knnsolver.training import TrainConfig, train
from knnsolver.training.checkpoint import load_checkpoint, save_checkpoint
from helpers import results


def _cfg(tmp_path, **kw):
    base = dict(dataset="digits", solver="softmax", epochs=3, out=str(tmp_path / "run"), embedding_dim=16,
                width=8, batch_size=64, progress=False, plots=False)
    base.update(kw)
    return TrainConfig(**base)


def test_softmax_digits_reaches_95_percent(tmp_path):
    summary = train(_cfg(tmp_path, epochs=8, width=16, embedding_dim=32, plots="all"))
    assert summary["test_accuracy"] >= 0.95
    run = tmp_path / "run"
    for name in ("config.json", "checkpoint.pt", "best.pt", "log.jsonl", "summary.json", "loss.png", "metrics.png", "tsne.png"):
        assert (run / name).is_file(), name
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, 9))
    assert all("val_accuracy" in r and r["loss"] > 0 for r in log)
    assert json.loads((run / "summary.json").read_text())["test_accuracy"] == summary["test_accuracy"]


def test_same_seed_same_result(tmp_path):
    a = train(_cfg(tmp_path, out=str(tmp_path / "a"), epochs=2))
    b = train(_cfg(tmp_path, out=str(tmp_path / "b"), epochs=2))
    assert results(a) == results(b)
    sa = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    sb = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_equals_uninterrupted(tmp_path):
    from helpers import train_interrupted

    kw = dict(epochs=4, dropout=0.2, augment=True, warmup_epochs=1, clip_grad_norm=1.0, bn_mode="frozen")
    full = train(_cfg(tmp_path, out=str(tmp_path / "full"), **kw))
    train_interrupted(_cfg(tmp_path, out=str(tmp_path / "part"), **kw), stop_after=2)
    resumed = train(_cfg(tmp_path, out=str(tmp_path / "part"), **kw), resume=True)
    assert results(resumed) == results(full)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    assert [r["lr"] for r in a["history"]] == [r["lr"] for r in b["history"]]


def test_resume_with_more_epochs_on_a_constant_schedule(tmp_path):
    full = train(_cfg(tmp_path, out=str(tmp_path / "full"), epochs=4, lr_schedule="constant"))
    train(_cfg(tmp_path, out=str(tmp_path / "part"), epochs=2, lr_schedule="constant"))
    resumed = train(_cfg(tmp_path, out=str(tmp_path / "part"), epochs=4, lr_schedule="constant"), resume=True)
    assert results(resumed) == results(full)


def test_existing_run_is_not_overwritten(tmp_path):
    train(_cfg(tmp_path, epochs=1))
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        train(_cfg(tmp_path, epochs=1))


def test_resume_without_checkpoint_and_with_changed_settings(tmp_path):
    with pytest.raises(ConfigError, match="cannot resume.*does not exist"):
        train(_cfg(tmp_path), resume=True)
    train(_cfg(tmp_path, epochs=1))
    with pytest.raises(ConfigError, match="settings other than epochs and patience differ"):
        train(_cfg(tmp_path, epochs=2, lr=0.5), resume=True)


def test_atomic_checkpoint_keeps_old_file_when_write_fails(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"a": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"a": Boom()}, path)
    assert load_checkpoint(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize(
    "kw, match",
    [(dict(epochs=0), "epochs must be >= 1"), (dict(lr=-1.0), "lr must be > 0"),
     (dict(optimizer="rmsprop"), "unknown optimizer 'rmsprop'"), (dict(split="random"), "unknown split 'random'"),
     (dict(solver="nope"), "unknown solver 'nope'; choose one of: softmax"),
     (dict(dataset="mnist"), "unknown dataset 'mnist'"),
     (dict(solver_options={"bogus": 1}), "solver 'softmax' has no option bogus")],
)
def test_bad_settings_raise_config_error(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        train(_cfg(tmp_path, **kw))


def test_optimizers_and_disjoint_split(tmp_path):
    for opt in ("sgd", "adamw"):
        s = train(_cfg(tmp_path, out=str(tmp_path / opt), optimizer=opt, epochs=1, lr=0.05 if opt == "sgd" else 1e-3))
        assert 0 <= s["test_accuracy"] <= 1
    s = train(_cfg(tmp_path, out=str(tmp_path / "dis"), split="disjoint", epochs=2))
    expected = {"precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r", "r_precision", "nmi"}
    assert expected <= set(s)
    assert s["recall_at_8"] >= s["recall_at_1"] > 0.3


def test_samples_per_class_rule():
    from knnsolver.training.batch_plan import samples_per_class

    assert samples_per_class(64, 10) == 8  # 8 classes x 8
    assert samples_per_class(64, 5) == 16  # 4 classes x 16
    assert samples_per_class(64, 100) == 4
    assert samples_per_class(60, 10, requested=6) == 6
    with pytest.raises(ConfigError, match="batch_size 7 cannot be split"):
        samples_per_class(7, 10)


def test_pair_solver_trains_with_default_batch(tmp_path):
    s = train(_cfg(tmp_path, solver="triplet", epochs=1, split="disjoint"))
    assert s["recall_at_1"] > 0.3


def test_calibrate_batchnorm_matches_data_statistics():
    from torch import nn
    from torch.utils.data import TensorDataset

    from knnsolver.training.batchnorm import calibrate_batchnorm

    torch.manual_seed(0)
    x = torch.randn(300, 3) * 5 + 2
    data = TensorDataset(x, torch.zeros(300), torch.arange(300))
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert calibrate_batchnorm(model, data, batch_size=50, device=torch.device("cpu"))
    with torch.no_grad():
        h = model[0](x)
    bn = model[1]
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-4)
    assert torch.allclose(bn.running_var, h.var(0), rtol=0.05)  # mean of per-batch unbiased variances
    assert bn.momentum == 0.1 and model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert torch.allclose(out.std(0), torch.ones(4), atol=0.1)  # eval embeddings now on the training scale
    assert not calibrate_batchnorm(nn.Linear(3, 2), data, 50, torch.device("cpu"))


@pytest.mark.parametrize("fused", [False, True])
def test_batched_reads_stop_at_the_first_bad_step_with_finite_weights(tmp_path, monkeypatch, fused):
    """The GPU path reads the step flags every few steps: the error names the first bad step and the
    flagged steps move nothing (gradients zeroed, or the fused optimiser told to skip them on the
    device), so no weight ever becomes NaN."""
    from knnsolver.errors import DivergenceError
    from knnsolver.solvers.softmax import SoftmaxSolver
    from knnsolver.training import loop

    calls = {"n": 0}
    original = SoftmaxSolver.forward

    def forward(self, embeddings, labels, rows=None):
        calls["n"] += 1
        loss = original(self, embeddings, labels, rows)
        return loss * float("nan") if calls["n"] in (6, 7) else loss

    monkeypatch.setattr(SoftmaxSolver, "forward", forward)
    monkeypatch.setattr(loop, "_read_every", lambda device: 4)
    monkeypatch.setattr(loop, "_fused", lambda device: fused)
    seen = {}
    step = loop.train_epoch

    def spy(run, *args):
        seen["run"] = run
        return step(run, *args)

    monkeypatch.setattr(loop, "train_epoch", spy)
    with pytest.raises(DivergenceError, match=r"non-finite loss, gradients at epoch 1, step 6:"):
        train(_cfg(tmp_path, epochs=1))
    params = [*seen["run"].model.parameters(), *seen["run"].solver.parameters()]
    assert calls["n"] == 8 and all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_fp32_solver_maths(tmp_path, precision):
    from knnsolver.solvers.softmax import SoftmaxSolver

    dtypes = set()
    original = SoftmaxSolver.forward

    def forward(self, embeddings, labels, rows=None):
        dtypes.add(embeddings.dtype)
        return original(self, embeddings, labels, rows)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SoftmaxSolver, "forward", forward)
        summary = train(_cfg(tmp_path, epochs=3, width=16, precision=precision))
    assert dtypes == {torch.float32} and summary["test_accuracy"] > 0.8
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ("scale" in state["scaler"]) == (precision == "fp16")


def test_device_choice(tmp_path):
    assert TrainConfig().device == "auto"
    assert TrainConfig().torch_device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is visible; use --device cpu or auto"):
            _cfg(tmp_path, device="cuda").validate()
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        _cfg(tmp_path, device="gpu0").validate()
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        _cfg(tmp_path, precision="fp8").validate()


@pytest.mark.slow
def test_compiled_network_trains_like_the_eager_one(tmp_path):
    eager = train(_cfg(tmp_path, out=str(tmp_path / "eager"), epochs=1))
    compiled = train(_cfg(tmp_path, out=str(tmp_path / "compiled"), epochs=1, compile=True))
    assert compiled["test_accuracy"] == pytest.approx(eager["test_accuracy"], abs=0.02)


def test_a_refresh_reuses_the_training_embeddings_of_the_evaluation_before_it(tmp_path, monkeypatch):
    """The RBF bank refresh after a validation takes its training embeddings instead of a second pass,
    and the run ends exactly as one that embeds again."""
    from knnsolver.training.run import Run

    cfg = dict(solver="rbf", solver_options={"k": 20, "update_interval": 1}, epochs=3)
    calls = {"n": 0}
    embed_all = Run.embed_all

    def counting(self, dataset):
        calls["n"] += 1
        return embed_all(self, dataset)

    monkeypatch.setattr(Run, "embed_all", counting)
    reused = train(_cfg(tmp_path, out=str(tmp_path / "a"), **cfg))
    assert calls["n"] == 1  # only the first fill embeds for the bank; epochs 2 and 3 reuse validation's pass
    monkeypatch.setattr(Run, "bank_embeddings", lambda self: (self.calibrate(), embed_all(self, self.data.train_eval))[1])
    again = train(_cfg(tmp_path, out=str(tmp_path / "b"), **cfg))
    assert results(reused) == results(again)


def test_resume_on_a_refresh_epoch_with_dropout_and_reused_embeddings(tmp_path):
    """Embedding for a refresh (or reusing validation's embeddings) never shifts the random stream."""
    from helpers import train_interrupted

    kw = dict(solver="rbf", solver_options={"k": 20, "update_interval": 1}, epochs=3, dropout=0.3, max_per_class=40)
    full = train(_cfg(tmp_path, out=str(tmp_path / "full"), **kw))
    train_interrupted(_cfg(tmp_path, out=str(tmp_path / "part"), **kw), stop_after=1)
    resumed = train(_cfg(tmp_path, out=str(tmp_path / "part"), **kw), resume=True)
    assert results(resumed) == results(full)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_saved_runs_keep_the_solver_options_they_were_trained_with(tmp_path):
    from knnsolver.training.saved import load_saved

    train(_cfg(tmp_path, solver="rbf", solver_options={"k": 20}, epochs=1))
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["solver_options"]["normalize"] is True and best["solver_options"]["k"] == 20
    assert best["solver_options"]["learn_weights"] is True and best["solver_options"]["update_interval"] == 1  # from random weights
    run, _ = load_saved(tmp_path / "run")
    assert run.solver.normalize and run.solver.k == 20
    # A run folder from before the options were recorded: the RBF bank key was 'centres' and the
    # embedding was free-scale.
    del best["solver_options"]
    best["solver"]["bank.centres"] = best["solver"].pop("bank.embeddings")
    save_checkpoint(best, tmp_path / "run" / "best.pt")
    run, _ = load_saved(tmp_path / "run")
    assert not run.solver.normalize
    run.solver.load_state_dict(best["solver"])
    assert run.solver.bank.filled


def _sampling_run(balanced: bool, epoch_steps: int | None):
    from types import SimpleNamespace

    labels = torch.arange(100) % 4
    config = TrainConfig(batch_size=8, samples_per_class=2, balanced=balanced, epoch_steps=epoch_steps, seed=3)
    data = SimpleNamespace(train=list(range(100)), train_labels=labels, num_classes=4)
    return SimpleNamespace(config=config, data=data, solver=SimpleNamespace(needs_balanced_sampler=False))


@pytest.mark.parametrize("balanced", [False, True])
def test_epoch_steps_cut_the_stream_of_passes_into_equal_epochs(balanced):
    from knnsolver.training.batch_plan import epoch_batches

    passes = [epoch_batches(_sampling_run(balanced, None), q) for q in range(4)]
    per_pass = len(passes[0])
    assert per_pass > 7 and all(len(p) == per_pass for p in passes)
    stream = [b for p in passes for b in p]
    run = _sampling_run(balanced, 7)
    epochs = [epoch_batches(run, e) for e in range(4 * per_pass // 7)]
    assert all(len(e) == 7 for e in epochs)
    assert [b for e in epochs for b in e] == stream[: 7 * len(epochs)]  # each row once per pass, in order
    # an epoch of exactly one pass is the epoch without epoch_steps
    whole = _sampling_run(balanced, per_pass)
    assert [epoch_batches(whole, q) for q in range(4)] == passes


def test_epoch_steps_set_how_often_a_bank_refreshes_and_resume_exactly(tmp_path):
    from helpers import train_interrupted

    # 1,294 training rows: 21 batches a pass, so epochs 3 and 4 (resumed) cross into the second pass
    kw = dict(solver="rbf", solver_options={"k": 10, "update_interval": 1}, epochs=4, epoch_steps=8, lr_schedule="constant")
    full = train(_cfg(tmp_path, out=str(tmp_path / "full"), **kw))
    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4] and all(r.get("bank_refreshed") for r in log)
    # 8 batches per epoch; the third holds the pass's last batch, of 1,294 - 20 x 64 = 14 rows
    assert [round(r["samples_per_s"] * r["seconds"]) for r in log] == [512, 512, 7 * 64 + 14, 512]
    train_interrupted(_cfg(tmp_path, out=str(tmp_path / "part"), **kw), stop_after=2)
    resumed = train(_cfg(tmp_path, out=str(tmp_path / "part"), **kw), resume=True)
    assert results(resumed) == results(full)


def test_epoch_steps_are_each_process_s_steps_under_torchrun(monkeypatch):
    """With 3 processes an epoch cuts 3 x epoch_steps batches of the stream and each process trains epoch_steps."""
    from knnsolver import distributed
    from knnsolver.training.batch_plan import epoch_batches, process_batches

    run = _sampling_run(False, 4)
    stream = [b for q in range(3) for b in epoch_batches(_sampling_run(False, None), q)]
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shares.append([process_batches(run, e) for e in range(2)])
    assert all(len(share) == 4 for epochs in shares for share in epochs)
    dealt = [shares[r][e][i] for e in range(2) for i in range(4) for r in range(3)]
    assert dealt == stream[:24]  # every batch of the stream trained once, none dropped


def test_epoch_steps_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="epoch_steps must be >= 1.*or null for one pass over the training set"):
        _cfg(tmp_path, epoch_steps=0).validate()


def _scripted_validation(monkeypatch, scores):
    """Make validation return ``scores`` in turn (test evaluation stays real), so the stopping rule is checked
    against a curve known in advance."""
    from knnsolver.training.run import Run

    real, queue = Run.evaluate, list(scores)

    def evaluate(self, dataset, prefix):
        return {"val_accuracy": queue.pop(0)} if prefix == "val_" else real(self, dataset, prefix)

    monkeypatch.setattr(Run, "evaluate", evaluate)
    return queue


def test_early_stopping_counts_validation_passes_without_a_new_best(tmp_path, monkeypatch, capsys):
    # Validated every 2nd epoch: passes at epochs 2, 4, ..., best 0.7 at epoch 4 (pass 2; a NaN first score
    # never rises, so the message must not name it); an equal score is not a rise, so passes 3-5 (epochs 6,
    # 8, 10) make 3 without a new best and the run stops after epoch 10 of 20.
    left = _scripted_validation(monkeypatch, [float("nan"), 0.7, 0.7, 0.6, 0.69, 0.9, 0.9])
    summary = train(_cfg(tmp_path, epochs=20, eval_every=2, patience=3, lr_schedule="constant", progress=True))
    assert left == [0.9, 0.9]
    assert "early stop after epoch 10: 3 validation passes without a new best (best epoch 4)" in capsys.readouterr().err
    assert (summary["epochs_run"], summary["best_epoch"], summary["stopped_early"]) == (10, 4, True)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, 11))
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] + 1 == 4


def test_without_patience_every_epoch_runs(tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, [0.5, 0.4, 0.4, 0.4])
    summary = train(_cfg(tmp_path, epochs=4, lr_schedule="constant"))
    assert (summary["epochs_run"], summary["best_epoch"], summary["stopped_early"]) == (4, 1, False)


def test_a_stopped_run_stays_stopped_on_resume_until_its_patience_is_raised(tmp_path, monkeypatch):
    left = _scripted_validation(monkeypatch, [0.5, 0.4, 0.8, 0.7, 0.6])
    cfg = dict(epochs=10, patience=1, lr_schedule="constant")
    assert train(_cfg(tmp_path, **cfg))["epochs_run"] == 2
    again = train(_cfg(tmp_path, **dict(cfg, epochs=12)), resume=True)
    assert (again["epochs_run"], again["stopped_early"], len(left)) == (2, True, 3)
    longer = train(_cfg(tmp_path, **dict(cfg, patience=2)), resume=True)  # epoch 3 rises, 4 and 5 do not
    assert (longer["epochs_run"], longer["best_epoch"], longer["stopped_early"], left) == (5, 3, True, [])


def test_patience_needs_a_validation_split(tmp_path):
    with pytest.raises(ConfigError, match=r"patience=2 stops on validation, but this run has none "
                                          r"\(val_fraction=0.0\); set val_fraction above 0, or patience to 0"):
        train(_cfg(tmp_path, patience=2, val_fraction=0.0))


@pytest.mark.parametrize("scores, expected", [
    ([], 0), ([0.5], 0), ([0.5, 0.5], 1), ([0.5, 0.4, 0.6, 0.6, 0.3], 2), ([0.5, None, 0.4], 1),
    ([float("nan"), 0.1], 0), ([0.1, float("nan")], 1),
])
def test_passes_without_improvement(scores, expected):
    from knnsolver.training.run import passes_without_improvement

    history = [{"epoch": i + 1} | ({} if s is None else {"val_accuracy": s}) for i, s in enumerate(scores)]
    assert passes_without_improvement(history, "val_accuracy") == expected


def test_a_run_stopped_early_is_finished_for_eval(tmp_path, monkeypatch):
    from knnsolver.training.saved import evaluate_saved

    _scripted_validation(monkeypatch, [0.5, 0.4, 0.3])
    summary = train(_cfg(tmp_path, epochs=9, patience=2, lr_schedule="constant"))
    monkeypatch.undo()
    assert summary["epochs_run"] == 3
    assert evaluate_saved(tmp_path / "run")["test_accuracy"] == summary["test_accuracy"]


def test_an_epoch_line_shows_each_validation_score_once():
    """Helper review: on a disjoint split the selecting score is MAP@R, which the line also shows: it came twice."""
    from knnsolver.training.loop import epoch_line

    row = {"epoch": 3, "loss": 0.25, "val_map_at_r": 0.866, "val_accuracy": 0.9, "seconds": 1.0, "samples_per_s": 100.0}
    disjoint = epoch_line(row, TrainConfig(split="disjoint", epochs=3))
    assert disjoint.count("val_map_at_r 0.8660") == 1 and "val_accuracy" not in disjoint
    assert epoch_line(row, TrainConfig(epochs=3)).startswith("epoch 3/3: loss 0.2500, val_accuracy 0.9000, val_map_at_r 0.8660,")


def test_rbf_from_random_weights_refreshes_every_epoch_unless_told(tmp_path):
    """Helper review: the README's first command warned that its own default (the paper's interval of 10, meant for
    fine-tuning a pretrained network) left the RBF centres stale. From random weights the trainer refreshes every
    epoch; a set interval is kept, and the solver's own default stays the paper's."""
    from knnsolver.solvers.rbf import RBFSolver
    from knnsolver.training.run import build_run

    def interval(**options) -> int:
        config = TrainConfig(dataset="digits", solver="rbf", progress=False, out=str(tmp_path / "run"), **options)
        return build_run(config).solver.update_interval

    assert interval() == 1 and interval(solver_options={"update_interval": 10}) == 10
    assert RBFSolver(8, 3, 30, k=5).update_interval == 10


def test_a_resumed_run_keeps_the_solver_options_it_was_built_with(tmp_path):
    """Review: a run started before the from-scratch refresh default (recorded update_interval 10, its checkpoint
    without solver options) was resumed with a refresh every epoch; it keeps its own schedule now."""
    kw = dict(dataset="digits", solver="rbf", width=8, embedding_dim=8, plots=False, progress=False, max_per_class=20,
              solver_options={"k": 10}, out=str(tmp_path / "run"))
    train(TrainConfig(**kw, epochs=2))
    for name in ("checkpoint.pt", "best.pt"):  # as the code before wrote them
        state = load_checkpoint(tmp_path / "run" / name)
        if name == "checkpoint.pt":
            state.pop("solver_options", None)
        else:
            state["solver_options"]["update_interval"] = 10
        save_checkpoint(state, tmp_path / "run" / name)
    train(TrainConfig(**kw, epochs=4), resume=True)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [bool(row.get("bank_refreshed")) for row in log[2:]] == [True, False]  # interval 10 over 4 epochs: 2
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["solver_options"]["update_interval"] == 10
    for name in ("checkpoint.pt", "best.pt"):  # from before options were recorded at all: as load_saved reads it
        state = load_checkpoint(tmp_path / "run" / name)
        state.pop("solver_options")
        save_checkpoint(state, tmp_path / "run" / name)
    train(TrainConfig(**kw, epochs=5), resume=True)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["solver_options"]["normalize"] is False
