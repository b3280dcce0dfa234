"""The example scripts run and learn (small step counts)."""

import importlib.util
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nnx_digits_trains_with_decorrelated_bn_nog_and_olr(capsys) -> None:
    result = _load("nnx_digits").main(["--steps", "40", "--log_every", "20"])
    out = capsys.readouterr().out
    assert "olr eta" in out and "validation error" in out
    assert result["last_loss"] < 0.8 * result["first_loss"]
    assert result["val_error"] < 80.0  # chance is 90 %
    assert np.isfinite(result["kappa_eps"]) and result["kappa_eps"] >= 1.0
