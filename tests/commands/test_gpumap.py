"""``cryonb gpumap``: the resolved table and --json, on GPU_SPEC.md's worked examples."""

from __future__ import annotations

import json

import pytest

from cryonb.cli import main
from cryonb.parallel.hardware import visible_devices

# GPU_SPEC.md, 4 devices on one host: (spec, ranks, j, job) -> device per thread of each rank
EXAMPLES = [
    ("", 3, 1, "refine", {"0": [], "1": [0], "2": [2]}),
    ("", 3, 2, "refine", {"0": [], "1": [0, 1], "2": [2, 3]}),
    ("", 4, 1, "refine", {"0": [], "1": [0], "2": [1], "3": [2]}),
    ("2:3", 3, 1, "refine", {"0": [], "1": [2], "2": [3]}),
    ("2:3", 3, 4, "refine", {"0": [], "1": [2, 2, 2, 2], "2": [3, 3, 3, 3]}),
    ("2:3", 5, 1, "refine", {"0": [], "1": [2], "2": [3], "3": [2], "4": [3]}),
    ("0,1,1,2:3", 3, 4, "refine", {"0": [], "1": [0, 1, 1, 2], "2": [3, 3, 3, 3]}),
    ("2:2:1,3", 4, 3, "refine", {"0": [], "1": [2, 2, 2], "2": [2, 2, 2], "3": [1, 3, 1]}),
    ("0,1,2,3", 5, 1, "refine", {"0": [], "1": [0], "2": [0], "3": [0], "4": [0]}),
    ("", 3, 1, "autopick", {"0": [0], "1": [1], "2": [2]}),
    ("2:3", 2, 1, "autopick", {"0": [2], "1": [3]}),
    ("2:2:1,3", 3, 1, "autopick", {"0": [2], "1": [2], "2": [1]}),
    ("2:3", 3, 1, "autopick", {"0": [2], "1": [3], "2": [2]}),
]


@pytest.mark.parametrize(("spec", "ranks", "j", "job", "want"), EXAMPLES)
def test_json_map(capsys, spec, ranks, j, job, want):
    argv = ["gpumap", "--gpu", spec, "--ranks", str(ranks), "--j", str(j), "--devices", "4",
            "--job", job, "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == want


def test_table_shows_roles_sharing_and_warnings(capsys):
    assert main(["gpumap", "--gpu", "0,1,2,3", "--ranks", "5", "--devices", "4"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("--gpu '0,1,2,3' (as given): refine (leader/worker), 5 ranks")
    assert lines[1].split()[:5] == ["rank", "role", "host", "thread", "device"]
    assert lines[2].split()[:2] == ["0", "leader"]
    assert "4 ranks, 4 threads" in lines[3]
    assert "did you mean '0:1:2:3'?" in out  # listed but unused devices
    assert "device 0 is shared by 4 worker ranks" in out


def test_json_puts_warnings_on_stderr(capsys):
    assert main(["gpumap", "--gpu", "2:3", "--ranks", "5", "--devices", "4", "--json"]) == 0
    cap = capsys.readouterr()
    json.loads(cap.out)
    assert "warning: device 2 is shared by 2 worker ranks" in cap.err


def test_gpu_flag_alone_means_automatic(capsys):
    assert main(["gpumap", "--ranks", "3", "--j", "2", "--devices", "4", "--gpu",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"0": [], "1": [0, 1], "2": [2, 3]}


def test_malformed_string_is_a_clear_error(capsys):
    assert main(["gpumap", "--gpu", "0 1 2 3", "--ranks", "5", "--devices", "4"]) == 2
    err = capsys.readouterr().err
    assert "cryonb gpumap: error: invalid --gpu string: whitespace" in err
    assert "^ here" in err and "'0:1:2:3'" in err
    assert "Traceback" not in err


def test_out_of_range_device(capsys):
    assert main(["gpumap", "--gpu", "0:4", "--ranks", "3", "--devices", "4"]) == 2
    assert "device 4 does not exist" in capsys.readouterr().err


@pytest.mark.skipif(bool(visible_devices()), reason="a GPU is visible here")
def test_no_visible_gpu_asks_for_devices(capsys):
    assert main(["gpumap", "--gpu", "0:1", "--ranks", "3"]) == 2
    assert "give --devices D" in capsys.readouterr().err
    assert main(["gpumap", "--ranks", "3", "--j", "2"]) == 0  # automatic: the CPU table
    assert "cpu" in capsys.readouterr().out
