"""The encoder stage: a pose encoder learns from a map and the poses of some particles.

After the search has a map and the poses of its subset, :func:`train_pose_encoder` trains a
:class:`cryoai.models.encoder.PoseGridEncoder` by supervision (a "sleep phase", as in
cryoPARES' warm-up, ACE-EM and HetACUMN; ../shared/docs/amortized-evidence.md):

- **simulated particles**: projections of the map at uniform random rotations, with the CTFs
  of the data set's own particles, shifts drawn like the subset's, and white noise at the
  data's own level (measured in the corners of the particle images); each frequency shell of
  the projections is scaled to the particles' signal power in it (:func:`shell_gain`). The noise follows a
  curriculum: it grows from 0.3x to 1x the data's over the first 40% of the budget, then is
  drawn between 0.8x and 1.3x (a range of SNRs around and below the data's);
- **real particles**: a quarter of each batch are the subset's particles at their search poses
  (the domain anchor);
- the loss is the cross-entropy against soft labels on the encoder's SO(3) grid (a Gaussian of
  the geodesic distance to the true rotation), so that neighbouring grid rotations share the
  gradient and an ambiguous image may keep several modes.

Then :func:`check_pose_encoder` poses held-out subset particles both ways (amortized and
global, :class:`cryoai.reconstruction.PoseAssigner`), compares each with the search's poses,
and calibrates a confidence threshold: the particles whose hypotheses hold less of the
encoder's probability get the global search, so that the combination agrees with the search
about as often as the global search alone. The run decides from the check's figures whether
the encoder pays (``cryoai.pipeline.decisions.encoder_pays``).
Everything is computed on the spectra: the simulated particles never exist as full images.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..models.encoder import PoseGridEncoder
from ..models.image_formation import ImageFormation
from ..physics.grids import radius_grid_2d, shell_index
from ..physics.projection import sample_volume, slice_coords
from ..physics.rotations import geodesic_distance, random_rotations
from ..physics.shifts import phase_shift
from ..reconstruction.amortized import AssignSettings, PoseAssigner, encoder_images

#: The white noise is measured in the image corners, beyond this fraction of the box from its centre.
BACKGROUND_RADIUS_FRAC = 0.45

#: The fewest images the encoder stage trains on (whatever the number of real particles).
MIN_IMAGES = 2000


@dataclass
class EncoderSettings:
    """How the encoder stage trains and checks the encoder.

    Attributes
    ----------
    minutes : training budget (wall clock).
    presentations_per_particle : the budget is also at most this many images per real
        particle (at least :data:`MIN_IMAGES`), so that a small data set trains briefly.
    batch : images per step.
    real_fraction : share of each batch taken from the real particles with their poses.
    label_sigma_deg : width of the soft labels (geodesic Gaussian), degrees.
    lr : AdamW learning rate.
    held_out : real particles kept out of training for the check (at most).
    agreement_deg : a pose agrees with the search's within this angle, degrees.
    margin : the encoder is used if its agreement is at least the global search's less this.
    seed : seeds the draws of the stage.
    """

    minutes: float = 2.0
    presentations_per_particle: int = 200
    batch: int = 64
    real_fraction: float = 0.25
    label_sigma_deg: float = 10.0
    lr: float = 3e-4
    held_out: int = 500
    agreement_deg: float = 10.0
    margin: float = 0.02
    seed: int = 0


@dataclass
class EncoderCheck:
    """The encoder against the search on held-out particles (see :func:`check_pose_encoder`).

    Attributes
    ----------
    particles : how many were checked.
    top1_median_deg : median angle between the encoder's most probable rotation and the pose.
    hypothesis_hit_rate : fraction whose K hypotheses hold one within ``agreement_deg`` of it.
    amortized_agreement, global_agreement : fraction posed within ``agreement_deg`` of it
        after each first guess (the encoder's for all, the global search's for all) and the
        refinement.
    amortized_median_deg, global_median_deg : median angles to it, each way.
    min_confidence : the calibrated threshold: particles whose hypotheses hold less of the
        encoder's probability get the global first guess.
    amortized_fraction : the share of particles above it.
    combined_agreement : the agreement with that threshold.
    amortized_images_per_s, global_images_per_s, combined_images_per_s : speed of each way
        (each first guess's measured time plus the refinement's).
    """

    particles: int
    top1_median_deg: float
    hypothesis_hit_rate: float
    amortized_agreement: float
    global_agreement: float
    amortized_median_deg: float
    global_median_deg: float
    min_confidence: float
    amortized_fraction: float
    combined_agreement: float
    amortized_images_per_s: float
    global_images_per_s: float
    combined_images_per_s: float

    def to_dict(self) -> dict:
        """The check as plain values."""
        return asdict(self)


def background_noise_variance(formation: ImageFormation, spectra: torch.Tensor) -> float:
    """Variance of the particles' white noise per Fourier coefficient (the 1/N scale: equal to
    the real-space variance per pixel), from the pixels outside the particle: the corners of
    the images beyond :data:`BACKGROUND_RADIUS_FRAC` of the box, which hold noise only (noise-free
    images give about zero there, where residuals against a map would give the map's error).

    Parameters
    ----------
    formation : the coefficient layout.
    spectra : (B, M) complex, the particles' coefficients.
    """
    n = formation.box_px
    images = formation.low_pass_images(spectra, n)  # the layout's band: (B, N, N)
    r = radius_grid_2d(n, device=spectra.device)
    background = images[:, r > BACKGROUND_RADIUS_FRAC * n]
    kept = float(formation.hermitian_weight.sum()) / n**2  # share of white noise's power in the band
    return float(background.var(dim=-1).mean()) / kept


def shell_gain(formation: ImageFormation, fourier_volume: torch.Tensor, spectra: torch.Tensor,
               ctf: torch.Tensor, rotations: torch.Tensor, shifts_px: torch.Tensor, keep: torch.Tensor,
               noise_variance: float, max_gain: float = 10.0) -> torch.Tensor:
    """Per-coefficient gain (K,) on ``keep`` that gives the map's projections the particles'
    signal power in each frequency shell: ``sqrt((P_data - sigma^2) / P_model)``, in [0, max_gain].

    A map from a search is regularised and blurred by its poses' errors, so its projections are
    weaker at middle and high frequencies than the particles' signal: an encoder trained on them
    as they are would see particles unlike any it learned from.
    """
    coords, freqs = formation.coords_px[keep], formation.freqs_px[keep]
    shell = shell_index(formation.radius_px[keep])
    n_shell = int(shell.max()) + 1
    p_data = torch.zeros(n_shell, dtype=torch.float64, device=spectra.device)
    p_model = torch.zeros_like(p_data)
    for start in range(0, len(spectra), 512):
        rows = slice(start, start + 512)
        model = sample_volume(fourier_volume, slice_coords(rotations[rows], coords))
        model = model * phase_shift(freqs, shifts_px[rows]) * ctf[rows][:, keep]
        p_data.index_add_(0, shell, spectra[rows][:, keep].abs().square().sum(0).double())
        p_model.index_add_(0, shell, model.abs().square().sum(0).double())
    gain = ((p_data - noise_variance * len(spectra) * torch.bincount(shell, minlength=n_shell)).clamp_min(0)
            / p_model.clamp_min(1e-30)).sqrt().clamp(0, max_gain)
    return gain[shell].float()


def soft_labels(rotations: torch.Tensor, grid: torch.Tensor, sigma_rad: float) -> torch.Tensor:
    """Targets (B, G): a Gaussian of the geodesic distance from each rotation (B, 3, 3) to each
    grid rotation (G, 3, 3), normalised over the grid.
    """
    cos = ((rotations.reshape(-1, 9) @ grid.reshape(-1, 9).T) - 1) / 2  # (trace - 1) / 2
    angle = torch.arccos(cos.clamp(-1.0, 1.0))
    logits = -angle.square() / (2 * sigma_rad**2)
    return torch.softmax(logits, dim=-1)


def train_pose_encoder(encoder: PoseGridEncoder, formation: ImageFormation, fourier_volume: torch.Tensor,
                       spectra: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
                       shifts_px: torch.Tensor, settings: EncoderSettings, *,
                       log: Callable[[str], None] = print,
                       progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Train ``encoder`` in place on simulated and real particles (see the module docstring).

    Parameters
    ----------
    encoder : the encoder to train (its grid is the label space).
    formation : the coefficient layout.
    fourier_volume : (N, N, N) complex map (1/N scale) whose projections are simulated.
    spectra, ctf : (n, M) the real particles' coefficients and CTFs.
    rotations : (n, 3, 3), shifts_px : (n, 2) their poses in the map's frame.
    settings : the budget and the mix.
    log : progress lines.

    Returns
    -------
    dict with ``steps``, ``images``, ``seconds``, ``noise_sigma`` and ``loss`` (the last steps').
    """
    device = spectra.device
    gen = torch.Generator().manual_seed(settings.seed + 777)
    rng = np.random.default_rng(settings.seed + 777)
    half = encoder.input_px // 2
    keep = (formation.coords_px.abs() < half).all(-1)  # the coefficients the encoder sees
    coords, freqs = formation.coords_px[keep], formation.freqs_px[keep]
    n = len(spectra)
    m = min(n, 2000)
    sigma2 = background_noise_variance(formation, spectra[:m])
    sigma = math.sqrt(sigma2)
    gain = shell_gain(formation, fourier_volume, spectra[:m], ctf[:m], rotations[:m], shifts_px[:m], keep,
                      sigma2)
    # Shifts drawn like the particles' (about their mean: the map need not be centred yet).
    shift_mean_px = shifts_px.mean(0).cpu()
    shift_sd_px = shifts_px.std(0).cpu() if n > 1 else torch.ones(2)
    grid = encoder.grid
    label_sigma = math.radians(settings.label_sigma_deg)
    optimiser = torch.optim.AdamW(encoder.parameters(), lr=settings.lr, weight_decay=1e-4)
    n_real = int(round(settings.batch * settings.real_fraction)) if n else 0
    n_sim = settings.batch - n_real
    budget = settings.minutes * 60
    max_steps = max(MIN_IMAGES, settings.presentations_per_particle * n) // settings.batch
    encoder.train()
    t0 = time.perf_counter()
    steps, losses, last_log = 0, [], t0
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget or steps >= max_steps:
            break
        done_share = max(elapsed / budget, steps / max_steps)
        noise_x = 0.3 + 0.7 * done_share / 0.4 if done_share < 0.4 else float(rng.uniform(0.8, 1.3))
        # Simulated particles: the map at random poses, with real CTFs, times the noise level.
        rot = random_rotations(n_sim, generator=gen, device=device)
        shifts = (shift_mean_px + torch.randn(n_sim, 2, generator=gen) * shift_sd_px).to(device)
        c_sim = ctf[torch.from_numpy(rng.integers(0, n, n_sim)).to(device)][:, keep]
        clean = sample_volume(fourier_volume, slice_coords(rot, coords)) * phase_shift(freqs, shifts) * c_sim
        clean = clean * gain
        noise = torch.randn((2, *clean.shape), generator=gen).to(device) * (sigma * noise_x / math.sqrt(2))
        y_sim = clean + torch.complex(noise[0], noise[1])
        ys, cs, rs = [y_sim], [c_sim], [rot]
        if n_real:
            pick = torch.from_numpy(rng.choice(n, n_real, replace=n_real > n)).to(device)
            ys.append(spectra[pick][:, keep])
            cs.append(ctf[pick][:, keep])
            rs.append(rotations[pick])
        y = torch.zeros(settings.batch, formation.coords_px.shape[0], dtype=y_sim.dtype, device=device)
        c = torch.ones(settings.batch, formation.coords_px.shape[0], device=device)
        y[:, keep] = torch.cat(ys)
        c[:, keep] = torch.cat(cs)
        images = encoder_images(formation, y, c, encoder)
        target = soft_labels(torch.cat(rs), grid, label_sigma)
        loss = -(target * torch.log_softmax(encoder(images).float(), dim=-1)).sum(-1).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 5.0)
        optimiser.step()
        steps += 1
        losses.append(float(loss.detach()))
        if progress is not None:  # (seconds of the budget)
            progress("encoder", min(int(time.perf_counter() - t0), int(budget)), int(budget))
        if time.perf_counter() - last_log > 30:
            last_log = time.perf_counter()
            log(f"encoder: step {steps}, {steps * settings.batch} images, loss {np.mean(losses[-50:]):.3f}, "
                f"noise x{noise_x:.2f}, {last_log - t0:.0f}/{budget:.0f} s")
    encoder.eval()
    seconds = time.perf_counter() - t0
    return {"steps": steps, "images": steps * settings.batch, "seconds": seconds, "noise_sigma": sigma,
            "loss": float(np.mean(losses[-50:])) if losses else float("nan")}


@torch.no_grad()
def check_pose_encoder(encoder: PoseGridEncoder, formation: ImageFormation, fourier_volume: torch.Tensor,
                       spectra: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
                       assign: AssignSettings, settings: EncoderSettings) -> EncoderCheck:
    """Pose held-out particles (their search poses known) amortized and globally, and compare.

    Parameters
    ----------
    encoder : the trained encoder.
    formation, fourier_volume : the layout and the map the particles are posed against.
    spectra, ctf : (n, M) the held-out particles; rotations : (n, 3, 3) their search poses.
    assign : the assignment's settings (hypotheses, grids, refinement).
    settings : the agreement angle and the margin.
    """
    tol = math.radians(settings.agreement_deg)
    images = encoder_images(formation, spectra, ctf, encoder)
    idx, prob = encoder.hypotheses(images, assign.hypotheses)
    confidence = prob.sum(dim=-1)
    hyp = encoder.grid[idx]  # (n, K, 3, 3)
    dist = geodesic_distance(hyp, rotations[:, None].expand_as(hyp))  # (n, K)
    agree, median, first, refine = {}, {}, {}, []
    for name, enc in (("amortized", encoder), ("global", None)):
        assigner = PoseAssigner(formation, fourier_volume, assign, enc)
        t0 = time.perf_counter()
        rot, shifts = assigner.first_guess(spectra, ctf)
        t1 = time.perf_counter()
        rot, _ = assigner.refine(spectra, ctf, rot, shifts)
        first[name] = (t1 - t0) / len(spectra)  # s per particle
        refine.append((time.perf_counter() - t1) / len(spectra))
        angle = geodesic_distance(rot, rotations)
        agree[name] = angle <= tol
        median[name] = float(torch.rad2deg(angle).median())
    a_ok, g_ok = agree["amortized"].float(), agree["global"].float()
    target = float(g_ok.mean()) - settings.margin
    # The lowest threshold (most particles amortized) whose combination still agrees enough.
    best = (float("inf"), 0.0, float(g_ok.mean()))
    for t in torch.sort(confidence).values.tolist():
        use = confidence >= t
        combined = float(torch.where(use, a_ok, g_ok).mean())
        if combined >= target:
            best = (t, float(use.float().mean()), combined)
            break
    threshold, fraction, combined = best
    refine_s = sum(refine) / len(refine)
    global_s = first["global"] + refine_s
    amortized_s = first["amortized"] + refine_s
    combined_s = first["amortized"] + (1 - fraction) * first["global"] + refine_s
    return EncoderCheck(
        particles=len(spectra), top1_median_deg=float(torch.rad2deg(dist[:, 0]).median()),
        hypothesis_hit_rate=float((dist.min(dim=1).values <= tol).float().mean()),
        amortized_agreement=float(a_ok.mean()), global_agreement=float(g_ok.mean()),
        amortized_median_deg=median["amortized"], global_median_deg=median["global"],
        min_confidence=threshold, amortized_fraction=fraction, combined_agreement=combined,
        amortized_images_per_s=1 / amortized_s, global_images_per_s=1 / global_s,
        combined_images_per_s=1 / combined_s)


def first_guess_seconds(encoder: PoseGridEncoder, formation: ImageFormation, fourier_volume: torch.Tensor,
                        spectra: torch.Tensor, ctf: torch.Tensor,
                        assign: AssignSettings) -> tuple[float, float]:
    """Seconds per particle of the two first guesses on this machine, measured on ``spectra``
    (a probe of a few hundred particles): the global search of the SO(3) grid x the shift grid,
    and the encoder's hypotheses scored over the shift grid (``encoder`` need not be trained:
    its cost does not depend on its weights). The refinement after is the same for both.

    Returns
    -------
    (global, amortized) seconds per particle; each the faster of two timings (the first warms up).
    """
    out = []
    for enc in (None, encoder):
        assigner = PoseAssigner(formation, fourier_volume, assign, enc)
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            assigner.first_guess(spectra, ctf)
            best = min(best, (time.perf_counter() - t0) / len(spectra))
        out.append(best)
    return out[0], out[1]


__all__ = ["EncoderCheck", "EncoderSettings",
           "background_noise_variance", "check_pose_encoder", "first_guess_seconds", "shell_gain",
           "soft_labels", "train_pose_encoder"]
