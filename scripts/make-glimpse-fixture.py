#!/usr/bin/env python3
"""Writes integration/tests/fixtures/glimpse_upstream/: GlimpsePrune's saved
modules as its authors release them (config.json and new_modules_gp.pt),
small and with seeded random values, plus the same tensors as
new_modules_gp.safetensors, for integration/tests/glimpse_checkpoint.rs.

No torch here: new_modules_gp.pt is written the way torch.save writes it
(a zip archive, stored, with <name>/data.pkl, <name>/data/<key>,
<name>/version, <name>/byteorder). torch.save pickles with Python's own
Pickler at protocol 2, each storage as a persistent id
('storage', torch.BFloat16Storage, key, location, numel) and each tensor as
torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, OrderedDict()); this script does the same with stand-ins for
those two torch names registered under their modules, so the pickle stream
is the one Python's Pickler emits for a real checkpoint. The top level is
the authors' save_new_modules dictionary: {"attn_fuser": state_dict,
"learnable_embeddings": tensor, "le_proj": state_dict, "le_norm":
state_dict}, each state dict an OrderedDict carrying `_metadata`, as
Module.state_dict() returns it.

Shapes: a decoder of width 64 with 4 query heads and 6 layers, a ViT of
width 32 (the test's small model), AttnFuserV1 with E = F = 16, 2 heads,
conditioning ViT layers [3, 1], deep supervision on (an output projection
per block: the file holds both, inference reads the last), glimpse
embeddings for layers 0..3. Values: normal, std 1/sqrt(fan_in) for
matrices, near 1 for norm weights, small biases, rounded to bfloat16.

Run from the repository root: python3 scripts/make-glimpse-fixture.py
"""

import collections
import io
import json
import math
import os
import pickle
import random
import struct
import sys
import types
import zipfile

OUT = os.path.join("integration", "tests", "fixtures", "glimpse_upstream")
DM, HEADS, LAYERS, VISION = 64, 4, 6, 32
E, F, FUSE_HEADS = 16, 16, 2
VISUAL_LAYERS = [3, 1]
LE_LAYERS = [0, 1, 2, 3]
SELECTED = [3]


# -- the two torch names a checkpoint's pickle refers to ---------------------
torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")


class BFloat16Storage:
    pass


BFloat16Storage.__module__ = "torch"


def _rebuild_tensor_v2(*args):
    raise RuntimeError("never called: this script only writes")


_rebuild_tensor_v2.__module__ = "torch._utils"
torch.BFloat16Storage = BFloat16Storage
torch._utils = torch_utils
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils


def bf16_bits(x):
    """float -> bfloat16 bits, round to nearest even (as torch's .to(bfloat16))."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


class Storage:
    def __init__(self, key, values):
        self.key = key
        self.data = b"".join(struct.pack("<H", bf16_bits(v)) for v in values)
        self.numel = len(values)


class Tensor:
    """Pickles as torch.Tensor does: _rebuild_tensor_v2 over a storage."""

    def __init__(self, storage, shape):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce_ex__(self, protocol):
        stride, s = [], 1
        for d in reversed(self.shape):
            stride.insert(0, s)
            s *= d
        args = (self.storage, 0, self.shape, tuple(stride), False, collections.OrderedDict())
        return (_rebuild_tensor_v2, args)


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", BFloat16Storage, obj.key, "cpu", obj.numel)
        return None


# -- the authors' modules, seeded ---------------------------------------------
rng = random.Random(16)
storages = []
flat = collections.OrderedDict()  # flattened name -> (shape, values), for safetensors


def tensor(name, shape, kind):
    n = math.prod(shape)
    if kind == "norm":
        values = [1.0 + 0.1 * rng.gauss(0, 1) for _ in range(n)]
    elif kind == "bias":
        values = [0.05 * rng.gauss(0, 1) for _ in range(n)]
    elif kind == "embedding":
        values = [rng.gauss(0, 1) for _ in range(n)]
    else:
        values = [rng.gauss(0, 1) / math.sqrt(shape[-1]) for _ in range(n)]
    st = Storage(str(len(storages)), values)
    storages.append(st)
    flat[name] = (list(shape), st)
    return Tensor(st, shape)


def state_dict(prefix, entries, modules):
    """An OrderedDict of tensors with Module.state_dict()'s _metadata."""
    sd = collections.OrderedDict()
    for name, shape, kind in entries:
        sd[name] = tensor(f"{prefix}.{name}", shape, kind)
    sd._metadata = collections.OrderedDict((m, {"version": 1}) for m in modules)
    return sd


def linear(name, fan_out, fan_in, bias=True):
    out = [(f"{name}.weight", (fan_out, fan_in), "matrix")]
    return out + ([(f"{name}.bias", (fan_out,), "bias")] if bias else [])


fuser, modules = [], ["", "attn_in_proj", "cond_in_projs", "layers", "attn_out_projs"]
fuser += linear("attn_in_proj", E, len(SELECTED) * HEADS)
for i in range(len(VISUAL_LAYERS)):
    fuser += linear(f"cond_in_projs.{i}", F, VISION)
    modules.append(f"cond_in_projs.{i}")
for i in range(len(VISUAL_LAYERS)):
    p = f"layers.{i}"
    fuser += [(f"{p}.norm1.weight", (E,), "norm"), (f"{p}.norm2.weight", (E,), "norm")]
    for proj, width in [("q_proj", E + F), ("k_proj", E + F), ("v_proj", E), ("o_proj", E)]:
        fuser += linear(f"{p}.attn.{proj}", width, width, bias=False)
    fuser += linear(f"{p}.mlp.gate_proj", 2 * E, E)
    fuser += linear(f"{p}.mlp.up_proj", 2 * E, E)
    fuser += linear(f"{p}.mlp.down_proj", E, 2 * E)
    modules += [p, f"{p}.norm1", f"{p}.norm2", f"{p}.attn", f"{p}.mlp"]
for i in range(len(VISUAL_LAYERS)):  # deep supervision: one per block
    fuser += linear(f"attn_out_projs.{i}", 1, E)
    modules.append(f"attn_out_projs.{i}")

new_states = {
    "attn_fuser": state_dict("attn_fuser", fuser, modules),
    "learnable_embeddings": tensor("learnable_embeddings", (len(LE_LAYERS), 1, DM), "embedding"),
    "le_proj": state_dict("le_proj", [("weight", (DM, DM), "matrix"), ("bias", (DM,), "bias")], [""]),
    "le_norm": state_dict("le_norm", [("weight", (DM,), "norm")], [""]),
}

config = {
    "architectures": ["LlavaLlamaForCausalLM_GP"],
    "model_type": "llava_llama_gp",
    "hidden_size": DM,
    "num_attention_heads": HEADS,
    "num_key_value_heads": 2,
    "num_hidden_layers": LAYERS,
    "rms_norm_eps": 1e-5,
    "mm_hidden_size": VISION,
    "rope_scaling": None,
    "torch_dtype": "bfloat16",
    "selected_layers": SELECTED,
    "reduce_layer": 3,
    "use_attention_logits": False,
    "attn_fuse_type": "AttnFuserV1",
    "attn_fuse_size": E,
    "visual_cond_size": F,
    "attn_fuse_num_heads": FUSE_HEADS,
    "attn_fuse_hidden_act": "silu",
    "ori_attn_supervision": True,
    "deep_supervision": True,
    "selected_visual_layers": VISUAL_LAYERS,
    "le_layers": LE_LAYERS,
    "le_length": 1,
    "le_dropout_prob": 0.0,
    "reduce_threshold": 0.5,
    "use_ref_masks": False,
    "use_zero_masks": False,
    "anchor_positions": ["tl", "br"],
    "min_remain_num": 1,
    "max_remain_ratio": 0.5,
}

os.makedirs(OUT, exist_ok=True)
with open(os.path.join(OUT, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")

# new_modules_gp.pt, as torch.save writes it.
buf = io.BytesIO()
TorchPickler(buf, protocol=2).dump(new_states)
def entry(z, name, data):
    """A stored entry with a fixed date, so that the file is reproducible."""
    z.writestr(zipfile.ZipInfo(f"new_modules_gp/{name}", (1980, 1, 1, 0, 0, 0)), data)


with zipfile.ZipFile(os.path.join(OUT, "new_modules_gp.pt"), "w", zipfile.ZIP_STORED) as z:
    entry(z, "data.pkl", buf.getvalue())
    entry(z, "byteorder", "little")
    for st in storages:
        entry(z, f"data/{st.key}", st.data)
    entry(z, "version", "3\n")

# The same tensors as safetensors, under the flattened names.
header, offset = {}, 0
for name, (shape, st) in flat.items():
    header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + len(st.data)]}
    offset += len(st.data)
text = json.dumps(header, separators=(",", ":")).encode()
text += b" " * (-len(text) % 8)
with open(os.path.join(OUT, "new_modules_gp.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for _, st in flat.values():
        f.write(st.data)
print(f"wrote {OUT}: {len(flat)} tensors, {offset} bytes of bfloat16")
