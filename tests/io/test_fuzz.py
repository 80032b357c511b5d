"""Corrupted copies of shared files: only InputError (or warnings), never another exception."""

from __future__ import annotations

import random
import warnings

import pytest

from cryonb.errors import InputError
from cryonb.io import describe, read_mrc, read_particles, read_star

MRC_FILES = [
    "ccpem+mrcfile/tests/test_data/EMD-3001.map",
    "ml-struct-bio+cryodrgn/tests/data/hand.5.mrcs",
    "hyperspy+rosettasciio/rsciio/tests/data/mrc/HAADFscan.mrc",
]
STAR_FILES = [
    "ml-struct-bio+cryodrgn/tests/data/relion31.star",
    "teamtomo+starfile/tests/data/postprocess.star",
    "teamtomo+starfile/tests/data/loop_double_quote.star",
]
STAR_INSERTS = ["loop_", "data_x", "_rlnFoo 1", "1 2 3", "", "# c", "'", '"a b', "data_"]


def _only_input_errors(*calls) -> None:
    for fn, kwargs in calls:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fn(**kwargs)
            except InputError:
                pass


@pytest.mark.parametrize("local", MRC_FILES)
def test_corrupted_mrc_headers(shared_data, tmp_path, local):
    rng = random.Random(local)
    original = (shared_data / local).read_bytes()
    path = tmp_path / ("fuzz" + "".join((shared_data / local).suffixes))
    for _ in range(40):
        raw = bytearray(original)
        for _ in range(rng.randint(1, 5)):
            raw[rng.randrange(1024)] = rng.randrange(256)
        if rng.random() < 0.2:
            raw = raw[: rng.randrange(len(raw))]
        path.write_bytes(bytes(raw))
        _only_input_errors(
            (read_mrc, {"path": path}),
            (read_mrc, {"path": path, "permissive": True}),
            (read_mrc, {"path": path, "mmap": True}),
            (describe, {"path": path}),
        )


@pytest.mark.parametrize("local", STAR_FILES)
def test_corrupted_star_files(shared_data, tmp_path, local):
    rng = random.Random(local)
    lines = (shared_data / local).read_text().splitlines()
    path = tmp_path / "fuzz.star"
    for _ in range(8):
        edited = list(lines)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(edited))
            roll = rng.random()
            if roll < 0.3:
                del edited[i]
            elif roll < 0.5:
                edited.insert(i, rng.choice(STAR_INSERTS))
            elif roll < 0.8:
                tokens = edited[i].split()
                if tokens:
                    del tokens[rng.randrange(len(tokens))]
                edited[i] = " ".join(tokens)
            else:
                edited[i] += " extra"
        path.write_text("\n".join(edited))
        _only_input_errors((read_star, {"path": path}), (read_particles, {"path": path}))
