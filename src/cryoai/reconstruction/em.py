"""Pose search on a grid: scores of images against a map, stochastic EM, global and local search.

The squared error of an image ``Y`` (spectrum, CTF ``C``) against the projection ``P_r`` of a
rotation ``r`` shifted by ``s`` (phase ``T_s``) expands as
``||Y||^2 - 2 Re <Y, C T_s P_r> + <C^2, |P_r|^2>`` (sums weighted by the Hermitian weights),
so the errors of all images x shifts x rotations are two matrix products. That makes an
exhaustive search over a few thousand rotations cheap at low resolution, and the posterior
weighted back-projection (the M step) is again two matrix products plus the insertion of one
slice per rotation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..models.image_formation import ImageFormation
from ..physics.backprojection import insert_slices
from ..physics.projection import sample_volume, slice_coords
from ..physics.rotations import axis_angle_to_matrix, random_rotations, so3_grid
from ..physics.shifts import phase_shift
from .backproject import backproject
from .regularised import regularised_volume

#: Posterior probabilities below this are set to exactly zero. Softmax of sharply peaked logits
#: otherwise underflows into denormal floats (below 1.2e-38), and matrix products with denormal
#: operands run several times slower on some CPUs (microcode assists); nothing that matters
#: depends on probabilities this small.
POSTERIOR_FLOOR = 1e-30


def posterior(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis with every probability below :data:`POSTERIOR_FLOOR` set to 0.

    The logits are floored *before* the exponential (at ``max + log(POSTERIOR_FLOOR)``), so no
    denormal float is ever formed: a kept term is at least ``POSTERIOR_FLOOR / K`` after
    normalisation over ``K`` entries, far above the smallest normal float for any grid size.

    Parameters
    ----------
    logits : (..., K) real.

    Returns
    -------
    (..., K) probabilities summing to 1 over the last axis, exact zeros or >= 1e-30 / K.
    """
    return posterior_from_errors_(-logits.clone(), 1.0)


def posterior_from_errors_(errors: torch.Tensor, scale: float) -> torch.Tensor:
    """In place: squared errors (B, K) -> posterior ``softmax(-scale * errors)`` over the last
    axis, each probability below :data:`POSTERIOR_FLOOR` exactly zero (the :func:`posterior` of
    the logits ``-scale * errors``, with no temporary of the tensor's size and no denormal).

    Parameters
    ----------
    errors : (B, K) real, overwritten.
    scale : ``1 / (2 sigma^2 T)``, the inverse temperature of the errors.

    Returns
    -------
    ``errors``, now the probabilities.
    """
    return posterior_and_max_(errors, scale)[0]


def posterior_and_max_(errors: torch.Tensor, scale: float, minimum: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`posterior_from_errors_`, with each row's largest probability, and the rows' smallest
    errors when the caller already has them (one pass over the errors fewer each).

    The largest logit is 0 once the smallest error is subtracted, its exponential exactly 1, so
    the largest probability is ``1 / sum``: no search for it.

    Parameters
    ----------
    errors : (B, K) real, overwritten.
    scale : as :func:`posterior_from_errors_`.
    minimum : (B,) each row's smallest error, or None (found here).

    Returns
    -------
    ``errors``, now the probabilities, and (B,) each row's largest probability.
    """
    low = math.log(POSTERIOR_FLOOR)
    if minimum is None:
        minimum = errors.min(dim=-1).values
    # logits (minimum - errors) * scale, maximum 0, in one pass: scale * minimum - scale * errors
    torch.add((scale * minimum)[:, None], errors, alpha=-scale, out=errors)
    # Logits at or below log(POSTERIOR_FLOOR) -> -inf, whose exponential is exactly 0: every
    # kept probability is >= POSTERIOR_FLOOR before normalisation, never denormal.
    torch.nn.functional.threshold_(errors, low, -math.inf).exp_()
    total = errors.sum(dim=-1, keepdim=True)
    return errors.div_(total), total[:, 0].reciprocal()


#: The M step sums an image's posterior over only its :data:`SPARSE_ROTATIONS` most probable
#: rotations where they hold at least this share of its mass (as RELION's significant weights
#: keep 99.9% of it); else over every rotation.
SIGNIFICANT_MASS = 0.999
#: The rotations an image's sparse M step keeps (each at every shift): the 256 most probable of
#: the default grid's 4,608 hold 99.9% of the posterior of about half the images once the EM
#: has found their poses (64: a third; 512: 0.6; measured at 64 px, -10 dB, band 10 px); the
#: rest are low-signal images whose posterior stays diffuse. A sparse image costs about 1/18 of
#: a dense one.
SPARSE_ROTATIONS = 256


def add_posterior_sums_(post: torch.Tensor, x: torch.Tensor, c2: torch.Tensor, num_re: torch.Tensor,
                        num_im: torch.Tensor, den: torch.Tensor, workspace: Workspace | None = None) -> int:
    """The M step's sums, in place: ``num_r += sum_{b,s} post[b,s,r] x[b,s]`` and
    ``den_r += sum_{b,s} post[b,s,r] c2[b]``.

    Dense, they are two matrix products as large as the E step's. An image whose posterior has
    found its pose holds almost all of its mass in a few rotations: where its
    :data:`SPARSE_ROTATIONS` most probable rotations (by their best shift) hold
    :data:`SIGNIFICANT_MASS` of it, only they are summed (a small batched product per image,
    added by index), their weights scaled to sum to 1. The images with a diffuse posterior (all
    of them early in the EM, low-signal or junk images later) are summed densely.

    Parameters
    ----------
    post : (B, S, R) posterior over shifts x rotations, each image's summing to 1.
    x : (B, S, P) complex, each image's CTF-weighted spectrum at each shift (``C Y conj(T_s)``).
    c2 : (B, P) the squared CTFs.
    num_re, num_im, den : (R, P) real sums, updated.
    workspace : buffers to reuse (the dense images' posterior is gathered into one).

    Returns
    -------
    How many of the B images were summed sparsely.
    """
    b, n_s, m = post.shape
    p = x.shape[-1]
    k = SPARSE_ROTATIONS
    n_sparse = 0
    if k < m:  # (a grid of K rotations or fewer: the dense sums are the cheaper)
        top = post.amax(dim=1).topk(k, dim=-1).indices  # (B, K)
        w = post.gather(2, top[:, None, :].expand(b, n_s, k))  # (B, S, K)
        mass = w.sum(dim=(1, 2))
        sparse = mass >= SIGNIFICANT_MASS
        rows = sparse.nonzero(as_tuple=True)[0]
        n_sparse = len(rows)
    if n_sparse:
        ws = w[rows].transpose(1, 2) / mass[rows, None, None]  # (b', K, S)
        parts = torch.bmm(ws, torch.view_as_real(x[rows]).reshape(n_sparse, n_s, 2 * p))  # (b', K, 2P)
        parts = parts.reshape(n_sparse * k, p, 2)
        idx = top[rows].reshape(-1)
        num_re.index_add_(0, idx, parts[..., 0])
        num_im.index_add_(0, idx, parts[..., 1])
        den.index_add_(0, idx, (ws.sum(-1)[..., None] * c2[rows, None, :]).reshape(n_sparse * k, p))
    if n_sparse < b:
        pd, xd, cd = post, x, c2
        if n_sparse:
            dense = (~sparse).nonzero(as_tuple=True)[0]
            bd = len(dense)
            out = workspace.get("dense_posterior", (bd, n_s, m), dtype=post.dtype, device=post.device) \
                if workspace is not None else None
            pd = torch.index_select(post, 0, dense, out=out) if out is not None else post[dense]
            xd, cd = x[dense], c2[dense]
        bd = len(pd)
        pt = pd.view(bd * n_s, m).T  # (R, B*S)
        num_re.addmm_(pt, xd.real.reshape(bd * n_s, p))
        num_im.addmm_(pt, xd.imag.reshape(bd * n_s, p))
        den.addmm_(pd.sum(1).T, cd)
    return n_sparse


class Workspace:
    """Buffers reused by the search's hot loops, so that they allocate nothing large per call.

    A buffer of more than glibc's mmap threshold (at most 32 MB) is otherwise a fresh mapping
    each time it is made, and every page of it is faulted in and zeroed by the kernel, every
    chunk of every iteration; reusing one costs its page faults once.
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], *, dtype=torch.float32, device=None) -> torch.Tensor:
        """An uninitialised tensor of ``shape``, the same memory at every call with ``name``."""
        size = math.prod(shape)
        device = torch.device(device if device is not None else "cpu")
        buf = self._buffers.get(name)
        same_device = buf is not None and buf.device.type == device.type and \
            (device.index is None or buf.device.index == device.index)
        if not same_device or buf.numel() < size or buf.dtype != dtype:
            buf = torch.empty(size, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:size].view(shape)


def shift_grid(max_shift_px: float, step_px: float, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Square grid of 2D shifts (S, 2) in pixels within a disk of radius ``max_shift_px``."""
    k = int(math.floor(max_shift_px / step_px + 1e-9))
    r = torch.arange(-k, k + 1, device=device, dtype=dtype) * step_px
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)
    return pts[pts.norm(dim=-1) <= max_shift_px + 1e-6]


@dataclass
class SearchData:
    """Images' coefficients on a set of P half-plane frequencies (a band of the layout).

    Attributes
    ----------
    spectra : (B, P) complex image coefficients (1/N scale).
    ctf : (B, P) real CTFs.
    weight : (P,) Hermitian weights.
    coords_px : (P, 2) frequency pixels.
    freqs_px : (P, 2) cycles per pixel (for shifts in pixels).
    """

    spectra: torch.Tensor
    ctf: torch.Tensor
    weight: torch.Tensor
    coords_px: torch.Tensor
    freqs_px: torch.Tensor

    @classmethod
    def in_band(cls, formation: ImageFormation, spectra: torch.Tensor, ctf: torch.Tensor,
                radius_px: float) -> SearchData:
        """The coefficients of (B, M) ``spectra`` and ``ctf`` within ``radius_px`` of DC."""
        keep = formation.band(radius_px)
        return cls(spectra[:, keep], ctf[:, keep], formation.hermitian_weight[keep],
                   formation.coords_px[keep], formation.freqs_px[keep])

    def rows(self, start: int, stop: int) -> SearchData:
        """Images ``start:stop`` on the same frequencies."""
        return SearchData(self.spectra[start:stop], self.ctf[start:stop], self.weight,
                          self.coords_px, self.freqs_px)


def score_grid(data: SearchData, projections: torch.Tensor, shifts_px: torch.Tensor, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Squared errors ``||Y - C T_s P_r||^2`` (B, S, R) of every image against every shifted
    projection, as two matrix products (see the module docstring).

    Parameters
    ----------
    data : B images on P frequencies.
    projections : (R, P) complex, central slices of the map at R rotations.
    shifts_px : (S, 2) shifts in pixels.
    out : optional (B * S * R,) or larger float32 buffer to compute into (no allocation of the
        result).

    Returns
    -------
    (B, S, R) real, Hermitian-weighted sums over the P coefficients.
    """
    y, c, w = data.spectra, data.ctf, data.weight
    # The cross term Re <Y C w, T_s P_r> = Re sum(conj(Y) C w T_s P_r) is the real dot product
    # of the (Re, Im) pairs of Y C w conj(T_s) with those of P_r: one matrix product of length
    # 2P on contiguous views, no copies of real or imaginary parts. The result starts as
    # ||Y||^2 + <C^2, |P_r|^2> and the product is added in place: two passes over (B, S, R).
    phases = phase_shift(data.freqs_px, shifts_px)  # (S, P)
    z = (y * c * w)[:, None, :] * phases.conj()[None]  # (B, S, P)
    b, s, p = z.shape
    r = projections.shape[0]
    if out is None or out.dtype != y.real.dtype:
        out = torch.empty(b * s * r, dtype=y.real.dtype, device=y.device)
    err = out.reshape(-1)[:b * s * r].view(b, s, r)
    norm = (c * c * w) @ _power(projections).T  # (B, R)
    y2 = (_power(y) * w).sum(-1)  # (B,)
    err.copy_((norm + y2[:, None])[:, None, :].expand(b, s, r))
    pairs = torch.view_as_real(projections.resolve_conj().contiguous()).reshape(r, 2 * p)
    err.view(b * s, r).addmm_(torch.view_as_real(z).reshape(b * s, 2 * p), pairs.T, alpha=-2)
    return err


def _power(values: torch.Tensor) -> torch.Tensor:
    """``|values|^2`` of a complex tensor, as the sum of squared parts (cheaper than ``abs``)."""
    return torch.view_as_real(values).square().sum(-1)


def local_rotations(n: int, max_angle_rad: float, *, generator=None, device=None,
                    dtype=torch.float32) -> torch.Tensor:
    """``n`` rotations within roughly ``max_angle_rad`` of the identity (the first is the identity)."""
    axis = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    axis = axis / axis.norm(dim=-1, keepdim=True)
    angle = max_angle_rad * torch.rand(n, 1, generator=generator, dtype=torch.float64) ** (1 / 3)
    r = axis_angle_to_matrix(axis * angle)
    r[0] = torch.eye(3, dtype=torch.float64)
    return r.to(device=device, dtype=dtype)


class ExpectationMaximisation:
    """Stochastic EM over a rotation grid x shift grid at low resolution, with frequency marching.

    Holds the current map (``fourier_volume``, (N, N, N) complex, 1/N scale) and the decayed
    running back-projection sums. Each :meth:`iterate` scores a mini-batch of images against
    every grid rotation and shift (E step) and back-projects them weighted by their posterior
    (M step).

    Parameters
    ----------
    formation : the coefficient layout (frequencies, Hermitian weights, bands).
    n_rotations : size of the SO(3) grid.
    max_shift_px, shift_step_px : the shift grid (a disk), pixels.
    mask_radius_px : radius of the soft real-space mask applied to each map.
    generator : torch Generator for the random initial poses.
    n_classes : K maps searched together (heterogeneous ab initio, as cryoSPARC's): each image's
        posterior runs over classes x rotations x shifts, each class's map is made from the
        images weighted by their posterior in it (``class_volumes``); 1: one map.
    """

    def __init__(self, formation: ImageFormation, *, n_rotations: int = 4608, max_shift_px: float = 6.0,
                 shift_step_px: float = 1.5, mask_radius_px: float,
                 generator: torch.Generator | None = None, n_classes: int = 1):
        self.formation = formation
        self.n = formation.box_px
        self.device = formation.coords_px.device
        self.grid = so3_grid(n_rotations, device=self.device)
        self.grid_step_rad = (8 * math.pi**2 / len(self.grid)) ** (1 / 3)
        self.shifts = shift_grid(max_shift_px, shift_step_px, device=self.device)
        self.mask_radius_px = mask_radius_px
        self.generator = generator
        self.n_classes = int(n_classes)
        self.class_volumes: list[torch.Tensor] = []
        self._num: list[torch.Tensor] | None = None
        self._den: list[torch.Tensor] | None = None
        self.workspace = Workspace()

    @property
    def fourier_volume(self) -> torch.Tensor | None:
        """The current map ((N, N, N) complex, 1/N scale); with several classes, the first's."""
        return self.class_volumes[0] if self.class_volumes else None

    @fourier_volume.setter
    def fourier_volume(self, volume: torch.Tensor) -> None:
        self.class_volumes = [volume] * self.n_classes

    def set_map(self, numerator: torch.Tensor, denominator: torch.Tensor, radius_px: float) -> None:
        """Make the current map from back-projected sums (:func:`regularised_volume`)."""
        self.fourier_volume = self._regularised(numerator, denominator, radius_px)

    def _regularised(self, numerator: torch.Tensor, denominator: torch.Tensor, radius_px: float):
        return regularised_volume(numerator, denominator, radius_px=radius_px,
                                  mask_radius_px=self.mask_radius_px)

    def initialise(self, spectra: torch.Tensor, ctf: torch.Tensor, radius_px: float) -> None:
        """Initial map: back-projection of the images at random poses (a blob of the right size);
        with K classes, one blob from each of K disjoint parts of the images (blobs that differ
        by their images' noise, which the EM's first iterations amplify into K classes).
        """
        d = SearchData.in_band(self.formation, spectra, ctf, radius_px)
        rot = random_rotations(len(spectra), generator=self.generator, device=self.device)
        parts = torch.arange(len(spectra), device=self.device).chunk(self.n_classes)
        self.class_volumes = [
            self._regularised(*backproject(d.spectra[i], d.ctf[i], rot[i], d.coords_px, self.n), radius_px)
            for i in parts]

    @torch.no_grad()
    def iterate(self, spectra: torch.Tensor, ctf: torch.Tensor, radius_px: float, *,
                temperature: float = 1.0, chunk: int = 128, ema: float = 0.0) -> dict:
        """One EM iteration (E: posterior over grid x shifts; M: weighted back-projection).

        Parameters
        ----------
        spectra, ctf : (B, M) the mini-batch's coefficients and CTFs (the full layout).
        radius_px : the band used, frequency pixels.
        temperature : anneals the posterior (1: the noise model's).
        chunk : images scored at a time.
        ema : decay of the running sums (0: this mini-batch only).

        Returns
        -------
        dict with the best grid ``rotations`` (B, 3, 3), ``shifts_px`` (B, 2), the
        ``posterior_max`` (B,), the best ``error`` (B,) and the noise variance ``sigma2``; with
        several classes, each image's best ``classes`` (B,) and ``class_posterior`` (B, K).
        """
        d_all = SearchData.in_band(self.formation, spectra, ctf, radius_px)
        pts = slice_coords(self.grid, d_all.coords_px)
        # K classes: their slices side by side, as K x R rotations (class k's rotation r at k R + r)
        proj = torch.cat([sample_volume(v, pts) for v in self.class_volumes])  # (K R, P)
        m, p = proj.shape
        n_rot = len(self.grid)
        chunk = max(16, chunk // self.n_classes)  # the scores' buffer no larger than one class's
        n_s = len(self.shifts)
        ws = self.workspace
        num_re = torch.zeros(m, p, dtype=proj.real.dtype, device=self.device)
        num_im = torch.zeros_like(num_re)
        den_slices = torch.zeros_like(num_re)
        best_r, best_s, best_p, errs, class_post = [], [], [], [], []
        phases = phase_shift(d_all.freqs_px, self.shifts)  # (S, P)
        # Noise variance per coefficient, from the best fit of a first chunk (model mismatch for
        # noise-free data); the temperature anneals the posterior.
        sigma2 = None
        sparse = 0
        for start in range(0, len(spectra), chunk):
            d = d_all.rows(start, start + chunk)
            y, c = d.spectra, d.ctf
            b = len(y)
            err = score_grid(d, proj, self.shifts,
                             out=ws.get("scores", (chunk * n_s * m,), dtype=proj.real.dtype,
                                        device=self.device))  # (B, S, R)
            flat = err.view(b, n_s * m)
            emin, arg = flat.min(dim=-1)
            if sigma2 is None:
                sigma2 = float(emin.mean() / d_all.weight.sum().clamp_min(1)) + 1e-12
            post, post_max = posterior_and_max_(flat, 1.0 / (2 * sigma2 * temperature), emin)  # in place
            if self.n_classes > 1:
                class_post.append(post.view(b, n_s, self.n_classes, n_rot).sum(dim=(1, 3)))
            best_p.append(post_max)
            best_r.append(arg % m)
            best_s.append(arg // m)
            errs.append(emin)
            # M step: the back-projection sums of backproject(), each image at every grid
            # rotation and shift weighted by its posterior: X_bs = C Y conj(T_s);
            # A_r = sum_{b,s} post * X_bs; D_r = sum_b post_b C^2, then one insertion per rotation.
            x = (c * y)[:, None, :] * phases.conj()[None]  # (B, S, P)
            sparse += add_posterior_sums_(post.view(b, n_s, m), x, c * c, num_re, num_im, den_slices, ws)
        num_slices = torch.complex(num_re, num_im)
        blocks = [slice(k * n_rot, (k + 1) * n_rot) for k in range(self.n_classes)]
        sums = [insert_slices(num_slices[k], den_slices[k], pts, self.n) for k in blocks]
        if ema > 0 and self._num is not None:
            # Stochastic EM: decayed running sums over mini-batches.
            sums = [(ema * a + num, ema * b + den)
                    for (num, den), a, b in zip(sums, self._num, self._den, strict=True)]
        self._num, self._den = [num for num, _ in sums], [den for _, den in sums]
        self.class_volumes = [self._regularised(num, den, radius_px) for num, den in sums]
        idx = torch.cat(best_r)
        out = {"rotations": self.grid[idx % n_rot], "shifts_px": self.shifts[torch.cat(best_s)],
               "posterior_max": torch.cat(best_p), "error": torch.cat(errs), "sigma2": sigma2,
               "sparse_share": sparse / len(spectra)}
        if self.n_classes > 1:
            out["classes"] = idx // n_rot
            out["class_posterior"] = torch.cat(class_post)  # (B, K)
        return out


@torch.no_grad()
def assign_global(formation: ImageFormation, fourier_volume: torch.Tensor, spectra: torch.Tensor,
                  ctf: torch.Tensor, radius_px: float, grid: torch.Tensor, shifts_px: torch.Tensor,
                  chunk: int = 128, workspace: Workspace | None = None,
                  projections: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best grid rotation and shift of each image against a map (the E step's argmin).

    Parameters
    ----------
    formation : the coefficient layout.
    fourier_volume : (N, N, N) complex map, 1/N scale.
    spectra, ctf : (B, M) the images' coefficients and CTFs.
    radius_px : the band used.
    grid : (R, 3, 3) rotations tried; shifts_px : (S, 2) shifts tried, pixels.
    chunk : images scored at a time.
    workspace : buffers to reuse (e.g. the EM's).
    projections : (R, P) the grid's slices in this band, if already made (else made here).

    Returns
    -------
    rotations (B, 3, 3) and shifts (B, 2) pixels.
    """
    d_all = SearchData.in_band(formation, spectra, ctf, radius_px)
    proj = projections if projections is not None else \
        sample_volume(fourier_volume, slice_coords(grid, d_all.coords_px))
    workspace = workspace or Workspace()
    rots, shs = [], []
    for start in range(0, len(spectra), chunk):
        d = d_all.rows(start, start + chunk)
        buf = workspace.get("scores", (chunk * len(shifts_px) * len(grid),), dtype=proj.real.dtype,
                            device=spectra.device)
        arg = argmin_rows(score_grid(d, proj, shifts_px, out=buf))
        rots.append(grid[arg % len(grid)])
        shs.append(shifts_px[arg // len(grid)])
    return torch.cat(rots), torch.cat(shs)


@dataclass
class PrunedGrid:
    """The coarse pass of :func:`assign_pruned`: the grid's slices in a lower band, a coarser
    shift grid, and how many rotations of each image it keeps for the full scoring.

    Attributes
    ----------
    radius_px : the coarse band, frequency px.
    projections : (R, Pc) the grid's slices in it.
    shifts_px : (Sc, 2) the coarse shift grid, pixels.
    keep : rotations kept per image (T).
    """

    radius_px: float
    projections: torch.Tensor
    shifts_px: torch.Tensor
    keep: int

    @classmethod
    def make(cls, formation: ImageFormation, fourier_volume: torch.Tensor, grid: torch.Tensor,
             radius_px: float, max_shift_px: float, shift_step_px: float, keep: int) -> PrunedGrid:
        """The coarse pass for ``grid`` (R, 3, 3) against a map (its slices made here)."""
        coords = formation.coords_px[formation.band(radius_px)]
        return cls(float(radius_px), sample_volume(fourier_volume, slice_coords(grid, coords)),
                   shift_grid(max_shift_px, shift_step_px, device=fourier_volume.device), int(keep))


def assign_pruned(formation: ImageFormation, spectra: torch.Tensor, ctf: torch.Tensor, radius_px: float,
                  grid: torch.Tensor, shifts_px: torch.Tensor, projections: torch.Tensor, coarse: PrunedGrid,
                  chunk: int = 128, workspace: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The global first guess of :func:`assign_global` in two passes: every rotation of the
    grid is scored in a lower band over a coarser shift grid (``coarse``), and each image's
    ``coarse.keep`` best rotations (best over the coarse shifts) are scored again in the full
    band over the full shift grid (:func:`score_hypotheses`).

    The exhaustive search's cost is the (B, S, R) array of scores, written and read several
    times, as much as the matrix product that fills it: the coarse pass shrinks it by
    ``S / Sc`` and the product by ``P / Pc``. The low frequencies carry most of a noisy image's
    signal, so the best rotation is almost always among those kept: at L=64, -10 dB, 4,608
    rotations, with a band of 0.7x, shifts 1/0.7 further apart (the same largest phase error)
    and 64 rotations kept, 99.5% of the first guesses were within 10 deg of the exhaustive
    search's, at 0.57x its time (docs/benchmarks.md).

    Parameters
    ----------
    formation, spectra, ctf, radius_px, grid, shifts_px : as :func:`assign_global`.
    projections : (R, P) the grid's slices in the full band.
    coarse : the coarse pass (:meth:`PrunedGrid.make`).
    chunk : images scored at a time.
    workspace : buffers to reuse.

    Returns
    -------
    rotations (B, 3, 3) and shifts (B, 2) pixels.
    """
    d_all = SearchData.in_band(formation, spectra, ctf, radius_px)
    c_all = SearchData.in_band(formation, spectra, ctf, coarse.radius_px)
    workspace = workspace or Workspace()
    n_rot = len(grid)
    keep = min(coarse.keep, n_rot)
    rots, shs = [], []
    for start in range(0, len(spectra), chunk):
        c = c_all.rows(start, start + chunk)
        buf = workspace.get("coarse_scores", (chunk * len(coarse.shifts_px) * n_rot,),
                            dtype=coarse.projections.real.dtype, device=spectra.device)
        errors = score_grid(c, coarse.projections, coarse.shifts_px, out=buf)  # (b, Sc, R)
        top = errors.amin(dim=1).topk(keep, dim=-1, largest=False).indices  # (b, T)
        d = d_all.rows(start, start + chunk)
        err = score_hypotheses(d, projections[top], shifts_px)  # (b, S, T)
        b, _, k = err.shape
        arg = err.reshape(b, -1).argmin(dim=-1)
        rots.append(grid[top[torch.arange(b, device=top.device), arg % k]])
        shs.append(shifts_px[arg // k])
    return torch.cat(rots), torch.cat(shs)


def argmin_rows(errors: torch.Tensor) -> torch.Tensor:
    """The flat index ``s * R + r`` of each image's smallest error in ``errors`` (B, S, R), as
    ``errors.view(B, -1).argmin(-1)`` (the first of equal ones), in two stages: the minimum of
    each (image, shift) row, then the argmin within the best row. ``amin`` vectorises on CPU
    where ``argmin`` over 200,000 values per image runs about 10x slower (a quarter of the
    global search's time).
    """
    b, s, r = errors.shape
    best_shift = errors.amin(dim=-1).argmin(dim=-1)  # (B,)
    rows = errors[torch.arange(b, device=errors.device), best_shift]  # (B, R)
    return best_shift * r + rows.argmin(dim=-1)


def score_hypotheses(data: SearchData, projections: torch.Tensor, shifts_px: torch.Tensor, *,
                     centre_px: torch.Tensor | None = None) -> torch.Tensor:
    """Ranking errors (B, S, K) of each image against its own K projections at its own S shifts:
    ``||Y - C T_s P_k||^2`` less the image's ``||Y||^2`` (which does not change the ranking), a
    batched matrix product with no (B, S, K, P) prediction made.

    Parameters
    ----------
    data : B images on P frequencies.
    projections : (B, K, P) complex.
    shifts_px : (S, 2) shifts shared by every image, or (B, S, 2) per image, pixels.
    centre_px : optional (B, 2): the shifts are then ``centre_px + shifts_px`` ((S, 2) offsets),
        and the phases factorise into one per image and one per offset (no (B, S, P) of them).
    """
    y, c, w = data.spectra, data.ctf, data.weight
    b, p = y.shape
    ycw = y * c * w
    if centre_px is not None:
        ycw = ycw * phase_shift(data.freqs_px, centre_px).conj()  # (B, P)
        ph = phase_shift(data.freqs_px, shifts_px)[None]  # (1, S, P)
    elif shifts_px.dim() == 2:
        ph = phase_shift(data.freqs_px, shifts_px)[None]  # (1, S, P)
    else:
        ph = phase_shift(data.freqs_px, shifts_px.reshape(-1, 2)).reshape(b, -1, p)  # (B, S, P)
    z = ycw[:, None, :] * ph.conj()  # (B, S, P): see score_grid
    s, k = z.shape[1], projections.shape[1]
    pairs = torch.view_as_real(projections.resolve_conj().contiguous()).reshape(b, k, 2 * p)
    cross = torch.bmm(torch.view_as_real(z).reshape(b, s, 2 * p), pairs.transpose(1, 2))  # (B, S, K)
    # <C^2 w, |P_k|^2> as one product over the (Re, Im) pairs, each weighted by C^2 w (a sum
    # over the pairs' axis of length 2 would be a strided reduction, 3x slower here).
    ccw = (c * c * w).repeat_interleave(2, dim=-1)  # (B, 2P)
    norm = torch.bmm(ccw[:, None, :], pairs.square().transpose(1, 2))  # (B, 1, K)
    return cross.mul_(-2).add_(norm)


@torch.no_grad()
def refine_local(formation: ImageFormation, fourier_volume: torch.Tensor, spectra: torch.Tensor,
                 ctf: torch.Tensor, rotations: torch.Tensor, shifts_px: torch.Tensor, radius_px: float, *,
                 max_angle_rad: float, n_candidates: int = 64, shift_step_px: float = 0.5,
                 generator: torch.Generator | None = None,
                 chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Local search: each image's best of ``n_candidates`` rotations within ``max_angle_rad`` of
    its current one (the current one included: :func:`local_rotations`, the same perturbations
    for every image) times a 3x3 grid of shifts ``shift_step_px`` apart around its current shift.

    The errors are ranked by :func:`score_hypotheses`.

    Parameters
    ----------
    formation, fourier_volume, spectra, ctf, radius_px : as :func:`assign_global`.
    rotations : (B, 3, 3), shifts_px : (B, 2) the current poses.
    chunk : images refined at a time.

    Returns
    -------
    rotations (B, 3, 3) and shifts (B, 2) pixels, never worse-scoring than the current ones.
    """
    d_all = SearchData.in_band(formation, spectra, ctf, radius_px)
    pert = local_rotations(n_candidates, max_angle_rad, generator=generator, device=rotations.device)
    local_shift = shift_grid(shift_step_px * 1.01, shift_step_px, device=rotations.device)  # 3x3
    out_r, out_s = [], []
    for start in range(0, len(spectra), chunk):
        d = d_all.rows(start, start + chunk)
        y = d.spectra
        r0 = rotations[start:start + chunk]
        s0 = shifts_px[start:start + chunk]
        b, p = y.shape
        cand = r0[:, None] @ pert[None]  # (B, K, 3, 3)
        proj = sample_volume(fourier_volume, slice_coords(cand.reshape(-1, 3, 3), d.coords_px))
        proj = proj.reshape(b, n_candidates, p)  # (B, K, P)
        sh = s0[:, None, :] + local_shift[None]  # (B, S, 2)
        err = score_hypotheses(d, proj, local_shift, centre_px=s0).reshape(b, -1)
        arg = err.argmin(dim=-1)
        k = arg % n_candidates
        si = arg // n_candidates
        ar = torch.arange(b, device=y.device)
        out_r.append(cand[ar, k])
        out_s.append(sh[ar, si])
    return torch.cat(out_r), torch.cat(out_s)


def _newton_stencil() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """The fixed design of :func:`refine_newton`.

    Returns
    -------
    rotation offsets (10, 3) in steps (the centre, +-1 on each axis, +1 on each pair of axes),
    shift offsets (9, 2) in steps (a 3 x 3 grid), the least-squares solver (21, 90) of the full
    quadratic in the 5 normalised parameters ``z = (shift x, shift y, rotation x, y, z)`` over
    their product (scores in (shift, rotation) order), and the (i, j) pair of each quadratic term.
    """
    u = [(0.0, 0.0, 0.0)]
    for axis in range(3):
        for sign in (1.0, -1.0):
            e = [0.0, 0.0, 0.0]
            e[axis] = sign
            u.append(tuple(e))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        e = [0.0, 0.0, 0.0]
        e[a] = e[b] = 1.0
        u.append(tuple(e))
    rot = torch.tensor(u, dtype=torch.float64)
    shift = torch.tensor([(x, y) for y in (-1.0, 0.0, 1.0) for x in (-1.0, 0.0, 1.0)], dtype=torch.float64)
    z = torch.cat([shift[:, None, :].expand(-1, len(rot), -1), rot[None].expand(len(shift), -1, -1)], -1)
    z = z.reshape(-1, 5)
    pairs = [(i, j) for i in range(5) for j in range(i, 5)]
    columns = [torch.ones(len(z)), *z.T] + [z[:, i] * z[:, j] * (0.5 if i == j else 1.0) for i, j in pairs]
    return rot, shift, torch.linalg.pinv(torch.stack(columns, dim=-1)), pairs


_NEWTON = _newton_stencil()


@torch.no_grad()
def refine_newton(formation: ImageFormation, fourier_volume: torch.Tensor, spectra: torch.Tensor,
                  ctf: torch.Tensor, rotations: torch.Tensor, shifts_px: torch.Tensor, radius_px: float, *,
                  step_rad: float, shift_step_px: float, trust_steps: float = 2.0,
                  chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """One Newton step of each image's pose on a quadratic model of its error.

    Each image's error is scored at 10 rotations (its own, +-``step_rad`` about each axis of
    its image frame, and +``step_rad`` about each pair of axes) times 9 shifts (a 3 x 3 grid
    ``shift_step_px`` apart): 10 slices and 90 scores (:func:`score_hypotheses`). A full
    quadratic in the 5 pose parameters (3 rotation, 2 shift) is fitted to them by least squares
    (one fixed (21, 90) solver for every image), and its minimum (within ``trust_steps`` steps
    of the current pose on each parameter) is scored as an 11th slice. The best-scoring of the
    91 poses is kept, so the error never increases. Near the optimum, the error is quadratic in
    the pose, so a round takes a pose to the minimum of the model, where the random candidates
    of :func:`refine_local` only sample around it: 4 rounds of steps 7, 3.5, 1.75 and 0.9 deg
    reach the accuracy of 8 rounds x 48 random candidates at about a tenth of the slices
    (docs/benchmarks.md).

    Parameters
    ----------
    formation, fourier_volume, spectra, ctf, radius_px : as :func:`assign_global`.
    rotations : (B, 3, 3), shifts_px : (B, 2) the current poses.
    step_rad, shift_step_px : the finite-difference steps (about the expected error).
    trust_steps : the largest move, in steps, on each parameter.
    chunk : images refined at a time.

    Returns
    -------
    rotations (B, 3, 3) and shifts (B, 2) pixels, never worse-scoring than the current ones.
    """
    rot_steps, shift_steps, solver, pairs = _NEWTON
    device, dtype = rotations.device, rotations.dtype
    perturb = axis_angle_to_matrix(rot_steps * step_rad).to(device=device, dtype=dtype)  # (10, 3, 3)
    offsets = (shift_steps * shift_step_px).to(device=device, dtype=shifts_px.dtype)  # (9, 2)
    solver = solver.to(device=device, dtype=torch.float32)
    d_all = SearchData.in_band(formation, spectra, ctf, radius_px)
    k = len(perturb)
    rows_i = torch.tensor([i for i, _ in pairs], device=device)
    rows_j = torch.tensor([j for _, j in pairs], device=device)
    out_r, out_s = [], []
    for start in range(0, len(spectra), chunk):
        d = d_all.rows(start, start + chunk)
        r0, s0 = rotations[start:start + chunk], shifts_px[start:start + chunk]
        b, p = d.spectra.shape
        cand = r0[:, None] @ perturb[None]  # (B, 10, 3, 3)
        proj = sample_volume(fourier_volume, slice_coords(cand.reshape(-1, 3, 3), d.coords_px))
        proj = proj.reshape(b, k, p)
        sh = s0[:, None, :] + offsets[None]  # (B, 9, 2)
        err = score_hypotheses(d, proj, offsets, centre_px=s0).reshape(b, -1)  # (B, 90): (shift, rotation)
        theta = err.float() @ solver.T  # (B, 21): constant, gradient (5), quadratic terms (15)
        hessian = torch.zeros(b, 5, 5, device=device, dtype=theta.dtype)
        hessian[:, rows_i, rows_j] = theta[:, 6:]
        hessian[:, rows_j, rows_i] = theta[:, 6:]
        curvature = torch.linalg.eigvalsh(hessian)
        convex = curvature[:, 0] > 1e-6 * curvature[:, -1].abs().clamp_min(1e-30)
        safe = torch.where(convex[:, None, None], hessian, torch.eye(5, device=device, dtype=theta.dtype))
        step = -torch.linalg.solve(safe, theta[:, 1:6, None])[..., 0]  # (B, 5), in steps
        step = step * (trust_steps / step.abs().amax(dim=-1, keepdim=True).clamp_min(trust_steps))
        step = step * convex[:, None]
        r_new = r0 @ axis_angle_to_matrix(step[:, 2:].double() * step_rad).to(dtype)
        s_new = s0 + step[:, :2].to(s0.dtype) * shift_step_px
        proj_new = sample_volume(fourier_volume, slice_coords(r_new, d.coords_px))[:, None]  # (B, 1, P)
        err_new = score_hypotheses(d, proj_new, s_new[:, None, :]).reshape(b)
        best = err.argmin(dim=-1)
        ar = torch.arange(b, device=device)
        take_new = (err_new < err[ar, best])
        out_r.append(torch.where(take_new[:, None, None], r_new, cand[ar, best % k]))
        out_s.append(torch.where(take_new[:, None], s_new, sh[ar, best // k]))
    return torch.cat(out_r), torch.cat(out_s)
