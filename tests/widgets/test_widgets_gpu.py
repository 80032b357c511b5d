"""The --gpu string checked on every keystroke: the resolved table, or the error inline."""

from __future__ import annotations

import html

import pytest

from cryonb.widgets import Class2DPanel, device_report

BAD = [
    ("0::1", "empty rank group", 3),
    ("0:", "trailing", None),
    (":0", "no device id before it", 1),
    ("0,,1", "two ',' in a row", 3),
    ("0, 1", "space", 3),
    ("0:a", "'a'", 3),
    ("7", "device 7 does not exist", 1),
]


@pytest.fixture
def panel(particles, tmp_path):
    return Class2DPanel(devices=4, i=str(particles), o=str(tmp_path / "run"), ranks=3, j=2)


def _gpu_html(panel) -> str:
    return panel.form["gpu"].status.value


@pytest.mark.parametrize(("spec", "what", "column"), BAD)
def test_bad_string_shows_the_error_with_a_caret(panel, spec, what, column):
    panel.form["gpu"].text.value = spec  # one keystroke's worth: no button, no cell re-run
    shown = _gpu_html(panel)
    assert 'class="cryonb-error"' in shown and "Traceback" not in shown
    assert what.replace("'", "&#x27;") in shown
    if column is not None:  # the caret sits under the fault, as the browser shows it
        lines = html.unescape(shown).split("\n")
        quoted = next(ln for ln in lines if ln.lstrip().startswith("--gpu"))
        caret = next(ln for ln in lines if ln.rstrip().endswith("^ here"))
        assert caret.index("^") == quoted.index("'") + column
    assert "gpu" in panel.errors and panel.run_button.disabled
    assert "cryonb-invalid" in panel.form["gpu"].text._dom_classes
    assert "invalid --gpu" in panel.status.value or "does not exist" in panel.status.value


@pytest.mark.parametrize("spec", ["", "0:1", "0,1:2,3", "1", "3,2"])
def test_good_string_shows_the_device_table(panel, spec):
    panel.form["gpu"].text.value = "0::"  # bad first, then fixed
    panel.form["gpu"].text.value = spec
    shown = _gpu_html(panel)
    assert 'class="cryonb-gpu-table"' in shown and "cryonb-error" not in shown
    table = shown.split("\n")
    assert table[1].split()[:4] == ["rank", "role", "host", "thread"]
    # the leader, then 2 workers x 2 threads
    assert [ln.split()[:2] for ln in table[2:7]] == [["0", "leader"]] + [["1", "worker"]] * 2 \
        + [["2", "worker"]] * 2
    assert "visible GPUs (4)" in shown
    assert panel.valid and not panel.run_button.disabled
    assert panel.config.gpu == spec
    assert panel.device_report.device_map.to_json_dict()["0"] == []


def test_typing_ticks_the_flag_and_clearing_it_drops_the_flag(panel):
    gpu = panel.form["gpu"]
    assert gpu.value is None and "--gpu" not in panel.command.value
    gpu.text.value = "0:1"
    assert gpu.given.value and panel.config.gpu == "0:1"
    assert "--gpu 0:1" in panel.command.value and "--gpu 0:1" in panel.relion_command.value
    gpu.given.value = False
    assert panel.config.gpu is None and "--gpu" not in panel.command.value


def test_warnings_and_the_table_follow_ranks_and_threads(panel):
    panel.form["gpu"].text.value = "0:0"
    assert "device 0 is shared by 2 worker ranks" in _gpu_html(panel)
    panel.form["ranks"].value = 2
    assert "unused" in _gpu_html(panel)
    panel.form["j"].value = 3
    assert "0-2" not in _gpu_html(panel)  # refine: one row per thread
    assert _gpu_html(panel).count("\n1     worker") == 3


def test_without_gpus_every_id_is_refused():
    panel = Class2DPanel(devices=0)
    panel.form["gpu"].text.value = "0"
    assert "no GPU is visible" in _gpu_html(panel) and panel.run_button.disabled
    panel.form["gpu"].text.value = ""
    assert "cryonb-gpu-table" in _gpu_html(panel) and "cpu" in _gpu_html(panel)
    assert "visible GPUs: none" in _gpu_html(panel)


def test_cpu_and_gpu_conflict_is_explained():
    panel = Class2DPanel(devices=2, cpu=True)
    panel.form["gpu"].text.value = "0"
    assert "--cpu and --gpu were both given" in _gpu_html(panel)
    panel.form["gpu"].text.value = "0::"  # the string's own error comes first
    assert "empty rank group" in _gpu_html(panel)


def test_autopick_uses_the_all_ranks_rule():
    rep = device_report("0:1", ranks=3, threads=2, job="autopick", devices=2)
    assert rep.ok and rep.device_map.to_json_dict() == {"0": [0], "1": [1], "2": [0]}
    assert "all ranks work" in rep.text
    bad = device_report("0 1", ranks=1, threads=1, job="autopick", devices=2)
    assert not bad.ok and "^" in bad.text and bad.device_map is None


def test_device_names_and_uuids_are_shown():
    devs = [{"uuid": "GPU-aaaa", "name": "Tesla X"}, {"uuid": "GPU-bbbb", "name": "Tesla X"}]
    rep = device_report("1", ranks=2, threads=1, devices=devs)
    assert rep.ok and "GPU-bbbb" in rep.text and "Tesla X" in rep.text
    assert "visible GPUs (2): 0: Tesla X GPU-aaaa; 1: Tesla X GPU-bbbb" in rep.text
