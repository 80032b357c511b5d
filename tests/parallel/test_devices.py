"""Tests of the ``--gpu`` grammar and device maps (cryonb.parallel.devices).

The reference is RELION itself: below is an independent, literal transcription of the C++ that
assigns devices (``src/args.cpp:untangleDeviceIDs``, ``src/strings.cpp:textToInteger``,
``src/ml_optimiser_mpi.cpp:MlOptimiserMpi::initialise``, the sequential
``src/ml_optimiser.cpp:MlOptimiser::initialise`` and ``src/autopicker_mpi.cpp:deviceInitialise``),
written in RELION's own style (find/substr/erase string scanning, sscanf, C ``isdigit``), not
through cryonb's parser. Every worked example of GPU_SPEC.md is an acceptance case, and ~500
random valid strings must give the same map as the transcription.
"""

from __future__ import annotations

import ast
import json
import random
import re
import warnings
from pathlib import Path

import pytest

from cryonb.errors import ConfigError
from cryonb.parallel import devices as devices_module
from cryonb.parallel.devices import (
    DeviceAssignment,
    DeviceMap,
    GpuSpecError,
    parse_gpu_spec,
    resolve_device_map,
)


# --------------------------------------------------------------------------------------------
# RELION, transcribed (the oracle)
# --------------------------------------------------------------------------------------------
class RelionReportError(Exception):
    """RELION's REPORT_ERROR."""


def relion_untangle_device_ids(tangled: str) -> tuple[list[list[str]], str]:
    """args.cpp ``untangleDeviceIDs(std::string &tangled, ...)``.

    ``tangled`` is passed by non-const reference and ERASED up to the last ':' as a side
    effect; the second return value is what the caller's ``gpu_ids`` holds afterwards.
    """
    pos = 0
    delim = ":"
    all_rank_ids: list[str] = []
    while True:
        pos = tangled.find(delim)
        if pos == -1:  # std::string::npos
            break
        this_rank_ids = tangled[0:pos]  # substr(0, pos)
        tangled = tangled[pos + len(delim):]  # erase(0, pos + delim.length())
        all_rank_ids.append(this_rank_ids)
    all_rank_ids.append(tangled)

    untangled: list[list[str]] = [[] for _ in range(len(all_rank_ids))]  # resize
    for i in range(len(all_rank_ids)):
        delim = ","
        while True:
            pos = all_rank_ids[i].find(delim)
            if pos == -1:
                break
            this_thread_id = all_rank_ids[i][0:pos]
            all_rank_ids[i] = all_rank_ids[i][pos + len(delim):]
            untangled[i].append(this_thread_id)
        untangled[i].append(all_rank_ids[i])
    return untangled, tangled


def relion_text_to_integer(text: str) -> int | None:
    """strings.cpp ``textToInteger``: ``sscanf(str, "%d", &retval)``, error only if it gives 0.

    sscanf skips leading white space, takes an optional sign and digits, ignores the rest.
    On an empty (or all-blank) string it returns EOF (-1), which is "true", so RELION goes on
    with an uninitialised int: returned here as None.
    """
    i = 0
    while i < len(text) and text[i] in " \t\n\v\f\r":
        i += 1
    if i == len(text):
        return None  # EOF: garbage value in RELION
    j = i
    if text[j] in "+-":
        j += 1
    k = j
    while k < len(text) and "0" <= text[k] <= "9":
        k += 1
    if k == j:
        raise RelionReportError(f"textToInteger({text!r})")
    return int(text[i:k])


def relion_isdigit(ch: str) -> bool:
    """C ``isdigit`` in the "C" locale."""
    return "0" <= ch <= "9"


def relion_first_char(gpu_ids: str) -> str:
    """``*gpu_ids.begin()``: for an empty std::string this reads the terminating NUL."""
    return gpu_ids[0] if len(gpu_ids) > 0 else "\0"


def relion_refine_mpi_device_map(gpu_ids: str, size: int, nr_threads: int,
                                 device_counts: list[int], host_names: list[str]) -> dict:
    """ml_optimiser_mpi.cpp ``MlOptimiserMpi::initialise``, the device part run by the master.

    Returns ``{rank: [dev_id per thread]}`` for ranks 1..size-1 (the master gets none).
    """
    # ---- FIGURE OUT GLOBAL DEVICE MAP: host names and slave counts per host
    unique_hosts: list[str] = []
    ranks_on_host: list[int] = []
    host_id = [0] * size
    for slave in range(1, size):
        host_name = host_names[slave]
        idi = -1
        for j in range(len(unique_hosts)):
            if unique_hosts[j] == host_name:
                idi = j
        if idi >= 0:
            ranks_on_host[idi] += 1
            host_id[slave] = idi
        else:
            unique_hosts.append(host_name)
            ranks_on_host.append(1)
            host_id[slave] = len(ranks_on_host) - 1

    # ---- SET DEVICE INDICES BASED ON HOST DEVICE-COUNTS
    all_thread_ids, gpu_ids = relion_untangle_device_ids(gpu_ids)
    if len(all_thread_ids) > 0 and len(all_thread_ids) < (size - 1):
        n = len(all_thread_ids)
        all_thread_ids.extend([] for _ in range(size - 1 - n))  # resize(size-1)
        for rank in range(1, size - 1):
            all_thread_ids[rank] = all_thread_ids[rank % n]

    result: dict[int, list] = {}
    for rank in range(1, size):
        full_automatic_mapping = True
        semi_automatic_mapping = True
        if (len(all_thread_ids) < rank or len(all_thread_ids[0]) == 0
                or not relion_isdigit(relion_first_char(gpu_ids))):
            pass  # "GPU-ids not specified for this rank, threads will automatically be mapped"
        else:
            full_automatic_mapping = False
            if len(all_thread_ids[rank - 1]) != nr_threads:
                pass  # "will distribute threads over devices"
            else:
                semi_automatic_mapping = False  # "Using explicit indexing"
        devs = []
        for i in range(nr_threads):
            if semi_automatic_mapping:
                if full_automatic_mapping:
                    ranks_on_this_host = ranks_on_host[host_id[rank]]
                    if ranks_on_this_host > 1:
                        dev_id = (device_counts[rank]
                                  * (((rank - 1) % ranks_on_this_host) * nr_threads + i)
                                  ) // (ranks_on_this_host * nr_threads)
                    else:
                        dev_id = device_counts[rank] * i // nr_threads
                else:
                    ids = all_thread_ids[rank - 1]
                    dev_id = relion_text_to_integer(ids[i % len(ids)])
            else:
                dev_id = relion_text_to_integer(all_thread_ids[rank - 1][i])
            devs.append(dev_id)
        result[rank] = devs
    return result


def relion_refine_sequential_device_map(gpu_ids: str, nr_threads: int, dev_count: int) -> list:
    """ml_optimiser.cpp ``MlOptimiser::initialise`` (relion_refine without MPI)."""
    all_thread_ids, gpu_ids = relion_untangle_device_ids(gpu_ids)
    full_automatic_mapping = True
    semi_automatic_mapping = True
    if len(all_thread_ids[0]) == 0 or not relion_isdigit(relion_first_char(gpu_ids)):
        pass
    else:
        full_automatic_mapping = False
        if len(all_thread_ids[0]) == nr_threads:
            semi_automatic_mapping = False
    devs = []
    for i in range(nr_threads):
        if semi_automatic_mapping:
            if full_automatic_mapping:
                dev_id = dev_count * i // nr_threads
            else:
                dev_id = relion_text_to_integer(
                    all_thread_ids[0][i % len(all_thread_ids[0])])
        else:
            dev_id = relion_text_to_integer(all_thread_ids[0][i])
        devs.append(dev_id)
    return devs


def relion_autopick_device(gpu_ids: str, rank: int, dev_count: int) -> int:
    """autopicker_mpi.cpp ``AutoPickerMpi::deviceInitialise`` (IndexError where C++ overruns)."""
    all_thread_ids, gpu_ids = relion_untangle_device_ids(gpu_ids)
    if not relion_isdigit(relion_first_char(gpu_ids)):
        dev_id = rank % dev_count
    else:
        dev_id = relion_text_to_integer(all_thread_ids[rank][0])
    return dev_id


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def random_valid_spec(rng: random.Random, n_devices: int, max_groups: int,
                      max_threads: int) -> str:
    """A well-formed --gpu string (no leading zeros, ids below n_devices)."""
    groups = []
    for _ in range(rng.randint(1, max_groups)):
        groups.append([rng.randrange(n_devices) for _ in range(rng.randint(1, max_threads))])
    return ":".join(",".join(str(d) for d in g) for g in groups)


def worker_devices(m: DeviceMap) -> dict[int, list[int]]:
    return {a.rank: list(a.devices) for a in m.assignments if a.role == "worker"}


def caret_lines(message: str) -> tuple[str, str]:
    lines = message.splitlines()
    (i,) = [k for k, line in enumerate(lines) if line.startswith("  --gpu '")]
    return lines[i], lines[i + 1]


# --------------------------------------------------------------------------------------------
# GPU_SPEC.md worked examples (4 devices, one host): acceptance cases
# --------------------------------------------------------------------------------------------
REFINE_EXAMPLES = [
    # spec, ranks, threads, {worker: devices}
    ("", 3, 1, {1: [0], 2: [2]}),
    ("", 3, 2, {1: [0, 1], 2: [2, 3]}),
    ("", 4, 1, {1: [0], 2: [1], 3: [2]}),
    ("2:3", 3, 1, {1: [2], 2: [3]}),
    ("2:3", 3, 4, {1: [2, 2, 2, 2], 2: [3, 3, 3, 3]}),
    ("2:3", 5, 1, {1: [2], 2: [3], 3: [2], 4: [3]}),
    ("0,1,1,2:3", 3, 4, {1: [0, 1, 1, 2], 2: [3, 3, 3, 3]}),
    ("2:2:1,3", 4, 3, {1: [2, 2, 2], 2: [2, 2, 2], 3: [1, 3, 1]}),
    ("0,1,2,3", 5, 1, {1: [0], 2: [0], 3: [0], 4: [0]}),
]


@pytest.mark.parametrize(("spec", "ranks", "threads", "expected"), REFINE_EXAMPLES)
def test_refine_worked_examples(spec, ranks, threads, expected):
    m = resolve_device_map(spec, ranks, threads, n_devices=4)
    assert m.assignments[0] == DeviceAssignment(0, "leader", (), "none")
    assert worker_devices(m) == expected
    assert m.to_json_dict() == {"0": [], **{str(r): d for r, d in expected.items()}}
    # and RELION (transcribed) agrees
    oracle = relion_refine_mpi_device_map(spec, ranks, threads, [4] * ranks, ["h"] * ranks)
    assert oracle == expected


@pytest.mark.parametrize(
    ("spec", "ranks", "modes"),
    [
        ("", 3, ["automatic", "automatic"]),
        ("2:3", 3, ["explicit", "explicit"]),
        ("0,1,1,2:3", 3, ["explicit", "semi-automatic"]),
    ],
)
def test_refine_modes(spec, ranks, modes):
    m = resolve_device_map(spec, ranks, 4 if spec == "0,1,1,2:3" else 1, n_devices=4)
    assert [a.mode for a in m.assignments] == ["none", *modes]


AUTOPICK_EXAMPLES = [
    ("", 3, {0: 0, 1: 1, 2: 2}),
    ("2:3", 2, {0: 2, 1: 3}),
    ("2:2:1,3", 3, {0: 2, 1: 2, 2: 1}),
]


@pytest.mark.parametrize(("spec", "ranks", "expected"), AUTOPICK_EXAMPLES)
def test_autopick_worked_examples(spec, ranks, expected):
    m = resolve_device_map(spec, ranks, 2, n_devices=4, job="autopick")
    assert {a.rank: a.devices for a in m.assignments} == {r: (d,) for r, d in expected.items()}
    assert all(a.role == "worker" for a in m.assignments)
    assert m.to_json_dict() == {str(r): [d] for r, d in expected.items()}
    assert {r: relion_autopick_device(spec, r, 4) for r in range(ranks)} == expected


def test_autopick_reuses_groups_where_relion_overruns():
    with pytest.raises(IndexError):  # RELION reads allThreadIDs[2] of a 2-element vector
        relion_autopick_device("2:3", 2, 4)
    m = resolve_device_map("2:3", 3, n_devices=4, job="autopick")
    assert m.to_json_dict() == {"0": [2], "1": [3], "2": [2]}
    assert m.warnings == [
        "device 2 is shared by 2 ranks (0, 2): each gets half of its free memory"]


def test_same_string_refine_and_autopick_differ_only_by_the_leader():
    refine = resolve_device_map("2:3", 3, n_devices=4)
    autopick = resolve_device_map("2:3", 2, n_devices=4, job="autopick")
    assert [a.devices for a in refine.assignments if a.role == "worker"] == \
        [a.devices for a in autopick.assignments]
    assert "leader" in refine.format_table()
    assert "leader" not in autopick.format_table()


# --------------------------------------------------------------------------------------------
# warnings
# --------------------------------------------------------------------------------------------
def test_comma_instead_of_colon_warns():
    m = resolve_device_map("0,1,2,3", 5, 1, n_devices=4)
    assert m.warnings[0] == (
        "devices 1, 2, 3 are listed in --gpu '0,1,2,3' but no thread uses them: ',' "
        "separates the threads of ONE rank; did you mean '0:1:2:3'?")
    assert m.warnings[1] == (
        "device 0 is shared by 4 worker ranks (1, 2, 3, 4): each gets a quarter of its free "
        "memory")
    assert len(m.warnings) == 2


def test_comma_hint_groups_by_threads():
    m = resolve_device_map("0,1,2,3", 2, 2, n_devices=4)
    assert m.warnings == [
        "devices 2, 3 are listed in --gpu '0,1,2,3' but no thread uses them: ',' separates "
        "the threads of ONE rank; did you mean '0,1:2,3'?"]


def test_one_unused_device_is_singular():
    m = resolve_device_map("0,1", 2, 1, n_devices=4)
    assert m.warnings == [
        "device 1 is listed in --gpu '0,1' but no thread uses it: ',' separates the threads "
        "of ONE rank; did you mean '0:1'?"]


def test_autopick_unused_device_warns():
    m = resolve_device_map("0,1", 1, 4, n_devices=4, job="autopick")
    assert m.to_json_dict() == {"0": [0]}
    assert "autopick uses only the first device of each rank; did you mean '0:1'?" \
        in m.warnings[0]


def test_cyclic_reuse_warns_of_sharing():
    m = resolve_device_map("2:3", 5, 1, n_devices=4)
    assert m.warnings == [
        "device 2 is shared by 2 worker ranks (1, 3): each gets half of its free memory",
        "device 3 is shared by 2 worker ranks (2, 4): each gets half of its free memory",
    ]
    assert m.workers_per_device() == {2: 2, 3: 2}
    assert m.sharing() == {2: [(1, 0), (3, 0)], 3: [(2, 0), (4, 0)]}


def test_sharing_fractions():
    m = resolve_device_map("1", 4, 1, n_devices=4)
    assert m.warnings == [
        "device 1 is shared by 3 worker ranks (1, 2, 3): each gets a third of its free memory"]
    m = resolve_device_map("1", 7, 1, n_devices=4)
    assert m.warnings[0].endswith("each gets 1/6 of its free memory")


def test_threads_of_one_rank_on_one_device_do_not_warn():
    m = resolve_device_map("2:3", 3, 4, n_devices=4)
    assert m.warnings == []
    assert m.workers_per_device() == {2: 1, 3: 1}


def test_unused_groups_warn():
    m = resolve_device_map("0:1:2", 3, 1, n_devices=4)
    assert m.warnings == [
        "--gpu lists 3 rank groups but there are only 2 workers: group 3 is unused "
        "(rank 0, the leader, takes no device: the groups are for ranks 1, 2, ...; give one "
        "group per worker, or one more rank)"]
    m = resolve_device_map("0:1:2:3", 2, 1, n_devices=4)
    assert m.warnings == [
        "--gpu lists 4 rank groups but there is only 1 worker: groups 2-4 are unused"]
    m = resolve_device_map("0:1:2", 2, 1, n_devices=4, job="autopick")
    assert m.warnings == [
        "--gpu lists 3 rank groups but there are only 2 ranks: group 3 is unused"]


def test_warn_true_emits_user_warnings():
    with pytest.warns(UserWarning) as record:
        m = resolve_device_map("0,1,2,3", 5, n_devices=4, warn=True)
    assert [str(w.message) for w in record] == m.warnings
    assert "did you mean '0:1:2:3'?" in m.warnings[0]
    assert all(w.category is UserWarning for w in record)
    assert record[0].filename == __file__  # points at the caller


def test_warn_false_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = resolve_device_map("0,1,2,3", 5, n_devices=4)
    assert len(m.warnings) == 2


def test_several_hosts_same_index_is_not_shared():
    hosts = {0: "a", 1: "a", 2: "b"}
    m = resolve_device_map("1", 3, n_devices=4, hosts=hosts)
    assert m.warnings == []
    assert m.hosts == hosts
    assert m.workers_per_device("a") == {1: 1}
    # RELION's automatic rule with interleaved hosts puts workers 1 and 3 on the same device
    hosts = {1: "a", 2: "b", 3: "a", 4: "b"}
    m = resolve_device_map("", 5, 2, n_devices=4, hosts=hosts)
    oracle = relion_refine_mpi_device_map("", 5, 2, [4] * 5, ["x", "a", "b", "a", "b"])
    assert worker_devices(m) == oracle == {1: [0, 1], 2: [2, 3], 3: [0, 1], 4: [2, 3]}
    assert m.warnings == [
        "device 0 on host a is shared by 2 worker ranks (1, 3): each gets half of its free "
        "memory",
        "device 1 on host a is shared by 2 worker ranks (1, 3): each gets half of its free "
        "memory",
        "device 2 on host b is shared by 2 worker ranks (2, 4): each gets half of its free "
        "memory",
        "device 3 on host b is shared by 2 worker ranks (2, 4): each gets half of its free "
        "memory",
    ]


# --------------------------------------------------------------------------------------------
# property test against the transcription of RELION
# --------------------------------------------------------------------------------------------
def _random_case(rng: random.Random):
    ranks = rng.randint(2, 9)
    threads = rng.randint(1, 6)
    n_devices = rng.randint(1, 8)
    n_workers = ranks - 1
    spec = "" if rng.random() < 0.2 else random_valid_spec(
        rng, n_devices, max_groups=n_workers + 2, max_threads=threads + 2)
    if rng.random() < 0.3:
        names = [f"node{rng.randrange(3)}" for _ in range(ranks)]
    else:
        names = ["node0"] * ranks
    return spec, ranks, threads, n_devices, names


CASES = [_random_case(random.Random(seed)) for seed in range(500)]


def test_random_cases_cover_every_mode():
    modes = set()
    for spec, ranks, threads, n_devices, _ in CASES:
        m = resolve_device_map(spec, ranks, threads, n_devices=n_devices)
        modes |= {a.mode for a in m.assignments}
    assert modes == {"none", "automatic", "explicit", "semi-automatic"}


@pytest.mark.parametrize("case", range(0, 500, 50), ids=lambda i: f"seeds{i}-{i + 49}")
def test_refine_matches_relion(case):
    for spec, ranks, threads, n_devices, names in CASES[case:case + 50]:
        expected = relion_refine_mpi_device_map(spec, ranks, threads, [n_devices] * ranks,
                                                names)
        on_host = {r: names[1:].count(names[r]) for r in range(1, ranks)}
        m = resolve_device_map(spec, ranks, threads, n_devices=n_devices,
                               workers_on_host=on_host)
        assert worker_devices(m) == expected, (spec, ranks, threads, n_devices, names)
        hosted = resolve_device_map(spec, ranks, threads, n_devices=n_devices,
                                    hosts=dict(enumerate(names)))
        assert worker_devices(hosted) == expected
        assert m.devices_of(0) == ()
        assert all(len(a.devices) == threads for a in m.assignments if a.role == "worker")


@pytest.mark.parametrize("case", range(0, 500, 100), ids=lambda i: f"seeds{i}-{i + 99}")
def test_single_rank_matches_sequential_relion(case):
    for spec, _, threads, n_devices, _ in CASES[case:case + 100]:
        m = resolve_device_map(spec, 1, threads, n_devices=n_devices)
        assert m.to_json_dict() == {
            "0": relion_refine_sequential_device_map(spec, threads, n_devices)}
        assert m.assignments[0].role == "worker"


@pytest.mark.parametrize("case", range(0, 500, 100), ids=lambda i: f"seeds{i}-{i + 99}")
def test_autopick_matches_relion_where_relion_is_defined(case):
    overruns = 0
    for spec, ranks, threads, n_devices, _ in CASES[case:case + 100]:
        m = resolve_device_map(spec, ranks, threads, n_devices=n_devices, job="autopick")
        groups = parse_gpu_spec(spec)
        for r in range(ranks):
            try:
                expected = relion_autopick_device(spec, r, n_devices)
            except IndexError:  # RELION reads past its list; cryonb cycles
                overruns += 1
                expected = groups[r % len(groups)][0]
            assert m.devices_of(r) == (expected,), (spec, ranks, r)
    assert overruns > 0


# --------------------------------------------------------------------------------------------
# where RELION is silently wrong and cryonb refuses
# --------------------------------------------------------------------------------------------
def test_relion_puts_space_separated_ids_on_device_0():
    relion = relion_refine_mpi_device_map("0 1 2 3", 5, 1, [4] * 5, ["h"] * 5)
    assert relion == {1: [0], 2: [0], 3: [0], 4: [0]}
    with pytest.raises(ConfigError, match=re.escape("did you mean '0:1:2:3'")):
        resolve_device_map("0 1 2 3", 5, n_devices=4)


def test_relion_treats_trailing_colon_as_automatic():
    relion = relion_refine_mpi_device_map("3:", 3, 1, [4] * 3, ["h"] * 3)
    assert relion == relion_refine_mpi_device_map("", 3, 1, [4] * 3, ["h"] * 3)
    with pytest.raises(ConfigError, match="RELION would silently treat it as automatic"):
        resolve_device_map("3:", 3, n_devices=4)


# spec, n_devices, index, what the headline names, hint fragment, quoted line, caret line
MALFORMED = [
    ("0 1 2 3", None, 1, "whitespace ' ' (space) at position 2",
     "did you mean '0:1:2:3' (one device per rank) or '0,1,2,3' (one device per thread)?",
     "  --gpu '0 1 2 3'", "          ^ here"),
    ("0\t1", None, 1, "whitespace '\\t' (tab, U+0009) at position 2",
     "did you mean '0:1' (one device per rank) or '0,1' (one device per thread)?",
     "  --gpu '0\\t1'", "          ^^ here"),
    ("0:1 ", None, 3, "whitespace ' ' (space) at position 4",
     "remove the whitespace: did you mean '0:1'?",
     "  --gpu '0:1 '", "            ^ here"),
    ("a", None, 0, "the character 'a' at position 1", "device ids are whole numbers",
     "  --gpu 'a'", "         ^ here"),
    ("0,gpu1", None, 2, "the character 'g' at position 3", "device ids are whole numbers",
     "  --gpu '0,gpu1'", "           ^ here"),
    ("-1", None, 0, "a negative device id '-1' at position 1", "device ids count from 0",
     "  --gpu '-1'", "         ^^ here"),
    ("0:-2", None, 2, "a negative device id '-2' at position 3", "did you mean '0:2'?",
     "  --gpu '0:-2'", "           ^^ here"),
    ("0-3", None, 1, "a range '0-3' at position 2",
     "did you mean '0:1:2:3' (one device per rank) or '0,1,2,3' (one device per thread)?",
     "  --gpu '0-3'", "          ^ here"),
    ("0::1", None, 2, "an empty rank group ('::') at position 3", "did you mean '0:1'?",
     "  --gpu '0::1'", "           ^ here"),
    ("0:", None, 1, "a trailing ':' at position 2",
     "remove the trailing ':' (RELION would silently treat it as automatic)",
     "  --gpu '0:'", "          ^ here"),
    (":0", None, 0, "':' with no device id before it at position 1",
     "remove the leading ':': did you mean '0'?", "  --gpu ':0'", "         ^ here"),
    (":", None, 0, "':' with no device id before it at position 1",
     "leave --gpu empty ('') for automatic assignment", "  --gpu ':'", "         ^ here"),
    ("0,,1", None, 2, "two ',' in a row (a missing device id) at position 3",
     "remove one ',': did you mean '0,1'?", "  --gpu '0,,1'", "           ^ here"),
    ("1,", None, 1, "a trailing ',' at position 2", "remove the trailing ','",
     "  --gpu '1,'", "          ^ here"),
    (",1", None, 0, "',' with no device id before it at position 1",
     "remove the leading ','", "  --gpu ',1'", "         ^ here"),
    ("0,:1", None, 2, "',' directly before ':' (a missing device id) at position 3",
     "did you mean '0:1'?", "  --gpu '0,:1'", "           ^ here"),
    ("0:,1", None, 2, "',' directly after ':' (a rank group that starts with ',') at position 3",
     "did you mean '0:1'?", "  --gpu '0:,1'", "           ^ here"),
    ("0;1", None, 1, "the character ';' at position 2",
     "';' is not a separator: use ':' between ranks and ',' between the threads of a rank: "
     "did you mean '0:1' (one group per rank)?", "  --gpu '0;1'", "          ^ here"),
    ("+1", None, 0, "the character '+' at position 1", "without a sign: did you mean '1'?",
     "  --gpu '+1'", "         ^ here"),
    ("1.5", None, 1, "the character '.' at position 2", "whole numbers",
     "  --gpu '1.5'", "          ^ here"),
    ("0:\u0663", None, 2, "a non-ASCII digit '\\u0663' (U+0663 ARABIC-INDIC DIGIT THREE) at "
     "position 3", "type the ASCII digit '3': did you mean '0:3'?",
     "  --gpu '0:\\u0663'", "           ^^^^^^ here"),
    ("\uff11", None, 0, "(U+FF11 FULLWIDTH DIGIT ONE)", "type the ASCII digit '1'",
     "  --gpu '\\uff11'", "         ^^^^^^ here"),
    ("0\u00a01", None, 1, "whitespace '\\u00a0' (U+00A0 NO-BREAK SPACE) at position 2",
     "did you mean '0:1' (one device per rank)", "  --gpu '0\\u00a01'",
     "          ^^^^^^ here"),
    (" ", None, 0, "whitespace ' ' (space) at position 1",
     "leave --gpu empty ('') for automatic assignment", "  --gpu ' '", "         ^ here"),
    ("0,1 2,3", None, 3, "whitespace ' ' (space) at position 4",
     "use ':' between ranks, without spaces: did you mean '0,1:2,3'?",
     "  --gpu '0,1 2,3'", "            ^ here"),
    ("0:4", 4, 2, "device 4 does not exist at position 3", "only devices 0-3 are visible",
     "  --gpu '0:4'", "           ^ here"),
    ("0,12:1", 4, 2, "device 12 does not exist at position 3", "only devices 0-3 are visible",
     "  --gpu '0,12:1'", "           ^^ here"),
    ("1", 1, 0, "device 1 does not exist at position 1", "only device 0 is visible",
     "  --gpu '1'", "         ^ here"),
]


@pytest.mark.parametrize(
    ("spec", "n_devices", "index", "what", "hint", "quoted", "caret"), MALFORMED,
    ids=[repr(c[0]) for c in MALFORMED])
def test_malformed_strings_are_refused_with_position(spec, n_devices, index, what, hint,
                                                     quoted, caret):
    with pytest.raises(ConfigError) as info:
        parse_gpu_spec(spec, n_devices=n_devices)
    err = info.value
    assert isinstance(err, GpuSpecError)
    msg = str(err)
    assert err.index == index
    assert err.spec == spec
    assert what in msg.splitlines()[0]
    assert hint in msg
    assert caret_lines(msg) == (quoted, caret)
    # the same error through resolve_device_map
    with pytest.raises(GpuSpecError) as info2:
        resolve_device_map(spec, 3, n_devices=4 if n_devices is None else n_devices)
    assert info2.value.index == index


def test_out_of_range_names_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(GpuSpecError) as info:
        parse_gpu_spec("2:3", n_devices=2)
    msg = str(info.value)
    assert "only devices 0-1 are visible (CUDA_VISIBLE_DEVICES=2,3)" in msg
    assert "not the physical GPU numbers" in msg
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(GpuSpecError, match=r"\(CUDA_VISIBLE_DEVICES is not set\)"):
        parse_gpu_spec("2:3", n_devices=2)


def test_first_fault_is_reported():
    with pytest.raises(GpuSpecError) as info:
        parse_gpu_spec("0::1 2")
    assert info.value.index == 2
    # grammar is checked before ranges
    with pytest.raises(GpuSpecError) as info:
        parse_gpu_spec("9:a", n_devices=4)
    assert info.value.character == "a"


# --------------------------------------------------------------------------------------------
# parse_gpu_spec
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "groups"),
    [
        (None, []),
        ("", []),
        ("0", [[0]]),
        ("0,1,1,2:3", [[0, 1, 1, 2], [3]]),
        ("2:2:1,3", [[2], [2], [1, 3]]),
        ("10:11", [[10], [11]]),
        ("007", [[7]]),
    ],
)
def test_parse(spec, groups):
    assert parse_gpu_spec(spec) == groups


def test_parse_refuses_non_strings():
    with pytest.raises(ConfigError, match="must be a string"):
        parse_gpu_spec(0)  # type: ignore[arg-type]


def test_no_gpu_visible():
    with pytest.raises(ConfigError, match=r"--gpu '0:1' given but no GPU is visible.*--cpu"):
        parse_gpu_spec("0:1", n_devices=0)
    assert parse_gpu_spec("", n_devices=0) == []


# --------------------------------------------------------------------------------------------
# resolve_device_map: CPU, counts, one rank
# --------------------------------------------------------------------------------------------
def test_cpu_map():
    m = resolve_device_map("", 3, 4, n_devices=0)
    assert [(a.role, a.devices, a.mode) for a in m.assignments] == [
        ("leader", (), "none"), ("worker", (), "none"), ("worker", (), "none")]
    assert m.to_json_dict() == {"0": [], "1": [], "2": []}
    assert m.warnings == []
    assert "cpu" in m.format_table()
    m = resolve_device_map(None, 2, n_devices=0, job="autopick")
    assert m.to_json_dict() == {"0": [], "1": []}
    with pytest.raises(ConfigError, match="no GPU is visible"):
        resolve_device_map("0", 3, n_devices=0)


def test_single_rank_leads_and_works():
    m = resolve_device_map("", 1, 4, n_devices=2)
    assert m.assignments == [DeviceAssignment(0, "worker", (0, 0, 1, 1), "automatic")]
    assert "leader+worker" in m.format_table()
    m = resolve_device_map("1,3", 1, 2, n_devices=4)
    assert m.devices_of(0) == (1, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spec": "", "ranks": 0, "n_devices": 1}, "at least 2 ranks"),
        ({"spec": "", "ranks": -1, "n_devices": 1, "job": "autopick"}, "at least 1 rank"),
        ({"spec": "", "ranks": 2, "threads": 0, "n_devices": 1}, "at least 1"),
        ({"spec": "", "ranks": 2, "n_devices": -1}, "n_devices must be at least 0"),
        ({"spec": "", "ranks": 2.5, "n_devices": 1}, "whole number"),
        ({"spec": "", "ranks": True, "n_devices": 1}, "whole number"),
        ({"spec": "", "ranks": 2, "n_devices": 1, "job": "classify"}, "'refine' or 'autopick'"),
        ({"spec": "", "ranks": 3, "n_devices": 1, "workers_on_host": {1: 2}}, "ranks \\[2\\]"),
        ({"spec": "", "ranks": 3, "n_devices": 1, "workers_on_host": 0}, "at least 1"),
        ({"spec": "", "ranks": 3, "n_devices": 1, "hosts": {1: "a"}}, "ranks \\[2\\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        resolve_device_map(**kwargs)


def test_workers_on_host_int():
    # two hosts with two workers each: RELION's rule uses the global rank, (rank-1) % k
    m = resolve_device_map("", 5, 1, n_devices=2, workers_on_host=2)
    assert worker_devices(m) == relion_refine_mpi_device_map(
        "", 5, 1, [2] * 5, ["x", "a", "a", "b", "b"]) == {1: [0], 2: [1], 3: [0], 4: [1]}


def test_devices_of_unknown_rank():
    m = resolve_device_map("", 2, n_devices=1)
    with pytest.raises(KeyError, match="no rank 5"):
        m.devices_of(5)


# --------------------------------------------------------------------------------------------
# output: JSON and table
# --------------------------------------------------------------------------------------------
def test_json_round_trip():
    m = resolve_device_map("0,1:2,3", 3, 2, n_devices=4)
    d = m.to_json_dict()
    assert d == {"0": [], "1": [0, 1], "2": [2, 3]}
    assert json.loads(json.dumps(d)) == d
    autopick = resolve_device_map("0,1:2,3", 3, 2, n_devices=4, job="autopick")
    assert autopick.to_json_dict() == {"0": [0], "1": [2], "2": [0]}


def test_table_shows_sharing():
    m = resolve_device_map("2,2,3:2", 3, 3, n_devices=4)
    table = m.format_table()
    lines = table.splitlines()
    assert lines[0].startswith("--gpu '2,2,3:2' (as given): refine (leader/worker), 3 ranks x")
    assert lines[1].split() == ["rank", "role", "host", "thread", "device", "mode", "shared",
                                "by"]
    rows = [line.split(maxsplit=6) for line in lines[2:] if not line.startswith("warning")]
    assert rows[0][:2] == ["0", "leader"]
    device2 = [r for r in rows if r[4] == "2"]
    assert len(device2) == 5
    assert all(r[6] == "2 ranks, 5 threads" for r in device2)
    (device3,) = [r for r in rows if r[4] == "3"]
    assert device3[6] == "-"
    assert lines[-1] == (
        "warning: device 2 is shared by 2 worker ranks (1, 2): each gets half of its free "
        "memory")


def test_table_uuids_names_hosts():
    m = resolve_device_map("0:0", 3, 1, n_devices=1)
    uuids = {(1, 0): "GPU-aaaa", (2, 0): "GPU-bbbb"}  # engines on different machines
    table = m.format_table(uuids=uuids, names={0: "NVIDIA H100"}, hosts={1: "n1", 2: "n2"})
    header = table.splitlines()[1]
    assert header.split()[:8] == ["rank", "role", "host", "thread", "device", "UUID", "name",
                                  "mode"]
    assert "GPU-aaaa" in table and "GPU-bbbb" in table and "NVIDIA H100" in table
    worker_rows = [line for line in table.splitlines() if line[:1].isdigit() and "worker" in line]
    assert len(worker_rows) == 2
    assert all(line.endswith("-") for line in worker_rows)  # different UUIDs: not shared
    # the index-based warning made without hosts is replaced by the UUID-based verdict
    assert m.warnings == [
        "device 0 is shared by 2 worker ranks (1, 2): each gets half of its free memory"]
    assert "warning" not in table
    same = m.format_table(uuids={0: "GPU-aaaa"})
    assert "2 ranks, 2 threads" in same
    assert same.splitlines()[-1] == (
        "warning: device 0 (GPU-aaaa) is shared by 2 worker ranks (1, 2): each gets half of "
        "its free memory")


def test_table_autopick():
    m = resolve_device_map("2:3", 3, 4, n_devices=4, job="autopick")
    table = m.format_table()
    assert "autopick (all ranks work)" in table
    rows = [line.split() for line in table.splitlines()[2:] if not line.startswith("warning")]
    assert [r[:5] for r in rows] == [["0", "worker", "-", "0-3", "2"],
                                     ["1", "worker", "-", "0-3", "3"],
                                     ["2", "worker", "-", "0-3", "2"]]
    assert rows[0][-2:] == ["2", "ranks"]


# --------------------------------------------------------------------------------------------
# module hygiene
# --------------------------------------------------------------------------------------------
def test_module_imports_only_stdlib_and_errors():
    tree = ast.parse(Path(devices_module.__file__).read_text())
    modules = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add("." * node.level + (node.module or ""))
    assert modules <= {"__future__", "operator", "os", "unicodedata", "warnings",
                       "collections.abc", "dataclasses", "typing", "..errors"}
    assert "cupy" not in Path(devices_module.__file__).read_text()


def test_all_is_explicit():
    assert sorted(devices_module.__all__) == [
        "DeviceAssignment", "DeviceMap", "GpuSpecError", "parse_gpu_spec",
        "resolve_device_map"]
    assert issubclass(GpuSpecError, ConfigError)


# --------------------------------------------------------------- pinning engines to devices
def _fake_devices(monkeypatch, n: int = 2):
    """NVML that lists ``n`` fake GPUs, and a clean pinning state for this test."""
    from cryonb.parallel import hardware

    fake = tuple({"nvml_index": i, "uuid": f"GPU-{i:08d}-fake", "name": "fake GPU",
                  "total": 80 << 30, "free": 80 << 30} for i in range(n))
    monkeypatch.setattr(hardware, "_nvml_all", lambda: fake)
    monkeypatch.setattr(hardware, "_PINNED", None)
    monkeypatch.setattr(hardware, "_ORIGINAL_VISIBLE", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return hardware


def test_a_leader_that_never_used_cuda_can_work_on_a_gpu_later(monkeypatch):
    """One cluster for a leader/worker job, then an all-ranks job: rank 0 (pinned to no
    device as the leader) gets a GPU in the second job (seen failing on the GPU machine)."""
    import sys

    hw = _fake_devices(monkeypatch)
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    assert hw.pin_devices([], leader=True) == [] and hw.os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert hw.pin_devices([1, 1]) == [0, 0]
    assert hw.os.environ["CUDA_VISIBLE_DEVICES"] == "1"


def test_a_process_that_used_cuda_cannot_switch_devices(monkeypatch):
    import sys
    import types

    from cryonb.errors import ResourceError

    hw = _fake_devices(monkeypatch)
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    assert hw.pin_devices([0]) == [0]
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))  # CUDA in use now
    assert hw.pin_devices([0, 0]) == [0, 0]  # the same device: fine
    with pytest.raises(ResourceError, match=r"cannot switch.*restart the cluster's engines"):
        hw.pin_devices([1])


@pytest.mark.parametrize("takes", [str, bytes])
def test_gpu_utilisation_with_either_pynvml_uuid_type(monkeypatch, takes):
    """NVML's utilisation is read whether the installed pynvml takes UUIDs as str or bytes."""
    from types import SimpleNamespace

    from cryonb.parallel import hardware

    def handle(key):
        if not isinstance(key, takes):
            raise TypeError("wrong UUID type")
        return key

    fake = SimpleNamespace(nvmlDeviceGetHandleByUUID=handle,
                           nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=42))
    monkeypatch.setattr(hardware, "_nvml", lambda: fake)
    assert hardware.gpu_utilisation(["GPU-1234"]) == {"GPU-1234": 42.0}


def test_cuda_uuids_come_from_nvml_by_pci_bus(monkeypatch):
    """The UUID of a CUDA device: NVML's, found by the PCI bus id CUDA reports (CuPy cuts
    CUDA's UUID bytes at the first zero byte: seen on the GPU machine as
    ``GPU-f70d8eec-e7---``, which NVML could not find, so the device's load was missing)."""
    import sys
    import types

    from cryonb.parallel import hardware

    full = bytes.fromhex("f70d8eece7007f8a294d118eede08618")
    props = {0: {"uuid": full[:5]}, 1: {"uuid": full[:5]}, 2: {"uuid": full}}
    bus = {0: "0000:19:00.0", 1: "0000:3B:00.0", 2: "0000:5d:00.0"}
    runtime = types.SimpleNamespace(deviceGetPCIBusId=lambda d: bus[d],
                                    getDeviceProperties=lambda d: props[d])
    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    nvml = ({"nvml_index": 0, "uuid": "GPU-f70d8eec-e700-7f8a-294d-118eede08618",
             "name": "fake", "total": 1, "free": 1, "pci": "00000000:19:00.0"},)
    monkeypatch.setattr(hardware, "_nvml_all", lambda: nvml)
    got = hardware.cuda_uuids([0, 1, 2])
    assert got[0] == "GPU-f70d8eec-e700-7f8a-294d-118eede08618"  # NVML, by bus id
    assert got[1] == "?"  # not in NVML, and CUDA's bytes cut short: not made up
    assert got[2] == "GPU-f70d8eec-e700-7f8a-294d-118eede08618"  # complete bytes
    assert re.fullmatch(r"GPU-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", got[0])
