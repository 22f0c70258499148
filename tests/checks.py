"""Assertions shared by the tests."""

import pytest

from atoms.core.errors import InputError


def one_line_error(fn, *match: str) -> str:
    """``fn()`` raises a one-line InputError containing every string in ``match``."""
    with pytest.raises(InputError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


def crash_once_at(monkeypatch, step: int) -> None:
    """The next training run raises RuntimeError('killed') at ``step`` (once; later runs go
    on normally): a crash between checkpoints."""
    from atoms.train.loop import Trainer

    original = Trainer.step

    def crash_once(self, batch):
        if self.state.step == step:
            monkeypatch.setattr(Trainer, "step", original)
            raise RuntimeError("killed")
        original(self, batch)

    monkeypatch.setattr(Trainer, "step", crash_once)
