"""The Triton kernels of :mod:`normscope.ops.rnn_triton` (imported by it on first use: this module imports triton).

One program per batch row of a time step; the gate blocks of a row are the rows of a ``[4, BLOCK]`` register tile
(the GRU's three gates use the first three), ``BLOCK`` the next power of two of the hidden size.
"""

import triton
import triton.language as tl

from normscope.ops.triton_backend import _INTERPRETED, _round_to

__all__ = ["lstm_fwd", "lstm_bwd", "gru_fwd", "gru_bwd", "INTERPRETED"]

#: True when triton runs kernels through its CPU interpreter (bfloat16 rounding is emulated then).
INTERPRETED = _INTERPRETED


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _pick(tile, gi, j: tl.constexpr):
    """Row ``j`` of a ``[4, BLOCK]`` gate tile, as a ``[BLOCK]`` vector."""
    return tl.sum(tl.where(gi == j, tile, 0.0), axis=0)


@triton.jit
def _ln_bwd(dxh, xhat, rstd, H):
    """The layer-norm input gradient of each gate block (rows of the tile), given ``d xhat``."""
    a = tl.sum(dxh, axis=1) / H
    b = tl.sum(dxh * xhat, axis=1) / H
    return rstd[:, None] * (dxh - a[:, None] - xhat * b[:, None])


@triton.jit(do_not_specialize=["off", "k"])
def lstm_fwd(XG, P, HS, CS, GHH, GC, BC, OUT, HPREV, CPREV, XHAT, RSTD, GATES, CN, RSTDC, TH,
             off, k, H, eps, BLOCK: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    r = tl.program_id(0)
    row = off + r
    lim = tl.where(r < k, H, 0)  # the live rows' columns (none on a row holding the zero initial state)
    gi = tl.arange(0, 4)[:, None]
    hv = tl.arange(0, BLOCK)
    hi = hv[None, :]
    hm = hv < H
    m = (hi < H) & (gi < 4)
    idx = gi * H + hi
    # the hidden pre-activations of the live rows, normalized per gate block (two-pass, fp32)
    p = tl.load(P + r * 4 * H + idx, mask=(hi < lim) & (gi < 4), other=0.0).to(tl.float32)
    mean = tl.sum(p, axis=1) / H
    d = tl.where(m, p - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / H + eps)
    xhat = d * rstd[:, None]  # zero on the rows that hold the zero initial state
    a = tl.load(XG + row * 4 * H + idx, mask=m, other=0.0).to(tl.float32)
    a = a + xhat * tl.load(GHH + idx, mask=m, other=0.0).to(tl.float32)
    i = _sigmoid(_pick(a, gi, 0))
    f = _sigmoid(_pick(a, gi, 1))
    g = _tanh(_pick(a, gi, 2))
    o = _sigmoid(_pick(a, gi, 3))
    hold = tl.load(HS + r * H + hv, mask=hm, other=0.0).to(tl.float32)
    cold = tl.load(CS + r * H + hv, mask=hm, other=0.0).to(tl.float32)
    c2 = f * cold + i * g
    cmean = tl.sum(tl.where(hm, c2, 0.0), axis=0) / H
    dc = tl.where(hm, c2 - cmean, 0.0)
    rc = 1.0 / tl.sqrt(tl.sum(dc * dc, axis=0) / H + eps)
    cn = dc * rc
    y = cn * tl.load(GC + hv, mask=hm, other=0.0).to(tl.float32) + tl.load(BC + hv, mask=hm, other=0.0).to(
        tl.float32)
    th = _tanh(y)
    h2 = o * th
    gates = tl.where(gi == 0, i[None, :], tl.where(gi == 1, f[None, :], tl.where(gi == 2, g[None, :],
                                                                                  o[None, :])))
    tl.store(HPREV + row * H + hv, hold, mask=hm)
    tl.store(CPREV + row * H + hv, cold, mask=hm)
    tl.store(XHAT + row * 4 * H + idx, xhat, mask=m)
    tl.store(RSTD + row * 4 + tl.arange(0, 4), rstd)
    tl.store(GATES + row * 4 * H + idx, gates, mask=m)
    tl.store(CN + row * H + hv, cn, mask=hm)
    tl.store(RSTDC + row, rc)
    tl.store(TH + row * H + hv, th, mask=hm)
    hq = _round_to(h2, OUT.dtype.element_ty, EMULATE_RTNE)
    tl.store(OUT + row * H + hv, hq, mask=hm)
    tl.store(HS + r * H + hv, _round_to(h2, HS.dtype.element_ty, EMULATE_RTNE), mask=hm)
    tl.store(CS + r * H + hv, _round_to(c2, CS.dtype.element_ty, EMULATE_RTNE), mask=hm)


@triton.jit(do_not_specialize=["off", "k"])
def lstm_bwd(DOUT, DH, DC, CPREV, GHH, GC, XHAT, RSTD, GATES, CN, RSTDC, TH, DXG, DP, DY,
             off, k, H, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    row = off + r
    lim = tl.where(r < k, H, 0)  # the live rows' columns (none on a row holding the zero initial state)
    gi = tl.arange(0, 4)[:, None]
    hv = tl.arange(0, BLOCK)
    hi = hv[None, :]
    hm = hv < H
    m = (hi < H) & (gi < 4)
    idx = gi * H + hi
    dht = tl.load(DOUT + row * H + hv, mask=hm, other=0.0).to(tl.float32) + tl.load(DH + r * H + hv, mask=hm,
                                                                                    other=0.0)
    gates = tl.load(GATES + row * 4 * H + idx, mask=m, other=0.0)
    i = _pick(gates, gi, 0)
    f = _pick(gates, gi, 1)
    g = _pick(gates, gi, 2)
    o = _pick(gates, gi, 3)
    th = tl.load(TH + row * H + hv, mask=hm, other=0.0)
    cn = tl.load(CN + row * H + hv, mask=hm, other=0.0)
    rc = tl.load(RSTDC + row)
    do = dht * th * o * (1.0 - o)
    dy = tl.where(hm, dht * o * (1.0 - th * th), 0.0)
    dcn = dy * tl.load(GC + hv, mask=hm, other=0.0).to(tl.float32)
    dc2 = rc * (dcn - tl.sum(dcn, axis=0) / H - cn * (tl.sum(dcn * cn, axis=0) / H))
    dc2 = dc2 + tl.load(DC + r * H + hv, mask=hm, other=0.0)
    cprev = tl.load(CPREV + row * H + hv, mask=hm, other=0.0)
    di = dc2 * g * i * (1.0 - i)
    df = dc2 * cprev * f * (1.0 - f)
    dg = dc2 * i * (1.0 - g * g)
    da = tl.where(gi == 0, di[None, :], tl.where(gi == 1, df[None, :], tl.where(gi == 2, dg[None, :],
                                                                               do[None, :])))
    da = tl.where(m, da, 0.0)
    xhat = tl.load(XHAT + row * 4 * H + idx, mask=m, other=0.0)
    rstd = tl.load(RSTD + row * 4 + tl.arange(0, 4))
    dp = _ln_bwd(da * tl.load(GHH + idx, mask=m, other=0.0).to(tl.float32), xhat, rstd, H)
    dp = tl.where(hi < lim, dp, 0.0)
    tl.store(DY + row * H + hv, dy, mask=hm)
    tl.store(DC + r * H + hv, dc2 * f, mask=hm)
    tl.store(DXG + row * 4 * H + idx, da, mask=m)
    tl.store(DP + row * 4 * H + idx, dp, mask=m)
    tl.store(DH + r * H + hv, tl.zeros([BLOCK], tl.float32), mask=hm)  # the live rows: set by the matmul


@triton.jit(do_not_specialize=["off", "k"])
def gru_fwd(XG, P, HS, GHH, BHH, OUT, HPREV, XHAT, RSTD, GATES, VN, off, k, H, eps,
            HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    r = tl.program_id(0)
    row = off + r
    lim = tl.where(r < k, H, 0)  # the live rows' columns (none on a row holding the zero initial state)
    gi = tl.arange(0, 4)[:, None]
    hv = tl.arange(0, BLOCK)
    hi = hv[None, :]
    hm = hv < H
    m = (hi < H) & (gi < 3)
    idx = gi * H + hi
    p = tl.load(P + r * 3 * H + idx, mask=(hi < lim) & (gi < 3), other=0.0).to(tl.float32)
    mean = tl.sum(p, axis=1) / H
    d = tl.where(m, p - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / H + eps)
    xhat = d * rstd[:, None]
    v = xhat * tl.load(GHH + idx, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v = v + tl.load(BHH + idx, mask=m, other=0.0).to(tl.float32)
    xg = tl.load(XG + row * 3 * H + idx, mask=m, other=0.0).to(tl.float32)
    rr = _sigmoid(_pick(xg, gi, 0) + _pick(v, gi, 0))
    z = _sigmoid(_pick(xg, gi, 1) + _pick(v, gi, 1))
    vn = _pick(v, gi, 2)
    nn = _tanh(_pick(xg, gi, 2) + rr * vn)
    hold = tl.load(HS + r * H + hv, mask=hm, other=0.0).to(tl.float32)
    h2 = (1.0 - z) * nn + z * hold
    gates = tl.where(gi == 0, rr[None, :], tl.where(gi == 1, z[None, :], nn[None, :]))
    tl.store(HPREV + row * H + hv, hold, mask=hm)
    tl.store(XHAT + row * 3 * H + idx, xhat, mask=m)
    tl.store(RSTD + row * 3 + tl.arange(0, 4), rstd, mask=tl.arange(0, 4) < 3)
    tl.store(GATES + row * 3 * H + idx, gates, mask=m)
    tl.store(VN + row * H + hv, vn, mask=hm)
    tl.store(OUT + row * H + hv, _round_to(h2, OUT.dtype.element_ty, EMULATE_RTNE), mask=hm)
    tl.store(HS + r * H + hv, _round_to(h2, HS.dtype.element_ty, EMULATE_RTNE), mask=hm)


@triton.jit(do_not_specialize=["off", "k"])
def gru_bwd(DOUT, DH, HPREV, GHH, XHAT, RSTD, GATES, VN, DXG, DV, DP, off, k, H, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    row = off + r
    lim = tl.where(r < k, H, 0)  # the live rows' columns (none on a row holding the zero initial state)
    gi = tl.arange(0, 4)[:, None]
    hv = tl.arange(0, BLOCK)
    hi = hv[None, :]
    hm = hv < H
    m = (hi < H) & (gi < 3)
    idx = gi * H + hi
    dht = tl.load(DOUT + row * H + hv, mask=hm, other=0.0).to(tl.float32) + tl.load(DH + r * H + hv, mask=hm,
                                                                                    other=0.0)
    gates = tl.load(GATES + row * 3 * H + idx, mask=m, other=0.0)
    rr = _pick(gates, gi, 0)
    z = _pick(gates, gi, 1)
    nn = _pick(gates, gi, 2)
    vn = tl.load(VN + row * H + hv, mask=hm, other=0.0)
    hold = tl.load(HPREV + row * H + hv, mask=hm, other=0.0)
    dz = dht * (hold - nn) * z * (1.0 - z)
    dpn = dht * (1.0 - z) * (1.0 - nn * nn)
    dr = dpn * vn * rr * (1.0 - rr)
    dxg = tl.where(m, tl.where(gi == 0, dr[None, :], tl.where(gi == 1, dz[None, :], dpn[None, :])), 0.0)
    dv = tl.where(m, tl.where(gi == 2, (dpn * rr)[None, :], dxg), 0.0)
    xhat = tl.load(XHAT + row * 3 * H + idx, mask=m, other=0.0)
    rstd = tl.load(RSTD + row * 3 + tl.arange(0, 4), mask=tl.arange(0, 4) < 3, other=0.0)
    dp = _ln_bwd(dv * tl.load(GHH + idx, mask=m, other=0.0).to(tl.float32), xhat, rstd, H)
    dp = tl.where(hi < lim, dp, 0.0)
    tl.store(DXG + row * 3 * H + idx, dxg, mask=m)
    tl.store(DV + row * 3 * H + idx, dv, mask=m)
    tl.store(DP + row * 3 * H + idx, dp, mask=m)
    tl.store(DH + r * H + hv, dht * z, mask=hm)  # the direct path; the live rows add the matmul
