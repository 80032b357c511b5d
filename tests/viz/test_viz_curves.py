"""SSNR and FSC/FRC curves."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cryonb.errors import InputError
from cryonb.io import read_star
from cryonb.viz import ssnr_plot


def test_ssnr_from_model(class2d_root, class2d_facts):  # rendered in the next test
    layout = ssnr_plot(f"{class2d_root}_it002_model.star")
    (panel,) = list(layout)
    curves = panel.NdOverlay.I
    assert len(curves) == class2d_facts.K
    assert next(iter(curves.keys())) == "1 (12.0 Å)"
    assert np.nanmin(curves.last.dimension_values("ssnr")) > 0  # log scale: no zeros


def test_fsc_columns_and_extra_curves(class2d_root, render):
    blocks = dict(read_star(f"{class2d_root}_it002_model.star"))
    res = np.linspace(0, 0.2, 11)
    blocks["fsc"] = pd.DataFrame({"rlnResolution": res, "rlnFourierShellCorrelationCorrected":
                                  np.linspace(1, 0, 11)})
    layout = ssnr_plot(blocks, frc={"halves": (res, np.linspace(1, 0.1, 11))})
    render(layout)
    fsc = list(layout)[1].NdOverlay.I
    assert set(fsc.keys()) == {"fsc: FourierShellCorrelationCorrected", "halves"}


def test_nothing_to_plot():
    with pytest.raises(InputError, match="no SSNR"):
        ssnr_plot({"optics": pd.DataFrame({"rlnOpticsGroup": [1]})})
