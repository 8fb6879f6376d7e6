"""Sampling defaults come from the checkpoint's generation_config.json, as transformers reads it."""

import json

import herd


def _load_with(hf_checkpoint, generation: dict):
    _, directory = hf_checkpoint()
    (directory / "generation_config.json").write_text(json.dumps(generation))
    return herd.load(directory)


def test_sampling_values_are_taken(hf_checkpoint):
    p = _load_with(hf_checkpoint, {"do_sample": True, "temperature": 0.7, "top_p": 0.8}).sampling_params()
    assert (p.temperature, p.top_p) == (0.7, 0.8)


def test_do_sample_false_means_greedy(hf_checkpoint):
    llm = _load_with(hf_checkpoint, {"do_sample": False, "temperature": 0.6, "top_p": 0.9})
    assert llm.sampling_params().temperature == 0.0
    assert llm.sampling_params(temperature=0.5).temperature == 0.5  # an explicit request still wins


def test_no_generation_config_gives_metas_defaults(hf_checkpoint):
    _, directory = hf_checkpoint()
    (directory / "generation_config.json").unlink(missing_ok=True)
    p = herd.load(directory).sampling_params()
    assert (p.temperature, p.top_p, p.min_p) == (0.6, 0.9, 0.01)
