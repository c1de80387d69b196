"""Quest page bounds: never below the true far logit, exact with one key per page, extended incrementally."""
import math

import pytest
import torch

from dynheads.tracing.page_bounds import PageSummaries, far_pages, far_pull, summarise


def _qk(seed=0, heads=6, kv=2, keys=203, dim=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, heads, 1, dim, generator=g), torch.randn(1, kv, keys, dim, generator=g)


def _true_far(query, key, sink, recent, scale, visible_from=0):
    """Exact max far logit minus logsumexp of the near logits, per query head."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)[0]  # [H, S, D]
    logits = torch.einsum("hd,hsd->hs", query[0, :, -1], k) * scale
    n = key.shape[2]
    far = logits[:, max(sink, visible_from):n - recent]
    near = torch.cat([logits[:, visible_from:sink], logits[:, max(n - recent, visible_from):]], dim=1)
    return far.amax(-1) - torch.logsumexp(near, -1)


@pytest.mark.parametrize("page,sink,recent,visible_from", [(16, 4, 32, 0), (7, 16, 64, 0), (16, 4, 32, 50), (5, 0, 1, 0)])
def test_pull_bounds_the_true_far_logit(page, sink, recent, visible_from):
    for seed in range(5):
        query, key = _qk(seed)
        scale = 8 ** -0.5
        pull = far_pull(query, key, summarise(key, page), sink, recent, scale, visible_from)[0]
        assert (pull >= _true_far(query, key, sink, recent, scale, visible_from) - 1e-5).all()


def test_one_key_per_page_is_exact():
    query, key = _qk(3)
    pull = far_pull(query, key, summarise(key, 1), 4, 32, 0.5)[0]
    torch.testing.assert_close(pull, _true_far(query, key, 4, 32, 0.5), rtol=1e-5, atol=1e-5)


def test_no_far_key_gives_minus_infinity():
    query, key = _qk(1, keys=30)
    assert far_pages(30, 16, 4, 26) == slice(0, 0)
    assert torch.isinf(far_pull(query, key, summarise(key, 16), 4, 26, 1.0)).all()


def test_a_far_key_aligned_with_the_query_pulls_its_head_only():
    query, key = _qk(2, heads=4, kv=4, keys=300)
    key[0, 1, 150] = 20 * query[0, 1, 0] / query[0, 1, 0].norm()  # KV head 1 holds a far "needle" for query head 1
    pull = far_pull(query, key, summarise(key, 16), 4, 32, 8 ** -0.5)[0]
    assert pull[1] > 0 and pull.argmax() == 1
    assert math.isclose(float(pull[1]), float(_true_far(query, key, 4, 32, 8 ** -0.5)[1]), abs_tol=3.0)


def test_summaries_grow_and_crop_like_a_fresh_summary():
    _, key = _qk(4, keys=100)
    pages = PageSummaries(page=16)
    for n in list(range(1, 60)) + [40, 41, 17, 100]:  # grow one key at a time, then crop (a fork) and regrow
        got = pages.update(0, key[:, :, :n])
        want = summarise(key[:, :, :n], 16)
        assert got.n_keys == n
        torch.testing.assert_close(got.mins, want.mins, rtol=0, atol=0)
        torch.testing.assert_close(got.maxs, want.maxs, rtol=0, atol=0)


@pytest.mark.parametrize("page,sink,recent,visible_from", [(16, 4, 32, 0), (7, 16, 64, 0), (16, 4, 32, 50)])
def test_refined_pull_reads_the_best_pages_keys_exactly(page, sink, recent, visible_from):
    """refine = every far page: the exact far maximum; fewer pages: never above it, and above the one-page value."""
    for seed in range(3):
        query, key = _qk(seed)
        scale, pages = 8 ** -0.5, summarise(key, page)
        true = _true_far(query, key, sink, recent, scale, visible_from)
        every = far_pull(query, key, pages, sink, recent, scale, visible_from, refine=10_000)[0]
        torch.testing.assert_close(every, true, rtol=1e-5, atol=1e-5)
        two = far_pull(query, key, pages, sink, recent, scale, visible_from, refine=2)[0]
        one = far_pull(query, key, pages, sink, recent, scale, visible_from, refine=1)[0]
        assert (two <= true + 1e-5).all() and (two >= one - 1e-6).all()
