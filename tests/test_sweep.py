"""Parameter sweeps: the table, the cache, stop and resume, failures, plots and the widget."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest

from cryonb.em import Class2DConfig
from cryonb.errors import ConfigError
from cryonb.parallel import run_class2d
from cryonb.simulate import simulate_particles, write_particle_set
from cryonb.sweep import (
    SWEEP_COLUMNS,
    Sweep,
    SweepWidget,
    expand_grid,
    parse_values,
)


@pytest.fixture(scope="module")
def star(tmp_path_factory):
    """60 particles of 2 views, 24 px: one run of 1 iteration takes well under a second."""
    sim = simulate_particles(n=60, box=24, n_views=2, snr=1.0, seed=2, max_offset_px=1)
    return write_particle_set(sim, tmp_path_factory.mktemp("sweep_data"))


@pytest.fixture
def base(star):
    return Class2DConfig(i=str(star), K=2, iter=1, psi_step=30, offset_range=1, offset_step=1,
                         particle_diameter=0.8 * 24 * 3.0, random_seed=1, cpu=True)


class Counting:
    """The real runner, counting its calls and recording the configurations it got
    (``calls``: timed runs; ``warmups``: untimed warm-up runs)."""

    def __init__(self, fail_on=None, interrupt_on=None):
        self.calls: list[dict] = []
        self.warmups: list[dict] = []
        self.fail_on = fail_on or {}
        self.interrupt_on = interrupt_on or {}

    def __call__(self, config, **kw):
        seen = {"j": config.j, "K": config.K, "io_mode": config.io_mode}
        if "warmup" in config.o:
            self.warmups.append({**seen, "iter": config.iter})
            return run_class2d(config, **kw)
        self.calls.append(seen)
        for name, value in self.fail_on.items():
            if getattr(config, name) == value:
                raise RuntimeError(f"boom at {name}={value}")
        for name, value in self.interrupt_on.items():
            if getattr(config, name) == value:
                raise KeyboardInterrupt
        return run_class2d(config, **kw)


def test_expand_grid_product_and_list():
    pts = expand_grid({"j": [1, 2], "io_mode": ["parallel", "preread"], "K": 3})
    assert pts == [{"j": 1, "io_mode": "parallel", "K": 3}, {"j": 1, "io_mode": "preread", "K": 3},
                   {"j": 2, "io_mode": "parallel", "K": 3}, {"j": 2, "io_mode": "preread", "K": 3}]
    assert expand_grid([{"K": 2}, {"K": 4, "iter": 3}]) == [{"K": 2}, {"K": 4, "iter": 3}]
    with pytest.raises(TypeError):
        expand_grid("j")


def test_parse_values_by_type():
    cfg = Class2DConfig()
    assert parse_values(cfg, "j", "1, 2 4") == [1, 2, 4]
    assert parse_values(cfg, "tau2_fudge", "1;2.5") == [1.0, 2.5]
    assert parse_values(cfg, "io_mode", "parallel, preread") == ["parallel", "preread"]
    assert parse_values(cfg, "ctf", "true, no") == [True, False]
    assert parse_values(cfg, "gpu", "0,1:2; auto; none") == ["0,1:2", "", None]
    with pytest.raises(ConfigError, match="choose among"):
        parse_values(cfg, "io_mode", "fast")
    with pytest.raises(ConfigError, match="not a int"):
        parse_values(cfg, "j", "two")
    with pytest.raises(ConfigError, match="no option"):
        parse_values(cfg, "nope", "1")


def test_unknown_or_file_options_are_refused(base, tmp_path):
    with pytest.raises(ConfigError, match="no option"):
        Sweep(base, {"threads": [1, 2]}, root=tmp_path)
    with pytest.raises(ConfigError, match="cannot vary o"):
        Sweep(base, {"o": ["a", "b"]}, root=tmp_path)


def test_table_columns_quality_and_files(base, tmp_path):
    sweep = Sweep(base, {"j": [1, 2], "io_mode": ["parallel", "preread"]}, root=tmp_path / "s")
    df = sweep.run()
    params = ["j", "io_mode"]
    expected = [*SWEEP_COLUMNS[:3], *params, *SWEEP_COLUMNS[3:]]
    assert list(df.columns) == expected
    assert (df["status"] == "ok").all(), df["error"].tolist()
    assert df[["j", "io_mode"]].values.tolist() == [[1, "parallel"], [1, "preread"],
                                                    [2, "parallel"], [2, "preread"]]
    for col in ("t_total", "t_estep", "t_mstep", "particles_per_s", "peak_host_mem_mb",
                "log_likelihood", "resolution_A"):
        assert (df[col] > 0).all(), col
    assert (df["t_preread"] > 0).tolist() == [False, True, False, True]
    # the truth CSV beside the STAR file is found: purity and angle errors are scored
    assert df["purity"].between(0.5, 1.0).all()
    assert df["inplane_median_deg"].notna().all()
    assert df["n_particles"].tolist() == [60] * 4
    # persisted: the table, each run's record and RELION's files in its own folder
    assert pd.read_csv(tmp_path / "s" / "results.csv")["status"].tolist() == ["ok"] * 4
    for i in range(4):
        out = sweep.run_dir(i)
        assert (out / "sweep_run.json").exists()
        assert (out / "run_it001_classes.mrcs").exists()
        assert sweep.record(i)["files"]["data"].endswith("run_it001_data.star")
    ranks = sweep.rank_table()
    assert len(ranks) == 4 and (ranks["particles"] == 120).all()  # init pass + 1 iteration
    reopened = Sweep.open(tmp_path / "s")
    pd.testing.assert_frame_equal(reopened.table(), sweep.table())


def test_second_run_of_the_same_grid_does_no_new_job(base, tmp_path):
    grid = {"j": [1, 2]}
    runner = Counting()
    first = Sweep(base, grid, root=tmp_path / "s", runner=runner).run()
    assert len(runner.calls) == 2
    # performance sweeps warm up once, untimed, with one iteration, leaving no files
    assert runner.warmups == [{"j": 1, "K": 2, "io_mode": "parallel", "iter": 1}]
    assert not (tmp_path / "s" / "warmup").exists()
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "s" / "runs").rglob("*")}
    again = Sweep(base, grid, root=tmp_path / "s", runner=runner)
    second = again.run()
    assert len(runner.calls) == 2 and len(runner.warmups) == 1  # nothing ran
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "s" / "runs").rglob("*")} == files
    pd.testing.assert_frame_equal(first, second)
    # a grid overlapping the cached one runs only the new configuration
    more = Sweep(base, {"j": [1, 2, 3]}, root=tmp_path / "s", runner=runner).run()
    assert runner.calls[2:] == [{"j": 3, "K": 2, "io_mode": "parallel"}]
    assert (more["status"] == "ok").all()
    # the key ignores the output folder but not the options
    assert again.keys[0] == base.replace(o="elsewhere").replace(o="").key()
    assert len(set(Sweep(base, {"K": [2, 3]}, root=tmp_path / "t").keys)) == 2


def test_stopped_sweep_resumes_where_it_stopped(base, tmp_path):
    grid = {"K": [2, 3], "j": [1, 2]}
    runner = Counting()
    stop = threading.Event()

    def progress(ev):
        if ev["event"] == "run_end" and ev["run"] == 1:
            stop.set()

    sweep = Sweep(base, grid, root=tmp_path / "s", runner=runner, warmup=False)
    df = sweep.run(progress=progress, stop_event=stop)
    assert df["status"].tolist() == ["ok", "ok", "pending", "pending"]
    assert len(runner.calls) == 2
    df = Sweep(base, grid, root=tmp_path / "s", runner=runner, warmup=False).run()
    assert df["status"].tolist() == ["ok"] * 4
    assert runner.calls[2:] == [{"j": 1, "K": 3, "io_mode": "parallel"},
                                {"j": 2, "K": 3, "io_mode": "parallel"}]


def test_run_stopped_midway_is_recorded_and_rerun(base, tmp_path):
    grid = {"j": [1, 2]}
    runner = Counting()
    sweep = Sweep(base.replace(iter=3), grid, root=tmp_path / "s", runner=runner, warmup=False)

    def progress(ev):  # stop inside the second run, after its first iteration
        if ev["event"] == "iteration" and ev.get("iteration") == 1 and ev["run"] == sweep.keys[1]:
            sweep.stop()

    df = sweep.run(progress=progress)
    assert df["status"].tolist() == ["ok", "stopped"]
    assert sweep.record(1)["row"]["iterations"] < 3
    df = sweep.run()
    assert df["status"].tolist() == ["ok", "ok"]
    assert [c["j"] for c in runner.calls] == [1, 2, 2]
    assert not list(sweep.run_dir(1).glob("run_it004*"))
    assert (sweep.run_dir(1) / "run_it003_classes.mrcs").exists()


def test_keyboard_interrupt_saves_and_resumes(base, tmp_path):
    grid = {"j": [1, 2, 3]}
    runner = Counting(interrupt_on={"j": 2})
    sweep = Sweep(base, grid, root=tmp_path / "s", runner=runner, warmup=False)
    with pytest.raises(KeyboardInterrupt):
        sweep.run()
    assert sweep.table()["status"].tolist() == ["ok", "stopped", "pending"]
    assert pd.read_csv(tmp_path / "s" / "results.csv")["status"].tolist() == [
        "ok", "stopped", "pending"]
    runner.interrupt_on = {}
    assert sweep.run()["status"].tolist() == ["ok"] * 3
    assert [c["j"] for c in runner.calls] == [1, 2, 2, 3]


def test_failing_configuration_is_recorded_not_raised(base, tmp_path):
    runner = Counting(fail_on={"j": 2})
    grid = [{"K": 0}, {"j": 2}, {"j": 1, "io_mode": "scratch"}, {"j": 1}]
    sweep = Sweep(base, grid, root=tmp_path / "s", runner=runner, kind="algorithm")
    df = sweep.run()
    assert df["status"].tolist() == ["failed", "failed", "failed", "ok"]
    assert df["error"][0] == "ConfigError: --K must be >= 1"
    assert df["error"][1] == "RuntimeError: boom at j=2"
    assert "--scratch_dir" in df["error"][2]
    assert "Traceback" in sweep.record(1)["traceback"]
    assert np.isnan(df["particles_per_s"][0]) and df["particles_per_s"][3] > 0
    assert len(runner.calls) == 2  # invalid options never reach the runtime
    # failures are results: kept on a second run unless asked to retry
    sweep.run()
    assert len(runner.calls) == 2
    runner.fail_on = {}
    df = Sweep(base, grid, root=tmp_path / "s", runner=runner, kind="algorithm",
               retry_failed=True).run()
    assert runner.warmups == []  # algorithm sweeps do not warm up
    assert df["status"].tolist() == ["failed", "ok", "failed", "ok"]


def test_quality_without_truth_and_plots(base, tmp_path):
    sweep = Sweep(base, {"K": [2, 3], "j": [1, 2]}, kind="algorithm", root=tmp_path / "s",
                  truth=False)
    df = sweep.run()
    assert df["purity"].isna().all() and df["log_likelihood"].notna().all()
    import holoviews as hv

    for plot in (sweep.plot_quality(), sweep.plot_throughput(), sweep.plot_stages(),
                 sweep.plot_quality("j", metrics=["avg_pmax"])):
        hv.render(plot, backend="bokeh")


def test_widget_defines_grid_and_runs(base, tmp_path):
    w = SweepWidget(base, kind="performance", root=tmp_path / "w", grid={"j": [1]})
    names = [v for _, v in w.field.options]
    assert "j" in names and "io_mode" in names and "K" not in names
    w.field.value, w.values.value = "io_mode", "parallel, preread"
    w._add_clicked()
    assert w.grid == {"j": [1], "io_mode": ["parallel", "preread"]}
    w.values.value = "warp"
    w._add_clicked()
    assert "choose among" in w.status.value
    w.run(wait=True)
    assert w.sweep.table()["status"].tolist() == ["ok", "ok"]
    assert w.status.value == "done" and "preread" in w.table_view.value
    algo = SweepWidget(base, kind="algorithm", root=tmp_path / "a")
    assert "K" in [v for _, v in algo.field.options]
    assert Sweep(base, {"K": [2]}, root=tmp_path / "x").widget().grid == {"K": [2]}


@pytest.mark.slow
def test_ranks_share_one_cluster(base, tmp_path):
    sweep = Sweep(base, {"ranks": [2, 3]}, root=tmp_path / "s")
    df = sweep.run()
    assert (df["status"] == "ok").all(), df["error"].tolist()
    assert df["engines_used"].tolist() == ["attach", "attach"]
    assert sweep.cluster_seconds > 0 and (df["t_cluster"] == 0).all()
    assert len(sweep.rank_table()) == 1 + 2  # working ranks: 1, then 1 and 2
