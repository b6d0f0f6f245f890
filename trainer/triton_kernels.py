"""Triton kernels of the training path; their host side (custom ops, autograd) is trainer.rotary_norm.

Imported only through it, where Triton is present. Under TRITON_INTERPRET=1 they run on CPU tensors
(tests/test_rotary_norm.py)."""
import triton
import triton.language as tl


@triton.jit
def _rows(pid, n_rows, heads, seq_len, ROWS: tl.constexpr):
    """The program's rows of a (B, T, H, D) tensor: row = (b * T + t) * H + h; returns rows, b, t, h, valid."""
    rows = pid * ROWS + tl.arange(0, ROWS)
    valid = rows < n_rows
    rows = tl.where(valid, rows, 0).to(tl.int64)
    h = rows % heads
    t = (rows // heads) % seq_len
    b = rows // heads // seq_len
    return rows, b, t, h, valid


@triton.jit
def rotary_norm_fwd_kernel(x, cos, sin, y, inv, n_rows, heads, seq_len, sb, st, sh, scale, eps,
                           HALF: tl.constexpr, ROWS: tl.constexpr):
    """y = scale * rms_norm(rotary(x)) per head row of D = 2 * HALF; x strided (sb, st, sh, 1), y contiguous;
    inv = the row's 1/rms (fp32), which the backward needs besides y. Rotary by -theta, halves (x1, x2):
    (x1 cos + x2 sin, x2 cos - x1 sin), cos/sin (T, HALF) contiguous."""
    rows, b, t, h, valid = _rows(tl.program_id(0), n_rows, heads, seq_len, ROWS)
    c = tl.arange(0, HALF)[None, :]
    m = valid[:, None]
    src = x + (b * sb + t * st + h * sh)[:, None] + c
    x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
    tab = t[:, None] * HALF + c
    co = tl.load(cos + tab, mask=m, other=0.0).to(tl.float32)
    si = tl.load(sin + tab, mask=m, other=0.0).to(tl.float32)
    r1 = x1 * co + x2 * si
    r2 = x2 * co - x1 * si
    rs = tl.rsqrt((tl.sum(r1 * r1, axis=1) + tl.sum(r2 * r2, axis=1)) / (2 * HALF) + eps)
    dst = y + rows[:, None] * (2 * HALF) + c
    tl.store(dst, (r1 * rs[:, None] * scale).to(y.dtype.element_ty), mask=m)
    tl.store(dst + HALF, (r2 * rs[:, None] * scale).to(y.dtype.element_ty), mask=m)
    tl.store(inv + rows, rs, mask=valid)


@triton.jit
def rotary_norm_bwd_kernel(dy, y, inv, cos, sin, dx, n_rows, heads, seq_len, sb, st, sh, scale,
                           HALF: tl.constexpr, ROWS: tl.constexpr):
    """dx from dy (strided like x in the forward) and the forward's y (contiguous) and inv. With r = rotary(x)
    and y = scale * r * inv: dr = inv * (scale * dy - y * sum(dy * y) / (scale * D)), and dx is dr rotated
    back: (dr1 cos - dr2 sin, dr1 sin + dr2 cos). y stands in for r, so x is never kept."""
    rows, b, t, h, valid = _rows(tl.program_id(0), n_rows, heads, seq_len, ROWS)
    c = tl.arange(0, HALF)[None, :]
    m = valid[:, None]
    gsrc = dy + (b * sb + t * st + h * sh)[:, None] + c
    g1 = tl.load(gsrc, mask=m, other=0.0).to(tl.float32)
    g2 = tl.load(gsrc + HALF, mask=m, other=0.0).to(tl.float32)
    ysrc = y + rows[:, None] * (2 * HALF) + c
    y1 = tl.load(ysrc, mask=m, other=0.0).to(tl.float32)
    y2 = tl.load(ysrc + HALF, mask=m, other=0.0).to(tl.float32)
    rs = tl.load(inv + rows, mask=valid, other=0.0)[:, None]
    k = ((tl.sum(g1 * y1, axis=1) + tl.sum(g2 * y2, axis=1)) / (scale * 2 * HALF))[:, None]
    d1 = rs * (scale * g1 - y1 * k)
    d2 = rs * (scale * g2 - y2 * k)
    tab = t[:, None] * HALF + c
    co = tl.load(cos + tab, mask=m, other=0.0).to(tl.float32)
    si = tl.load(sin + tab, mask=m, other=0.0).to(tl.float32)
    dst = dx + rows[:, None] * (2 * HALF) + c
    tl.store(dst, (d1 * co - d2 * si).to(dx.dtype.element_ty), mask=m)
    tl.store(dst + HALF, (d1 * si + d2 * co).to(dx.dtype.element_ty), mask=m)
