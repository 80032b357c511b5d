"""Device layout of a --gpu device map."""

from __future__ import annotations

import pytest

from cryonb.parallel.devices import resolve_device_map
from cryonb.viz import device_layout, device_table


def test_gpu_map_with_sharing(render):
    dm = resolve_device_map("0,1,1,2:3", ranks=4, threads=4, n_devices=4)
    table = device_table(dm)
    r1 = table[table["rank"] == 1].set_index("device")
    assert r1.loc["GPU 1", "threads"] == 2 and r1.loc["GPU 1", "thread ids"] == "1, 2"
    assert r1.loc["GPU 0", "shared with"] == "3"
    assert table.iloc[0][["role", "device", "threads"]].tolist() == ["leader", "-", 0]
    layout = device_layout(dm)
    render(layout)
    assert len(layout) == 3  # heat map, table, warnings (devices shared)


def test_cpu_and_hosts():
    cpu = device_table(resolve_device_map("", ranks=3, threads=2, n_devices=0))
    assert cpu["device"].tolist() == ["-", "CPU", "CPU"] and cpu["threads"].tolist() == [0, 2, 2]
    assert len(device_layout(resolve_device_map("", ranks=1, threads=2, n_devices=0))) == 2
    dm = resolve_device_map("0:0", ranks=3, n_devices=2, hosts={1: "a", 2: "b"})
    table = device_table(dm)
    assert table["shared with"].tolist() == ["", "", ""]  # same index, other host
    assert len(device_layout(dm)) == 2


def test_json_form_and_bad_type():
    table = device_table({"0": [], "1": [2, 2]})
    assert table["device"].tolist() == ["-", "GPU 2"] and table["threads"].tolist() == [0, 2]
    assert len(device_layout({"0": [], "1": [2, 2]})) == 2
    with pytest.raises(TypeError, match="DeviceMap"):
        device_table([1, 2])
