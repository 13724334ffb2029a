"""Mutation testing of the fast tests over the numerics, the format packers and the AWQ scale search (mutmut 3).

    python benchmarks/mutation.py [--max-children N] [--modules NAME ...] [--reuse] [--keep-mutants] [--collect-only]

What it does, from the repository root with this interpreter's ``mutmut`` (``pip install -e ".[mutation]"``):

1. Removes a stale ``mutants/`` folder (unless ``--reuse``), then runs ``mutmut run --max-children N`` in a
   subprocess with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1. ``[tool.mutmut]`` in pyproject.toml names the mutated
   modules (``only_mutate``) and the tests (``pytest_add_cli_args_test_selection``: tests/numerics, tests/formats,
   tests/quant/test_awq.py; ``pytest_add_cli_args``: ``-m "not slow and not cuda"`` and the deselected
   transformers-loading interop test). mutmut copies nvila_quant/ and tests/ into ``mutants/``, records which tests
   call each function, and runs, for every mutant, only the tests that cover the mutated function (``pytest -x``),
   each mutant in a process forked from a fork server (``process_isolation = "forkserver"``).
2. Reads mutmut's per-file results (``mutants/<module>.py.meta``) and counts per module: killed, survived,
   timeout, suspicious, no tests (no selected test calls the function), and the rest mutmut knows.
3. Survivors listed in :data:`EQUIVALENT` (reviewed: the mutant cannot change behaviour; each entry gives the
   mutant id, the exact changed lines and a one-line reason) are set aside. An entry counts only while the mutant's
   diff still shows exactly those lines: once the code changes it is reported as stale and the mutant counts as a
   survivor again.
   kill rate = killed / (total - equivalent survivors); timeouts are not counted as killed (a second rate,
   ``detected``, counts killed + timeout).
4. Prints a table and writes one result file, benchmarks/results/mutation/<UTC YYYYmmdd-HHMMSS>-<cpu>.json
   (benchmarks/_common.py's record: date, commit, dirty paths, machine, versions) whose ``result`` holds the tool
   and its version, the test command, per-module counts and rates, the overall rate, every mutant that was not
   killed (id, module, status, diff) and the survivors judged equivalent with their reasons.
5. Deletes ``mutants/`` (unless ``--keep-mutants``).

mutmut 3 does not mutate decorated functions other than static/class methods (``@torch.no_grad() search_clip``,
properties such as ``QTensor.out_features``), nor module-level constants (``AWQ_ORDER``, ``CHUNK_ORDER``): those
are outside what this run measures.
Mutants that only change which device a tensor is made on survive a CPU-only run (every tensor is on the CPU);
the ``cuda``-marked tests of tests/formats/test_format_contracts.py and tests/quant/test_awq.py kill them on a GPU
machine. They are left as survivors, not listed as equivalent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MUTANTS = REPO / "mutants"
BENCHMARK = "mutation"
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
STATUSES = ("killed", "survived", "timeout", "suspicious", "no tests", "segfault", "skipped", "caught by type check",
            "check was interrupted by user", "not checked")

# Reviewed survivors that cannot change behaviour. Each: mutmut's id, the changed lines of its diff (original, then
# mutant, stripped; what `mutmut show <id>` prints after "-" and "+"), and why no test can tell them apart.
KEEPDIM = "keepdim only shapes an intermediate: scale and zero are reshaped to (N, K/G) either way"
SYM_CLAMP = ("symmetric s = absmax / (2^(b-1) - 1) keeps |round(w / s)| <= 2^(b-1) - 1: a bound at or beyond "
             "that (or none) never binds")
INT64_DEFAULT = "torch.arange / torch.tensor of Python ints are int64 by default"
WRAP16 = ("the int64 -> int16 cast keeps the low 16 bits (two's complement wrap): the where() only documents "
          "intent, and any branch that moves x by a multiple of 2^16 gives the same int16")
WRAP32 = ("the int64 -> int32 cast keeps the low 32 bits (two's complement wrap): the where() only documents "
          "intent, and any branch that moves x by a multiple of 2^32 gives the same int32")
CPU_INDEX = "index tensor's device: advanced indexing takes CPU indices for a tensor on any device, same values"
DENSE_PAD = "more zero padding only adds windows after the last block; the gathers read the first `blocks` only"
BEST_RATIO = ("the initial best_ratio is never returned: without a loss below inf best_scales stays None and the "
              "search raises")


def _eq(mutant: str, removed: str, added: str, reason: str) -> dict:
    return {"id": "nvila_quant." + mutant, "removed": removed, "added": added, "reason": reason}


EQUIVALENT: list[dict] = [
    _eq('numerics.quantizer.x_compute_qparams__mutmut_56',
        'scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / max_int',
        'scale = x.abs().amax(dim=1, ).clamp(min=1e-5) / max_int',
        KEEPDIM),
    _eq('numerics.quantizer.x_compute_qparams__mutmut_58',
        'scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / max_int',
        'scale = x.abs().amax(dim=1, keepdim=False).clamp(min=1e-5) / max_int',
        KEEPDIM),
    _eq('numerics.quantizer.x_quantize__mutmut_48',
        'q = torch.round(x / s).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + z',
        'q = torch.round(x / s).clamp(None, 2 ** (bits - 1) - 1) + z',
        SYM_CLAMP),
    _eq('numerics.quantizer.x_quantize__mutmut_49',
        'q = torch.round(x / s).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + z',
        'q = torch.round(x / s).clamp(-(2 ** (bits - 1)), None) + z',
        SYM_CLAMP),
    _eq('numerics.quantizer.x_quantize__mutmut_51',
        'q = torch.round(x / s).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + z',
        'q = torch.round(x / s).clamp(-(2 ** (bits - 1)), ) + z',
        SYM_CLAMP),
    _eq('numerics.quantizer.x_quantize__mutmut_56',
        'q = torch.round(x / s).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + z',
        'q = torch.round(x / s).clamp(-(3 ** (bits - 1)), 2 ** (bits - 1) - 1) + z',
        SYM_CLAMP),
    _eq('numerics.quantizer.x_quantize__mutmut_57',
        'q = torch.round(x / s).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + z',
        'q = torch.round(x / s).clamp(-(2 ** (bits + 1)), 2 ** (bits - 1) - 1) + z',
        SYM_CLAMP),
    _eq('numerics.quantizer.x_quantize__mutmut_59',
        'q = torch.round(x / s).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + z',
        'q = torch.round(x / s).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) + 1) + z',
        SYM_CLAMP),
    _eq('numerics.quantizer.x_quantize__mutmut_61',
        'q = torch.round(x / s).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + z',
        'q = torch.round(x / s).clamp(-(2 ** (bits - 1)), 3 ** (bits - 1) - 1) + z',
        SYM_CLAMP),
    _eq('numerics.quantizer.x_quantize__mutmut_62',
        'q = torch.round(x / s).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + z',
        'q = torch.round(x / s).clamp(-(2 ** (bits - 1)), 2 ** (bits + 1) - 1) + z',
        SYM_CLAMP),
    _eq('numerics.bitpack.x__by_rows__mutmut_14',
        'if x.shape[0] <= rows:',
        'if x.shape[0] < rows:',
        'rows == block size: one block either way (fn on all rows vs a one-element torch.cat of the same call)'),
    _eq('numerics.bitpack.x__dense_slots__mutmut_4',
        'start = torch.arange(32, dtype=torch.int64, device=device) * bits',
        'start = torch.arange(32, dtype=None, device=device) * bits',
        INT64_DEFAULT),
    _eq('numerics.bitpack.x__dense_slots__mutmut_7',
        'start = torch.arange(32, dtype=torch.int64, device=device) * bits',
        'start = torch.arange(32, device=device) * bits',
        INT64_DEFAULT),
    _eq('numerics.bitpack.x_pack_int32__mutmut_24',
        'shifts = torch.arange(pf, dtype=torch.int64, device=values.device) * bits',
        'shifts = torch.arange(pf, dtype=None, device=values.device) * bits',
        INT64_DEFAULT),
    _eq('numerics.bitpack.x_pack_int32__mutmut_27',
        'shifts = torch.arange(pf, dtype=torch.int64, device=values.device) * bits',
        'shifts = torch.arange(pf, device=values.device) * bits',
        INT64_DEFAULT),
    _eq('numerics.bitpack.x_unpack_int32__mutmut_33',
        'shifts = torch.arange(pf, dtype=torch.int64, device=packed.device) * bits',
        'shifts = torch.arange(pf, dtype=None, device=packed.device) * bits',
        INT64_DEFAULT),
    _eq('numerics.bitpack.x_unpack_int32__mutmut_36',
        'shifts = torch.arange(pf, dtype=torch.int64, device=packed.device) * bits',
        'shifts = torch.arange(pf, device=packed.device) * bits',
        INT64_DEFAULT),
    _eq('numerics.bitpack.x_as_int16_bits__mutmut_8',
        'return torch.where(x >= 2**15, x - 2**16, x).to(torch.int16)',
        'return torch.where(x > 2**15, x - 2**16, x).to(torch.int16)',
        WRAP16),
    _eq('numerics.bitpack.x_as_int16_bits__mutmut_9',
        'return torch.where(x >= 2**15, x - 2**16, x).to(torch.int16)',
        'return torch.where(x >= 2 * 15, x - 2**16, x).to(torch.int16)',
        WRAP16),
    _eq('numerics.bitpack.x_as_int16_bits__mutmut_10',
        'return torch.where(x >= 2**15, x - 2**16, x).to(torch.int16)',
        'return torch.where(x >= 3**15, x - 2**16, x).to(torch.int16)',
        WRAP16),
    _eq('numerics.bitpack.x_as_int16_bits__mutmut_11',
        'return torch.where(x >= 2**15, x - 2**16, x).to(torch.int16)',
        'return torch.where(x >= 2**16, x - 2**16, x).to(torch.int16)',
        WRAP16),
    _eq('numerics.bitpack.x_as_int16_bits__mutmut_12',
        'return torch.where(x >= 2**15, x - 2**16, x).to(torch.int16)',
        'return torch.where(x >= 2**15, x + 2**16, x).to(torch.int16)',
        WRAP16),
    _eq('numerics.bitpack.x_as_int16_bits__mutmut_15',
        'return torch.where(x >= 2**15, x - 2**16, x).to(torch.int16)',
        'return torch.where(x >= 2**15, x - 2**17, x).to(torch.int16)',
        WRAP16),
    _eq('numerics.bitpack.x_as_int32_bits__mutmut_8',
        'return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)',
        'return torch.where(x > 2**31, x - 2**32, x).to(torch.int32)',
        WRAP32),
    _eq('numerics.bitpack.x_as_int32_bits__mutmut_9',
        'return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)',
        'return torch.where(x >= 2 * 31, x - 2**32, x).to(torch.int32)',
        WRAP32),
    _eq('numerics.bitpack.x_as_int32_bits__mutmut_10',
        'return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)',
        'return torch.where(x >= 3**31, x - 2**32, x).to(torch.int32)',
        WRAP32),
    _eq('numerics.bitpack.x_as_int32_bits__mutmut_11',
        'return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)',
        'return torch.where(x >= 2**32, x - 2**32, x).to(torch.int32)',
        WRAP32),
    _eq('numerics.bitpack.x_as_int32_bits__mutmut_12',
        'return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)',
        'return torch.where(x >= 2**31, x + 2**32, x).to(torch.int32)',
        WRAP32),
    _eq('numerics.bitpack.x_as_int32_bits__mutmut_15',
        'return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)',
        'return torch.where(x >= 2**31, x - 2**33, x).to(torch.int32)',
        WRAP32),
    _eq('numerics.bitpack.x_pack_dense_int32__mutmut_22',
        'if c % 32:',
        'if c / 32:',
        'c / 32 is truthy when c % 32 is; the zero block it adds when c % 32 == 0 is cut by [:, :dense_word_count]'),
    _eq('numerics.bitpack.x_pack_dense_int32__mutmut_57',
        'out = torch.zeros(r, v.shape[1], bits + 1, dtype=torch.int64, device=v.device)  # one spare word for spills',
        'out = torch.zeros(r, v.shape[1], bits + 2, dtype=torch.int64, device=v.device)  # one spare word for spills',
        'a second spare word per block is never read: only out[..., :bits] is kept'),
    _eq('numerics.bitpack.x_unpack_dense_int32__mutmut_43',
        'words = F.pad(rows.to(torch.int64) & 0xFFFFFFFF, (0, blocks * bits - w + 1)).unfold(1, bits + 1, bits)',
        'words = F.pad(rows.to(torch.int64) & 0xFFFFFFFF, (0, blocks * bits + w + 1)).unfold(1, bits + 1, bits)',
        DENSE_PAD),
    _eq('numerics.bitpack.x_unpack_dense_int32__mutmut_45',
        'words = F.pad(rows.to(torch.int64) & 0xFFFFFFFF, (0, blocks * bits - w + 1)).unfold(1, bits + 1, bits)',
        'words = F.pad(rows.to(torch.int64) & 0xFFFFFFFF, (0, blocks * bits - w + 2)).unfold(1, bits + 1, bits)',
        DENSE_PAD),
    _eq('numerics.bitpack.x_unpack_dense_int32__mutmut_105',
        'return _by_rows(block, packed, blocks * 32)',
        'return _by_rows(block, packed, blocks * 33)',
        'only changes how many rows go in one block (memory), never the values: blocks are concatenated in order'),
    _eq('numerics.bitpack.x_unpack_int32__mutmut_28',
        'if w * pf < cols or (w - 1) * pf >= max(cols, 1):',
        'if w * pf < cols or (w - 1) * pf >= max(cols, 2):',
        "(w - 1) * pf is a multiple of pf >= 4, never 1: '>= max(cols, 1)' and '>= max(cols, 2)' agree"),
    _eq('numerics.bitpack.x_unpack_int32__mutmut_49',
        'words = rows.to(torch.int64) & 0xFFFFFFFF',
        'words = rows.to(None) & 0xFFFFFFFF',
        'int32 & 0xFFFFFFFF is an identity; the int64 shift + mask read the same low 32 bits, sign extended or not'),
    _eq('numerics.qtensor.xǁQTensorǁ__post_init____mutmut_16',
        'if self.group_size != -1 and (self.group_size <= 0 or k % self.group_size):',
        'if self.group_size != -1 and (self.group_size < 0 or k % self.group_size):',
        'group_size 0 never reaches this check: group_count(k, 0) above raises ZeroDivisionError first'),
    _eq('formats.compressed_tensors.x_pack__mutmut_20',
        '"weight_shape": torch.tensor([n, k], dtype=torch.int64),',
        '"weight_shape": torch.tensor([n, k], dtype=None),',
        INT64_DEFAULT),
    _eq('formats.compressed_tensors.x_pack__mutmut_22',
        '"weight_shape": torch.tensor([n, k], dtype=torch.int64),',
        '"weight_shape": torch.tensor([n, k], ),',
        INT64_DEFAULT),
    _eq('formats.tinychat.x__pack_q__mutmut_4',
        'order = torch.tensor(CHUNK_ORDER, device=q.device)',
        'order = torch.tensor(CHUNK_ORDER, device=None)',
        CPU_INDEX),
    _eq('formats.tinychat.x__pack_q__mutmut_6',
        'order = torch.tensor(CHUNK_ORDER, device=q.device)',
        'order = torch.tensor(CHUNK_ORDER, )',
        CPU_INDEX),
    _eq('formats.tinychat.x__unpack_q__mutmut_57',
        'inverse = torch.tensor(sorted(range(32), key=CHUNK_ORDER.__getitem__), device=word.device)',
        'inverse = torch.tensor(sorted(range(32), key=CHUNK_ORDER.__getitem__), device=None)',
        CPU_INDEX),
    _eq('formats.tinychat.x__unpack_q__mutmut_59',
        'inverse = torch.tensor(sorted(range(32), key=CHUNK_ORDER.__getitem__), device=word.device)',
        'inverse = torch.tensor(sorted(range(32), key=CHUNK_ORDER.__getitem__), )',
        CPU_INDEX),
    _eq('formats.tinychat.x__unpack_q__mutmut_4',
        'word = qweight.to(torch.int64) & 0xFFFF',
        'word = qweight.to(None) & 0xFFFF',
        'int16 & 0xFFFF is an identity; the int64 shifts + & 0xF read the same low 16 bits, sign extended or not'),
    _eq('formats.tinychat.x_pack__mutmut_29',
        'scaled_zeros[:g] = (-(qt.scale.float() * qt.zero.float())).to(qt.scale.dtype).t()',
        'scaled_zeros[:g] = (-(qt.scale.float() * qt.zero.float())).to(None).t()',
        'assigning into scaled_zeros (scale dtype) rounds to that dtype exactly as .to(qt.scale.dtype) did'),
    _eq('quant.awq.x__cols__mutmut_4',
        'return s if index is None else s[index.to(s.device)]',
        'return s if index is None else s[index.to(None)]',
        CPU_INDEX),
    _eq('quant.awq.x_apply_scales__mutmut_78',
        'put(f"{prefix}{name}.weight", lambda t: t * s_cols.view(1, -1))',
        'put(f"{prefix}{name}.weight", lambda t: t * s_cols.view(-1))',
        't (N, K) * s_cols broadcasts (K,) exactly as (1, K)'),
    _eq('quant.awq.x_scale_quantize__mutmut_5',
        's = s_cols.view(1, -1).to(w.dtype)',
        's = s_cols.view(-1).to(w.dtype)',
        'w (N, K) * s broadcasts (K,) exactly as (1, K), and so does the division'),
    _eq('quant.awq.x_search_scales__mutmut_7',
        'best, best_ratio, best_scales = float("inf"), -1.0, None',
        'best, best_ratio, best_scales = float("INF"), -1.0, None',
        'float("INF") == float("inf")'),
    _eq('quant.awq.x_search_scales__mutmut_8',
        'best, best_ratio, best_scales = float("inf"), -1.0, None',
        'best, best_ratio, best_scales = float("inf"), +1.0, None',
        BEST_RATIO),
    _eq('quant.awq.x_search_scales__mutmut_9',
        'best, best_ratio, best_scales = float("inf"), -1.0, None',
        'best, best_ratio, best_scales = float("inf"), -2.0, None',
        BEST_RATIO),
    _eq('quant.awq.x_weight_mean__mutmut_5',
        'w = torch.cat([x.float() for x in weights], dim=0)  # (N, K)',
        'w = torch.cat([x.float() for x in weights], )  # (N, K)',
        'torch.cat concatenates along dim 0 by default'),
]


# ---- configuration ----------------------------------------------------------------------------------------------

def load_config() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mutmut"]


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def select_modules(configured: list[str], wanted: list[str] | None) -> list[str]:
    """The configured module paths that ``wanted`` names (a path, a dotted name or a unique suffix: "quantizer",
    "formats/autoawq.py", "nvila_quant.quant.awq"); all of them without ``wanted``."""
    if not wanted:
        return list(configured)
    out = []
    for w in wanted:
        key = w.removesuffix(".py").replace(".", "/")
        hits = [p for p in configured if p.removesuffix(".py") == key or p.removesuffix(".py").endswith("/" + key)]
        if len(hits) != 1:
            raise SystemExit(f"--modules {w!r} matches {hits or 'none'} of the configured modules: {configured}")
        out += [h for h in hits if h not in out]
    return out


def mutmut_executable() -> str:
    exe = Path(sys.executable).parent / "mutmut"
    if exe.exists():
        return str(exe)
    found = shutil.which("mutmut")
    if not found:
        raise SystemExit('mutmut is not installed: .venv/bin/python -m pip install -e ".[dev,mutation]"')
    return found


# ---- running --------------------------------------------------------------------------------------------------

def run_mutmut(max_children: int, globs: list[str], quiet: bool) -> tuple[int, float, str]:
    argv = [mutmut_executable(), "run", "--max-children", str(max_children), *globs]
    env = {**os.environ, **ENV}
    print("running:", " ".join(argv), flush=True)
    t = time.perf_counter()
    if quiet:
        res = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        tail = (res.stdout + res.stderr)[-4000:]
    else:
        res = subprocess.run(argv, cwd=REPO, env=env, check=False)
        tail = ""
    return res.returncode, time.perf_counter() - t, tail


# ---- collecting -----------------------------------------------------------------------------------------------

def read_meta(path: str) -> dict:
    meta = MUTANTS / (path + ".meta")
    if not meta.exists():
        raise SystemExit(f"{meta} is missing: mutmut did not run on {path} (run without --collect-only)")
    return json.loads(meta.read_text())


def diff_of(mutant: str, path: str) -> str:
    """mutmut's unified diff of one mutant (its function, original vs mutated)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    cwd = os.getcwd()
    os.chdir(REPO)  # mutmut reads mutants/<path>
    try:
        return get_diff_for_mutant(mutant, path=path)
    except Exception as e:  # noqa: BLE001 - a missing diff must not lose the run
        return f"(no diff: {type(e).__name__}: {e})"
    finally:
        os.chdir(cwd)


def changed_lines(diff: str) -> tuple[list[str], list[str]]:
    lines = diff.splitlines()
    removed = [x[1:].strip() for x in lines if x.startswith("-") and not x.startswith("---")]
    added = [x[1:].strip() for x in lines if x.startswith("+") and not x.startswith("+++")]
    return removed, added


def as_list(x: str | list[str]) -> list[str]:
    return [x] if isinstance(x, str) else list(x)


def function_of(mutant: str) -> str:
    """``nvila_quant.numerics.qtensor.xǁQTensorǁequal__mutmut_3`` -> ``QTensor.equal``."""
    name = mutant.rsplit(".", 1)[-1]
    name = re.sub(r"__mutmut_\d+$", "", name)
    name = name.removeprefix("x_").removeprefix("x")
    return ".".join(p for p in name.split("ǁ") if p)


def collect(paths: list[str]) -> dict:
    from mutmut.stats import status_by_exit_code

    equivalent_by_id = {e["id"]: e for e in EQUIVALENT}
    modules, not_killed, equivalent, stale = {}, [], [], []
    for path in paths:
        meta = read_meta(path)
        counts = dict.fromkeys(STATUSES, 0)
        n_equivalent = 0
        for mutant, code in sorted(meta["exit_code_by_key"].items(), key=lambda kv: _natural(kv[0])):
            status = status_by_exit_code[code]
            counts[status] = counts.get(status, 0) + 1
            if status == "killed":
                continue
            diff = diff_of(mutant, path)
            entry = {"id": mutant, "module": module_name(path), "function": function_of(mutant), "status": status,
                     "diff": diff}
            removed, added = changed_lines(diff)
            eq = equivalent_by_id.get(mutant)
            if eq is not None and status == "survived":
                if (as_list(eq["removed"]), as_list(eq["added"])) == (removed, added):
                    n_equivalent += 1
                    entry["equivalent"] = eq["reason"]
                    equivalent.append({"id": mutant, "module": module_name(path), "removed": removed,
                                       "added": added, "reason": eq["reason"]})
                else:
                    stale.append({"id": mutant, "expected": {"removed": as_list(eq["removed"]),
                                                             "added": as_list(eq["added"])},
                                  "got": {"removed": removed, "added": added}})
            not_killed.append(entry)
        total = sum(counts.values())
        modules[module_name(path)] = {"path": path, "total": total, **{k.replace(" ", "_"): v for k, v in
                                                                        counts.items()},
                                      "equivalent": n_equivalent, **rates(counts, total, n_equivalent)}
    listed = {e["id"] for e in EQUIVALENT}
    seen = {m for p in paths for m in read_meta(p)["exit_code_by_key"]}
    selected_prefixes = tuple(module_name(p) + "." for p in paths)
    missing = sorted(i for i in listed - seen if i.startswith(selected_prefixes))
    totals = dict.fromkeys(STATUSES, 0)
    for m in modules.values():
        for k in STATUSES:
            totals[k] += m[k.replace(" ", "_")]
    total, n_eq = sum(totals.values()), len(equivalent)
    overall = {"total": total, **{k.replace(" ", "_"): v for k, v in totals.items()}, "equivalent": n_eq,
               **rates(totals, total, n_eq)}
    return {"modules": modules, "overall": overall, "not_killed": not_killed, "equivalent": equivalent,
            "stale_equivalent_entries": stale, "equivalent_entries_without_mutant": missing}


def rates(counts: dict, total: int, n_equivalent: int) -> dict:
    denom = total - n_equivalent
    return {"kill_rate": counts["killed"] / denom if denom else None,
            "detected_rate": (counts["killed"] + counts["timeout"]) / denom if denom else None}


def _natural(name: str) -> tuple:
    m = re.search(r"__mutmut_(\d+)$", name)
    return (name[: m.start()] if m else name, int(m.group(1)) if m else 0)


# ---- reporting ------------------------------------------------------------------------------------------------

COLUMNS = ["module", "total", "killed", "survived", "equivalent", "timeout", "suspicious", "no_tests", "kill_rate"]


def print_table(res: dict) -> None:
    rows = [{"module": name, **m} for name, m in res["modules"].items()] + [{"module": "overall", **res["overall"]}]

    def fmt(v: object) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%" if isinstance(v, float) else str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in COLUMNS}
    print("  ".join(c.ljust(widths[c]) for c in COLUMNS))
    print("  ".join("-" * widths[c] for c in COLUMNS))
    for r in rows:
        print("  ".join(fmt(r.get(c)).ljust(widths[c]) for c in COLUMNS))
    survivors = [e for e in res["not_killed"] if "equivalent" not in e]
    if survivors:
        print(f"\nnot killed ({len(survivors)}; `mutmut show <id>` while mutants/ exists):")
        for e in survivors:
            removed, added = changed_lines(e["diff"])
            print(f"  {e['status']:<10} {e['id']}\n      - {' | '.join(removed)}\n      + {' | '.join(added)}")
    for s in res["stale_equivalent_entries"]:
        print(f"warning: EQUIVALENT entry {s['id']} no longer matches its mutant (got {s['got']}); counted as a "
              "survivor: review it again")
    for i in res["equivalent_entries_without_mutant"]:
        print(f"warning: EQUIVALENT entry {i} matches no mutant of this run")


def test_command(cfg: dict) -> dict:
    selection = cfg.get("pytest_add_cli_args_test_selection", [])
    extra = cfg.get("pytest_add_cli_args", [])
    q = " ".join(f'"{a}"' if " " in a else a for a in extra)
    return {
        "selection": selection,
        "pytest_add_cli_args": extra,
        "baseline": f"HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest {' '.join(selection)} {q}",
        "per_mutant": "(in mutants/) python -m pytest --rootdir=. --tb=native -x -q -p no:randomly "
                      f"-p no:random-order <the selected tests that call the mutated function> {q}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2, metavar="N",
                        help="parallel mutant workers passed to `mutmut run --max-children` (default: the CPU "
                             "count, %(default)s here)")
    parser.add_argument("--modules", nargs="+", default=None, metavar="NAME",
                        help="mutate and report only these of [tool.mutmut] only_mutate: a path, a dotted name or "
                             "a unique suffix (quantizer, formats/autoawq.py, nvila_quant.quant.awq); default: all")
    parser.add_argument("--reuse", action="store_true",
                        help="keep an existing mutants/ folder: mutmut then re-tests only mutants it has no result "
                             "for (or, with --modules, the named modules' mutants); default: start from scratch")
    parser.add_argument("--keep-mutants", action="store_true",
                        help="leave mutants/ in place afterwards (for `mutmut show <id>`, `mutmut browse`, --reuse, "
                             "--collect-only); default: delete it")
    parser.add_argument("--collect-only", action="store_true",
                        help="do not run mutmut: report the results already in mutants/ (implies --keep-mutants)")
    parser.add_argument("--quiet", action="store_true",
                        help="capture mutmut's progress output (printed only when it fails)")
    parser.add_argument("--results", type=Path, default=None,
                        help="root folder of the result files (default: $NVILA_QUANT_RESULTS or benchmarks/results);"
                             " the run goes to <root>/mutation/<UTC time>-<cpu>.json")
    parser.add_argument("--no-write", action="store_true", help="print the table only, write no result file")
    parser.add_argument("--fail-under", type=float, default=None, metavar="PCT",
                        help="exit with status 2 when the overall kill rate is below PCT percent (e.g. 90)")
    args = parser.parse_args(argv)

    cfg = load_config()
    paths = select_modules(cfg["only_mutate"], args.modules)
    globs = [] if args.modules is None else [module_name(p) + ".*" for p in paths]
    keep = args.keep_mutants or args.collect_only
    seconds = None
    try:
        if not args.collect_only:
            if MUTANTS.exists() and not args.reuse:
                print(f"removing the previous {MUTANTS}", flush=True)
                shutil.rmtree(MUTANTS)
            rc, seconds, tail = run_mutmut(args.max_children, globs, args.quiet)
            if rc != 0:
                print(tail, file=sys.stderr)
                print(f"mutmut run failed (exit status {rc})", file=sys.stderr)
                return rc
        res = collect(paths)
    finally:
        if not keep and MUTANTS.exists():
            shutil.rmtree(MUTANTS)
    print()
    print_table(res)
    overall = res["overall"]["kill_rate"]
    print(f"\noverall kill rate {100 * (overall or 0):.1f}% ({res['overall']['killed']} killed of "
          f"{res['overall']['total']} mutants, {res['overall']['equivalent']} equivalent set aside)"
          + (f" in {seconds / 60:.1f} min" if seconds is not None else ""))
    if not args.no_write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _common import write_result

        payload = {
            "tool": "mutmut", "tool_version": metadata.version("mutmut"),
            "command": ["mutmut", "run", "--max-children", str(args.max_children), *globs],
            "max_children": args.max_children, "seconds": seconds, "reused_mutants": bool(args.reuse or
                                                                                           args.collect_only),
            "modules_selected": paths, "test_command": test_command(cfg),
            "kill_rate_definition": "killed / (total - equivalent survivors); detected_rate adds timeouts",
            **res,
        }
        variant = None if args.modules is None else "modules-" + "-".join(Path(p).stem for p in paths)
        out = write_result(BENCHMARK, payload, variant=variant, root=args.results)
        print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    if args.fail_under is not None and (overall or 0) * 100 < args.fail_under:
        print(f"overall kill rate below {args.fail_under}%", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
