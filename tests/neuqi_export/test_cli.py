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
                 "--group-size", "32", "--accuracy-level", "1", "--float-storage", "exact", *calib]) == 0
    capsys.readouterr()
    assert (tmp_path / "onnx" / "model.onnx").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".neuqi-convert")]
    assert main(["eval", str(tmp_path / "onnx"), "--seqlen", "64", "--max-windows", "2", "--quiet"]) == 0
    assert "onnxruntime" in capsys.readouterr().out


def test_convert_to_a_gguf_mixture(tiny_llama_dir, real_assets, tmp_path, capsys):
    """Default: every linear fitted and GPTQ'd on its own GGUF type (K-quant-aware); --gguf-fit master: an 8-bit
    master refit per tensor. Both give llama-quantize's per-tensor types."""
    import gguf

    from converters.gguf.presets import preset_plan
    from neuqi_export.archs import read_model_dir

    calib = ["--calib", str(real_assets.calib_text), "--nsamples", "2", "--seqlen", "64", "--quiet"]
    plan = preset_plan("Q4_K_M", read_model_dir(tiny_llama_dir)[1])
    for fit, expect in ((None, "running GPTQ on that lattice"), ("master", "8-bit master")):
        out = tmp_path / f"q-{fit}.gguf"
        extra = ["--gguf-fit", fit] if fit else []
        assert main(["convert", str(tiny_llama_dir), "--to", "gguf", "--type", "Q4_K_M", "--gptq", "--group-size", "32",
                     "-o", str(out), *extra, *calib]) == 0
        text = capsys.readouterr().out
        assert expect in text, text
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
        assert all(types[name] == t for name, (t, _) in plan.items() if name in types)
        if fit is None:
            assert "0 refit" in text or "1 refit" in text  # only the float token_embd is refit
    assert main(["convert", str(tiny_llama_dir), "--to", "gguf", "--type", "Q4_1", "--gguf-fit", "lattice",
                 "-o", str(tmp_path / "x.gguf"), *calib]) == 2
    assert "--gguf-fit lattice is for K types" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_quantize_for_gguf_then_export(tiny_llama_dir, real_assets, tmp_path, capsys):
    """`quantize --for-gguf Q3_K_M` keeps the K-quant-aware master; `export --to gguf --type Q3_K_M` writes its
    blocks unchanged (every linear exact); a type without a lattice mode is refused in one line."""
    calib = ["--calib", str(real_assets.calib_text), "--nsamples", "2", "--seqlen", "64", "--quiet"]
    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "m"), "--for-gguf", "Q3_K_M", "--gptq", *calib]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "m"), "--to", "gguf", "--type", "Q3_K_M", "-o", str(tmp_path / "m.gguf")]) == 0
    text = capsys.readouterr().out
    assert "14 linears" not in text and "refit blk." not in text, text
    for bad in ("IQ2_XS", "Q5_K"):  # Q5_K has a lattice, but `export --type` takes only the Q5_K_S/M mixtures
        assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "x"), "--for-gguf", bad, *calib]) == 2
        assert "has no K-quant-aware mode" in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
