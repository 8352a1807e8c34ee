"""Short-to-long memory consolidation (SLMC) on low-rank updates.

Implements the consolidation step of Li et al., "LifeAlign: Lifelong Alignment
for Large Language Models with Memory-Augmented Focalized Preference
Optimization", AAAI 2026, arXiv:2509.17183, section "Short-to-Long Memory
Consolidation": a freshly learned (short-term) update is denoised by keeping
its dominant singular directions, then split into the part lying in the span
of previously consolidated (long-term) updates and the genuinely new part; the
historical part is damped by ``gamma_p`` so that old knowledge is not
overwritten, and the result may be compressed back to a fixed rank.

Every update for one weight matrix is kept in FACTORED form ``U = B @ A`` with
``B: (d_out, r)`` and ``A: (r, d_in)`` (LoRA scaling already folded into
``B``); no function here materialises the dense ``d_out x d_in`` matrix.
The trick that makes this cheap: with thin QR decompositions
``B = Qb Rb`` and ``A^T = Qa Ra``,

    U = Qb Rb Ra^T Qa^T,

and because ``Qb`` and ``Qa`` have orthonormal columns, the SVD of ``U`` is
obtained from the SVD of the small ``r x r`` core ``Rb Ra^T = Uc S Vc^T`` as
``U = (Qb Uc) S (Qa Vc)^T``. Cost is ``O((d_out + d_in) r^2 + r^3)`` instead of
``O(d_out d_in min(d_out, d_in))``.

Numerics run in float64 internally (sums of many factor products lose
precision quickly in float32); every returned tensor is float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: torch is imported where tensors are made
    import torch

# torch is imported inside the functions that compute: reading a bank (chat on llama.cpp) needs LowRank, not torch.
# Factors come out as float32 (.float()); SVDs, inner products and projections work in float64 (.double()).

# Relative cut-off (to the largest singular value / Gram eigenvalue) below
# which a direction is round-off, not signal: far below float32 resolution
# (~1e-7), so dropping it never changes a float32 result.
_ZERO_RTOL = 1e-10
# The projection's pseudo-inverse acts on the Gram matrix of the history, whose eigenvalues are squared singular
# values: a cut-off of 1e-14 on them drops history directions below 1e-7 of the largest (float32 resolution of
# the stored factors), the same relative scale as _ZERO_RTOL's intent for singular values.
_GRAM_RTOL = 1e-14


@dataclass(frozen=True, eq=False)  # eq=False: tensor-valued fields make `==` ambiguous
class LowRank:
    """Low-rank update ``U = B @ A`` for one weight matrix.

    ``B`` has shape ``(d_out, r)`` and ``A`` has shape ``(r, d_in)``; ``r`` may
    be 0 (the zero update).
    """

    B: torch.Tensor
    A: torch.Tensor

    def __post_init__(self) -> None:
        if self.B.dim() != 2 or self.A.dim() != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"LowRank needs B (d_out, r) and A (r, d_in); got {tuple(self.B.shape)} "
                f"and {tuple(self.A.shape)}"
            )

    @property
    def rank(self) -> int:
        """Inner dimension ``r`` of the factorisation (an upper bound on the true rank)."""
        return self.B.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(d_out, d_in)`` of the represented matrix ``U = B @ A``."""
        return self.B.shape[0], self.A.shape[1]

    def dense(self) -> torch.Tensor:
        """Dense ``U = B @ A``. For tests and debugging only: costs ``d_out * d_in`` memory."""
        return self.B @ self.A

    @classmethod
    def zeros(cls, d_out: int, d_in: int, device: torch.device | str | None = None) -> LowRank:
        """The zero update of shape ``(d_out, d_in)`` as a rank-0 factorisation."""
        import torch

        return cls(
            torch.zeros(d_out, 0, dtype=torch.float32, device=device),
            torch.zeros(0, d_in, dtype=torch.float32, device=device),
        )


def _balanced(uo: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> LowRank:
    """Factor ``Uo diag(S) Vh`` as ``B = Uo sqrt(S)``, ``A = sqrt(S) Vh`` (float32).

    Splitting ``S`` evenly keeps both factors on the same scale, which is what
    a LoRA adapter initialised from them wants.
    """
    root = s.sqrt()
    return LowRank((uo * root).float(), (root[:, None] * vh).float())


def _svd64(u: LowRank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 thin SVD of ``B @ A`` via QR of both factors and an SVD of the core.

    ``B = Qb Rb``, ``A^T = Qa Ra``, ``Rb Ra^T = Uc S Vch`` give
    ``U = (Qb Uc) S (Vch Qa^T)``.
    """
    import torch

    qb, rb = torch.linalg.qr(u.B.double())
    qa, ra = torch.linalg.qr(u.A.double().T)
    uc, s, vch = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ uc, s, vch @ qa.T


def svd_factored(u: LowRank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U = Uo diag(S) Vh`` of ``U = B @ A`` without forming ``U``.

    With ``B = Qb Rb`` and ``A^T = Qa Ra`` (thin QR), ``U = Qb (Rb Ra^T) Qa^T``,
    so the SVD of the small core ``Rb Ra^T = Uc S Vch`` yields ``Uo = Qb Uc`` and
    ``Vh = Vch Qa^T`` (Li et al., LifeAlign, AAAI 2026, arXiv:2509.17183, SLMC).

    Returns ``Uo: (d_out, k)``, ``S: (k,)`` descending, ``Vh: (k, d_in)`` with
    ``k = min(r, d_out, d_in)`` (so ``k = r`` for the usual ``r <= d_out, d_in``);
    a rank-0 input gives ``k = 0``.
    """
    uo, s, vh = _svd64(u)
    return uo.float(), s.float(), vh.float()


def denoise(u: LowRank, tau: float) -> tuple[LowRank, int]:
    """Keep the dominant singular directions holding a ``tau`` share of the energy.

    With ``U = Uo diag(S) Vh``, ``k`` is the smallest integer such that
    ``sum_{i<k} S_i^2 >= tau * sum_i S_i^2`` and the result is the rank-``k``
    truncation ``B = Uo[:, :k] sqrt(S[:k])``, ``A = sqrt(S[:k]) Vh[:k]``
    (Li et al., LifeAlign, AAAI 2026, arXiv:2509.17183, SLMC denoising).

    ``tau`` must lie in ``(0, 1]``. A zero update gives a rank-0 result and
    ``k = 0``. Returns ``(truncated update, k)``.
    """
    import torch

    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    uo, s, vh = _svd64(u)
    energy = torch.cumsum(s**2, dim=0)
    # Take the total from the cumulative sum itself so that tau = 1 compares
    # against exactly the same rounded number and selects the full rank.
    if energy.numel() == 0 or energy[-1] == 0:
        return LowRank.zeros(*u.shape, device=u.B.device), 0
    k = int(torch.searchsorted(energy, tau * energy[-1]).item()) + 1
    k = min(k, s.numel())  # guards against tau * total rounding above the total
    return _balanced(uo[:, :k], s[:k], vh[:k]), k


def inner(a: LowRank, b: LowRank) -> torch.Tensor:
    """Frobenius inner product ``<B_a A_a, B_b A_b>`` in factored form.

    ``tr(A_a^T B_a^T B_b A_b) = sum((B_a^T B_b) * (A_a A_b^T))``, costing
    ``O((d_out + d_in) r_a r_b)`` (Li et al., LifeAlign, AAAI 2026,
    arXiv:2509.17183, SLMC). Returns a float32 scalar tensor.
    """
    return _inner64(a, b).float()


def _inner64(a: LowRank, b: LowRank) -> torch.Tensor:
    """Float64 version of :func:`inner`, used to build Gram matrices."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    left = a.B.double().T @ b.B.double()
    right = a.A.double() @ b.A.double().T
    return (left * right).sum()


def project(
    u: LowRank, history: Sequence[LowRank], gamma_p: float
) -> tuple[LowRank, dict[str, Any]]:
    """Damp the component of ``u`` that lies in the span of the history.

    With ``G_ij = <h_i, h_j>`` and ``b_i = <h_i, u>`` (Frobenius), ``c = G^+ b``
    gives the orthogonal projection ``U_hist = sum_i c_i h_i`` of ``u`` onto
    ``span{h_i}`` and ``U_new = u - U_hist``; the result is
    ``U_new + gamma_p U_hist = u - (1 - gamma_p) sum_i c_i h_i``
    (Li et al., LifeAlign, AAAI 2026, arXiv:2509.17183, SLMC projection).

    The pseudo-inverse (Gram eigenvalues below ``1e-14`` of the largest, that is
    history directions below ``1e-7`` of the largest singular value, treated as
    zero) makes linearly dependent or zero history entries harmless. The
    result is returned uncompressed, by concatenating factors
    ``B' = [u.B, -(1 - gamma_p) c_i h_i.B, ...]``, ``A' = [u.A; h_i.A; ...]``;
    terms whose factor ``(1 - gamma_p) c_i`` is exactly zero are left out since
    they add nothing but rank. Empty history returns ``u`` itself.

    Stats: ``hist_fraction = ||U_hist||^2 / ||u||^2`` (0 for a zero ``u``) and
    ``coeffs = c`` as a list of floats, in history order.
    """
    import torch

    if not history:
        return u, {"hist_fraction": 0.0, "coeffs": []}
    gram = torch.stack([torch.stack([_inner64(hi, hj) for hj in history]) for hi in history])
    rhs = torch.stack([_inner64(h, u) for h in history])
    coeffs = torch.linalg.pinv(gram, rtol=_GRAM_RTOL, hermitian=True) @ rhs
    u_norm2 = _inner64(u, u)
    hist_norm2 = coeffs @ gram @ coeffs  # ||sum_i c_i h_i||^2 without densifying
    hist_fraction = float(hist_norm2 / u_norm2) if u_norm2 > 0 else 0.0

    b_blocks, a_blocks = [u.B.float()], [u.A.float()]
    for c, h in zip(coeffs.tolist(), history):
        weight = -(1.0 - gamma_p) * c
        if weight != 0.0:
            b_blocks.append((weight * h.B.double()).float())
            a_blocks.append(h.A.float())
    out = LowRank(torch.cat(b_blocks, dim=1), torch.cat(a_blocks, dim=0))
    return out, {"hist_fraction": hist_fraction, "coeffs": coeffs.tolist()}


def add(*updates: LowRank) -> LowRank:
    """Exact sum ``sum_j B_j A_j = [B_1, B_2, ...] [A_1; A_2; ...]`` by concatenation.

    The rank of the result is the sum of the input ranks; use :func:`compress`
    to bound it (Li et al., LifeAlign, AAAI 2026, arXiv:2509.17183, SLMC).
    """
    import torch

    if not updates:
        raise ValueError("add() needs at least one update to know the shape")
    shape = updates[0].shape
    if any(v.shape != shape for v in updates):
        raise ValueError(f"shape mismatch: {[v.shape for v in updates]}")
    return LowRank(
        torch.cat([v.B.float() for v in updates], dim=1),
        torch.cat([v.A.float() for v in updates], dim=0),
    )


def compress(u: LowRank, max_rank: int, tau: float = 1.0) -> LowRank:
    """Best approximation of rank at most ``max_rank`` (Eckart-Young), optionally denoised at energy ``tau``.

    ``U ~ Uo[:, :m] diag(S[:m]) Vh[:m]`` with ``m = min(max_rank, #{S_i > 0}, k_tau)``, where ``k_tau`` is the
    smallest ``k`` with ``sum_{i<k} S_i^2 >= tau * sum_i S_i^2`` (every direction for ``tau = 1``, as
    :func:`denoise`), returned with balanced factors; the Frobenius error is ``sqrt(sum_{i>=m} S_i^2)``
    (Li et al., LifeAlign, AAAI 2026, arXiv:2509.17183, SLMC compression). Singular values that are zero up to
    round-off (below ``1e-10`` of the largest) are dropped, so the factor rank equals the numerical rank when
    that is smaller than ``max_rank``.
    """
    import torch

    if max_rank < 0:
        raise ValueError(f"max_rank must be >= 0, got {max_rank}")
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    uo, s, vh = _svd64(u)
    if s.numel() == 0 or s[0] == 0:
        return LowRank.zeros(*u.shape, device=u.B.device)
    m = min(max_rank, int((s > _ZERO_RTOL * s[0]).sum().item()))
    if tau < 1.0:
        energy = torch.cumsum(s**2, dim=0)
        m = min(m, int(torch.searchsorted(energy, tau * energy[-1]).item()) + 1)
    return _balanced(uo[:, :m], s[:m], vh[:m])


def consolidate(
    u: LowRank,
    history: Sequence[LowRank],
    tau: float,
    gamma_p: float,
    max_rank: int | None = None,
) -> tuple[LowRank, dict[str, Any]]:
    """Full SLMC step for one module: denoise, project, optionally compress.

    ``U_k = denoise(u, tau)``; ``U' = U_new + gamma_p U_hist`` with respect to
    ``span(history)``; ``U'`` is refactored at its numerical rank, or if ``max_rank``
    is given replaced by its best rank-``max_rank`` approximation (Li et al., LifeAlign, AAAI 2026,
    arXiv:2509.17183, SLMC).

    Stats: ``kept_rank`` (``k`` from denoising), ``energy_kept``
    (``sum_{i<k} S_i^2 / sum_i S_i^2``, 1.0 for a zero update since nothing is
    discarded), ``hist_fraction`` and ``coeffs`` (from :func:`project`), and
    ``rank`` (factor rank of the returned update).
    """
    kept, k = denoise(u, tau)
    total = _inner64(u, u)
    energy_kept = float(_inner64(kept, kept) / total) if total > 0 else 1.0
    out, proj_stats = project(kept, history, gamma_p)
    # project() concatenates factors (rank = own + every history entry's); refactor at the numerical rank (or the
    # budget) so a stored history entry never grows beyond its true rank, task after task
    out = compress(out, out.rank if max_rank is None else max_rank)
    stats = {"kept_rank": k, "energy_kept": energy_kept, **proj_stats, "rank": out.rank}
    return out, stats


def consolidate_adapter(
    update: dict[str, LowRank],
    history: Sequence[dict[str, LowRank]],
    tau: float,
    gamma_p: float,
    max_rank: int | None = None,
) -> tuple[dict[str, LowRank], dict[str, Any]]:
    """Apply :func:`consolidate` to every module of an adapter.

    Module ``m`` is projected against ``[h[m] for h in history if m in h]``,
    i.e. history entries lacking the module are skipped (Li et al., LifeAlign,
    AAAI 2026, arXiv:2509.17183, SLMC). Modules present only in the history are
    not part of the output.

    Stats: ``mean_kept_rank``, ``mean_energy_kept``, ``mean_hist_fraction``
    (means over modules; 0.0 for an empty adapter) and ``per_module``
    (module name -> stats of :func:`consolidate`).
    """
    out: dict[str, LowRank] = {}
    per_module: dict[str, dict[str, Any]] = {}
    for name, u in update.items():
        module_history = [h[name] for h in history if name in h]
        out[name], per_module[name] = consolidate(u, module_history, tau, gamma_p, max_rank)

    def mean(key: str) -> float:
        values = [float(s[key]) for s in per_module.values()]
        return sum(values) / len(values) if values else 0.0

    stats = {
        "mean_kept_rank": mean("kept_rank"),
        "mean_energy_kept": mean("energy_kept"),
        "mean_hist_fraction": mean("hist_fraction"),
        "per_module": per_module,
    }
    return out, stats


def compress_adapter(u: dict[str, LowRank], max_rank: int, tau: float = 1.0) -> dict[str, LowRank]:
    """Apply :func:`compress` (best approximation of rank at most ``max_rank`` keeping a ``tau`` share of the energy) to every module."""
    return {name: compress(v, max_rank, tau) for name, v in u.items()}


def add_adapters(*adapters: dict[str, LowRank]) -> dict[str, LowRank]:
    """Module-wise exact sum of adapters over the union of their module names.

    ``out[m] = sum_{j: m in adapter_j} adapter_j[m]`` via :func:`add`; key order
    follows first appearance.
    """
    grouped: dict[str, list[LowRank]] = {}
    for adapter in adapters:
        for name, v in adapter.items():
            grouped.setdefault(name, []).append(v)
    return {name: add(*vs) for name, vs in grouped.items()}
