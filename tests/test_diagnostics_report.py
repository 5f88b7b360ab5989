"""The report machinery (`mergejax.diagnostics.report`) and `config.diagnostics`."""

import json
import math
import re
from pathlib import Path

import matplotlib.image
import pytest
from helpers import json_numbers
from matplotlib.figure import Figure

from mergejax import config_lib, experiment, validation  # noqa: F401  (kinds register)
from mergejax.diagnostics import Section, enabled, settings, write_report, write_sections
from mergejax.diagnostics.report import move_aside

ROOT = Path(__file__).resolve().parents[1]


def _figure(width_in=3.0, height_in=2.0, dpi=40):
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    ax = fig.add_subplot()
    ax.plot([0, 1], [1, 0], label="line")
    ax.set(title="t", xlabel="x (unitless)", ylabel="y (%)")
    ax.legend()
    return fig


def test_sections_write_pngs_of_the_figure_size_and_finitejson_numbers(tmp_path):
    sec = Section("alpha", "Alpha curves", {"x": [0.0, 0.5], "n": 3, "nested": {"y": 1.5}},
                  {"alpha_curve": _figure(3, 2, 40), "alpha_wide": _figure(5, 1, 30)},
                  "Two lines.")
    paths = write_sections(tmp_path, [sec])
    assert [p.name for p in paths] == ["alpha_curve.png", "alpha_wide.png"]
    # decoded back: (height, width, channels) = figsize * dpi
    assert matplotlib.image.imread(paths[0]).shape[:2] == (80, 120)
    assert matplotlib.image.imread(paths[1]).shape[:2] == (30, 150)
    data = json.loads((tmp_path / "diagnostics.json").read_text())
    assert data == {"alpha": {"x": [0.0, 0.5], "n": 3, "nested": {"y": 1.5}}}
    assert all(math.isfinite(n) for n in json_numbers(data))
    assert not list((tmp_path / "plots").glob(".*"))  # no temporaries left


def test_sections_merge_by_name_and_replace_the_same_name(tmp_path):
    write_sections(tmp_path, [Section("a", "A", {"v": 1})])
    write_sections(tmp_path, [Section("b", "B", {"v": 2})])
    write_sections(tmp_path, [Section("a", "A again", {"v": 3})])
    data = json.loads((tmp_path / "diagnostics.json").read_text())
    assert data == {"a": {"v": 3}, "b": {"v": 2}}
    text = write_report(tmp_path, []).read_text()
    assert "## A again" in text and "## B" in text and "## A\n" not in text


@pytest.mark.parametrize("bad, where", [(float("nan"), "s.curve.loss[1]"),
                                        (float("inf"), "s.curve.loss[1]")])
def test_non_finite_numbers_are_refused_naming_the_key_and_nothing_is_written(
        tmp_path, bad, where):
    sec = Section("s", "S", {"curve": {"loss": [0.1, bad]}}, {"s_fig": _figure()})
    with pytest.raises(ValueError, match=re.escape(where)):
        write_sections(tmp_path, [sec])
    assert not (tmp_path / "diagnostics.json").exists()
    assert not (tmp_path / "plots").exists()


def test_bad_stems_and_duplicate_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="figure stem '../x'"):
        write_sections(tmp_path, [Section("s", "S", {}, {"../x": _figure()})])
    with pytest.raises(ValueError, match="'s' given twice"):
        write_sections(tmp_path, [Section("s", "S", {}), Section("s", "T", {})])


def test_report_has_the_table_every_section_and_other_plots(tmp_path, capsys):
    (tmp_path / "plots").mkdir()
    _figure().savefig(tmp_path / "plots" / "fs_merge_loss.png")  # as FS-Merge writes it
    write_sections(tmp_path, [Section("tv", "Task vectors", {"c": 0.5},
                                      {"tv_cosine": _figure()}, "Cosines of task vectors.")])
    rows = [{"method": "ties", "joint_acc": 0.5, "task_avg_acc": 0.625,
             "per_task_acc": {"task_a": 0.75, "task_b": 0.5}, "seconds": 1.0,
             "run": {"run_id": "r1", "started": "now", "version": "0"}}]
    path = write_report(tmp_path, rows)
    text = path.read_text()
    assert path == tmp_path / "report.md"
    assert "| ties | 50.0 | 75.0 | 50.0 | 62.5 | 1.0 |" in text
    assert "## Task vectors" in text and "Cosines of task vectors." in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["plots/tv_cosine.png", "plots/fs_merge_loss.png"]
    assert all((tmp_path / link).is_file() for link in links)  # relative to the report
    out = capsys.readouterr().out
    assert str(path) in out and "diagnostics.json" in out and "plots" in out


def test_report_without_sections_is_the_table(tmp_path):
    text = write_report(tmp_path, [{"method": "a", "joint_acc": 1.0, "task_avg_acc": 1.0,
                                    "per_task_acc": {}, "seconds": 0.0}]).read_text()
    assert "| a | 100.0 |" in text and "![" not in text


def test_move_aside_keeps_a_previous_runs_files_out_of_the_new_report(tmp_path):
    write_sections(tmp_path, [Section("old", "Old", {"v": 1}, {"old_fig": _figure()})])
    write_report(tmp_path, [])
    move_aside(tmp_path)
    assert (tmp_path / "plots.previous" / "old_fig.png").is_file()
    assert json.loads((tmp_path / "diagnostics.previous.json").read_text()) == {"old": {"v": 1}}
    text = write_report(tmp_path, []).read_text()
    assert "Old" not in text and "old_fig" not in text


# ---------------------------------------------------------------------------- config


def _config():
    return config_lib.load_config_file(ROOT / "configs" / "digits_finetune_mlp.py", "quick")


def test_base_config_has_the_diagnostics_defaults():
    d = config_lib.base_config().diagnostics
    assert d.enabled and d.curves and d.match_quality and d.task_vectors and d.sweeps
    assert d.points == 11
    assert tuple(d.curve_methods) == ("naive", "permute", "weight_matching", "zipit", "mudsc")


def test_a_config_without_the_section_gets_the_defaults():
    config = _config()
    with config.unlocked():
        del config["diagnostics"]
    validation.validate(config)
    assert settings(config) == config_lib.DIAGNOSTICS
    assert enabled(config, "task_vectors")
    with config.unlocked():
        config.diagnostics = {"sweeps": False}
    assert not enabled(config, "sweeps") and enabled(config, "task_vectors")


@pytest.mark.parametrize("field, value, why", [
    ("points", 1, "config.diagnostics.points=1: must be an integer >= 2"),
    ("enabled", "yes", "config.diagnostics.enabled='yes': must be True or False"),
    ("curve_methods", ("naive", "zipp"), "config.diagnostics.curve_methods="),
])
def test_bad_diagnostics_settings_are_named(field, value, why):
    config = _config()
    with config.unlocked():  # the fields are typed: replace the section to set a bad type
        del config["diagnostics"]
        config.diagnostics = {**config_lib.DIAGNOSTICS, field: value}
    with pytest.raises(validation.ConfigError, match=re.escape(why)):
        validation.validate(config)


def test_unknown_diagnostics_setting_is_named():
    config = _config()
    with config.unlocked():
        config.diagnostics.curvez = True
    with pytest.raises(validation.ConfigError, match="config.diagnostics.curvez=True: unknown"):
        validation.validate(config)


def test_a_failed_run_still_writes_a_report_of_what_finished(tmp_path, monkeypatch):
    """The kind emits a row and a section, then raises: the error propagates, run.json says
    failed, and report.md states the failure above the row and the section."""
    from mergejax.config_lib import load_config_file

    def failing_kind(config, workdir, *, emit):
        emit({"method": "average", "joint_acc": 0.5, "task_avg_acc": 0.5,
              "per_task_acc": {"task_a": 0.5, "task_b": 0.5}, "seconds": 0.1})
        write_sections(workdir, [Section("tv", "Task vectors", {"c": 0.25})])
        raise RuntimeError("disk full while merging ties")

    class Kinds:
        def get(self, name):
            return failing_kind

    monkeypatch.setattr(experiment, "KINDS", Kinds())
    config = load_config_file(ROOT / "configs" / "digits_mlp.py", "quick")
    with pytest.raises(RuntimeError, match="disk full"):
        experiment.run(config, tmp_path)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "failed"
    text = (tmp_path / "report.md").read_text()
    assert "**The run failed:** `RuntimeError: disk full while merging ties`" in text
    assert text.index("The run failed") < text.index("| average |") < text.index(
        "## Task vectors")
