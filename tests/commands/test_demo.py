"""``cryonb demo`` (shrunk so that the test is quick)."""

from __future__ import annotations

from cryonb.cli import main


def test_demo_simulates_classifies_and_says_where(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--o", str(out), "--n", "120", "--box", "32", "--views", "3",
                 "--iter", "1", "--psi_step", "30", "--offset_range", "2", "--j", "1",
                 "--cpu", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert f"class averages: {out}/Class2D/run_it001_classes.mrcs" in text
    assert "class purity against the simulated views:" in text
    assert (out / "data" / "particles.star").exists()
    assert (out / "data" / "particles_truth.csv").exists()
