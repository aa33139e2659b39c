"""Training state without pickle: a real AdamW + LambdaLR state round-trips exactly; damage is one line."""
import pickle

import pytest
import torch

from neuqi_export.errors import UserError
from neuqi_export.train_state import load_state, save_state


def _trained():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([w], lr=1e-2, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        opt.zero_grad()
        (w ** 2).sum().backward()
        opt.step()
        sched.step()
    return w, opt, sched


def test_optimizer_state_round_trips_and_resumes_identically(tmp_path):
    w, opt, sched = _trained()
    state = {"step": 3, "params": {"w": w.detach().clone()}, "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "losses": [1.5, 0.25]}
    save_state(state, tmp_path / "s.safetensors")
    back = load_state(tmp_path / "s.safetensors")
    assert back["step"] == 3 and back["losses"] == [1.5, 0.25]
    assert torch.equal(back["params"]["w"], w.detach())
    # a second optimizer loaded from the file takes the same next step as the original
    w2 = torch.nn.Parameter(back["params"]["w"].clone())
    opt2 = torch.optim.AdamW([w2], lr=1e-2, betas=(0.9, 0.95))
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    opt2.load_state_dict(back["optimizer"])
    sched2.load_state_dict(back["scheduler"])
    for o, p in ((opt, w), (opt2, w2)):
        o.zero_grad()
        (p ** 2).sum().backward()
        o.step()
    assert torch.equal(w.detach(), w2.detach())
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_no_pickle_in_the_file(tmp_path):
    _, opt, _ = _trained()
    save_state({"optimizer": opt.state_dict()}, tmp_path / "s.safetensors")
    raw = (tmp_path / "s.safetensors").read_bytes()
    with pytest.raises(Exception):
        pickle.loads(raw)
    assert b"\x80\x04" not in raw[:8]


def test_damaged_state_is_one_line(tmp_path):
    save_state({"x": torch.ones(1000)}, tmp_path / "s.safetensors")
    raw = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "s.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="damaged.*delete it"):
        load_state(tmp_path / "s.safetensors")


def test_unstorable_object_is_refused(tmp_path):
    with pytest.raises(TypeError, match="without pickle"):
        save_state({"f": object()}, tmp_path / "s.safetensors")
