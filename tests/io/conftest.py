"""Parametrisation of the io tests over every file listed in the shared data MANIFEST.tsv.

Tests ask for one of the fixtures ``mrc_entry``, ``star_entry``, ``other_entry`` (cryoSPARC
.cs files, READMEs) or ``manifest_entry`` (all) and are run once per file of that kind. Each
:class:`Entry` parses the MANIFEST's ``auto_info`` column into the expected shape / dtype /
voxel size (MRC) or blocks (STAR).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_MRC_INFO = re.compile(
    r"^\((?P<shape>[\d, ]+)\) (?P<dtype>[<>|]\w\d) mode(?P<mode>\d+) vox=(?P<vox>-?[\d.]+)A"
    r"(?: ext=(?P<ext>\d+)B '(?P<exttyp>[^']*)')?(?: axes=(?P<axes>\d{3}))?"
    r"(?: ispg=(?P<ispg>\d+))?(?P<strict_fails> \[strict open FAILS\])? valid=(True|False)$"
)
_STAR_BLOCK = re.compile(r"^(?P<name>.*):(?:kv(?P<kv>\d+)|(?P<rows>\d+)x(?P<cols>\d+))$")


def _manifest() -> Path:
    env = os.environ.get("CRYONB_SHARED_DATA")
    return (Path(env) if env else ROOT.parent / "shared" / "data") / "MANIFEST.tsv"


@dataclass(frozen=True)
class Entry:
    """One MANIFEST.tsv row."""

    local: str
    nbytes: int
    info: str

    def __str__(self) -> str:
        return self.local

    @property
    def name(self) -> str:
        return Path(self.local).name

    @property
    def kind(self) -> str:
        """``mrc``, ``mrc_fail`` (no shape: the header promises data that is not there),
        ``star``, ``star_fail`` or ``other``."""
        if self.info.startswith("blocks "):
            return "star"
        if self.info.startswith("starfile FAILS"):
            return "star_fail"
        if _MRC_INFO.match(self.info):
            return "mrc"
        if self.info.startswith("mrcfile permissive: no data"):
            return "mrc_fail"
        return "other"

    # ---- MRC facts
    @property
    def mrc(self) -> dict:
        m = _MRC_INFO.match(self.info)
        assert m, self.info
        return m.groupdict()

    @property
    def raw_shape(self) -> tuple[int, ...]:
        """Shape as mrcfile reads it: (sections, rows, columns)."""
        return tuple(int(n) for n in self.mrc["shape"].split(","))

    @property
    def expected_shape(self) -> tuple[int, ...]:
        """Shape in (z, y, x) order: MANIFEST axes "312" = MAPC, MAPR, MAPS."""
        shape, axes = self.raw_shape, self.mrc["axes"]
        if not axes or len(shape) != 3:
            return shape
        mapc, mapr, maps = (int(a) for a in axes)
        held = [maps, mapr, mapc]  # cell axis (1=X, 2=Y, 3=Z) of raw axes 0, 1, 2
        return tuple(shape[held.index(axis)] for axis in (3, 2, 1))

    @property
    def voxel(self) -> float | None:
        v = float(self.mrc["vox"])
        return v if v > 0 else None

    @property
    def strict_fails(self) -> bool:
        return bool(self.mrc["strict_fails"])

    # ---- STAR facts
    @property
    def blocks(self) -> dict[str, tuple[int, int, bool]]:
        """Block name -> (rows, columns, is_loop); ``_`` in the MANIFEST is the unnamed block."""
        spec = self.info.removeprefix("blocks ").split(" | ")[0].split()
        out = {}
        for item in spec:
            m = _STAR_BLOCK.match(item)
            assert m, item
            name = "" if m["name"] == "_" else m["name"]
            if m["kv"]:
                out[name] = (1, int(m["kv"]), False)
            else:
                out[name] = (int(m["rows"]), int(m["cols"]), True)
        return out


def load_manifest() -> list[Entry]:
    path = _manifest()
    if not path.is_file():
        return []
    rows = path.read_text(encoding="utf-8").splitlines()[1:]
    out = []
    for row in rows:
        local, _repo, _path, nbytes, _licence, info = row.split("\t")
        out.append(Entry(local, int(nbytes), info))
    return out


MANIFEST = load_manifest()


def pytest_generate_tests(metafunc):
    groups = {
        "manifest_entry": MANIFEST,
        "mrc_entry": [e for e in MANIFEST if e.kind in ("mrc", "mrc_fail")],
        "star_entry": [e for e in MANIFEST if e.kind in ("star", "star_fail")],
        "other_entry": [e for e in MANIFEST if e.kind == "other"],
    }
    for fixture, entries in groups.items():
        if fixture in metafunc.fixturenames:
            metafunc.parametrize(fixture, entries, ids=[e.local for e in entries])
