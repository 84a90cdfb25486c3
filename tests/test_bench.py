"""The benchmark machinery on the tiny preset: per-run result files, resume, report rendering."""
import json
import math
import shutil

import pytest

from knnsolver.bench import runner
from knnsolver.bench.cli import main as bench_main
from knnsolver.bench.report import FAILS, HOLDS, OPEN, combine, compare, write_report
from knnsolver.bench.suites import build_specs, get_preset, get_suite
from knnsolver.errors import ConfigError, DataError

SOLVERS = "softmax,rbf"


def _bench(out, *extra, suite="classification", solvers=SOLVERS, seeds="0,1"):
    return bench_main([suite, "--preset", "tiny", "--out", str(out), "--solvers", solvers, "--seeds", seeds, *extra])


def _count_training(monkeypatch):
    """Record the run folder of every training started by the runner."""
    started = []
    real = runner.train

    def counting(cfg, resume=False, **kw):
        started.append((cfg.out.rsplit("/", 1)[-1], resume))
        return real(cfg, resume=resume, **kw)

    monkeypatch.setattr(runner, "train", counting)
    return started


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny classification suite with softmax and rbf over two seeds, run once for the module."""
    out = tmp_path_factory.mktemp("bench")
    assert _bench(out) == 0
    return out


def test_each_run_writes_its_result_file(finished):
    folder = finished / "classification"
    ids = {p.stem for p in folder.glob("*.json")}
    # per solver: 3 grid points on seed 0, then the chosen point on seeds 0 and 1
    assert len(ids) == 10
    grid = json.loads((folder / "softmax__label_smoothing=0.1__s0.json").read_text())
    assert grid["role"] == "grid" and grid["params"] == {"label_smoothing": 0.1}
    assert grid["config"]["solver_options"]["label_smoothing"] == 0.1 and grid["config"]["dataset"] == "digits"
    assert grid["best_val"] == max(row["val_accuracy"] for row in grid["history"])
    assert 0 <= grid["summary"]["test_accuracy"] <= 1
    for key in ("wall_seconds", "command", "commit", "date", "machine"):
        assert key in grid
    assert grid["machine"]["torch_threads"] >= 1 and "--preset tiny" in grid["command"]
    final0 = json.loads((folder / "softmax__final__s0.json").read_text())
    final1 = json.loads((folder / "softmax__final__s1.json").read_text())
    chosen = max(json.loads((folder / f"softmax__label_smoothing={v}__s0.json").read_text())["best_val"]
                 for v in ("0", "0.1", "0.2"))
    assert final0["best_val"] == chosen and final0["same_run_as"].startswith("softmax__label_smoothing=")
    assert final1["params"] == final0["params"] and final1["seed"] == 1 and "same_run_as" not in final1
    assert (folder / "runs" / "softmax__final__s1" / "checkpoint.pt").is_file()


def test_resume_skips_finished_runs_and_reruns_unfinished(tmp_path, monkeypatch):
    assert _bench(tmp_path, solvers="softmax", seeds="0,1,2") == 0
    folder = tmp_path / "classification"
    before = json.loads((folder / "softmax__final__s2.json").read_text())["summary"]
    # s1 was killed after its last epoch, before its result was written; s2 before any epoch ended
    (folder / "softmax__final__s1.json").unlink()
    (folder / "softmax__final__s2.json").unlink()
    for name in ("checkpoint.pt", "best.pt"):
        (folder / "runs" / "softmax__final__s2" / name).unlink()
    started = _count_training(monkeypatch)
    assert _bench(tmp_path, solvers="softmax", seeds="0,1,2") == 0
    assert started == [("softmax__final__s1", True), ("softmax__final__s2", False)]
    after = json.loads((folder / "softmax__final__s2.json").read_text())["summary"]
    assert after.pop("timing") and {k: v for k, v in before.items() if k != "timing"} == after
    assert "epoch 1/1" in (folder / "runs" / "softmax__final__s2.log").read_text()  # its lines, off the console
    # each grid run logs apart, though its name has a dot in it
    assert {p.name for p in (folder / "runs").glob("softmax__label_smoothing=*.log")} == {
        f"softmax__label_smoothing={v}__s0.log" for v in ("0", "0.1", "0.2")}
    started.clear()
    assert _bench(tmp_path, solvers="softmax", seeds="0,1,2") == 0
    assert started == []


def test_a_moved_results_folder_restarts_unfinished_runs(finished, tmp_path, monkeypatch):
    out = tmp_path / "moved"
    shutil.copytree(finished, out)
    (out / "classification" / "rbf__final__s1.json").unlink()
    started = _count_training(monkeypatch)
    assert _bench(out) == 0
    assert started == [("rbf__final__s1", False)]


def test_results_of_other_settings_are_refused(finished, tmp_path):
    """A result of another preset in the folder is refused, not overwritten (same preset: run again, below)."""
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    path = out / "classification" / "softmax__label_smoothing=0__s0.json"
    data = json.loads(path.read_text())
    data["config"]["width"] = 99
    data["preset"] = "full"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="holds 1 results of the full preset"):
        _bench(out)


def test_a_folder_of_one_preset_refuses_another_s_runs_its_dry_run_and_its_report(finished, tmp_path, capsys):
    """Runs of other seeds (new run ids) were added beside another preset's results: the report then mixed the two
    in one claim's statistics, and the new finals took the other preset's grid choices."""
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    for path in (out / "classification").glob("*.json"):  # the folder now holds the full preset's results
        path.write_text(json.dumps(dict(json.loads(path.read_text()), preset="full")))
    started = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "train", lambda *a, **kw: started.append(a))
        with pytest.raises(ConfigError, match=r"classification holds 10 results of the full preset; .*another --out"):
            _bench(out, seeds="5,6")
        with pytest.raises(ConfigError, match="holds 10 results of the full preset"):
            _bench(out, "--dry-run", seeds="5,6")
    assert started == []
    scarcity = out / "scarcity"
    scarcity.mkdir()
    tiny = dict(json.loads((finished / "classification" / "softmax__final__s0.json").read_text()))
    (scarcity / "softmax__n=all__final__s0.json").write_text(json.dumps(dict(tiny, run_id="softmax__n=all__final__s0")))
    with pytest.raises(ConfigError, match=r"holds results of the presets full, tiny \(classification: full; "
                                          r"scarcity: tiny\)"):
        write_report(out, tmp_path / "r" / "B.md", tmp_path / "r" / "plots")


def test_dry_run_says_which_stored_results_would_be_run_again(finished, tmp_path, capsys):
    """--dry-run called a result 'done' that the run itself redoes (its settings changed under the same preset)."""
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    path = out / "classification" / "softmax__label_smoothing=0.1__s0.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), config=dict(
        json.loads(path.read_text())["config"], width=99))))
    assert _bench(out, "--dry-run") == 0
    text = capsys.readouterr().out
    assert "redo  softmax__label_smoothing=0.1__s0  (its settings changed: run again)" in text
    assert "9 of 10 runs done" in text


def test_a_file_that_is_not_a_result_is_named(finished, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    broken = out / "classification" / "softmax__final__s1.json"
    broken.write_text(broken.read_text()[:100])
    with pytest.raises(DataError, match=r"softmax__final__s1.json is not a benchmark result \(JSONDecodeError"):
        write_report(out, tmp_path / "B.md", tmp_path / "plots")
    broken.write_text("{}")
    with pytest.raises(DataError, match=r"is not a benchmark result \(KeyError: 'run_id'\); move it out of"):
        _bench(out, "--dry-run")


def test_a_missing_results_folder_is_refused_by_the_report(tmp_path):
    with pytest.raises(ConfigError, match="nope does not exist or is not a folder"):
        write_report(tmp_path / "nope", tmp_path / "B.md", tmp_path / "plots")


def test_a_killed_run_s_earlier_epochs_count_in_its_wall_time(tmp_path, monkeypatch):
    """A run killed after a checkpoint and resumed recorded only the resumed part of its time."""
    spec = next(s for s in build_specs(get_suite("classification"), get_preset("tiny"), tmp_path, ["softmax"], [0])
                if s.role == "grid")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [{"epoch": 1, "seconds": 3.0, "seconds_val": 1.0, "val_accuracy": 0.5},
            {"epoch": 2, "seconds": 4.0, "seconds_refresh": 0.5, "val_accuracy": 0.6}]
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(runner, "_can_resume", lambda run_dir, cfg: True)
    monkeypatch.setattr(runner, "train", lambda cfg, resume, overwrite: {"test_accuracy": 0.5})
    assert runner._train(spec, run_dir)["seconds_before_resume"] == 8.5


def test_report_renders_tables_claims_commands_and_plots(finished, tmp_path):
    output = tmp_path / "report" / "BENCHMARKS.md"
    write_report(finished, output, tmp_path / "report" / "plots")
    text = output.read_text()
    assert "## 1. Classification accuracy with the same network" in text
    assert "| softmax | label_smoothing=0 |" in text and "**chosen**" in text
    assert "### Test accuracy of the chosen setting (%)" in text
    assert "**RBF beats softmax.**" in text and "| classification | RBF beats softmax. |" in text
    assert "`knnsolver bench classification --preset tiny" in text
    assert "Commit: `" in text and "CPUs" in text
    assert "Not run yet: `knnsolver bench scarcity" in text
    assert (tmp_path / "report" / "plots" / "classification_accuracy.png").stat().st_size > 1000
    assert "](plots/classification_accuracy.png)" in text
    assert "paired gain" in text and "- Convergence: " in text and "Stale" not in text
    assert "Not run: proxynca and normsoftmax. Under METHODS.md's reading HAL(tau) equals ProxyNCA" in text
    # only softmax and rbf ran (and seed 1 is not the preset's): the suite is marked unfinished
    assert "**In progress: 8 of 52 runs" in text and "(in progress) |" in text


def test_results_of_the_old_training_code_are_marked_stale(finished, tmp_path):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(finished, old)
    for path in (old / "classification").glob("*.json"):
        result = json.loads(path.read_text())
        del result["training"]
        path.write_text(json.dumps(result))
    output = tmp_path / "B.md"
    write_report(old, output, tmp_path / "plots")
    text = output.read_text()
    assert "**Stale: " in text and "(stale results) |" in text


def test_unknown_names_and_bad_flags_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown benchmark suite 'nope'; choose one of: classification"):
        bench_main(["nope"])
    with pytest.raises(ConfigError, match="unknown solver.*bogus"):
        _bench(tmp_path, solvers="softmax,bogus")
    with pytest.raises(ConfigError, match="studies the rbf solver"):
        _bench(tmp_path, suite="ablation", solvers="softmax")
    with pytest.raises(SystemExit):
        _bench(tmp_path, "--preset", "huge")


def test_dry_run_lists_runs_without_running(finished, capsys):
    assert _bench(finished, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "done  softmax__label_smoothing=0__s0" in out and "10 of 10 runs done" in out


def test_suites_plan_grids_before_finals_for_every_preset(tmp_path):
    for name in ("classification", "scarcity", "unseen-classes", "cost", "ablation"):
        for preset in ("tiny", "full"):
            specs = build_specs(get_suite(name), get_preset(preset), tmp_path)
            seen = set()
            for spec in specs:
                if spec.tune_from:
                    assert (spec.tune_from in seen) or spec.pick, (name, spec.run_id)
                if spec.role == "grid":
                    seen.add((spec.method, spec.condition))


def _runs(values, diverged=()):
    return [{"seed": s, "summary": {"test_accuracy": v, **({"diverged": True} if s in diverged else {})}}
            for s, v in enumerate(values)]


def test_verdicts_are_paired_by_seed():
    # seed-paired gains of 0.10 +- 0.001: holds, although the two spreads overlap a lot
    assert compare(_runs([0.90, 0.80, 0.95]), _runs([0.80, 0.70, 0.849]), "test_accuracy").verdict == HOLDS
    assert compare(_runs([0.80, 0.70, 0.849]), _runs([0.90, 0.80, 0.95]), "test_accuracy").verdict == FAILS
    assert compare(_runs([0.90, 0.95, 0.85]), _runs([0.89, 0.9, 0.91]), "test_accuracy").verdict == OPEN
    test = compare(_runs([0.9, 0.91, 0.92]), _runs([0.895, 0.9, 0.905]), "test_accuracy", margin=0.01)
    assert test.verdict == OPEN and test.threshold == 0.01
    assert compare(_runs([0.9]), _runs([0.8]), "test_accuracy").verdict == OPEN  # one seed: no interval
    # a diverged run is left out, with its pair
    assert compare(_runs([0.9, 0.1, 0.91, 0.92], diverged={1}), _runs([0.8, 0.85, 0.81, 0.82]),
                   "test_accuracy").n == 3
    assert combine([HOLDS, HOLDS]) == HOLDS and combine([HOLDS, OPEN]) == OPEN and combine([OPEN, FAILS]) == FAILS


def test_a_verdict_against_a_side_still_rising_is_withheld():
    """"a beats b" holds by the interval, but b was still improving when its budget ended: inconclusive, with
    the reason; b flat at the end: the verdict stands. The same for "does not hold" when a is still rising."""
    def runs(values, curve):
        return [{"seed": s, "summary": {"test_accuracy": v, "best_epoch": 1 + max(range(10), key=curve.__getitem__)},
                 "config": {"epochs": 10}, "val_key": "val_accuracy",
                 "history": [{"epoch": e + 1, "val_accuracy": c} for e, c in enumerate(curve)]} for s, v in enumerate(values)]

    up, flat = [0.80 + 0.01 * e for e in range(10)], [0.9] * 5 + [0.91] + [0.9] * 4
    strong, weak = [0.90, 0.80, 0.95], [0.80, 0.70, 0.849]
    held = compare(runs(strong, flat), runs(weak, up), "test_accuracy", names=("hal", "lifted"))
    assert held.outcome() == "inconclusive: holds by the interval, but lifted was still rising at the end of its budget"
    assert compare(runs(strong, flat), runs(weak, flat), "test_accuracy").verdict == HOLDS
    assert compare(runs(strong, up), runs(weak, flat), "test_accuracy").verdict == HOLDS  # the winner rising: stands
    failed = compare(runs(weak, up), runs(strong, flat), "test_accuracy", names=("rbf", "softmax"))
    assert failed.verdict == OPEN and "does not hold by the interval, but rbf was still rising" in failed.outcome()


def _fake_execute(ran, folder_check=None, pause=0.0):
    """A stand-in for :func:`runner.execute` that records what ran; the score rises with the grid index."""
    import time

    from knnsolver.bench.suites import VAL_KEYS

    def fake(spec, folder):
        if folder_check is not None:
            folder_check(spec, folder)
        ran.append(spec.run_id)
        time.sleep(pause)
        cfg = spec.train_config(str(folder / "runs" / spec.run_id)).to_dict()
        key = VAL_KEYS[cfg["split"]]
        score = 0.5 + 0.01 * (spec.grid_index or 0) + 0.001 * spec.seed
        return {"config": cfg, "summary": {"test_accuracy": score, "precision_at_1": score, "best_epoch": 1},
                "val_key": key, "best_val": score, "history": [{"epoch": 1, key: score}]}

    return fake


def test_workers_share_a_suite_running_each_run_once_and_finals_after_their_grids(tmp_path, monkeypatch):
    """Two workers on one folder: every run made once, by one of them; a final starts only once its whole
    grid is stored, the best-other pick only once the finals it chooses among are; timings are left out."""
    import threading

    from knnsolver.bench.suites import grid_results

    monkeypatch.setattr(runner, "WAIT_S", 0.01)
    ran, problems = [], []

    def check(spec, folder):
        stored = runner.load_results(folder)
        if spec.role == "final" and spec.tune_from is not None and spec.seed != 0:
            method, condition = spec.tune_from
            if len(grid_results(stored, method, condition)) < 3:
                problems.append(f"{spec.run_id} started before its grid was stored")
        if spec.method not in ("rbf", "triplet") and spec.condition != "dim=64":  # the best-other pick
            if sum(r["role"] == "final" and r["condition"] == "dim=64" and r["method"] == "npairs"
                   for r in stored.values()) < 2:
                problems.append(f"{spec.run_id} picked before the npairs finals were stored")

    monkeypatch.setattr(runner, "execute", _fake_execute(ran, check, pause=0.02))
    suite, preset = get_suite("unseen-classes"), get_preset("tiny")
    workers = [threading.Thread(target=runner.run_suite, args=(suite, preset, tmp_path, ["rbf", "triplet", "npairs"],
                                                                [0, 1]), kwargs={"worker": True}) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not problems
    assert len(ran) == len(set(ran))  # no run twice
    results = runner.load_results(tmp_path / "unseen-classes")
    specs = build_specs(suite, preset, tmp_path, ["rbf", "triplet", "npairs"], [0, 1])
    assert {s.run_id for s in specs} == set(results)
    assert set(ran) == {r for r, v in results.items() if "same_run_as" not in v}
    assert not list((tmp_path / "unseen-classes" / ".claims").iterdir())  # every claim released
    # the cost suite's timings wait for a call without --worker; its time-to-target trainings are shared
    monkeypatch.setattr(runner, "step_cost", lambda spec: pytest.fail("a worker timed a step"))
    cost = runner.run_suite(get_suite("cost"), preset, tmp_path, ["softmax", "triplet"], [0], worker=True)
    assert {r["kind"] for r in cost.values()} == {"train"}


def test_a_run_claimed_by_a_live_process_is_left_to_it_and_a_dead_ones_claim_is_taken_over(tmp_path):
    import subprocess
    import sys

    claims = runner.Claims(tmp_path)
    assert claims.take("a") and not claims.take("a")  # held by this process already
    claims.release("a")
    assert claims.holder("a") is None and claims.take("a")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        host = claims.owner.split(":")[0]
        (tmp_path / ".claims" / "b").write_text(f"{host}:{live.pid}")
        (tmp_path / ".claims" / "c").write_text(f"{host}:{dead.pid}")
        assert not claims.take("b") and claims.holder("b") == f"{host}:{live.pid}"
        assert claims.take("c") and claims.holder("c") == claims.owner  # a killed worker's run is taken over
        claims.release("b")  # not ours: left alone
        assert claims.holder("b") == f"{host}:{live.pid}"
    finally:
        live.kill()


def test_a_final_waits_while_another_process_makes_its_grid(tmp_path, monkeypatch):
    """With one grid point claimed by a live process, a worker runs what it can, then has only waits left."""
    import subprocess
    import sys

    ran = []
    monkeypatch.setattr(runner, "execute", _fake_execute(ran))
    suite, preset = get_suite("classification"), get_preset("tiny")
    specs = build_specs(suite, preset, tmp_path, ["softmax"], [0, 1])
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        claims = runner.Claims(tmp_path / "classification")
        (tmp_path / "classification" / ".claims").mkdir(parents=True)
        held = specs[1].run_id  # a grid point
        (tmp_path / "classification" / ".claims" / held).write_text(f"{claims.owner.split(':')[0]}:{live.pid}")
        for expected in (specs[0], specs[2]):
            task, left = runner.next_task(specs, specs, runner.load_results(tmp_path / "classification"), preset,
                                          claims)
            assert task == expected and left
            runner._run_one(task, "", suite=suite, preset=preset, folder=tmp_path / "classification",
                            results=runner.load_results(tmp_path / "classification"), command="", commit="", host={})
            claims.release(task.run_id)
        assert runner.next_task(specs, specs, runner.load_results(tmp_path / "classification"), preset,
                                claims) == (None, True)
        assert runner.waits_for(specs[-1], specs, runner.load_results(tmp_path / "classification"), preset) == [held]
    finally:
        live.kill()
    live.wait()  # the holder is gone: its claim is stale, so the grid point is this worker's to run
    task, _ = runner.next_task(specs, specs, runner.load_results(tmp_path / "classification"), preset, claims)
    assert task == specs[1]


def test_the_full_preset_runs_what_its_claims_need_with_5_seeds_and_bracketing_grids(tmp_path):
    from knnsolver.bench.suites import GRIDS

    full = get_preset("full")
    assert full.seeds == (0, 1, 2, 3, 4) and full.standard["lr_schedule"] == "constant"
    specs = build_specs(get_suite("classification"), full, tmp_path)
    assert {s.method for s in specs} == {"softmax", "rbf", "hal", "nca", "triplet", "lifted", "npairs",
                                        "multisimilarity"}
    assert len(specs) == 8 * (3 + 5)
    assert {s.config["lr"] for s in specs} == {1e-3}  # one learning rate for every solver
    # rbf trains the same epochs (its bank refreshed every pass); on the gpu preset, whose passes are 446 steps,
    # it trains the same stream of batches in epochs of 100 steps, as long, validated as often in steps
    soft, rbf = (next(s for s in specs if s.method == m) for m in ("softmax", "rbf"))
    assert soft.config.get("epoch_steps") is None and rbf.config.get("epoch_steps") is None
    gpu = build_specs(get_suite("classification"), get_preset("gpu"), tmp_path)
    soft, rbf = (next(s for s in gpu if s.method == m) for m in ("softmax", "rbf"))
    assert soft.config.get("epoch_steps") is None and rbf.config["epoch_steps"] == 100
    assert 0 <= rbf.config["epochs"] * 100 - soft.config["epochs"] * 446 < 100
    assert abs(rbf.config["eval_every"] * 100 - soft.config["eval_every"] * 446) <= 50
    for solver, grid in GRIDS.items():  # a 3-point grid around the middle value, so an optimum can be bracketed
        (values,) = grid.values()
        assert len(values) == 3 and values[0] < values[1] < values[2], solver


@pytest.mark.parametrize("name, sizes, epoch_steps", [
    ("full", {"n=10", "n=20", "n=50", "n=100", "n=500"}, 100),
    ("gpu", {"n=10", "n=20", "n=50", "n=100", "n=500", "n=1000", "n=all"}, 200),
])
def test_every_scarcity_size_gets_the_step_budget_and_a_bank_refresh_every_few_steps(tmp_path, name, sizes,
                                                                                     epoch_steps):
    """All 57,000 images once took 2 epochs (1,782 steps, not 2,400) with 891 steps between RBF refreshes; on
    the CPU they are left out (their passes do not fit its budget). Early stopping waits a fifth of a run's
    validation passes, rounded up, where the preset sets it."""
    import math

    preset = get_preset(name)
    specs = [s for s in build_specs(get_suite("scarcity"), preset, tmp_path) if s.role == "final" and s.seed == 0]
    assert {s.condition for s in specs} == sizes
    for spec in specs:
        c = spec.config
        rows = preset.train_rows if c["max_per_class"] is None else c["max_per_class"] * preset.num_classes
        per_pass = math.ceil(rows / c["batch_size"])
        per_epoch = c.get("epoch_steps") or per_pass
        assert per_epoch <= epoch_steps and per_epoch <= per_pass, spec.run_id
        assert preset.scarcity_steps <= c["epochs"] * per_epoch < preset.scarcity_steps + per_epoch, spec.run_id
        passes = c["epochs"] // c["eval_every"]
        assert c["patience"] == math.ceil(passes / 5), spec.run_id
        if spec.solver == "rbf":
            assert c["solver_options"]["update_interval"] == 1
    if name == "full":
        small = next(s for s in specs if s.condition == "n=10")
        assert (small.config["epochs"], small.config["eval_every"], small.config["patience"]) == (3000, 150, 4)
    else:
        everything = next(s for s in specs if s.condition == "n=all")
        assert (everything.config["epochs"], everything.config["epoch_steps"]) == (15, 200)
    # every size tunes its own grid (sigma chosen at 100 per class did not suit all 57,000 images)
    grids = {(s.method, s.condition) for s in build_specs(get_suite("scarcity"), preset, tmp_path) if s.role == "grid"}
    if preset.scarcity_reference == "each":
        assert grids == {(m, c) for m in ("softmax", "rbf") for c in sizes}
        assert all(s.tune_from == (s.method, s.condition) for s in specs)


def test_gpu_results_go_to_their_own_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for folder in ("results", "results-gpu"):
        (tmp_path / "benchmarks" / folder / "classification").mkdir(parents=True)
    done = tmp_path / "benchmarks" / "results-gpu" / "classification" / "softmax__final__s1.json"
    done.write_text(json.dumps({"run_id": "softmax__final__s1"}))
    assert bench_main(["classification", "--preset", "gpu", "--solvers", "softmax", "--dry-run"]) == 0
    assert "1 of 8 runs done" in capsys.readouterr().out
    assert bench_main(["classification", "--preset", "full", "--solvers", "softmax", "--dry-run"]) == 0
    assert "0 of 8 runs done" in capsys.readouterr().out
    assert get_preset("gpu").hardware == "gpu" and get_preset("gpu").standard["device"] == "cuda"


def test_the_commit_can_be_named_by_the_sender(monkeypatch):
    """A working tree copied to a lent GPU machine may carry a stale .git: KNNSOLVER_COMMIT names the commit."""
    monkeypatch.setenv("KNNSOLVER_COMMIT", "abc1234")
    assert runner.git_commit() == "abc1234"
    monkeypatch.delenv("KNNSOLVER_COMMIT")
    assert runner.git_commit() != "abc1234"


def test_results_stored_before_a_setting_was_added_still_match(finished, tmp_path, monkeypatch):
    """A setting added to TrainConfig later (at its default) does not make stored results 'other settings'."""
    out = tmp_path / "older"
    shutil.copytree(finished, out)
    for path in (out / "classification").glob("*.json"):
        data = json.loads(path.read_text())
        del data["config"]["image_cache_mb"]  # as stored by the code before the field existed
        data["config"]["plots"] = False  # the spelling before "off"
        path.write_text(json.dumps(data))
    started = _count_training(monkeypatch)
    assert _bench(out) == 0 and started == []


def test_a_raised_budget_continues_stored_runs_from_their_checkpoints(tmp_path, monkeypatch):
    """At a constant learning rate, more epochs continue the stored runs (grid and finals) from their
    checkpoints; the results equal a straight run of the longer budget."""
    import dataclasses

    from knnsolver.bench import suites

    def preset(epochs):
        tiny = suites.PRESETS["tiny"]
        return dataclasses.replace(tiny, standard=dict(tiny.standard, epochs=epochs, lr_schedule="constant"))

    monkeypatch.setitem(suites.PRESETS, "tiny", preset(1))
    assert _bench(tmp_path / "short", solvers="softmax") == 0
    final = tmp_path / "short" / "classification" / "softmax__final__s1.json"
    chosen_before = json.loads(final.read_text())["params"]
    monkeypatch.setitem(suites.PRESETS, "tiny", preset(2))
    started = _count_training(monkeypatch)
    assert _bench(tmp_path / "short", solvers="softmax") == 0
    # the grid is continued; the final too, unless the longer grid chose another setting (then it runs again)
    same_choice = json.loads(final.read_text())["params"] == chosen_before
    assert sorted(started) == sorted([("softmax__final__s1", same_choice),
                                      *[(f"softmax__label_smoothing={v}__s0", True) for v in ("0", "0.1", "0.2")]])
    assert _bench(tmp_path / "straight", solvers="softmax") == 0
    for path in (tmp_path / "straight" / "classification").glob("*.json"):
        want = json.loads(path.read_text())
        got = json.loads((tmp_path / "short" / "classification" / path.name).read_text())
        assert len(got["history"]) == 2 and got["params"] == want["params"]
        for key in ("test_accuracy", "best_epoch"):
            assert got["summary"][key] == want["summary"][key], (path.name, key)


def test_a_results_folder_without_the_grids_still_renders(finished, tmp_path):
    """A partial copy (here: the GPU slice, whose grid files were lost in transfer) renders without choosing."""
    out = tmp_path / "partial"
    shutil.copytree(finished, out)
    for path in (out / "classification").glob("softmax__label_smoothing=*.json"):
        path.unlink()
    text = write_report(out, tmp_path / "B.md", tmp_path / "plots").read_text()
    assert "**In progress: " in text


def _grid_specs(solver, values, condition=""):
    from knnsolver.bench.suites import RunSpec

    return [RunSpec(f"{solver}@{condition}__{v}", "train", solver, condition, 0, "grid", {"solver": solver}, {k: v},
                    grid_index=i) for i, (k, v) in enumerate(values)]


def _stored(specs, scores):
    return [{"run_id": s.run_id, "params": dict(s.params), "best_val": score, "grid_index": s.grid_index}
            for s, score in zip(specs, scores)]


def test_a_grid_whose_edge_is_chosen_is_extended_along_the_ladder():
    from knnsolver.bench.suites import LADDERS, choose, grid_extension

    grid = _grid_specs("hal", [("tau", v) for v in (0.05, 0.1, 0.2)])
    up = grid_extension(grid, _stored(grid, [0.80, 0.81, 0.83]))  # the upper edge wins: try 0.4 next
    assert up.params == {"tau": 0.4} and up.grid_index == 3 and up.seed == 0 and up.role == "grid"
    assert up.run_id == "hal__tau=0.4__s0" and up.config == grid[0].config
    down = grid_extension(grid, _stored(grid, [0.83, 0.81, 0.80]))
    assert down.params == {"tau": 0.025}
    assert grid_extension(grid, _stored(grid, [0.80, 0.83, 0.80])) is None  # interior: bracketed
    # a best point at an edge is extended even when an earlier point ties with it (the final still takes the
    # earlier one): a flat edge does not bracket the optimum
    wider = grid + [up]
    assert grid_extension(wider, _stored(wider, [0.80, 0.81, 0.83, 0.83])).params == {"tau": 0.8}
    assert choose(_stored(wider, [0.80, 0.81, 0.83, 0.83]))["params"] == {"tau": 0.2}
    assert grid_extension(wider, _stored(wider, [0.80, 0.81, 0.83, 0.82])) is None
    assert grid_extension(grid, _stored(grid, [0.83, 0.80, 0.83])).params == {"tau": 0.4}  # both edges tie: up first
    assert grid_extension(grid, _stored(grid, [0.80, 0.83, 0.83])).params == {"tau": 0.4}  # npairs' tie in session 6
    # at the ladder's end there is nothing more to try
    top = _grid_specs("hal", [("tau", v) for v in LADDERS["hal"][-3:]])
    assert grid_extension(top, _stored(top, [0.1, 0.2, 0.3])) is None
    # a grid that is not a run of ladder values (the ablation's sigma sweep, 0 = automatic) is left alone
    sweep = _grid_specs("rbf", [("sigma", v) for v in (0.0, 0.05, 0.1, 0.2, 0.4)])
    assert grid_extension(sweep, _stored(sweep, [0.1, 0.2, 0.3, 0.4, 0.5])) is None


def test_every_grid_is_a_run_of_its_ladder():
    from knnsolver.bench.suites import GRIDS, LADDERS

    for solver, grid in GRIDS.items():
        ((_, values),) = grid.items()
        ladder = LADDERS[solver]
        at = ladder.index(values[0])
        assert ladder[at:at + len(values)] == tuple(values), solver
        assert list(ladder) == sorted(ladder), solver


def test_every_ladder_value_builds_its_solver():
    """A grid extension must never reach a value its solver refuses (softmax's ladder ends at 0.9 < 1)."""
    from knnsolver.bench.suites import GRIDS, LADDERS
    from knnsolver.registry import SOLVERS

    for solver, grid in GRIDS.items():
        ((name, _),) = grid.items()
        for value in LADDERS[solver]:
            SOLVERS.get(solver)(8, 3, 300, **{name: value})


def test_the_runner_extends_a_grid_before_its_finals_choose(tmp_path, monkeypatch):
    """Validation rising towards the upper edge makes the runner try 0.3 then 0.4 (the ladder's end) before
    the finals, which take the extended choice; a second call runs nothing; the report shows every point."""
    import dataclasses

    from knnsolver.bench import suites

    monkeypatch.setitem(suites.PRESETS, "tiny", dataclasses.replace(suites.PRESETS["tiny"], extend_grids=True))
    ran = []

    def fake(spec, folder):
        smoothing = spec.params["label_smoothing"]
        ran.append(spec.run_id)
        score = 0.5 + smoothing - (smoothing > 0.35) * 0.2  # peaks at 0.3, beyond the first grid
        return {"config": spec.train_config(str(folder / "runs" / spec.run_id)).to_dict(), "summary": {
            "test_accuracy": score, "best_epoch": 1}, "val_key": "val_accuracy", "best_val": score,
            "history": [{"epoch": 1, "val_accuracy": score}]}

    monkeypatch.setattr(runner, "execute", fake)
    assert _bench(tmp_path, solvers="softmax") == 0
    assert ran == ["softmax__label_smoothing=0__s0", "softmax__label_smoothing=0.1__s0",
                   "softmax__label_smoothing=0.2__s0", "softmax__label_smoothing=0.3__s0",
                   "softmax__label_smoothing=0.4__s0", "softmax__final__s1"]
    folder = tmp_path / "classification"
    for seed in (0, 1):
        assert json.loads((folder / f"softmax__final__s{seed}.json").read_text())["params"] == {"label_smoothing": 0.3}
    ran.clear()
    assert _bench(tmp_path, solvers="softmax") == 0 and ran == []
    text = write_report(tmp_path, tmp_path / "B.md", tmp_path / "plots").read_text()
    assert "| softmax | label_smoothing=0.3 | 80.00 | **chosen** |" in text
    assert "label_smoothing=0.4 | 70.00" in text and "still to be extended" not in text
    # the report says when a grid still has an extension due
    (folder / "softmax__label_smoothing=0.4__s0.json").unlink()
    assert "1 grid(s) chose an edge and are still to be extended" in write_report(
        tmp_path, tmp_path / "B.md", tmp_path / "plots").read_text()


def test_a_grid_is_extended_only_on_results_that_stand(tmp_path, monkeypatch):
    """A grid point stored under older settings (to be run again) does not choose an edge to extend from."""
    import dataclasses

    from knnsolver.bench import suites

    preset = dataclasses.replace(suites.PRESETS["tiny"], extend_grids=True)
    monkeypatch.setattr(runner, "execute", _fake_execute([]))  # validation rises with the grid index: upper edge
    suite = get_suite("classification")
    specs = build_specs(suite, preset, tmp_path, ["softmax"], [0])
    folder = tmp_path / "classification"
    for spec in specs[:3]:
        runner._run_one(spec, "", suite=suite, preset=preset, folder=folder, results=runner.load_results(folder),
                        command="", commit="", host={})
    grid = specs[:3]
    assert runner.next_extension(grid, runner.load_results(folder), "tiny").params == {"label_smoothing": 0.3}
    path = folder / f"{specs[2].run_id}.json"
    stale = json.loads(path.read_text())
    stale["config"]["width"] = 99  # same preset, older settings: it runs again before the grid chooses
    path.write_text(json.dumps(stale))
    assert runner.next_extension(grid, runner.load_results(folder), "tiny") is None


def test_wall_time_is_the_union_of_the_runs_intervals():
    from knnsolver.bench.report import wall_seconds

    def run(end, seconds, started=None, **extra):
        r = {"date": f"2026-11-30T10:{end}+00:00", "wall_seconds": seconds, **extra}
        return r if started is None else {**r, "started": f"2026-11-30T10:{started}+00:00"}

    results = {"a": run("01:00", 60.0), "b": run("01:40", 40.0, started="01:00"),  # one worker: 0:00-1:40
               "c": run("01:10", 70.0),  # the other worker, side by side: 0:00-1:10
               "d": run("03:15", 15.0),  # a later pass alone: 3:00-3:15
               "e": run("05:00", 99.0, same_run_as="a"),  # copied: costs nothing
               "f": run("04:00", 50.0, started="03:30")}  # continued: 30 s now, 20 s in an earlier call
    assert wall_seconds(results) == 100.0 + 15.0 + 30.0 + 20.0


def test_results_written_into_tracked_files_do_not_mark_the_commit_modified(tmp_path, monkeypatch):
    """A suite writes its results into tracked files while it runs; only a change to the code marks a commit."""
    import subprocess

    monkeypatch.delenv("KNNSOLVER_COMMIT", raising=False)
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "benchmarks").mkdir()
    (repo / "src" / "code.py").write_text("x = 1\n")
    (repo / "benchmarks" / "result.json").write_text("{}\n")

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                       capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    head = runner.git_commit(repo / "src")
    assert len(head) == 40
    (repo / "benchmarks" / "result.json").write_text('{"run": 1}\n')
    assert runner.git_commit(repo / "src") == head
    (repo / "src" / "code.py").write_text("x = 2\n")
    assert runner.git_commit(repo / "src") == head + "+modified"


def test_step_cost_times_the_centralized_loss_with_more_classes_than_dimensions():
    """The cost suite times 1,000 classes in 64-d; orthogonal centres cannot exist there, so the centralized loss
    runs with allow_correlated=True instead of stopping the suite."""
    from knnsolver.bench.suites import RunSpec

    config = dict(batch_sizes=[16], class_counts=[4, 24], embedding_dim=8, bank_size=96, repeats=2, budget_s=0.5,
                  max_step_s=2.0, solver="centralized", solver_options={})
    rows = runner.step_cost(RunSpec("centralized@step__s0", "step_cost", "centralized", "step", 0, "final", config,
                                    {}))["step_times"]
    assert [(r["num_classes"], r["batch_size"]) for r in rows] == [(4, 16), (24, 16)]
    assert all(0 < r["q1_s"] <= r["median_s"] <= r["q3_s"] for r in rows)


def test_step_cost_skips_triplet_batches_with_too_many_triplets(monkeypatch):
    """The miner indexes every triplet first: a batch over the limit is listed as skipped, not timed for minutes."""
    import torch

    from knnsolver.bench.suites import RunSpec

    labels = torch.arange(32) % 4  # 8 per class: 32 * 7 * 24 = 5,376 triplets
    assert runner.triplet_count(labels) == 32 * 7 * 24
    # any 32 labels of 4 classes hold at most 7,680 triplets, any 64 at least 10,980
    monkeypatch.setattr(runner, "MAX_TRIPLETS", 8000)
    config = dict(batch_sizes=[16, 32, 64], class_counts=[4], embedding_dim=8, bank_size=128, repeats=2, budget_s=0.5,
                  max_step_s=2.0, solver="triplet", solver_options={})
    out = runner.step_cost(RunSpec("triplet@step__s0", "step_cost", "triplet", "step", 0, "final", config, {}))
    assert [r["batch_size"] for r in out["step_times"]] == [16, 32]
    assert [(t["batch_size"], t["num_classes"]) for t in out["skipped"]] == [(64, 4)]
    assert "triplets (over 8e+03)" in out["skipped"][0]["why"]


def test_lifted_structure_batches_too_large_for_memory_are_skipped():
    """At B=256 with 10 classes its positive x negative pair matrix has 3.7e8 entries (over 23 GiB in one step)."""
    import itertools

    import torch

    small = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pairs = list(itertools.permutations(small.tolist(), 2))  # ordered pairs, counted one by one
    assert runner.pair_product(small) == sum(a == b for a, b in pairs) * sum(a != b for a, b in pairs)
    ten = torch.arange(256) % 10
    assert "positive x negative pairs (over 1e+08)" in runner.oversized("lifted", ten)
    assert runner.oversized("lifted", torch.arange(256) % 100) is None  # 2.6e7
    assert runner.oversized("nca", ten) is None


def test_a_changed_setting_of_the_same_preset_runs_again_and_the_report_says_so(finished, tmp_path, monkeypatch):
    """A budget change that cannot continue a run (here the evaluation interval) redoes the stored runs of that
    preset instead of refusing them; until then the report leaves the old results out of every table and
    verdict (a re-run half done once paired new rbf seeds with old softmax ones)."""
    import dataclasses

    from knnsolver.bench import suites

    out = tmp_path / "changed"
    shutil.copytree(finished, out)
    tiny = suites.PRESETS["tiny"]
    monkeypatch.setitem(suites.PRESETS, "tiny", dataclasses.replace(tiny, standard=dict(tiny.standard, eval_every=2)))
    text = write_report(out, tmp_path / "B.md", tmp_path / "plots").read_text()
    assert "Not run yet under the current budgets: `knnsolver bench classification" in text
    assert "(10 results of earlier budgets or of code changed since are left out)" in text and "**RBF beats softmax.**" not in text
    started = _count_training(monkeypatch)
    assert _bench(out, solvers="softmax") == 0
    text = write_report(out, tmp_path / "B.md", tmp_path / "plots").read_text()
    assert "(5 results of earlier budgets or of code changed since are left out of every table and verdict)" in text
    assert "**RBF beats softmax.** NOT DECIDED" in text and "| rbf |" not in text
    assert _bench(out) == 0
    assert len(started) == len(list((finished / "classification").glob("*.json"))) - 2  # finals s0 copy their grid
    assert all(not resumed for _, resumed in started)
    for path in (out / "classification").glob("*.json"):
        assert json.loads(path.read_text())["config"]["eval_every"] == 2


def test_unseen_class_runs_validate_on_held_out_classes_with_fixed_rbf_weights(tmp_path):
    """Issue 11's unseen-classes protocol: class-disjoint validation, and RBF weights fixed at 1 there (the
    paper learns them for classification only)."""
    for preset in ("full", "gpu", "tiny"):
        unseen = build_specs(get_suite("unseen-classes"), get_preset(preset), tmp_path)
        assert all(s.config["val_classes"] == [4, 6] and s.config["train_classes"] == [0, 1, 2, 3, 4, 6] for s in unseen)
        assert not any("learn_weights" in s.config["solver_options"] for s in unseen)  # the split's default: fixed
        target = [s for s in build_specs(get_suite("cost"), get_preset(preset), tmp_path) if s.condition == "target"]
        assert target and all(s.config["val_classes"] == [4, 6] for s in target)
    from knnsolver.registry import SOLVERS

    rbf = SOLVERS.get("rbf")
    assert rbf.protocol_defaults("disjoint", pretrained=True) == {"learn_weights": False}
    assert rbf.protocol_defaults("standard", pretrained=True) == {}
    assert rbf.protocol_defaults("standard") == {"update_interval": 1}  # from random weights: refresh every epoch


def test_grid_points_made_under_other_settings_are_set_aside_before_finals_choose(tmp_path, monkeypatch):
    """An extension stored by an earlier run of the suite under other settings (here: another validation set,
    which scored it 0.99) is no point of today's grid: it is moved to stale/, and the finals choose among
    today's points (the interior 0.1), not by its old score."""
    import dataclasses

    from knnsolver.bench import suites

    preset = dataclasses.replace(suites.PRESETS["tiny"], extend_grids=True)
    monkeypatch.setitem(suites.PRESETS, "tiny", preset)

    def peaked(spec, folder):
        out = _fake_execute([])(spec, folder)
        out["best_val"] = 0.5 + 0.1 * (spec.params["label_smoothing"] == 0.1)
        return out

    monkeypatch.setattr(runner, "execute", peaked)
    folder = tmp_path / "classification"
    folder.mkdir()
    spec = build_specs(get_suite("classification"), preset, tmp_path, ["softmax"], [0])[0]
    old = dataclasses.replace(spec, params={"label_smoothing": 0.3}, grid_index=3, config={**spec.config, "width": 99})
    stale = {"run_id": "softmax__label_smoothing=0.3__s0", "suite": "classification", "kind": "train", "role": "grid",
             "method": "softmax", "condition": "", "seed": 0, "params": {"label_smoothing": 0.3}, "grid_index": 3,
             "preset": "tiny", "best_val": 0.99, "config": old.train_config(str(folder / "runs" / "x")).to_dict()}
    (folder / "softmax__label_smoothing=0.3__s0.json").write_text(json.dumps(stale))
    assert _bench(tmp_path, solvers="softmax") == 0
    results = runner.load_results(folder)
    assert results["softmax__final__s1"]["params"] == {"label_smoothing": 0.1}
    assert "softmax__label_smoothing=0.3__s0" not in results
    assert (folder / "stale" / "softmax__label_smoothing=0.3__s0.json").is_file()


def test_a_best_other_final_runs_again_when_the_pick_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "WAIT_S", 0.01)
    monkeypatch.setattr(runner, "execute", _fake_execute([]))
    suite, preset = get_suite("unseen-classes"), get_preset("tiny")
    results = runner.run_suite(suite, preset, tmp_path, ["rbf", "triplet", "npairs", "lifted"], [0, 1])
    specs = build_specs(suite, preset, tmp_path, ["rbf", "triplet", "npairs", "lifted"], [0, 1])
    pick = next(s for s in specs if s.pick)
    stored = results[pick.run_id]
    assert runner.outdated(pick, stored, results, "tiny") is None
    other = "npairs" if stored["method"] == "lifted" else "lifted"
    assert runner.outdated(pick, {**stored, "method": other}, results, "tiny") == (
        f"the pick is now {stored['method']}: run again")


def test_the_report_shows_thread_counts_that_changed_during_the_runs(finished, tmp_path):
    """Under the OpenMP leak a run recorded 1 thread at its start and ran with 2: the report says so."""
    out = tmp_path / "threads"
    shutil.copytree(finished, out)
    path = out / "classification" / "softmax__final__s1.json"
    data = json.loads(path.read_text())
    data["summary"]["threads"] = data["machine"]["torch_threads"] + 1
    path.write_text(json.dumps(data))
    text = write_report(out, tmp_path / "B.md", tmp_path / "plots").read_text()
    assert "- Torch threads at the end of the runs (the machine line has them at the start): " in text
    assert f"{data['summary']['threads']} in 1 runs" in text
    assert "Torch threads at the end" not in write_report(finished, tmp_path / "A.md", tmp_path / "p").read_text()


def test_the_ablation_table_pairs_each_variant_with_the_base_by_seed_and_counts_seeds(tmp_path):
    from knnsolver.bench.report import Plots, render_ablation

    def run(condition, seed, acc):
        return {"run_id": f"rbf@{condition}__final__s{seed}", "role": "final", "kind": "train", "method": "rbf",
                "condition": condition, "seed": seed, "preset": "tiny", "best_val": acc, "params": {},
                "summary": {"test_accuracy": acc}, "history": []}

    spread = (0.70, 0.80, 0.75, 0.85, 0.78)  # seed-to-seed spread far above the variant's paired gain
    rows = [run("k=100,interval=1", s, a) for s, a in enumerate(spread)]
    rows += [run("k=10", s, a + 0.01) for s, a in enumerate(spread)]
    rows += [run("k=20", s, a - 0.02) for s, a in enumerate(spread[:2])]
    body = render_ablation({r["run_id"]: r for r in rows}, Plots(tmp_path / "plots", tmp_path / "B.md")).body
    assert "| neighbours k | k=10 | 5 | " in body and "| +1.00 [+1.00, +1.00] |" in body
    assert "| neighbours k | k=20 | 2 | " in body and "| -2.00 [-2.00, -2.00] |" in body


def test_grid_points_within_the_finals_seed_spread_of_the_choice_are_marked():
    """A grid runs on one seed; a point closer to the choice than the finals' spread could have won on another."""
    from knnsolver.bench.report import grid_table

    def run(role, params, seed, val, index=0):
        return {"run_id": f"hal__{params}__s{seed}__{role}", "role": role, "method": "hal", "condition": "",
                "params": {"tau": params}, "seed": seed, "best_val": val, "grid_index": index}

    rows = [run("grid", 0.05, 0, 0.80, 0), run("grid", 0.1, 0, 0.85, 1), run("grid", 0.2, 0, 0.845, 2)]
    rows += [run("final", 0.1, s, v) for s, v in enumerate((0.85, 0.86, 0.84, 0.85, 0.855))]
    text = grid_table({r["run_id"]: r for r in rows}, [("hal", "")], "accuracy")
    assert "| hal | tau=0.2 | 84.50 | within the finals' seed spread (0.74) of the chosen |" in text
    assert "| hal | tau=0.05 | 80.00 |  |" in text and "| hal | tau=0.1 | 85.00 | **chosen** |" in text


def test_the_scarcity_table_shows_epochs_by_steps_and_the_rbf_centre_drift(tmp_path):
    from knnsolver.bench.report import Plots, render_scarcity

    def run(method, condition, seed, acc, config, drift=None):
        history = [{"epoch": e + 1, "solver_median_own_centre_distance": (drift or 0) * 0.2 * (e + 1) / 4,
                    "solver_sigma": 0.2} for e in range(4)] if drift else []
        return {"run_id": f"{method}@{condition}__final__s{seed}", "role": "final", "kind": "train", "method": method,
                "condition": condition, "seed": seed, "preset": "full", "params": {}, "config": config,
                "best_val": acc, "summary": {"test_accuracy": acc}, "history": history}

    small = {"epochs": 150, "batch_size": 64, "max_per_class": 100, "patience": 4}  # a cap: runs stop early
    everything = {"epochs": 24, "epoch_steps": 100, "batch_size": 64, "max_per_class": None}
    rows = []
    for s in range(3):
        rows += [run("softmax", "n=100", s, 0.80, small), run("rbf", "n=100", s, 0.81, small, drift=1.0),
                 run("softmax", "n=all", s, 0.87, everything), run("rbf", "n=all", s, 0.85, everything, drift=2.0)]
    for size in ("n=all", "n=10", "n=500", "n=100", "n=20"):  # grids listed by size, whatever the set order
        rows.append({"run_id": f"softmax@{size}__ls__s0", "role": "grid", "kind": "train", "method": "softmax",
                     "condition": size, "seed": 0, "preset": "full", "params": {"label_smoothing": 0.1},
                     "grid_index": 0, "best_val": 0.8, "config": everything if size == "n=all" else small,
                     "summary": {"test_accuracy": 0.8}})
    body = render_scarcity({r["run_id"]: r for r in rows}, Plots(tmp_path / "plots", tmp_path / "B.md")).body
    grid_rows = [line.split(" | ")[0] for line in body.splitlines() if line.startswith("| softmax (n=")]
    assert grid_rows == [f"| softmax (n={n})" for n in ("10", "20", "100", "500", "all")]
    # 1,000 images in batches of 64: 16 steps a pass; the drift is the median of the second half (epochs 3-4)
    assert "| 100 | up to 150 x 16 | 80.00 ± 0.00 | 81.00 ± 0.00 | 1.00 ± 0.00 | 0.9 |" in body
    assert "| all | 24 x 100 | 87.00 ± 0.00 | 85.00 ± 0.00 | -2.00 ± 0.00 | 1.8 |" in body


def test_report_prints_each_methods_late_drift_beside_the_convergence_check():
    """The report's late-drift line: per method, validation's mean over the last 20% of epochs minus the 20%
    before, in points, with the t-interval over that method's finals; grid runs and finals validated fewer
    than 5 times are left out."""
    from knnsolver.bench.report import _drift_text, _judged_finals

    def run(run_id, method, curve, role="final"):
        history = [{"epoch": e + 1, "val_accuracy": v} for e, v in enumerate(curve)]
        return run_id, {"run_id": run_id, "role": role, "kind": "train", "method": method, "val_key": "val_accuracy",
                        "history": history, "config": {"epochs": len(curve)},
                        "summary": {"best_epoch": max(range(len(curve)), key=curve.__getitem__) + 1}}

    rising = [[0.80 + step * e for e in range(10)] for step in (0.01, 0.02, 0.03)]  # drifts 2, 4, 6 points
    flat = [0.85] * 10
    results = dict([run(f"npairs{i}", "npairs", c) for i, c in enumerate(rising)]
                   + [run("hal0", "hal", flat), run("grid", "hal", rising[2], role="grid"),
                      run("short", "hal", [0.5, 0.9, 0.9, 0.9])])
    text = _drift_text(_judged_finals(results)[0])
    half = 4.302653 * 2.0 / math.sqrt(3)  # t(0.975, 2) x sd 2 points / sqrt(3)
    assert f"npairs +4.00 [{4 - half:+.2f}, {4 + half:+.2f}] (n=3)" in text
    assert "hal +0.00 (n=1)" in text and text.startswith("- Late drift")
    assert _drift_text(_judged_finals({})[0]) == ""


def test_results_stored_before_the_automatic_eval_batch_size_still_match_their_settings():
    """eval_batch_size went from 512 to 0 (automatic): it sets how many rows are embedded at once, not what is
    learnt, so a stored result keeps matching its spec; under bn_mode="matched" the bank's BatchNorm statistics
    come from those batches, so there it still counts."""
    from knnsolver.bench.suites import comparable
    from knnsolver.training import TrainConfig

    new = TrainConfig(dataset="digits", solver="rbf", out="a").to_dict()
    old = {**new, "eval_batch_size": 512}
    assert new["eval_batch_size"] == 0 and comparable(old) == comparable(new)
    assert comparable({**old, "width": 99}) != comparable(new)
    matched = {**new, "bn_mode": "matched"}
    assert comparable({**matched, "eval_batch_size": 512}) != comparable(matched)


def test_early_stopping_reaches_only_the_suites_whose_presets_set_it(tmp_path):
    """The full preset stops classification runs after 6 validation passes without a new best, within 200
    epochs, unseen-class runs after 10 within 150, ablation runs after 10 within 50 and scarcity runs after a
    fifth of their passes; cost trains every epoch (a time-to-target curve needs every epoch)."""
    from knnsolver.bench.suites import build_specs, get_preset, get_suite

    preset = get_preset("full")

    def settings(suite):
        return {(s.config.get("patience", 0), s.config["epochs"]) for s in build_specs(get_suite(suite), preset, tmp_path)
                if s.kind == "train" and s.config.get("solver") != "rbf"}

    assert settings("classification") == {(6, 200)}
    assert settings("unseen-classes") == {(10, 150)}
    assert {p for p, _ in settings("cost")} == {0} and {p for p, _ in settings("scarcity")} == {4, 5}
    ablation = {(s.config["patience"], s.config["epochs"], s.config.get("epoch_steps"))
                for s in build_specs(get_suite("ablation"), preset, tmp_path) if s.kind == "train"}
    assert ablation == {(10, 50, None), (10, 147, 16)}  # the variant refreshing every 16 steps: 147 x 16 = 50 x 47
    rbf = {s.config["patience"] for s in build_specs(get_suite("classification"), preset, tmp_path) if s.method == "rbf"}
    assert rbf == {6}


def _stopped_run(run_id, curve, budget, role="final", method="hal"):
    """A training result whose run trained ``len(curve)`` of ``budget`` epochs."""
    history = [{"epoch": e + 1, "val_accuracy": v} for e, v in enumerate(curve)]
    return run_id, {"run_id": run_id, "role": role, "kind": "train", "method": method, "val_key": "val_accuracy",
                    "history": history, "config": {"epochs": budget},
                    "summary": {"best_epoch": max(range(len(curve)), key=curve.__getitem__) + 1,
                                "stopped_early": len(curve) < budget, "test_accuracy": 0.9}}


def test_a_run_stopped_early_is_judged_on_the_epochs_it_trained():
    """Judged against its 200-epoch budget, a run that trained 10 epochs and peaked in its 10th would count as
    converged and not rising; over the 10 epochs it trained it peaked in its last 20% and was still rising."""
    from knnsolver.bench.claims import rising
    from knnsolver.bench.report import _convergence, _judged_finals

    up = [0.80 + 0.01 * e for e in range(10)]
    early = [0.80, 0.85, 0.9, 0.9, 0.89, 0.89, 0.88, 0.88, 0.88, 0.88]
    results = dict([_stopped_run("up", up, 200), _stopped_run("early", early, 200)])
    check = _convergence(_judged_finals(results)[0])
    assert (check.runs, check.late, check.plateau) == (2, 1, 0)
    assert rising([results["up"]]) and not rising([results["early"]])


def test_the_regime_names_the_early_stopping():
    from knnsolver.bench.claims import regime_of

    config = dict(dataset="fashion-mnist", model="conv28", width=16, max_per_class=300, epochs=200, optimizer="adam",
                  lr=1e-3, lr_schedule="constant", batch_size=64, device="auto", patience=6)
    assert ("fashion-mnist (300 images per class), up to 200 epochs (stopped after 6 validation passes without a new "
            "best), Adam 0.001 constant") in regime_of({"a": {"config": config, "method": "hal"}})
    assert ", 200 epochs, Adam" in regime_of({"a": {"config": {**config, "patience": 0}, "method": "hal"}})


def test_the_setup_counts_the_finals_stopped_early_and_shows_the_patience():
    from knnsolver.bench.report import _setup
    from knnsolver.bench.suites import get_suite

    machine = {"platform": "p", "processor": "x", "cpu_count": 2, "torch_threads": 1, "python": "3", "torch": "t"}
    config = dict(dataset="digits", split="standard", epochs=200, patience=6, eval_every=1)
    curves = {"a": [0.5, 0.9] + [0.8] * 6, "b": [0.5 + 0.01 * e for e in range(10)], "c": [0.6] * 10}
    results = {}
    for run_id, curve in curves.items():
        _, result = _stopped_run(run_id, curve, 200 if run_id != "c" else 10)
        result.update(preset="tiny", config=dict(config, epochs=result["config"]["epochs"]), wall_seconds=1.0,
                      date="2026-11-30T10:00:00+00:00", command="c", commit="h", machine=machine)
        results[run_id] = result
    text = _setup(get_suite("classification"), results)
    assert "; 2 of the 3 stopped early, validation no longer improving." in text
    assert "eval_every=1, patience=6," in text


def test_results_of_a_condition_the_preset_no_longer_runs_are_left_out(finished, tmp_path):
    """Scarcity's full preset dropped all 57,000 images: their stored results matched no planned run, so they
    were neither redone nor left out, and filled the tables and the convergence check alone."""
    out = tmp_path / "dropped"
    shutil.copytree(finished, out)
    folder = out / "classification"
    before = write_report(out, tmp_path / "A.md", tmp_path / "plots").read_text()
    extra = json.loads((folder / "softmax__final__s0.json").read_text())
    extra.update(run_id="softmax@n=all__final__s0", condition="n=all", seed=7)
    extra["summary"]["test_accuracy"] = 0.01
    (folder / "softmax@n=all__final__s0.json").write_text(json.dumps(extra))
    text = write_report(out, tmp_path / "A.md", tmp_path / "plots").read_text()
    note = " (1 results of conditions the preset no longer runs (n=all) are left out of every table and verdict)"
    assert "**In progress: 8 of 52 runs of the `tiny` preset are done under its current budgets" + note in text
    assert text.split("\n", 3)[3] == before.split("\n", 3)[3].replace("current budgets;", "current budgets" + note + ";")


def test_a_run_continues_only_from_a_validated_last_epoch():
    """A stored 100-epoch run validated every 3rd epoch also validated epoch 100 (the last is always
    validated): continued to 150 it could keep that checkpoint, or count that pass towards early stopping,
    where a straight 150-epoch run validates epochs 99 and 102 only."""
    from knnsolver.bench.runner import continues
    from knnsolver.training import TrainConfig

    base = TrainConfig(dataset="digits", lr_schedule="constant", eval_every=3, out="a").to_dict()
    assert continues({**base, "epochs": 90}, {**base, "epochs": 150})
    assert not continues({**base, "epochs": 100}, {**base, "epochs": 150})
    assert continues({**base, "epochs": 90, "patience": 5}, {**base, "epochs": 150, "patience": 5})
    assert not continues({**base, "epochs": 90, "patience": 5}, {**base, "epochs": 150, "patience": 6})


def test_rbf_in_epochs_of_fewer_steps_waits_at_least_as_many_steps_before_stopping(tmp_path):
    """The gpu preset's rbf trains in epochs of 100 steps, validated every 4th (400 steps, against 446 for
    the others): 6 of its passes would wait 2,400 steps where the others wait 2,676, and a run stopped at epoch
    124 of 134 would count as late. Its patience is rescaled to 7 passes (2,800 steps)."""
    from knnsolver.bench.suites import build_specs, get_preset, get_suite

    specs = [s for s in build_specs(get_suite("classification"), get_preset("gpu"), tmp_path) if s.role == "final"]
    soft = next(s.config for s in specs if s.method == "softmax")
    rbf = next(s.config for s in specs if s.method == "rbf")
    assert (rbf["epochs"], rbf["eval_every"], rbf["patience"]) == (134, 4, 7)
    assert rbf["patience"] * rbf["eval_every"] * 100 >= soft["patience"] * soft["eval_every"] * 446
    assert rbf["patience"] * rbf["eval_every"] >= 0.2 * rbf["epochs"]  # a run stopped early is never late


def test_tables_leave_diverged_runs_out_as_the_verdicts_do(tmp_path):
    """The scarcity gain column, the grids' seed spread and the ablation's seeds column once counted a
    diverged final that every verdict leaves out. Checked on the stored results, one final marked diverged."""
    import statistics
    from pathlib import Path

    from knnsolver.bench.report import Plots, render_ablation, render_scarcity
    from knnsolver.bench.runner import load_results

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    plots = Plots(tmp_path, tmp_path / "report.md")
    scarcity = load_results(root / "scarcity")
    bad = scarcity["rbf@n=100__final__s0"]
    bad["summary"] = dict(bad["summary"], diverged=True, test_accuracy=0.0)
    bad["best_val"] = 0.0
    spread = statistics.stdev(scarcity[f"rbf@n=100__final__s{s}"]["best_val"] for s in range(1, 5))
    acc = {(m, s): scarcity[f"{m}@n=100__final__s{s}"]["summary"]["test_accuracy"] for m in ("rbf", "softmax")
           for s in range(1, 5)}
    gains = [acc["rbf", s] - acc["softmax", s] for s in range(1, 5)]
    body = render_scarcity(scarcity, plots).body
    row = next(line for line in body.splitlines() if line.startswith("| 100 |"))
    assert f"{100 * statistics.fmean(gains):.2f} ± {100 * statistics.stdev(gains):.2f}" in row
    assert f"| rbf (n=100) | sigma=0.4 | 83.50 | within the finals' seed spread ({100 * spread:.2f})" in body
    ablation = load_results(root / "ablation")
    bad = ablation["rbf@every-16-steps__final__s0"]
    bad["summary"] = dict(bad["summary"], diverged=True)
    bad["best_val"] = 0.0
    rest = [ablation[f"rbf@every-16-steps__final__s{s}"]["best_val"] for s in range(1, 5)]
    row = next(line for line in render_ablation(ablation, plots).body.splitlines() if "| every 16 steps |" in line)
    assert f"| every 16 steps | 4 | {100 * statistics.fmean(rest):.2f} ± {100 * statistics.stdev(rest):.2f} |" in row


def test_a_timing_is_run_again_once_the_code_it_times_changes(tmp_path, monkeypatch):
    """The cost suite's loss-step timings were once kept after HAL's loss was rewritten (15% faster): each timing
    now stores a fingerprint of the packages it times, and a stored one whose fingerprint differs, or that has
    none, is outdated and timed again."""
    preset = get_preset("tiny")
    suite = get_suite("cost")
    cost = runner.run_suite(suite, preset, tmp_path, ["softmax"], [0])
    timings = {k: r for k, r in cost.items() if r["kind"] in runner.TIMED_KINDS}
    assert {r["kind"] for r in timings.values()} == {"step_cost", "epoch_cost"}
    assert all(r["code"] == runner.timed_code(r["kind"]) for r in timings.values())
    specs = {s.run_id: s for s in build_specs(suite, preset, tmp_path, ["softmax"], [0])}
    step_id = next(k for k, r in timings.items() if r["kind"] == "step_cost")
    stored = dict(timings[step_id])
    assert runner.outdated(specs[step_id], stored, cost, preset.name) is None
    assert "changed since it was measured" in runner.outdated(specs[step_id], dict(stored, code="0" * 16), cost,
                                                              preset.name)
    del stored["code"]
    assert "before timings recorded their code" in runner.outdated(specs[step_id], stored, cost, preset.name)
    path = tmp_path / "cost" / f"{step_id}.json"
    path.write_text(json.dumps(dict(timings[step_id], code="0" * 16)))
    epoch_id = next(k for k, r in timings.items() if r["kind"] == "epoch_cost")
    (tmp_path / "cost" / f"{epoch_id}.json").write_text(json.dumps(dict(timings[epoch_id], code="0" * 16)))
    timed = []
    real = runner.step_cost
    monkeypatch.setattr(runner, "step_cost", lambda spec: timed.append(spec.run_id) or real(spec))
    started = _count_training(monkeypatch)
    again = runner.run_suite(suite, preset, tmp_path, ["softmax"], [0])
    assert timed == [step_id] and again[step_id]["code"] == runner.timed_code("step_cost")
    # the epoch timing is trained afresh, not resumed from its finished checkpoint (which would time nothing)
    assert started == [(epoch_id, False)] and again[epoch_id]["code"] == runner.timed_code("epoch_cost")
    # a timing of another preset is refused, as any other result is, not replaced for its missing fingerprint
    other = dict(again[step_id], preset="full", config=dict(again[step_id]["config"], repeats=999))
    del other["code"]
    path.write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="holds 1 results of the full preset"):
        runner.run_suite(suite, preset, tmp_path, ["softmax"], [0])


def test_the_source_fingerprint_follows_the_timed_code_only(tmp_path):
    """Packages and single modules count; other packages, docstrings and comments do not."""
    for name in ("functional/loss.py", "solvers/solver.py", "cli/main.py", "interfaces.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text('"""A module."""\n\n\ndef f(x):\n    """Twice x."""\n    return 2 * x\n')
    names = ("functional", "solvers", "interfaces.py")
    before = runner.source_fingerprint(tmp_path, names)
    assert len(before) == 16
    (tmp_path / "cli/main.py").write_text("x = 2\n")
    assert runner.source_fingerprint(tmp_path, names) == before
    (tmp_path / "solvers/solver.py").write_text(
        '"""Another text."""\n\n\ndef f(x):  # a comment\n    """Two times x."""\n    return 2 * x\n')
    assert runner.source_fingerprint(tmp_path, names) == before
    (tmp_path / "interfaces.py").write_text('"""A module."""\n\n\ndef f(x):\n    return 3 * x\n')
    assert runner.source_fingerprint(tmp_path, names) != before


def test_a_refused_preset_writes_nothing_into_the_folder(tmp_path):
    """The unseen-classes subset was written into the folder before the preset check refused the run."""
    (tmp_path / "classification").mkdir()
    (tmp_path / "classification" / "softmax__final__s0.json").write_text(
        json.dumps({"run_id": "softmax__final__s0", "preset": "tiny"}))
    with pytest.raises(ConfigError, match="holds 1 results of the tiny preset"):  # full: a subset it would write
        runner.run_suite(get_suite("unseen-classes"), get_preset("full"), tmp_path, ["rbf"], [0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classification"]
