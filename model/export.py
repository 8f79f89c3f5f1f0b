"""What a trained mapper takes out of this project: what it is, and its codes as SDXL embeddings.

Not a chapter: nothing here is SDXL or CoCoIns math; the commands call it. In this order:

1. What a mapper file says about itself. Beside its architecture and weights, train.py records this
   project's version, the base model it trained on, the concept words of its training images, its
   settings and the steps done (`training_metadata`); `read_mapper_info` reads them back, an older
   file's gaps included, and `format_info` prints them (`sample.py --info`). A mapper used with
   another base model gets one line of warning, not a refusal (`base_model_warning`): a fine-tune of
   SDXL shares its token space, and a user may want exactly that.
2. A code as an SDXL textual-inversion embedding. A CoCoIns identity is two token embeddings, the
   pseudo-words w = f(z) for CLIP-L and bigG that go before the concept word; an SDXL embedding file
   is exactly that: `clip_l` [1, 768] and `clip_g` [1, 1280] (`save_embeddings`). diffusers,
   AUTOMATIC1111/Forge and ComfyUI load it (README.md, "Identities that travel", with the sources).
3. The run folder's model card: README.md in the Hugging Face Hub's convention (`write_model_card`).
"""

import glob
import hashlib
import json
import os
import shlex
import textwrap
from dataclasses import dataclass

import torch

from model import __version__
from model.checkpoint import (HUB_REPO_FOLDER, OFFICIAL_FILENAME, CheckpointError, load_mapper, locate,
                              read_metadata, save_safetensors, write_atomically)
from model.errors import UserError
from model.mapper import MapperConfig, code_to_z

# ----------------------------------------------------------------------------------------------
# 1. What a mapper file says about itself
# ----------------------------------------------------------------------------------------------

# safetensors metadata (string values; JSON where structured) beside checkpoint.py's "format" and
# "mapper_config". Files written before a key existed simply lack it.
VERSION_KEY = "cocoins_version"  # this project's version, which wrote the file
BASE_MODEL_KEY = "base_model"  # {"name", "bytes", "sha256" when it was cheap to compute}
CONCEPTS_KEY = "concepts"  # {concept word: training images naming it}, most common first
STEP_KEY = "step"  # steps done
TRAINING_KEY = "training_args"  # train.py's settings, every flag
# Base models are hashed up to this size. SDXL (6.9 GB) is not: its digest would take longer than
# loading it, on every run; its name and size stand for it (see `same_base_model`).
HASH_LIMIT = 256 * 2**20


def sha256_of(files: list[str]) -> str:
    """SHA-256 of the files' bytes one after the other (for one file, what `sha256sum` prints)."""
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while block := f.read(2**20):
                h.update(block)
    return h.hexdigest()


def base_model_name(weights: str) -> str:
    """A base model's name: its file or folder name, or its Hugging Face repository inside the hub cache."""
    path = os.path.normpath(os.path.abspath(weights))
    repos = [part for part in path.split(os.sep) if part.startswith("models--")]  # the cache's models--org--name
    if not repos:
        return os.path.basename(path)
    repo = repos[-1][len("models--"):].replace("--", "/")
    return f"{repo}/{os.path.basename(path)}" if os.path.isfile(path) else repo


def base_model_identity(weights: str) -> dict:
    """{"name", "bytes", and "sha256" below HASH_LIMIT} of the SDXL checkpoint at `weights` (file or
    diffusers folder: the files the loader reads, in path order)."""
    files = sorted({file for part in locate(weights).values() for file in part.files})
    identity = {"name": base_model_name(weights), "bytes": sum(os.path.getsize(file) for file in files)}
    if identity["bytes"] <= HASH_LIMIT:
        identity["sha256"] = sha256_of(files)
    return identity


def same_base_model(recorded: dict, current: dict) -> bool:
    """Whether two base-model identities are one model, recognised cheaply.

    By digest when both have one; else by name and size. A fingerprint of the text encoders' token
    tables was the other candidate, but fine-tunes mostly keep CLIP's tables, so it would call the very
    models this check exists to notice "the same". Name and size cost nothing; a renamed copy of the
    same file is taken for another model, which costs one needless line of warning."""
    if "sha256" in recorded and "sha256" in current:
        return recorded["sha256"] == current["sha256"]
    return (recorded.get("name"), recorded.get("bytes")) == (current["name"], current["bytes"])


def describe_base_model(identity: dict) -> str:
    digest = f", sha256 {identity['sha256']}" if "sha256" in identity else ""
    return f"{identity['name']} ({identity['bytes']:,} bytes{digest})"


def training_metadata(step: int, settings: dict, base_model: dict, concepts: dict[str, int]) -> dict[str, str]:
    """The metadata train.py gives `save_mapper`: steps done, settings, base model, concepts, version."""
    return {STEP_KEY: str(step), TRAINING_KEY: json.dumps(settings), BASE_MODEL_KEY: json.dumps(base_model),
            CONCEPTS_KEY: json.dumps(concepts), VERSION_KEY: __version__}


@dataclass
class MapperInfo:
    """What a mapper file says about itself; None where an older file does not say."""
    path: str
    sha256: str
    config: MapperConfig
    version: str | None
    base_model: dict | None
    concepts: dict[str, int] | None
    step: int | None
    training: dict | None

    def lacks(self) -> list[str]:
        """The fields this file does not record, by the names --info prints them under."""
        fields = {"version": self.version, "base model": self.base_model, "concepts": self.concepts,
                  "steps done": self.step, "training settings": self.training}
        return [name for name, value in fields.items() if value is None]

    def steps_done(self) -> str | None:
        """"3 of 10" (the steps done of the run's --steps), or None where the file does not say."""
        if self.step is None:
            return None
        total = (self.training or {}).get("steps")
        return f"{self.step} of {total}" if total is not None else str(self.step)


def read_mapper_info(path: str) -> MapperInfo:
    """Read a mapper file's description (loading the mapper too, so a file that would not load says so)."""
    f = load_mapper(path)
    meta = read_metadata(path)
    try:
        parsed = {key: json.loads(meta[key]) if key in meta else None
                  for key in (BASE_MODEL_KEY, CONCEPTS_KEY, STEP_KEY, TRAINING_KEY)}
    except ValueError as err:
        raise CheckpointError(f"the metadata stored in {path} is unreadable ({err}); the file may be corrupt") from None
    return MapperInfo(path=path, sha256=sha256_of([path]), config=f.config, version=meta.get(VERSION_KEY),
                      base_model=parsed[BASE_MODEL_KEY], concepts=parsed[CONCEPTS_KEY], step=parsed[STEP_KEY],
                      training=parsed[TRAINING_KEY])


def format_info(info: MapperInfo) -> str:
    """`sample.py --info`: one line per field, then the fields the file lacks."""
    c = info.config
    widths = " + ".join(str(w) for w in c.token_widths)
    rows = [
        ("mapper", info.path),
        ("sha256", info.sha256),
        ("architecture", f"z of {c.z_dim} -> {c.depth} layers, {c.hidden} wide, {c.activation} -> pseudo-words of "
                         f"{widths} (CLIP-L + bigG); output {c.norm}, gain {c.gain}"),
        ("version", f"written by cocoins {info.version}" if info.version else None),
        ("base model", describe_base_model(info.base_model) if info.base_model else None),
        ("concepts", ", ".join(f"{word} ({n} images)" for word, n in info.concepts.items())
         if info.concepts is not None else None),
        ("steps done", info.steps_done()),
        ("training settings", ", ".join(f"{k}={v}" for k, v in sorted(info.training.items()))
         if info.training is not None else None),
    ]
    lines = []
    for name, value in rows:
        text = textwrap.fill(value if value is not None else "not recorded", width=100, initial_indent=" " * 20,
                             subsequent_indent=" " * 20, break_on_hyphens=False)
        lines.append(f"{name:<19} {text.lstrip()}")
    if info.lacks():
        lines.append(textwrap.fill(f"this file does not record its {', '.join(info.lacks())} (train.py before "
                                   f"cocoins {__version__} did not write them); it loads and draws as before", 100))
    return "\n".join(lines)


def base_model_warning(mapper_path: str, weights: str) -> str | None:
    """One line when the mapper was trained on another base model than `weights`, else None (and None
    for a file that does not record its base model)."""
    recorded = read_metadata(mapper_path).get(BASE_MODEL_KEY)
    if recorded is None:
        return None
    recorded, current = json.loads(recorded), base_model_identity(weights)
    if same_base_model(recorded, current):
        return None
    return (f"warning: this mapper was trained on {describe_base_model(recorded)}, not on "
            f"{describe_base_model(current)}; its codes work on any SDXL that shares the token space (a "
            f"fine-tune), but may draw other people there (if both are one model in two files, ignore this)")


# ----------------------------------------------------------------------------------------------
# 2. A code as an SDXL textual-inversion embedding
# ----------------------------------------------------------------------------------------------

# The SDXL embedding format: one tensor [vectors, width] per text encoder, under these names, in the
# mapper's order of pseudo-words (CLIP-L, then bigG).
EMBEDDING_KEYS = ("clip_l", "clip_g")


def embedding_paths(pattern: str, codes: list[int]) -> list[str]:
    """--save-embedding: one .safetensors path per code, `{code}` in the name standing for it."""
    if not pattern.endswith(".safetensors"):
        raise UserError(f"--save-embedding {pattern}: name a .safetensors file, e.g. person42.safetensors "
                        f"(its name is the word other tools know the embedding by)")
    if len(codes) > 1 and "{code}" not in pattern:
        raise UserError(f"--save-embedding {pattern} names one file but {len(codes)} --code were given; put "
                        f"{{code}} in the name (e.g. embeddings/person{{code}}.safetensors) for one file per code")
    return [pattern.replace("{code}", str(code)) for code in codes]


def save_embeddings(mapper_path: str, codes: list[int], concepts: list[str], paths: list[str]) -> None:
    """Write each code's pseudo-words as an SDXL embedding file, with where they came from as metadata:
    the mapper file's SHA-256, the code, the concept word it goes before, the base model, the version."""
    f = load_mapper(mapper_path)
    if len(f.config.token_widths) != len(EMBEDDING_KEYS):
        raise UserError(f"{mapper_path} makes {len(f.config.token_widths)} pseudo-word(s) per code; an SDXL "
                        f"embedding holds one per text encoder ({' and '.join(EMBEDDING_KEYS)})")
    recorded = read_metadata(mapper_path)
    provenance = {VERSION_KEY: __version__, "mapper_sha256": sha256_of([mapper_path])}
    if BASE_MODEL_KEY in recorded:
        provenance[BASE_MODEL_KEY] = recorded[BASE_MODEL_KEY]
    for code, concept, path in zip(codes, concepts, paths, strict=True):
        with torch.no_grad():
            # w = f(z), z drawn from the code as sample.py draws it: the words it inserts (bit for bit on a CPU)
            words = f(code_to_z(code, f.config.z_dim)[None])
        tensors = {key: w.float().contiguous() for key, w in zip(EMBEDDING_KEYS, words)}  # each [1, D]
        metadata = {**provenance, "code": str(code), "concept": concept}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_safetensors(path, tensors, metadata)


# ----------------------------------------------------------------------------------------------
# 3. The run folder's model card
# ----------------------------------------------------------------------------------------------


def hub_base_model(identity: dict | None) -> str | None:
    """The base model as a Hub repository id (the card's `base_model`), when its name says which: the
    official file's name (weights/download.py gives it only after checking the SHA-256), or a snapshot
    of that repository in the Hugging Face cache."""
    if identity is None:
        return None
    official = HUB_REPO_FOLDER[len("models--"):].replace("--", "/")
    if identity["name"] == OFFICIAL_FILENAME or identity["name"].startswith(official):
        return official
    return None


def model_card(run: str) -> str:
    """The text of RUN/README.md: a YAML header (the Hub's metadata) and prose, from the mapper's own
    metadata and the run's newest sample grid."""
    info = read_mapper_info(os.path.join(run, "mapper.safetensors"))
    grids = sorted(glob.glob(os.path.join(run, "samples", "step_*.png")))
    concepts = list(info.concepts or {}) or ["person"]
    name = os.path.basename(os.path.normpath(run))
    header = {"library_name": "cocoins", "pipeline_tag": "text-to-image"}
    if hub_base_model(info.base_model):
        header["base_model"] = hub_base_model(info.base_model)
    tags = ["cocoins", "stable-diffusion-xl", "text-to-image", "subject-consistency"]
    # JSON strings are YAML scalars: every value is quoted the one way both read.
    lines = ["---", *(f"{key}: {json.dumps(value)}" for key, value in header.items()), "tags:",
             *(f"- {json.dumps(tag)}" for tag in tags), "---", ""]
    steps = info.steps_done() or "an unrecorded number of"
    base = describe_base_model(info.base_model) if info.base_model else "an unrecorded base model"
    prompt = f"a photo of a {concepts[0]}"
    lines += [
        f"# CoCoIns mapper: {name}",
        "",
        "A CoCoIns mapping network (Lee, Chan and Yang, *Consistent Subject Generation via Contrastive "
        "Instantiated Concepts*, 2025). It turns an integer code into a pseudo-word for each of SDXL's two "
        "text encoders, inserted before a concept word, so that one code draws one subject in any prompt "
        f"and on any seed, with no reference photo. Concept words: {', '.join(concepts)}. Trained "
        f"{steps} steps on {base}{f' with cocoins {info.version}' if info.version else ''}.",
        "",
        "## How to use it",
        "",
        "```bash",
        shlex.join(["python", "sample.py", "--mapper", run, "--code", "42", "--prompt", prompt]),
        shlex.join(["python", "sample.py", "--mapper", run, "--code", "42", "--save-embedding",
                    f"{name}-42.safetensors"]),
        "```",
        "",
        f"The second line writes code 42 as an SDXL textual-inversion embedding: AUTOMATIC1111 and Forge "
        f"read it from `embeddings/` (prompt: `a photo of a {name}-42 {concepts[0]}`), ComfyUI from "
        f"`models/embeddings/` (`a photo of a embedding:{name}-42 {concepts[0]}`), diffusers through "
        "`load_textual_inversion` (the cocoins README gives the lines).",
        "",
        "## Samples",
        "",
    ]
    if grids:
        newest = os.path.relpath(grids[-1], run).replace(os.sep, "/")
        lines += [f"![codes in rows, prompts in columns]({newest})", "",
                  f"`{newest}`: fixed codes (rows) in fixed prompts (columns), the run's newest sample grid."]
    else:
        lines += ["No sample grid yet (train.py draws one every `--sample-every` steps)."]
    lines += ["", "## Training", "", f"- base model: {base}", f"- concepts: "
              + (", ".join(f"{w} ({n} images)" for w, n in info.concepts.items()) if info.concepts else "unrecorded"),
              f"- steps done: {steps}", f"- mapper file SHA-256: `{info.sha256}`", ""]
    if info.training:
        lines += ["| setting | value |", "|---|---|",
                  *(f"| `{k}` | `{json.dumps(v)}` |" for k, v in sorted(info.training.items())), ""]
    return "\n".join(lines)


def write_model_card(run: str) -> str:
    """Write RUN/README.md (atomically, as the checkpoints are) and return its path."""
    path = os.path.join(run, "README.md")
    text = model_card(run)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomically(path, write)
    return path
