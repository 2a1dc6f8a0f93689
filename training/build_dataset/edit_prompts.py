"""The self-augmented editing data's text side: the names list and the paper's prompt templates.

DreamIdentity (arXiv 2307.00300, Sec. 3.3) generates, for each celebrity name the base model
knows, a source face ("<name> face, looking at the camera") and edits of the same person from
the templates below; in the training prompt the name is replaced by the trigger S*.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from dreamid_core.errors import ConfigError

logger = logging.getLogger(__name__)

SOURCE_TEMPLATE = "{name} face, looking at the camera"

#: template id -> prompt with ``{name}``; the paper's list (the wizard / nurse / police line is three prompts)
EDIT_TEMPLATES: dict[str, str] = {
    "chef": "{name} as a chef, looking at the camera",
    "oil_painting": "oil painting style, {name} face",
    "watercolor": "watercolor style, {name} face",
    "pencil": "pencil art style, {name} face",
    "fauvism": "fauvism painting, {name} face",
    "wizard": "{name} as a wizard, looking at the camera",
    "nurse": "{name} as a nurse, looking at the camera",
    "police": "{name} as a police, looking at the camera",
    "hat": "{name} wearing a hat, looking at the camera",
}

#: the shipped example list (placeholders; bring your own list of ~1000 names for real training)
EXAMPLE_NAMES = Path(__file__).resolve().parents[1] / "data" / "names_example.txt"

MAX_NAME_CHARS = 80
_FORBIDDEN = re.compile(r"[{}\n\r\t*]")


@dataclass(frozen=True)
class Name:
    text: str  # as it goes into prompts
    slug: str  # file-system safe and unique: ascii-folded name + 8 hex digits of its sha1

    @classmethod
    def make(cls, text: str) -> Name:
        ascii_name = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
        safe = re.sub(r"[^A-Za-z0-9]+", "_", ascii_name).strip("_").lower()[:48] or "name"
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
        return cls(text=text, slug=f"{safe}-{digest}")


def fill(template: str, name: str) -> str:
    return template.format(name=name)


def training_prompt(template: str, trigger: str = "S*") -> str:
    """The prompt the trainer sees: the template with the name replaced by the trigger word."""
    return template.format(name=trigger)


def select_templates(ids: list[str] | None) -> dict[str, str]:
    """The edit templates to use: all of them, or the ids asked for (in the paper's order)."""
    if not ids:
        return dict(EDIT_TEMPLATES)
    unknown = [t for t in ids if t not in EDIT_TEMPLATES]
    if unknown:
        raise ConfigError(f"unknown edit template id(s) {unknown}; choose from {list(EDIT_TEMPLATES)}")
    return {k: v for k, v in EDIT_TEMPLATES.items() if k in ids}


def parse_names(text: str, source: str = "names file", trigger: str = "S*") -> list[Name]:
    """One name per line; blank lines and ``#`` comments ignored; inner whitespace collapsed;
    duplicates (case-insensitive) dropped with a log line. Raises ``ValueError`` naming the line
    for a name the prompts cannot carry."""
    names: list[Name] = []
    seen: dict[str, int] = {}
    duplicates = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0]
        name = " ".join(line.split())
        if not name:
            continue
        where = f"{source} line {number} ({name!r})"
        if trigger.lower() in name.lower():
            raise ValueError(f"{where} contains the trigger word {trigger!r}; the trigger must not be part of a name. "
                             "Remove the line or train with another --trigger.")
        if _FORBIDDEN.search(name):
            raise ValueError(f"{where} contains one of {{ }} * or a control character, which would break the prompt "
                             "templates; remove those characters.")
        if len(name) > MAX_NAME_CHARS:
            raise ValueError(f"{where} is {len(name)} characters long (max {MAX_NAME_CHARS}); one name per line, "
                             "no descriptions.")
        if not any(ch.isalpha() for ch in name):
            raise ValueError(f"{where} has no letters; a name is expected (one per line).")
        folded = name.casefold()
        if folded in seen:
            duplicates += 1
            logger.info("%s repeats line %d; dropped", where, seen[folded])
            continue
        seen[folded] = number
        names.append(Name.make(name))
    if duplicates:
        logger.info("%s: %d duplicate name(s) dropped", source, duplicates)
    if not names:
        raise ValueError(f"{source} holds no names (one name per line; '#' starts a comment)")
    return names


def load_names(path: str | Path, trigger: str = "S*") -> list[Name]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"names file not found: {path}. Give a text file with one name per line "
                                f"(an example ships as {EXAMPLE_NAMES}).")
    return parse_names(path.read_text(encoding="utf-8"), source=str(path), trigger=trigger)
