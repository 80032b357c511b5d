"""STAR reading and writing: every shared STAR file, round trips, malformed input."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from cryonb.errors import ConfigError, InputError
from cryonb.io import _star, read_star, write_star

# Shared STAR files that must fail, and phrases their error must contain (beside the name).
STAR_FAILURES = {
    "ComputationalCryoEM+ASPIRE-Python/tests/saved_test_data/sample.star": (
        "line 20:",
        "loop row has 5 values but data_planetary has 4 columns",
    ),
}


def _assert_tables_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True)
        assert a[name].attrs == b[name].attrs, name


def _write_text(tmp_path, text: str, name: str = "t.star"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- every shared file


def test_manifest_star(star_entry, shared_data, tmp_path):
    """Each shared STAR file loads with the MANIFEST's blocks and round-trips exactly."""
    path = shared_data / star_entry.local
    if star_entry.kind == "star_fail":
        with pytest.raises(InputError) as err:
            read_star(path)
        message = str(err.value)
        assert star_entry.name in message
        for phrase in STAR_FAILURES[star_entry.local]:
            assert phrase in message
        return
    blocks = read_star(path)
    expected = star_entry.blocks
    assert list(blocks) == list(expected)
    for name, (rows, cols, is_loop) in expected.items():
        assert blocks[name].shape == (rows, cols), name
        assert blocks[name].attrs["star_loop"] is is_loop
        assert not any(c.startswith("_") for c in blocks[name].columns)
    out = tmp_path / "copy.star"
    write_star(out, blocks)
    again = read_star(out)
    _assert_tables_equal(blocks, again)
    write_star(tmp_path / "copy2.star", again)
    assert (tmp_path / "copy2.star").read_text() == out.read_text()


def test_non_star_files_fail_clearly(other_entry, shared_data):
    with pytest.raises(InputError) as err:
        read_star(shared_data / other_entry.local)
    assert other_entry.name in str(err.value)
    assert any(
        phrase in str(err.value) for phrase in ("binary file", "before the first data_ block")
    )


# ---------------------------------------------------------------- reading details


def test_relion_string_labels_stay_text(shared_data):
    blocks = read_star(shared_data / "ml-struct-bio+cryodrgn/tests/data/empiar_10076_7.star")
    df = blocks[""]
    assert df["rlnMicrographName"].tolist() == [str(i) for i in range(1, 8)]
    assert df["rlnMagnification"].dtype == np.int64
    assert df["rlnDefocusU"].dtype == np.float64


def test_quoted_values(shared_data):
    df = read_star(shared_data / "teamtomo+starfile/tests/data/loop_single_quote.star")[""]
    assert df["quote_string"].tolist() == ["quote string"] * 2
    assert df["empty_string"].tolist() == ["", ""]
    pairs = read_star(shared_data / "teamtomo+starfile/tests/data/basic_double_quote.star")[""]
    assert pairs.attrs["star_loop"] is False
    assert pairs.loc[0, "whitespace_string"] == " "


def test_pairs_block_is_one_row(shared_data):
    blocks = read_star(shared_data / "teamtomo+starfile/tests/data/postprocess.star")
    general = blocks["general"]
    assert general.shape == (1, 6)
    assert general.attrs["star_loop"] is False
    assert blocks["fsc"].attrs["star_loop"] is True


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("", "the file is empty"),
        ("# only a comment\n\n", "no data_ block found: not a STAR file"),
        ("loop_\n_a\n1\n", "line 1: 'loop_' comes before the first data_ block"),
        ("data_x\n\nloop_\n_a #1\n_b #2\n1 2\n3\n5 6\n", "line 7: loop row has 1 values"),
        ("data_x\nloop_\n_a\n_b\n1 2\n3 4 5\n", "line 6: loop row has 3 values but data_x"),
        ("data_x\nloop_\n_a\n1\nloop_\n_b\n2\n", "line 5: a second loop_ in data_x"),
        ("data_x\nloop_\n_a\n1\n_b 2\n", "line 5: '_b' after the rows of the loop"),
        ("data_x\n_a 1\nloop_\n_b\n1\n", "line 3: a loop_ after _name value lines"),
        ("data_x\n_a 1 2\n", "line 2: expected '_name value' but found 3 fields"),
        ("data_x\n_a 'unclosed\n", "line 2: cannot split"),
        ("data_x\n_a 1\n_a 2\n", "line 3: _a appears twice (first at line 2)"),
        ("data_x\nloop_\n_a\n_a\n1 2\n", "line 4: column _a appears twice"),
        ("data_x\n_a 1\ndata_x\n_b 2\n", "line 3: block data_x already started at line 1"),
        ("data_x\ndata_y\n_a 1\n", "line 1: data_x holds nothing"),
        ("data_x\n_a 1\ndata_y\n", "line 3: data_y holds nothing"),
        ("data_x\nloop_\n1 2\n", "line 2: the loop_ of data_x has no _column names"),
        ("data_x\nloop_\n\n_a\n1\n", "line 3: blank or comment line inside the loop_ header"),
        ("data_x\n_a 1\nstray words\n", "line 3: unexpected 'stray words' in data_x"),
        ("data_x\n;\ntext\n;\n", "line 2: semicolon-delimited text fields"),
        ("data_x y\n_a 1\n", "line 1: block name 'x y' contains spaces"),
    ],
)
def test_malformed_star(tmp_path, text, phrase):
    path = _write_text(tmp_path, text, "bad.star")
    with pytest.raises(InputError) as err:
        read_star(path)
    assert "bad.star" in str(err.value)
    assert phrase in str(err.value)


def test_binary_and_non_utf8(tmp_path):
    path = tmp_path / "bin.star"
    path.write_bytes(b"data_\n\x00\x01\x02")
    with pytest.raises(InputError, match=r"bin.star: is a binary file"):
        read_star(path)
    path.write_bytes(b"data_x\n_a 1\n_b caf\xe9\n")
    with pytest.raises(InputError, match=r"bin.star: line 3 is not UTF-8 text \(byte 0xe9\)"):
        read_star(path)


def test_missing_and_folder(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_star(tmp_path / "none.star")
    with pytest.raises(InputError, match="is a folder"):
        read_star(tmp_path)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.star")
        with pytest.raises(InputError, match="not a regular file"):
            read_star(tmp_path / "pipe.star")


def test_comments_crlf_and_bom(tmp_path):
    text = "\ufeff# version 30001\n\ndata_x\n\nloop_\n_a #1\n_b #2\n1 x\n# note\n2 y\n"
    text = text.replace("\n", "\r\n")
    blocks = read_star(_write_text(tmp_path, text))
    assert blocks["x"]["a"].tolist() == [1, 2]
    assert blocks["x"]["b"].tolist() == ["x", "y"]


# ---------------------------------------------------------------- writing


def test_write_format_is_relion_style(tmp_path):
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [1.5]})
    parts = pd.DataFrame({"rlnImageName": ["1@a.mrcs", "2@a.mrcs"], "rlnDefocusU": [1e4, 0.1]})
    path = tmp_path / "p.star"
    write_star(path, {"optics": optics, "particles": parts})
    text = path.read_text()
    assert text.startswith("\n# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n")
    assert "_rlnImagePixelSize #2\n1 1.5\n" in text
    assert "1@a.mrcs 10000.0\n2@a.mrcs 0.1\n" in text
    write_star(path, {"x": parts}, version_comment=False)
    assert path.read_text().startswith("data_x\n")
    write_star(path, {"x": parts}, version_comment="version 50001")
    assert path.read_text().startswith("\n# version 50001\n")


def test_write_round_trip_of_awkward_values(tmp_path):
    df = pd.DataFrame(
        {
            "text": ["two words", "", "_underscore", "#hash", "data_like", "plain"],
            "num": [0.1, 1 / 3, 1e-300, -0.0, np.nan, 1e16],
            "ints": np.arange(6, dtype=np.int64) - 3,
            "flags": [True, False, True, True, False, False],
        }
    )
    path = tmp_path / "odd.star"
    write_star(path, {"odd": df})
    back = read_star(path)["odd"]
    pd.testing.assert_frame_equal(back[["text", "num", "ints"]], df[["text", "num", "ints"]])
    assert back["flags"].tolist() == [1, 0, 1, 1, 0, 0]


def test_write_pairs_block(tmp_path):
    general = pd.DataFrame({"rlnFinalResolution": [3.2], "rlnName": ["run one"]})
    general.attrs["star_loop"] = False
    path = tmp_path / "g.star"
    write_star(path, {"general": general})
    assert '_rlnFinalResolution 3.2\n_rlnName            "run one"\n' in path.read_text()
    _assert_tables_equal({"general": general}, read_star(path))


def test_write_many_rows_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(_star, "_CHUNK_ROWS", 7)
    df = pd.DataFrame({"a": np.arange(50), "b": np.linspace(0, 1, 50), "c": ["s"] * 50})
    path = tmp_path / "big.star"
    write_star(path, {"big": df})
    pd.testing.assert_frame_equal(read_star(path)["big"], df, check_exact=True)


def test_clean_text_columns_are_written_in_one_scan(tmp_path, monkeypatch):
    """A text column that needs no quotes skips the per-value tokens (an iteration's
    _data.star: every image name); one that does, or holds a NUL, takes them."""
    names = [f"{i:06d}@Extract/job007/mics/mic{i % 7}.mrcs" for i in range(1, 2001)]

    def per_value(s, where):
        raise AssertionError(f"per-value token for {s!r}")

    monkeypatch.setattr(_star, "_text_token", per_value)
    assert _star._format_column(pd.Series(names), "x") == names
    monkeypatch.undo()
    for odd, token in (("two words", '"two words"'), ("", '""'), ("_x", '"_x"')):
        for at in (0, 1, 2):  # first, middle and last value
            col = ["a", "b", "c"]
            col[at] = odd
            out = _star._format_column(pd.Series(col), "x")
            assert out[at] == token and [v for i, v in enumerate(out) if i != at] == [
                v for i, v in enumerate(col) if i != at]
    with pytest.raises(ConfigError, match="quote character or a line break"):
        _star._format_column(pd.Series(["a", "b\x00c"]), "x")


def test_write_rejects_unreadable_values_atomically(tmp_path):
    path = tmp_path / "keep.star"
    good = {"x": pd.DataFrame({"a": [1]})}
    write_star(path, good)
    before = path.read_text()
    with pytest.raises(ConfigError, match=r"contains a quote character"):
        write_star(path, {"x": pd.DataFrame({"a": ["it's"]})})
    with pytest.raises(ConfigError, match=r"duplicate column names"):
        write_star(path, {"x": pd.DataFrame([[1, 2]], columns=["a", "a"])})
    with pytest.raises(ConfigError, match=r"must be a pandas DataFrame"):
        write_star(path, {"x": [1, 2]})
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.star"]


def test_columns_formatted_already_are_written_as_given(tmp_path, monkeypatch):
    """``df.attrs[TOKENS_ATTR]`` columns (a job's unchanged inputs, formatted once per run)
    are written from their tokens, with the same text as formatting them; tokens of another
    length than the table are ignored."""
    monkeypatch.setattr(_star, "_CHUNK_ROWS", 7)  # tokens sliced per chunk too
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"rlnDefocusU": rng.random(30) * 1e4, "rlnClassNumber": np.arange(30),
                       "rlnMicrographName": [f"m{i % 4}.mrc" for i in range(30)]})
    plain = tmp_path / "plain.star"
    write_star(plain, {"particles": df})
    given = df.copy()
    given.attrs[_star.TOKENS_ATTR] = _star.StarTokens(
        (c, _star.star_tokens(df[c])) for c in ("rlnDefocusU", "rlnMicrographName"))
    assert given.copy().attrs[_star.TOKENS_ATTR] is given.attrs[_star.TOKENS_ATTR]  # shared
    calls = []
    fmt = _star._format_column
    monkeypatch.setattr(_star, "_format_column", lambda col, where: calls.append(col.name)
                        or fmt(col, where))
    fast = tmp_path / "fast.star"
    write_star(fast, {"particles": given})
    assert fast.read_text() == plain.read_text()
    assert set(calls) == {"rlnClassNumber"}
    given.attrs[_star.TOKENS_ATTR] = {"rlnDefocusU": ["1"] * 29}  # stale: not used
    write_star(fast, {"particles": given})
    assert fast.read_text() == plain.read_text()
