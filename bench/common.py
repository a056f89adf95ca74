"""Shared helpers for the model benchmarks (``bench/train_step.py``, ``bench/loop_memory.py``,
``bench/gpu_mfu.py``): the Hugging Face Llama peer, interleaved A/B timing, CPU memory
measurement and a plain-text table.

Memory on CPU
-------------
There is no caching allocator on CPU to ask for a high-water mark, and ``tracemalloc`` does not
see torch tensors. We use two honest measures:

- :func:`peak_alloc_bytes` (the primary number): run the step once under ``torch.profiler`` with
  ``profile_memory=True``. Every allocation and free made by torch's CPU allocator is recorded
  with its size and timestamp; the running sum over time, maximised, is the peak of tensor bytes
  allocated *on top of* what was live when the step began (parameters, optimizer state). It counts
  activations saved for backward, gradients, temporaries and the optimizer's scratch space, and
  nothing else (no allocator slack, no Python objects, no shared libraries).
- :func:`max_rss_bytes` in a fresh subprocess per configuration (``--rss``): the kernel's
  peak RSS (``VmHWM``) -- everything the process ever touched: interpreter, libraries, weights,
  optimizer state, glibc's heap slack. Coarse but independent of torch's bookkeeping.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mythos.model.config import ModelConfig  # noqa: E402
from mythos.model.loss import IGNORE_INDEX  # noqa: E402
from mythos.tools.export import hf_llama_config, hf_llama_state_dict  # noqa: E402

# ---------------------------------------------------------------------------------------------
# the peer


def build_hf_llama(cfg: ModelConfig, source: nn.Module | None = None, *, attn: str = "sdpa") -> nn.Module:
    """A ``transformers.LlamaForCausalLM`` with exactly ``cfg``'s architecture (built from the same
    config dict the exporter writes) and, when ``source`` (our dense model) is given, exactly its
    weights. SDPA attention, like ours."""
    import transformers

    raw = hf_llama_config(cfg)
    for key in ("architectures", "model_type", "dtype", "torch_dtype"):
        raw.pop(key, None)
    hcfg = transformers.LlamaConfig(**raw)
    hcfg._attn_implementation = attn
    model = transformers.LlamaForCausalLM(hcfg)
    if source is not None:
        sd = hf_llama_state_dict(source.state_dict(), cfg)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        allowed = {"lm_head.weight"} if cfg.tie_embeddings else set()
        if set(missing) - allowed or unexpected:
            raise RuntimeError(f"HF peer weight mismatch: missing {missing}, unexpected {unexpected}")
        if cfg.tie_embeddings:
            model.tie_weights()
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def shifted_labels(ids: torch.Tensor) -> torch.Tensor:
    """Our models take labels already shifted (position i predicts ids[i+1]); HF shifts inside."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)


def loss_ours(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, **kw) -> torch.Tensor:
    return model(ids, labels, **kw).loss


def loss_hf(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    # HF computes the same mean CE over the same B*(S-1) targets (labels shifted internally, fp32).
    return model(input_ids=ids, labels=ids, use_cache=False).loss


# ---------------------------------------------------------------------------------------------
# timing


def interleaved(fns: dict[str, Callable[[], object]], *, warmup: int, reps: int) -> dict[str, list[float]]:
    """Run each function ``warmup`` times, then ``reps`` rounds of A, B, A, B ... (order rotated
    each round so neither side always runs right after the other), returning seconds per call.
    Interleaving makes both sides see the same background load on a shared machine."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t = time.perf_counter()
            fns[n]()
            out[n].append(time.perf_counter() - t)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


# ---------------------------------------------------------------------------------------------
# memory


def peak_alloc_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by torch's CPU allocator during ``fn()`` above the level at its start
    (see the module docstring). Runs ``fn`` once under the profiler (not for timing)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        if str(e.device_type()) != "DeviceType.CPU":
            continue
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def max_rss_bytes() -> int:
    """Peak resident set size of this process image: ``VmHWM`` from ``/proc/self/status``.

    Not ``getrusage().ru_maxrss``: Linux carries that over fork+exec, so a benchmark child would
    report its (bigger) parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------
# reporting


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    import transformers

    return (f"{cpu}; {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}; "
            f"load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"
