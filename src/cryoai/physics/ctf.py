"""Contrast transfer function (RELION / CTFFIND convention, see CONVENTIONS.md)."""

from __future__ import annotations

import math

import torch


def electron_wavelength_a(voltage_kv: float | torch.Tensor) -> float | torch.Tensor:
    """Relativistic electron wavelength in Angstrom for an acceleration voltage in kV.

    ``lambda = 12.2639 / sqrt(V + 0.97845e-6 V^2)``, V in volts (0.019687 A at 300 kV).
    """
    volts = voltage_kv * 1e3
    if isinstance(volts, torch.Tensor):
        return 12.2639 / torch.sqrt(volts + 0.97845e-6 * volts**2)
    return 12.2639 / math.sqrt(volts + 0.97845e-6 * volts**2)


def compute_ctf(
    freqs_a: torch.Tensor,
    defocus_u_a: torch.Tensor | float,
    defocus_v_a: torch.Tensor | float,
    defocus_angle_rad: torch.Tensor | float,
    voltage_kv: torch.Tensor | float,
    cs_mm: torch.Tensor | float,
    amplitude_contrast: torch.Tensor | float,
    phase_shift_rad: torch.Tensor | float = 0.0,
    bfactor_a2: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Evaluate the CTF at spatial frequencies.

    Parameters
    ----------
    freqs_a : (..., 2) frequencies ``(kx, ky)`` in cycles per Angstrom, e.g. (N, N, 2) from
        :func:`cryoai.physics.grids.frequency_grid_2d` or (M, 2) for selected frequencies.
    defocus_u_a, defocus_v_a : (B,) or scalars, defocus in Angstrom (positive = underfocus).
    defocus_angle_rad : (B,) or scalar, astigmatism angle in radians.
    voltage_kv : (B,) or scalar, acceleration voltage in kV.
    cs_mm : (B,) or scalar, spherical aberration in mm.
    amplitude_contrast : (B,) or scalar, fraction in [0, 1).
    phase_shift_rad : (B,) or scalar, phase-plate shift in radians.
    bfactor_a2 : (B,) or scalar, B-factor of the envelope ``exp(-B s^2 / 4)`` in A^2.

    Returns
    -------
    (B, ...) real CTF if any parameter is batched, else (...).
    """
    kx, ky = freqs_a[..., 0], freqs_a[..., 1]
    s2 = kx * kx + ky * ky
    theta = torch.atan2(ky, kx)
    params = [defocus_u_a, defocus_v_a, defocus_angle_rad, voltage_kv, cs_mm,
              amplitude_contrast, phase_shift_rad, bfactor_a2]
    batched = any(isinstance(p, torch.Tensor) and p.dim() > 0 for p in params)
    if batched:
        expand = (slice(None),) + (None,) * kx.dim()
        def b(p):
            t = torch.as_tensor(p, dtype=kx.dtype, device=kx.device)
            return t[expand] if t.dim() else t
        s2, theta = s2[None], theta[None]
    else:
        def b(p):
            return torch.as_tensor(p, dtype=kx.dtype, device=kx.device)
    du, dv, ang = b(defocus_u_a), b(defocus_v_a), b(defocus_angle_rad)
    lam = electron_wavelength_a(b(voltage_kv))
    cs_a = b(cs_mm) * 1e7
    w = b(amplitude_contrast)
    defocus = 0.5 * (du + dv) + 0.5 * (du - dv) * torch.cos(2 * (theta - ang))
    chi = math.pi * lam * defocus * s2 - 0.5 * math.pi * cs_a * lam**3 * s2**2 + b(phase_shift_rad)
    ctf = -(torch.sqrt(1 - w * w) * torch.sin(chi) + w * torch.cos(chi))
    bf = b(bfactor_a2)
    if bool(torch.any(bf != 0)):
        ctf = ctf * torch.exp(-bf * s2 / 4)
    return ctf
