"""``cryonb class2d``: relion_refine's flags, generated from Class2DConfig; end to end."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import pytest

from cryonb.cli import build_parser, main
from cryonb.commands._options import IGNORED_FLAGS, config_from_args
from cryonb.em._config import Class2DConfig
from cryonb.errors import ConfigError
from cryonb.io import read_mrc, read_particles, read_star

FAST = ["--K", "3", "--iter", "2", "--psi_step", "20", "--offset_range", "2", "--quiet"]


def _parse(*argv):
    args, unknown = build_parser().parse_known_args(["class2d", "--i", "p.star", "--o", "o/run",
                                                    *argv])
    assert not unknown
    return config_from_args(Class2DConfig, args)


def test_every_option_has_its_relion_flag():
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    flags = set(sub.choices["class2d"]._option_string_actions)
    for f in Class2DConfig.option_fields(cli=True):
        assert Class2DConfig.flag(f.name) in flags, f.name
    for relion in ("--i", "--o", "--K", "--iter", "--tau2_fudge", "--particle_diameter",
                   "--zero_mask", "--ctf", "--ctf_intact_first_peak", "--psi_step",
                   "--offset_range", "--offset_step", "--norm", "--scale", "--random_seed",
                   "--continue", "--j", "--pool", "--gpu", "--cpu", "--ranks",
                   "--no_parallel_disc_io", "--preread_images", "--dont_combine_weights_via_disc",
                   "--scratch_dir", "--keep_free_scratch", "--no_ctf", "--no_norm"):
        assert relion in flags, relion


def test_flags_build_the_config():
    cfg, warnings = _parse("--K", "7", "--no_ctf", "--gpu", "--j", "3", "--ranks", "4",
                           "--pool", "30", "--dont_combine_weights_via_disc")
    assert (cfg.K, cfg.ctf, cfg.gpu, cfg.j, cfg.ranks, cfg.pool) == (7, False, "", 3, 4, 30)
    assert cfg.combine == "network" and cfg.io_mode == "parallel" and not warnings
    assert _parse("--gpu", "0:1")[0].gpu == "0:1"
    assert _parse()[0].gpu is None  # not given: a GPU if one is usable
    assert _parse("--no_parallel_disc_io")[0].io_mode == "leader"
    assert _parse("--preread_images")[0].io_mode == "preread"
    cfg = _parse("--scratch_dir", "/tmp/s", "--keep_free_scratch", "2")[0]
    assert (cfg.io_mode, cfg.scratch_dir, cfg.keep_free_scratch) == ("scratch", "/tmp/s", 2.0)
    cfg, warnings = _parse("--no_parallel_disc_io", "--preread_images")
    assert cfg.io_mode == "leader" and "nothing is preread" in warnings[0]


def test_harmless_relion_flags_are_ignored_with_a_warning():
    _, warnings = _parse("--dont_check_norm", "--memory_per_thread", "4", "--onthefly_shifts",
                         "--skip_gridding", "--auto_sampling", "--fast_subsets")
    assert len(warnings) == 6
    assert "--memory_per_thread 4 is ignored" in warnings[1]
    assert all(" is ignored: " in w for w in warnings)
    assert set(IGNORED_FLAGS) >= {"--dont_check_norm", "--fast_subsets"}
    assert "--pipeline_control" not in IGNORED_FLAGS  # RELION's, done (test_pipeline_control)


def test_contradictions_are_errors():
    with pytest.raises(ConfigError, match="--preread_images and --scratch_dir"):
        _parse("--preread_images", "--scratch_dir", "/tmp/s")
    with pytest.raises(ConfigError, match="--no_parallel_disc_io contradicts --io_mode"):
        _parse("--no_parallel_disc_io", "--io_mode", "preread")
    with pytest.raises(ConfigError, match="--cpu and --gpu"):
        _parse("--cpu", "--gpu", "0")


@pytest.mark.parametrize("command", [None, "demo", "simulate", "info", "class2d", "autopick",
                                     "extract", "gpumap"])
def test_help_is_printed(command, capsys):
    """``--help`` prints every option's text (a literal % in a help string broke it)."""
    with pytest.raises(SystemExit) as e:
        main([command, "--help"] if command else ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cryonb")
    if command == "class2d":
        assert "60% of --iter" in out and "--tau2_fudge" in out


def test_unknown_flag_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["class2d", "--i", "p.star", "--o", "o/run", "--helical_outer_diameter", "200"])
    assert e.value.code == 2
    assert "unrecognised arguments: --helical_outer_diameter 200" in capsys.readouterr().err


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    assert main(["class2d", "--o", str(tmp_path / "run")]) == 2
    assert "--i, the particles STAR file is required" in capsys.readouterr().err
    assert main(["class2d", "--i", str(tmp_path / "nope.star"), "--o", str(tmp_path / "r"),
                 *FAST]) == 2
    err = capsys.readouterr().err
    assert "cryonb class2d: error:" in err and "nope.star" in err and "Traceback" not in err


def test_end_to_end_with_a_pasted_relion_command(sim_star, tmp_path, capsys):
    out = tmp_path / "Class2D" / "run"
    job = tmp_path / "Class2D" / "job008"
    job.mkdir(parents=True)
    (job / "RELION_JOB_EXIT_FAILURE").touch()  # an earlier attempt's marker
    argv = ["class2d", "--i", str(sim_star), "--o", str(out), *FAST, "--j", "2", "--pool", "40",
            "--dont_check_norm", "--pipeline_control", f"{job}/", "--preread_images",
            "--dont_combine_weights_via_disc", "--flatten_solvent", "--zero_mask", "--ctf",
            "--tau2_fudge", "2", "--particle_diameter", "80", "--oversampling", "1",
            "--offset_step", "2", "--norm", "--scale", "--cpu"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert f"class averages: {out}_it002_classes.mrcs" in cap.out
    assert "warning: --dont_check_norm is ignored" in cap.err
    classes = read_mrc(f"{out}_it002_classes.mrcs")
    assert classes.data.shape == (3, 32, 32)
    data = read_particles(f"{out}_it002_data.star")
    assert data.n == 150 and set(data.particles["rlnClassNumber"]) <= {1, 2, 3}
    model = read_star(f"{out}_it002_model.star")
    assert len(model["model_classes"]) == 3
    assert (tmp_path / "Class2D" / "run_it002_optimiser.star").exists()
    # RELION's pipeliner sees the job finish
    assert sorted(p.name for p in job.iterdir()) == ["RELION_JOB_EXIT_SUCCESS"]


def test_pipeline_control_failure_and_abort(sim_star, tmp_path, capsys):
    """Under RELION's pipeline control a failed run leaves RELION_JOB_EXIT_FAILURE (a usage
    error too); RELION_JOB_ABORT_NOW stops the run cleanly, leaves RELION_JOB_EXIT_ABORTED
    and the last complete iteration's files, and is removed."""
    job = tmp_path / "job009"  # no trailing slash: still the folder (RELION would prefix)
    assert main(["class2d", "--i", str(tmp_path / "nope.star"), "--o", str(tmp_path / "r"),
                 "--pipeline_control", str(job), *FAST]) == 2
    assert sorted(p.name for p in job.iterdir()) == ["RELION_JOB_EXIT_FAILURE"]
    with pytest.raises(SystemExit):
        main(["class2d", "--i", str(sim_star), "--o", str(tmp_path / "r"), "--K", "x",
              f"--pipeline_control={job}"])
    assert sorted(p.name for p in job.iterdir()) == ["RELION_JOB_EXIT_FAILURE"]
    # argparse's abbreviation of the flag is the flag too; the last one given counts
    other = tmp_path / "other"
    assert main(["class2d", "--pipeline", str(other), "--pipeline_control", str(job),
                 "--o", str(tmp_path / "r")]) == 2
    assert not other.exists()
    assert sorted(p.name for p in job.iterdir()) == ["RELION_JOB_EXIT_FAILURE"]
    # a folder that cannot be the job's: one line, no traceback
    (tmp_path / "file").touch()
    assert main(["class2d", "--pipeline_control", str(tmp_path / "file"), "--o", "x"]) == 2
    assert "--pipeline_control" in capsys.readouterr().err
    # asked to abort once iteration 1 is written (as the GUI's Abort button does)
    out = tmp_path / "a" / "run"

    def press_abort():
        deadline = time.monotonic() + 120
        while not Path(f"{out}_it001_data.star").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        (job / "RELION_JOB_ABORT_NOW").touch()

    threading.Thread(target=press_abort, daemon=True).start()
    argv = ["class2d", "--i", str(sim_star), "--o", str(out), "--K", "3", "--iter", "25",
            "--psi_step", "10", "--offset_range", "3", "--cpu", "--j", "1",
            "--pipeline_control", str(job)]
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert "RELION_JOB_ABORT_NOW found" in cap.err and "aborted on request" in cap.err
    assert sorted(p.name for p in job.iterdir()) == ["RELION_JOB_EXIT_ABORTED"]
    last = int(cap.out.split("stopped after iteration ")[1].split()[0])
    assert 1 <= last < 25
    assert Path(f"{out}_it{last:03d}_data.star").exists()
    assert not Path(f"{out}_it{last + 1:03d}_data.star").exists()
    # a request already there stops the run before it starts
    (job / "RELION_JOB_ABORT_NOW").touch()
    assert main([*argv[:4], str(tmp_path / "b" / "run"), *argv[5:]]) == 2
    assert "stopped before the initial model" in capsys.readouterr().out
    assert sorted(p.name for p in job.iterdir()) == ["RELION_JOB_EXIT_ABORTED"]
    # the next run of the job is not stopped by the old request, and clears the old marker
    assert main(["class2d", "--i", str(sim_star), "--o", str(out), *FAST,
                 "--pipeline_control", str(job)]) == 0
    assert sorted(p.name for p in job.iterdir()) == ["RELION_JOB_EXIT_SUCCESS"]


def test_continue_from_the_command_line(sim_star, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["class2d", "--i", str(sim_star), "--o", str(out), *FAST, "--iter", "1"]) == 0
    assert main(["class2d", "--continue", f"{out}_it001_optimiser.star", "--o", str(out),
                 "--iter", "2", "--quiet"]) == 0
    assert f"class averages: {out}_it002_classes.mrcs" in capsys.readouterr().out


def test_continue_without_iter_keeps_the_runs_iterations(sim_star, tmp_path, capsys):
    """As ``relion_refine --continue``: without ``--iter`` the continued run stops where the
    run it continues was to stop (its ``rlnNumberOfIterations``), not at the default 25."""
    out = tmp_path / "run"
    assert main(["class2d", "--i", str(sim_star), "--o", str(out), *FAST]) == 0  # --iter 2
    (tmp_path / "run_it002_optimiser.star").unlink()
    assert main(["class2d", "--continue", f"{out}_it001_optimiser.star", "--quiet"]) == 0
    assert f"class averages: {out}_it002_classes.mrcs" in capsys.readouterr().out
    assert (tmp_path / "run_it002_optimiser.star").exists()
    assert not (tmp_path / "run_it003_optimiser.star").exists()


def test_ranks_start_and_stop_their_own_engines(sim_star, tmp_path, capsys):
    import psutil

    out = tmp_path / "run"
    assert main(["class2d", "--i", str(sim_star), "--o", str(out), *FAST, "--iter", "1",
                 "--ranks", "2", "--j", "2", "--combine", "disc", "--cpu"]) == 0
    assert f"class averages: {out}_it001_classes.mrcs" in capsys.readouterr().out
    engines = [p for p in psutil.Process().children(recursive=True)
               if "ipyparallel" in " ".join(p.cmdline())]
    assert not engines  # stopped with the run


def test_a_folder_that_cannot_be_made_is_a_message_not_a_traceback(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    rc = main(["simulate", "--o", str(blocker / "sim"), "--n", "4", "--box", "16"])
    err = capsys.readouterr().err
    assert rc == 2 and "cryonb simulate: error:" in err and str(blocker) in err, err
    assert "Traceback" not in err


def test_a_run_stopped_by_hand_is_aborted_for_relion(tmp_path, monkeypatch):
    """A Ctrl-C stop under RELION's pipeline control is an abort, not a success."""
    from cryonb.commands import _runner
    from cryonb.commands._pipeline import PipelineControl, active

    control = PipelineControl(tmp_path / "job").start()
    assert active() is control
    real, pressed = _runner.cf.Future.result, []

    def result(self, timeout=None):  # the first wait is interrupted by Ctrl-C
        if not pressed:
            pressed.append(True)
            raise KeyboardInterrupt
        return real(self, timeout)

    def run(config, *, progress, stop_event):
        return "stopped" if stop_event.wait(30) else "finished"

    monkeypatch.setattr(_runner.cf.Future, "result", result)
    try:
        assert _runner.run_job(run, None, quiet=True) == "stopped"
    finally:
        control.close()
    assert active() is None
    assert control.aborted and control.finish(True) == "RELION_JOB_EXIT_ABORTED"
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["RELION_JOB_EXIT_ABORTED"]


def test_continue_names_the_particles_it_keeps(sim_star, tmp_path, capsys):
    """``--continue`` with another ``--i`` (or ``--K``) keeps the run's, and says so: the
    saved state is per particle of the run's own STAR file."""
    out = tmp_path / "run"
    assert main(["class2d", "--i", str(sim_star), "--o", str(out), *FAST, "--iter", "1"]) == 0
    other = tmp_path / "other.star"
    other.write_text(sim_star.read_text())
    capsys.readouterr()
    assert main(["class2d", "--continue", f"{out}_it001_optimiser.star", "--i", str(other),
                 "--K", "7", "--iter", "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"--i {other} (the run's {sim_star} is kept)" in err
    assert "--K 7 (the run's" in err
    # the same file named another way is not a change
    same = f"{Path(sim_star).parent}/./{Path(sim_star).name}"
    assert main(["class2d", "--continue", f"{out}_it001_optimiser.star", "--i", same,
                 "--o", str(tmp_path / "again"), "--iter", "2", "--quiet"]) == 0
    assert "--i " not in capsys.readouterr().err


def test_continue_from_another_folder_says_where_the_particles_are(sim_star, tmp_path,
                                                                   monkeypatch, capsys):
    """A run started with a relative --i, continued from another folder: the error names the
    particles, the folder, and what to do (not a bare 'no such file')."""
    monkeypatch.chdir(Path(sim_star).parent)
    out = tmp_path / "run"
    assert main(["class2d", "--i", Path(sim_star).name, "--o", str(out), *FAST,
                 "--iter", "1"]) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["class2d", "--continue", f"{out}_it001_optimiser.star", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"the run's particles {Path(sim_star).name} are missing" in err
    assert "relative to the folder the run was started in" in err
