"""study.py end to end on the tiny learnable set (CPU): an interrupted study resumes, a finished one
is reused without training, each student distils from its own seed's teacher, and the report's
numbers, tables, figures and disagreement examples agree with the runs' own files."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys

import h5py
import pytest
import yaml

from cli_helpers import run_main
from test_train_fixtures import make_dataset, tiny_config_dict, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import study  # noqa: E402
from vqakd.study.runner import ARMS, parse_arms, parse_seeds  # noqa: E402
from vqakd.core.errors import UserError  # noqa: E402

SEEDS = (1, 2)
ARM_NAMES = ("teacher", "student-none", "student-feature")


def stage_dir(out, seed, arm):
    return os.path.join(str(out), f"seed{seed}", arm, ARMS[arm].stage)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def study_argv(tiny, *extra):
    return ["--cfg", tiny["cfg"], "--seeds", ",".join(map(str, SEEDS)), "--arms", ",".join(ARM_NAMES),
            "--out", str(tiny["out"]), "--timing-passes", "1", "--examples", "4", *extra]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    data = make_dataset(root / "data", videos=24)
    cfg = write_config(root / "tiny.yml", tiny_config_dict(data["paths"], root / "unused", train={"epochs": 3}))
    return {"cfg": cfg, "out": root / "study", "data": root / "data"}


@pytest.fixture(scope="module")
def interrupted(tiny):
    """First call: every run stops after epoch 2; the students that need a teacher wait for it."""
    code, err = run_main(study.main, study_argv(tiny, "--set", "train.stop_after_epoch=2"), quiet=True)
    assert code == 0, err
    return tiny


@pytest.fixture(scope="module")
def finished(interrupted):
    code, err = run_main(study.main, study_argv(interrupted), quiet=True)
    assert code == 0, err
    report = json.loads((interrupted["out"] / "report" / "report.json").read_text())
    return dict(interrupted, report=report)


def test_interrupted_runs_wait_and_write_no_report(interrupted):
    out = interrupted["out"]
    for seed in SEEDS:
        for arm in ("teacher", "student-none"):
            assert os.path.isfile(os.path.join(stage_dir(out, seed, arm), "last.pt"))
            assert not os.path.isfile(os.path.join(stage_dir(out, seed, arm), "results.json"))
        # Distilling from a half-trained teacher would be wrong: the student has not started.
        assert not os.path.exists(stage_dir(out, seed, "student-feature"))
    assert not (out / "report").exists()


def test_second_call_resumes_and_reports(finished):
    out = finished["out"]
    for seed in SEEDS:
        for arm in ("teacher", "student-none"):
            log = open(os.path.join(stage_dir(out, seed, arm), "train.log")).read()
            assert f"resuming {ARMS[arm].stage}" in log and "after epoch 2" in log
            rows = read_csv(os.path.join(stage_dir(out, seed, arm), "metrics.csv"))
            assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    names = os.listdir(out / "report")
    for name in ("report.md", "report.json", "per_type.png", *(f"{arm}_curves.png" for arm in ARM_NAMES)):
        assert name in names
        if name.endswith(".png"):
            assert (out / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_student_distils_from_its_own_seeds_teacher(finished):
    out = finished["out"]
    for seed in SEEDS:
        student = json.loads(open(os.path.join(stage_dir(out, seed, "student-feature"), "results.json")).read())
        teacher_best = os.path.join(stage_dir(out, seed, "teacher"), "best.pt")
        assert os.path.realpath(student["teacher"]) == os.path.realpath(teacher_best)
        assert student["distill"] == "feature" and student["config"]["train"]["seed"] == seed
        alone = json.loads(open(os.path.join(stage_dir(out, seed, "student-none"), "results.json")).read())
        assert alone["teacher"] is None and alone["distill"] == "none"
        teacher = json.loads(open(os.path.join(stage_dir(out, seed, "teacher"), "results.json")).read())
        assert teacher["config"]["train"]["seed"] == seed


def test_report_statistics_match_the_runs(finished):
    report, out = finished["report"], finished["out"]
    assert report["seeds"] == list(SEEDS) and list(report["arms"]) == list(ARM_NAMES)
    for arm in ARM_NAMES:
        results = [json.loads(open(os.path.join(stage_dir(out, s, arm), "results.json")).read()) for s in SEEDS]
        entry = report["arms"][arm]
        accuracies = [r["accuracy"] for r in results]
        assert entry["accuracy"]["mean"] == pytest.approx(statistics.fmean(accuracies))
        assert entry["accuracy"]["std"] == pytest.approx(statistics.stdev(accuracies))
        assert [entry["seeds"][str(s)]["accuracy"] for s in SEEDS] == accuracies
        what = [r["per_type"]["what"]["accuracy"] for r in results]
        assert entry["per_type"]["what"]["mean"] == pytest.approx(statistics.fmean(what))
        assert entry["per_type"]["who"] == {"mean": None, "std": None, "n": 2, "count": 0}
        assert entry["params"] == results[0]["params"]
        assert entry["ms_per_question"]["mean"] > 0
    markdown = (out / "report" / "report.md").read_text()
    teacher = report["arms"]["teacher"]["accuracy"]
    # The per-type row: "–" where the test split has no question of a type (who, how, when).
    row = next(line for line in markdown.splitlines() if line.startswith("| teacher | ") and " – " in line)
    assert row.count(" – ") == 3
    assert f"{100 * teacher['mean']:.2f} ± {100 * teacher['std']:.2f}" in row
    assert "0.00% 0" not in markdown and "| DualVGR (published) |" in markdown


def test_answer_metrics_match_the_predictions(finished):
    report, out = finished["report"], finished["out"]
    answers = report["answers"]
    label = answers["labels"][0]
    rows = [row for s in SEEDS for row in read_csv(os.path.join(stage_dir(out, s, "teacher"), "study_test_preds.csv"))]
    hits = sum(row["answer"] == label and row["predicted_answer"] == label for row in rows)
    support = sum(row["answer"] == label for row in rows)
    predicted = sum(row["predicted_answer"] == label for row in rows)
    values = answers["arms"]["teacher"]["per_answer"][label]
    assert values["support"] == support
    assert values["recall"] == pytest.approx(hits / support)
    assert values["precision"] == pytest.approx(hits / predicted if predicted else 0.0)


def test_report_question_types_are_validates_and_ceilings_count_answers_in_the_vocabulary(finished):
    from vqakd.data.questions import question_type

    report, out = finished["report"], finished["out"]
    rows = read_csv(os.path.join(stage_dir(out, SEEDS[0], "teacher"), "study_test_preds.csv"))
    # The preds CSV's question_type column is the metrics' rule applied to the question's text.
    assert all(row["question_type"] == question_type(row["question"]) for row in rows)
    results = json.loads(open(os.path.join(stage_dir(out, SEEDS[0], "teacher"), "results.json")).read())
    ceilings = report["ceilings"]
    # The fixture gives one "what", one "where" and one "other" test question an answer outside the
    # vocabulary (written <UNK1>): those types cannot reach 100%.
    for qtype in ("what", "where"):
        count = results["per_type"][qtype]["count"]
        assert ceilings["per_type"][qtype] == {"count": count, "in_vocabulary": count - 1,
                                              "ceiling": pytest.approx((count - 1) / count)}
    assert ceilings["per_type"]["who"]["ceiling"] is None
    assert ceilings["overall"]["ceiling"] == pytest.approx(1 - 3 / results["count"])
    markdown = (out / "report" / "report.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| ceiling | ") and "vocabulary" not in line)
    assert f"{100 * (results['per_type']['what']['count'] - 1) / results['per_type']['what']['count']:.2f}" in row


def test_report_pairs_each_arm_with_the_student_trained_alone(finished):
    from scipy.stats import t

    report = finished["report"]
    paired = report["paired"]
    assert set(paired) == {"teacher", "student-feature"}         # every arm but the baseline
    for arm, entry in paired.items():
        accuracy = {seed: report["arms"][arm]["seeds"][str(seed)]["accuracy"] for seed in SEEDS}
        alone = {seed: report["arms"]["student-none"]["seeds"][str(seed)]["accuracy"] for seed in SEEDS}
        differences = [accuracy[seed] - alone[seed] for seed in SEEDS]
        assert entry["baseline"] == "student-none"
        assert list(entry["seeds"].values()) == pytest.approx(differences)
        assert entry["mean"] == pytest.approx(statistics.fmean(differences))
        assert entry["std"] == pytest.approx(statistics.stdev(differences))
        half = t.ppf(0.975, len(SEEDS) - 1) * entry["std"] / len(SEEDS) ** 0.5
        assert entry["interval"] == pytest.approx([entry["mean"] - half, entry["mean"] + half])
        assert entry["verdict"].startswith(f"{arm} − student-none: ")
    markdown = (finished["out"] / "report" / "report.md").read_text()
    assert "## Paired by seed: each arm − student-none" in markdown
    assert all(f"- {entry['verdict']}" in markdown for entry in paired.values())


def test_detectability_in_words():
    from vqakd.study.report import detectability, paired_difference

    baseline = {"seeds": {"1": {"accuracy": 0.50}, "2": {"accuracy": 0.60}, "3": {"accuracy": 0.40}}}
    steady = {"seeds": {"1": {"accuracy": 0.52}, "2": {"accuracy": 0.63}, "3": {"accuracy": 0.425}}}
    noisy = {"seeds": {"1": {"accuracy": 0.55}, "2": {"accuracy": 0.56}, "3": {"accuracy": 0.43}}}
    gain = paired_difference(steady, baseline)
    assert gain["seeds"] == pytest.approx({"1": 0.02, "2": 0.03, "3": 0.025}) and gain["interval"][0] > 0
    assert "excludes 0, a gain detectable" in detectability("a", "b", gain)
    # +5, -4, +3 points: a mean gain of +1.3 inside a spread of 4.7 is not told from noise.
    unclear = paired_difference(noisy, baseline)
    assert unclear["interval"][0] < 0 < unclear["interval"][1]
    assert "includes 0, so no difference is detectable with 3 seeds" in detectability("a", "b", unclear)
    loss = paired_difference(baseline, steady)
    assert "a loss detectable" in detectability("a", "b", loss)
    one = paired_difference({"seeds": {"1": {"accuracy": 0.6}}}, baseline)
    assert one["interval"] is None and "one seed: no spread" in detectability("a", "b", one)


def test_error_bars_stay_inside_0_to_100_percent():
    from vqakd.study.report import error_bars

    below, above = error_bars([{"mean": 0.98, "std": 0.05}, {"mean": 0.01, "std": 0.05},
                               {"mean": 0.5, "std": None}])
    assert below == pytest.approx([5.0, 1.0, 0.0]) and above == pytest.approx([2.0, 5.0, 0.0])


def test_published_numbers_only_with_a_note_on_the_features(finished):
    from vqakd.study.report import feature_origin, features_summary

    report = finished["report"]
    # The fixture's feature files record no extraction settings: the report says so beside the
    # published numbers.
    assert report["features"]["random_weights"] is False and report["features"]["unrecorded"] is True
    assert "record no extraction settings" in report["features"]["note"]
    markdown = (finished["out"] / "report" / "report.md").read_text()
    published = markdown.index("| DualVGR (published) |")
    assert markdown.index(report["features"]["note"]) > published
    # Features made with --random-weights: recorded in results.json's provenance (from the files).
    random = {"provenance": {"features": {"appearance": {"model": "resnet101", "random_weights": True},
                                          "motion": {"model": "resnext101", "random_weights": True}}}}
    origin = feature_origin(random)
    assert origin == {"appearance": {"model": "resnet101", "random_weights": True},
                      "motion": {"model": "resnext101", "random_weights": True}}
    arms = {"teacher": {"seeds": {"1": {"features": origin}}}}
    summary = features_summary(arms)
    assert summary["random_weights"] is True and summary["unrecorded"] is False
    assert "random-weight networks" in summary["note"] and "not a target" in summary["note"]
    pretrained = {kind: dict(values, random_weights=False) for kind, values in origin.items()}
    assert features_summary({"teacher": {"seeds": {"1": {"features": pretrained}}}})["note"] is None


def test_disagreement_examples_are_real(finished):
    report, out = finished["report"], finished["out"]
    items = report["examples"]["items"]
    assert report["examples"]["seed"] == SEEDS[0] and 0 < len(items) <= 4
    preds = {arm: {row["question_id"]: row for row in read_csv(os.path.join(stage_dir(out, SEEDS[0], arm),
                                                                            "study_test_preds.csv"))}
             for arm in ARM_NAMES}
    for item in items:
        rows = {arm: preds[arm][item["question_id"]] for arm in ARM_NAMES}
        assert item["predictions"] == {arm: row["predicted_answer"] for arm, row in rows.items()}
        assert len(set(item["predictions"].values())) > 1
        assert item["answer"] == rows["teacher"]["answer"] and item["video_id"] == rows["teacher"]["video_id"]


def test_rerun_reuses_everything(finished, monkeypatch):
    import vqakd.training.run
    import vqakd.training.validation

    def refuse(*args, **kwargs):
        raise AssertionError(f"a finished study must not train or evaluate again: {args}")

    monkeypatch.setattr(vqakd.training.run, "train_stage", refuse)
    monkeypatch.setattr(vqakd.training.validation, "validate_checkpoint", refuse)
    out = finished["out"]
    watched = [os.path.join(stage_dir(out, s, a), name) for s in SEEDS for a in ARM_NAMES
               for name in ("last.pt", "results.json", "study_test_preds.csv", "timing_test.json")]
    before = {path: os.path.getmtime(path) for path in watched}
    code, err = run_main(study.main, study_argv(finished), quiet=True)
    assert code == 0, err
    assert {path: os.path.getmtime(path) for path in watched} == before
    again = json.loads((out / "report" / "report.json").read_text())
    assert again["arms"]["teacher"]["accuracy"] == finished["report"]["arms"]["teacher"]["accuracy"]


def test_changed_settings_are_refused_not_mixed(finished):
    code, err = run_main(study.main, study_argv(finished, "--set", "train.lr=0.001"), quiet=True)
    assert code == 2 and "train.lr" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1


def test_overwrite_retrains_runs_with_changed_settings(finished):
    from vqakd.study.runner import plan_study

    runs = plan_study(finished["cfg"], str(finished["out"]), list(SEEDS), parse_arms(",".join(ARM_NAMES)),
                      ["train.lr=0.001"], overwrite=True)
    assert {run.action for run in runs} == {"overwrite"} and "train.lr" in runs[0].reason
    same = plan_study(finished["cfg"], str(finished["out"]), list(SEEDS), parse_arms(",".join(ARM_NAMES)), [],
                      device="cpu")
    assert {run.action for run in same} == {"reuse"}      # the device is not a setting that changes results


def test_arguments():
    assert parse_seeds("3", 666) == [666, 667, 668]
    assert parse_seeds("5,1", 666) == [5, 1] and parse_seeds("42,", 0) == [42]
    for bad in ("0", "a", "1,1", "-1,2"):
        with pytest.raises(UserError):
            parse_seeds(bad, 666)
    assert [arm.name for arm in parse_arms("student-logit,student-none")] == ["teacher", "student-logit",
                                                                             "student-none"]
    assert [arm.name for arm in parse_arms(None)] == ["teacher", "student-none", "student-feature", "student-logit"]
    assert parse_arms("student-feature-gatv2")[0].name == "teacher-gatv2"
    with pytest.raises(UserError, match="known arms"):
        parse_arms("student-bogus")
    for nothing in ("", " , ", ","):         # trained nothing, then failed in the report; or ran the defaults
        with pytest.raises(UserError, match="names no arm"):
            parse_arms(nothing)


def test_study_sets_seed_and_folder_itself(tiny):
    code, err = run_main(study.main, ["--cfg", tiny["cfg"], "--set", "train.seed=3"], quiet=True)
    assert code == 2 and "--seeds" in err


def test_help_is_fast_and_imports_no_torch():
    result = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "study.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--seeds" in result.stdout
    assert not [line for line in result.stderr.splitlines() if line.rstrip().endswith(" torch")]


@pytest.mark.slow          # two processes importing torch: ~35 s on a busy 2-core machine
def test_study_under_torchrun_trains_teacher_then_student(tiny, tmp_path):
    """Every rank makes the same train/validate calls in one process group (a second group in one
    process could not connect); rank 0 alone writes the report."""
    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               os.path.join(ROOT, "study.py"), "--cfg", tiny["cfg"], "--seeds", "5,", "--arms", "student-feature",
               "--out", str(out), "--timing-passes", "1", "--set", "train.epochs=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", VQAKD_DIST_TIMEOUT_S="60")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DistributedDataParallel: 2 processes" in open(os.path.join(stage_dir(out, 5, "student-feature"),
                                                                      "train.log")).read()
    report = json.loads((out / "report" / "report.json").read_text())
    assert list(report["arms"]) == ["teacher", "student-feature"]
    assert result.stdout.count("study: wrote") == 1


def test_study_folder_guarded_before_any_training(tiny, tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    code, err = run_main(study.main, ["--cfg", tiny["cfg"], "--out", str(afile)], quiet=True)
    assert code == 2 and "is a file" in err and err.count("\n") == 1, err
    assert afile.read_text() == "x"
    code, err = run_main(study.main, ["--cfg", tiny["cfg"], "--out", str(tiny["data"])], quiet=True)
    assert code == 2 and "holds an input of the study" in err, err


def test_study_reads_only_its_own_evaluation_files(finished, monkeypatch):
    # validate.py's own files in a run folder (another split, say) are not the study's.
    out = finished["out"]
    run_dir = stage_dir(out, SEEDS[0], "teacher")
    alien = os.path.join(run_dir, "eval_test_preds.csv")
    with open(alien, "w") as handle:
        handle.write("question_id,video_id,question,predicted_answer,answer\n1,1,what?,x,y\n")
    study_preds = os.path.join(run_dir, "study_test_preds.csv")
    before = open(study_preds).read()
    code, err = run_main(study.main, study_argv(finished), quiet=True)
    assert code == 0, err
    assert open(study_preds).read() == before      # reused: its own files are intact and newer than best.pt
    # A study evaluation of another split is not reused for the test figures.
    record = json.loads(open(os.path.join(run_dir, "study_test.json")).read())
    record["split"] = "val"
    with open(os.path.join(run_dir, "study_test.json"), "w") as handle:
        json.dump(record, handle)
    code, err = run_main(study.main, study_argv(finished), quiet=True)
    assert code == 0, err
    assert json.loads(open(os.path.join(run_dir, "study_test.json")).read())["split"] == "test"


def test_a_moved_study_is_reused_and_changed_features_are_seen(finished, tmp_path):
    import shutil

    from vqakd.study.runner import plan_study

    arms = parse_arms(",".join(ARM_NAMES))
    moved = tmp_path / "moved_study"
    shutil.copytree(finished["out"], moved)
    runs = plan_study(finished["cfg"], str(moved), list(SEEDS), arms, [])
    assert {run.action for run in runs} == {"reuse"}, [(r.arm.name, r.reason) for r in runs]
    # The motion features rewritten under their path: every run trained on them is out of date.
    cfg = yaml.safe_load(open(finished["cfg"]))
    motion = cfg["data"]["motion_feat"]
    changed = tmp_path / "motion_changed.h5"
    shutil.copy(motion, changed)
    with h5py.File(changed, "r+") as handle:
        handle["resnext_features"][0] = handle["resnext_features"][0] + 1.0
    original = tmp_path / "original.h5"
    shutil.copy(motion, original)
    try:
        shutil.copy(changed, motion)
        runs = plan_study(finished["cfg"], str(moved), list(SEEDS), arms, [], overwrite=True)
        assert {run.action for run in runs} == {"overwrite"}
        assert all("inputs changed" in run.reason and "data.motion_feat" in run.reason for run in runs)
    finally:
        shutil.copy(original, motion)


def test_report_with_fewer_arms_says_what_it_leaves_out_and_drops_stale_figures(finished):
    # A later call with fewer arms and --examples 0 on the same study folder.
    out = finished["out"]
    report_dir = out / "report"
    assert (report_dir / f"{ARM_NAMES[-1]}_curves.png").exists()
    code, err = run_main(study.main, study_argv(finished)[:-6] + ["--arms", ARM_NAMES[0], "--out", str(out),
                                                                    "--timing-passes", "1", "--examples", "0"],
                         quiet=True)
    assert code == 0, err
    text = (report_dir / "report.md").read_text()
    assert "No examples asked for (--examples 0)." in text and "same answer to every" not in text
    assert f"seed{SEEDS[0]}/{ARM_NAMES[-1]}" in text and "not in this report" in text
    assert not (report_dir / f"{ARM_NAMES[-1]}_curves.png").exists()
    assert (report_dir / f"{ARM_NAMES[0]}_curves.png").exists()
    # The full report again, for the tests that follow.
    assert run_main(study.main, study_argv(finished), quiet=True)[0] == 0
