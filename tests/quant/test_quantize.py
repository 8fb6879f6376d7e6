"""`herd quantize`: presets and rules to a GGUF whose size is predicted exactly, which loads and stays close
to the unquantized model; dry runs and bad flags write nothing."""

import pytest
import torch

import herd
from herd.cli.main import main
from herd.quant.plan import build_plan
from herd.quant.quantize import open_source, predicted_size
from herd.weights.gguf import GGUFFile

IDS = torch.tensor([[270, 72, 101, 108, 108, 111, 32, 116, 104, 101, 114, 101, 33, 10, 84, 104, 101]])


def _kld(ref, got):
    p = torch.log_softmax(ref.double(), -1)
    q = torch.log_softmax(got.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def ref_logits(quant_model):
    return herd.load(quant_model, dtype="f32").logits(IDS)


@pytest.mark.parametrize("preset,bound", [("Q4_K_M", 0.05), ("UD-Q2_K_XL", 0.2)])
def test_preset_writes_what_was_planned(quant_model, ref_logits, tmp_path, preset, bound):
    out = tmp_path / f"{preset}.gguf"
    assert main(["quantize", "-m", str(quant_model), "-o", str(out), "--preset", preset,
                 "--tensor-type", r"blk\.1\.attn_k=q8_0"]) == 0
    source = open_source(quant_model)
    plan = build_plan(source.config, preset, [(r"blk\.1\.attn_k", "Q8_0")])
    assert out.stat().st_size == predicted_size(source, plan)  # the dry run's prediction is exact
    f = GGUFFile(out)
    from herd.quant.formats import format_of

    written = {name: format_of(t.type_id).name for name, t in f.tensors.items() if name != "rope_freqs.weight"}
    assert written == {e.gguf: e.qtype for e in plan.entries}
    assert written["blk.1.attn_k.weight"] == "Q8_0" and written["blk.0.ffn_gate_inp.weight"] == "F32"
    assert f.fields["general.file_type"] == plan.file_type
    kld = _kld(ref_logits, herd.load(out).logits(IDS))
    assert kld < bound, kld


def test_dry_run_prints_the_plan_and_writes_nothing(quant_model, tmp_path, capsys):
    assert main(["quantize", "-m", str(quant_model), "-o", str(tmp_path / "x.gguf"), "--preset", "UD-IQ1_S",
                 "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "experts_gate_up" in err and "IQ1_S" in err and "predicted file size" in err and "decode only" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,message", [
    (["--preset", "Q9_K_Z"], "--preset 'Q9_K_Z'"),
    (["--preset", "Q4_K_M", "--tensor-type", "attn_q"], "--tensor-type 'attn_q'"),
    (["--preset", "UD-IQ1_S"], "not yet write"),
    (["--target-size", "2MB"], "need calibration text"),
    (["--target-size", "lots", "-f", "x.txt"], "--target-size 'lots'"),
])
def test_bad_flags_exit_1_with_one_line(quant_model, tmp_path, capsys, argv, message):
    assert main(["quantize", "-m", str(quant_model), "-o", str(tmp_path / "x.gguf"), *argv]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (the plan table may come first)
    assert last.startswith("herd: error:") and message in last
    assert list(tmp_path.iterdir()) == []


def test_target_size_fits_and_beats_uniform_q2_k(quant_model, ref_logits, sample_text, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text)
    source = open_source(quant_model)
    target = predicted_size(source, build_plan(source.config, "Q3_K_M"))
    out = tmp_path / "auto.gguf"
    assert main(["quantize", "-m", str(quant_model), "-o", str(out), "--target-size", str(target), "-f", str(calib),
                 "-c", "64", "--chunks", "4", "--types", "Q2_K,Q4_K,Q8_0"]) == 0
    assert out.stat().st_size <= target
    uniform = tmp_path / "q2k.gguf"
    assert main(["quantize", "-m", str(quant_model), "-o", str(uniform), "--preset", "Q2_K"]) == 0
    assert _kld(ref_logits, herd.load(out).logits(IDS)) < _kld(ref_logits, herd.load(uniform).logits(IDS))


def test_requantize_from_a_gguf(quant_model, ref_logits, tmp_path):
    q8 = tmp_path / "q8.gguf"
    assert main(["quantize", "-m", str(quant_model), "-o", str(q8), "--preset", "Q8_0"]) == 0
    q4 = tmp_path / "q4.gguf"
    assert main(["quantize", "-m", str(q8), "-o", str(q4), "--preset", "Q4_K_M"]) == 0
    assert _kld(ref_logits, herd.load(q4).logits(IDS)) < 0.05
