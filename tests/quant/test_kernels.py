"""Fast CPU paths for quantized weights (herd.quant.kernels): each path's output against exact dequantization
plus matmul, within the error it states (bit-exact where claimed), for plain linears, expert stacks, the path
selection, and a whole tiny GGUF model with the fast paths on and off. No timing is asserted."""

from __future__ import annotations

import os

import pytest
import torch

from herd.quant import formats, kernels, native
from herd.quant.qtensor import QTensor

INT4 = ["Q4_0", "Q4_1", "Q4_K"]
INT4X2 = ["Q8_0", "Q5_0", "Q5_1", "Q5_K"]
INT8 = ["Q6_K", "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"]
# bfloat16 activations, scales and outputs inside the fused kernels: relative error of a 256-long dot product
BF16_REL = 1e-2
# int8 path: the above plus one int8 step per row (requantized)
INT8_REL = 2.5e-2
# vnni path: weight rows and input rows both rounded to int8 (half a step of each row's largest value)
VNNI_REL = 2.5e-2


# The VNNI path is only chosen on CPUs with int8 dot products; elsewhere int8 products may saturate 16-bit
# intermediate sums (non-VNNI x86), so its tests need such a CPU. The other paths run on any CPU.
HAS_VNNI = kernels.has_int8_dot()
needs_vnni = pytest.mark.skipif(not HAS_VNNI, reason="CPU without AVX-512 VNNI / AVX-VNNI: herd never takes "
                                "the vnni path there (path_for returns the int4/int8 paths, tested here too)")


@pytest.fixture(params=[False, pytest.param(True, marks=needs_vnni)], ids=["avx2-paths", "vnni-path"])
def vnni(request, monkeypatch):
    """Run a test with the paths of a CPU without int8 dot products, then (on a CPU that has them) with the
    VNNI path."""
    monkeypatch.setattr(kernels, "_VNNI", request.param)
    return request.param


def _qt(shape, q, seed=0):
    x = 0.05 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return QTensor.quantize(x, q)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("q", INT4 + INT4X2)
def test_affine_parts_decode_exactly(q):
    w = _qt((64, 256), q)
    codes, step, offset = kernels.affine_parts(w.data, w.qtype)
    assert codes.dtype == torch.uint8 and int(codes.max()) < (16 if q in INT4 else 256)
    decoded = (codes.float().view(64, -1, 32) * step[..., None] + offset[..., None]).view(64, 256)
    assert torch.equal(decoded, w.dequantize())


def test_path_selection(vnni):
    if vnni:
        kq = native.vectorized()
        for q in INT4 + INT4X2 + INT8:
            # Q4_K / Q6_K take herd's own kernels where they are built (rows a multiple of 16)
            want = "kquant" if kq and q in ("Q4_K", "Q6_K") else "vnni"
            assert kernels.path_for(q, (4, 48, 256)) == want  # any shape: rows are independent
            assert kernels.path_for(q, (4, 40, 256)) == "vnni"
        assert kernels.path_for("IQ2_XXS", (64, 256)) == "dequant"
        return
    for q in INT4:
        assert kernels.path_for(q, (64, 256)) == "int4"
    for q in INT4X2:
        assert kernels.path_for(q, (4, 64, 256)) == "int4x2"
    for q in INT8:
        assert kernels.path_for(q, (64, 256)) == "int8"
    assert kernels.path_for("IQ2_XXS", (64, 256)) == "dequant"
    assert kernels.path_for("Q4_K", (48, 256)) == "dequant"  # int4 works on blocks of 32 output rows
    w = _qt((64, 256), "Q4_K")
    assert w._fast_path is None  # a bare QTensor decodes blocks until a path is chosen for it
    assert w.use_fast_path() == "int4" and w._fast_path == "int4"


@pytest.mark.parametrize("q", INT4 + INT4X2 + INT8)
def test_linear_matches_exact_dequantization(q, vnni):
    w = _qt((64, 256), q)
    dense = w.dequantize()
    w.use_fast_path()
    small, big = torch.randn(3, 256), torch.randn(2, 10, 256)  # fused kernel / dequantize + GEMM
    bound = VNNI_REL if vnni else INT8_REL if q in INT8 else BF16_REL
    assert _rel(w.linear(small), small @ dense.T) < bound
    y = w.linear(big)
    assert y.shape == (2, 10, 64) and y.dtype == torch.float32
    if q in INT8 or vnni:
        assert _rel(y, big @ dense.T) < bound
    else:  # large batches expand the exact float32 values: the same result as the dense weight
        assert torch.equal(w._repacked(0).dequantize(), dense)
        assert torch.allclose(y, big @ dense.T, atol=1e-5)


@pytest.mark.parametrize("q", ["Q4_K", "Q8_0", "Q6_K"])
def test_expert_stacks_repack_only_the_used_expert(q, vnni):
    w = _qt((4, 64, 256), q)
    dense = w.dequantize()
    w.use_fast_path()
    x = torch.randn(1, 256)
    for e in (2, 0):
        assert _rel(w.expert_linear(x, e), x @ dense[e].T) < INT8_REL
    assert sorted(w._fast) == [0, 2]  # experts 1 and 3 were never repacked
    w.prepare()
    assert sorted(w._fast) == [0, 1, 2, 3]


def test_bfloat16_activations_keep_their_dtype(vnni):
    w = _qt((64, 256), "Q4_0")
    w.use_fast_path()
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    y = w.linear(x)
    assert y.dtype == torch.bfloat16 and _rel(y, x.float() @ w.dequantize().T) < (VNNI_REL if vnni else BF16_REL)


def test_switching_off_restores_exact_decoding():
    w = _qt((64, 256), "Q4_K")
    w.use_fast_path()
    x = torch.randn(2, 256)
    try:
        kernels.set_enabled(False)
        assert torch.allclose(w.linear(x), x @ w.dequantize().T, atol=1e-5)
        assert not w._fast
    finally:
        kernels.set_enabled(True)


@pytest.fixture(scope="module")
def tiny_gguf(quant_model, tmp_path_factory):
    """The quantization tests' tiny model (widths 256, 4 experts) as a GGUF with one type per fast path."""
    import herd
    from herd.weights.gguf_write import hf_tensor_getter, is_quantizable, tensor_plan, write_gguf

    config = herd.load(quant_model).config
    types = {}
    for name, shape in tensor_plan(config):
        if is_quantizable(name, shape):
            types[name] = "Q8_0" if "self_attn" in name else ("Q6_K" if "down" in name else "Q4_K")
    path = tmp_path_factory.mktemp("kernels") / "mixed.gguf"
    write_gguf(path, config, hf_tensor_getter(quant_model, config), quant_model, qtypes=types, progress=False)
    return path


@needs_vnni
def test_vnni_matches_integer_arithmetic():
    """The vnni path is exactly: both operands rounded to int8 per row, an integer dot product, two
    scales."""
    w = _qt((48, 256), "Q6_K")
    vw = kernels.build("vnni", w.data, w.qtype, (48, 256))
    dense = w.dequantize()
    amax = dense.abs().amax(dim=1)
    assert torch.equal(vw.codes, torch.round(dense * (127 / amax)[:, None]).to(torch.int8))
    assert torch.equal(vw.scale, amax / 127)
    assert int(vw.codes.abs().max()) == 127
    x = torch.randn(5, 256)
    xq, xs = kernels.quantize_rows(x)
    assert torch.equal(xq, torch.round(x * (127 / x.abs().amax(dim=1))[:, None]).to(torch.int8))
    want = (xq.long() @ vw.codes.long().T).double() * xs.double()[:, None] * vw.scale.double()
    assert torch.allclose(vw.linear(x).double(), want, rtol=1e-6, atol=0)
    # a weight taller than one _int_mm call is computed in row chunks with the same result
    tall = _qt((3 * 64, 256), "Q8_0")
    vt = kernels.build("vnni", tall.data, tall.qtype, (192, 256))
    full = vt.linear(x)
    try:
        kernels.CHUNK_ROWS, saved = 64, kernels.CHUNK_ROWS
        assert torch.equal(vt.linear(x), full)
    finally:
        kernels.CHUNK_ROWS = saved


def test_vnni_fused_parts_are_views_of_the_fused_matrix():
    """q/k/v fused into one int8 matrix keep no second copy: each part's codes and scales are views of the
    fused ones, and a part called alone (a hooked module) gives exactly its columns of the fused result."""
    parts = [kernels.VnniWeight(_qt((n, 256), "Q4_K", seed=n).dequantize()) for n in (32, 16, 16)]
    x = torch.randn(6, 256)
    alone = [p.linear(x) for p in parts]  # before fusing
    fused = kernels.VnniWeight.fuse(parts)
    full = fused.linear(x)
    start = 0
    for p, before in zip(parts, alone):
        n = p.shape[0]
        assert p.codes.untyped_storage().data_ptr() == fused.codes.untyped_storage().data_ptr()
        assert p.scale.untyped_storage().data_ptr() == fused.scale.untyped_storage().data_ptr()
        assert torch.equal(p.linear(x), full[:, start : start + n]) and torch.equal(before, full[:, start : start + n])
        start += n


def test_shared_input_quantized_once(vnni):
    """q/k/v (and gate/up) read one input: QTensor.linears gives the same results as separate calls."""
    ws = [_qt((64, 256), q, seed=i) for i, q in enumerate(["Q4_K", "Q8_0", "Q6_K"])]
    for w in ws:
        w.use_fast_path()
    x = torch.randn(2, 256)
    together = QTensor.linears(x, ws)
    for got, w in zip(together, ws):
        assert torch.equal(got, w.linear(x))
    stack = _qt((4, 64, 256), "Q4_K")
    stack.use_fast_path()
    pair = QTensor.linears(x, [stack, stack], expert=2)
    assert torch.equal(pair[0], stack.expert_linear(x, 2)) and torch.equal(pair[1], pair[0])
    with pytest.raises(IndexError):
        QTensor.linears(x, [stack], expert=4)


@pytest.mark.parametrize("vnni", [False, pytest.param(True, marks=needs_vnni)], ids=["avx2-paths", "vnni-path"],
                         indirect=True)
def test_model_logits_with_fast_paths_on_and_off(tiny_gguf, vnni):
    import herd

    ids = torch.tensor([[5, 17, 99, 3]])
    try:
        kernels.set_enabled(False)
        exact = herd.load(tiny_gguf).logits(ids)
    finally:
        kernels.set_enabled(True)
    llm = herd.load(tiny_gguf)
    paths = {w._fast_path for m in llm.model.modules() for w in vars(m).values() if isinstance(w, QTensor)}
    assert paths - {None} <= {"vnni", "kquant"} if vnni else {"int4", "int4x2", "int8"} <= paths, paths  # None: embedding
    fast = llm.logits(ids)
    kld = torch.nn.functional.kl_div(fast.log_softmax(-1), exact.log_softmax(-1), log_target=True,
                                     reduction="none").sum(-1).mean().item()
    assert kld < 1e-3 and (fast.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.75


# ---------------------------------------------------------------------------------------------- dense bf16

needs_bf16_dot = pytest.mark.skipif(not kernels.has_bf16_dot(), reason="CPU without AVX512-BF16/AMX: the "
                                    "oneDNN bf16 layout is not used there (select_paths leaves bf16 weights alone)")


@needs_bf16_dot
def test_packed_bf16_is_bit_identical_to_linear():
    from herd.model.layers import Linear, linears

    g = torch.Generator().manual_seed(0)
    mods = []
    for out in (64, 16, 16):
        m = Linear(128, out)
        m.weight.data = (0.05 * torch.randn(out, 128, generator=g)).bfloat16()
        mods.append(m)
    x = torch.randn(3, 5, 128, generator=g).bfloat16()
    want = [torch.nn.functional.linear(x, m.weight) for m in mods]
    wrapper = torch.nn.ModuleList(mods)
    counts = kernels.select_paths(wrapper)
    assert counts == {"onednn-bf16": 3}
    assert all(torch.equal(m(x), w) for m, w in zip(mods, want))
    assert all(torch.equal(a, b) for a, b in zip(linears(x, mods), want))  # one fused call
    assert all(torch.equal(a, b) for a, b in zip(linears(x[0, :1], mods), [w[0, :1] for w in want]))
    with kernels.exact():  # switched off: plain F.linear
        assert all(torch.equal(m(x), w) for m, w in zip(mods, want))
    f32 = x.float()  # other dtypes are not this path's: F.linear decides (and rejects the mix)
    with pytest.raises(RuntimeError):
        mods[0](f32)


@needs_bf16_dot
def test_bf16_model_logits_identical_with_packing(quant_model):
    import herd

    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    with kernels.exact():
        want = herd.load(quant_model, dtype="bf16")
        with torch.inference_mode():
            cache = want.model.new_cache(1)
            want_steps = [want.model(ids[:, :4], cache=cache)] + [want.model(ids[:, i:i + 1], cache=cache) for i in (4, 5)]
    llm = herd.load(quant_model, dtype="bf16")  # select_paths packs every dense bf16 matmul weight
    kernels.select_paths(llm.model, eager=True)  # and lays them out now, fused groups included
    assert any("_packed" in vars(m) for m in llm.model.modules())
    assert any(vars(p).get("_fused") for m in llm.model.modules() for p in vars(m).get("_packed", {}).values())
    with torch.inference_mode():
        cache = llm.model.new_cache(1)
        got_steps = [llm.model(ids[:, :4], cache=cache)] + [llm.model(ids[:, i:i + 1], cache=cache) for i in (4, 5)]
    for a, b in zip(got_steps, want_steps):
        assert torch.equal(a, b)


@needs_vnni
def test_tall_vnni_weight_is_prepacked_for_onednn(monkeypatch):
    """An output-head-sized matrix (>= PREPACK_ROWS rows) runs oneDNN's int8 linear on a layout made once;
    its input is quantized per tensor, so one row gives the same integers as the per-row path."""
    monkeypatch.setattr(kernels, "native_kquant", lambda q, shape: False)  # the int8 / int4 forms
    monkeypatch.setattr(kernels, "_VNNI", True)
    w = _qt((kernels.PREPACK_ROWS, 256), "Q6_K")
    w.use_fast_path()
    form = w._repacked(0)
    assert form._qpacked is not None and form.codes is None
    dense = w.dequantize()
    x = torch.randn(1, 256)
    plain = kernels.VnniWeight(dense)  # the per-row path on the same matrix
    assert torch.allclose(w.linear(x), plain.linear(x), rtol=1e-4, atol=1e-6)
    xs = torch.randn(3, 256)
    assert _rel(w.linear(xs), xs @ dense.T) < VNNI_REL


def test_compact_mode_keeps_4_bit_types_4_bit(monkeypatch):
    """HERD_FAST_KERNELS=int4: on a VNNI CPU, 4-bit affine types keep torch's int4 pack (half the memory of
    int8); every other type still takes the VNNI path."""
    monkeypatch.setattr(kernels, "native_kquant", lambda q, shape: False)  # the int8 / int4 forms
    monkeypatch.setattr(kernels, "_VNNI", True)
    monkeypatch.setattr(kernels, "_prefer_int4", True)
    for q in INT4:
        assert kernels.path_for(q, (64, 256)) == "int4"
    for q in INT4X2 + INT8:
        assert kernels.path_for(q, (64, 256)) == "vnni"


def _resident_fraction(t: torch.Tensor) -> float:
    """Share of the 4 KiB pages under `t` that are in memory and mapped (mincore)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    page = 4096
    start = t.data_ptr() // page * page
    length = t.data_ptr() + t.numel() * t.element_size() - start
    n = -(-length // page)
    vec = (ctypes.c_ubyte * n)()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) / n


def test_populate_pages_reads_a_mapped_table_in(tmp_path):
    """An embedding table in a memory-mapped file: after populate_pages every page under it is resident
    (a row looked up mid-decode no longer waits for the disk), and its values are untouched."""
    import numpy as np

    values = np.random.default_rng(0).standard_normal(3 << 18).astype(np.float32)  # 3 MiB
    path = tmp_path / "table.bin"
    values.tofile(path)
    _evict(path)
    table = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c")).view(-1, 1024)
    assert _resident_fraction(table) < 0.5
    assert kernels.populate_pages(table) is True  # MADV_POPULATE_READ (Linux 5.14+)
    assert _resident_fraction(table) == 1.0
    assert torch.equal(table.flatten(), torch.from_numpy(values))


def _evict(path) -> None:
    """Drop a file from the page cache, as a file not read since boot is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # written back first: dirty pages stay cached
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_select_paths_reads_embedding_tables_in(tiny_gguf, monkeypatch):
    """Loading a model hands its embedding table (and no matmul weight) to populate_pages."""
    import herd

    seen = []
    monkeypatch.setattr(kernels, "populate_pages", lambda t: seen.append(t.data_ptr()) or True)
    llm = herd.load(tiny_gguf)
    assert seen == [llm.model.model.embed_tokens.weight.data.data_ptr()]


def _huge_kib_at(address: int) -> int:
    """AnonHugePages of the mapping holding `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


def _thp_available() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def test_huge_pages_keep_values_and_results():
    """MADV_COLLAPSE moves a weight into 2 MiB pages (where the kernel has THP): the bytes, and a packed
    bf16 matmul's results, stay the same; small tensors and None are accepted and left as they are."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (4096, 2048), dtype=torch.int8, generator=g)  # 8 MiB: >= 3 whole huge pages
    before = codes.clone()
    kernels.huge_pages(codes)
    assert torch.equal(codes, before)
    if _thp_available():
        assert _huge_kib_at(codes.data_ptr() + (4 << 20)) >= 2048
    small = torch.randn(16, 16)
    kernels.huge_pages(small)
    kernels.huge_pages(None)
    if kernels.has_bf16_dot():
        w = (0.05 * torch.randn(2048, 1024, generator=g)).bfloat16()
        x = torch.randn(1, 1024, generator=g).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        want = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        kernels.huge_pages(packed)
        assert torch.equal(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), want)
        assert torch.equal(want, torch.nn.functional.linear(x, w))


def test_huge_empty_is_aligned_and_faults_in_huge_pages():
    t = kernels.huge_empty((3072, 4096), torch.int8)  # 12 MiB
    assert t.shape == (3072, 4096) and t.dtype == torch.int8 and t.is_contiguous()
    assert t.data_ptr() % (2 << 20) == 0
    t.fill_(7)
    assert int(t.sum()) == 7 * t.numel()
    if _thp_available():
        assert _huge_kib_at(t.data_ptr()) >= 8 << 10  # the whole 2 MiB pages inside: at least 8 of its 12 MiB
    small = kernels.huge_empty((16, 16), torch.float32)  # below two huge pages: a plain tensor
    assert small.shape == (16, 16) and small.dtype == torch.float32



def test_building_weights_nests_and_restores_the_running_phase(monkeypatch):
    """The malloc phase is the build one while any build block is open (nested or not, inside a prefill or
    not), the prefill one while only prefill blocks are, and glibc is told only when the phase changes."""
    calls = []

    class FakeLibc:  # records what glibc would be told
        def mallopt(self, option, value):
            calls.append(("mallopt", option, value))

        def malloc_trim(self, pad):
            calls.append(("trim",))

    monkeypatch.setattr(kernels, "_libc", FakeLibc())
    monkeypatch.setattr(kernels, "_applied", kernels._BUILD_MALLOC)
    build = [("mallopt", -3, 1 << 20), ("mallopt", -1, 128 << 10), ("trim",)]
    prefill = [("mallopt", -3, 32 << 20), ("mallopt", -1, 512 << 20)]
    with kernels.large_temporaries():
        assert calls == prefill
        with kernels.building_weights():
            with kernels.building_weights():
                assert kernels._building == 2
            assert kernels._building == 1
        assert kernels._building == 0
        assert calls == prefill + build + prefill  # set once on entering, once on leaving the outermost block
    assert kernels._prefilling == 0
    assert calls == prefill + build + prefill + build
