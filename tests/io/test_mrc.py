"""MRC reading and writing: every shared MRC file, modes, axis orders, bad input, writing."""

from __future__ import annotations

import gzip
import os
import shutil
import warnings

import mrcfile
import numpy as np
import pytest

from cryonb.errors import ConfigError, InputError
from cryonb.io import read_map, read_mrc, read_mrc_header, read_stack, write_mrc

# Shared MRC files that must fail, and phrases their error must contain (beside the name).
MRC_FAILURES = {
    "exiftool+exiftool/t/images/MRC.mrc": (
        "4096 x 4096 x 2 uint16 (mode 6) = 64 MiB",
        "0 bytes after the header",
        "truncated",
        "re-copy or re-make the file (in Python, permissive=True",
    ),
    "tlambert03+mrc/tests/toxo.dv": ("DeltaVision", "byte 96", "convert it to MRC"),
}
NO_MAP_ID = "no 'MAP ' id at byte 208"


def _read_quiet(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_mrc(path, **kwargs)


def _header_bytes(path) -> bytearray:
    with open(path, "rb") as f:
        return bytearray(f.read())


def _patch(path, offset: int, value: bytes) -> None:
    raw = _header_bytes(path)
    raw[offset : offset + len(value)] = value
    path.write_bytes(bytes(raw))


@pytest.fixture
def volume(tmp_path):
    """A small float32 volume file (16 x 12 x 8, voxel 2.5 A) and its data."""
    data = np.random.default_rng(0).normal(size=(8, 12, 16)).astype(np.float32)
    path = tmp_path / "vol.mrc"
    write_mrc(path, data, 2.5)
    return path, data


# ---------------------------------------------------------------- every shared file


def test_manifest_mrc(mrc_entry, shared_data):
    """Each shared MRC file loads with the MANIFEST's shape and voxel size, or fails clearly."""
    path = shared_data / mrc_entry.local
    if mrc_entry.local in MRC_FAILURES or mrc_entry.kind == "mrc_fail":
        with pytest.raises(InputError) as err:
            read_mrc(path)
        message = str(err.value)
        assert mrc_entry.name in message
        for phrase in MRC_FAILURES[mrc_entry.local]:
            assert phrase in message
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = read_mrc(path)
    messages = [str(w.message) for w in caught]
    if mrc_entry.strict_fails:  # mrcfile refuses it; we accept it with a warning
        assert any(NO_MAP_ID in m and mrc_entry.name in m for m in messages), messages
    assert vol.data.shape == mrc_entry.expected_shape
    assert vol.data.dtype == np.float32
    assert vol.shape == vol.data.shape
    if mrc_entry.voxel is None:
        assert vol.voxel_size is None
        assert any("cella/voxel_size" in m for m in messages)
    else:
        assert vol.voxel_size == pytest.approx(mrc_entry.voxel, rel=5e-3)
    info = vol.header_info
    assert info["mode"] == int(mrc_entry.mrc["mode"])
    if mrc_entry.mrc["ext"]:
        assert info["extended_header_size"] == int(mrc_entry.mrc["ext"])
        assert info["exttyp"] == mrc_entry.mrc["exttyp"]
    raw = _read_quiet(path, dtype=None)
    assert raw.data.dtype.str == mrc_entry.mrc["dtype"]
    np.testing.assert_array_equal(raw.data.astype(np.float32), vol.data)
    header = _read_quiet_header(path)
    assert header.data is None
    assert header.shape == vol.data.shape
    assert header.voxel_size == vol.voxel_size


def _read_quiet_header(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_mrc_header(path)


# ---------------------------------------------------------------- axis order and voxel size


def test_axis_order_iota_yzx(shared_data):
    """gemmi's iota map: MAPC/MAPR/MAPS = 2, 3, 1; values 42 X + Z + 21 at grid X, Z."""
    vol = _read_quiet(shared_data / "project-gemmi+gemmi/tests/iota_yzx.ccp4.gz")
    assert vol.header_info["mapc"] == 2 and vol.header_info["maps"] == 1
    z, _, x = np.meshgrid(*(np.arange(n) for n in vol.data.shape), indexing="ij")
    # sections run along X from NZSTART = 1, rows along Z from NYSTART = -3
    np.testing.assert_array_equal(vol.data, 42 * (x + 1) + (z - 3) + 21)


@pytest.mark.parametrize(
    ("local", "transpose"),
    [
        # MAPC=3 MAPR=1 MAPS=2: raw R[y, x, z] -> V[z, y, x]
        ("ccpem+mrcfile/tests/test_data/EMD-3001.map", (2, 0, 1)),
        # MAPC=2 MAPR=1 MAPS=3: raw R[z, x, y] -> V[z, y, x]
        ("project-gemmi+gemmi/tests/5i55_tiny.ccp4", (0, 2, 1)),
    ],
)
def test_axis_order_permuted(shared_data, local, transpose):
    path = shared_data / local
    with mrcfile.open(path) as m:
        raw = np.array(m.data)
    vol = _read_quiet(path)
    np.testing.assert_array_equal(vol.data, raw.transpose(transpose))
    assert vol.data.flags.c_contiguous
    mapped = _read_quiet(path, mmap=True)
    np.testing.assert_array_equal(mapped.data, vol.data)


def test_anisotropic_voxel_warns_and_keeps_x(shared_data):
    path = shared_data / "ccpem+mrcfile/tests/test_data/EMD-3001.map"
    with pytest.warns(UserWarning, match=r"anisotropic voxel size .*keeping x = 0.44825"):
        vol = read_mrc(path)
    assert vol.voxel_size == pytest.approx(17.93 / 40)


def test_negative_voxel_size_gives_none(shared_data):
    path = shared_data / "hyperspy+rosettasciio/rsciio/tests/data/mrc/20241021_00405_final.mrc"
    with pytest.warns(UserWarning, match=r"20241021_00405_final.mrc: .*-10 A \(cella/voxel_size"):
        vol = read_mrc(path)
    assert vol.voxel_size is None


def test_wrong_header_statistics_are_fine(volume):
    path, data = volume
    _patch(path, 76, np.array([5.0, -5.0, 99.0], "<f4").tobytes())  # DMIN > DMAX, DMEAN absurd
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vol = read_mrc(path)
    np.testing.assert_array_equal(vol.data, data)


def test_stack_kinds(shared_data):
    stack = _read_quiet(shared_data / "sethaxen+MRCFile.jl/test/testdata/emd_3197_proj.mrcs")
    assert stack.is_stack and stack.data.shape == (10, 20, 20)
    volume = _read_quiet(shared_data / "ccpem+mrcfile/tests/test_data/EMD-3197.map")
    assert not volume.is_stack
    image = _read_quiet(shared_data / "hyperspy+rosettasciio/rsciio/tests/data/mrc/HAADFscan.mrc")
    assert image.data.shape == (16, 16) and not image.is_stack


# ---------------------------------------------------------------- modes, compression, mmap


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.float16, np.float32])
def test_modes_convert_to_float32(tmp_path, dtype):
    data = (np.arange(4 * 6 * 5).reshape(4, 6, 5) % 100).astype(dtype)
    path = tmp_path / "m.mrc"
    with mrcfile.new(path) as m:
        m.set_data(data)
        m.voxel_size = 1.5
    vol = read_mrc(path)
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, data.astype(np.float32))
    assert read_mrc(path, dtype=None).data.dtype == data.dtype
    mapped = read_mrc(path, mmap=True)
    assert isinstance(mapped.data, np.memmap) == (dtype is np.float32)
    np.testing.assert_array_equal(mapped.data, vol.data)


def test_complex_mode_needs_dtype_none(tmp_path):
    path = tmp_path / "fft.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.ones((2, 3, 4), np.complex64))
        m.voxel_size = 1.0
    with pytest.raises(InputError, match=r"fft.mrc: MODE 4 holds complex values.*dtype=None"):
        read_mrc(path)
    assert read_mrc(path, dtype=None).data.dtype == np.complex64


def test_compressed_copies_match(shared_data):
    plain = read_mrc(shared_data / "ccpem+mrcfile/tests/test_data/EMD-3197.map")
    for name in ("emd_3197.map.gz", "EMD-3197.map.bz2"):
        vol = read_mrc(shared_data / "ccpem+mrcfile/tests/test_data" / name, mmap=True)
        assert vol.header_info["compression"] in ("gzip", "bzip2")
        assert not isinstance(vol.data, np.memmap)  # read fully, no error
        np.testing.assert_array_equal(vol.data, plain.data)
        assert vol.voxel_size == plain.voxel_size


def test_read_stack_and_map(shared_data, tmp_path):
    path = (
        shared_data
        / "ComputationalCryoEM+ASPIRE-Python/tests/saved_test_data/rln_proj_64_shifted.mrcs"
    )
    data, pixel = read_stack(path)
    assert isinstance(data, np.memmap) and data.shape == (4, 64, 64) and pixel == 1.0
    assert not data.flags.writeable
    data, pixel = read_stack(path, mmap=False)
    assert not isinstance(data, np.memmap) and data.flags.writeable
    image = tmp_path / "one.mrc"
    write_mrc(image, np.ones((6, 5)), 1.0)
    assert read_stack(image)[0].shape == (1, 6, 5)
    assert read_map(image)[0].shape == (1, 6, 5)
    f16 = shared_data / "sethaxen+MRCFile.jl/test/testdata/emd_3197_f16.mrc"
    data, pixel = read_stack(f16)
    assert data.dtype == np.float32 and not isinstance(data, np.memmap)
    vmap, voxel = read_map(shared_data / "hanjinliu+cylindra/tests/beta-tubulin.mrc")
    assert vmap.shape == (20, 20, 20) and vmap.dtype == np.float32
    assert voxel == pytest.approx(5.144)


def test_read_map_refuses_volume_stack(tmp_path):
    path = tmp_path / "vs.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.zeros((2, 3, 4, 5), np.float32))
        m.voxel_size = 1.0
    with pytest.raises(InputError, match=r"vs.mrc: holds a stack of 2 volumes"):
        read_map(path)
    assert read_mrc(path).data.shape == (2, 3, 4, 5)


# ---------------------------------------------------------------- bad input


def test_missing_folder_empty_fifo(tmp_path):
    with pytest.raises(InputError, match=r"nothere.mrc: no such file"):
        read_mrc(tmp_path / "nothere.mrc")
    with pytest.raises(InputError, match=r"is a folder"):
        read_mrc(tmp_path)
    (tmp_path / "empty.mrc").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty.mrc: the file is empty"):
        read_mrc(tmp_path / "empty.mrc")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.mrc")
        with pytest.raises(InputError, match=r"pipe.mrc: is not a regular file"):
            read_mrc(tmp_path / "pipe.mrc")  # must not block


def test_text_and_short_files(tmp_path):
    text = tmp_path / "notes.mrc"
    text.write_text("data_\nloop_\n_rlnImageName\n")
    with pytest.raises(InputError, match=r"notes.mrc: is a text file, not an MRC file"):
        read_mrc(text)
    short = tmp_path / "short.mrc"
    short.write_bytes(bytes(range(200)))
    with pytest.raises(InputError, match=r"short.mrc: .*only 200 bytes.*needs 1024"):
        read_mrc(short)


def test_truncated_shared_file(shared_data):
    path = shared_data / "exiftool+exiftool/t/images/MRC.mrc"
    with pytest.raises(InputError, match="truncated"):
        read_mrc_header(path)
    with pytest.warns(UserWarning, match=r"MRC.mrc: .*truncated.*permissive=True"):
        vol = read_mrc(path, permissive=True)
    assert vol.data is None
    assert vol.shape == (2, 4096, 4096)
    assert vol.header_info["exttyp"] == "FEI1"


def test_truncated_own_file(volume):
    path, _ = volume
    raw = path.read_bytes()
    path.write_bytes(raw[: 1024 + 100])
    with pytest.raises(InputError) as err:
        read_mrc(path)
    message = str(err.value)
    for phrase in (
        "vol.mrc",
        "header says 16 x 12 x 8 float32 (mode 2) = 6 KiB of data",
        "the file has 100 bytes after the header",
        "truncated",
        "re-copy or re-make the file",
    ):
        assert phrase in message
    gz = path.with_name("vol.mrc.gz")
    gz.write_bytes(gzip.compress(raw[: 1024 + 100]))
    with pytest.raises(InputError, match=r"vol.mrc.gz: header says .*decompressed file ends"):
        read_mrc(gz)
    broken = path.with_name("broken.mrc.gz")
    broken.write_bytes(gzip.compress(raw)[:-200])
    with pytest.raises(InputError, match=r"broken.mrc.gz: cannot read the data block"):
        read_mrc(broken)


def test_extended_header_beyond_end(volume):
    path, _ = volume
    _patch(path, 92, np.array([10**6], "<i4").tobytes())  # NSYMBT
    with pytest.raises(InputError, match=r"NSYMBT says 1000000 bytes .*truncated"):
        read_mrc(path)


@pytest.mark.parametrize(
    ("offset", "value", "phrase"),
    [
        (12, np.array([3], "<i4"), r"header field MODE is 3"),
        (0, np.array([-16], "<i4"), r"NX=-16, NY=12, NZ=8: each must be at least 1"),
        (64, np.array([1, 1, 3], "<i4"), r"MAPC/MAPR/MAPS are \(1, 1, 3\)"),
    ],
)
def test_invalid_header_fields(volume, offset, value, phrase):
    path, _ = volume
    _patch(path, offset, value.tobytes())
    with pytest.raises(InputError, match=phrase) as err:
        read_mrc(path)
    assert "vol.mrc" in str(err.value)


def test_missing_map_id(volume):
    path, data = volume
    _patch(path, 208, b"\0" * 8)  # MAP id and machine stamp
    with pytest.warns(UserWarning, match=r"no 'MAP ' id at byte 208 and no machine stamp"):
        vol = read_mrc(path)
    np.testing.assert_array_equal(vol.data, data)
    path.write_bytes(path.read_bytes() + b"\0" * 4)
    with pytest.raises(InputError, match=r"no 'MAP ' id .*does not match the file size"):
        read_mrc(path)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(
        InputError, match=r"no 'MAP ' id .*not an MRC file, or corrupt; header says .*truncated"
    ):
        read_mrc(path)


def test_extra_bytes_warn(volume):
    path, data = volume
    path.write_bytes(path.read_bytes() + b"\0" * 12)
    with pytest.warns(UserWarning, match=r"12 bytes more than"):
        vol = read_mrc(path)
    np.testing.assert_array_equal(vol.data, data)


def test_deltavision_permissive(shared_data):
    path = shared_data / "tlambert03+mrc/tests/toxo.dv"
    with pytest.warns(UserWarning, match=r"toxo.dv: .*DeltaVision.*permissive=True"):
        vol = read_mrc(path, permissive=True)
    assert vol.data.shape == (34, 128, 128)
    assert vol.voxel_size == pytest.approx(1326.2, rel=1e-4)  # 0.13262 micrometres


def test_npy_file(shared_data):
    with pytest.raises(InputError, match=r"empiar_10076_7.cs: is a NumPy array file"):
        read_mrc(shared_data / "ml-struct-bio+cryodrgn/tests/data/empiar_10076_7.cs")


# ---------------------------------------------------------------- writing


def test_write_volume_round_trip(volume):
    path, data = volume
    vol = read_mrc(path)
    np.testing.assert_array_equal(vol.data, data)
    assert vol.voxel_size == 2.5 and not vol.is_stack
    info = vol.header_info
    assert info["mode"] == 2 and info["ispg"] == 1
    assert info["dmin"] == pytest.approx(data.min())
    assert info["dmax"] == pytest.approx(data.max())
    assert info["dmean"] == pytest.approx(data.mean(), abs=1e-6)


@pytest.mark.parametrize(
    ("name", "stack", "shape"),
    [
        ("s.mrcs", None, (3, 4, 5)),
        ("s.mrc", True, (3, 4, 5)),
        ("one.mrcs", None, (4, 5)),
        ("s.mrcs.gz", None, (3, 4, 5)),
        ("s.mrc.bz2", False, (3, 4, 5)),
    ],
)
def test_write_stacks(tmp_path, name, stack, shape):
    data = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    path = tmp_path / name
    write_mrc(path, data, 1.25, stack=stack)
    vol = read_mrc(path)
    expect_stack = stack if stack is not None else ".mrcs" in name
    assert vol.is_stack == expect_stack
    assert vol.header_info["ispg"] == (0 if expect_stack else 1)
    stack_data, pixel = read_stack(path)
    np.testing.assert_array_equal(stack_data, data.reshape((-1, *shape[-2:])))
    assert pixel == 1.25
    assert not list(tmp_path.glob(".*tmp*"))


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="2D or 3D"):
        write_mrc(tmp_path / "x.mrc", np.zeros((2, 2, 2, 2)), 1.0)
    with pytest.raises(ConfigError, match="voxel_size"):
        write_mrc(tmp_path / "x.mrc", np.zeros((2, 2, 2)), -1.0)
    with pytest.raises(ConfigError, match="does not exist"):
        write_mrc(tmp_path / "no" / "x.mrc", np.zeros((2, 2, 2)), 1.0)
    assert not list(tmp_path.iterdir())


def test_write_unknown_voxel(tmp_path):
    write_mrc(tmp_path / "x.mrc", np.zeros((2, 2, 2)), None)
    with pytest.warns(UserWarning, match="voxel_size is None"):
        assert read_mrc(tmp_path / "x.mrc").voxel_size is None


def test_write_replaces_atomically(volume, monkeypatch):
    path, data = volume
    before = path.read_bytes()

    def boom(self, *args, **kwargs):
        raise RuntimeError("disc on fire")

    monkeypatch.setattr(mrcfile.mrcobject.MrcObject, "update_header_stats", boom)
    with pytest.raises(RuntimeError, match="disc on fire"):
        write_mrc(path, data * 2, 1.0)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_copy_of_shared_file_reads_the_same(shared_data, tmp_path):
    src = shared_data / "hanjinliu+cylindra/tests/beta-tubulin.mrc"
    shutil.copy(src, tmp_path / "copy.map")
    np.testing.assert_array_equal(read_mrc(tmp_path / "copy.map").data, read_mrc(src).data)
