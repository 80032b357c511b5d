"""Options from the configuration metadata: the same object the CLI builds, round trips,
command lines, invalid options shown inline."""

from __future__ import annotations

import dataclasses
import shlex

import pytest

from cryonb.cli import build_parser
from cryonb.commands._options import config_from_args
from cryonb.em import Class2DConfig
from cryonb.pick import AutopickConfig
from cryonb.widgets import AutopickPanel, Class2DPanel, ConfigForm, JobPanel

NON_DEFAULT = dict(i="Extract/particles.star", o="Class2D/job1/run", K=17, iter=9,
                   tau2_fudge=3.5, particle_diameter=180.0, zero_mask=False, psi_step=7.5,
                   ranks=3, j=2, pool=40, gpu="0:1", io_mode="preread", combine="disc",
                   engines="local", timeout=90.0, reseed=False)


def _cli_config(panel, cls):
    """What ``cryonb <job>`` builds from the command line the panel shows."""
    argv = shlex.split(panel.config.command_line())[1:]
    args = build_parser().parse_args(argv)
    return config_from_args(cls, args)[0]


def test_every_widget_option_has_a_widget():
    form = ConfigForm(Class2DConfig)
    names = {f.name for f in Class2DConfig.option_fields(widget=True)}
    assert set(form.fields) == names
    assert form["gpu"].value is None and form["K"].widget.description == "--K"
    assert "cryonb-field-K" in form["K"].widget._dom_classes
    assert form["io_mode"].widget.options == ("parallel", "leader", "preread", "scratch")


def test_config_is_what_the_cli_builds():
    panel = Class2DPanel(devices=2, **NON_DEFAULT)
    cfg = panel.config
    assert type(cfg) is Class2DConfig
    assert cfg == Class2DConfig(**NON_DEFAULT).validate()
    assert _cli_config(panel, Class2DConfig) == cfg


def test_round_trip():
    cfg = Class2DConfig(**NON_DEFAULT)
    panel = Class2DPanel(devices=2)
    assert panel.config == Class2DConfig()
    assert panel.from_config(cfg) is panel
    assert panel.to_config() == cfg
    panel.from_config(Class2DConfig())
    assert panel.to_config() == Class2DConfig()
    pick = AutopickConfig(i="mics.star", ref="refs.mrcs", threshold=0.4, min_distance=120.0,
                          invert=True, ranks=2, gpu="", psi_step=5.0)
    ap = AutopickPanel(pick, devices=2)
    assert ap.to_config() == pick
    assert _cli_config(ap, AutopickConfig) == pick
    assert "--ang 5.0" in ap.command.value and "--io_mode" not in ap.command.value


def test_generic_panel_serves_any_job():
    panel = JobPanel(Class2DConfig, devices=1, K=4)
    assert panel.kind.can_run and panel.config.K == 4
    from cryonb.pick import ExtractConfig

    ext = JobPanel(ExtractConfig, devices=0)
    assert not ext.kind.can_run and ext.run_button.disabled
    assert "--extract_size 0: give an even box size" in ext.status.value
    ext.form["extract_size"].value = 64
    assert ext.config == ExtractConfig(extract_size=64)
    assert "options and command lines only" in ext.status.value
    assert "cryonb extract --extract_size 64" in ext.command.value
    assert "relion_preprocess" in ext.relion_command.value


def test_command_lines_follow_the_options():
    panel = Class2DPanel(devices=4, i="p.star", o="out/run")
    assert "cryonb class2d --i p.star --o out/run" in panel.command.value
    assert "relion_refine " in panel.relion_command.value
    panel.form["K"].value = 20
    panel.form["ranks"].value = 3
    panel.form["io_mode"].value = "preread"
    assert "--K 20" in panel.command.value and "--ranks 3" in panel.command.value
    relion = panel.relion_command.value
    assert "mpirun -n 3 relion_refine_mpi" in relion
    assert "--preread_images" in relion and "--dont_combine_weights_via_disc" in relion
    panel.form["combine"].value = "disc"
    assert "--dont_combine_weights_via_disc" not in panel.relion_command.value


def test_invalid_options_are_shown_inline(particles, tmp_path):
    panel = Class2DPanel(devices=0, i=str(particles), o=str(tmp_path / "run"))
    assert panel.valid
    panel.form["K"].value = 0
    assert "--K must be &gt;= 1" in panel.status.value
    assert "cryonb-error" in panel.status.value and "Traceback" not in panel.status.value
    assert "cryonb-invalid" in panel.form["K"].widget._dom_classes
    assert "cryonb-invalid" not in panel.form["iter"].widget._dom_classes
    assert panel.run_button.disabled and not panel.valid
    assert "not valid yet" in panel.command.value
    from cryonb.errors import ConfigError

    with pytest.raises(ConfigError, match="--K must be >= 1"):
        panel.to_config()
    panel.form["K"].value = 5
    assert panel.valid and not panel.run_button.disabled
    assert "cryonb-invalid" not in panel.form["K"].widget._dom_classes


def test_hidden_fields_keep_their_values():
    cfg = AutopickConfig(i="m.star", ref="r.mrcs", timeout=33.0)
    panel = AutopickPanel(cfg, devices=0)
    assert "timeout" not in panel.form.fields and "io_mode" not in panel.form.fields
    assert panel.config.timeout == 33.0
    assert dataclasses.replace(cfg) == panel.config
