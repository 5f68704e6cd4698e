"""Several structures in one simulated data set: discrete states with given shares (a mixture of
complexes), or the states of a motion (atomic models interpolated between two conformations).

Every particle draws its state from its own random stream (:func:`draw_states`), so the rest of
a simulation (poses, CTFs, noise) is the same with or without states; each image is the
projection of its state's map (:class:`StateProjector`). The truth (each particle's state) goes
to ``truth.csv``, each state's map to ``ground_truth_state_NNN.mrc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..physics.fft import crop_center_2d, fft3_c, ifft2_c, pad_volume
from ..physics.projection import extract_central_slices


def normalised_shares(shares: Sequence[float] | None, n_states: int) -> np.ndarray:
    """The states' shares (K,) summing to 1 (equal where None).

    Raises
    ------
    InputError
        Shares that are not one per state, negative or all zero.
    """
    if shares is None:
        return np.full(n_states, 1.0 / n_states)
    values = np.asarray(shares, dtype=np.float64)
    if len(values) != n_states or not np.all(np.isfinite(values)) or (values < 0).any() or values.sum() <= 0:
        raise InputError(f"--shares {','.join(f'{v:g}' for v in values)}: expected {n_states} shares >= 0 "
                         "(one per map or state), not all 0")
    return values / values.sum()


def draw_states(generator: torch.Generator, count: int, shares: np.ndarray) -> np.ndarray:
    """(count,) int64 states, each drawn with probability ``shares[k]``."""
    u = torch.rand(count, generator=generator, dtype=torch.float64).numpy()
    return np.searchsorted(np.cumsum(shares), u, side="right").clip(max=len(shares) - 1).astype(np.int64)


class StateProjector:
    """Projections of K maps (the same box), each image of its own state's map.

    Parameters
    ----------
    volumes : K (N, N, N) real maps.
    oversample : zero-padding factor of the projector.
    device : torch device.
    """

    def __init__(self, volumes: Sequence[np.ndarray], oversample: int, device):
        self.n = volumes[0].shape[-1]
        self.device = device
        self.fvols = [fft3_c(pad_volume(torch.as_tensor(v, dtype=torch.float32, device=device),
                                        self.n * oversample)) for v in volumes]

    def __len__(self) -> int:
        return len(self.fvols)

    def project(self, rotations: np.ndarray, states: np.ndarray | None = None) -> torch.Tensor:
        """Real-space projections (B, N, N) at ``rotations`` (B, 3, 3) of the maps ``states``
        (B,) (None: the first map).
        """
        rot = torch.as_tensor(rotations, dtype=torch.float32, device=self.device)
        if states is None or len(self.fvols) == 1:
            return crop_center_2d(ifft2_c(extract_central_slices(self.fvols[0], rot)).real, self.n)
        out = torch.empty(len(rot), self.n, self.n, dtype=torch.float32, device=self.device)
        for k in np.unique(states):
            rows = torch.as_tensor(np.flatnonzero(states == k), device=self.device)
            out[rows] = crop_center_2d(ifft2_c(extract_central_slices(self.fvols[int(k)], rot[rows])).real,
                                       self.n)
        return out


def trajectory_models(first: str | Path, last: str | Path, n_states: int, *, pixel_size_a: float,
                      box_px: int, resolution_a: float | None = None) -> list[np.ndarray]:
    """The maps of ``n_states`` states of a motion: the atoms both models share (same chain,
    residue number and name, atom name) moved in a straight line from ``first`` to ``last``,
    each state's potential computed as :func:`cryoai.simulate.atomic.atomic_model_to_map`
    computes one, all placed in the box by the same translation (the centroid of the middle
    state at the centre), so that the motion, not a drift of the centre, is what changes.
    """
    from .atomic import model_potential, read_model

    if n_states < 2:
        raise InputError(f"--trajectory-states {n_states}: at least 2")
    a, b = read_model(first), read_model(last)

    def atoms(structure):
        out = {}
        for chain in structure[0]:
            for res in chain:
                for atom in res:
                    out.setdefault((chain.name, res.seqid.num, res.name, atom.name), atom)
        return out

    atoms_a, atoms_b = atoms(a), atoms(b)
    shared = [k for k in atoms_a if k in atoms_b]
    if len(shared) < 0.5 * max(len(atoms_a), len(atoms_b)):
        raise InputError(f"{last}: shares {len(shared)} atoms with {first} (of {len(atoms_a)} and "
                         f"{len(atoms_b)}): not two conformations of one molecule")
    pos_a = np.array([atoms_a[k].pos.tolist() for k in shared])
    pos_b = np.array([atoms_b[k].pos.tolist() for k in shared])
    keep = set(shared)
    for chain in a[0]:  # the first model holds only the shared atoms from here on
        for res in chain:
            for i in reversed(range(len(res))):
                if (chain.name, res.seqid.num, res.name, res[i].name) not in keep:
                    del res[i]
    centre = 0.5 * (pos_a + pos_b).mean(axis=0)
    maps = []
    for t in np.linspace(0.0, 1.0, n_states):
        positions = (1 - t) * pos_a + t * pos_b
        maps.append(model_potential(a, shared, positions, centre, pixel_size_a=pixel_size_a, box_px=box_px,
                                    resolution_a=resolution_a, source=str(first)))
    return maps


__all__ = ["StateProjector", "draw_states", "normalised_shares", "trajectory_models"]
