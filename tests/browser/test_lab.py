"""The 2D classification panel in a real JupyterLab, driven by headless Chromium (Playwright).

Starts JupyterLab on 127.0.0.1 (free port, token) in a temporary folder holding a small
simulated particle set and a generated notebook, opens the notebook, runs all cells, and then
checks through the page what a user would see: a bad ``--gpu`` string shows its error (with
the caret line) inline and disables Run; a good one shows the device table; Run makes the
progress advance and the class-average grid and the load dashboard render (bokeh canvases);
Stop ends the run ("stopped"); Continue resumes from the last iteration and advances past it.
A screenshot is saved in the test's temporary folder. Any step that does not happen fails
the test (skipped on a laptop without Chromium/Playwright, failed in CI).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from cryonb.testing.tools import require_module, require_tool

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
STEP_S = 90_000  # ms a single step may take (kernel start + imports is the slowest)
WARM_UP = "import holoviews, bokeh, panel, cryonb.widgets._panel, cryonb.viz._dashboard"

PANEL_CELL = """\
from cryonb.widgets import Class2DPanel

panel = Class2DPanel(i="data/particles.star", o="Class2D/run", K=3, iter=200, psi_step=20.0,
                     offset_range=2.0, pool=25, cpu=True, random_seed=1)
panel"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, token: str, path: str, method: str = "GET", body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}{path}", method=method, data=data,
                                 headers={"Authorization": f"token {token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
    return json.loads(body) if body else None


def _make_root(root: Path) -> None:
    """The simulated particle set and the notebook."""
    import nbformat

    from cryonb.simulate import simulate_particles, write_particle_set

    sim = simulate_particles(n=240, box=32, n_views=3, snr=0.1, seed=3)
    write_particle_set(sim, root / "data")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("import cryonb.viz as cv\n\ncv.ensure_extension()"),
                nbformat.v4.new_code_cell(PANEL_CELL)]
    nbformat.write(nb, root / "panel.ipynb")


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a free port: yields (url, token, root); stops it after."""
    require_tool("chromium")
    require_module("playwright.sync_api")
    require_module("jupyterlab")
    root = tmp_path / "root"
    root.mkdir()
    _make_root(root)
    port, token = _free_port(), secrets.token_hex(16)
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # no "get notified about news?" toast over the page
    (settings / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false", "checkForUpdates": false}')
    env = {**os.environ, "CRYONB_BACKEND": "cpu", "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "IPYTHONDIR": str(tmp_path / "ipy"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    log = open(tmp_path / "lab.log", "wb")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _api(url, token, "/api/status")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("JupyterLab did not start:\n"
                                + (tmp_path / "lab.log").read_text(errors="replace")[-3000:])
                time.sleep(0.3)
        for s in _api(url, token, "/api/sessions"):  # a reattached kernel skips BokehJS
            _api(url, token, f"/api/sessions/{s['id']}", "DELETE")
        warm = _warm_kernel(url, token, tmp_path / "rt")
        yield url, token, root
        warm.join(5)
    finally:
        try:
            for s in _api(url, token, "/api/sessions"):
                _api(url, token, f"/api/sessions/{s['id']}", "DELETE")
        except OSError:
            pass
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


def _warm_kernel(url: str, token: str, runtime: Path) -> threading.Thread:
    """Start the notebook's kernel now and import the heavy modules in it, in a thread, while
    Chromium and JupyterLab load (the page then attaches to this fresh session). Nothing is
    displayed and no extension is loaded: the notebook's cells still do all of that. Best
    effort: without it the test is only slower."""

    def warm() -> None:
        try:
            from jupyter_client import BlockingKernelClient

            s = _api(url, token, "/api/sessions", "POST",
                     {"path": "panel.ipynb", "name": "panel.ipynb", "type": "notebook",
                      "kernel": {"name": "python3"}})
            conn = runtime / f"kernel-{s['kernel']['id']}.json"
            deadline = time.monotonic() + 30
            while not conn.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            client = BlockingKernelClient(connection_file=str(conn))
            client.load_connection_file()
            client.start_channels(hb=False)
            try:
                msg_id = client.execute(WARM_UP, silent=True)
                while True:  # until the imports are done (the page may start meanwhile)
                    reply = client.get_shell_msg(timeout=120)
                    if reply["parent_header"].get("msg_id") == msg_id:
                        break
            finally:
                client.stop_channels()
        except Exception as exc:
            print(f"kernel warm-up skipped: {type(exc).__name__}: {exc}")

    thread = threading.Thread(target=warm, name="kernel-warm-up", daemon=True)
    thread.start()
    return thread


def _progress(page) -> dict:
    """The progress line's data attributes (status, iteration, completed, done, total)."""
    return page.evaluate("""() => {
        const s = document.querySelector('.cryonb-progress-text span[data-status]');
        if (!s) return null;
        const d = s.dataset;
        return {status: d.status, iteration: +d.iteration, completed: +d.completed,
                done: +d.done, total: +d.total, text: s.textContent};
    }""")


def _wait_progress(page, test: str, what: str, timeout: float = STEP_S) -> dict:
    """Wait until the JS expression ``test`` (on ``p``, the progress data) is true."""
    try:
        page.wait_for_function(f"""() => {{
            const s = document.querySelector('.cryonb-progress-text span[data-status]');
            if (!s) return false;
            const d = s.dataset;
            const p = {{status: d.status, iteration: +d.iteration, completed: +d.completed,
                       done: +d.done, total: +d.total}};
            return {test};
        }}""", timeout=timeout)
    except Exception:
        pytest.fail(f"{what} did not happen; progress: {_progress(page)}; panel status: "
                    f"{page.locator('.cryonb-status').inner_text()}")
    return _progress(page)


def test_panel_in_jupyterlab(lab, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, token, _ = lab
    t0 = time.monotonic()
    marks: list[tuple[str, float]] = []

    def mark(step: str) -> None:
        marks.append((step, time.monotonic() - t0))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(f"{url}/lab/tree/panel.ipynb?token={token}&reset")
            page.wait_for_function(
                "() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                "window.jupyterapp.shell.currentWidget.sessionContext && "
                "window.jupyterapp.shell.currentWidget.sessionContext.session && "
                "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel",
                timeout=STEP_S)
            page.evaluate("() => window.jupyterapp.commands.execute("
                          "'notebook:run-all-cells')")
            panel = page.locator(".cryonb-panel")
            expect(panel).to_be_visible(timeout=STEP_S)
            mark("panel shown")
            run = page.locator("button.cryonb-run-button")
            expect(run).to_be_enabled()

            # a bad --gpu string: the error with its caret line, inline, and no Run
            gpu = page.locator(".cryonb-gpu-text input")
            gpu.fill("0::1")
            error = page.locator(".cryonb-gpu-status .cryonb-error")
            expect(error).to_contain_text("empty rank group")
            expect(error).to_contain_text("^ here")
            assert "Traceback" not in panel.inner_text()
            expect(run).to_be_disabled()
            # set right: the device table, no error, Run enabled
            gpu.fill("")
            expect(page.locator(".cryonb-gpu-status .cryonb-gpu-table")).to_contain_text(
                "leader+worker")
            expect(error).to_have_count(0)
            expect(page.locator(".cryonb-command")).to_contain_text("cryonb class2d")
            expect(page.locator(".cryonb-relion-command")).to_contain_text("relion_refine")
            expect(run).to_be_enabled()
            mark("--gpu checks")

            # Run: the progress advances, the class grid and the load plots render
            run.click()
            first = _wait_progress(page, "p.status === 'running' && p.done > 0",
                                   "progress in the first phase")
            mark("first particles")
            later = _wait_progress(page, "p.status === 'running' && p.completed >= 1",
                                   "the first iteration")
            assert (later["completed"], later["done"]) != (first["completed"], first["done"])
            for view in ("classes", "convergence", "load"):
                canvases = page.locator(f".cryonb-view-{view} canvas")
                expect(canvases.first).to_be_attached(timeout=STEP_S)
            rank_bars = page.locator(".cryonb-rank-bar")
            expect(rank_bars.first).to_be_visible()
            mark("first iteration, views rendered")

            # Stop: the run ends after the pools in flight
            page.locator("button.cryonb-stop-button").click()
            stopped = _wait_progress(page, "p.status === 'stopped'", "stopping")
            assert 1 <= stopped["completed"] < 200
            expect(page.locator("button.cryonb-continue-button")).to_be_enabled()
            mark("stopped")

            # Continue: from the last optimiser file, past where it stopped
            page.locator("button.cryonb-continue-button").click()
            _wait_progress(page, f"p.status === 'running' && p.completed > {stopped['completed']}",
                           "continuing past the stopped iteration")
            expect(page.locator(".cryonb-command")).to_contain_text("--continue")
            mark("continued")
            page.locator("button.cryonb-stop-button").click()
            _wait_progress(page, "p.status === 'stopped' || p.status === 'finished'",
                           "stopping the continued run")
            mark("stopped again")
            page.set_viewport_size({"width": 1400, "height": 2800})
            page.locator(".cryonb-panel").scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "lab.png"))
            assert not [e for e in errors if "cryonb" in e.lower()], errors
        except BaseException:
            page.screenshot(path=str(tmp_path / "lab_failed.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert (tmp_path / "lab.png").stat().st_size > 10_000
    print("browser test steps (s since the browser started): "
          + ", ".join(f"{step} {t:.1f}" for step, t in marks)
          + f"; screenshot {tmp_path / 'lab.png'}")
