from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from afprobe.cli import main
from afprobe.report import build_report, write_report

from .conftest import make_probes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_dir(tiny_llama, tmp_path_factory):
    """A results folder holding one of every analysis, made on the tiny model."""
    from afprobe.analysis.patching import PatchConfig, run_patching
    from afprobe.analysis.sae import SAETrainConfig, train_sae
    from afprobe.analysis.sae_features import FeatureConfig, run_feature_analysis
    from afprobe.analysis.steering import SteerConfig, run_steering

    root = make_probes(tiny_llama, tmp_path_factory.mktemp("run"), situational_awareness=True)
    steer = SteerConfig(
        directions=str(root / "probes"),
        out=str(root / "steer"),
        n=2,
        layer=1,
        coefficients=(1.0,),
        n_random=1,
        benign_n=1,
        n_boot=100,
        ablate=False,
    )
    run_steering(steer, loaded=tiny_llama)
    patch = PatchConfig(
        directions=str(root / "probes"),
        n=2,
        layers="0,2",
        positions="key",
        components=False,
        mediation_layers="1",
        n_random=2,
        n_boot=100,
        out=str(root / "patch"),
    )
    run_patching(patch, loaded=tiny_llama)
    sae = SAETrainConfig(
        caches=(str(root / "main"), str(root / "sa"), str(root / "benign")),
        layer=1,
        out=str(root / "sae"),
        d_sae=32,
        k=4,
        epochs=3,
        batch_size=16,
        loss_prompts=0,
    )
    train_sae(sae)
    features = FeatureConfig(
        sae=str(root / "sae"),
        cache=str(root / "main"),
        layer=1,
        out=str(root / "features"),
        alpha=1.0,
        max_features=5,
        sa_cache=str(root / "sa"),
        benign_cache=str(root / "benign"),
        n_boot=100,
    )
    run_feature_analysis(features)
    return root


def test_report_has_a_section_for_each_analysis_run_and_only_those(run_dir, tmp_path):
    page, summary = build_report(run_dir)
    assert summary["kinds"] == ["gap", "probes", "steering", "patching", "sae", "features"]
    for section in summary["kinds"]:
        assert f"<section id='{section}'>" in page
    # One plotly.js, inline: the page opens offline; one div per figure.
    assert page.count("<script src=") == 0 and page.count("Plotly.newPlot") == summary["n_figures"] >= 10
    assert "tiny-llama" in page and "weights_sha256" in page  # what produced it
    assert "selection-adjusted: the cell chosen on" in page  # not only the maximum over the family
    # A folder with only a store has only the gap.
    only_gap, summary = build_report(run_dir / "main")
    assert summary["kinds"] == ["gap"] and "<section id='probes'>" not in only_gap
    path, summary = write_report(run_dir / "main", tmp_path / "gap.html")
    assert path.stat().st_size == summary["bytes"] > 3_000_000  # plotly.js is embedded


def test_cli_report_and_its_errors(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir / "patch"), "--out", str(tmp_path / "p.html")]) == 0
    assert "sections: patching" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no afprobe results under" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    """Every figure draws and no script error reaches the console, in a real browser; a screenshot is kept."""
    path, summary = write_report(run_dir, tmp_path / "report.html")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=30000"]
    dom = subprocess.run(
        [CHROMIUM, *flags, "--enable-logging=stderr", "--dump-dom", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body is not None, dom.stderr[-2000:]
    attributes = dict(re.findall(r'data-(\w+)="([^"]*)"', body.group(1)))
    assert int(attributes["figures"]) == summary["n_figures"]
    assert int(attributes["rendered"]) == summary["n_figures"]
    assert json.loads(attributes["errors"].replace("&quot;", '"')) == []
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and "report.html" in line]
    assert not [line for line in console if "Uncaught" in line or "ERROR" in line.split("CONSOLE")[0]], console
    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, *flags, "--window-size=1280,2000", f"--screenshot={shot}", path.as_uri()],
        capture_output=True,
        timeout=240,
        check=True,
    )
    assert shot.stat().st_size > 20_000
