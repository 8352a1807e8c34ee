"""Tests for lifealign_lite.memory.consolidate (SLMC on factored low-rank updates).

Every factored result is checked against a dense float64 reference built from
the same factors: torch.linalg.svd for spectra and truncations, flattened
vectors plus least squares for the projection onto the history span.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifealign_lite.memory.consolidate import (
    LowRank,
    add,
    add_adapters,
    compress,
    compress_adapter,
    consolidate,
    consolidate_adapter,
    denoise,
    inner,
    project,
    svd_factored,
)

# database=None: no .hypothesis folder; derandomize: the same examples every run.
SETTINGS = settings(max_examples=50, deadline=None, database=None, derandomize=True)
RTOL = 1e-4
# Same cut-off as the library's pseudo-inverse, expressed on singular values of
# the stacked history (the library thresholds Gram eigenvalues at 1e-10).
LSTSQ_RCOND = 1e-5


def random_lowrank(gen: torch.Generator, d_out: int, d_in: int, r: int, scale: float = 1.0) -> LowRank:
    return LowRank(
        torch.randn(d_out, r, generator=gen) * scale,
        torch.randn(r, d_in, generator=gen),
    )


def dense64(u: LowRank) -> torch.Tensor:
    # float64 product of the float32 factors: exact enough that a rank-r
    # factorisation shows exactly r non-negligible singular values.
    return u.B.double() @ u.A.double()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, scale: float) -> None:
    err = torch.linalg.norm(actual.double() - expected.double()).item()
    assert err <= RTOL * scale + 1e-8, f"error {err:.3e} vs scale {scale:.3e}"


def fro(x: torch.Tensor) -> float:
    return torch.linalg.norm(x.double()).item()


def dense_projection(u: torch.Tensor, hist: list[torch.Tensor]) -> torch.Tensor:
    """Orthogonal projection of u onto span(hist) with flattened vectors and lstsq."""
    if not hist:
        return torch.zeros_like(u)
    m = torch.stack([h.reshape(-1) for h in hist], dim=1)
    c = torch.linalg.lstsq(m, u.reshape(-1, 1), rcond=LSTSQ_RCOND, driver="gelsd").solution
    return (m @ c).reshape(u.shape)


@st.composite
def lowrank_case(draw: st.DrawFn, min_rank: int = 0, max_rank: int = 6) -> tuple[LowRank, torch.Generator]:
    d_out = draw(st.integers(1, 8))
    d_in = draw(st.integers(1, 8))
    r = draw(st.integers(min_rank, max_rank))
    scale = 10.0 ** draw(st.integers(-3, 3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return random_lowrank(gen, d_out, d_in, r, scale), gen


taus = st.floats(min_value=1e-3, max_value=1.0)
gammas = st.floats(min_value=0.0, max_value=1.0)


# --- dense equivalence -------------------------------------------------------


@SETTINGS
@given(lowrank_case())
def test_svd_factored_matches_dense(case: tuple[LowRank, torch.Generator]) -> None:
    u, _ = case
    uo, s, vh = svd_factored(u)
    k = min(u.rank, *u.shape)
    assert uo.shape == (u.shape[0], k) and s.shape == (k,) and vh.shape == (k, u.shape[1])
    assert uo.dtype == s.dtype == vh.dtype == torch.float32
    ref = dense64(u)
    s_ref = torch.linalg.svdvals(ref)
    scale = fro(ref)
    assert_close(s, s_ref[:k], scale)
    assert torch.all(s[:-1] >= s[1:])
    assert_close((uo * s) @ vh, ref, scale)
    # Orthonormality only where singular values are not round-off.
    live = s > 1e-6 * s.max() if k else s.bool()
    assert_close(uo[:, live].T @ uo[:, live], torch.eye(int(live.sum())), 1.0)
    assert_close(vh[live] @ vh[live].T, torch.eye(int(live.sum())), 1.0)


@SETTINGS
@given(lowrank_case(), st.integers(0, 6), st.integers(0, 2**31 - 1))
def test_inner_matches_dense(case: tuple[LowRank, torch.Generator], r2: int, seed: int) -> None:
    a, _ = case
    b = random_lowrank(torch.Generator().manual_seed(seed), *a.shape, r2)
    expected = (dense64(a) * dense64(b)).sum()
    assert inner(a, b).dtype == torch.float32
    assert abs(inner(a, b).item() - expected.item()) <= RTOL * fro(dense64(a)) * fro(dense64(b)) + 1e-8


@SETTINGS
@given(lowrank_case(), taus)
def test_denoise_matches_dense_truncation(case: tuple[LowRank, torch.Generator], tau: float) -> None:
    u, _ = case
    out, k = denoise(u, tau)
    assert out.rank == k
    ref_u, ref_s, ref_vh = torch.linalg.svd(dense64(u), full_matrices=False)
    expected = (ref_u[:, :k] * ref_s[:k]) @ ref_vh[:k]
    assert_close(out.dense(), expected, fro(dense64(u)))
    # Balanced factors: B^T B == A A^T == diag(S[:k]).
    assert_close(out.B.T @ out.B, out.A @ out.A.T, fro(dense64(u)))


@SETTINGS
@given(lowrank_case(), st.lists(lowrank_case(), max_size=3), gammas, st.booleans())
def test_project_matches_dense(
    case: tuple[LowRank, torch.Generator],
    hist_cases: list[tuple[LowRank, torch.Generator]],
    gamma_p: float,
    degenerate: bool,
) -> None:
    u, gen = case
    # Re-draw history with u's shape; optionally add a dependent and a zero entry.
    history = [random_lowrank(g, *u.shape, h.rank) for h, g in hist_cases]
    if degenerate and history:
        history += [add(history[0], history[-1]), LowRank(torch.zeros(u.shape[0], 2), torch.zeros(2, u.shape[1]))]
    out, stats = project(u, history, gamma_p)
    ref = dense64(u)
    ref_hist = dense_projection(ref, [dense64(h) for h in history])
    expected = ref - ref_hist + gamma_p * ref_hist
    scale = fro(ref)
    assert_close(out.dense(), expected, scale)
    assert len(stats["coeffs"]) == len(history)
    expected_fraction = fro(ref_hist) ** 2 / scale**2 if scale > 0 else 0.0
    assert abs(stats["hist_fraction"] - expected_fraction) <= RTOL
    # Not compressed: rank is u's rank plus the ranks of the terms kept.
    assert out.rank <= u.rank + sum(h.rank for h in history)


@SETTINGS
@given(lowrank_case(), st.integers(0, 8))
def test_compress_is_optimal_truncated_svd(case: tuple[LowRank, torch.Generator], max_rank: int) -> None:
    u, _ = case
    out = compress(u, max_rank)
    assert out.rank <= max_rank
    assert out.B.dtype == out.A.dtype == torch.float32
    ref = dense64(u)
    ref_u, ref_s, ref_vh = torch.linalg.svd(ref, full_matrices=False)
    m = out.rank
    scale = fro(ref)
    assert_close(out.dense(), (ref_u[:, :m] * ref_s[:m]) @ ref_vh[:m], scale)
    # Eckart-Young: the error is exactly the energy of the dropped values, and
    # only numerically zero values are dropped below max_rank.
    err = fro(ref - dense64(out))
    assert abs(err - ref_s[max_rank:].square().sum().sqrt().item()) <= RTOL * scale + 1e-8
    numerical_rank = int((ref_s > 1e-10 * ref_s[0]).sum()) if scale > 0 else 0
    assert m == min(max_rank, numerical_rank)


# --- properties --------------------------------------------------------------


@SETTINGS
@given(lowrank_case(), taus)
def test_denoise_keeps_tau_energy_with_minimal_rank(case: tuple[LowRank, torch.Generator], tau: float) -> None:
    u, _ = case
    out, k = denoise(u, tau)
    s = torch.linalg.svdvals(dense64(u))
    total = s.square().sum().item()
    if total == 0:
        assert k == 0 and out.rank == 0
        return
    energy = torch.cumsum(s.square(), 0) / total
    kept = fro(dense64(out)) ** 2 / total
    assert kept >= tau - 1e-6
    assert 1 <= k <= min(u.rank, *u.shape)
    assert k == 1 or energy[k - 2].item() < tau + 1e-6  # k-1 components fall short


@SETTINGS
@given(
    st.integers(1, 6),
    st.integers(1, 6),
    st.lists(st.tuples(st.integers(1, 3), st.floats(-3.0, 3.0)), min_size=1, max_size=3),
    gammas,
    st.integers(0, 2**31 - 1),
)
def test_update_in_history_span_is_scaled_by_gamma(
    d_out: int, d_in: int, terms: list[tuple[int, float]], gamma_p: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    history = [random_lowrank(gen, d_out, d_in, r) for r, _ in terms]
    u = add(*(LowRank(alpha * h.B, h.A) for h, (_, alpha) in zip(history, terms)))
    out, stats = project(u, history, gamma_p)
    scale = sum(abs(alpha) * fro(dense64(h)) for h, (_, alpha) in zip(history, terms))
    assert_close(out.dense(), gamma_p * dense64(u), scale)
    if fro(dense64(u)) > 1e-3 * scale:
        assert abs(stats["hist_fraction"] - 1.0) <= 1e-3


@SETTINGS
@given(lowrank_case(), st.lists(st.integers(0, 3), max_size=3), gammas, st.integers(0, 2**31 - 1))
def test_update_with_disjoint_row_space_is_unchanged(
    case: tuple[LowRank, torch.Generator], hist_ranks: list[int], gamma_p: float, seed: int
) -> None:
    u, _ = case
    d_out, d_in = u.shape
    gen = torch.Generator().manual_seed(seed)
    # History rows live in input coordinates [0, d_in), u's rows in [d_in, 2 d_in).
    u_wide = LowRank(u.B, torch.cat([torch.zeros_like(u.A), u.A], dim=1))
    history = [
        LowRank(h.B, torch.cat([h.A, torch.zeros_like(h.A)], dim=1))
        for h in (random_lowrank(gen, d_out, d_in, r) for r in hist_ranks)
    ]
    out, stats = project(u_wide, history, gamma_p)
    assert torch.equal(out.dense(), u_wide.dense())
    assert stats["hist_fraction"] == 0.0
    assert all(c == 0.0 for c in stats["coeffs"])


@SETTINGS
@given(lowrank_case(min_rank=1), st.lists(st.integers(1, 3), min_size=1, max_size=3), gammas)
def test_update_orthogonal_to_history_is_unchanged(
    case: tuple[LowRank, torch.Generator], hist_ranks: list[int], gamma_p: float
) -> None:
    u, gen = case
    history = [random_lowrank(gen, *u.shape, r) for r in hist_ranks]
    # Remove the history component densely, then re-factorise the remainder.
    rest = dense64(u) - dense_projection(dense64(u), [dense64(h) for h in history])
    ru, rs, rvh = torch.linalg.svd(rest, full_matrices=False)
    u_orth = LowRank((ru * rs).float(), rvh.float())
    out, stats = project(u_orth, history, gamma_p)
    scale = fro(dense64(u))
    assert_close(out.dense(), dense64(u_orth), scale)
    assert stats["hist_fraction"] <= 1e-6 or fro(rest) <= 1e-6 * scale


# --- pipeline and edge cases -------------------------------------------------


@SETTINGS
@given(lowrank_case(), st.lists(st.integers(0, 3), max_size=3), taus, gammas, st.none() | st.integers(0, 6))
def test_consolidate_is_denoise_project_compress(
    case: tuple[LowRank, torch.Generator],
    hist_ranks: list[int],
    tau: float,
    gamma_p: float,
    max_rank: int | None,
) -> None:
    u, gen = case
    history = [random_lowrank(gen, *u.shape, r) for r in hist_ranks]
    out, stats = consolidate(u, history, tau, gamma_p, max_rank)
    kept, k = denoise(u, tau)
    expected, proj_stats = project(kept, history, gamma_p)
    if max_rank is not None:
        expected = compress(expected, max_rank)
        assert out.rank <= max_rank
    assert_close(out.dense(), expected.dense(), fro(dense64(u)))
    assert stats["kept_rank"] == k and stats["rank"] == out.rank
    assert stats["hist_fraction"] == pytest.approx(proj_stats["hist_fraction"])
    total = fro(dense64(u)) ** 2
    if total > 0:
        assert stats["energy_kept"] == pytest.approx(fro(dense64(kept)) ** 2 / total, rel=RTOL)
        assert stats["energy_kept"] >= tau - 1e-6


@pytest.mark.parametrize(
    "zero",
    [LowRank.zeros(5, 4), LowRank(torch.zeros(5, 3), torch.randn(3, 4))],
    ids=["rank0", "zero-factor"],
)
def test_zero_update(zero: LowRank) -> None:
    uo, s, vh = svd_factored(zero)
    assert torch.all(s == 0) and uo.shape[0] == 5 and vh.shape[1] == 4
    kept, k = denoise(zero, 0.9)
    assert k == 0 and kept.rank == 0 and kept.shape == (5, 4)
    history = [random_lowrank(torch.Generator().manual_seed(0), 5, 4, 2)]
    out, stats = project(zero, history, 0.5)
    assert torch.equal(out.dense(), torch.zeros(5, 4))
    assert stats == {"hist_fraction": 0.0, "coeffs": [0.0]}
    assert compress(zero, 3).rank == 0
    out, stats = consolidate(zero, history, 0.9, 0.5, max_rank=2)
    assert out.rank == 0 and out.shape == (5, 4)
    assert stats["kept_rank"] == 0 and stats["energy_kept"] == 1.0 and stats["hist_fraction"] == 0.0
    assert inner(zero, history[0]).item() == 0.0


def test_empty_history_returns_update_unchanged() -> None:
    u = random_lowrank(torch.Generator().manual_seed(1), 6, 5, 3)
    out, stats = project(u, [], 0.3)
    assert out is u and stats == {"hist_fraction": 0.0, "coeffs": []}
    out, stats = consolidate(u, [], 1.0, 0.3)
    assert_close(out.dense(), u.dense(), fro(dense64(u)))
    assert stats["kept_rank"] == 3 and stats["energy_kept"] == pytest.approx(1.0)


def test_all_zero_history_is_ignored() -> None:
    gen = torch.Generator().manual_seed(2)
    u = random_lowrank(gen, 4, 6, 2)
    history = [LowRank.zeros(4, 6), LowRank(torch.zeros(4, 2), torch.randn(2, 6, generator=gen))]
    out, stats = project(u, history, 0.0)
    assert torch.equal(out.dense(), u.dense())
    assert stats == {"hist_fraction": 0.0, "coeffs": [0.0, 0.0]}


def test_consolidate_adapter_two_modules_with_different_shapes() -> None:
    gen = torch.Generator().manual_seed(3)
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    update = {q: random_lowrank(gen, 8, 6, 4), v: random_lowrank(gen, 5, 7, 3)}
    history = [
        {q: random_lowrank(gen, 8, 6, 2), v: random_lowrank(gen, 5, 7, 2)},
        {q: random_lowrank(gen, 8, 6, 1)},  # no v_proj: skipped for v
    ]
    out, stats = consolidate_adapter(update, history, tau=0.8, gamma_p=0.5, max_rank=3)
    assert set(out) == {q, v}
    assert out[q].shape == (8, 6) and out[v].shape == (5, 7)
    ref_q, stats_q = consolidate(update[q], [h[q] for h in history], 0.8, 0.5, 3)
    ref_v, stats_v = consolidate(update[v], [history[0][v]], 0.8, 0.5, 3)
    assert torch.allclose(out[q].dense(), ref_q.dense()) and torch.allclose(out[v].dense(), ref_v.dense())
    assert len(stats["per_module"][q]["coeffs"]) == 2 and len(stats["per_module"][v]["coeffs"]) == 1
    assert stats["mean_kept_rank"] == pytest.approx((stats_q["kept_rank"] + stats_v["kept_rank"]) / 2)
    assert stats["mean_energy_kept"] == pytest.approx((stats_q["energy_kept"] + stats_v["energy_kept"]) / 2)
    assert stats["mean_hist_fraction"] == pytest.approx((stats_q["hist_fraction"] + stats_v["hist_fraction"]) / 2)
    assert all(m.rank <= 2 for m in compress_adapter(out, 2).values())


def test_add_and_add_adapters_are_exact_sums() -> None:
    gen = torch.Generator().manual_seed(4)
    a, b, c = (random_lowrank(gen, 4, 3, r) for r in (1, 2, 0))
    total = add(a, b, c)
    assert total.rank == 3
    assert torch.allclose(total.dense(), a.dense() + b.dense() + c.dense())
    other = random_lowrank(gen, 2, 5, 2)
    summed = add_adapters({"x": a, "y": other}, {"x": b})
    assert list(summed) == ["x", "y"]
    assert torch.allclose(summed["x"].dense(), a.dense() + b.dense())
    assert torch.equal(summed["y"].dense(), other.dense())


def test_invalid_arguments_raise() -> None:
    u = random_lowrank(torch.Generator().manual_seed(5), 3, 3, 2)
    with pytest.raises(ValueError):
        LowRank(torch.zeros(3, 2), torch.zeros(3, 3))
    for tau in (0.0, 1.5):
        with pytest.raises(ValueError):
            denoise(u, tau)
    with pytest.raises(ValueError):
        compress(u, -1)
    with pytest.raises(ValueError):
        add()
    with pytest.raises(ValueError):
        add(u, LowRank.zeros(3, 4))
    with pytest.raises(ValueError):
        project(u, [LowRank.zeros(4, 3)], 0.5)


def test_history_entries_stay_at_their_numerical_rank_over_a_dozen_tasks():
    """Each stored history entry is its task's denoised update plus a combination of earlier entries, so its true
    rank is at most 4 per task so far; the factors must not carry more (concatenation would double them per task),
    and refactoring must not change the update."""
    from lifealign_lite.memory.consolidate import consolidate_adapter, denoise, project

    gen = torch.Generator().manual_seed(0)
    history: list[dict] = []
    for k in range(12):
        u = LowRank(torch.randn(96, 4, generator=gen), torch.randn(4, 80, generator=gen))
        out, _ = consolidate_adapter({"m": u}, history, tau=1.0, gamma_p=0.5)
        entry = out["m"]
        assert entry.rank <= min(4 * (k + 1), 80), (k, entry.rank)
        exact, _ = project(denoise(u, 1.0)[0], [h["m"] for h in history], 0.5)
        assert torch.allclose(entry.dense(), exact.dense(), atol=1e-4 * exact.dense().abs().max().item())
        history.append(out)
    assert history[-1]["m"].rank <= 48


def test_history_of_denoised_updates_projects_like_history_of_consolidated_ones():
    """The bank keeps each task's denoised update as its history entry: the consolidated updates span the same
    space (each is its denoised update minus a combination of earlier entries), so a new task consolidates to the
    same update against either list, while the consolidated entries' ranks grow task after task."""
    g = torch.Generator().manual_seed(3)

    def rand(r):
        return LowRank(torch.randn(24, r, generator=g, dtype=torch.float64).float(), torch.randn(r, 20, generator=g, dtype=torch.float64).float())

    consolidated_hist, denoised_hist = [], []
    for task in range(4):
        u = rand(5)
        out_c, _ = consolidate(u, consolidated_hist, tau=0.9, gamma_p=0.3)
        out_d, _ = consolidate(u, denoised_hist, tau=0.9, gamma_p=0.3)
        torch.testing.assert_close(out_d.dense(), out_c.dense(), rtol=1e-4, atol=1e-4 * float(out_c.dense().abs().max()))
        consolidated_hist.append(out_c)
        denoised_hist.append(denoise(u, 0.9)[0])
    assert max(h.rank for h in denoised_hist) <= 5 < consolidated_hist[-1].rank


def test_compress_with_tau_keeps_the_energy_share_within_the_rank_budget():
    """Singular values 3, 2, 1 (energies 9, 4, 1 of 14): tau 0.9 needs 12.6, so rank 2; tau 0.5 rank 1; the budget
    still bounds it; tau 1 keeps all three."""
    q1, _ = torch.linalg.qr(torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    u = LowRank((q1 * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)).float(), q2.T.float())
    assert [compress(u, 16, tau).rank for tau in (0.9, 0.5, 1.0)] == [2, 1, 3]
    assert compress(u, 1, 0.9).rank == 1
    kept = compress(u, 16, 0.9)
    assert abs(float((u.dense() - kept.dense()).norm()) - 1.0) < 1e-5  # the dropped singular value
    with pytest.raises(ValueError, match="tau must be in"):
        compress(u, 4, 0.0)
