"""The particles as the search and the reconstruction see them: spectra and CTFs on a device."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..data.dataset import ParticleDataset
from ..models.image_formation import ImageFormation


class ParticleSpectra:
    """Kept image coefficients and CTFs of a data set's particles, read in batches.

    Parameters
    ----------
    dataset : the particles (images scaled and sign-corrected).
    formation : the coefficient layout, CTF and 1/N scale.
    device : where the spectra are made.
    batch_size : images read and transformed at a time.
    """

    def __init__(self, dataset: ParticleDataset, formation: ImageFormation, device: torch.device,
                 batch_size: int = 256):
        self.dataset = dataset
        self.formation = formation
        self.device = device
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.dataset)

    @torch.no_grad()
    def batches(self, indices: np.ndarray) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """``(indices, spectra (B, M) complex, ctf (B, M))`` for consecutive blocks of ``indices``."""
        for start in range(0, len(indices), self.batch_size):
            idx = indices[start:start + self.batch_size]
            batch = self.dataset.read(idx).to(self.device)
            yield idx, self.formation.spectra(batch.images), self.formation.ctf(batch)

    def read(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Spectra (len(indices), M) complex and CTFs (len(indices), M) of ``indices``."""
        ys, cs = [], []
        for _, y, c in self.batches(indices):
            ys.append(y)
            cs.append(c)
        return torch.cat(ys), torch.cat(cs)


class SpectraInMemory:
    """Spectra and CTFs already on a device, read as :class:`ParticleSpectra` reads its
    particles' (e.g. class averages standing as particles for the search).

    Parameters
    ----------
    spectra, ctf : (B, M) complex coefficients and real CTFs in ``formation``'s layout.
    formation : the coefficient layout.
    """

    def __init__(self, spectra: torch.Tensor, ctf: torch.Tensor, formation: ImageFormation):
        self.spectra, self.ctf, self.formation = spectra, ctf, formation
        self.device = spectra.device

    def __len__(self) -> int:
        return len(self.spectra)

    def read(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Spectra and CTFs of ``indices``."""
        idx = torch.as_tensor(np.asarray(indices), device=self.device)
        return self.spectra[idx], self.ctf[idx]

    def batches(self, indices: np.ndarray, batch_size: int = 1024
                ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """``(indices, spectra, ctf)`` for consecutive blocks of ``indices``, as
        :meth:`ParticleSpectra.batches` gives them.
        """
        indices = np.asarray(indices)
        for start in range(0, len(indices), batch_size):
            idx = indices[start:start + batch_size]
            yield (idx, *self.read(idx))
