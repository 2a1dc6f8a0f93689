"""``python -m dreamid_core download``: fetch the public model files a workflow lists.

A ComfyUI workflow may carry a top-level ``models`` list (``name``, ``url``, ``directory``; the
frontend's missing-model dialog reads the same list). This puts every listed file into the ComfyUI
folder it names (``models/<directory>/<name>``, or the ``is_default`` folder of
``extra_model_paths.yaml``), with the Hugging Face Hub client:

- the URL and the destination are logged before anything is fetched;
- a file already in any of ComfyUI's folders for that directory is skipped (no network);
- an interrupted download resumes from ``<name>.<etag>.part`` beside the destination;
- the sha256 the hub publishes for LFS files (its ``X-Linked-Etag``) is checked before the file is
  moved into place; a mismatch removes the partial file and fails;
- ``HF_ENDPOINT`` (a mirror) and ``HF_HUB_OFFLINE`` are read when the command runs; offline, a
  missing file is an error that says where to put it by hand.

Nothing here runs at import or inside a node: only this command downloads.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from ..errors import DreamIDError
from .runner import run_main

logger = logging.getLogger("dreamid_core.cli.download")

PACK_WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"  # the repo root: dreamid_core/cli/ -> ../..
DEFAULT_ENDPOINT = "https://huggingface.co"
# folder names of ComfyUI's folder_paths (0.3.64 and 0.33) plus the legacy aliases it maps
COMFYUI_FOLDERS = frozenset({
    "checkpoints", "configs", "loras", "vae", "text_encoders", "clip", "diffusion_models", "unet",
    "clip_vision", "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "t2i_adapter",
    "gligen", "upscale_models", "hypernetworks", "photomaker", "classifiers", "model_patches",
    "audio_encoders", "latent_upscale_models", "dreamidentity", "insightface",
})
LEGACY = {"clip": "text_encoders", "unet": "diffusion_models", "t2i_adapter": "controlnet"}
# where ComfyUI looks besides models/<name> (folder_paths registers both)
EXTRA_DEFAULT_DIRS = {"text_encoders": ["clip"], "diffusion_models": ["unet"], "controlnet": ["t2i_adapter"]}
RESOLVE_URL = re.compile(r"^https://huggingface\.co/(?P<repo>[^/?#]+/[^/?#]+)/resolve/(?P<revision>[^/?#]+)/"
                         r"(?P<filename>[^?#]+)(?:\?.*)?$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 8 << 20


class DownloadError(DreamIDError, OSError):
    """A model file that could not be fetched or verified; the message says what to do."""


@dataclass(frozen=True)
class ModelEntry:
    """One entry of a workflow's ``models`` list, checked and split into its hub coordinates."""

    name: str
    url: str
    directory: str
    repo_id: str
    revision: str
    filename: str
    sha256: str | None = None  # the workflow's own ``hash`` (hash_type sha256), checked besides the hub's


def parse_entry(entry: object, source: str = "workflow") -> ModelEntry:
    """Check one ``models`` entry; raise DownloadError naming the entry and the fix."""
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) and entry.get(k)
                                              for k in ("name", "url", "directory")):
        raise DownloadError(f"{source}: models entry {entry!r} needs the strings 'name', 'url' and 'directory'")
    name, url, directory = entry["name"], entry["url"], entry["directory"]
    match = RESOLVE_URL.match(url)
    if match is None:
        raise DownloadError(f"{source}: {name}: url {url!r} is not a Hugging Face resolve URL "
                            "(https://huggingface.co/<owner>/<repo>/resolve/<revision>/<file>)")
    filename = unquote(match["filename"])
    if Path(filename).name != name:
        raise DownloadError(f"{source}: models entry name {name!r} differs from the url's file name "
                            f"{Path(filename).name!r}; make them equal (ComfyUI saves the file under 'name')")
    if directory not in COMFYUI_FOLDERS:
        raise DownloadError(f"{source}: {name}: directory {directory!r} is not a ComfyUI model folder; "
                            f"use one of {sorted(COMFYUI_FOLDERS)}")
    if "/" in name or "\\" in name or name.startswith("."):
        raise DownloadError(f"{source}: models entry name {name!r} must be a plain file name")
    sha = None
    if entry.get("hash"):
        if str(entry.get("hash_type", "sha256")).lower() != "sha256" or not SHA256.match(str(entry["hash"]).lower()):
            raise DownloadError(f"{source}: {name}: hash {entry['hash']!r} must be a sha256 hex digest "
                                "(hash_type 'sha256')")
        sha = str(entry["hash"]).lower()
    return ModelEntry(name, url, directory, match["repo"], unquote(match["revision"]), filename, sha)


def read_models(workflow: Path) -> list[ModelEntry]:
    """The checked ``models`` list of one UI-format workflow file (empty when it has none)."""
    try:
        data = json.loads(Path(workflow).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DownloadError(f"workflow {workflow} does not exist; pass a workflow .json (or nothing: "
                            f"the pack's templates in {PACK_WORKFLOWS})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DownloadError(f"workflow {workflow} is not readable JSON: {exc}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if models is None:
        return []
    if not isinstance(models, list):
        raise DownloadError(f"{workflow}: 'models' must be a list of {{name, url, directory}}, got {type(models).__name__}")
    return [parse_entry(m, str(workflow)) for m in models]


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def find_comfyui(path: str | os.PathLike | None) -> Path:
    """The ComfyUI folder: ``path``, else $COMFYUI_PATH; it must hold main.py and models/."""
    raw = path or os.environ.get("COMFYUI_PATH")
    if not raw:
        raise DownloadError("no ComfyUI folder given: pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH")
    root = Path(raw).expanduser().resolve()
    if not (root / "main.py").is_file() and not (root / "models").is_dir():
        raise DownloadError(f"{root} does not look like a ComfyUI folder (no main.py, no models/); "
                            "pass the folder that holds ComfyUI's main.py")
    return root


def model_folders(comfyui: Path) -> dict[str, list[Path]]:
    """directory -> folders ComfyUI searches, the download target first: the ``is_default`` entries
    of ``extra_model_paths.yaml`` (read as ComfyUI reads it), then ``models/<dir>``, then the other
    extra paths."""
    folders: dict[str, list[Path]] = {}
    for name in COMFYUI_FOLDERS:
        canonical = LEGACY.get(name, name)
        base = [comfyui / "models" / canonical] + [comfyui / "models" / d for d in EXTRA_DEFAULT_DIRS.get(canonical, [])]
        folders.setdefault(canonical, []).extend(p for p in base if p not in folders.get(canonical, []))
    yaml_path = comfyui / "extra_model_paths.yaml"
    if yaml_path.is_file():
        try:
            import yaml
        except ImportError:
            logger.warning("%s is ignored: reading it needs pyyaml (pip install pyyaml)", yaml_path)
            return folders
        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
        for conf in config.values():
            if not isinstance(conf, dict):
                continue
            conf = dict(conf)
            base_path = conf.pop("base_path", None)
            if base_path:
                base_path = Path(os.path.expandvars(os.path.expanduser(base_path)))
                if not base_path.is_absolute():
                    base_path = yaml_path.parent / base_path
            is_default = bool(conf.pop("is_default", False))
            for key, value in conf.items():
                key = LEGACY.get(key, key)
                for line in str(value).split("\n"):
                    line = line.strip()
                    if not line:
                        continue
                    path = Path(os.path.normpath((base_path or yaml_path.parent) / line))
                    paths = folders.setdefault(key, [])
                    if path in paths:
                        continue
                    paths.insert(0, path) if is_default else paths.append(path)
    return folders


def _offline_error(entry: ModelEntry, url: str, dest: Path, why: str, retry: str) -> DownloadError:
    return DownloadError(f"cannot fetch {entry.name}: {why}. Fetch {url} yourself and put it at {dest}, "
                         f"or {retry}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of the HTTP library this huggingface_hub uses (httpx2 in 1.x+,
    requests before)."""
    found: list[type[BaseException]] = []
    for module, names in (("httpx2", ("ConnectError", "TimeoutException", "RemoteProtocolError")),
                          ("httpx", ("ConnectError", "TimeoutException", "RemoteProtocolError")),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(found) or (ConnectionError,)


def fetch(entry: ModelEntry, dest: Path, *, endpoint: str | None = None, token: str | bool | None = None) -> str:
    """Download ``entry`` to ``dest`` (resuming a partial file), check its sha256, move it in place.
    Returns the sha256 it checked, or "" when the source publishes none (a non-LFS file)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    try:  # huggingface_hub >= 0.23; before, the same classes lived in huggingface_hub.utils
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled
    except ImportError:  # pragma: no cover - old clients
        from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled

    network_errors = _network_errors()

    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    url = hf_hub_url(entry.repo_id, entry.filename, revision=entry.revision, endpoint=endpoint)
    logger.info("%s -> %s", url, dest)
    if _is_true(os.environ.get("HF_HUB_OFFLINE")):
        raise _offline_error(entry, url, dest, "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE and run again")
    try:
        extra = {"endpoint": endpoint} if "endpoint" in inspect.signature(get_hf_file_metadata).parameters else {}
        meta = get_hf_file_metadata(url, token=token, **extra)
    except OfflineModeIsEnabled:
        raise _offline_error(entry, url, dest, "huggingface_hub is in offline mode",
                             "unset HF_HUB_OFFLINE and run again") from None
    except EntryNotFoundError:
        raise DownloadError(f"{url} does not exist (404): the repository {entry.repo_id} has no {entry.filename} "
                            f"at {entry.revision}; fix the workflow's models entry") from None
    except HfHubHTTPError as exc:
        raise DownloadError(f"{url}: the hub refused ({exc}); a gated or private repo needs HF_TOKEN") from None
    except network_errors as exc:
        raise _offline_error(entry, url, dest, f"{endpoint} cannot be reached ({exc})",
                             "run again when it is reachable (a mirror: set HF_ENDPOINT)") from None
    etag = (meta.etag or "").lower()
    published = etag if SHA256.match(etag) else None
    if published and entry.sha256 and published != entry.sha256:
        raise DownloadError(f"{url}: the hub publishes sha256 {published} but the workflow pins {entry.sha256}; "
                            "the file changed upstream: check the model card before updating the workflow")
    expected = entry.sha256 or published
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^0-9a-zA-Z]", "", etag)[:16] or "noetag"
    part = dest.with_name(f"{dest.name}.{tag}.part")
    for stale in dest.parent.glob(f"{dest.name}.*.part"):
        if stale != part:  # a partial file of another version of this file cannot be resumed
            stale.unlink()
    resume = part.stat().st_size if part.exists() else 0
    if meta.size is not None and resume > meta.size:
        part.unlink()
        resume = 0
    if resume:
        logger.info("resuming %s at %d of %s bytes", part.name, resume, meta.size if meta.size is not None else "?")
    headers = build_hf_headers(token=token)
    if not meta.location.startswith(endpoint):
        headers.pop("authorization", None)  # a signed CDN URL: the token stays on the hub
    try:
        with part.open("ab") as f:
            http_get(meta.location, f, resume_size=resume, headers=headers, expected_size=meta.size,
                     displayed_filename=dest.name)
    except (*network_errors, HfHubHTTPError, OSError) as exc:
        raise DownloadError(f"download of {url} stopped ({exc}); run the same command again to resume "
                            f"from {part}") from None
    if expected:
        actual = _sha256(part)
        if actual != expected:
            part.unlink()
            raise DownloadError(f"{url}: sha256 {actual} does not match the published {expected}; the partial "
                                "file was removed. Run again; if it repeats, the mirror (HF_ENDPOINT) serves "
                                "another file")
        logger.info("sha256 %s checked", actual)
    else:
        logger.warning("%s: the source publishes no sha256 (not an LFS file); size checked only", url)
    os.replace(part, dest)
    return expected or ""


def download_models(entries: list[ModelEntry], comfyui: Path, *, dry_run: bool = False,
                    token: str | bool | None = None) -> list[dict]:
    """Fetch every entry not already present; one summary row per distinct (directory, name)."""
    folders = model_folders(comfyui)
    rows, seen = [], set()
    for entry in entries:
        directory = LEGACY.get(entry.directory, entry.directory)
        if (directory, entry.name) in seen:
            continue
        seen.add((directory, entry.name))
        candidates = folders.get(directory, [comfyui / "models" / directory])
        present = next((p / entry.name for p in candidates if (p / entry.name).is_file()), None)
        row = {"name": entry.name, "directory": entry.directory, "url": entry.url}
        if present is not None:
            logger.info("%s already present at %s: skipped", entry.name, present)
            rows.append({**row, "path": str(present), "status": "present"})
            continue
        dest = candidates[0] / entry.name
        if dry_run:
            logger.info("would fetch %s -> %s", entry.url, dest)
            rows.append({**row, "path": str(dest), "status": "would download"})
            continue
        sha = fetch(entry, dest, token=token)
        rows.append({**row, "path": str(dest), "status": "downloaded", "sha256": sha or None})
    return rows


#: templates whose files are fetched only when named: FLUX.1-dev is gated (accept its license on the model card,
#: then ``huggingface-cli login``) and with its text encoders about 33 GB
ON_REQUEST = {"dreamid_learn_identity_flux": "FLUX.1-dev (gated) + text encoders + VAE, about 33 GB"}


def pack_workflows() -> list[Path]:
    """The pack's templates fetched by default: every one but those in :data:`ON_REQUEST` (each named in a log
    line that says how to fetch it)."""
    paths = sorted(PACK_WORKFLOWS.glob("*.json"))
    for path in paths:
        if path.stem in ON_REQUEST:
            logger.info("left out by default: %s (%s); fetch it by name: python -m dreamid_core download %s",
                        path.stem, ON_REQUEST[path.stem], path.stem)
    return [p for p in paths if p.stem not in ON_REQUEST]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreamid_core download",
                                description="Fetch the public model files the workflows list (their 'models') "
                                            "into ComfyUI's folders.")
    p.add_argument("workflows", nargs="*", type=Path,
                   help="workflow .json files or template names (default: every template in the pack's workflows/ "
                        "but the FLUX.1 one, ~33 GB and gated: name it to fetch it)")
    p.add_argument("--comfyui", type=Path, help="the ComfyUI folder (default: $COMFYUI_PATH)")
    p.add_argument("--dry-run", action="store_true", help="say what would be fetched, fetch nothing")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _resolve_workflow(arg: Path) -> Path:
    if arg.suffix != ".json" and not arg.exists() and (PACK_WORKFLOWS / f"{arg.name}.json").is_file():
        return PACK_WORKFLOWS / f"{arg.name}.json"
    return arg


def _run(args: argparse.Namespace) -> None:
    workflows = [_resolve_workflow(w) for w in args.workflows] or pack_workflows()
    if not workflows:
        raise DownloadError(f"no workflows given and none in {PACK_WORKFLOWS} (an installed wheel has no "
                            "templates): pass workflow .json files")
    entries = [e for w in workflows for e in read_models(w)]
    if not entries:
        logger.warning("no 'models' list in %s: nothing to fetch", ", ".join(map(str, workflows)) or "(none)")
    comfyui = find_comfyui(args.comfyui)
    rows = download_models(entries, comfyui, dry_run=args.dry_run)
    sys.stdout.write(json.dumps({"comfyui": str(comfyui), "models": rows}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, build_parser().parse_args(argv))
