"""The PyTorch comparator: the same CIFAR ResNet-50 train step, eager or ``torch.compile``.

Needs the ``benchmarks`` extra (``pip install -e ".[benchmarks]"``; on CPU install the CPU
wheel first, e.g. ``pip install torch==2.13.0 --index-url
https://download.pytorch.org/whl/cpu``). PyTorch is never imported by the library.

The network mirrors ``svdcond_jax.models.CifarResNet50(num_classes, stem_norm=...)``
parameter for parameter (23,705,252 for 100 classes): a 3x3/1 stem conv 3->64 without
bias, the stem norm, ReLU, no max pool, torchvision v1.5 bottleneck stages (3, 4, 6, 3),
global average pooling and a linear classifier (:data:`MODELS` also mirrors
``CifarResNet18`` and ``TinyResNet``, whose blocks are torchvision's basic blocks). The
stem norm is ``BatchNorm2d`` for the ``bn`` row and, for every SVD row, ZCA whitening of
the stem channels: covariance of the centred (C, N*H*W) features plus 1e-2 I,
``torch.linalg.eigh`` with plain autograd, eigenvalues clamped at eps * lambda_max,
running mean / whitening EMAs and a per-channel affine (our ``DecorrelatedBatchNorm``).
The optimizer is ``torch.optim.SGD`` (momentum 0.9, weight decay 5e-4) with the stem conv
in its own parameter group; ``+nog`` replaces the stem gradient by its polar factor from
``torch.linalg.svd`` and ``+olr`` sets that group's learning rate to eta* of Eq. 20 when
0 < eta* < lr (the switch of Eq. 21), both by hand after ``backward()`` as in the
authors' release (https://github.com/KingJamesSong/OrthoImproveCond,
``Decorrelated BN/main_cifar100.py``). ``compile=True`` wraps the model in
``torch.compile`` (forward and backward by inductor); the NOG/OLR step and the optimizer
stay eager.

Example:
    >>> torch = __import__("pytest").importorskip("torch")
    >>> model = model_for("svd+nog+olr", "TinyResNet", num_classes=10)
    >>> step = build_step("svd+nog+olr", model=model, batch=2, image_size=8, num_classes=10)
    >>> loss = step()
    >>> bool(torch.isfinite(torch.tensor(loss)))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

METHODS = ("bn", "svd", "svd+nog", "svd+olr", "svd+nog+olr")


class ZCAWhitening(nn.Module):
    """ZCA whitening of all channels with autograd through ``torch.linalg.eigh``."""

    def __init__(self, channels: int, eps: float = 1e-2, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_whitening", torch.eye(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten NCHW ``x`` with batch statistics (train) or running ones (eval).

        Statistics and the eigendecomposition run in float32 (autocast off), the output
        is cast back to ``x``'s dtype, as ``svdcond_jax.DecorrelatedBatchNorm`` does.
        """
        n, c, h, w = x.shape
        with torch.autocast(x.device.type, enabled=False):
            cdtype = torch.promote_types(x.dtype, torch.float32)  # f32 (f64 stays f64)
            xg = x.to(cdtype).transpose(0, 1).reshape(c, -1)
            if self.training:
                mean = xg.mean(dim=1)
                xc = xg - mean[:, None]
                eye = torch.eye(c, dtype=xg.dtype, device=xg.device)
                cov = xc @ xc.T / xc.shape[1] + self.eps * eye
                lam, u = torch.linalg.eigh(cov)
                floor = (torch.finfo(xg.dtype).eps * lam[-1:]).detach()
                whitening = (u * torch.clamp(lam, min=floor).rsqrt()) @ u.T
                with torch.no_grad():
                    self.running_mean.lerp_(mean, self.momentum)
                    self.running_whitening.lerp_(whitening, self.momentum)
            else:
                xc, whitening = xg - self.running_mean[:, None], self.running_whitening
            y = (whitening @ xc).reshape(c, n, h, w).transpose(0, 1)
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


class BasicBlock(nn.Module):
    """torchvision's basic block (two 3x3 convs), zero-init last BN scale."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        nn.init.zeros_(self.bn2.weight)
        self.shortcut = _shortcut(inplanes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))


def _shortcut(inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False),
                         nn.BatchNorm2d(outplanes))


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck (stride on the 3x3 conv), zero-init last BN scale."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        nn.init.zeros_(self.bn3.weight)
        self.shortcut = _shortcut(inplanes, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet(nn.Module):
    """CIFAR ResNet with a BatchNorm (``stem_norm="bn"``) or ZCA (``"zca"``) stem norm."""

    def __init__(self, num_classes: int, stage_sizes: Sequence[int] = (3, 4, 6, 3),
                 width: int = 64, stem_norm: str = "bn", block: type = Bottleneck):
        super().__init__()
        if stem_norm not in ("bn", "zca"):
            raise ValueError(f"stem_norm={stem_norm!r}; valid: 'bn', 'zca'")
        self.stem_conv = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.stem_norm = nn.BatchNorm2d(width) if stem_norm == "bn" else ZCAWhitening(width)
        blocks, inplanes = [], width
        for i, size in enumerate(stage_sizes):
            for j in range(size):
                planes = width * 2**i
                blocks.append(block(inplanes, planes, 2 if i > 0 and j == 0 else 1))
                inplanes = planes * block.expansion
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of NCHW images."""
        x = self.blocks(torch.relu(self.stem_norm(self.stem_conv(x))))
        return self.fc(x.mean(dim=(2, 3))).float()


# The svdcond_jax.models networks mirrored here: stage sizes, block, width.
MODELS = {
    "CifarResNet50": ((3, 4, 6, 3), Bottleneck, 64),
    "CifarResNet18": ((2, 2, 2, 2), BasicBlock, 64),
    "TinyResNet": ((1, 1), BasicBlock, 8),
}


def model_for(method: str, model: str = "CifarResNet50", num_classes: int = 100) -> CifarResNet:
    """The torch twin of ``svdcond_jax.models.<model>`` for a method row.

    Args:
      method: one of :data:`METHODS` (``bn``: BatchNorm stem; otherwise ZCA whitening).
      model: a key of :data:`MODELS`.
      num_classes: classifier outputs.

    Raises:
      ValueError: for an unknown method or model.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; valid: {METHODS}")
    if model not in MODELS:
        raise ValueError(f"model={model!r}; valid: {tuple(MODELS)}")
    stages, block, width = MODELS[model]
    return CifarResNet(num_classes, stages, width, "bn" if method == "bn" else "zca", block)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters (running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def nearest_orthogonal_(grad: torch.Tensor) -> None:
    """NOG in place: the (out, in*kh*kw) gradient replaced by its polar factor U V^T."""
    u, _, vh = torch.linalg.svd(grad.view(grad.shape[0], -1), full_matrices=False)
    grad.copy_((u @ vh).view_as(grad))


def optimal_lr(weight: torch.Tensor, grad: torch.Tensor, lr: float) -> float:
    """OLR (Eqs. 20-21): eta* = (w.w)(l.w) / ((w.w)(l.l) + 2 (l.w)^2) if 0 < eta* < lr."""
    w, g = weight.detach().reshape(-1), grad.reshape(-1)
    ww, lw, ll = w @ w, g @ w, g @ g
    eta = float(ww * lw / (ww * ll + 2 * lw * lw))
    return eta if 0 < eta < lr else lr


def build_step(method: str, *, model: nn.Module | None = None, batch: int = 32,
               image_size: int = 32, num_classes: int = 100, compile: bool = False,
               compile_backend: str = "inductor", precision: str = "f32",
               device: str = "cpu", seed: int = 0, lr: float = 0.1) -> Callable[[], float]:
    """One method's train step on a fixed random batch; each call runs one step.

    Args:
      method: one of :data:`METHODS`.
      model: the network (default: :func:`model_for` ``(method)``, the CIFAR ResNet-50).
      batch: batch size.
      image_size: square image side (3 channels).
      num_classes: classifier outputs.
      compile: ``torch.compile`` the model.
      compile_backend: ``torch.compile``'s backend: "inductor" (the default, what is
        timed), or e.g. "aot_eager" (TorchDynamo and AOTAutograd without inductor's code
        generation: the GPU check's CPU dry run uses it to exercise the compiled path in
        seconds).
      precision: "f32", or "bf16" (``torch.autocast`` to bfloat16; the whitening stays
        float32).
      device: torch device, e.g. "cpu" or "cuda".
      seed: ``torch.manual_seed`` of the parameters and the batch.
      lr: SGD learning rate (also the OLR switch threshold).

    Returns:
      ``step() -> loss`` (a float: the step has finished when it returns). A step whose
      gradient is non-finite (autograd through ``eigh`` gives NaN/inf at repeated
      eigenvalues, e.g. the eps*I part of a rank-deficient stem covariance) is skipped
      like our train step skips it, and counted in ``step.skipped``.

    Raises:
      ValueError: for an unknown method or precision.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; valid: {METHODS}")
    if precision not in ("f32", "bf16"):
        raise ValueError(f"precision={precision!r}; valid: 'f32', 'bf16'")
    torch.manual_seed(seed)
    model = (model_for(method, num_classes=num_classes) if model is None else model).to(device)
    model.train()
    stem = model.stem_conv.weight
    others = [p for p in model.parameters() if p is not stem]
    opt = torch.optim.SGD([{"params": [stem]}, {"params": others}], lr=lr, momentum=0.9,
                          weight_decay=5e-4)
    forward = torch.compile(model, backend=compile_backend) if compile else model
    images = torch.randn(batch, 3, image_size, image_size).to(device)
    labels = torch.randint(0, num_classes, (batch,)).to(device)
    nog, olr = "+nog" in method, "+olr" in method
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                              enabled=precision == "bf16")

    params = list(model.parameters())

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = nn.functional.cross_entropy(forward(images), labels)
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        if not bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
            step.skipped += 1  # as our train step: a non-finite step changes nothing
            return float(loss.detach())
        if nog:
            nearest_orthogonal_(stem.grad)
        if olr:
            opt.param_groups[0]["lr"] = optimal_lr(stem, stem.grad, opt.param_groups[1]["lr"])
        opt.step()
        return float(loss.detach())

    step.skipped = 0
    return step
