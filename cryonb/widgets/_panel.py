"""Job panels: options from the configuration's metadata, live checks, Run/Stop/Continue,
progress and live views.

One :class:`JobPanel` serves every job: its options come from the configuration class's
field metadata (:class:`~cryonb.widgets._form.ConfigForm`), and what differs between jobs
(how to run, continue and size them, which views) from its :class:`~cryonb.widgets._jobs.JobKind`.
:class:`Class2DPanel` and :class:`AutopickPanel` are the panels of the two jobs.
"""

from __future__ import annotations

import functools
import html
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import ipywidgets as w

from ..errors import ConfigError, CryonbError
from ._checks import DeviceReport, device_report
from ._form import GROUP_TITLES, ConfigForm, GpuField, error_html, pre_html
from ._jobs import JobKind, kind_for
from ._progress import ProgressView
from ._run import RunHandle

if TYPE_CHECKING:
    from ..viz import LiveClassGrid, LiveConvergence, LoadDashboard, LoadMonitor

__all__ = ["AutopickPanel", "Class2DPanel", "JobPanel", "in_kernel"]

_MIB = 2.0**20
_PARALLEL = ("ranks", "j", "pool", "cpu", "combine", "engines")
_IO = ("io_mode", "scratch_dir", "keep_free_scratch")
_VIEW_TITLES = {"classes": "Class averages (tap a class to see it large)",
                "convergence": "Convergence", "load": "Load of every device and rank",
                "devices": "Which rank runs on which device"}
_LEVEL_COLORS = {"info": "#333", "warning": "#b35900", "error": "#b00020"}
_STYLE = """<style>
.cryonb-invalid input, .cryonb-invalid select, input.cryonb-invalid {
  border: 1px solid #b00020 !important; background: #fff4f4 !important; }
.cryonb-panel .widget-html-content pre { margin: 2px 0; }
</style>"""


def in_kernel() -> bool:
    """Whether this code runs in a Jupyter kernel (where widgets and views can be shown)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def _heading(text: str) -> w.HTML:
    return w.HTML(f'<div style="font-weight:bold;margin-top:6px">{html.escape(text)}</div>')


class JobPanel:
    """A notebook panel for one job: options, checks, command lines, Run/Stop/Continue,
    progress and live views.

    Parameters
    ----------
    config_cls : type
        A :class:`~cryonb.config.JobConfig` subclass (``Class2DConfig``, ``AutopickConfig``,
        or any other: then options and command lines only).
    config : JobConfig, optional
        Initial options (default: the class's defaults).
    devices : int or list of dict, optional
        Visible GPUs for the ``--gpu`` check (default: found with NVML; an ``int`` stands for
        that many devices, e.g. to plan for another machine).
    views : bool or "auto"
        Build the live views (holoviews): ``"auto"`` in a Jupyter kernel only. Without views
        the panel still runs jobs, shows progress and collects load samples.
    client : ipyparallel.Client, Cluster or ClusterHandle, optional
        Engines to run on (see :func:`cryonb.parallel.run_class2d`).
    mode : {"auto", "asyncio", "thread"}
        Where progress events are handled (see :class:`RunHandle`); ``auto``: on the
        kernel's event loop in a notebook, else in a thread.
    view_every : float
        Seconds between refreshes of the class and convergence views (iterations faster
        than that are shown together; the last one always is).
    monitor_interval : float
        Seconds between load samples (GPUs, host, processes) while a job runs.
    **options
        Option values, overriding ``config``'s (``i=..., K=...``).

    Attributes
    ----------
    form : ConfigForm
        One widget per option (``panel.form["K"].value = 20``).
    kind : JobKind
    progress : ProgressView
    run_button, stop_button, continue_button : ipywidgets.Button
        CSS classes ``cryonb-run-button``, ``cryonb-stop-button``, ``cryonb-continue-button``.
    more : ipywidgets.IntText
        Iterations Continue adds to a run that had finished.
    status, io_status, command, relion_command : ipywidgets.HTML
        CSS classes ``cryonb-status``, ``cryonb-io-status``, ``cryonb-command``,
        ``cryonb-relion-command``.
    device_report : DeviceReport
        The last ``--gpu`` check.
    handle : RunHandle or None
        The current (or last) run.
    result, error
        Of the last run.
    notice : str
        A warning about the last run's start, shown under the status (Continue: the options
        set in the form that the continued run does not take); empty for a new run.
    monitor : cryonb.viz.LoadMonitor or None
        Load samples of the runs (created at the first run).
    grid, convergence, dashboard
        The live views (``None`` without views or when the job has none).
    widget : ipywidgets.VBox
        Everything (CSS class ``cryonb-panel``); the panel displays as this.

    Notes
    -----
    Run, Stop and Continue are the buttons' callbacks; :meth:`run`, :meth:`stop` and
    :meth:`continue_run` do the same from code (``panel.run_button.click()`` too). Errors of
    the options, the inputs or the run are shown in the panel, never as tracebacks.
    """

    def __init__(self, config_cls, config=None, *, devices=None, views: bool | str = "auto",
                 client=None, mode: str = "auto", view_every: float = 1.0,
                 monitor_interval: float = 0.5, **options):
        self.kind: JobKind = kind_for(config_cls)
        if config is None:
            config = config_cls(**options)
        elif options:
            config = config.replace(**options)
        self.config_cls = config_cls
        self.form = ConfigForm(config_cls, config, hidden=self.kind.hidden)
        self.client = client
        self.mode = mode
        self.view_every = float(view_every)
        self.monitor_interval = float(monitor_interval)
        self._devices = devices
        self._views_wanted = in_kernel() if views == "auto" else bool(views)
        self._show = in_kernel()
        self._lock = threading.RLock()
        self._updating = False
        self.handle: RunHandle | None = None
        self._active = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.errors: dict[str, str] = {}
        self.notice = ""
        self.device_report: DeviceReport | None = None
        self._cfg = None  # the last valid configuration shown (None: invalid)
        self.monitor: LoadMonitor | None = None
        self.grid: LiveClassGrid | None = None
        self.convergence: LiveConvergence | None = None
        self.dashboard: LoadDashboard | None = None
        self._outputs: dict[str, w.Output] = {}
        self._shown: set[str] = set()
        self._views_built = False
        self._layout_key: object = None
        self._pending: dict | None = None
        self._pending_history: list[dict] = []
        self._next_view = 0.0
        self._last_report: dict[int, float] = {}
        self._build()
        self.form.observe(self.refresh)
        self.refresh()
        if self._views_wanted and self._show:
            self._ensure_views()

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        kind, fields = self.kind, self.form.fields
        main = [n for n in kind.main if n in fields] or [
            n for n, f in fields.items() if f.group in ("io", "algorithm")
            and n not in (*_PARALLEL, *_IO, "gpu")]
        placed = {*main, *_PARALLEL, *_IO, "gpu"}
        rest: dict[str, list[str]] = {}
        for n, f in fields.items():
            if n not in placed:
                rest.setdefault(f.group, []).append(n)
        self.status = self._html("cryonb-status")
        self.io_status = self._html("cryonb-io-status")
        self.command = self._html("cryonb-command")
        self.relion_command = self._html("cryonb-relion-command")
        self.run_button = self._button("Run", "success", "play", "cryonb-run-button", self._run)
        self.stop_button = self._button("Stop", "danger", "stop", "cryonb-stop-button",
                                        self._stop)
        self.continue_button = self._button("Continue", "info", "forward",
                                            "cryonb-continue-button", self._continue)
        self.more = w.IntText(value=5, description="then more iterations",
                              tooltip="iterations Continue adds to a run that had finished",
                              style={"description_width": "140px"},
                              layout=w.Layout(width="210px"))
        self.more.add_class("cryonb-more")
        self.progress = ProgressView(kind.unit)
        more = w.Accordion([w.VBox([box for g, names in rest.items() for box in
                                    (_heading(GROUP_TITLES.get(g, g)), self.form.section(names))])])
        more.set_title(0, "More options")
        more.selected_index = None
        parallel = [self.form.section(_PARALLEL)]
        if "gpu" in fields:
            parallel.append(fields["gpu"].widget)
        sections = [
            w.HTML(_STYLE + f'<h3 style="margin:4px 0">{html.escape(kind.title)}</h3>'),
            self.form.section(main),
            _heading(GROUP_TITLES["parallel"]), *parallel,
        ]
        if any(n in fields for n in _IO):
            sections += [_heading("Reading the particles"), self.form.section(_IO),
                         self.io_status]
        elif kind.can_run:
            sections.append(self.io_status)
        if rest:
            sections.append(more)
        buttons = [self.run_button, self.stop_button, self.continue_button]
        if kind.device_job == "refine":
            buttons.append(self.more)
        sections += [self.status, _heading("Equivalent commands"), self.command,
                     self.relion_command, w.HBox(buttons), self.progress.widget]
        for name in kind.views:
            out = w.Output(layout=w.Layout(width="100%"))
            out.add_class("cryonb-view")
            out.add_class(f"cryonb-view-{name}")
            self._outputs[name] = out
            sections += [_heading(_VIEW_TITLES[name]), out]
        self.widget = w.VBox(sections, layout=w.Layout(width="100%"))
        self.widget.add_class("cryonb-panel")

    @staticmethod
    def _html(css: str) -> w.HTML:
        out = w.HTML(layout=w.Layout(width="100%"))
        out.add_class(css)
        return out

    def _button(self, text: str, style: str, icon: str, css: str, callback) -> w.Button:
        b = w.Button(description=text, button_style=style, icon=icon,
                     layout=w.Layout(width="120px"))
        b.add_class(css)
        b.on_click(lambda _b: self._safely(callback))
        return b

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------------ configuration
    @property
    def config(self):
        """The configuration shown: the same object the command line builds (validated).

        Raises
        ------
        ConfigError
            The options are invalid (the message names the flag).
        """
        return self.to_config()

    def to_config(self):
        """The configuration shown (see :attr:`config`)."""
        return self.form.to_config()

    def from_config(self, config) -> JobPanel:
        """Show ``config`` (an instance of the panel's class); returns the panel."""
        with self._lock:
            self._updating = True
            try:
                self.form.set_values(config)
            finally:
                self._updating = False
        self.refresh()
        return self

    @property
    def valid(self) -> bool:
        """Whether the options, the ``--gpu`` string and the inputs check out."""
        return not self.errors

    # ------------------------------------------------------------------ live checks
    def refresh(self) -> None:
        """Check everything again and update the tables, command lines and buttons."""
        if self._updating:
            return
        with self._lock:
            values = self.form.values()
            errors: dict[str, str] = {}
            report = device_report(values.get("gpu"), values["ranks"], values["j"],
                                   cpu=bool(values.get("cpu")), job=self.kind.device_job,
                                   devices=self._devices)
            self.device_report = report
            gpu = self.form.fields.get("gpu")
            if isinstance(gpu, GpuField):
                gpu.status.value = (pre_html(report.text, "cryonb-gpu-table") if report.ok
                                    else error_html(report.text))
                if not report.ok:
                    errors["gpu"] = report.text.splitlines()[0]
            cfg = None
            try:
                cfg = self.form.to_config()
            except ConfigError as exc:
                errors["options"] = str(exc)
            self.form.mark_invalid(errors.get("options", ""))
            if "gpu" in errors:
                self.form.fields["gpu"].mark(True)
            self._show_commands(cfg, values)
            lines = []
            dmap = report.device_map
            if cfg is not None and dmap is not None:
                uses_gpu = any(a.devices for a in dmap.assignments)
                lines = self.kind.resource_lines(cfg, gpu=uses_gpu)
            self.io_status.value = "".join(
                f'<div class="cryonb-io-{level}" style="color:{_LEVEL_COLORS[level]}">'
                f"{html.escape(text)}</div>" for level, text in lines)
            bad = [text for level, text in lines if level == "error"]
            if bad:
                errors["inputs"] = bad[0]
            self.errors = errors
            self._cfg = cfg
            self._show_status()
            self._update_buttons()
            if self._views_built and dmap is not None and not self.running:
                self._show_layout(dmap.to_json_dict())

    def _show_commands(self, cfg, values: dict) -> None:
        shown = cfg
        if shown is None:
            try:
                shown = self.config_cls(**values)
            except Exception:  # (values of the wrong type: nothing to show)
                shown = None
        stale = "" if cfg is not None else "  # (not valid yet: fix the options above)"
        for target, fn, css in ((self.command, "command_line", "cryonb-command-line"),
                                (self.relion_command, "relion_command_line",
                                 "cryonb-relion-command-line")):
            try:
                text = getattr(shown, fn)() + stale if shown is not None else stale.strip()
            except Exception as exc:
                text = f"# {exc}"
            target.value = pre_html(text, css, None if cfg is not None else "#888", wrap=True)

    def _show_status(self, extra: str = "") -> None:
        if self.errors:
            body = "".join(error_html(f"{name}: {msg}" if name != "gpu" else msg)
                           for name, msg in self.errors.items())
        elif not self.kind.can_run:
            body = ('<span style="color:#666">options and command lines only: run it with '
                    f"<code>{html.escape(self.config_cls.PROGRAM)}</code></span>")
        else:
            body = '<span class="cryonb-ready" style="color:#1b7f3b">ready</span>'
        if self.notice:
            body += (f'<div class="cryonb-notice" style="color:{_LEVEL_COLORS["warning"]}">'
                     f"warning: {html.escape(self.notice)}</div>")
        self.status.value = body + extra

    def _update_buttons(self) -> None:
        running = self.running
        cfg = self._cfg
        self.run_button.disabled = running or not self.valid or not self.kind.can_run
        self.stop_button.disabled = not running or not self.kind.can_stop
        self.continue_button.disabled = (running or not self.kind.can_run or cfg is None
                                         or "gpu" in self.errors
                                         or not self.kind.can_continue(cfg))

    # ------------------------------------------------------------------ run, stop, continue
    @property
    def running(self) -> bool:
        """Whether a run started here is going on."""
        return self._active

    def _safely(self, fn) -> None:
        """Run a button's action; show its error in the panel instead of a traceback."""
        try:
            fn()
        except Exception as exc:  # (shown to the user, kept on the panel)
            self.error = exc
            self._show_status(error_html(f"{type(exc).__name__}: {exc}"))

    def _run(self) -> None:
        self.run()

    def _stop(self) -> None:
        self.stop()

    def _continue(self) -> None:
        self.continue_run()

    def run(self) -> RunHandle:
        """Start a run with the options shown (what the Run button does).

        Returns
        -------
        RunHandle
            ``handle.wait()`` (scripts) or ``await handle.task`` (notebooks).

        Raises
        ------
        ConfigError
            Invalid options, ``--gpu`` string or inputs.
        RuntimeError
            A run is going on.
        """
        self.refresh()
        cfg = self.form.to_config()
        if self.errors:
            raise ConfigError("; ".join(self.errors.values()))
        return self._start(cfg)

    def stop(self) -> None:
        """Stop the run after the work in progress (what the Stop button does)."""
        if self.running and self.handle is not None:
            self.handle.stop()
            self.progress.state.status = "stopping"
            self.progress.render()
            self.stop_button.disabled = True

    def continue_run(self, more: int | None = None) -> RunHandle:
        """Continue the last run (what the Continue button does).

        2D classification continues from the last ``<o>_it###_optimiser.star`` on disc, up to
        ``--iter`` when it stopped before, else for ``more`` (default: :attr:`more`) further
        iterations; the panel then shows the continued configuration (``--continue ...``).
        Autopicking picks the micrographs without coordinates (``--only_do_unfinished``).

        Returns
        -------
        RunHandle
        """
        if self.running:
            raise RuntimeError("a run is going on: stop it first")
        cfg = self.form.to_config()
        new = self.kind.continue_config(cfg, self.more.value if more is None else more)
        # options set in the form that the continued run does not take (the form then shows
        # the run's values): said in the status line, as the command line's warning
        note = self.kind.continue_note(cfg, new)
        self.from_config(new)
        if self.errors:
            raise ConfigError("; ".join(self.errors.values()))
        return self._start(new, notice=note or "")

    def wait(self, timeout: float | None = None):
        """Wait for the current run to end (scripts and tests; see :meth:`RunHandle.wait`)."""
        if self.handle is None:
            raise RuntimeError("nothing was run")
        return self.handle.wait(timeout)

    def _start(self, cfg, notice: str = "") -> RunHandle:
        if self.running:
            raise RuntimeError("a run is going on: stop it first")
        self.result = self.error = None
        self.notice = notice
        self._ensure_views()
        if self.convergence is not None and len(self.convergence.data) and not getattr(
                cfg, "continue_from", ""):  # a new run: its own convergence plots
            from ..viz import LiveConvergence

            self.convergence = LiveConvergence()
            self._placeholder("convergence", "the convergence plots appear after the first "
                                             "iteration")
        self._start_monitor()
        self._pending, self._pending_history = None, []
        self.progress.start()
        self._active = True
        run = functools.partial(self.kind.run, client=self.client)
        run_async = functools.partial(self.kind.run_async, client=self.client)
        try:
            self.handle = RunHandle(run, run_async, cfg, on_event=self._on_event,
                                    on_tick=self._on_tick, on_end=self._on_end, mode=self.mode)
        except BaseException:
            self._active = False
            if self.monitor is not None:
                self.monitor.stop()
            raise
        self._show_status()
        self._update_buttons()
        return self.handle

    # ------------------------------------------------------------------ events
    def _on_event(self, ev: dict) -> None:
        with self._lock:
            kind = ev.get("event")
            if kind == "done":  # the last views first: "stopped"/"finished" comes after them
                self._flush_views(force=True)
            self.progress.handle(ev)
            if kind == "setup":
                self._on_setup(ev)
            elif kind in ("pool", "heartbeat"):
                self._report_load(ev)
            elif kind == "iteration":
                self._pending = ev
                hist = ev.get("history") or {}
                if ev.get("iteration", 0) > 0 and "log_likelihood" in hist:
                    self._pending_history.append(hist)
                self._flush_views(force=False)

    def _on_tick(self) -> None:
        with self._lock:
            self.progress.render()
            self._flush_views(force=False)

    def _on_end(self, result, error) -> None:
        with self._lock:
            self._active = False
            self.result, self.error = result, error
            if error is not None:
                self.progress.fail(f"{type(error).__name__}: {error}" if not isinstance(
                    error, CryonbError) else str(error))
            elif self.progress.state.status in ("running", "starting", "stopping"):
                self.progress.state.status = "finished"
            self.progress.render()
            self._flush_views(force=True)
            if self.monitor is not None:
                self.monitor.stop()
            self.refresh()

    def _on_setup(self, ev: dict) -> None:
        here = socket.gethostname()
        for r in ev.get("ranks", []):
            if self.monitor is not None and r.get("host") == here and r.get("pid"):
                if r["pid"] != os.getpid():
                    self.monitor.add_process(int(r["pid"]), int(r["rank"]))
        if self._views_built:
            self._show_layout({str(r["rank"]): list(r.get("devices", []))
                               for r in ev.get("ranks", [])})

    def _report_load(self, ev: dict) -> None:
        """Per-rank figures into the load monitor (pool events at most twice a second)."""
        if self.monitor is None:
            return
        rank = int(ev["rank"])
        now = time.monotonic()
        heartbeat = ev["event"] == "heartbeat"
        if not heartbeat and now - self._last_report.get(rank, 0.0) < 0.5:
            return
        self._last_report[rank] = now
        r = self.progress.state.ranks.get(rank, {})
        figures: dict[str, Any] = {}
        if heartbeat:
            mem = ev.get("memory") or {}
            if mem.get("rss"):
                figures["rss_mib"] = mem["rss"] / _MIB
            if mem.get("devices"):
                figures["gpu_mem_mib"] = sum(mem["devices"].values()) / _MIB
            figures["busy_threads"] = len(ev.get("busy", []))
        uuids = r.get("uuids") or []
        device = uuids[0] if uuids else (r.get("devices") or [None])[0]
        if heartbeat and uuids:
            util = self._gpu_util(set(uuids))
            if util is not None:
                figures["gpu_util"] = util
        if "picks" in ev:  # autopicking: particles found per second, micrographs per second
            figures["micrographs_per_s"] = float(r.get("rate", 0.0))
        rate = r.get("picks_rate", r.get("rate", 0.0))
        self.monitor.report(rank, stage=r.get("stage") or None, particles_per_s=float(rate),
                            device=device, **figures)

    def _gpu_util(self, uuids: set) -> float | None:
        if self.monitor is None:
            return None
        latest = self.monitor.latest()
        gpus = latest[(latest["kind"] == "gpu") & latest["uuid"].isin(uuids)]
        return float(gpus["gpu_util"].mean()) if len(gpus) else None

    # ------------------------------------------------------------------ views
    def _start_monitor(self) -> None:
        from ..viz import LoadMonitor

        if self.monitor is None:
            self.monitor = LoadMonitor(self.monitor_interval)
        monitor = self.monitor
        monitor.start()
        if self.dashboard is not None:
            self.dashboard.start()

    def _ensure_views(self) -> None:
        """Build the live views (once) and show them in the panel (in a kernel)."""
        if self._views_built or not self._views_wanted:
            return
        from .. import viz

        viz.ensure_extension()
        views = self.kind.views
        if "convergence" in views:
            self.convergence = viz.LiveConvergence()
        if "load" in views:
            monitor = self.monitor or viz.LoadMonitor(self.monitor_interval)
            self.monitor = monitor
            dashboard = viz.LoadDashboard(monitor, every=1.0)
            dashboard.refresh()
            self.dashboard = dashboard
        self._views_built = True
        # the class grid and the convergence plots are shown with the first iteration's data
        # (their sizes and ranges are fixed when first drawn)
        for name, what in (("classes", "class averages"), ("convergence", "convergence plots")):
            if name in views:
                self._placeholder(name, f"the {what} appear after the first iteration")
        if self.dashboard is not None:
            self._display("load", self.dashboard.view())
        report = self.device_report
        if report is not None and report.device_map is not None:
            self._show_layout(report.device_map.to_json_dict())

    def _display(self, name: str, obj) -> None:
        """Show ``obj`` in the view ``name`` (replacing what was there), in a kernel."""
        out = self._outputs.get(name)
        if out is None or not self._show:
            return
        out.outputs = ()
        out.append_display_data(obj)
        self._shown.add(name)

    def _placeholder(self, name: str, text: str) -> None:
        """A grey line in the view ``name`` until it has something to show."""
        from IPython.display import HTML

        self._display(name, HTML(f'<span style="color:#666">{html.escape(text)}</span>'))
        self._shown.discard(name)

    def _show_layout(self, mapping: dict) -> None:
        if "devices" not in self._outputs or mapping == self._layout_key:
            return
        from ..viz import device_layout

        self._layout_key = mapping
        self._display("devices", device_layout(mapping))

    def _flush_views(self, force: bool) -> None:
        """Show the last iteration received.

        Unless forced, at most every ``view_every`` seconds, and never more than a quarter of
        the time: a refresh that took ``t`` seconds makes the next wait at least ``3 t`` (on a
        busy machine re-rendering the views must not starve the kernel's event loop).
        """
        ev = self._pending
        if ev is None or (not force and time.monotonic() < self._next_view):
            return
        t0 = time.monotonic()
        self._pending = None
        try:
            self._show_iteration(ev)
        finally:
            cost = time.monotonic() - t0
            self._next_view = time.monotonic() + max(self.view_every - cost, 3.0 * cost)

    def _show_iteration(self, ev: dict) -> None:
        summary = ev.get("summary") or {}
        classes = summary.get("classes")
        if self._views_built and "classes" in self.kind.views and classes is not None:
            data = (ev.get("files") or {}).get("data")
            small = self.progress.state.total <= 50_000
            pdf, it = summary.get("pdf_class"), ev.get("iteration")
            particles = data if data and small and os.path.exists(data) else None
            if self.grid is None or self.grid.data.images.shape != classes.shape:
                from ..viz import LiveClassGrid

                self.grid = grid = LiveClassGrid(classes, pdf, iteration=it, particles=particles)
                self._display("classes", grid.view())
            else:
                self.grid.update(classes, pdf, iteration=it, particles=particles)
        if self.convergence is not None and self._pending_history:
            rows, self._pending_history = self._pending_history, []
            self.convergence.extend(rows)
            if "convergence" not in self._shown:
                self._display("convergence", self.convergence.view())


class Class2DPanel(JobPanel):
    """The 2D classification panel (:class:`cryonb.em.Class2DConfig`).

    Parameters
    ----------
    config : Class2DConfig, optional
    **kwargs
        Options (``i=..., o=..., K=...``) and the keywords of :class:`JobPanel`.

    Examples
    --------
    >>> panel = Class2DPanel(i="data/particles.star", o="Class2D/run", K=6)  # doctest: +SKIP
    >>> panel                                   # shows it in a notebook  # doctest: +SKIP
    >>> panel.config.command_line()                                       # doctest: +SKIP
    'cryonb class2d --i data/particles.star --o Class2D/run --K 6'
    """

    def __init__(self, config=None, **kwargs):
        from ..em._config import Class2DConfig

        super().__init__(Class2DConfig, config, **kwargs)


class AutopickPanel(JobPanel):
    """The template autopicking panel (:class:`cryonb.pick.AutopickConfig`).

    :meth:`explorer` gives the interactive picker of one micrograph, whose threshold and
    minimum distance go back into this panel.

    Parameters
    ----------
    config : AutopickConfig, optional
    **kwargs
        Options (``i=..., ref=..., threshold=...``) and the keywords of :class:`JobPanel`.
    """

    def __init__(self, config=None, **kwargs):
        from ..pick import AutopickConfig

        super().__init__(AutopickConfig, config, **kwargs)

    def explorer(self, micrograph: int = 0, **kwargs):
        """A :class:`~cryonb.widgets.PickExplorer` on the options shown, linked to this panel.

        Its "Use these values" button writes the threshold and minimum distance here.
        """
        from ._picking import PickExplorer

        return PickExplorer(self.config, micrograph, panel=self, **kwargs)
