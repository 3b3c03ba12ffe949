"""The bookkeeping of experiments/cross_validate.py: pooling fold means and reusing the
folds an earlier report recorded."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from tests.conftest import bundle_record

from .conftest import REPO


@pytest.fixture(scope="module")
def cv():
    spec = importlib.util.spec_from_file_location(
        "cross_validate", REPO / "experiments" / "cross_validate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_experiment(file: str, name: str, monkeypatch):
    """experiments/FILE as the module ``name``, with experiments/ on ``sys.path`` for
    its own imports."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def case_rows(rng, cases, fold):
    """medseg evaluate's rows for two labels plus each case's voxel error."""
    rows = []
    for case in range(cases):
        error = float(rng.uniform(0, 0.01))
        for label in ("1", "2"):
            rows.append(
                {
                    "case": f"f{fold}_c{case}",
                    "label": label,
                    "dice": str(rng.uniform(0.7, 0.95)),
                    "hd95_mm": str(rng.uniform(1, 3)),
                    "voxel_error": error,
                }
            )
    return rows


def test_pooled_fold_means_equal_the_means_over_all_cases(cv, rng):
    names = {"1": "Anterior", "2": "Posterior"}
    folds, rows = [], []
    for fold, cases in enumerate((5, 3, 4)):  # unequal folds: weights matter
        fold_rows = case_rows(rng, cases, fold)
        rows += fold_rows
        folds.append({"fold": fold, **cv.means(fold_rows, names)})
    pooled = cv.pooled(folds)
    assert pooled["cases"] == 12
    for metric in ("dice", "hd95_mm"):
        for value, name in names.items():
            expected = np.mean([float(r[metric]) for r in rows if r["label"] == value])
            # fold means are rounded to 4 decimals before pooling
            assert pooled[metric][name] == pytest.approx(expected, abs=1e-4)
    errors = {r["case"]: r["voxel_error"] for r in rows}
    assert pooled["voxel_error"] == pytest.approx(
        np.mean(list(errors.values())), abs=1e-4
    )


def test_voxel_error_pools_only_the_folds_that_have_it(cv):
    folds = [
        {"cases": 2, "dice": {"a": 0.8}, "hd95_mm": {"a": 2.0}, "voxel_error": 0.01},
        {"cases": 6, "dice": {"a": 0.9}, "hd95_mm": {"a": 1.0}},
    ]
    pooled = cv.pooled(folds)
    assert pooled["dice"]["a"] == pytest.approx((2 * 0.8 + 6 * 0.9) / 8)
    assert pooled["hd95_mm"]["a"] == pytest.approx((2 * 2.0 + 6 * 1.0) / 8)
    assert pooled["voxel_error"] == pytest.approx(0.01)


def test_recorded_folds_are_reused_only_for_the_same_config_and_model(cv, tmp_path):
    config = tmp_path / "a.yaml"
    config.write_text("model: {name: unet}\n")
    report = tmp_path / "a_cv.json"
    folds = [{"fold": 1, "cases": 3}, {"fold": 3, "cases": 4}]
    model = {"name": "unet"}
    report.write_text(
        json.dumps({"config": str(config), "model": model, "folds": folds})
    )
    assert cv.recorded_folds(report, config, model) == {1: folds[0], 3: folds[1]}
    assert cv.recorded_folds(report, config, {"name": "unet", "filters": [8]}) == {}
    assert cv.recorded_folds(report, config, model, ("--keep-largest",)) == {}
    assert cv.recorded_folds(report, config, model, last_epoch=True) == {}
    other = tmp_path / "b.yaml"
    other.write_text("model: {name: unet}\n")
    assert cv.recorded_folds(report, other, model) == {}
    assert cv.recorded_folds(tmp_path / "none.json", config, model) == {}


def test_medmnist_report_keeps_the_datasets_not_run_with_their_command(
    tmp_path, monkeypatch
):
    module = load_experiment("medmnist.py", "medmnist_benchmark", monkeypatch)
    path = tmp_path / "medmnist.json"
    old = [
        {"dataset": "breastmnist", "val_chosen": {"auc": 0.9}},
        {"dataset": "vesselmnist3d", "val_chosen": {"auc": 0.8}},
    ]
    path.write_text(json.dumps({"command": "old run", "machine": "A", "results": old}))
    new = {"dataset": "vesselmnist3d", "val_chosen": {"auc": 0.85},
           "command": "new run", "machine": "B"}  # fmt: skip
    report = module.merged(str(path), [new])
    assert [r["dataset"] for r in report["results"]] == ["vesselmnist3d", "breastmnist"]
    vessel, breast = report["results"]
    assert vessel == new
    assert breast == {"command": "old run", "machine": "A", **old[0]}
    assert module.merged(str(tmp_path / "none.json"), [new]) == {"results": [new]}


def test_private_peak_sees_a_buffer_freed_before_the_block_ends(monkeypatch):
    module = load_experiment("bench_monai.py", "bench_monai", monkeypatch)
    import time

    before = module.status_mib("RssAnon")
    with module.PrivatePeak(interval=0.002) as sampled:
        buffer = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
        time.sleep(0.1)
        del buffer
        time.sleep(0.05)
    assert sampled.peak >= before + 180
    assert module.status_mib("RssAnon") < sampled.peak - 150  # freed by then


@pytest.fixture
def variants(monkeypatch):
    return load_experiment(
        "hippocampus_variants.py", "hippocampus_variants", monkeypatch
    )


def test_variant_configs_change_only_their_keys_and_runs_are_checked(
    variants, tmp_path
):
    import yaml

    shipped = yaml.safe_load(variants.SHIPPED.read_text())
    config = variants.variant_config({"model": {"deep_supervision": 2}})
    assert config["model"] == {**shipped["model"], "deep_supervision": 2}
    assert config["train"] == shipped["train"]
    dataset = REPO / "experiments" / shipped["data"]["dataset"]
    assert config["data"]["dataset"] == str(dataset.resolve())
    # a run is checked against the variant's config with its defaults filled in
    from medseg.config import load_config

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "fold_3"
    run.mkdir()
    trained = load_config(tmp_path / "config.yaml").to_dict()
    trained["model"]["num_classes"] = 3
    trained["train"]["fold"] = 3
    metadata = {"config": trained, "epoch": trained["train"]["epochs"]}
    (run / "medseg.json").write_text(json.dumps(metadata))
    assert variants.unlike_config(run, tmp_path / "config.yaml") == []
    trained["train"]["augment"]["mirror_axes"] = [0, 1, 2]
    trained["model"]["deep_supervision"] = 0
    (run / "medseg.json").write_text(json.dumps(metadata))
    assert variants.unlike_config(run, tmp_path / "config.yaml") == [
        "model.deep_supervision: 0",
        "train.augment.mirror_axes: [0, 1, 2]",
    ]
    # the ds90 variant is experiments/hippocampus_3d_ds90.yaml, so that config's
    # cross-validation runs can be scored beside the others
    ds90 = yaml.safe_load(
        (REPO / "experiments" / "hippocampus_3d_ds90.yaml").read_text()
    )
    ds90["data"]["dataset"] = config["data"]["dataset"]
    assert variants.variant_config(variants.VARIANTS["ds90"][1]) == ds90


def test_paired_differences_are_case_by_case_over_label_means(variants):

    def rows(scores):
        return [
            {"case": case, "label": label, "dice": str(dice)}
            for case, labelled in scores.items()
            for label, dice in zip(("1", "2"), labelled, strict=True)
        ]

    base = rows({"a": (0.8, 0.9), "b": (0.7, 0.7), "c": (0.9, 0.8)})
    other = rows({"c": (0.9, 0.9), "a": (0.8, 0.8), "b": (0.8, 0.8)})
    # label means: base a .85 b .70 c .85; other a .80 b .80 c .90
    differences = np.array([-0.05, 0.10, 0.05])
    result = variants.paired(other, base)
    assert result["mean_dice_difference"] == pytest.approx(differences.mean(), abs=1e-4)
    assert result["standard_error"] == pytest.approx(
        differences.std(ddof=1) / np.sqrt(3), abs=1e-4
    )
    assert (result["cases_up"], result["cases_down"]) == (2, 1)


def test_fold_order_trains_the_named_folds_in_order(cv):
    assert cv.fold_order(None, 5) == [0, 1, 2, 3, 4]
    assert cv.fold_order("3,0, 1", 5) == [3, 0, 1]
    for bad in ("3,3", "5", "1,x", "-1"):
        with pytest.raises(ValueError, match="distinct, 0 to 4"):
            cv.fold_order(bad, 5)


def test_runs_trained_with_another_config_are_named(cv, tmp_path):
    import yaml

    from medseg.config import load_config

    config = tmp_path / "cv.yaml"
    config.write_text(
        yaml.safe_dump({
            "model": {"name": "unet", "spatial_dims": 3, "filters": [8, 16]},
            "data": {"dataset": "here"},
            "train": {"epochs": 4, "keep": "last", "augment": {"mirror_axes": [0, 2]}},
        })
    )  # fmt: skip
    run = tmp_path / "fold_1"
    assert cv.unlike_config(run, config) == []  # not started
    run.mkdir()
    assert cv.unlike_config(run, config) == []
    # as training resolves it: every default, the classes and fold filled in,
    # another dataset path; and from before train.keep existed (best was kept)
    trained = load_config(config).to_dict()
    trained["model"]["num_classes"] = 3
    trained["data"]["dataset"] = "/elsewhere"
    trained["train"]["fold"] = 1
    del trained["train"]["keep"]
    (run / "config.yaml").write_text(yaml.safe_dump(trained))
    # started, no bundle yet: which epoch it will keep is open
    assert cv.unlike_config(run, config) == ["train.keep: 'best'"]
    metadata = {"config": trained, "epoch": 3}
    (run / "medseg.json").write_text(json.dumps(metadata))
    assert cv.unlike_config(run, config) == ["train.keep: 'best'"]
    metadata["epoch"] = 4  # its bundle is its last epoch: what keep: last gives
    (run / "medseg.json").write_text(json.dumps(metadata))
    assert cv.unlike_config(run, config) == []
    # a setting the config leaves to its default, and options it does not name
    trained["train"]["precision"] = "mixed_bfloat16"
    trained["train"]["augment"]["mirror_axes"] = [0, 1, 2]
    trained["model"]["deep_supervision"] = 2
    (run / "medseg.json").write_text(json.dumps(metadata))
    assert cv.unlike_config(run, config) == [
        "train.precision: 'mixed_bfloat16'",
        "train.augment.mirror_axes: [0, 1, 2]",
        "model.deep_supervision: 2",
    ]


@pytest.mark.parametrize("heads", [0, 1])
def test_last_epoch_bundle_holds_the_checkpoint_of_the_run(cv, tmp_path, heads):
    """A run whose bundle is an earlier epoch: the last epoch's bundle has the
    checkpoint's weights (of a deep-supervised run: all heads trained, the
    full-resolution one kept)."""
    import yaml

    from medseg.bundle import verify, write_bundle
    from medseg.models import build_model, load_model, main_output

    model = {"name": "unet", "spatial_dims": 3, "in_channels": 1, "filters": [4, 8, 16],
             "deep_supervision": heads, "num_classes": 3}  # fmt: skip
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    kwargs = {k: v for k, v in model.items() if k != "name"}
    earlier, last = build_model("unet", **kwargs), build_model("unet", **kwargs)
    rng = np.random.default_rng(0)
    last.set_weights([rng.normal(size=w.shape) for w in last.get_weights()])
    last.save_weights(run / "checkpoint" / "model.weights.h5")
    (run / "checkpoint" / "state.json").write_text('{"epoch": 45, "best": 0.8}')
    write_bundle(
        run,
        main_output(earlier),
        bundle_record(
            spatial_dims=model["spatial_dims"],
            in_channels=model.get("in_channels", 1),
            num_classes=model["num_classes"],
            epoch=40,
            validation={"val_dice_mean": 0.8},
        ),
    )
    assert cv.checkpoint_epoch(run) == 45
    assert cv.last_epoch_bundle(run, tmp_path / "last") == 45
    metadata = verify(tmp_path / "last")
    assert metadata["epoch"] == 45 and "validation" not in metadata
    bundled = load_model(tmp_path / "last")
    assert len(bundled.outputs) == 1
    for layer in bundled.layers:
        for got, want in zip(
            layer.get_weights(), last.get_layer(layer.name).get_weights(), strict=True
        ):
            np.testing.assert_array_equal(got, want)
    assert verify(run)["epoch"] == 40  # the run's own bundle is left as it was


def test_packaged_cross_validation_says_how_each_fold_was_picked(tmp_path, monkeypatch):
    package = load_experiment("package_model.py", "package_model", monkeypatch)
    config = tmp_path / "a.yaml"
    config.write_text("model: {name: unet}\n")
    report = {"config": str(config), "missing_folds": [], "command": "cv",
              "all_scored_cases": {"cases": 8, "dice": {"A": 0.9}}}  # fmt: skip
    path = tmp_path / "a_cv.json"
    for scored, said in [
        ([45, 45], "each fold at its last epoch"),
        ([40, 45], "each fold at its best validation epoch, picked on those cases"),
        ([None, None], "each fold at its best validation epoch, picked on those cases"),
    ]:
        folds = [
            {"fold": i, "epochs": 45, "cases": 4, "case_scores": [{}]}
            | ({"scored_epoch": s} if s else {})
            for i, s in enumerate(scored)
        ]
        path.write_text(json.dumps({**report, "folds": folds}))
        record = package.cross_validation_record(path, config)
        assert record["what"].endswith(said) and record["cases"] == 8
        assert all("case_scores" not in fold for fold in record["folds"])
    with pytest.raises(SystemExit, match="folds \\[2\\] are missing"):
        path.write_text(json.dumps({**report, "folds": [], "missing_folds": [2]}))
        package.cross_validation_record(path, config)


def test_a_report_written_fold_by_fold_is_reused_by_the_next_run(cv, rng, tmp_path):
    names = {"1": "Anterior", "2": "Posterior"}
    config = tmp_path / "a.yaml"
    config.write_text("model: {name: unet}\n")
    header = {"config": str(config), "model": {"name": "unet"}, "postprocessing": []}
    output = tmp_path / "a_cv.json"
    folds = [
        {"fold": f, **cv.means(case_rows(rng, 4, f), names)} for f in (3, 0)
    ]  # scored in the order 3, 0
    report = cv.write_report(output, header, folds, 5)
    assert json.loads(output.read_text()) == report
    assert [f["fold"] for f in report["folds"]] == [0, 3]
    assert report["missing_folds"] == [1, 2, 4]
    assert report["all_scored_cases"] == cv.pooled(folds)
    # the next run (after an interruption) takes up the folds already scored
    recorded = cv.recorded_folds(output, config, {"name": "unet"})
    assert sorted(recorded) == [0, 3] and recorded[3] == folds[0]


def test_a_recorded_baseline_is_taken_only_from_the_same_fold_and_epoch_rule(
    variants, tmp_path
):
    row = {"variant": "epochs_90", "fold": 3, "scored_epoch": 90, "epochs": 90}
    picked = {"variant": "shipped", "fold": 3, "scored_epoch": 40, "epochs": 45}
    file = tmp_path / "earlier.json"
    file.write_text(json.dumps({"variants": [picked, row]}))
    found = variants.recorded(f"{file}:epochs_90", 3, last_epoch=True)
    assert found == {**row, "recorded_in": str(file)}
    assert variants.recorded(f"{file}:shipped", 3, last_epoch=False)["fold"] == 3
    for spec, fold, last, problem in (
        (f"{file}:shipped", 3, True, "at epoch 40 of 45, not fold 3 at its last"),
        (f"{file}:epochs_90", 4, True, "scored on fold 3"),
        (f"{file}:ds90", 3, True, "no variant 'ds90'"),
        (f"{tmp_path}/none.json:ds90", 3, True, "no file"),
    ):
        with pytest.raises(ValueError, match=problem):
            variants.recorded(spec, fold, last_epoch=last)


def test_a_run_is_finished_at_its_epochs_or_when_its_budget_is_spent(cv, tmp_path):
    def run(lines: int, train: dict, **record) -> tuple[bool, int]:
        (tmp_path / "history.csv").write_text("epoch\n" + "1\n" * lines)
        return cv.run_finished(tmp_path, {"config": {"train": train}, **record})

    assert run(5, {"epochs": 5}, epoch=5) == (True, 5)
    assert run(3, {"epochs": 5}, epoch=3) == (False, 5)
    budget = {"epochs": 100, "time_budget": 900.0}
    assert run(20, budget, epoch=20, trained_seconds=903.6) == (True, 20)
    assert run(12, budget, epoch=12, trained_seconds=540.0) == (False, 12)
    # its bundle an earlier epoch than the history's last: not the end yet
    assert run(20, budget, epoch=10, trained_seconds=903.6) == (False, 20)
