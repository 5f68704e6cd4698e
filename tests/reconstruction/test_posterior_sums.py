"""The M step's sums: sparse where an image's posterior is concentrated, equal to the dense sums."""

import torch

import cryoai.reconstruction.em as em


def _problem(b=6, n_s=5, m=600, p=40, peaked=(0, 2, 3)):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(b, n_s * m, generator=gen)
    for i in peaked:  # a few rotations hold all but 1e-5 of the mass
        logits[i] -= 40.0
        logits[i, torch.randint(n_s * m, (7,), generator=gen)] += 40.0
    post = torch.softmax(logits, dim=-1).view(b, n_s, m)
    x = torch.randn(b, n_s, p, dtype=torch.complex64, generator=gen)
    c2 = torch.rand(b, p, generator=gen)
    return post, x, c2


def _dense(post, x, c2):
    b, n_s, m = post.shape
    num = torch.einsum("bsr,bsp->rp", post.to(torch.complex64), x)
    return num.real, num.imag, torch.einsum("bsr,bp->rp", post, c2)


def test_sparse_sums_match_dense_and_take_only_concentrated_images(monkeypatch):
    monkeypatch.setattr(em, "SPARSE_ROTATIONS", 16)
    post, x, c2 = _problem()
    m, p = post.shape[2], x.shape[2]
    sums = [torch.zeros(m, p) for _ in range(3)]
    n_sparse = em.add_posterior_sums_(post, x, c2, *sums, workspace=em.Workspace())
    assert n_sparse == 3  # the three peaked images; the diffuse ones are summed densely
    for got, want in zip(sums, _dense(post, x, c2), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Every image diffuse (the mass bar above 1): the dense path alone, the same sums.
    monkeypatch.setattr(em, "SIGNIFICANT_MASS", 2.0)
    dense = [torch.zeros(m, p) for _ in range(3)]
    assert em.add_posterior_sums_(post, x, c2, *dense) == 0
    for got, want in zip(dense, _dense(post, x, c2), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_posterior_and_max_is_the_softmax_and_its_maximum():
    errors = torch.rand(5, 3000, generator=torch.Generator().manual_seed(1)) * 200
    want = torch.softmax(-errors * 0.3, dim=-1)
    post, top = em.posterior_and_max_(errors.clone(), 0.3)
    torch.testing.assert_close(post, want, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(top, want.max(dim=-1).values)
    minimum = errors.min(dim=-1).values
    post2, _ = em.posterior_and_max_(errors.clone(), 0.3, minimum)
    torch.testing.assert_close(post2, post)
