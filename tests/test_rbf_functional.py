"""The RBF maths against direct float64 computations of Eq. 3/4 (loops, numpy)."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

import knnsolver.functional as F
from knnsolver.hostsync import accelerator_paths
from knnsolver.functional.rbf import rbf_auto_sigma, rbf_nearest_class_centres, rbf_log_probs, rbf_loss, rbf_terms


def reference_log_probs(x, centres, centre_labels, neighbours, log_weights, sigma, num_classes):
    """Eq. 4 by loops in float64: sum of w_i f(x, c_i) per class over the non-padding neighbours."""
    x, centres, log_weights = (np.asarray(a, dtype=np.float64) for a in (x, centres, log_weights))
    out = np.full((len(x), num_classes), -np.inf)
    for b in range(len(x)):
        per_class = np.zeros(num_classes)
        for j in neighbours[b]:
            if j < 0:
                continue
            dist2 = float(((x[b] - centres[j]) ** 2).sum())
            per_class[centre_labels[j]] += math.exp(log_weights[j] - dist2 / (2 * sigma**2))
        with np.errstate(divide="ignore"):
            out[b] = np.log(per_class / per_class.sum())
    return out


def reference_loss(x, labels, centres, centre_labels, neighbours, log_weights, sigma, exclude):
    """Eq. 3 with the documented hard-case rule, by loops: add the nearest true-class centre when none is a neighbour."""
    losses = []
    for b in range(len(x)):
        nb = [int(j) for j in neighbours[b] if j >= 0]
        if not any(centre_labels[j] == labels[b] for j in nb):
            candidates = [i for i in range(len(centres)) if centre_labels[i] == labels[b] and i != exclude[b]]
            if not candidates:
                continue  # unscorable: no other centre of its class
            nb.append(min(candidates, key=lambda i: ((x[b] - centres[i]) ** 2).sum()))
        lp = reference_log_probs(x[b : b + 1], centres, centre_labels, [nb], log_weights, sigma, int(centre_labels.max()) + 1)
        losses.append(-lp[0, labels[b]])
    return float(np.mean(losses)) if losses else 0.0


def random_problem(seed=0, b=6, n=40, d=5, c=4, k=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n, d, generator=g, dtype=dtype)
    centre_labels = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(b, d, generator=g, dtype=dtype)
    neighbours = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)]).to(torch.int32)
    log_weights = 0.3 * torch.randn(n, generator=g, dtype=dtype)
    return x, centres, centre_labels, neighbours, log_weights


def test_exported_from_functional_package():
    assert F.rbf_log_probs is rbf_log_probs and F.rbf_loss is rbf_loss
    assert {"rbf_log_probs", "rbf_loss", "rbf_terms", "rbf_auto_sigma"} <= set(F.rbf.__all__)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_probs_match_direct_eq4(dtype):
    x, centres, cl, nb, lw = random_problem(dtype=dtype)
    nb[0, -2:] = -1  # padding slots are ignored
    sigma = 1.3
    got = rbf_log_probs(x, centres, cl, nb, lw, sigma, 5).double().numpy()
    want = reference_log_probs(x.double().numpy(), centres.double().numpy(), cl.numpy(), nb.numpy(), lw.double().numpy(), sigma, 5)
    assert np.array_equal(np.isinf(got), np.isinf(want))  # class 4 has no centre; others may be absent by chance
    assert np.isneginf(got[:, 4]).all()
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=1e-5)
    np.testing.assert_allclose(np.exp(got).sum(1), 1.0, rtol=1e-5)


def test_log_probs_in_log_space_survive_tiny_sigma():
    x, centres, cl, nb, lw = random_problem(seed=1)
    got = rbf_log_probs(x, centres, cl, nb, lw, 1e-4, 4)
    assert not torch.isnan(got).any()
    assert torch.allclose(torch.logsumexp(got, 1), torch.zeros(len(x), dtype=got.dtype))
    # sigma -> 0: the nearest neighbour's class takes all the probability.
    d2 = ((x[:, None] - centres[nb.long()]) ** 2).sum(-1)
    nearest_class = cl[nb.long()].gather(1, d2.argmin(1, keepdim=True)).squeeze(1)
    assert torch.equal(got.argmax(1), nearest_class)


def test_loss_matches_reference_with_hard_case_and_self_exclusion():
    x, centres, cl, nb, lw = random_problem(seed=2, b=8, k=5)
    labels = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(3))
    exclude = torch.arange(8)  # rows 0..7 are the samples' own centres
    cl[:8] = labels
    centres[:8] = x  # each sample's own centre is where it is: the nearest of its class, unless excluded
    nb[nb < 8] = 20  # no sample lists a low row; the hard-case search must still skip its own
    nb[1] = torch.tensor([i for i in range(40) if cl[i] != labels[1]][:5], dtype=torch.int32)  # true class absent
    nb[2] = torch.tensor([i for i in range(40) if cl[i] != labels[2]][:5], dtype=torch.int32)
    sigma = 0.9
    got = rbf_loss(x, centres, cl, nb, lw, sigma, labels, exclude=exclude)
    want = reference_loss(x.numpy(), labels.numpy(), centres.numpy(), cl.numpy(), nb.numpy(), lw.numpy(), sigma, exclude.numpy())
    assert got.item() == pytest.approx(want, rel=1e-10)
    terms = rbf_terms(x, centres, cl, nb, lw, sigma, labels, exclude=exclude)
    assert terms.true_absent[1] and terms.true_absent[2] and terms.sq_distances.shape == (8, 5)
    no_exclusion = rbf_loss(x, centres, cl, nb, lw, sigma, labels)
    assert no_exclusion < got  # the own centre (distance 0) would otherwise be added


def test_nearest_class_centres_against_brute_force():
    g = torch.Generator().manual_seed(4)
    centres, cl = torch.randn(50, 3, generator=g), torch.randint(0, 5, (50,), generator=g)
    q, ql = centres[:10] + 0.01, cl[:10].clone()
    ql[0] = 7  # a class with no centre
    got = rbf_nearest_class_centres(q, ql, centres, cl, exclude=torch.arange(10))
    for b in range(10):
        cands = [i for i in range(50) if cl[i] == ql[b] and i != b]
        want = min(cands, key=lambda i: float(((q[b] - centres[i]) ** 2).sum())) if cands else -1
        assert int(got[b]) == want


def test_gradcheck_log_probs_wrt_embeddings_log_weights_and_sigma():
    x, centres, cl, nb, lw = random_problem(seed=5, b=3, n=12, c=3, k=12)  # every centre listed: all classes present
    nb[0, 0] = -1
    x.requires_grad_(True)
    lw.requires_grad_(True)
    sigma = torch.tensor(1.1, dtype=torch.float64, requires_grad=True)
    assert torch.isfinite(rbf_log_probs(x, centres, cl, nb, lw, sigma, 3)).all()
    assert torch.autograd.gradcheck(lambda a, w, s: rbf_log_probs(a, centres, cl, nb, w, s, 3), (x, lw, sigma))


def test_gradcheck_loss_including_hard_rows():
    x, centres, cl, nb, lw = random_problem(seed=6, b=4, n=30, c=3, k=4)
    labels = torch.tensor([0, 1, 2, 0])
    nb[0] = torch.tensor([i for i in range(30) if cl[i] != 0][:4], dtype=torch.int32)  # hard row
    x.requires_grad_(True)
    lw.requires_grad_(True)
    sigma = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    assert rbf_terms(x, centres, cl, nb, lw, sigma, labels).true_absent[0]
    assert torch.autograd.gradcheck(lambda a, w, s: rbf_loss(a, centres, cl, nb, w, s, labels), (x, lw, sigma))


def test_no_gradient_reaches_centres():
    x, centres, cl, nb, lw = random_problem(seed=7)
    centres.requires_grad_(True)
    x.requires_grad_(True)
    rbf_loss(x, centres, cl, nb, lw, 1.0, torch.zeros(len(x), dtype=torch.long)).backward()
    rbf_log_probs(x, centres, cl, nb, lw, 1.0, 4)[:, 0].sum().backward()
    assert centres.grad is None and x.grad is not None


def hard_case(scale=1.0, sigma=1.0):
    """A sample whose neighbours are all of the wrong class; the true class lies farther away."""
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [4.0, 4.0], [5.0, 5.0]]) * scale
    cl = torch.tensor([1, 1, 1, 0, 0])
    x = torch.zeros(1, 2, requires_grad=True)
    lw = torch.zeros(5, requires_grad=True)
    nb = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    return x, centres, cl, nb, lw, torch.tensor([0]), sigma


@pytest.mark.parametrize("scale,sigma", [(1.0, 1.0), (1.0, 1e-4), (1e4, 1.0), (1e3, 1e-3)])
def test_hard_cases_finite_with_useful_gradient(scale, sigma):
    x, centres, cl, nb, lw, labels, sigma = hard_case(scale, sigma)
    loss = rbf_loss(x, centres, cl, nb, lw, sigma, labels)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(x.grad).all() and x.grad.norm() > 0
    assert torch.isfinite(lw.grad).all() and lw.grad[3] < 0  # raise the weight of the added true-class centre
    # The step direction points towards the nearest true-class centre (4, 4): loss falls along -grad.
    assert (-x.grad[0] @ centres[3]) > 0


def test_hard_case_rule_is_the_augmented_neighbourhood():
    x, centres, cl, nb, lw, labels, sigma = hard_case()
    augmented = torch.tensor([[0, 1, 2, 3]], dtype=torch.int32)
    expected = -rbf_log_probs(x, centres, cl, augmented, lw, sigma, 2)[0, 0]
    assert rbf_loss(x, centres, cl, nb, lw, sigma, labels).item() == pytest.approx(expected.item())


def test_unscorable_rows_are_left_out_of_the_mean():
    x, centres, cl, nb, lw, _, sigma = hard_case()
    only = torch.tensor([3])  # the one centre of class 0 is the sample itself
    cl2 = cl.clone()
    cl2[4] = 1
    terms = rbf_terms(x, centres, cl2, nb, lw, sigma, torch.tensor([0]), exclude=only)
    assert terms.nll[0] == float("inf")
    loss = rbf_loss(x, centres, cl2, nb, lw, sigma, torch.tensor([0]), exclude=only)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    both = torch.cat([x.detach(), x.detach()]).requires_grad_(True)
    mixed = rbf_loss(both, centres, cl2, nb.repeat(2, 1), lw, sigma, torch.tensor([0, 1]), exclude=torch.tensor([3, 3]))
    scorable = rbf_loss(both[1:], centres, cl2, nb, lw, sigma, torch.tensor([1]))
    assert mixed.item() == pytest.approx(scorable.item())


def test_float16_centres():
    x, centres, cl, nb, lw = random_problem(seed=8, dtype=torch.float32)
    half = centres.half()
    got = rbf_log_probs(x, half, cl, nb, lw, 1.0, 4)
    want = rbf_log_probs(x, half.float(), cl, nb, lw, 1.0, 4)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_auto_sigma_is_median_distance_to_nearest_other_centre():
    g = torch.Generator().manual_seed(9)
    points = torch.randn(31, 4, generator=g)
    d = torch.cdist(points.double(), points.double())
    d.fill_diagonal_(float("inf"))
    nearest = np.sort(d.min(1).values.numpy())
    assert rbf_auto_sigma(points) == pytest.approx(float(nearest[15]), rel=1e-5)
    sub = [0, 10, 20, 30]  # max_points=4: evenly spaced rows
    assert rbf_auto_sigma(points, max_points=4) == pytest.approx(float(np.sort(d.min(1).values.numpy()[sub])[1]), rel=1e-5)
    twins = torch.cat([points, points[:6]])  # a duplicate is its twin's nearest other centre: distance 0
    dt = torch.cdist(twins.double(), twins.double())
    dt.fill_diagonal_(float("inf"))
    assert rbf_auto_sigma(twins) == pytest.approx(float(np.sort(dt.min(1).values.numpy())[18]), rel=1e-5)
    assert rbf_auto_sigma(torch.ones(4, 2)) == 1.0
    assert rbf_auto_sigma(torch.ones(1, 2)) == 1.0  # a single centre has no spacing


def test_sync_free_hard_case_search_gives_the_same_centres():
    g = torch.Generator().manual_seed(4)
    centres, cl = torch.randn(50, 5, generator=g), torch.randint(0, 6, (50,), generator=g)
    queries, labels = torch.randn(12, 5, generator=g), torch.randint(0, 7, (12,), generator=g)  # class 6: no centre
    exclude = torch.randint(0, 50, (12,), generator=g)
    want = rbf_nearest_class_centres(queries, labels, centres, cl, exclude)
    got = rbf_nearest_class_centres(queries, labels, centres, cl, exclude, sync_free=True)
    assert torch.equal(got, want) and (want[labels == 6] == -1).all()


def test_sync_free_hard_case_search_in_blocks_keeps_the_first_of_tied_centres(monkeypatch):
    """The GPU path takes the bank in blocks of bounded memory (all of it at once held B x N distances)."""
    import knnsolver.functional.rbf as rbf

    g = torch.Generator().manual_seed(6)
    centres, cl = torch.randn(40, 3, generator=g), torch.randint(0, 4, (40,), generator=g)
    centres[33], cl[33] = centres[2], cl[2]  # a tie across blocks: row 2 wins
    centres[3], cl[3] = centres[2], cl[2]  # and within a block: row 2 wins
    queries, labels = torch.cat([centres[2:3] + 0.01, torch.randn(9, 3, generator=g)]), torch.cat([cl[2:3], cl[:9]])
    exclude = torch.randint(0, 40, (10,), generator=g)
    exclude[0] = 7 if cl[7] != cl[2] else 8
    want = rbf_nearest_class_centres(queries, labels, centres, cl, exclude)
    monkeypatch.setattr(rbf, "_BLOCK_ELEMENTS", 10 * 7)  # blocks of 7 centres: 6 blocks, the last short
    got = rbf_nearest_class_centres(queries, labels, centres, cl, exclude, sync_free=True)
    assert torch.equal(got, want) and got[0] == 2
    brute = torch.cdist(queries.double(), centres.double()).masked_fill(cl != labels[:, None], float("inf"))
    brute[torch.arange(10), exclude] = float("inf")
    assert torch.equal(got, brute.argmin(1))


def test_accelerator_path_of_the_loss_equals_the_cpu_path():
    """The sync-free hard-case rule (used on GPUs) gives the same loss and gradients, tested on the CPU."""
    g = torch.Generator().manual_seed(5)
    centres, cl = torch.randn(40, 4, generator=g), torch.arange(40) % 5
    neighbours = torch.randint(0, 40, (10, 6), generator=g)
    labels, lw = torch.randint(0, 5, (10,), generator=g), torch.zeros(40, requires_grad=True)
    x = torch.randn(10, 4, generator=g, requires_grad=True)
    results = []
    for paths in (contextlib.nullcontext, accelerator_paths):
        with paths():
            loss = rbf_loss(x, centres, cl, neighbours, lw, 0.7, labels, exclude=torch.arange(10))
        results.append((loss.detach(), *torch.autograd.grad(loss, (x, lw))))
    assert rbf_terms(x, centres, cl, neighbours, lw, 0.7, labels).true_absent.any()  # the hard case occurs
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_floored_logsumexp_matches_torch_and_keeps_infinities_and_nan():
    """The RBF log-sum-exps drop terms more than 80 below the row's largest (the CPU's exp is slow far below
    and such terms are under 2e-35 of the sum): values and gradients match torch.logsumexp."""
    from knnsolver.functional.rbf import _logsumexp

    x = torch.cat([-torch.rand(6, 9, dtype=torch.float64) * 300, torch.zeros(1, 9, dtype=torch.float64)])
    x[0, :4] = float("-inf")
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    _logsumexp(a, 1).sum().backward()
    torch.logsumexp(b, 1).sum().backward()
    torch.testing.assert_close(_logsumexp(x, 1), torch.logsumexp(x, 1))
    torch.testing.assert_close(a.grad, b.grad, atol=1e-30, rtol=1e-12)
    assert _logsumexp(torch.full((1, 3), float("-inf")), 1).item() == float("-inf")
    assert torch.isnan(_logsumexp(torch.tensor([[0.0, float("nan")]]), 1)).all()


def test_fused_nll_and_its_closed_form_gradient_equal_autograd_of_the_plain_formula():
    """The one-function RBF loss (closed-form backward) against torch.logsumexp differentiated by autograd,
    with a padding slot, a row with no true-class slot (nll +inf, left out with weight 0), and a learned sigma."""
    from knnsolver.functional.rbf import _RBFNegLogLikelihood

    x, centres, cl, nb, lw = random_problem(seed=11, b=5, n=30, c=3, k=6)
    index = nb.long()
    index[0, :2] = -1
    labels = torch.cat([cl[index[:4, 2]], torch.tensor([7])])  # class 7 has no centre: row 4 has no true slot
    valid = index >= 0
    index = index.clamp(min=0)
    is_true = (cl[index] == labels.unsqueeze(1)) & valid
    weights = torch.tensor([0.3, -1.2, 0.8, 2.0, 0.0], dtype=torch.float64)

    def plain(x, lw, sigma):
        a = lw[index] - ((x.unsqueeze(1) - centres[index]) ** 2).sum(-1) / (2 * sigma**2)
        nll = torch.logsumexp(a.masked_fill(~valid, float("-inf")), 1) - torch.logsumexp(a.masked_fill(~is_true, float("-inf")), 1)
        return nll[:4]

    def fused(x, lw, sigma):
        return _RBFNegLogLikelihood.apply(x, centres, index, valid, is_true, lw, sigma)[0]

    inputs = [x.clone().requires_grad_(True), lw.clone().requires_grad_(True), torch.tensor(0.7, dtype=torch.float64, requires_grad=True)]
    got = fused(*inputs)
    assert got[4] == float("inf") and torch.isfinite(got[:4]).all()
    want = plain(*inputs)
    torch.testing.assert_close(got[:4], want, rtol=1e-12, atol=1e-12)
    kept = torch.where(torch.isfinite(got), got, torch.zeros_like(got))  # as RBFTerms.loss leaves row 4 out
    grads = torch.autograd.grad((kept * weights).sum(), inputs)
    want_grads = torch.autograd.grad((want * weights[:4]).sum(), inputs)
    for g, w in zip(grads, want_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert (grads[0][4] == 0).all()  # the row left out gets no gradient
