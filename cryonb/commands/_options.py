"""Command-line options generated from a job's configuration dataclass.

Every field of a :class:`cryonb.config.JobConfig` subclass carries its flag, help text, group
and choices as metadata; :func:`add_config_arguments` turns them into argparse options (one
section per group), :func:`config_from_args` builds the configuration back from the parsed
namespace, taking only the options that were given. Boolean options get ``--flag`` and
``--no_flag``; ``--gpu`` takes an optional value (RELION's ``--gpu`` alone means automatic).

RELION's own spellings of the parallel and I/O options (``--no_parallel_disc_io``,
``--preread_images``, ``--dont_combine_weights_via_disc``) are accepted as aliases,
``--pipeline_control`` is RELION's (:mod:`cryonb.commands._pipeline`), and
harmless ``relion_refine`` flags that users paste from RELION's GUI are accepted with a
warning (:data:`IGNORED_FLAGS`).
"""

from __future__ import annotations

import argparse
import typing

from ..errors import ConfigError

__all__ = ["IGNORED_FLAGS", "NOT_IMPLEMENTED", "RELION_ALIASES", "add_config_arguments",
           "config_from_args", "explain_unknown"]

_GROUP_TITLES = {
    "io": "input and output",
    "algorithm": "algorithm",
    "sampling": "sampling",
    "parallel": "ranks, threads and devices",
    "cluster": "cluster",
}

#: RELION flag -> (field, value) it sets
RELION_ALIASES = {
    "--no_parallel_disc_io": ("io_mode", "leader",
                              "the leader reads the images and sends them to the workers"),
    "--preread_images": ("io_mode", "preread", "every worker reads all images into RAM first"),
    "--dont_combine_weights_via_disc": ("combine", "network",
                                        "combine the sums through the network (the default)"),
}

#: harmless relion_refine flags: name -> (takes a value, why it is ignored)
IGNORED_FLAGS = {
    "--dont_check_norm": (False, "cryonb does not check the normalisation"),
    "--onthefly_shifts": (False, "shifts are always computed on the fly"),
    "--skip_gridding": (False, "2D classes need no gridding correction"),
    "--auto_sampling": (False, "the sampling is set by --psi_step and --offset_*"),
    "--fast_subsets": (False, "every iteration uses all particles"),
    "--keep_scratch": (False, "the scratch copy is removed at the end of the run"),
    "--reuse_scratch": (False, "the particles are copied to scratch for every run"),
    "--allow_coarser_sampling": (False, "the sampling is not coarsened"),
    "--center_classes": (False, "classes are not re-centred"),
    "--dont_center_classes": (False, "classes are not re-centred anyway"),
    "--memory_per_thread": (True, "memory is budgeted from what is free"),
    "--free_gpu_memory": (True, "GPU memory is budgeted from what is free"),
    "--angpix": (True, "the pixel size comes from the STAR file's optics group"),
    "--verb": (True, "progress is always shown"),
    "--ini_high": (True, "the initial image size follows RELION 3.1's default"),
    "--gpu_memory_per_thread": (True, "GPU memory is budgeted from what is free"),
}

#: relion_refine flags of what cryonb does not implement: name -> what to do instead (an
#: error, since each changes the result)
NOT_IMPLEMENTED = {
    "--grad": "RELION 4-5's gradient-driven (VDAM) 2D classification is not implemented: "
              "cryonb runs the expectation-maximisation algorithm (the GUI's \"Use VDAM "
              "algorithm? No\"); drop --grad, --class_inactivity_threshold and "
              "--grad_write_iter",
    "--class_inactivity_threshold": "a VDAM (--grad) option; drop it",
    "--grad_write_iter": "a VDAM (--grad) option; drop it",
    "--skip_align": "classification without alignment is not implemented",
    "--helical_outer_diameter": "helical processing is not implemented",
    "--ref": "this command takes no references (2D classification starts from random "
             "subsets of the particles)",
    "--sigma_ang": "local angular searches are not implemented in 2D",
    "--sym": "symmetry is for 3D jobs; 2D classification has none",
    # relion_autopick: cryonb picks with templates only
    "--LoG": "Laplacian-of-Gaussian picking is not implemented: cryonb autopick picks with "
             "2D references (--ref)",
    "--LoG_diam_min": "a --LoG option; cryonb autopick picks with 2D references (--ref)",
    "--LoG_diam_max": "a --LoG option; cryonb autopick picks with 2D references (--ref)",
    "--LoG_adjust_threshold": "a --LoG option; use --threshold with --ref",
    "--LoG_upper_threshold": "a --LoG option; use --threshold with --ref",
    "--highpass": "high-pass filtering of the micrographs is not implemented (--lowpass is)",
    "--write_fom_maps": "figure-of-merit maps are not written",
    "--read_fom_maps": "figure-of-merit maps are not read; every run computes them",
    "--helix": "helical picking is not implemented",
    "--amyloid": "helical (amyloid) picking is not implemented",
    "--gauss_max": "picking with a Gaussian blob is not implemented: give 2D references (--ref)",
    "--white_dust": "dust removal is not implemented: remove the outliers beforehand",
    "--black_dust": "dust removal is not implemented: remove the outliers beforehand",
}


def explain_unknown(unknown: list[str]) -> str:
    """The error for unrecognised command-line words, naming what known-but-unimplemented
    RELION flags among them do instead."""
    msg = f"unrecognised arguments: {' '.join(unknown)}"
    notes = [f"{w}: {NOT_IMPLEMENTED[w]}" for w in dict.fromkeys(unknown) if w in NOT_IMPLEMENTED]
    return msg + ("\n  " + "\n  ".join(notes) if notes else "")


class _Ignored(argparse.Action):
    """Accept a harmless flag, remember a warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        why = IGNORED_FLAGS[option_string][1]
        shown = " ".join([option_string, *(values or [])])
        namespace._warnings.append(f"{shown} is ignored: {why}")


class _Alias(argparse.Action):
    """A RELION spelling of a cryonb option."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace._aliases.append(option_string)


def _field_type(tp):
    """int / float / str for an annotation (``str | None`` -> str)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_config_arguments(parser: argparse.ArgumentParser, cls, *, relion: bool = True) -> None:
    """Add one option per CLI field of ``cls`` (defaults stay ``None`` = not given).

    Parameters
    ----------
    parser : argparse.ArgumentParser
    cls : type
        A :class:`~cryonb.config.JobConfig` subclass.
    relion : bool
        Also accept RELION's aliases and harmless flags.
    """
    hints = typing.get_type_hints(cls)
    default = cls()
    used = [f.metadata.get("group", "algorithm") for f in cls.option_fields(cli=True)]
    order = [g for g in _GROUP_TITLES if g in used] + [g for g in dict.fromkeys(used)
                                                       if g not in _GROUP_TITLES]
    groups = {g: parser.add_argument_group(_GROUP_TITLES.get(g, g)) for g in order}
    for f in cls.option_fields(cli=True):
        md = f.metadata
        grp = groups[md.get("group", "algorithm")]
        flag = md.get("flag") or f"--{f.name}"
        dflt = getattr(default, f.name)
        tp = _field_type(hints[f.name])
        # argparse formats help with %-substitution: a literal "%" must be written "%%"
        help_ = md.get("help", "").replace("%", "%%")
        if tp is bool:
            state = f"on; --no_{flag[2:]} turns it off" if dflt else "off"
            grp.add_argument(flag, dest=f.name, action="store_const", const=True, default=None,
                             help=f"{help_} (default: {state})")
            grp.add_argument("--no_" + flag[2:], dest=f.name, action="store_const", const=False,
                             default=None, help=argparse.SUPPRESS)
        elif f.name == "gpu":
            grp.add_argument(flag, dest=f.name, nargs="?", const="", default=None,
                             metavar="SPEC", help=f"{help_} (default: a GPU if one is usable)")
        else:
            shown = "" if dflt in ("", None) else f" (default: {dflt})"
            grp.add_argument(flag, dest=f.name, type=tp, default=None, choices=md.get("choices"),
                             metavar=None if md.get("choices") else f.name.upper(),
                             help=f"{help_}{shown}")
    parser.set_defaults(_warnings=[], _aliases=[])
    parser.add_argument(
        "--pipeline_control", metavar="DIR", default=None,
        help="RELION's pipeline control (as its GUI passes it): remove RELION_JOB_EXIT_* from "
             "DIR at the start, write RELION_JOB_EXIT_SUCCESS or _FAILURE there at the end, "
             "and stop cleanly, with RELION_JOB_EXIT_ABORTED, when RELION_JOB_ABORT_NOW "
             "appears there")
    if not relion:
        return
    grp = parser.add_argument_group("RELION spellings")
    for flag, (_, _, why) in RELION_ALIASES.items():
        grp.add_argument(flag, nargs=0, action=_Alias, help=why)
    own = {f.metadata.get("flag") or f"--{f.name}" for f in cls.option_fields(cli=True)}
    for flag, (value, _) in IGNORED_FLAGS.items():
        if flag not in own:  # a job that implements the flag (class2d's --angpix) keeps it
            parser.add_argument(flag, nargs=1 if value else 0, action=_Ignored,
                                help=argparse.SUPPRESS)


def config_from_args(cls, args: argparse.Namespace, **extra):
    """Build and validate ``cls`` from the options given on the command line.

    RELION aliases set their field unless the cryonb option was also given with another
    value (then :class:`~cryonb.errors.ConfigError`); ``--scratch_dir`` alone selects
    ``--io_mode scratch``. ``extra`` values are used where the option was not given.

    Returns
    -------
    (config, warnings)
        The validated configuration and the warnings about ignored flags.
    """
    values = {}
    for f in cls.option_fields(cli=True):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    for k, v in extra.items():
        values.setdefault(k, v)
    warnings = list(getattr(args, "_warnings", []))
    aliases = list(dict.fromkeys(getattr(args, "_aliases", [])))
    if "--no_parallel_disc_io" in aliases and "--preread_images" in aliases:
        warnings.append("--no_parallel_disc_io with --preread_images: the leader reads the "
                        "images (memory-mapped) and sends them; nothing is preread")
        aliases.remove("--preread_images")
    for flag in aliases:
        name, value, _ = RELION_ALIASES[flag]
        given = getattr(args, name, None)
        if given is not None and given != value:
            raise ConfigError(f"{flag} contradicts {cls.flag(name)} {given}")
        values[name] = value
    if values.get("scratch_dir") and "io_mode" not in values:
        values["io_mode"] = "scratch"
    try:
        config = cls(**values)
    except TypeError as exc:  # pragma: no cover  (fields and options come from one place)
        raise ConfigError(str(exc)) from None
    return config.validate(), warnings
