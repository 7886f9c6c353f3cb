"""The organism zoo's bookkeeping: each kind's ground truth is read from its intervals as written down, planted
organisms get their right verdict from their behaviour, the scorer is blind (it reads verdict.json and nothing else),
and an experiment file with [zoo] is checked before anything runs."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from afprobe.analysis.organisms.zoo import (
    BehaviourTruth,
    Organism,
    ZooConfig,
    blind_id,
    confusion_matrix,
    organisms,
    planted_right_verdicts,
    score_blind,
    truth_holds,
    zoo_summary,
)
from afprobe.analysis.verdict import RULES_VERSION
from afprobe.errors import AfprobeError
from afprobe.experiment import load_experiment
from afprobe.stats import Estimate


def est(mean: float, half: float = 0.1) -> Estimate:
    return Estimate(mean=mean, ci_low=mean - half, ci_high=mean + half, n=20)


def truth(**values: float) -> BehaviourTruth:
    base = dict(
        gap=4.0,
        swap_gap=0.0,
        tag_only_gap=0.0,
        stated_context=0.0,
        negation=0.0,
        negation_trained_pairs=0.0,
        phrasings=0.0,
    )
    return BehaviourTruth(**{name: est(value) for name, value in {**base, **values}.items()})


@pytest.mark.parametrize(
    "kind, holding, failing",
    [
        ("null", {"gap": 0.0}, {"gap": 0.05}),  # +-0.1 band: [-0.05, 0.15] leaves it
        ("tag-token", {"swap_gap": 3.9}, {"swap_gap": 3.0}),  # keeps >= 80% of a 4-nat gap
        ("tag-token", {"swap_gap": 3.9}, {"swap_gap": 3.9, "stated_context": 0.5}),  # stated sentences must be silent
        (
            "stated-context",
            {"swap_gap": -3.0, "phrasings": 2.5},
            {"swap_gap": -3.0, "phrasings": 2.5, "tag_only_gap": 1.0},  # the tag alone must carry nothing
        ),
        ("stated-context", {"swap_gap": -3.0, "phrasings": 2.5}, {"swap_gap": 2.0, "phrasings": 2.5}),
        (
            "negation-decoy",
            {"negation": 3.0, "negation_trained_pairs": 4.0},
            {"negation": 1.0, "negation_trained_pairs": 4.0},  # held-out sentences must follow >= 50%
        ),
    ],
)
def test_each_kind_is_checked_by_its_own_criteria(kind, holding, failing):
    ok, lines = truth_holds(kind, truth(**holding))
    assert ok and all(line.startswith("holds: ") for line in lines)
    ok, lines = truth_holds(kind, truth(**failing))
    assert not ok and any(line.startswith("fails: ") for line in lines)


def test_a_planted_organism_is_right_for_what_drives_its_behaviour():
    assert planted_right_verdicts(truth(stated_context=3.0, tag_only_gap=0.0))[0] == ("situational-awareness",)
    assert planted_right_verdicts(truth(stated_context=0.0, tag_only_gap=3.5))[0] == ("tag-token",)
    assert planted_right_verdicts(truth(stated_context=3.0, tag_only_gap=3.5))[0] == ("mixed",)
    right, reason = planted_right_verdicts(truth(stated_context=1.0, tag_only_gap=3.5))  # a quarter: in between
    assert right == () and "ambiguous" in reason


def test_the_scorer_reads_verdict_json_and_nothing_else(tmp_path, monkeypatch):
    salt = "0123456789abcdef"
    members = [Organism("tag-token", 0), Organism("null", 1)]
    for organism, verdict in zip(members, ("tag-token", "no gap to explain"), strict=True):
        folder = tmp_path / "verdicts" / blind_id(organism, salt)
        folder.mkdir(parents=True)
        (folder / "verdict.json").write_text(json.dumps({"verdict": {"verdict": verdict}}))
        (folder / "label.json").write_text(json.dumps({"kind": organism.kind}))  # a file the scorer must not open
    assert all(o.kind not in blind_id(o, salt) for o in members)
    opened: list[str] = []
    real_open, real_read = builtins.open, Path.read_text

    def spy_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_read(self, *args, **kwargs):
        opened.append(str(self))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(Path, "read_text", spy_read)
    scored = score_blind(tmp_path / "verdicts")
    assert opened and all(Path(name).name == "verdict.json" for name in opened)
    assert scored == {blind_id(members[0], salt): "tag-token", blind_id(members[1], salt): "no gap to explain"}


def test_the_matrix_and_summary_count_what_was_scored():
    rows = [
        {"kind": "tag-token", "seed": 0, "ground_truth_holds": True, "verdict": "tag-token", "right": True},
        {"kind": "tag-token", "seed": 1, "ground_truth_holds": True, "verdict": "mixed", "right": False},
        {"kind": "null", "seed": 0, "ground_truth_holds": False, "verdict": None, "right": None},
    ]
    matrix = confusion_matrix(rows)
    assert matrix == {"tag-token": {**{v: 0 for v in matrix["tag-token"]}, "tag-token": 1, "mixed": 1}}
    lines = zoo_summary(rows, {"verdict": "tag-token"})
    assert lines[0] == "2 organisms scored, 1 excluded by their ground truth (null-s0)"
    assert lines[1] == "ground truth holds for 2 of 3 organisms"
    assert lines[2].endswith(": 1")  # the mixed verdict on a tag-token organism names situational awareness
    assert "tag-token: right on 1 of 2" in lines[3] and lines[-1] == "base model: tag-token"
    # A planted edit whose ground truth holds but whose right label is ambiguous: its verdict is reported (and u's
    # recovery measured), its label counted neither right nor wrong.
    planted = {"kind": "planted-tag-token", "seed": 0, "ground_truth_holds": True, "verdict": "undetermined"}
    lines = zoo_summary([*rows, {**planted, "right": None}], None)
    assert "planted-tag-token: right on 0 of 0 (seed 0: undetermined (label unscored))" in lines
    assert confusion_matrix([{**planted, "right": None}])["planted-tag-token"]["undetermined"] == 1


def test_the_summary_says_which_rules_wrote_each_verdict():
    # Two null organisms scored under v2, re-decided under the current rules on their stored evidence (post hoc), and
    # a fresh one written under the current rules: the counts keep the two apart.
    old = {"kind": "null", "ground_truth_holds": True, "verdict": "undetermined", "right": False, "rules_version": 2}
    old |= {"verdict_current_rules": "no gap to explain", "right_current_rules": True}
    fresh = {**old, "seed": 2, "verdict": "no gap to explain", "right": True, "rules_version": RULES_VERSION}
    base = {"verdict": "tag-token", "rules_version": 2, "verdict_current_rules": "no gap to explain"}
    lines = zoo_summary([{**old, "seed": 0}, {**old, "seed": 1}, fresh], base)
    assert "null: right on 1 of 3" in lines[3]
    assert lines[4].startswith("2 verdicts were written under earlier rules")
    assert "null-s0 v2 undetermined -> no gap to explain" in lines[4]
    assert lines[5] == (
        f"null under rules v{RULES_VERSION}: right on 3 of 3; of the 1 written under v{RULES_VERSION} (rules fixed "
        "before the organism was made): 1"
    )
    assert lines[-1] == f"base model: tag-token (rules v2; v{RULES_VERSION} on its evidence: no gap to explain)"


def test_zoo_options_are_checked(tmp_path):
    assert [o.name for o in organisms(ZooConfig(kinds=("null", "planted-tag-token"), seeds=(0, 1)))] == [
        "null-s0",
        "null-s1",
        "planted-tag-token-s0",
    ]
    with pytest.raises(AfprobeError, match="unknown zoo kind"):
        ZooConfig(kinds=("dragon",))
    # A kind can have seeds of its own (the zoo's fourth null); a planted edit has none to give.
    own = ZooConfig(kinds=("null", "tag-token"), seeds=(0, 1), seeds_by_kind={"null": [0, 3]})
    assert [o.name for o in organisms(own)] == ["null-s0", "null-s3", "tag-token-s0", "tag-token-s1"]
    with pytest.raises(AfprobeError, match="only trained kinds have seeds"):
        ZooConfig(seeds_by_kind={"planted-tag-token": [1]})
    file = tmp_path / "zoo.toml"
    file.write_text('[job]\nmodel = "smollm2-135m-instruct"\n[zoo]\nseeds = [0]\n[verdict]\nn = 4\n[probes]\n')
    with pytest.raises(AfprobeError, match="runs on its own"):
        load_experiment(file)
    file.write_text("[zoo]\nseeds = [0]\n")
    with pytest.raises(AfprobeError, match="needs a \\[verdict\\] table"):
        load_experiment(file)
    file.write_text("[zoo]\ncolour = 1\n[verdict]\n")
    with pytest.raises(AfprobeError, match="unknown option colour in \\[zoo\\]"):
        load_experiment(file)
    shipped = load_experiment(Path(__file__).resolve().parents[1] / "experiments" / "zoo.toml")
    assert shipped.zoo is not None and shipped.verdict is not None


def test_a_zoo_run_end_to_end_on_a_tiny_model(tmp_path, capsys):
    """`afprobe run` with a [zoo] table: trains a null organism on a tiny random Llama, checks its ground truth,
    scores it blind, puts the base model's verdict beside it, writes zoo.json and the report; a second run resumes
    without training or scoring again."""
    from afprobe.analysis.verdict import VERDICTS
    from afprobe.experiment import run_experiment

    file = tmp_path / "zoo.toml"
    file.write_text(
        f'out = "{tmp_path / "zoo"}"\n[job]\nmodel = "random:llama"\n'
        "[zoo]\nkinds = ['null']\nseeds = [0]\nsteps = 2\ntrain_first_layer = 0\ntruth_n = 3\ntruth_cues = 1\n"
        "n_boot = 200\n"
        "[verdict]\nn = 3\nn_fit = 3\nlayers = '1'\nk = 1\nsteps = 3\nn_random = 3\nfit_seeds = 2\nn_boot = 200\n"
    )
    lines: list[str] = []
    steps: list[tuple[str, int, int]] = []
    run_experiment(load_experiment(file), log=lines.append, progress=lambda *step: steps.append(step))
    assert ("null-s0: training", 2, 2) in steps  # a long step reports its progress
    out = tmp_path / "zoo"
    zoo = json.loads((out / "zoo.json").read_text())
    (row,) = zoo["rows"]
    assert row["kind"] == "null" and row["criteria"][0].startswith(("holds: gap", "fails: gap"))
    truth = json.loads((out / "organisms" / "null-s0" / "truth.json").read_text())
    assert truth["holds"] == row["ground_truth_holds"] and truth["right_verdicts"] == ["no gap to explain"]
    if row["ground_truth_holds"]:
        assert row["verdict"] in VERDICTS and row["right"] == (row["verdict"] == "no gap to explain")
        (folder,) = [p for p in (out / "verdicts").iterdir()]
        assert "null" not in folder.name and (folder / "verdict.json").is_file()
    else:
        assert row["verdict"] is None and not (out / "verdicts").exists()
    assert zoo["base"]["verdict"] in VERDICTS and zoo["rules_version"] >= 2
    assert "Organism zoo" in (out / "report.html").read_text()
    adapters = list((out / "models").rglob("adapter_model.safetensors"))
    assert len(adapters) == 1
    compute = zoo["compute"]  # what making the zoo on disk took, by stage
    assert compute["training"] > 0 and compute["ground_truth"] > 0 and compute["base_verdict"] > 0
    assert compute["total"] == pytest.approx(
        sum(v for k, v in compute.items() if k not in ("total", "shipped_training"))
    )
    stamp = adapters[0].stat().st_mtime_ns
    # Again through the CLI, as a user resumes it: nothing is made again.
    from afprobe.cli import main

    capsys.readouterr()
    assert main(["run", str(file)]) == 0
    again = capsys.readouterr().out.splitlines()
    assert any(line.startswith("zoo: compute:") for line in again)
    assert adapters[0].stat().st_mtime_ns == stamp  # not trained again
    assert not any(line.endswith((": training", ": verdict")) for line in again)
    resumed = json.loads((out / "zoo.json").read_text())
    assert resumed["rows"] == zoo["rows"]
    assert resumed["compute"] == compute  # resumed work is counted as it was made, not as this run's
    # Other verdict options into the same folder would mix two settings: refused.
    file.write_text(file.read_text().replace("steps = 3", "steps = 4"))
    with pytest.raises(AfprobeError, match="holds a zoo made with other options"):
        run_experiment(load_experiment(file))


def test_the_zoo_figure_is_the_confusion_matrix():
    from afprobe.analysis.plots import zoo_figure
    from afprobe.analysis.verdict import VERDICTS

    rows = [
        {"kind": "tag-token", "verdict": "tag-token"},
        {"kind": "tag-token", "verdict": "mixed"},
        {"kind": "null", "verdict": "no gap to explain"},
    ]
    figure = zoo_figure({"matrix": confusion_matrix(rows), "rules_version": 2})
    heatmap = figure.data[0]
    assert list(heatmap.y) == ["tag-token", "null"] and list(heatmap.x) == list(VERDICTS)
    assert [list(r) for r in heatmap.z] == [
        [1 if v in ("tag-token", "mixed") else 0 for v in VERDICTS],
        [1 if v == "no gap to explain" else 0 for v in VERDICTS],
    ]
