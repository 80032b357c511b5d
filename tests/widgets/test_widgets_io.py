"""What the I/O mode, pools and combine mode need, shown as the options change."""

from __future__ import annotations

import html

from cryonb.parallel.images import format_bytes, image_bytes
from cryonb.widgets import AutopickPanel, Class2DPanel


def _io(panel) -> str:
    return html.unescape(panel.io_status.value)


def test_parallel_and_leader(particles, tmp_path):
    panel = Class2DPanel(devices=0, i=str(particles), o=str(tmp_path / "run"), pool=20)
    data = format_bytes(image_bytes(120, 24))
    assert f"120 particles of 24 x 24 px = {data}" in _io(panel)
    assert "each of the 1 worker reads its own pools" in _io(panel)
    assert "--pool 20" in _io(panel) and "host memory" in _io(panel)
    panel.form["io_mode"].value = "leader"
    panel.form["ranks"].value = 3
    assert "rank 0 reads every image" in _io(panel) and f"{data} through" in _io(panel)
    assert "combine: the workers' sums go to the leader through the network" in _io(panel)
    panel.form["combine"].value = "disc"
    assert "_rank<r>.tmp" in _io(panel)


def test_preread_memory(particles, tmp_path, monkeypatch):
    panel = Class2DPanel(devices=0, i=str(particles), o=str(tmp_path / "run"), ranks=3)
    panel.form["io_mode"].value = "preread"
    per = format_bytes(image_bytes(120, 24))
    both = format_bytes(2 * image_bytes(120, 24))
    assert f"every worker holds all particles in RAM, {per} each: {both} for 2 workers" in _io(
        panel)
    assert panel.valid
    import cryonb.parallel.images as images

    monkeypatch.setattr(images, "available_memory", lambda: 1000)
    panel.form["ranks"].value = 2  # any change checks again
    assert "cryonb-io-error" in _io(panel) and "--preread_images needs" in _io(panel)
    assert "inputs" in panel.errors and panel.run_button.disabled


def test_scratch_disc(particles, tmp_path):
    panel = Class2DPanel(devices=0, i=str(particles), o=str(tmp_path / "run"))
    panel.form["io_mode"].value = "scratch"
    assert "--io_mode scratch needs --scratch_dir" in panel.status.value
    panel.form["scratch_dir"].value = str(tmp_path / "not" / "yet")
    assert "all particles fit" in _io(panel)
    assert not (tmp_path / "not").exists()  # checking creates nothing
    panel.form["keep_free_scratch"].value = 1e9  # GB: nothing fits
    assert "only 0 of 120 particles fit" in _io(panel) and "cryonb-io-warning" in _io(panel)
    assert panel.valid  # the others are read from their stacks: allowed


def test_automatic_pool_and_gpu_memory(particles, tmp_path):
    panel = Class2DPanel(devices=1, i=str(particles), o=str(tmp_path / "run"), pool=0)
    assert "GPU memory" in _io(panel) and "chosen at the start" in _io(panel)
    assert "one pool per rank and card" in _io(panel)
    panel.form["cpu"].value = True
    assert "host memory" in _io(panel) and "automatic (256 on the CPU, here 60)" in _io(panel)


def test_missing_input(tmp_path):
    panel = Class2DPanel(devices=0, i=str(tmp_path / "nope.star"), o=str(tmp_path / "run"))
    assert "no such file" in _io(panel) and panel.run_button.disabled
    assert "no such file" in panel.status.value
    panel.form["i"].value = ""
    assert "give the particles STAR file" in _io(panel)


def test_autopick_inputs(pick_set, tmp_path):
    panel = AutopickPanel(devices=0, i=str(pick_set.micrographs_star),
                          ref=str(pick_set.references), odir=str(tmp_path) + "/", ranks=2)
    assert "3 micrographs of 192 x 192 px" in _io(panel) and "first 1 rank(s)" in _io(panel)
    panel.form["ref"].value = str(tmp_path / "none.mrcs")
    assert "no such file" in _io(panel) and panel.run_button.disabled
