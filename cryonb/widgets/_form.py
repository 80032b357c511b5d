"""Option widgets generated from a job configuration's field metadata.

Every field of a :class:`cryonb.config.JobConfig` subclass carries its flag, help text, group
and choices (:func:`cryonb.config.option`); :class:`ConfigForm` turns them into one ipywidget
each (a check box for ``bool``, a number box for ``int``/``float``, a drop-down for fields with
choices, a text box otherwise, and :class:`GpuField` for ``--gpu``), so that the widgets, the
command line and the config file never disagree. :meth:`ConfigForm.to_config` builds the very
object the command line builds; :meth:`ConfigForm.from_config` shows one.
"""

from __future__ import annotations

import dataclasses
import html
import typing
from collections.abc import Callable, Iterable

import ipywidgets as w

from ..errors import ConfigError

__all__ = ["GROUP_TITLES", "ConfigForm", "Field", "GpuField", "error_html", "pre_html"]

#: section titles of the option groups (the CLI's ``--help`` sections)
GROUP_TITLES = {
    "io": "Input and output",
    "algorithm": "Algorithm",
    "sampling": "Sampling",
    "parallel": "Ranks, threads and devices",
    "cluster": "Cluster",
}
_DESCRIPTION_WIDTH = "150px"
_FIELD_WIDTH = "330px"
_PATH_WIDTH = "680px"
_PATH_HINTS = ("file", "folder", "rootname", "star", "references", "output", "dir")


def pre_html(text: str, css: str = "cryonb-pre", color: str | None = None, *,
             wrap: bool = False) -> str:
    """``text`` in a ``<pre>`` block (HTML-escaped, monospace so that caret lines align;
    long lines wrapped with ``wrap``, else scrolled)."""
    style = (f"margin:2px 0;font-size:12px;line-height:1.3;white-space:"
             f"{'pre-wrap' if wrap else 'pre'};overflow-x:auto;")
    if color:
        style += f"color:{color};"
    return f'<pre class="{css}" style="{style}">{html.escape(text)}</pre>'


def error_html(text: str) -> str:
    """An error message in red, in a ``<pre>`` of class ``cryonb-error``."""
    return pre_html(text, "cryonb-error", "#b00020")


def _field_type(tp) -> type:
    """``int``/``float``/``str``/``bool`` of an annotation (``str | None`` -> ``str``)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


class Field:
    """One option's widget.

    Parameters
    ----------
    f : dataclasses.Field
        The configuration field (its metadata gives flag, help and choices).
    tp : type
        ``bool``, ``int``, ``float`` or ``str``.
    value
        Initial value.

    Attributes
    ----------
    name, flag : str
    widget : ipywidgets.Widget
        What is shown (CSS class ``cryonb-field`` and ``cryonb-field-<name>``).
    """

    def __init__(self, f: dataclasses.Field, tp: type, value):
        md = f.metadata
        self.name = f.name
        self.flag = md.get("flag") or f"--{f.name}"
        self.group = md.get("group", "algorithm")
        self.help = md.get("help", "")
        self.type = tp
        style = {"description_width": _DESCRIPTION_WIDTH}
        common = {"description": self.flag, "tooltip": self.help, "style": style}
        wide = tp is str and any(h in self.help.lower() for h in _PATH_HINTS)
        layout = w.Layout(width=_PATH_WIDTH if wide else _FIELD_WIDTH)
        if md.get("choices"):
            self.widget = w.Dropdown(options=list(md["choices"]), value=value, layout=layout,
                                     **common)
        elif tp is bool:
            self.widget = w.Checkbox(value=bool(value), indent=False, layout=layout, **common)
        elif tp is int:
            self.widget = w.IntText(value=int(value), layout=layout, **common)
        elif tp is float:
            self.widget = w.FloatText(value=float(value), layout=layout, **common)
        else:
            self.widget = w.Text(value=str(value), placeholder=self.help, layout=layout,
                                 **common)
        self.widget.add_class("cryonb-field")
        self.widget.add_class(f"cryonb-field-{self.name}")

    @property
    def value(self):
        """The option's value, of the field's type."""
        return self.widget.value

    @value.setter
    def value(self, v) -> None:
        self.widget.value = v

    def observe(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever the user changes the value."""
        self.widget.observe(lambda _change: callback(), "value")

    def mark(self, invalid: bool) -> None:
        """Outline the widget in red (``invalid``) or normally."""
        (self.widget.add_class if invalid else self.widget.remove_class)("cryonb-invalid")


class GpuField(Field):
    """``--gpu``: a check box (the flag is given) and the device string, validated live.

    ``value`` is ``None`` when the box is clear (no ``--gpu``: a GPU is used if one is usable),
    else the string (``""``: automatic assignment). Typing in the text box ticks the box. The
    text box sends every keystroke (``continuous_update``); :attr:`status` shows the resolved
    device table or the error, set by the panel.

    Attributes
    ----------
    given : ipywidgets.Checkbox
        CSS class ``cryonb-gpu-given``.
    text : ipywidgets.Text
        CSS class ``cryonb-gpu-text``.
    status : ipywidgets.HTML
        CSS class ``cryonb-gpu-status``; holds a ``<pre class="cryonb-gpu-table">`` or a
        ``<pre class="cryonb-error">``.
    """

    def __init__(self, f: dataclasses.Field, tp: type, value):
        self.name, self.flag = f.name, f.metadata.get("flag") or "--gpu"
        self.group = f.metadata.get("group", "parallel")
        self.help, self.type = f.metadata.get("help", ""), str
        self.given = w.Checkbox(value=value is not None, description=self.flag, indent=False,
                                tooltip="give --gpu (clear: no flag, a GPU is used if usable)",
                                layout=w.Layout(width="80px"))
        self.text = w.Text(value=value or "", placeholder="automatic (empty)",
                           continuous_update=True, tooltip=self.help,
                           layout=w.Layout(width="250px"))
        self.given.add_class("cryonb-gpu-given")
        self.text.add_class("cryonb-gpu-text")
        self.status = w.HTML(layout=w.Layout(width="100%"))
        self.status.add_class("cryonb-gpu-status")
        self._setting = False
        self.text.observe(self._typed, "value")
        row = w.HBox([self.given, self.text, w.HTML(
            '<span style="color:#666;font-size:12px">\':\' between ranks, \',\' between '
            "threads; empty = automatic</span>")])
        self.widget = w.VBox([row, self.status])
        self.widget.add_class("cryonb-field")
        self.widget.add_class("cryonb-field-gpu")

    def _typed(self, _change) -> None:
        if not self._setting and not self.given.value:
            self.given.value = True

    @property
    def value(self) -> str | None:
        return self.text.value if self.given.value else None

    @value.setter
    def value(self, v: str | None) -> None:
        self._setting = True
        try:
            self.text.value = v or ""
            self.given.value = v is not None
        finally:
            self._setting = False

    def observe(self, callback: Callable[[], None]) -> None:
        self.text.observe(lambda _change: callback(), "value")
        self.given.observe(lambda _change: callback(), "value")

    def mark(self, invalid: bool) -> None:
        (self.text.add_class if invalid else self.text.remove_class)("cryonb-invalid")


class ConfigForm:
    """Widgets for every widget-exposed field of a configuration class.

    Parameters
    ----------
    config_cls : type
        A :class:`~cryonb.config.JobConfig` subclass.
    config : JobConfig, optional
        Initial values (default: the class's defaults).
    hidden : iterable of str
        Fields not shown (they keep the value of ``config``).

    Attributes
    ----------
    fields : dict of str to Field
        In the class's field order.
    """

    def __init__(self, config_cls, config=None, *, hidden: Iterable[str] = ()):
        self.cls = config_cls
        self._base = config if config is not None else config_cls()
        hints = typing.get_type_hints(config_cls)
        self.hidden = set(hidden)
        self.fields: dict[str, Field] = {}
        for f in config_cls.option_fields(widget=True):
            if f.name in self.hidden:
                continue
            make = GpuField if f.name == "gpu" else Field
            self.fields[f.name] = make(f, _field_type(hints[f.name]), getattr(self._base, f.name))

    def __getitem__(self, name: str) -> Field:
        return self.fields[name]

    def values(self) -> dict:
        """Every field's value (hidden ones from the initial configuration)."""
        out = {f.name: getattr(self._base, f.name) for f in dataclasses.fields(self.cls)}
        out.update({name: fld.value for name, fld in self.fields.items()})
        return out

    def to_config(self):
        """The configuration shown, validated.

        Raises
        ------
        ConfigError
            Naming the flag at fault.
        """
        try:
            cfg = self.cls(**self.values())
        except TypeError as exc:  # pragma: no cover  (fields come from the class itself)
            raise ConfigError(str(exc)) from None
        return cfg.validate()

    def set_values(self, config) -> None:
        """Show ``config`` (an instance of the form's class)."""
        if not isinstance(config, self.cls):
            raise TypeError(f"expected a {self.cls.__name__}, not {type(config).__name__}")
        self._base = config
        for name, fld in self.fields.items():
            fld.value = getattr(config, name)

    def observe(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after any field changes."""
        for fld in self.fields.values():
            fld.observe(callback)

    def mark_invalid(self, message: str) -> None:
        """Outline the fields whose flag ``message`` names (the rest normally)."""
        for fld in self.fields.values():
            fld.mark(_names(message, fld.flag))

    def section(self, names: Iterable[str]) -> w.Box:
        """The widgets of ``names`` (those shown), wrapped to the panel's width."""
        kids = [self.fields[n].widget for n in names if n in self.fields]
        return w.Box(kids, layout=w.Layout(display="flex", flex_flow="row wrap",
                                           align_items="flex-start", width="100%"))


def _names(message: str, flag: str) -> bool:
    """Whether ``message`` names ``flag`` as a whole word (``--K`` is not ``--K2``)."""
    i = message.find(flag)
    while i >= 0:
        end = i + len(flag)
        if end == len(message) or not (message[end].isalnum() or message[end] == "_"):
            return True
        i = message.find(flag, end)
    return False
