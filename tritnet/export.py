"""A portable export: a model's inference state in one safetensors file.

    tritnet export runs/tiny/ckpt.h5 -o tiny.safetensors
    python examples/numpy_inference.py tiny.safetensors --prompt "def "

The file holds what a forward pass reads and nothing else:

    <module>.trits    uint8 (rows, ceil(cols/5))   every ternary matrix (layers, embeddings,
                                                  code books, memory values), packed base3-5
                                                  as in checkpoints: byte k of a row is
                                                  sum_{i<5} (t[5k+i] + 1) * 3**i
    <module>.E        int8 (rows,)                its row exponents: s = 2 ** (E / 8)
    <graph>.dst       int32 (slots,)              each code graph's edge table: destination
    <graph>.attr      int8                        codes (-1: an empty slot), ternary signs,
    <graph>.score     int8                        scores. A code's out-edges are in its
    <graph>.src       int32 (slots,)              bucket: the code itself in a dense graph
                                                  (then slot i is code i // graph_slots's and
                                                  src is left out), else mix64(code) mod
                                                  buckets, where src says whose edge it is

and as metadata (text): format, format_version, tritnet_version, config and tokenizer (JSON;
tokenizer only for subword runs), trit_cols (JSON: the columns of each packed matrix),
packing and scale (the rules above), source and step (the checkpoint it came from). Not
exported: the optimiser's accumulators (T_accum, E_accum), VQ usage counts, anything only
training reads. Module paths are the model's (`blocks.0.attn.q`, `shared_vq`, ...).

safetensors (the export extra) writes it; any safetensors reader opens it.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np

from . import __version__, backend
from .errors import TritnetError
from .models import CodeGraph
from .nn.ternary import TernaryModule
from tritnet_kernels import packing as kpacking

EXPORT_FORMAT = "tritnet-export"
EXPORT_VERSION = 1
PACKING = ("base3-5: uint8 (rows, ceil(cols/5)), byte k of a row = sum_{i<5} (t[5k+i] + 1) * "
           "3**i, trits t in {-1, 0, +1}, padding t = 0")
SCALE = "w[r, c] = 2 ** (E[r] / 8) * t[r, c], E int8 per row"


class ExportError(TritnetError, ValueError):
    """A model that cannot be exported, or a file that cannot be written; says what to do."""


def inference_state(model) -> tuple:
    """(tensors: name -> numpy array, trit_cols: packed name -> columns) of a model: what a
    forward pass reads. A module with state this exporter does not know is refused, so an
    export never silently lacks what its model computes with."""
    tensors, cols = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, TernaryModule):
            rows, width = module.trit_shape
            tensors[f"{name}.trits"] = backend.to_numpy(
                kpacking.bitplane_to_base3(module.T_packed, width))
            tensors[f"{name}.E"] = backend.to_numpy(module.E)
            cols[f"{name}.trits"] = int(width)
        elif isinstance(module, CodeGraph):
            src, dst, attr, score = (backend.to_numpy(a) for a in module.edges())
            if not module.dense:
                tensors[f"{name}.src"] = src
            elif ((dst != -1) & (src != np.arange(len(src)) // module.slots)).any():
                raise ExportError(f"code graph {name}: an edge sits in another code's slots, "
                                  "which a dense graph never writes; the model is damaged")
            tensors.update({f"{name}.dst": dst, f"{name}.attr": attr, f"{name}.score": score})
        elif any(b is not None for b in module._buffers.values()):
            raise ExportError(f"module {name or 'the model'} ({type(module).__name__}) holds "
                              "state the exporter does not know; it exports ternary modules "
                              "and code graphs")
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}, cols


def export_checkpoint(checkpoint, out) -> dict:
    """Write the inference state of the checkpoint's model (verified whole first) to `out`, a
    .safetensors file, atomically. Returns {"tensors", "export_bytes", "checkpoint_bytes"}."""
    from .sample import load_model
    from .tokenizer import checkpoint_tokenizer
    from .checkpoint import read_header
    checkpoint, out = os.fspath(checkpoint), os.fspath(out)
    if not out.endswith(".safetensors"):
        raise ExportError(f"{out}: an export is a .safetensors file; end the name in "
                          ".safetensors")
    if os.path.exists(out) and os.path.exists(checkpoint) and os.path.samefile(out, checkpoint):
        raise ExportError(f"{out} is the checkpoint itself; write the export to another file")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ExportError(f"cannot write {out}: folder {folder} does not exist; create it or "
                          "choose another -o")
    try:
        from safetensors import SafetensorError
        from safetensors.numpy import save_file
    except ImportError:
        raise ExportError("tritnet export needs the safetensors library, which is not "
                          "installed: pip install \"tritnet[export]\" (or pip install "
                          "safetensors)") from None
    model, config = load_model(checkpoint, device="cpu")
    tokenizer = checkpoint_tokenizer(checkpoint)
    tensors, cols = inference_state(model)
    step = read_header(checkpoint)["train_state"].get("step")
    metadata = {"format": EXPORT_FORMAT, "format_version": str(EXPORT_VERSION),
                "tritnet_version": __version__, "config": json.dumps(config.to_dict()),
                "trit_cols": json.dumps(cols), "packing": PACKING, "scale": SCALE,
                "source": os.path.basename(checkpoint), "step": json.dumps(step)}
    if tokenizer is not None:
        metadata["tokenizer"] = tokenizer.to_json()
    tmp = os.path.join(folder, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    try:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)   # the library creates the file private (0600): give it the
        os.umask(umask)       # permissions any other file written here gets
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except (OSError, SafetensorError) as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = getattr(e, "strerror", None) or " ".join(str(e).split())
        raise ExportError(f"cannot write {out} ({cause}); free disk space or choose another "
                          "-o") from None
    return {"tensors": len(tensors), "export_bytes": os.path.getsize(out),
            "checkpoint_bytes": os.path.getsize(checkpoint)}
