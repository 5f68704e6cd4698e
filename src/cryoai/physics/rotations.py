"""Rotations: RELION ZYZ Euler angles, axis-angle vectors, the 6D representation, sampling, distances.

A pose ``R`` maps the image frame to the volume frame and acts on column vectors of
``(x, y, z)``. RELION angles ``(rot, tilt, psi)`` give ``R = Rz(rot) @ Ry(tilt) @ Rz(psi)``
(scipy's intrinsic ``"ZYZ"``). All angles here are in radians.
"""

from __future__ import annotations

import math

import torch


def rot_z(angle_rad: torch.Tensor) -> torch.Tensor:
    """Rotation about z by ``angle_rad``, shape (..., 3, 3)."""
    c, s = torch.cos(angle_rad), torch.sin(angle_rad)
    o, z = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack([c, -s, z, s, c, z, z, z, o], dim=-1).reshape(*c.shape, 3, 3)


def rot_y(angle_rad: torch.Tensor) -> torch.Tensor:
    """Rotation about y by ``angle_rad``, shape (..., 3, 3)."""
    c, s = torch.cos(angle_rad), torch.sin(angle_rad)
    o, z = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack([c, z, s, z, o, z, -s, z, c], dim=-1).reshape(*c.shape, 3, 3)


def euler_zyz_to_matrix(angles_rad: torch.Tensor) -> torch.Tensor:
    """RELION Euler angles (rot, tilt, psi) in radians, shape (..., 3), to matrices (..., 3, 3)."""
    rot, tilt, psi = angles_rad.unbind(-1)
    return rot_z(rot) @ rot_y(tilt) @ rot_z(psi)


def matrix_to_euler_zyz(matrices: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`euler_zyz_to_matrix`: (..., 3, 3) -> (rot, tilt, psi) radians (..., 3).

    The same algorithm and conventions as scipy's
    ``Rotation.from_matrix(R).as_euler("ZYZ")`` for orthonormal ``R`` (scipy also projects
    matrices that are not orthonormal to 1e-12 onto the nearest rotation first; do that before
    calling this, e.g. for float32 poses, if the results must match scipy's to the last bit).

    ``tilt`` is in [0, pi], ``rot`` and ``psi`` in [-pi, pi]. At the gimbal lock, ``tilt``
    within 1e-7 of 0 or pi, ``R = Rz(rot + psi) Ry(0)`` or ``Rz(rot - psi) Ry(pi)`` determines
    only that sum or difference: psi is set to 0 and the whole in-plane angle goes to rot.

    The angles come from the rotation's unit quaternion ``(x, y, z, w)`` (Bernardes and
    Viollet 2022, as in scipy): ``tilt = 2 atan2(hypot(x, y), hypot(w, z))``,
    ``rot = atan2(z, w) + atan2(-x, y)``, ``psi = atan2(z, w) - atan2(-x, y)``, which stay
    accurate near the gimbal lock.
    """
    x, y, z, w = _matrix_to_unit_quaternion_xyzw(matrices).unbind(-1)
    half_sum = torch.atan2(z, w)
    half_diff = torch.atan2(-x, y)
    tilt = 2 * torch.atan2(torch.hypot(x, y), torch.hypot(w, z))
    lock_0 = tilt.abs() <= 1e-7
    lock_pi = (tilt - math.pi).abs() <= 1e-7
    regular = ~(lock_0 | lock_pi)
    rot = torch.where(regular, half_sum + half_diff,
                      torch.where(lock_0, 2 * half_sum, 2 * half_diff))
    psi = torch.where(regular, half_sum - half_diff, torch.zeros_like(tilt))
    angles = torch.stack([rot, tilt, psi], dim=-1)
    # Into [-pi, pi] by one turn (not a modulo, which would round angles that are in range).
    return torch.where(angles < -math.pi, angles + 2 * math.pi,
                       torch.where(angles > math.pi, angles - 2 * math.pi, angles))


def _matrix_to_unit_quaternion_xyzw(m: torch.Tensor) -> torch.Tensor:
    """Unit quaternion ``(x, y, z, w)`` of rotations (..., 3, 3), shape (..., 4).

    Built from the largest of ``R00, R11, R22, trace`` (the numerically stable choice, as in
    scipy's ``Rotation.from_matrix``); the sign of the quaternion is not normalised.
    """
    r00, r11, r22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    trace = r00 + r11 + r22
    choice = torch.stack([r00, r11, r22, trace], dim=-1).argmax(dim=-1, keepdim=True)
    candidates = [
        torch.stack([1 - trace + 2 * r00, m[..., 1, 0] + m[..., 0, 1],
                     m[..., 2, 0] + m[..., 0, 2], m[..., 2, 1] - m[..., 1, 2]], dim=-1),
        torch.stack([m[..., 1, 0] + m[..., 0, 1], 1 - trace + 2 * r11,
                     m[..., 2, 1] + m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0]], dim=-1),
        torch.stack([m[..., 2, 0] + m[..., 0, 2], m[..., 2, 1] + m[..., 1, 2],
                     1 - trace + 2 * r22, m[..., 1, 0] - m[..., 0, 1]], dim=-1),
        torch.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0],
                     m[..., 1, 0] - m[..., 0, 1], 1 + trace], dim=-1),
    ]
    q = candidates[3]
    for k in (2, 1, 0):
        q = torch.where(choice == k, candidates[k], q)
    return q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)


def axis_angle_to_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rotation vectors (axis-angle) to rotation matrices (Rodrigues' formula).

    ``R = exp([v]_x) = cos(t) I + (sin(t) / t) [v]_x + ((1 - cos(t)) / t^2) v v^T`` with
    ``t = |v|``: the right-handed rotation by ``t`` radians about the axis ``v / |v|``, acting
    on column vectors (``R @ u`` is ``u`` rotated). The zero vector gives the identity. Below
    ``t = 1e-3`` the three coefficients are their Taylor series (to ``t^4``), so tiny angles
    keep full precision and the gradient is finite at zero (``dR/dv_i = [e_i]_x`` there). The
    same matrices as scipy's ``Rotation.from_rotvec(v).as_matrix()``.

    Parameters
    ----------
    rotvec : (..., 3) tensor
        Rotation vectors ``v = axis * angle``, angle in radians (any real length; lengths
        beyond pi wrap around).

    Returns
    -------
    (..., 3, 3) tensor
        Rotation matrices, same dtype and device as ``rotvec``.
    """
    x, y, z = rotvec.unbind(-1)
    t2 = x * x + y * y + z * z
    small = t2 < 1e-6  # t < 1e-3
    # No sqrt of 0 either, whose infinite derivative would make the gradient NaN at 0.
    t = torch.sqrt(torch.where(small, torch.ones_like(t2), t2))
    # cos t, sin(t) / t and (1 - cos t) / t^2 = 2 sin^2(t / 2) / t^2 (no cancellation), with
    # their Taylor series near 0 (the next terms, t^6 / 720, t^6 / 5040 and t^6 / 40320, are
    # below 2e-21 there).
    c = torch.where(small, 1 - t2 / 2 + t2 * t2 / 24, torch.cos(t))
    a = torch.where(small, 1 - t2 / 6 + t2 * t2 / 120, torch.sin(t) / t)
    b = torch.where(small, 0.5 - t2 / 24 + t2 * t2 / 720, 2 * (torch.sin(t / 2) / t) ** 2)
    return torch.stack(
        [
            c + b * x * x, b * x * y - a * z, b * x * z + a * y,
            b * x * y + a * z, c + b * y * y, b * y * z - a * x,
            b * x * z - a * y, b * y * z + a * x, c + b * z * z,
        ],
        dim=-1,
    ).reshape(*rotvec.shape[:-1], 3, 3)


def matrix_to_axis_angle(matrices: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`axis_angle_to_matrix`: rotations (..., 3, 3) to rotation vectors (..., 3).

    The same algorithm and conventions as scipy's ``Rotation.from_matrix(R).as_rotvec()`` for
    orthonormal ``R`` (scipy also projects matrices that are not orthonormal to 1e-12 onto the
    nearest rotation first, and rejects determinants <= 0; neither is done here: pass
    rotations. Float32 poses cast to float64, for example, give vectors within about 1e-7 of
    scipy's).

    The vector comes from the rotation's unit quaternion ``(x, y, z, w)``, built from the
    largest of ``R00, R11, R22, trace`` (stable everywhere, including near pi), with the sign
    chosen as scipy's canonical form: ``w >= 0``, and at ``w == 0`` the first non-zero of
    ``x, y, z`` positive. Then ``angle = 2 atan2(|(x, y, z)|, w)`` in [0, pi] and
    ``v = angle / sin(angle / 2) * (x, y, z)``, with the Taylor series
    ``2 + angle^2 / 12 + 7 angle^4 / 2880`` of that factor for ``angle <= 1e-3``.

    At an angle of exactly pi, ``v`` and ``-v`` are the same rotation; which one is returned
    follows the rounding of ``w`` (about 1e-16 either side of 0), as in scipy (the same
    arithmetic, so the same sign on the same float64 matrix). Once ``pi - angle`` is well above
    that rounding, the sign of ``w`` and so the vector are determined.

    Parameters
    ----------
    matrices : (..., 3, 3) tensor
        Rotation matrices (orthonormal, determinant +1).

    Returns
    -------
    (..., 3) tensor
        Rotation vectors ``axis * angle``, angle in radians in [0, pi].
    """
    q = _matrix_to_unit_quaternion_xyzw(matrices)
    x, y, z, w = q.unbind(-1)
    flip = (w < 0) | ((w == 0) & ((x < 0) | ((x == 0) & ((y < 0) | ((y == 0) & (z < 0))))))
    q = torch.where(flip[..., None], -q, q)
    xyz, w = q[..., :3], q[..., 3:]
    angle = 2 * torch.atan2(torch.linalg.vector_norm(xyz, dim=-1, keepdim=True), w)
    small = angle <= 1e-3
    a2 = angle * angle
    sin_half = torch.where(small, torch.ones_like(angle), torch.sin(angle / 2))
    scale = torch.where(small, 2 + a2 / 12 + 7 * a2 * a2 / 2880, angle / sin_half)
    return scale * xyz


def rotation_6d_to_matrix(six_d: torch.Tensor) -> torch.Tensor:
    """Map the 6D representation (two 3-vectors) to a rotation by Gram-Schmidt.

    Parameters
    ----------
    six_d : (..., 6) tensor ``(a1, a2)``.

    Returns
    -------
    (..., 3, 3) rotation whose columns are ``e1 = a1/|a1|``, ``e2`` the normalised part of
    ``a2`` orthogonal to ``e1``, and ``e3 = e1 x e2`` (determinant +1).
    """
    a1, a2 = six_d[..., :3], six_d[..., 3:]
    e1 = torch.nn.functional.normalize(a1, dim=-1)
    e2 = torch.nn.functional.normalize(a2 - (e1 * a2).sum(-1, keepdim=True) * e1, dim=-1)
    e3 = torch.linalg.cross(e1, e2, dim=-1)
    return torch.stack([e1, e2, e3], dim=-1)


def matrix_to_rotation_6d(matrices: torch.Tensor) -> torch.Tensor:
    """The first two columns of (..., 3, 3) matrices, shape (..., 6)."""
    return torch.cat([matrices[..., :, 0], matrices[..., :, 1]], dim=-1)


def quaternion_to_matrix(quaternions: torch.Tensor) -> torch.Tensor:
    """Unit quaternions (w, x, y, z), shape (..., 4), to rotations (..., 3, 3)."""
    q = torch.nn.functional.normalize(quaternions, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*q.shape[:-1], 3, 3)


def random_rotations(
    n: int, *, generator: torch.Generator | None = None, device=None, dtype=torch.float32
) -> torch.Tensor:
    """``n`` rotations drawn uniformly (Haar measure) on SO(3), shape (n, 3, 3).

    Normalised 4D Gaussian vectors are uniform on the unit quaternion sphere, hence on SO(3).
    """
    # Draw on the generator's own device (torch refuses a CPU generator with device="cuda"),
    # then move: a CPU generator gives the same rotations whatever the output device.
    draw_device = generator.device if generator is not None else device
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64, device=draw_device)
    return quaternion_to_matrix(q).to(device=device, dtype=dtype)


def geodesic_distance(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """Angle (radians) of ``r1^T r2`` for (..., 3, 3) rotations, in [0, pi]."""
    trace = (r1 * r2).sum(dim=(-2, -1))  # trace(r1^T r2)
    cos = ((trace - 1) / 2).clamp(-1.0, 1.0)
    return torch.acos(cos)


def frobenius_distance_sq(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm ``||r1 - r2||_F^2`` of (..., 3, 3) matrices."""
    return ((r1 - r2) ** 2).sum(dim=(-2, -1))


def frobenius_sq_to_angle(d: torch.Tensor) -> torch.Tensor:
    """Angle (radians) of a rotation whose squared Frobenius distance to identity is ``d``."""
    return 2 * torch.asin(torch.sqrt(torch.clamp(d / 8, 0.0, 1.0)))


def in_plane_180(rotations: torch.Tensor) -> torch.Tensor:
    """Poses of the images rotated by 180 degrees in plane: ``R @ Rz(pi)`` (negate columns 0, 1)."""
    flip = torch.tensor([-1.0, -1.0, 1.0], dtype=rotations.dtype, device=rotations.device)
    return rotations * flip


def so3_grid(n_target: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """A deterministic near-uniform set of about ``n_target`` rotations, shape (M, 3, 3).

    Built from a Fibonacci sphere of viewing directions times a regular in-plane angle grid,
    with the number of directions and of in-plane angles matched so that their angular spacings
    agree (``4 pi / n_dirs ~ (2 pi / n_psi)^2``).
    """
    # spacing s: n_dirs ~ 4 pi / s^2, n_psi ~ 2 pi / s, n_dirs * n_psi ~ 8 pi^2 / s^3
    spacing = (8 * math.pi**2 / max(n_target, 1)) ** (1 / 3)
    n_psi = max(1, round(2 * math.pi / spacing))
    n_dirs = max(1, round(n_target / n_psi))
    i = torch.arange(n_dirs, dtype=torch.float64, device=device) + 0.5
    tilt = torch.acos(1 - 2 * i / n_dirs)
    rot = (math.pi * (1 + 5**0.5) * i) % (2 * math.pi)
    psi = torch.arange(n_psi, dtype=torch.float64, device=device) * (2 * math.pi / n_psi)
    angles = torch.stack(
        [rot[:, None].expand(-1, n_psi), tilt[:, None].expand(-1, n_psi), psi[None].expand(n_dirs, -1)],
        dim=-1,
    ).reshape(-1, 3)
    return euler_zyz_to_matrix(angles).to(dtype)


def procrustes_rotation(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The rotation ``A`` minimising ``sum_i ||A @ source_i - target_i||_F^2`` (orthogonal Procrustes).

    Parameters
    ----------
    source, target : (M, 3, 3) matrices.

    Returns
    -------
    (3, 3) rotation (determinant +1).
    """
    m = (target @ source.transpose(-1, -2)).sum(0)
    u, _, vh = torch.linalg.svd(m)
    d = torch.sign(torch.linalg.det(u @ vh))
    fix = torch.diag(torch.stack([torch.ones_like(d), torch.ones_like(d), d]))
    return u @ fix @ vh
