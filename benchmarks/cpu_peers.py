"""CPU decode and prefill of our runtime against llama.cpp and ONNX Runtime GenAI on the same synthetic model.

    .venv/bin/python benchmarks/cpu_peers.py [--shapes 2b,8b] [--vocab small,real] [--threads 2] [--rounds 3]
                                             [--peers llama.cpp,ort-genai] [--image 896x896] [--workdir DIR] [--smoke]

Models: ``make_tiny`` LLMs shaped as NVILA-Lite-2B's (Qwen2-1.5B: 28 layers, hidden 1536, intermediate 8960, 12 / 2
heads, head dim 128) and NVILA-8B's (Qwen2-7B: 28 layers, 3584 / 18944, 28 / 4 heads), random bf16 weights, with a
small (2000 rows) or the real (151,936 rows) vocabulary. The float checkpoint's ``llm/`` (a transformers Qwen2
checkpoint with a tokenizer) feeds every runtime:

- ours: RTN 4-bit g128 with zero points in the AutoAWQ format (``write_rtn_checkpoint``), bf16 activations, loaded
  with ``NVILAQwen2.load_pretrained`` as ``nvila-quant generate`` loads it and timed with ``timed_run`` (the
  function behind ``benchmark`` / ``compare``, default decode mode); with the real vocabulary once more with the
  int4 lm_head (``quantize_lm_head=True``); and the float bf16 model;
- llama.cpp (built from the source vendored in the llama-cpp-python 0.3.36 sdist): ``convert_hf_to_gguf.py`` to
  BF16 GGUF, ``llama-quantize`` to Q4_0 and Q4_K_M, timed with ``llama-bench``;
- ONNX Runtime GenAI 0.18.0: its model builder, int4 for the CPU EP (accuracy level 4 by default: int8
  activations) with block size 32 (its default) and 128; where the float model would not fit in memory as fp32
  (the 8B shape) the builder reads our AutoAWQ ``llm/`` instead (layers repacked at group 128; it quantizes the
  lm_head itself at block 32: the result records each graph's block sizes and head). Timed by
  ``benchmarks/peers/ort_genai_bench.py`` in its venv.

With an image (``--image WxH``, default 896x896; ``none`` skips it): on the 2B shape, a second float checkpoint with
a so400m-shaped SigLIP tower (27 layers, 1152 / 4304, 16 heads, 448 px tiles; NVILA-Lite's dynamic tiling with a
thumbnail and 3x3-downsample projector) and the real vocabulary when ``--vocab`` lists it, its int4 (and int4-head)
RTN checkpoints; the prompt is a seeded noise image of that size and "Describe the image.", timed by
``measure_speed`` (``compare``'s speed table): vision encode, TTFT and ``--decode-tokens`` decode steps, printed
beside the same runtime's LLM-only decode. Only ours runs it: neither peer loads an NVILA image path.

Each peer lives in a venv of its own under ``--workdir`` (default ~/.cache/nvila-quant/cpu_peers), created on first
use and reused after, as are the converted models (``<workdir>/models/<shape>-<vocab>/``). Each timed run is a
subprocess that loads one model, warms up (every prefill length once, a short decode: as llama-bench warms up),
then times prefill at each ``--prefill`` length (a prompt of random token ids, the same ids for ours and ORT-GenAI;
llama-bench draws its own) and ``--decode-tokens`` greedy decode steps after a 32-token prompt (llama-bench:
``-n N -d 32``). Rounds are interleaved: round r runs every runtime once (order rotated each round). Every runtime
gets the same thread count (ours: ``torch.set_num_threads`` and ``OMP_NUM_THREADS``; llama-bench ``-t``; ORT-GenAI
the decoder session's ``intra_op_num_threads``).

The table gives decode tokens/s (min / median / max over rounds), the median prefill tokens/s per length and the
ratios of ours int4 to the faster of llama.cpp Q4_0 and ORT-GenAI int4 (default block size) against the goals of
issue 26 (decode >= 1.1x, prefill >= 1.0x). Writes benchmarks/results/cpu_peers/<time>-<machine>-<T>thread[-smoke].json
with every sample, the share of the CPUs other processes used during each run (flagged above 10%; ``--wait-quiet``
waits for a quiet machine first), the peers' versions and how each model was built. The first run downloads and
builds llama.cpp (~8 min on 2 cores) and installs the two venvs (~2 min), then converts the models of each case
(2B, small vocabulary: ~5 min); ``--smoke`` runs the whole pipeline on a tiny 2-layer model in one round (~30 s
once the peers are built).
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_results_arg, table, write_result  # noqa: E402

HERE = Path(__file__).resolve().parent
PEERS_DIR = HERE / "peers"
LLAMA_CPP_PYTHON = "0.3.36"  # the PyPI sdist whose vendored llama.cpp is built
ORT_GENAI = "0.18.0"
TORCH = "2.13.0"  # installed first in every peer venv (a CPU wheel here; an unpinned torch pulls a CUDA build)
BUILD_JOBS = 2
LLAMA_TARGETS = ("llama-bench", "llama-quantize")
GGUF_TYPES = ("Q4_0", "Q4_K_M")
ORT_BLOCKS = (32, 128)  # 32: the builder's default on CPU
DECODE_PROMPT = 32
BUSY_WARN = 0.1  # share of the CPUs other processes used during a timed run: above it the run is flagged
GOALS = {"decode": 1.1, "prefill": 1.0}  # ours int4 / the faster peer (issue 26)
VOCABS = {"small": 2000, "real": 151936}
_COMMON = {"seed": 0, "outliers": False}  # outliers only change values, not time
SHAPES = {
    "2b": {"variant": "nvila-lite", "llm_hidden": 1536, "llm_intermediate": 8960, "llm_layers": 28, "llm_heads": 12,
           "llm_kv_heads": 2},
    "8b": {"variant": "nvila", "llm_hidden": 3584, "llm_intermediate": 18944, "llm_layers": 28, "llm_heads": 28,
           "llm_kv_heads": 4},
    "smoke": {"variant": "nvila-lite", "llm_hidden": 512, "llm_intermediate": 1536, "llm_layers": 2, "llm_heads": 4,
              "llm_kv_heads": 2},
}
PEERS = ("llama.cpp", "ort-genai")
# the vision tower of the image case, per shape: SigLIP so400m/14 at 448 px as NVILA-Lite-2B's (smoke: the tiny one)
TOWERS = {"2b": {"vision_hidden": 1152, "vision_intermediate": 4304, "vision_layers": 27, "vision_heads": 16,
                 "image_size": 448, "patch_size": 14},
          "smoke": {}}


# ---- progress and subprocesses --------------------------------------------------------------------------------------

_T0 = time.monotonic()


def say(msg: str) -> None:
    el = time.monotonic() - _T0
    print(f"[cpu_peers {int(el // 60):3d}:{int(el % 60):02d}] {msg}", flush=True)


class StepError(RuntimeError):
    pass


def run_logged(cmd: Sequence[str | os.PathLike], log: Path, desc: str, env: dict | None = None,
               cwd: Path | None = None, progress: bool = False) -> None:
    """Run ``cmd`` with its output in ``log``; a tqdm bar for ninja's / make's ``[n/N]`` / ``[ p%]`` lines
    (``progress``), otherwise a line every minute while it runs. Raises StepError with the log's tail on failure."""
    cmd = [str(c) for c in cmd]
    log.parent.mkdir(parents=True, exist_ok=True)
    say(f"{desc} (log: {log})")
    t = time.monotonic()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=100, desc=desc[:40], unit="%", leave=False, mininterval=2.0)
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(60):
            if bar is None:
                say(f"  ... still {desc} ({time.monotonic() - t:.0f} s)")

    threading.Thread(target=heartbeat, daemon=True).start()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                                bufsize=1, errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            if bar is not None:
                m = re.match(r"\[(\d+)/(\d+)\]", line) or re.match(r"\[\s*(\d+)%\]", line)
                if m:
                    pct = 100 * int(m.group(1)) // int(m.group(2)) if m.lastindex == 2 else int(m.group(1))
                    bar.update(max(0, pct - bar.n))
        rc = proc.wait()
    done.set()
    if bar is not None:
        bar.close()
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-30:])
        raise StepError(f"{desc} failed (exit {rc}); last lines of {log}:\n{tail}")
    say(f"  done: {desc} ({time.monotonic() - t:.0f} s)")


def _offline_hint(log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    if re.search(r"Could not find a version|No matching distribution|NewConnectionError|Temporary failure in name "
                 r"resolution|Network is unreachable|ConnectionError|ReadTimeout", text):
        return ("\nThe package index was not reachable (offline?): the first run downloads the peers from PyPI "
                "(torch, transformers, onnxruntime-genai, the llama-cpp-python sdist).")
    return ""


# ---- peer environments ----------------------------------------------------------------------------------------------

def _base_python() -> str:
    """A python to create venvs with (the interpreter behind the project's venv)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def make_venv(folder: Path, packages: list[list[str]], log_dir: Path, name: str) -> Path:
    """``folder`` as a venv with torch==TORCH installed first, then each list of ``packages`` (each install
    constrained to that torch); reused when its marker exists. Returns its python."""
    py = folder / "bin" / "python"
    marker = folder / ".nvq-ready"
    if marker.exists() and py.exists():
        return py
    if folder.exists():
        shutil.rmtree(folder)
    run_logged([_base_python(), "-m", "venv", folder], log_dir / f"{name}-venv.log", f"creating the {name} venv")
    constraints = folder / "constraints.txt"
    constraints.write_text(f"torch=={TORCH}\n")
    steps = [[f"torch=={TORCH}"], *packages]
    for i, pkgs in enumerate(steps):
        log = log_dir / f"{name}-pip-{i}.log"
        try:
            run_logged([py, "-m", "pip", "install", "--disable-pip-version-check", "-c", constraints, *pkgs], log,
                       f"{name} venv: pip install {' '.join(p if len(p) < 60 else Path(p).name for p in pkgs)}")
        except StepError as e:
            raise StepError(str(e) + _offline_hint(log)) from None
    marker.write_text(json.dumps(pip_versions(py), indent=1))
    return py


def pip_versions(py: Path, names: Sequence[str] = ("torch", "transformers", "numpy", "onnx", "onnxruntime",
                                                    "onnxruntime-genai", "onnx-ir", "gguf", "sentencepiece",
                                                    "tokenizers", "safetensors", "cmake")) -> dict[str, str | None]:
    code = ("import json, sys\nfrom importlib import metadata\nout = {}\nfor n in sys.argv[1:]:\n"
            "    try: out[n] = metadata.version(n)\n    except metadata.PackageNotFoundError: out[n] = None\n"
            "print(json.dumps(out))")
    res = subprocess.run([str(py), "-c", code, *names], capture_output=True, text=True, check=False)
    try:
        return json.loads(res.stdout)
    except json.JSONDecodeError:
        return {}


def _requirements(path: Path, seen: set[Path] | None = None) -> list[str]:
    """Requirement lines of a pip requirements file (``-r`` followed; index options and torch dropped: torch is the
    pinned CPU build installed first)."""
    seen = seen or set()
    if path in seen:
        return []
    seen.add(path)
    out: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r"):
            out += _requirements((path.parent / line[2:].strip()).resolve(), seen)
        elif line.startswith("-"):
            continue  # --extra-index-url etc.
        elif re.match(r"torch\b", line):
            continue
        else:
            out.append(line)
    return out


def _compilers() -> dict[str, str | None]:
    pick = {"cc": ("cc", "gcc", "clang"), "c++": ("c++", "g++", "clang++")}
    found = {k: next((shutil.which(n) for n in names if shutil.which(n)), None) for k, names in pick.items()}
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise StepError(f"no {' or '.join(missing)} compiler on PATH: llama.cpp is built from source (install gcc/g++, "
                        "e.g. `apt-get install build-essential`), or leave it out with --peers ort-genai")
    return found


@dataclass
class LlamaCpp:
    root: Path
    src: Path = field(init=False)
    build: Path = field(init=False)
    py: Path | None = None  # the converter's venv
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.src = self.root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
        self.build = self.root / "build"

    def bin(self, name: str) -> Path:
        return self.build / "bin" / name

    def setup(self) -> None:
        logs = self.root / "logs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.py = make_venv(self.root / "venv", [], logs, "llama.cpp")
        sdist = self.root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        if not sdist.exists():
            log = logs / "sdist.log"
            try:
                run_logged([self.py, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", self.root], log,
                           f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist (llama.cpp source, ~75 MB)")
            except StepError as e:
                raise StepError(str(e) + _offline_hint(log)) from None
        if not (self.src / "convert_hf_to_gguf.py").exists():
            say(f"extracting {sdist.name}")
            with tarfile.open(sdist) as tar:
                tar.extractall(self.root, filter="data")
        reqs_marker = self.root / "venv" / ".nvq-convert-reqs"
        if not reqs_marker.exists():
            reqs = [r for r in _requirements(self.src / "requirements" / "requirements-convert_hf_to_gguf.txt")
                    if not r.startswith("gguf")]
            log = logs / "convert-reqs.log"
            try:
                run_logged([self.py, "-m", "pip", "install", "--disable-pip-version-check", "-c",
                            self.root / "venv" / "constraints.txt", *reqs, self.src / "gguf-py"], log,
                           f"llama.cpp venv: pip install the converter's requirements ({', '.join(reqs)})")
            except StepError as e:
                raise StepError(str(e) + _offline_hint(log)) from None
            reqs_marker.write_text("\n".join(reqs) + "\n")
        if not all(self.bin(t).exists() for t in LLAMA_TARGETS):
            self._build(logs)
        self.info = {"llama_cpp_python_sdist": LLAMA_CPP_PYTHON, "sdist_sha256": _sha256(sdist), **self._version(),
                     "source": str(self.src), "build": str(self.build),
                     "cmake_flags": self._flags(), "convert_venv": pip_versions(self.py)}

    def _version(self) -> dict:
        """The llama.cpp commit the sdist vendors (its CHANGELOG's entry for this release: the sdist has no .git)
        and ggml's version."""
        out: dict = {"llama_cpp_commit": None, "ggml_version": None}
        log = self.src.parent.parent / "CHANGELOG.md"
        if log.exists():
            section = log.read_text().split(f"## [{LLAMA_CPP_PYTHON}]", 1)[-1].split("\n## [", 1)[0]
            m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
            out["llama_cpp_commit"] = m.group(1) if m else None
        cml = self.src / "ggml" / "CMakeLists.txt"
        if cml.exists():
            parts = re.findall(r"set\(GGML_VERSION_(?:MAJOR|MINOR|PATCH) (\d+)\)", cml.read_text())
            out["ggml_version"] = ".".join(parts) or None
        return out

    @staticmethod
    def _flags() -> list[str]:
        return ["-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release"]

    def _build(self, logs: Path) -> None:
        compilers = _compilers()
        cmake = shutil.which("cmake")
        if cmake is None:
            assert self.py is not None
            say("no cmake on PATH: installing it into the llama.cpp venv")
            run_logged([self.py, "-m", "pip", "install", "--disable-pip-version-check", "cmake"],
                       logs / "cmake-pip.log", "llama.cpp venv: pip install cmake")
            cmake = str(self.py.parent / "cmake")
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        if self.build.exists():
            shutil.rmtree(self.build)
        env = {**os.environ, "CC": compilers["cc"] or "cc", "CXX": compilers["c++"] or "c++"}
        run_logged([cmake, "-S", self.src, "-B", self.build, *gen, *self._flags()], logs / "cmake-configure.log",
                   "configuring llama.cpp (cmake)", env=env)
        run_logged([cmake, "--build", self.build, "--target", *LLAMA_TARGETS, f"-j{BUILD_JOBS}"],
                   logs / "cmake-build.log", f"building llama.cpp ({', '.join(LLAMA_TARGETS)}; ~7 min on 2 cores)",
                   env=env, progress=True)


@dataclass
class OrtGenai:
    root: Path
    py: Path | None = None
    info: dict = field(default_factory=dict)

    def setup(self) -> None:
        # the builder imports onnx, onnx_ir, transformers (a newer one than the project accepts), safetensors
        self.py = make_venv(self.root / "venv", [[f"onnxruntime-genai=={ORT_GENAI}", "onnx", "onnx_ir", "transformers",
                                                  "safetensors", "tqdm"]], self.root / "logs", "ort-genai")
        self.info = {"onnxruntime_genai": ORT_GENAI, "venv": pip_versions(self.py)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- models ---------------------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    name: str
    kind: str  # ours / llama.cpp / ort-genai
    weights: str
    path: Path
    samples: list[dict] = field(default_factory=list)
    build: dict = field(default_factory=dict)


def _ours(*args: str | os.PathLike) -> list[str]:
    return [sys.executable, str(PEERS_DIR / "nvila_bench.py"), *[str(a) for a in args]]


def _llm_params(spec: dict) -> int:
    h, i, n, v = spec["llm_hidden"], spec["llm_intermediate"], spec["llm_layers"], spec["llm_vocab"]
    kv = h // spec["llm_heads"] * spec["llm_kv_heads"]
    return n * (h * h * 2 + 2 * h * kv + 3 * h * i) + 2 * v * h


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def prepare_case(case_dir: Path, shape: str, vocab: str, peers: Sequence[str], llama: LlamaCpp | None,
                 ort: OrtGenai | None, ort_input: str = "auto",
                 tower: dict | None = None) -> tuple[list[Runtime], dict]:
    """The float checkpoint and every runtime's model of one shape / vocabulary (built once, reused after);
    ``tower``: TinySpec vision fields of the image case (default: make_tiny's tiny tower, unused LLM-only)."""
    spec = {**_COMMON, **SHAPES[shape], "llm_vocab": VOCABS[vocab], **(tower or {})}
    spec_file = case_dir / "spec.json"
    if spec_file.exists() and json.loads(spec_file.read_text()) != spec:
        say(f"{case_dir} was built from another spec: rebuilding it")
        shutil.rmtree(case_dir)
    need = 7 * _llm_params(spec)  # bytes: float (2/param) + the BF16 GGUF (2, temporary) + ~5 int4 copies (~0.6)
    free = shutil.disk_usage(case_dir.parent if case_dir.parent.exists() else Path.home()).free
    if not (case_dir / "float").exists() and free < need:
        raise StepError(f"{shape}/{vocab} needs about {need / 2**30:.0f} GiB free under {case_dir.parent} for its "
                        f"models, {free / 2**30:.0f} GiB are: delete other cases there (models/<shape>-<vocab>/), run "
                        "the cases one at a time with --drop-models, or point --workdir elsewhere")
    case_dir.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec, indent=1))
    logs = case_dir / "logs"
    build: dict = {"spec": spec, "llm_params": _llm_params(spec), "steps_s": {}}

    def step(name: str, out: Path, cmd: list, desc: str, env: dict | None = None) -> None:
        if out.exists():
            return
        t = time.monotonic()
        run_logged(cmd, logs / f"{name}.log", desc, env=env)
        build["steps_s"][name] = time.monotonic() - t

    float_dir, int4_dir, head_dir = case_dir / "float", case_dir / "int4", case_dir / "int4-head"
    step("make-float", float_dir, _ours("make-float", "--out", float_dir, "--spec", json.dumps(spec)),
         f"{shape}/{vocab}: writing the float bf16 checkpoint (make_tiny, {build['llm_params'] / 1e9:.2f}B LLM params)")
    step("int4", int4_dir, _ours("quantize", "--src", float_dir, "--dst", int4_dir),
         f"{shape}/{vocab}: RTN int4 g128 AutoAWQ checkpoint")
    runtimes = [Runtime("ours int4", "ours", "int4 g128 (AutoAWQ RTN), bf16 head, bf16 act", int4_dir)]
    if vocab == "real":
        step("int4-head", head_dir, _ours("quantize", "--src", float_dir, "--dst", head_dir, "--head"),
             f"{shape}/{vocab}: RTN int4 g128 AutoAWQ checkpoint with the int4 lm_head")
        runtimes.append(Runtime("ours int4+head", "ours", "int4 g128, int4 head, bf16 act", head_dir))
    runtimes.append(Runtime("ours bf16", "ours", "bf16", float_dir))

    if "llama.cpp" in peers and llama is not None:
        gg = case_dir / "gguf"
        gg.mkdir(exist_ok=True)
        outs = {t: gg / f"{t.lower()}.gguf" for t in GGUF_TYPES}
        if not all(p.exists() for p in outs.values()):
            bf16 = gg / "bf16.gguf"
            if not bf16.exists():
                tmp = gg / "bf16.gguf.tmp"
                assert llama.py is not None
                run_logged([llama.py, PEERS_DIR / "llama_convert.py", "--llama-cpp", llama.src, "--pre", "qwen2", "--",
                            float_dir / "llm", "--outtype", "bf16", "--outfile", tmp], logs / "gguf-convert.log",
                           f"{shape}/{vocab}: convert_hf_to_gguf.py -> BF16 GGUF (pre-tokenizer told: qwen2)")
                tmp.replace(bf16)
            for t, out in outs.items():
                if not out.exists():
                    tmp = out.with_suffix(".tmp")
                    run_logged([llama.bin("llama-quantize"), bf16, tmp, t, str(BUILD_JOBS)],
                               logs / f"gguf-{t.lower()}.log", f"{shape}/{vocab}: llama-quantize -> {t}")
                    tmp.replace(out)
            bf16.unlink()  # an intermediate only (the 8B's is 15 GB)
        build["gguf_tensor_types"] = {t: _gguf_types(logs / f"gguf-{t.lower()}.log") for t in GGUF_TYPES}
        runtimes += [Runtime(f"llama.cpp {t}", "llama.cpp", f"{t} (llama-quantize of BF16 GGUF)", p)
                     for t, p in outs.items()]

    if "ort-genai" in peers and ort is not None:
        assert ort.py is not None
        onnx_dir = case_dir / "onnx"
        # fp32 copy of the float model in the builder: too big for this machine's RAM -> feed it our AutoAWQ llm/
        from_awq = ort_input == "awq" or (ort_input == "auto" and _llm_params(spec) * 4 > 0.6 * _ram_bytes())
        variants = ({"awq-g128": (int4_dir / "llm", [])} if from_awq else
                    {f"b{b}": (float_dir / "llm", [f"block_size={b}"]) for b in ORT_BLOCKS})
        build["ort_input"] = "our AutoAWQ int4 llm/ (repacked, group 128)" if from_awq else "the float llm/"
        for key, (src, extra) in variants.items():
            out = onnx_dir / f"int4-{key}"
            if not out.exists():
                tmp, cache = onnx_dir / f"int4-{key}.tmp", onnx_dir / "cache"
                for p in (tmp, cache):
                    if p.exists():
                        shutil.rmtree(p)
                cmd = [ort.py, "-m", "onnxruntime_genai.models.builder", "-i", src, "-o", tmp, "-p", "int4", "-e",
                       "cpu", "-c", cache]
                if extra:
                    cmd += ["--extra_options", *extra]
                run_logged(cmd, logs / f"ort-build-{key}.log", f"{shape}/{vocab}: ORT-GenAI builder int4 {key}",
                           cwd=case_dir)
                shutil.rmtree(cache, ignore_errors=True)
                tmp.replace(out)
            info_json = out / "nvq_graph.json"
            if not info_json.exists():
                _ort_run(ort, out, None, 0, [], 0, info_json, info=True)
            graph = json.loads(info_json.read_text()).get("graph", {})
            build.setdefault("ort", {})[key] = {"input": str(src), "extra_options": extra, "graph": graph}
            blocks = graph.get("matmulnbits_block_sizes") or []
            label = f"int4 block {'/'.join(map(str, blocks)) or key}, acc. level " \
                    f"{'/'.join(map(str, graph.get('matmulnbits_accuracy_levels') or [])) or '?'}, " \
                    f"{graph.get('lm_head', '?')} head"
            runtimes.append(Runtime(f"ORT-GenAI int4-{key}", "ort-genai", label, out, build=build["ort"][key]))
    return runtimes, build


def _gguf_types(log: Path) -> dict:
    """What llama-quantize wrote (from its log): tensor counts per type and the types of the embedding and head."""
    counts: dict[str, int] = {}
    named: dict[str, str] = {}
    if not log.exists():
        return {}
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- .*?type =\s+(\w+)(?:, converting to (\w+))?", line)
        if m:
            t = m.group(3) or m.group(2)
            counts[t] = counts.get(t, 0) + 1
            if m.group(1) in ("token_embd.weight", "output.weight"):
                named[m.group(1)] = t
    return {"counts": counts, **named}


class OtherLoad:
    """CPU time the rest of the machine used while a timed run ran: the busy jiffies of /proc/stat minus the CPU
    time of this process's children over the run, as a share of all CPUs' wall time (None without /proc/stat)."""

    def __enter__(self) -> OtherLoad:
        self.share: float | None = None
        self.t, self.busy, self.kids = time.monotonic(), _busy_seconds(), _children_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        busy = _busy_seconds()
        wall = time.monotonic() - self.t
        if busy is None or self.busy is None or wall <= 0:
            return
        others = (busy - self.busy) - (_children_cpu() - self.kids)
        self.share = max(0.0, others / (wall * (os.cpu_count() or 1)))


def wait_quiet(limit_s: float, window_s: float = 2.0) -> float | None:
    """Wait (at most ``limit_s``) until other processes use at most BUSY_WARN of the CPUs over ``window_s``; returns
    the seconds waited (None: not measurable)."""
    t0 = time.monotonic()
    told = False
    while True:
        a = _busy_seconds()
        time.sleep(window_s)
        b = _busy_seconds()
        if a is None or b is None:
            return None
        share = (b - a) / (window_s * (os.cpu_count() or 1))
        waited = time.monotonic() - t0
        if share <= BUSY_WARN or waited >= limit_s:
            if told:
                say(f"  waited {waited:.0f} s for the CPUs (other processes now at {share:.0%})")
            return waited
        if not told:
            say(f"  other processes use {share:.0%} of the CPUs: waiting up to {limit_s:.0f} s for them to finish")
            told = True


def _busy_seconds() -> float | None:
    """Seconds all CPUs spent not idle since boot (/proc/stat)."""
    try:
        vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def make_image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A seeded RGB noise image of ``size`` (width, height): its content does not change the time, its size does
    (the tiling)."""
    import numpy as np
    from PIL import Image

    w, h = size
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def make_prompts(path: Path, lengths: Sequence[int], vocab_ids: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    prompts = {"prefill": {str(n): [rng.randrange(vocab_ids) for _ in range(n)] for n in lengths},
               "decode": [rng.randrange(vocab_ids) for _ in range(DECODE_PROMPT)]}
    path.write_text(json.dumps(prompts))
    return prompts


# ---- one timed run of one runtime -----------------------------------------------------------------------------------

def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def _ours_run(rt: Runtime, prompts: Path, threads: int, lengths: list[int], decode_tokens: int, out: Path) -> dict:
    cmd = _ours("bench", "--model", rt.path, "--prompts", prompts, "--threads", threads,
                "--prefill", ",".join(map(str, lengths)), "--decode-tokens", decode_tokens, "--out", out)
    _quiet(cmd, out.with_suffix(".log"), _env(threads))
    res = json.loads(out.read_text())
    return {"prefill_tok_s": {n: int(n) / s for n, s in res["prefill_s"].items()},
            "decode_tok_s": res["decode_tokens_per_s"], "raw": res}


def _llm_run(rt: Runtime, out: Path, *, prompts: Path, threads: int, lengths: list[int], decode_tokens: int,
             llama: LlamaCpp | None, ort: OrtGenai | None) -> dict:
    """One timed LLM-only run of any runtime."""
    if rt.kind == "ours":
        return _ours_run(rt, prompts, threads, lengths, decode_tokens, out)
    if rt.kind == "llama.cpp":
        assert llama is not None
        return _llama_run(llama, rt.path, threads, lengths, decode_tokens, out)
    assert ort is not None
    return _ort_run(ort, rt.path, prompts, threads, lengths, decode_tokens, out)


def _ours_image_run(rt: Runtime, out: Path, *, image: Path, threads: int, decode_tokens: int) -> dict:
    cmd = _ours("bench-image", "--model", rt.path, "--image", image, "--threads", threads,
                "--decode-tokens", decode_tokens, "--out", out)
    _quiet(cmd, out.with_suffix(".log"), _env(threads))
    res = json.loads(out.read_text())
    return {"prefill_tok_s": {}, "decode_tok_s": res["decode_tokens_per_s"] if decode_tokens > 0 else None,
            **{k: res[k] for k in ("ttft_ms", "vision_encode_ms", "prefill_ms", "prefill_tokens", "image_tiles")},
            "raw": res}


def _ort_run(ort: OrtGenai, model: Path, prompts: Path | None, threads: int, lengths: list[int], decode_tokens: int,
             out: Path, info: bool = False) -> dict:
    assert ort.py is not None
    cmd = [str(ort.py), str(PEERS_DIR / "ort_genai_bench.py"), "--model", str(model), "--out", str(out),
           "--threads", str(threads), "--prefill", ",".join(map(str, lengths)), "--decode-tokens", str(decode_tokens),
           "--prompts", str(prompts or out)]
    if info:
        cmd.append("--info")
    _quiet(cmd, out.with_suffix(".log"), _env(max(threads, 1)), cwd=out.parent)
    res = json.loads(out.read_text())
    if info:
        return res
    steps = res.get("decode_step_s") or []
    return {"prefill_tok_s": {n: int(n) / s for n, s in res["prefill_s"].items()},
            "decode_tok_s": len(steps) / sum(steps) if steps else None, "raw": res}


def _llama_run(llama: LlamaCpp, model: Path, threads: int, lengths: list[int], decode_tokens: int,
               out: Path) -> dict:
    base = [str(llama.bin("llama-bench")), "-m", str(model), "-t", str(threads), "-r", "1", "-o", "json"]
    raw: dict = {}
    prefill: dict[str, float] = {}
    decode = None
    if lengths:
        res = _quiet([*base, "-p", ",".join(map(str, lengths)), "-n", "0"], out.with_suffix(".prefill.log"),
                     _env(threads), capture=True)
        raw["prefill"] = json.loads(res)
        prefill = {str(t["n_prompt"]): t["avg_ts"] for t in raw["prefill"]}
    if decode_tokens > 0:
        res = _quiet([*base, "-p", "0", "-n", str(decode_tokens), "-d", str(DECODE_PROMPT)],
                     out.with_suffix(".decode.log"), _env(threads), capture=True)
        raw["decode"] = json.loads(res)
        decode = raw["decode"][0]["avg_ts"]
    out.write_text(json.dumps(raw, indent=1))
    return {"prefill_tok_s": prefill, "decode_tok_s": decode, "raw": raw}


def _quiet(cmd: list[str], log: Path, env: dict, cwd: Path | None = None, capture: bool = False) -> str:
    """Run ``cmd``; stderr (and stdout unless ``capture``) to ``log``; raise with the log's tail on failure."""
    with open(log, "w") as fh:
        res = subprocess.run(cmd, stdout=subprocess.PIPE if capture else fh, stderr=fh, text=True, env=env, cwd=cwd,
                             check=False)
    if res.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-30:])
        raise StepError(f"{' '.join(cmd[:3])} ... failed (exit {res.returncode}); {log}:\n{tail}")
    return res.stdout or ""


# ---- summary --------------------------------------------------------------------------------------------------------

def _med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runtimes: list[Runtime], lengths: list[int]) -> tuple[list[dict], list[dict]]:
    rows = []
    for rt in runtimes:
        dec = [s["decode_tok_s"] for s in rt.samples if s.get("decode_tok_s") is not None]
        row = {"runtime": rt.name, "weights": rt.weights, "decode_min": min(dec) if dec else None,
               "decode_med": _med(dec), "decode_max": max(dec) if dec else None}
        for n in lengths:
            row[f"prefill{n}"] = _med([s["prefill_tok_s"].get(str(n)) for s in rt.samples])
        rows.append(row)
    by = {r["runtime"]: r for r in rows}
    peers = [by[n] for n in ("llama.cpp Q4_0", "ORT-GenAI int4-b32", "ORT-GenAI int4-awq-g128") if n in by]
    peer_names = {rt.name for rt in runtimes if rt.kind != "ours"}
    ratios = []
    for ours in (by.get("ours int4"), by.get("ours int4+head")):
        if ours is None or not peers:
            continue
        for metric, goal in [("decode_med", GOALS["decode"])] + [(f"prefill{n}", GOALS["prefill"]) for n in lengths]:
            vals = [(p[metric], p["runtime"]) for p in peers if p.get(metric)]
            if not vals or not ours.get(metric):
                continue
            best, who = max(vals)
            x = ours[metric] / best
            anyp = max((r[metric], r["runtime"]) for r in rows if r["runtime"] in peer_names and r.get(metric))
            ratios.append({"ours": ours["runtime"], "metric": metric.replace("_med", ""), "ours_tok_s": ours[metric],
                           "faster_peer": who, "peer_tok_s": best, "ratio": x, "goal": goal,
                           "met": "yes" if x >= goal else "NO", "fastest_any_peer": anyp[1],
                           "ratio_vs_fastest_any": ours[metric] / anyp[0]})
    return rows, ratios


def summarize_image(runtimes: list[Runtime], llm_rows: list[dict]) -> list[dict]:
    """Medians of the image case, each beside the same runtime's LLM-only decode (same shape and vocabulary)."""
    llm = {r["runtime"]: r for r in llm_rows}
    rows = []
    for rt in runtimes:
        dec = [s["decode_tok_s"] for s in rt.samples if s.get("decode_tok_s") is not None]
        first = rt.samples[0] if rt.samples else {}
        rows.append({"runtime": rt.name, "weights": rt.weights, "image_tiles": first.get("image_tiles"),
                     "prompt_tokens": first.get("prefill_tokens"),
                     **{k: _med([s.get(k) for s in rt.samples]) for k in ("vision_encode_ms", "prefill_ms", "ttft_ms")},
                     "decode_min": min(dec) if dec else None, "decode_med": _med(dec),
                     "decode_max": max(dec) if dec else None,
                     "llm_only_decode_med": llm.get(rt.name, {}).get("decode_med"),
                     "llm_only_prefill32_med": llm.get(rt.name, {}).get("prefill32")})
    return rows


def time_rounds(label: str, runtimes: list[Runtime], rounds: int, runs_dir: Path, wait_s: float,
                run: Callable[[Runtime, Path], dict]) -> None:
    """Interleaved rounds: round r runs every runtime once (one process each, order rotated); samples go to
    ``rt.samples`` with the share of the CPUs other processes used meanwhile."""
    runs_dir.mkdir(exist_ok=True)
    for r in range(rounds):
        order = runtimes[r % len(runtimes):] + runtimes[:r % len(runtimes)]
        for rt in order:
            tag = re.sub(r"[^a-z0-9]+", "-", rt.name.lower())
            out = runs_dir / f"r{r}-{tag}.json"
            waited = wait_quiet(wait_s) if wait_s > 0 else None
            say(f"{label} round {r + 1}/{rounds}: {rt.name}")
            t = time.monotonic()
            load = OtherLoad()
            try:
                with load:
                    sample = run(rt, out)
            except StepError as e:
                raise SystemExit(f"timing {rt.name} failed: {e}") from None
            sample.update({"round": r, "wall_s": time.monotonic() - t, "other_cpu_share": load.share,
                           "waited_quiet_s": waited})
            if load.share is not None and load.share > BUSY_WARN:
                say(f"  warning: other processes used {load.share:.0%} of the CPUs during this run")
            rt.samples.append(sample)
            dec = sample["decode_tok_s"]
            extra = "".join(f", {k} {sample[k]:.0f} ms" for k in ("vision_encode_ms", "ttft_ms") if k in sample)
            say((f"  decode {dec:.2f} tok/s" if dec is not None else "  done") + extra + (
                ", prefill " + ", ".join(f"{n}: {v:.0f}" for n, v in sample["prefill_tok_s"].items()) + " tok/s"
                if sample["prefill_tok_s"] else ""))
            gc.collect()


# ---- main -----------------------------------------------------------------------------------------------------------

def _csv(text: str, allowed: Sequence[str] | None = None) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if allowed is not None:
        bad = [s for s in items if s not in allowed]
        if bad:
            raise SystemExit(f"unknown value(s) {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--shapes", default="2b,8b",
                        help="LLM shapes, comma-separated: 2b (NVILA-Lite-2B / Qwen2-1.5B), 8b (NVILA-8B / Qwen2-7B)")
    parser.add_argument("--vocab", default="small,real",
                        help=f"vocabularies, comma-separated: small ({VOCABS['small']} rows), real ({VOCABS['real']})")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads of every runtime (0 = all usable cores); default 2")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds (each runs every runtime once, one process each); default 3")
    parser.add_argument("--decode-tokens", type=int, default=64,
                        help=f"greedy decode steps timed after a {DECODE_PROMPT}-token prompt; default 64")
    parser.add_argument("--prefill", default="32,128,512",
                        help="prefill lengths (prompt tokens), comma-separated; default 32,128,512")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="peers to compare with, comma-separated subset of llama.cpp,ort-genai (ours always runs)")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "nvila-quant" / "cpu_peers",
                        help="where the peer venvs, the llama.cpp build and the converted models live (created on "
                             "first use, reused after); default ~/.cache/nvila-quant/cpu_peers")
    parser.add_argument("--smoke", action="store_true",
                        help="self-check of the whole pipeline: a tiny 2-layer model (hidden 512), small vocabulary, "
                             "1 round (a few minutes once the peers are built)")
    parser.add_argument("--ort-input", choices=("auto", "float", "awq"), default="auto",
                        help="what the ORT-GenAI builder reads: the float llm/ (int4 blocks 32 and 128), our AutoAWQ "
                             "int4 llm/ (repacked as group 128), or auto: the float one unless an fp32 copy of it "
                             "would not fit in memory (the 8B shape)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="before each timed run wait up to this long until other processes use at most "
                             f"{BUSY_WARN * 100:.0f}%% of the CPUs (default 0: no wait; each run records the share "
                             "other processes used while it ran, and the script warns above that)")
    parser.add_argument("--drop-models", action="store_true",
                        help="delete each case's models once it is timed (the 8B cases need ~45-55 GB of disk each "
                             "while they exist; default: keep them for the next run)")
    parser.add_argument("--image", default="896x896", metavar="WxH",
                        help="the image case: an image of this size (width x height) and \"Describe the image.\" "
                             "through our int4 and bf16 runtimes on the 2B shape with a so400m-shaped tower "
                             "(NVILA-Lite's dynamic tiling: 896x896 is 4 tiles and a thumbnail), with the real "
                             "vocabulary if --vocab lists it; vision encode, TTFT and decode beside the LLM-only "
                             "figures (the peers take no NVILA image); 'none' skips it")
    parser.add_argument("--setup-only", action="store_true", help="build the peers' environments and exit")
    add_results_arg(parser)
    args = parser.parse_args(argv)

    shapes = ["smoke"] if args.smoke else _csv(args.shapes, ("2b", "8b"))
    vocabs = ["small"] if args.smoke else _csv(args.vocab, tuple(VOCABS))
    peers = _csv(args.peers, PEERS)
    rounds = 1 if args.smoke else args.rounds
    lengths = [int(x) for x in _csv(args.prefill)]
    m = re.fullmatch(r"(\d+)x(\d+)", args.image.strip().lower())
    if args.image.strip().lower() != "none" and not (m and int(m[1]) > 0 and int(m[2]) > 0):
        raise SystemExit(f"--image: expected WIDTHxHEIGHT (e.g. 896x896) or none, got {args.image!r}")
    image_size = (int(m[1]), int(m[2])) if m else None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads if args.threads > 0 else cpus
    workdir = args.workdir.expanduser().resolve()
    say(f"workdir {workdir}; shapes {shapes}, vocabularies {vocabs}, peers {peers}, {threads} threads, "
        f"{rounds} round(s)")
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    setup_t = time.monotonic()
    llama = LlamaCpp(workdir / "llama.cpp") if "llama.cpp" in peers else None
    ort = OrtGenai(workdir / "ort-genai") if "ort-genai" in peers else None
    try:
        if llama:
            llama.setup()
        if ort:
            ort.setup()
    except StepError as e:
        raise SystemExit(f"peer setup failed: {e}") from None
    setup_s = time.monotonic() - setup_t
    say(f"peers ready ({setup_s:.0f} s)")
    if args.setup_only:
        return

    cases = []
    for shape in shapes:
        for vocab in vocabs:
            case_dir = workdir / "models" / f"{shape}-{vocab}"
            t = time.monotonic()
            try:
                runtimes, build = prepare_case(case_dir, shape, vocab, peers, llama, ort, args.ort_input)
            except StepError as e:
                raise SystemExit(f"building the {shape}/{vocab} models failed: {e}") from None
            build["prepare_s"] = time.monotonic() - t
            prompts_path = case_dir / "prompts.json"
            make_prompts(prompts_path, lengths, min(1000, VOCABS[vocab]))
            run = functools.partial(_llm_run, prompts=prompts_path, threads=threads, lengths=lengths,
                                    decode_tokens=args.decode_tokens, llama=llama, ort=ort)
            time_rounds(f"{shape}/{vocab}", runtimes, rounds, case_dir / "runs", args.wait_quiet, run)
            if args.drop_models:
                say(f"deleting the {shape}/{vocab} models (--drop-models)")
                for sub in ("float", "int4", "int4-head", "gguf", "onnx"):
                    shutil.rmtree(case_dir / sub, ignore_errors=True)
            rows, ratios = summarize(runtimes, lengths)
            cases.append({"shape": shape, "vocab": vocab, "vocab_rows": VOCABS[vocab], "build": build,
                          "runtimes": [{"name": rt.name, "kind": rt.kind, "weights": rt.weights, "path": rt.path,
                                        "build": rt.build, "samples": rt.samples} for rt in runtimes],
                          "rows": rows, "ratios": ratios})
            print(f"\n== {shape} / {vocab} vocabulary ({VOCABS[vocab]} rows), {threads} threads, {rounds} round(s); "
                  "tokens/s ==")
            cols = ["runtime", "weights", "decode_min", "decode_med", "decode_max", *[f"prefill{n}" for n in lengths]]
            print(table(rows, cols))
            if ratios:
                print("\nours int4 / the faster of llama.cpp Q4_0 and ORT-GenAI int4 (default block):")
                print(table(ratios, ["ours", "metric", "ours_tok_s", "faster_peer", "peer_tok_s", "ratio", "goal",
                                     "met", "fastest_any_peer", "ratio_vs_fastest_any"]))
            print()

    for shape in [sh for sh in shapes if sh in TOWERS and image_size]:
        vocab = "real" if "real" in vocabs else vocabs[0]
        case_dir = workdir / "models" / f"{shape}-{vocab}-image"
        t = time.monotonic()
        try:
            runtimes, build = prepare_case(case_dir, shape, vocab, [], None, None, tower=TOWERS[shape])
        except StepError as e:
            raise SystemExit(f"building the {shape}/{vocab} image-case models failed: {e}") from None
        build["prepare_s"] = time.monotonic() - t
        image = make_image(case_dir / "image.png", image_size)
        time_rounds(f"{shape}/{vocab} + image", runtimes, rounds, case_dir / "runs", args.wait_quiet,
                    functools.partial(_ours_image_run, image=image, threads=threads, decode_tokens=args.decode_tokens))
        if args.drop_models:
            say(f"deleting the {shape}/{vocab} image-case models (--drop-models)")
            for sub in ("float", "int4", "int4-head"):
                shutil.rmtree(case_dir / sub, ignore_errors=True)
        llm_rows = next((c["rows"] for c in cases if (c["shape"], c["vocab"]) == (shape, vocab)), [])
        rows = summarize_image(runtimes, llm_rows)
        cases.append({"shape": shape, "vocab": vocab, "vocab_rows": VOCABS[vocab], "build": build,
                      "image": {"size": list(image_size), "tower": TOWERS[shape] or "make_tiny's tiny tower",
                                "prompt": "the image, then \"Describe the image.\""},
                      "runtimes": [{"name": rt.name, "kind": rt.kind, "weights": rt.weights, "path": rt.path,
                                    "build": rt.build, "samples": rt.samples} for rt in runtimes],
                      "rows": rows, "ratios": []})
        print(f"\n== {shape} / {vocab} vocabulary + a {image_size[0]}x{image_size[1]} image "
              f"({'so400m-shaped' if TOWERS[shape] else 'tiny'} tower), {threads} threads, {rounds} round(s) ==")
        print(table(rows, ["runtime", "weights", "image_tiles", "prompt_tokens", "vision_encode_ms", "ttft_ms",
                           "decode_min", "decode_med", "decode_max", "llm_only_decode_med"]))
        print()

    busy = [(c["shape"], c["vocab"], rt["name"], s["round"], s["other_cpu_share"]) for c in cases
            for rt in c["runtimes"] for s in rt["samples"]
            if s.get("other_cpu_share") is not None and s["other_cpu_share"] > BUSY_WARN]
    if busy:
        say(f"warning: other processes used > {BUSY_WARN:.0%} of the CPUs during {len(busy)} timed run(s) "
            f"(up to {max(b[-1] for b in busy):.0%}): those timings are not from a quiet machine")
    versions = {"llama.cpp": llama.info if llama else None, "ort-genai": ort.info if ort else None}
    for c in cases:  # what the peers reported at run time
        for rt in c["runtimes"]:
            raw = rt["samples"][0]["raw"] if rt["samples"] else {}
            if rt["kind"] == "llama.cpp" and versions["llama.cpp"] is not None:
                first = (raw.get("decode") or raw.get("prefill") or [{}])[0]
                versions["llama.cpp"].update({k: first.get(k) for k in ("build_commit", "build_number", "cpu_info",
                                                                         "backends")})
            elif rt["kind"] == "ort-genai" and versions["ort-genai"] is not None:
                versions["ort-genai"].update({k: raw.get(k) for k in ("ort_genai_version", "onnxruntime_version")})
    payload = {"shapes": shapes, "vocabs": vocabs, "peers": peers, "threads": threads, "threads_arg": args.threads,
               "rounds": rounds, "decode_tokens": args.decode_tokens, "decode_prompt_tokens": DECODE_PROMPT,
               "prefill_lengths": lengths, "goals": GOALS, "smoke": args.smoke, "workdir": workdir,
               "peer_versions": versions, "setup_s": setup_s,
               "load_average_start": load_start, "busy_runs": busy, "busy_warn": BUSY_WARN,
               "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
               "notes": {"llama_bench_prompt": "llama-bench times its own random token ids (not prompts.json)",
                         "ort_threads": "genai_config decoder session_options via og.Config.overlay",
                         "ours": "timed_run (NVILAQwen2.benchmark's timer), default decode mode"},
               "cases": cases}
    variant = f"{threads}thread" + ("-smoke" if args.smoke else "")
    path = write_result("cpu_peers", payload, variant, "cpu", args.results)
    say(f"wrote {path}")


if __name__ == "__main__":
    main()
