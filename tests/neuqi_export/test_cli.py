"""The command line end to end on a tiny model: quantize, eval, export, convert (GGUF and ONNX)."""
from neuqi_export.cli import main


def test_quantize_eval_export_convert(tiny_llama_dir, real_assets, tmp_path, capsys):
    calib = ["--calib", str(real_assets.calib_text), "--nsamples", "2", "--seqlen", "64", "--quiet"]
    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "m"), "--bits", "4", "--group-size", "32",
                 "--gptq", *calib]) == 0
    out = capsys.readouterr().out
    assert "quantized 14 linears" in out and "summed full-H loss" in out

    assert main(["eval", str(tmp_path / "m"), "--seqlen", "64", "--max-windows", "2", "--quiet"]) == 0
    master_line = capsys.readouterr().out
    assert "master checkpoint" in master_line and "2 windows × 64" in master_line

    assert main(["export", str(tmp_path / "m"), "--to", "gguf", "--type", "Q4_1", "--embed-type", "F32",
                 "-o", str(tmp_path / "m.gguf")]) == 0
    assert "exact" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "m.gguf"), "--tokenizer", str(tmp_path / "m"), "--seqlen", "64",
                 "--max-windows", "2", "--quiet"]) == 0
    assert "llamacpp" in capsys.readouterr().out

    assert main(["convert", str(tiny_llama_dir), "--to", "onnx", "-o", str(tmp_path / "onnx"), "--bits", "3",
                 "--group-size", "32", "--accuracy-level", "1", *calib]) == 0
    capsys.readouterr()
    assert (tmp_path / "onnx" / "model.onnx").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".neuqi-convert")]
    assert main(["eval", str(tmp_path / "onnx"), "--seqlen", "64", "--max-windows", "2", "--quiet"]) == 0
    assert "onnxruntime" in capsys.readouterr().out


def test_convert_to_a_gguf_mixture_quantizes_8_bit_and_refits(tiny_llama_dir, real_assets, tmp_path, capsys):
    import gguf

    from converters.gguf.presets import preset_plan
    from neuqi_export.arch import read_model_dir

    calib = ["--calib", str(real_assets.calib_text), "--nsamples", "2", "--seqlen", "64", "--quiet"]
    out = tmp_path / "q.gguf"
    assert main(["convert", str(tiny_llama_dir), "--to", "gguf", "--type", "Q4_K_M", "--group-size", "32", "-o",
                 str(out), *calib]) == 0
    text = capsys.readouterr().out
    assert "8-bit master" in text and "refit" in text
    plan = preset_plan("Q4_K_M", read_model_dir(tiny_llama_dir)[1])
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert all(types[name] == t for name, (t, _) in plan.items() if name in types)
