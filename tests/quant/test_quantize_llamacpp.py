"""Every preset herd can write loads in llama.cpp (llama-cpp-python) and computes what herd computes on
the same file; llama.cpp also accepts an imatrix-quantized file with herd's quantize.imatrix.* keys.

Opt-in: `pip install -e ".[llamacpp]"`, then `pytest -m llamacpp`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import herd
from herd.cli.main import main
from herd.quant.plan import PRESETS, build_plan
from herd.quant import kernels

pytestmark = pytest.mark.llamacpp
WRITABLE = [p for p in PRESETS if not build_plan(herd.Config.preset("scout"), p).unencodable()]


@pytest.fixture(scope="module")
def imatrix_file(quant_model, sample_text, tmp_path_factory):
    root = tmp_path_factory.mktemp("imx")
    (root / "calib.txt").write_text(sample_text)
    out = root / "imatrix.gguf"
    assert main(["imatrix", "-m", str(quant_model), "-f", str(root / "calib.txt"), "-o", str(out), "-c", "64"]) == 0
    return out


@pytest.mark.parametrize("preset", WRITABLE)
def test_preset_loads_in_llamacpp(llama_cpp, quant_model, imatrix_file, tmp_path, preset):
    out = tmp_path / f"{preset}.gguf"
    assert main(["quantize", "-m", str(quant_model), "-o", str(out), "--preset", preset, "--imatrix", str(imatrix_file)]) == 0
    tokens = torch.randint(0, 512, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_batch=128, logits_all=True, type_k=0, type_v=0,
                          flash_attn=False, verbose=False, n_threads=2)
    assert ref.metadata.get("quantize.imatrix.file", "").endswith("imatrix.gguf")
    ref.eval(tokens)
    theirs = torch.from_numpy(np.asarray(ref.scores[: len(tokens)], dtype=np.float32).copy()).double()
    ref.close()
    with kernels.exact():  # the file as decoded exactly: llama.cpp's own activation rounding is the only gap
        mine = herd.load(out).logits(torch.tensor([tokens]))[0].double()
    p, r = mine.log_softmax(-1), theirs.log_softmax(-1)
    kld = (p.exp() * (p - r)).sum(-1).mean().item()
    print(f"{preset}: KLD herd vs llama.cpp on the same file {kld:.2e}")
    assert kld < 2e-3  # llama.cpp rounds activations to 8 bits for quantized matmuls
