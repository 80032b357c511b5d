"""RELION particle tables: real stacks, optics groups, image names, bad input, round trips."""

from __future__ import annotations

import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryonb.errors import InputError
from cryonb.io import (
    ParticleTable,
    parse_image_name,
    read_micrographs,
    read_particles,
    read_stack,
    read_star,
    resolve_stack_path,
    split_optics,
    write_mrc,
    write_particles,
    write_star,
)

ASPIRE = "ComputationalCryoEM+ASPIRE-Python/tests/saved_test_data"
DRGN = "ml-struct-bio+cryodrgn/tests/data"
NO_MAP_ID = "ignore:.*no 'MAP ' id:UserWarning"

# star file, version, n, box, pixel size, first particle's (dU, dV, angle, kV, Cs, Q0) or None
REAL = [
    (f"{ASPIRE}/sample_particles_relion30.star", "3.0", 17, 200, 5e4 / 37369.207031,
     (21186.804688, 21363.109375, 7.476096, 300.0, 2.7, 0.1)),
    (f"{ASPIRE}/sample_particles_relion31.star", "3.1+", 17, 200, 1.4,
     (21186.804688, 21363.109375, 7.476096, 300.0, 2.7, 0.1)),
    (f"{ASPIRE}/sample_relion_symmetry_group_D4.star", "3.0", 17, 200, 5e4 / 37369.207031,
     (21186.804688, 21363.109375, 7.476096, 300.0, 2.7, 0.1)),
    (f"{ASPIRE}/sample_incomplete_ctf_params.star", "3.0", 1, 200, 5e4 / 37369.207031, None),
    (f"{ASPIRE}/rln_proj_64.star", "3.0", 5, 64, None, None),
    (f"{ASPIRE}/rln_proj_64_shifted.star", "3.1+", 4, 64, 1.0, None),
    (f"{ASPIRE}/rln_proj_65.star", "3.0", 5, 65, None, None),
    (f"{DRGN}/empiar_10076_7.star", "3.0", 7, 320, 5e4 / 38168,
     (15301.1, 14916.4, 5.28, 300.0, 2.7, 0.07)),
    (f"{DRGN}/relion31.star", "3.1+", 5, 256, 2.806,
     (13108.082418, 12845.582418, -160.39, 300.0, 0.01, 0.1)),
    (f"{DRGN}/relion31.v2.star", "3.1+", 5, 256, 2.806,
     (13108.082418, 12845.582418, -160.39, 300.0, 0.01, 0.1)),
    (f"{DRGN}/sta_testing_bin8.star", "3.0", 219, 64, 1.96,
     (20061.7, 19560.8, 12.3, 300.0, 2.7, 0.07)),
    (f"{DRGN}/toy_projections.star", "3.0", 1000, 30, None, None),
]  # fmt: skip


def _stack_image(star: Path, name: str) -> np.ndarray:
    """The image ``name`` ('000012@x.mrcs') read directly from the stack beside ``star``."""
    index, stack = name.split("@")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # voxel size 0 in many stacks
        return np.asarray(read_stack(star.parent / stack, mmap=False)[0][int(index) - 1])


def _tiny_project(tmp_path, names, *, n_images=17, box=8, extra=None, optics=None):
    """A stack x.mrcs of ``n_images`` images and a 3.1 particles STAR naming ``names``."""
    stack = np.arange(n_images * box * box, dtype=np.float32).reshape(n_images, box, box)
    write_mrc(tmp_path / "x.mrcs", stack, 1.0)
    particles = pd.DataFrame(
        {"rlnImageName": names, "rlnOpticsGroup": [1] * len(names), **(extra or {})}
    )
    if optics is None:
        optics = pd.DataFrame(
            {"rlnOpticsGroup": [1], "rlnImagePixelSize": [1.0], "rlnImageSize": [box]}
        )
    write_star(tmp_path / "p.star", {"optics": optics, "particles": particles})
    return tmp_path / "p.star", stack


# ---------------------------------------------------------------- real particle stacks


@pytest.mark.filterwarnings(NO_MAP_ID)
@pytest.mark.parametrize(
    ("local", "version", "n", "box", "pixel", "ctf"), REAL, ids=[Path(r[0]).name for r in REAL]
)
def test_real_particle_stacks(shared_data, local, version, n, box, pixel, ctf):
    star = shared_data / local
    table = read_particles(star)
    assert table.version == version
    assert table.n == len(table) == n
    assert table.box == box
    if pixel is None:
        assert table.pixel_size is None
    else:
        assert table.pixel_size == pytest.approx(pixel)
        assert table.pixel_sizes.shape == (n,)
    images = table.images()
    assert images.shape == (n, box, box) and images.dtype == np.float32
    rows = [n - 1, 0, n // 2]
    picked = table.images(rows)
    names = table.particles["rlnImageName"]
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(picked[i], _stack_image(star, names.iloc[row]))
        np.testing.assert_array_equal(images[row], picked[i])
    assert table.has_ctf == (ctf is not None)
    if ctf is None:
        with pytest.raises(InputError, match=r"no rln\w+ column.*cannot compute the CTF"):
            table.ctf_params()
        return
    params = table.ctf_params()
    first = [params[k][0] for k in ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs",
                                    "amplitude_contrast")]  # fmt: skip
    assert first == pytest.approx(ctf)
    assert all(v.shape == (n,) and v.dtype == np.float64 for v in params.values())
    assert params["pixel_size"][0] == pytest.approx(pixel)
    assert params["ctf_scalefactor"][0] == 1.0


def test_relion31_optics_groups_per_particle(shared_data):
    table = read_particles(shared_data / f"{ASPIRE}/sample_particles_relion31.star")
    assert len(table.optics) == 2
    voltage = table.ctf_params()["voltage"]
    np.testing.assert_array_equal(voltage, [300.0] * 8 + [200.0] * 9)
    assert table.particles["rlnMtfFileName"].iloc[0] == "mtf_k2_200kV.star"


def test_relion30_optics_synthesised(shared_data):
    table = read_particles(shared_data / f"{ASPIRE}/sample_particles_relion30.star")
    assert table.version == "3.0"
    optics = table.optics  # two voltages, 300 and 200 kV
    assert optics["rlnVoltage"].tolist() == [300.0, 200.0]
    assert optics["rlnOpticsGroupName"].tolist() == ["opticsGroup1", "opticsGroup2"]
    assert table.particles["rlnOpticsGroup"].tolist() == [1] * 8 + [2] * 9
    empiar = read_particles(shared_data / f"{DRGN}/empiar_10076_7.star")
    assert len(empiar.optics) == 1
    assert empiar.optics["rlnImagePixelSize"].iloc[0] == pytest.approx(5 * 1e4 / 38168)


def test_six_optics_groups(shared_data):
    table = read_particles(shared_data / f"{DRGN}/relion31.6opticsgroups.star")
    assert table.version == "3.1+" and table.n == 139 and len(table.optics) == 6
    assert table.box == 196
    with pytest.raises(InputError, match=r"2 different pixel sizes .*1.24, 1.25"):
        _ = table.pixel_size
    by_group = dict(zip(table.optics["rlnOpticsGroup"], table.optics["rlnImagePixelSize"]))
    expected = table.particles["rlnOpticsGroup"].map(by_group).to_numpy()
    np.testing.assert_array_equal(table.pixel_sizes, expected)
    assert table.particles["rlnEvenZernike"].str.startswith("[").all()


# ---------------------------------------------------------------- real files that must fail


@pytest.mark.filterwarnings(NO_MAP_ID)
@pytest.mark.filterwarnings("ignore:.*per-particle values are used:UserWarning")
def test_wrong_box_size_real(shared_data):
    table = read_particles(shared_data / f"{DRGN}/toy_projections_13.star")
    with pytest.raises(InputError) as err:
        table.images([0])
    assert "toy_projections_13.star" in str(err.value)
    assert (
        "wrong box size: toy_projections.mrcs has 30 x 30 images but optics group 1 says "
        "rlnImageSize 300"
    ) in str(err.value)


@pytest.mark.parametrize(
    "local",
    [f"{DRGN}/relion5.star", "ComputationalCryoEM+ASPIRE-Python/gallery/tutorials/data/"
     "sample_relion_data.star", f"{DRGN}/FinalRefinement-OriginalParticles-PfCRT.star"],
)  # fmt: skip
def test_missing_stack_real(shared_data, local):
    table = read_particles(shared_data / local)
    stack = table.stacks[0]
    with pytest.raises(InputError) as err:
        table.images([0])
    message = str(err.value)
    assert Path(local).name in message
    assert f"stack {stack!r} not found; tried: " in message
    assert str((shared_data / local).parent / stack) in message
    assert "run from the RELION project folder" in message and "project_dir=" in message


@pytest.mark.parametrize(
    ("local", "where"),
    [
        ("hanjinliu+cylindra/cylindra_builtins/relion/tests/test_jobs/Picks/job_picks/"
         "particles.star", "data_particles"),
        ("teamtomo+starfile/tests/data/postprocess.star", "this file (blocks data_general"),
    ],
)  # fmt: skip
def test_no_image_names(shared_data, local, where):
    with pytest.raises(InputError) as err:
        read_particles(shared_data / local)
    assert Path(local).name in str(err.value)
    assert where in str(err.value)
    assert "has no rlnImageName column: cryonb needs particle images" in str(err.value)


# ---------------------------------------------------------------- image names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("000012@Extract/job012/x.mrcs", (11, "Extract/job012/x.mrcs")),
        ("1@a b.mrcs", (0, "a b.mrcs")),
        ("7@x@y.mrcs", (6, "x@y.mrcs")),
        ("single.mrc", (0, "single.mrc")),
    ],
)
def test_parse_image_name(name, expected):
    assert parse_image_name(name) == expected


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("0@stack.mrcs", "rlnImageName row 12: '0@stack.mrcs': RELION indices start at 1"),
        ("000@stack.mrcs", "RELION indices start at 1"),
        ("x1@stack.mrcs", "'x1' before '@' is not a whole number"),
        ("-3@stack.mrcs", "'-3' before '@' is not a whole number"),
        ("3@", "no stack file after '@'"),
        ("", "is empty"),
    ],
)
def test_parse_image_name_errors(name, phrase):
    with pytest.raises(InputError) as err:
        parse_image_name(name, row=12)
    assert phrase in str(err.value)


def test_bad_image_name_fails_at_read(tmp_path):
    star, _ = _tiny_project(tmp_path, ["1@x.mrcs", "2@x.mrcs", "0@x.mrcs"])
    with pytest.raises(InputError) as err:
        read_particles(star)
    assert str(err.value).endswith(
        "p.star: rlnImageName row 2: '0@x.mrcs': RELION indices start at 1"
    )


def test_index_out_of_range(tmp_path):
    star, _ = _tiny_project(tmp_path, ["1@x.mrcs", "17@x.mrcs", "20@x.mrcs"])
    table = read_particles(star)
    assert table.images([0, 1]).shape == (2, 8, 8)
    with pytest.raises(InputError) as err:
        table.images()
    assert "p.star: rlnImageName row 2 '20@x.mrcs': index 20 but x.mrcs holds 17 images" in str(
        err.value
    )


def test_wrong_box_size(tmp_path):
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [1.0], "rlnImageSize": [64]})
    star, _ = _tiny_project(tmp_path, ["1@x.mrcs"], optics=optics)
    with pytest.raises(InputError) as err:
        read_particles(star).images([0])
    assert str(err.value).endswith(
        "p.star: wrong box size: x.mrcs has 8 x 8 images but optics group 1 says rlnImageSize 64"
    )


def test_box_size_differs_between_stacks(tmp_path):
    star, _ = _tiny_project(tmp_path, ["1@x.mrcs", "1@y.mrcs"], optics=pd.DataFrame(
        {"rlnOpticsGroup": [1], "rlnImagePixelSize": [1.0]}))  # fmt: skip
    write_mrc(tmp_path / "y.mrcs", np.zeros((2, 6, 6)), 1.0)
    with pytest.raises(InputError, match=r"wrong box size: y.mrcs has 6 x 6 images but x.mrcs"):
        read_particles(star).images()
    write_mrc(tmp_path / "y.mrcs", np.zeros((2, 6, 8)), 1.0)
    with pytest.raises(InputError, match=r"y.mrcs has 6 x 8 \(y x x\) images: .* must be square"):
        read_particles(star).images([1])


def test_whole_file_name_without_index(tmp_path):
    star, _ = _tiny_project(tmp_path, ["x.mrcs", "one.mrc"])
    write_mrc(tmp_path / "one.mrc", np.ones((8, 8)), 1.0)
    table = read_particles(star)
    np.testing.assert_array_equal(table.images([1])[0], np.ones((8, 8)))
    with pytest.raises(InputError, match=r"names a whole file of 17 images"):
        table.images([0])


def test_rows_selection(tmp_path):
    names = [f"{i}@x.mrcs" for i in (3, 1, 17, 2)]
    star, stack = _tiny_project(tmp_path, names)
    table = read_particles(star)
    np.testing.assert_array_equal(table.images(), stack[[2, 0, 16, 1]])
    np.testing.assert_array_equal(table.images(2), stack[[16]])
    np.testing.assert_array_equal(table.images(-1), stack[[1]])
    np.testing.assert_array_equal(table.images(slice(1, 3)), stack[[0, 16]])
    np.testing.assert_array_equal(table.images(np.array([True, False, False, True])), stack[[2, 1]])
    assert table.images([]).shape == (0, 8, 8)
    assert table.stacks == ["x.mrcs"]


# ---------------------------------------------------------------- stack paths


def test_resolve_relion_project_layout(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "Extract/job012").mkdir(parents=True)
    (project / "Class2D/job020").mkdir(parents=True)
    write_mrc(project / "Extract/job012/x.mrcs", np.ones((3, 4, 4)), 1.0)
    star = project / "Class2D/job020/run_data.star"
    write_star(star, {"": pd.DataFrame({"rlnImageName": ["2@Extract/job012/x.mrcs"]})})
    table = read_particles(star)
    assert table.images().shape == (1, 4, 4)  # found through the STAR file's parent folders
    assert table.stack_path("Extract/job012/x.mrcs") == project / "Extract/job012/x.mrcs"
    elsewhere = tmp_path / "elsewhere.star"
    star.rename(elsewhere)
    with pytest.raises(InputError,
                       match=r"not found; tried: .*RELION project folder.*project_dir="):
        read_particles(elsewhere).images()
    assert read_particles(elsewhere, project_dir=project).images().shape == (1, 4, 4)
    monkeypatch.chdir(project)
    assert resolve_stack_path("Extract/job012/x.mrcs", elsewhere) == (
        project / "Extract/job012/x.mrcs"
    )
    absolute = str(project / "Extract/job012/x.mrcs")
    assert resolve_stack_path(absolute) == Path(absolute)


def test_resolve_lists_places_tried(tmp_path):
    with pytest.raises(InputError) as err:
        resolve_stack_path("S/x.mrcs", tmp_path / "a/b.star", project_dir=tmp_path / "p")
    message = str(err.value)
    for place in (tmp_path / "p/S/x.mrcs", tmp_path / "a/S/x.mrcs", tmp_path / "S/x.mrcs"):
        assert str(place) in message
    tried = message.split("tried: ")[1]
    assert tried.index(str(tmp_path / "p/S/x.mrcs")) < tried.index(str(tmp_path / "a/S"))


# ---------------------------------------------------------------- optics groups


def test_unknown_optics_group(tmp_path):
    star, _ = _tiny_project(tmp_path, ["1@x.mrcs", "2@x.mrcs"])
    blocks = read_star(star)
    blocks["particles"].loc[1, "rlnOpticsGroup"] = 7
    write_star(star, blocks)
    with pytest.raises(InputError, match=r"data_particles row 1: rlnOpticsGroup 7 is not in"):
        read_particles(star)
    blocks["optics"] = blocks["optics"].drop(columns="rlnOpticsGroup")
    write_star(star, blocks)
    with pytest.raises(InputError, match=r"data_optics has no rlnOpticsGroup column"):
        read_particles(star)


def test_missing_group_column_with_one_optics_group(tmp_path):
    star, _ = _tiny_project(tmp_path, ["1@x.mrcs"])
    blocks = read_star(star)
    blocks["particles"] = blocks["particles"].drop(columns="rlnOpticsGroup")
    write_star(star, blocks)
    table = read_particles(star)
    assert table.particles["rlnOpticsGroup"].tolist() == [1]
    assert table.pixel_size == 1.0


def test_per_particle_value_overrides_optics(tmp_path):
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnVoltage": [300.0], "rlnImageSize": [8]})
    star, _ = _tiny_project(tmp_path, ["1@x.mrcs", "2@x.mrcs"], optics=optics,
                            extra={"rlnVoltage": [200.0, 300.0]})  # fmt: skip
    with pytest.warns(UserWarning, match=r"rlnVoltage is both in data_particles and data_optics"):
        table = read_particles(star)
    assert table.particles["rlnVoltage"].tolist() == [200.0, 300.0]


def test_ctf_defaults_and_missing_values(tmp_path):
    extra = {
        "rlnDefocusU": [1e4, 2e4],
        "rlnDefocusV": [1e4, 2e4],
        "rlnDefocusAngle": [0.0, 10.0],
    }
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
            "rlnImagePixelSize": [1.0],
        }
    )
    star, _ = _tiny_project(tmp_path, ["1@x.mrcs", "2@x.mrcs"], optics=optics, extra=extra)
    table = read_particles(star)
    params = table.ctf_params()
    assert list(params) == [
        "defocus_u",
        "defocus_v",
        "defocus_angle",
        "voltage",
        "cs",
        "amplitude_contrast",
        "phase_shift",
        "bfactor",
        "ctf_scalefactor",
        "pixel_size",
    ]
    assert params["phase_shift"].tolist() == [0.0, 0.0]
    assert params["bfactor"].tolist() == [0.0, 0.0]
    assert params["ctf_scalefactor"].tolist() == [1.0, 1.0]
    table.particles.loc[1, "rlnDefocusV"] = np.nan
    with pytest.raises(InputError, match=r"rlnDefocusV row 1 has no valid value"):
        table.ctf_params()


def test_incomplete_ctf_names_the_column(shared_data):
    table = read_particles(shared_data / f"{ASPIRE}/sample_incomplete_ctf_params.star")
    assert not table.has_ctf
    with pytest.raises(InputError) as err:
        table.ctf_params()
    assert "sample_incomplete_ctf_params.star: no rlnVoltage column" in str(err.value)


def test_split_optics_derived_and_conflicting():
    df = pd.DataFrame(
        {
            "rlnImageName": ["1@a", "2@a", "1@b"],
            "rlnOpticsGroup": [1, 1, 2],
            "rlnVoltage": [300.0, 300.0, 200.0],
            "rlnDefocusU": [1.0, 2.0, 3.0],
        }
    )
    rows, optics = split_optics(df)
    assert list(rows.columns) == ["rlnImageName", "rlnOpticsGroup", "rlnDefocusU"]
    assert optics["rlnVoltage"].tolist() == [300.0, 200.0]
    assert optics["rlnOpticsGroupName"].tolist() == ["opticsGroup1", "opticsGroup2"]
    df.loc[1, "rlnVoltage"] = 200.0
    with pytest.raises(InputError, match=r"rlnVoltage varies within optics group 1"):
        split_optics(df)


# ---------------------------------------------------------------- writing


def _assert_tables_equal(a: ParticleTable, b: ParticleTable, *, check_like=False) -> None:
    pd.testing.assert_frame_equal(a.particles, b.particles, check_exact=True, check_like=check_like)
    pd.testing.assert_frame_equal(a.optics, b.optics, check_exact=True, check_like=check_like)


def test_six_optics_groups_round_trip(shared_data, tmp_path):
    table = read_particles(shared_data / f"{DRGN}/relion31.6opticsgroups.star")
    out = tmp_path / "particles.star"
    write_particles(out, table)
    again = read_particles(out)
    assert again.version == "3.1+"
    _assert_tables_equal(table, again)
    blocks = read_star(out)
    assert list(blocks) == ["optics", "particles"]
    assert blocks["optics"].shape == (6, 18)
    assert blocks["particles"].shape == (139, 23)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("local", [r[0] for r in REAL] + [f"{DRGN}/toy_projections_13.star",
                                                          f"{DRGN}/relion5.star"])  # fmt: skip
def test_round_trip_every_particle_file(shared_data, tmp_path, local):
    table = read_particles(shared_data / local)
    out = tmp_path / "p.star"
    write_particles(out, table)
    again = read_particles(out)
    if table.version == "3.1+":
        _assert_tables_equal(table, again)
    else:  # 3.0 -> 3.1: the same columns, optics columns moved to the end
        assert again.version == "3.1+"
        _assert_tables_equal(table, again, check_like=True)
    write_particles(out, table, version="3.0")
    old = read_particles(out)
    assert old.version == "3.0" and list(read_star(out)) == [""]
    np.testing.assert_allclose(
        old.pixel_sizes if old.pixel_sizes is not None else np.nan,
        table.pixel_sizes if table.pixel_sizes is not None else np.nan,
    )
    common = [
        c
        for c in table.particles.columns
        if c in old.particles.columns and c not in ("rlnOpticsGroup", "rlnOpticsGroupName")
    ]  # RELION 3.0 has no optics groups: they are synthesised again
    pd.testing.assert_frame_equal(old.particles[common], table.particles[common], check_dtype=False)


def test_write_particles_from_dataframe(tmp_path):
    df = pd.DataFrame(
        {
            "rlnImageName": ["1@a.mrcs", "2@a.mrcs"],
            "rlnImagePixelSize": [1.5, 1.5],
            "rlnImageSize": [64, 64],
            "rlnImageDimensionality": [2, 2],
        }
    )
    write_particles(tmp_path / "p.star", df)
    blocks = read_star(tmp_path / "p.star")
    assert blocks["optics"]["rlnImagePixelSize"].tolist() == [1.5]
    assert list(blocks["particles"].columns) == ["rlnImageName", "rlnOpticsGroup"]
    with pytest.warns(UserWarning, match=r"no rlnImageSize or rlnImageDimensionality"):
        write_particles(tmp_path / "q.star", df[["rlnImageName", "rlnImagePixelSize"]])


# ---------------------------------------------------------------- micrographs


def test_read_micrographs(tmp_path):
    optics = pd.DataFrame(
        {"rlnOpticsGroup": [1], "rlnMicrographPixelSize": [0.885], "rlnVoltage": [300.0]}
    )
    mics = pd.DataFrame({"rlnMicrographName": ["MotionCorr/job002/a.mrc", "b.mrc"]})
    star = tmp_path / "micrographs.star"
    write_star(star, {"optics": optics, "micrographs": mics})
    table = read_micrographs(star)
    assert table.version == "3.1+" and table.n == len(table) == 2
    assert table.pixel_size == 0.885
    assert table.micrographs["rlnVoltage"].tolist() == [300.0, 300.0]
    write_mrc(tmp_path / "b.mrc", np.zeros((4, 4)), 0.885)
    assert table.micrograph_path(1) == tmp_path / "b.mrc"
    old = pd.DataFrame(
        {"rlnMicrographName": ["a.mrc"], "rlnMagnification": [10000.0],
         "rlnDetectorPixelSize": [1.4]}
    )  # fmt: skip
    write_star(star, {"": old})
    table = read_micrographs(star)
    assert table.version == "3.0" and table.pixel_size == pytest.approx(1.4)


def test_read_micrographs_refuses_particles(shared_data):
    with pytest.raises(InputError, match=r"has no rlnMicrographName column: not a micrographs"):
        read_micrographs(shared_data / "teamtomo+starfile/tests/data/postprocess.star")
    with pytest.raises(InputError, match=r"data_particles has a rlnImageName column: .*particle"):
        read_micrographs(shared_data / f"{DRGN}/relion31.star")


@pytest.mark.parametrize("dtype", [np.float16, np.int16])
def test_images_from_other_modes(tmp_path, dtype):
    star, stack = _tiny_project(tmp_path, ["3@x.mrcs", "1@x.mrcs"])
    with mrcfile.new(tmp_path / "x.mrcs", overwrite=True) as m:
        m.set_data((stack % 1000).astype(dtype))
        m.set_image_stack()
    images = read_particles(star).images()
    assert images.dtype == np.float32
    np.testing.assert_array_equal(images, (stack[[2, 0]] % 1000).astype(dtype).astype(np.float32))
    # straight into a float32 buffer (a GPU worker's pinned pool): converted the same way
    buf = np.full(images.shape, np.nan, np.float32)
    assert read_particles(star).images(out=buf) is buf
    np.testing.assert_array_equal(buf, images)
