"""The shipped templates (workflows/*.json) on a test server and in the browser (tests only).

- :func:`write_server_files` puts tiny models under the file names the templates load, and real photos
  in the server's input folder (the ``server_files`` fixture in conftest.py);
- :class:`TemplatesInApp` opens each template in the frontend (``app.loadGraphData``), rewires it to the
  tiny test models with the graph API, runs it from the page (``app.queuePrompt``) and keeps what the
  page then shows: node boxes after loading and after the run, and each node's report. A template
  runs at most once per session (the ``templates_in_app`` fixture): tests of the layout and of the
  node reports read the same run.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from comfy_env import ARTIFACTS
from comfy_frontend import (
    dismiss_notices,
    open_app,
    report_on_node,
    run_in_app,
    screenshot_graph,
    set_widgets_in_app,
    use_tiny_clip_in_app,
    wait_for_stable_boxes,
)
from workflow_api import load_workflow

PACK = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((PACK / "workflows").glob("*.json"))
_spec = importlib.util.find_spec("insightface")
IMAGES = Path(_spec.origin).parent / "data" / "images" if _spec and _spec.origin else None
ENCODER_FILE = "dreamid_sd21_base.safetensors"

#: widget values that shrink a template to the tiny models (tests/test_workflows.py's tiny() does the
#: same on API prompts). Other tests save under the templates' own names without overwrite, so runs
#: in the page save under names of their own.
TINY_IN_APP = {
    # one step with a preview: the learner's preview and loss curve show, in half the time of two steps
    "DreamID_LearnIdentity": {"steps": 1, "resolution": 64, "preview_every": 1, "snapshot_every": 0},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "EmptySD3LatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 2},
    "DreamID_ScenePosition": {"width": 64, "height": 64},
    "DreamID_HeadPlacement": {"width": 64, "height": 64},
    "DreamID_SaveLearnedIdentity": {"name": "browser_learned_identity", "overwrite": True},
    "DreamID_SaveIDEmbedding": {"name": "browser_identity", "overwrite": True},
}
#: the multi-photo template's second photo has no face and is skipped: its report says so
SKIP_PHOTO = "mask.png"


def model_files(workflow: dict) -> set[str]:
    return {v for n in workflow["nodes"] for v in n.get("widgets_values") or []
            if isinstance(v, str) and v.endswith(".safetensors")}


def write_server_files(server) -> dict[str, Path]:
    """Tiny models under the README's file names, and real photos in the input folder (the model
    writers use ComfyUI's own classes: import ComfyUI in-process first). Returns {file name: a
    template that loads it}."""
    import torch
    from comfy_tiny import write_tiny_controlnet, write_tiny_sd2_checkpoint, write_tiny_vae16
    from PIL import Image

    from dreamid_core import BackboneConfig, EncoderConfig, IDEncoder, save_encoder

    names = {}
    for path in WORKFLOWS:
        for name in model_files(load_workflow(path)):
            names[name] = path
    write_tiny_sd2_checkpoint(server.models_dir("checkpoints") / "v2-1_512-ema-pruned.safetensors")
    write_tiny_controlnet(server.models_dir("controlnet") / "control_v11p_sd21_openpose.safetensors")
    # FLUX.1: the VAE file loads through VAELoader; the MODEL and CLIP come from the tiny test nodes
    # (ComfyUI detects FLUX files at the real widths only), so their files are not written
    write_tiny_vae16(server.models_dir("vae") / "ae.safetensors")
    torch.manual_seed(0)
    bb = BackboneConfig(width=32, depth=4, num_heads=4, num_features=16, patch_size=28)
    encoder = IDEncoder(EncoderConfig.for_target("sd2", bb, hidden_dim=64))
    with torch.no_grad():  # S* about as large as real word embeddings
        encoder.projections[0].out.weight.mul_(0.3)
        encoder.projections[1].out.weight.mul_(0.3)
    save_encoder(encoder, server.models_dir("dreamidentity") / ENCODER_FILE)
    group = Image.open(IMAGES / "t1.jpg").convert("RGB")
    photos = {"face.png": group.crop((400, 180, 640, 460)), "face2.png": group.crop((360, 120, 700, 520)),
              "group.png": group, SKIP_PHOTO: Image.open(IMAGES / "mask_white.jpg").convert("RGB")}
    tmp = ARTIFACTS / "inputs"
    tmp.mkdir(parents=True, exist_ok=True)
    for name, im in photos.items():
        im.save(tmp / name)
        server.upload_image(tmp / name)
    return names


def tiny_widgets(workflow: dict) -> dict[str, dict]:
    """TINY_IN_APP for this template; in the multi-photo one the second photo becomes one without a
    face and EncodeFace skips it (so its report has a used and a skipped photo)."""
    values = {k: dict(v) for k, v in TINY_IN_APP.items()}
    photos = [n for n in workflow["nodes"] if n["type"] == "LoadImage"]
    if len(photos) > 1 and any(n["type"] == "ImageBatch" for n in workflow["nodes"]):
        values[str(photos[-1]["id"])] = {"image": SKIP_PHOTO}
        values["DreamID_EncodeFace"] = {"on_missing": "skip"}
    return values


@dataclass
class TemplateRun:
    """One template run from the page."""

    name: str
    result: dict  # run_in_app's answer: status, error, prompt_id, executed {node id: ui output}, seconds
    ran: list[dict]  # node boxes once the page settled after the run
    added: set[str]  # ids of the nodes the test added (the tiny CLIP)
    reports: dict[str, dict | None] = field(default_factory=dict)  # node id -> report_on_node(...)

    @property
    def texts(self) -> dict[str, str]:
        """What each node said in its ``ui`` text, joined by newlines as the node shows it."""
        return {k: "\n".join(map(str, v["text"])) for k, v in self.result["executed"].items()
                if isinstance(v, dict) and v.get("text")}


class TemplatesInApp:
    """The shipped templates in a Chromium page of ``server``'s frontend."""

    def __init__(self, page, server):
        self.page, self.server = page, server
        self._runs: dict[str, TemplateRun] = {}
        self._stale = True

    def open(self) -> None:
        """A fresh app: no workflow of an earlier test restored, model lists read anew."""
        if not self.page.url.startswith(self.server.url):
            self.page.goto(self.server.url + "/")
        self.page.evaluate("() => { localStorage.clear(); sessionStorage.clear(); }")
        open_app(self.page, self.server.url)
        self.page.wait_for_timeout(500)  # the app restores its (now empty) open workflows after start
        self._stale = False

    def reopen_later(self) -> None:
        """The server's files changed: open the app afresh before the next template."""
        self._stale = True

    def _on_app(self) -> None:
        if self._stale or not self.page.url.startswith(self.server.url) \
                or not self.page.evaluate("() => !!window.app?.graph"):
            self.open()
        dismiss_notices(self.page)

    def load(self, path: Path) -> list[dict]:
        """Load a template as the template browser does; its node boxes once they stopped changing."""
        self._on_app()
        self.page.evaluate("async (wf) => { await app.loadGraphData(wf); }", load_workflow(path))
        return wait_for_stable_boxes(self.page)

    def run(self, path: Path) -> TemplateRun:
        """Load, shrink to the tiny models, run from the page; cached per template for the session."""
        if path.stem in self._runs:
            return self._runs[path.stem]
        workflow = load_workflow(path)
        self.load(path)
        added = set(use_tiny_clip_in_app(self.page))
        set_widgets_in_app(self.page, tiny_widgets(workflow))
        result = run_in_app(self.page, timeout_s=300)
        ran = wait_for_stable_boxes(self.page)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        screenshot_graph(self.page, ARTIFACTS / f"ran-{path.stem}.png")
        run = TemplateRun(path.stem, result, ran, added)
        for node_id in run.texts:
            run.reports[node_id] = report_on_node(self.page, node_id)
        self._runs[path.stem] = run
        return run
