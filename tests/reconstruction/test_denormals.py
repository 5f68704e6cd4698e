"""The pose search never hands a denormal float to a matrix product (they are several times
slower on some CPUs: a sharply peaked softmax underflows into them)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from cryoai.models.image_formation import ImageFormation
from cryoai.physics.fft import fft3_c
from cryoai.physics.projection import sample_volume, slice_coords
from cryoai.reconstruction import em as search

_PRODUCTS = {torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.Tensor.__matmul__,
             torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.bmm, torch.Tensor.addmm,
             torch.Tensor.addmm_, torch.Tensor.baddbmm, torch.Tensor.baddbmm_}


class _DenormalSpy(TorchFunctionMode):
    """Records every matrix product whose operands hold a subnormal float."""

    def __init__(self):
        super().__init__()
        self.products = 0
        self.with_denormals = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS:
            self.products += 1
            for a in args:
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    mag = a.abs()
                    if bool(((mag > 0) & (mag < torch.finfo(a.dtype).tiny)).any()):
                        self.with_denormals += 1
                        break
        return func(*args, **kwargs)


def test_posterior_has_no_denormals_where_softmax_has():
    logits = torch.tensor([[0.0, -1.0, -80.0, -95.0, -100.0, -1000.0]])
    plain = torch.softmax(logits, dim=-1)
    tiny = torch.finfo(torch.float32).tiny
    assert bool(((plain > 0) & (plain < tiny)).any())  # the trap exists
    post = search.posterior(logits)
    assert not bool(((post > 0) & (post < tiny)).any())
    assert post.sum().item() == pytest.approx(1.0)
    assert torch.allclose(post[:, :2], plain[:, :2])
    assert (post[:, 2:] == 0).all() and (post[:, :2] > 0).all()
    assert search.POSTERIOR_FLOOR > 0 and math.log(search.POSTERIOR_FLOOR) > -80
    # The in-place kernel of the E step gives the same probabilities from squared errors.
    errors = -logits * 0.5 + 3.0
    torch.testing.assert_close(search.posterior_from_errors_(errors.clone(), 2.0), post)


def _peaked_problem(n=24, n_images=40):
    gen = torch.Generator().manual_seed(0)
    vol = torch.randn(n, n, n, generator=gen)
    vol = torch.nn.functional.avg_pool3d(vol[None, None], 5, 1, 2)[0, 0]
    fvol = fft3_c(vol) / n
    formation = ImageFormation(n, 1.0)
    em = search.ExpectationMaximisation(formation, n_rotations=576, max_shift_px=2.0,
                                        shift_step_px=1.0, mask_radius_px=0.45 * n, generator=gen)
    em.fourier_volume = fvol
    rot = em.grid[torch.randint(len(em.grid), (n_images,), generator=gen)]
    spectra = sample_volume(fvol, slice_coords(rot, formation.coords_px))
    # At this noise level a fifth of a plain softmax's probabilities are denormal.
    noise = 3.0 * spectra.abs().mean()
    spectra = spectra + noise * torch.randn(spectra.shape, generator=gen, dtype=spectra.dtype)
    return em, spectra, torch.ones(spectra.shape)


def test_em_step_products_have_no_denormals(monkeypatch):
    em, y, c = _peaked_problem()
    fvol = em.fourier_volume
    # Precondition (the test can fail): with a plain softmax these data put denormals into the
    # M-step products.
    def plain_softmax_(errors, scale, minimum=None):
        logits = -(errors - errors.min(dim=-1, keepdim=True).values) * scale
        post = errors.copy_(torch.softmax(logits, dim=-1))
        return post, post.max(dim=-1).values

    monkeypatch.setattr(search, "posterior_and_max_", plain_softmax_)
    monkeypatch.setattr(search, "SIGNIFICANT_MASS", 2.0)  # the M step's dense products, every image
    with _DenormalSpy() as spy:
        em.iterate(y, c, radius_px=8.0)
    assert spy.with_denormals > 0
    monkeypatch.undo()
    em = search.ExpectationMaximisation(em.formation, n_rotations=576, max_shift_px=2.0,
                                        shift_step_px=1.0, mask_radius_px=em.mask_radius_px)
    em.fourier_volume = fvol
    with _DenormalSpy() as spy:
        out = em.iterate(y, c, radius_px=8.0)
        search.assign_global(em.formation, em.fourier_volume, y, c, 8.0, em.grid, em.shifts)
        search.refine_local(em.formation, em.fourier_volume, y, c, out["rotations"], out["shifts_px"],
                            8.0, max_angle_rad=0.2, n_candidates=8)
    assert spy.products > 0
    assert spy.with_denormals == 0
