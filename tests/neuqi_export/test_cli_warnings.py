"""The CLI's warning for GPTQ on fewer calibration tokens than a linear's inputs (a rank-deficient Hessian)."""
import json

import pytest

from neuqi_export.cli.commands import _warn_thin_calibration
from neuqi_export.pipeline import QuantizeOptions


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 640, "intermediate_size": 2048}))
    return tmp_path


@pytest.mark.parametrize("nsamples, seqlen, gptq, warned", [
    (4, 256, True, True),     # 1024 tokens < 2048 inputs of down_proj
    (8, 256, True, False),    # 2048 tokens: full rank possible
    (4, 256, False, False),   # no GPTQ: nothing to warn about
])
def test_warns_only_when_gptq_gets_fewer_tokens_than_inputs(model_dir, capsys, nsamples, seqlen, gptq, warned):
    _warn_thin_calibration(QuantizeOptions(bits=4, nsamples=nsamples, seqlen=seqlen, gptq=gptq), str(model_dir))
    err = capsys.readouterr().err
    assert ("rank-deficient" in err) is warned, err
    if warned:
        assert err.count("\n") == 1 and "1024 calibration tokens" in err and "2048 inputs" in err


def test_reads_the_text_config_of_a_multimodal_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 64, "intermediate_size": 4096}}))
    _warn_thin_calibration(QuantizeOptions(bits=4, nsamples=2, seqlen=512, gptq=True), str(tmp_path))
    assert "4096 inputs" in capsys.readouterr().err
