"""The statistics of `mixtral-offload eval`: perplexity and KL divergence of a model Q against a reference (base),
the numbers llama.cpp's perplexity tool prints with `--kl-divergence`, with its formulas.

`Scores.add(logits, base_logits, targets)` takes one window's scored positions (logits of Q and of the base, and the
tokens that follow) and keeps five numbers per token (float64: Q's and the base's negative log-likelihood of the
correct token, the KL divergence of Q from the base, the change of the correct token's probability, whether both
put the same token on top), never logits, so memory grows by 33 bytes a token. `summary()` turns them into:
perplexities (exp of the mean negative log-likelihood) with standard errors (`ppl * se(nll)`), the mean of
ln(PPL(Q)/PPL(base)) with the standard error of the per-token difference (llama.cpp's `sqrt(se_q^2 + se_b^2 -
2 cov)`), mean KLD with its standard error and the percentiles of the per-token KLD (linear interpolation, as
llama.cpp), "same top" as a proportion with `sqrt(p (1 - p) / (n - 1))`, and the RMS of Δp with `se(Δp^2) / (2 rms)`.
A standard error is `sqrt(population variance / (n - 1))`, llama.cpp's `mean_and_uncertainty`. Everything is
computed in float64 from the logits as given; the KLD is exact (every vocabulary entry counts; llama.cpp skips base
log-probabilities below -16 and reads them from 16-bit codes). Knows nothing about models, engines or files.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

ROWS = 64  # positions turned into float64 log-probabilities at once (bounds the temporaries for large vocabularies)
KLD_PERCENTILES = (("99.9%", 0.999), ("99.0%", 0.99), ("95.0%", 0.95), ("90.0%", 0.9), ("Median", 0.5),
                   ("10.0%", 0.1), (" 5.0%", 0.05), (" 1.0%", 0.01), (" 0.1%", 0.001))


class Scores:
    """Per-token numbers of every window added so far (see the module docstring)."""

    def __init__(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = {k: [] for k in ("nll", "nll_base", "kld", "dp", "same_top")}
        self._sums = {"nll": 0.0, "kld": 0.0}

    def add(self, logits: torch.Tensor, base_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """One window: `logits` and `base_logits` ([positions, vocab], any float dtype) predict `targets`."""
        if logits.shape != base_logits.shape or logits.shape[0] != targets.shape[0]:
            msg = f"logits {tuple(logits.shape)}, base {tuple(base_logits.shape)}, targets {tuple(targets.shape)}"
            raise ValueError(msg)
        for start in range(0, logits.shape[0], ROWS):
            rows = slice(start, start + ROWS)
            self._add_rows(logits[rows], base_logits[rows], targets[rows])

    def _add_rows(self, logits: torch.Tensor, base_logits: torch.Tensor, targets: torch.Tensor) -> None:
        q, b = logits.double(), base_logits.double()
        lq, lb = torch.log_softmax(q, dim=-1), torch.log_softmax(b, dim=-1)
        index = targets.long().view(-1, 1)
        nll, nll_base = -lq.gather(1, index).squeeze(1), -lb.gather(1, index).squeeze(1)
        pb = lb.exp()
        kld = torch.where(pb > 0, pb * (lb - lq), torch.zeros_like(pb)).sum(dim=-1)
        same_top = q.argmax(dim=-1) == b.argmax(dim=-1)  # first maximum on both sides, as llama.cpp
        dp = torch.exp(-nll) - torch.exp(-nll_base)
        for key, value in (("nll", nll), ("nll_base", nll_base), ("kld", kld), ("dp", dp), ("same_top", same_top)):
            self._parts[key].append(value.numpy().copy())
        self._sums["nll"] += float(nll.sum())
        self._sums["kld"] += float(kld.sum())

    @property
    def count(self) -> int:
        return sum(len(a) for a in self._parts["nll"])

    def values(self, key: str) -> np.ndarray:
        """Every token's value of `key` (nll, nll_base, kld, dp, same_top), in order."""
        parts = self._parts[key]
        return np.concatenate(parts) if parts else np.zeros(0)

    def running(self) -> dict[str, float]:
        """PPL(Q) and mean KLD so far (for a progress bar)."""
        n = self.count
        if not n:
            return {}
        return {"ppl": math.exp(self._sums["nll"] / n), "kld": self._sums["kld"] / n}

    def summary(self) -> dict[str, Any]:
        """The statistics, as plain floats (probabilities and Δp as fractions, not percent)."""
        n = self.count
        if n == 0:
            msg = "no token was scored"
            raise ValueError(msg)
        nll, nll_b, kld, dp = (self.values(k) for k in ("nll", "nll_base", "kld", "dp"))
        same = self.values("same_top").astype(np.float64)
        m_q, se_q = _mean_se(nll)
        m_b, se_b = _mean_se(nll_b)
        m_r, se_r = _mean_se(nll - nll_b)
        cov = (se_q**2 + se_b**2 - se_r**2) / 2
        ppl_q, ppl_b = math.exp(m_q), math.exp(m_b)
        m_kld, se_kld = _mean_se(kld)
        m_dp, se_dp = _mean_se(dp)
        mse, se_mse = _mean_se(dp * dp)
        rms = math.sqrt(mse)
        top = float(same.mean())
        out: dict[str, Any] = {
            "tokens": n,
            "ppl_q": ppl_q, "ppl_q_err": ppl_q * se_q, "ppl_base": ppl_b, "ppl_base_err": ppl_b * se_b,
            "cor_ln_ppl": cov / (se_q * se_b) if se_q > 0 and se_b > 0 else float("nan"),
            "ln_ppl_ratio": m_r, "ln_ppl_ratio_err": se_r,
            "ppl_ratio": math.exp(m_r), "ppl_ratio_err": math.exp(m_r) * se_r,
            "ppl_diff": ppl_q - ppl_b,
            "ppl_diff_err": math.sqrt(max((ppl_q * se_q) ** 2 + (ppl_b * se_b) ** 2 - 2 * ppl_q * ppl_b * cov, 0.0)),
            "kld_mean": m_kld, "kld_mean_err": se_kld, "kld_max": float(kld.max()), "kld_min": float(kld.min()),
            "dp_mean": m_dp, "dp_mean_err": se_dp, "dp_rms": rms, "dp_rms_err": 0.5 / rms * se_mse if rms else 0.0,
            "dp_max": float(dp.max()), "dp_min": float(dp.min()),
            "same_top": top, "same_top_err": math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
        }
        for _label, q in KLD_PERCENTILES:
            out[_percentile_key("kld", q)] = float(np.quantile(kld, q))
        for q in (0.999, 0.99, 0.5, 0.01, 0.001):
            out[_percentile_key("dp", q)] = float(np.quantile(dp, q))
        return out


def _percentile_key(name: str, q: float) -> str:
    return f"{name}_median" if q == 0.5 else f"{name}_p{f'{q * 100:g}'.replace('.', '_')}"


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error, `sqrt(population variance / (n - 1))` (0 for fewer than two values)."""
    n = len(x)
    mean = float(x.mean())
    if n < 2:
        return mean, 0.0
    var = float(np.mean((x - mean) ** 2))
    return mean, math.sqrt(var / (n - 1))


def format_report(s: dict[str, Any]) -> str:
    """The statistics laid out as llama.cpp's perplexity tool prints them."""
    pct = 100.0
    lines = [
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {s['ppl_q']:10.6f} ± {s['ppl_q_err']:10.6f}",
        f"Mean PPL(base)                : {s['ppl_base']:10.6f} ± {s['ppl_base_err']:10.6f}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {pct * s['cor_ln_ppl']:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {s['ln_ppl_ratio']:10.6f} ± {s['ln_ppl_ratio_err']:10.6f}",
        f"Mean PPL(Q)/PPL(base)         : {s['ppl_ratio']:10.6f} ± {s['ppl_ratio_err']:10.6f}",
        f"Mean PPL(Q)-PPL(base)         : {s['ppl_diff']:10.6f} ± {s['ppl_diff_err']:10.6f}",
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {s['kld_mean']:10.6f} ± {s['kld_mean_err']:10.6f}",
        f"Maximum KLD: {s['kld_max']:10.6f}",
    ]
    lines += [f"{label:<7} KLD: {s[_percentile_key('kld', q)]:10.6f}" for label, q in KLD_PERCENTILES]
    lines += [
        f"Minimum KLD: {s['kld_min']:10.6f}",
        "",
        "====== Token probability statistics ======",
        f"Mean    Δp: {pct * s['dp_mean']:6.3f} ± {pct * s['dp_mean_err']:5.3f} %",
        f"Maximum Δp: {pct * s['dp_max']:6.3f}%",
    ]
    lines += [f"{label:<7} Δp: {pct * s[_percentile_key('dp', q)]:6.3f}%"
              for label, q in (("99.9%", 0.999), ("99.0%", 0.99), ("Median", 0.5), (" 1.0%", 0.01), (" 0.1%", 0.001))]
    lines += [
        f"Minimum Δp: {pct * s['dp_min']:6.3f}%",
        f"RMS Δp    : {pct * s['dp_rms']:6.3f} ± {pct * s['dp_rms_err']:5.3f} %",
        f"Same top p: {pct * s['same_top']:6.3f} ± {pct * s['same_top_err']:5.3f} %",
    ]
    return "\n".join(lines)
