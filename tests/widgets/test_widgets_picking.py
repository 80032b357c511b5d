"""Interactive picking of one micrograph, and the autopicking panel's Run/Stop/Continue."""

from __future__ import annotations

import pandas as pd
import pytest

from cryonb.pick import AutopickConfig, read_coordinates, run_autopick
from cryonb.widgets import AutopickPanel, PickExplorer


@pytest.fixture
def config(pick_set, tmp_path):
    return AutopickConfig(i=str(pick_set.micrographs_star), ref=str(pick_set.references),
                          odir=str(tmp_path / "AutoPick") + "/", invert=True, ctf=True,
                          particle_diameter=pick_set.particle_diameter, threshold=0.2)


def test_sliders_repick_as_autopick_would(config, tmp_path):
    ex = PickExplorer(config, micrograph=1)
    n = len(ex.picks())
    assert f"<b>{n} picks</b>" in ex.count.value and n > 0
    # the picks shown are those cryonb autopick writes with these values
    ex.threshold.value, ex.min_distance.value = 0.35, 80.0
    shown = ex.picks()
    cfg = config.replace(threshold=0.35, min_distance=80.0, odir=str(tmp_path / "ref") + "/")
    result = run_autopick(cfg)
    written = read_coordinates(result.micrographs[1].coordinates)
    pd.testing.assert_frame_equal(
        shown[["rlnCoordinateX", "rlnCoordinateY"]].reset_index(drop=True),
        written[["rlnCoordinateX", "rlnCoordinateY"]].reset_index(drop=True))
    ex.threshold.value = 5.0
    assert len(ex.picks()) == 0 and ex.pipe.data[1].empty
    ex.micrograph.value = 2
    assert ex.pipe.data[0] == 2 and sorted(ex._maps) == [1, 2]  # maps made once each
    view = ex.view()
    assert view is ex.view() and len(view) == 2


def test_explorer_values_go_to_the_panel_which_runs_stops_and_continues(config):
    panel = AutopickPanel(config, devices=0)
    ex = panel.explorer(micrograph=0)
    ex.threshold.value, ex.min_distance.value = 0.3, 90.0
    ex.apply()
    assert panel.config.threshold == 0.3 and panel.config.min_distance == 90.0
    assert "--threshold 0.3" in panel.command.value
    # Stop after the first micrograph, Continue picks the rest
    real = panel._on_event

    def stop_after_first(ev):
        real(ev)
        if ev["event"] == "pool":
            panel.stop()

    panel._on_event = stop_after_first
    handle = ex.run_all()
    assert handle.wait(60) is None and panel.progress.state.status == "stopped"
    assert panel.progress.state.done == 1
    assert not panel.continue_button.disabled
    panel._on_event = real
    panel.continue_button.click()
    assert panel.config.only_do_unfinished
    result = panel.wait(60)
    assert len(result.micrographs) == 3 and sum(m.skipped for m in result.micrographs) == 1
    assert panel.progress.state.status == "finished" and panel.progress.state.done == 3
    reports = panel.monitor.samples(kind="rank")
    assert "micrographs_per_s" in reports.columns and reports["stage"].notna().any()
