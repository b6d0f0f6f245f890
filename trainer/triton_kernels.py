"""Triton kernels of the training path; their host sides (custom ops, autograd) are trainer.rotary_norm,
trainer.relu2_mlp and trainer.softcap_ce.

Imported only through them, where Triton is present. Under TRITON_INTERPRET=1 they run on CPU tensors
(tests/test_rotary_norm.py, tests/test_relu2_mlp.py, tests/test_softcap_ce.py)."""
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
def _halves(ptr, m, HALF: tl.constexpr):
    """The two halves of each row at ptr (a (rows, HALF) block of pointers), masked by m, in fp32."""
    return tl.load(ptr, mask=m, other=0.0).to(tl.float32), tl.load(ptr + HALF, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _cos_sin(cos, sin, t, c, m, HALF: tl.constexpr):
    """The rotary table rows of positions t, (rows, HALF) each, in fp32."""
    tab = t[:, None] * HALF + c
    return tl.load(cos + tab, mask=m, other=0.0).to(tl.float32), tl.load(sin + tab, mask=m, other=0.0).to(tl.float32)


@triton.jit
def rotary_norm_fwd_kernel(x, cos, sin, y, inv, n_rows, heads, seq_len, sb, st, sh, scale, eps,
                           HALF: tl.constexpr, ROWS: tl.constexpr):
    """y = scale * rms_norm(rotary(x)) per head row of D = 2 * HALF; x strided (sb, st, sh, 1), y contiguous;
    inv = the row's 1/rms (fp32), which the backward needs besides y. Rotary by -theta, halves (x1, x2):
    (x1 cos + x2 sin, x2 cos - x1 sin), cos/sin (T, HALF) contiguous."""
    rows, b, t, h, valid = _rows(tl.program_id(0), n_rows, heads, seq_len, ROWS)
    c = tl.arange(0, HALF)[None, :]
    m = valid[:, None]
    x1, x2 = _halves(x + (b * sb + t * st + h * sh)[:, None] + c, m, HALF)
    co, si = _cos_sin(cos, sin, t, c, m, HALF)
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
    g1, g2 = _halves(dy + (b * sb + t * st + h * sh)[:, None] + c, m, HALF)
    y1, y2 = _halves(y + rows[:, None] * (2 * HALF) + c, m, HALF)
    rs = tl.load(inv + rows, mask=valid, other=0.0)[:, None]
    k = ((tl.sum(g1 * y1, axis=1) + tl.sum(g2 * y2, axis=1)) / (scale * 2 * HALF))[:, None]
    d1 = rs * (scale * g1 - y1 * k)
    d2 = rs * (scale * g2 - y2 * k)
    co, si = _cos_sin(cos, sin, t, c, m, HALF)
    dst = dx + rows[:, None] * (2 * HALF) + c
    tl.store(dst, (d1 * co - d2 * si).to(dx.dtype.element_ty), mask=m)
    tl.store(dst + HALF, (d1 * si + d2 * co).to(dx.dtype.element_ty), mask=m)


@triton.jit
def _tile_of(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a tile, grouped GROUP_M rows of tiles at a time so neighbours share B's columns."""
    per_group = GROUP_M * num_pid_n
    first_m = (tile_id // per_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % per_group) % size_m
    pid_n = (tile_id % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _relu2_epilogue(acc, aux, c_desc, off_m, off_n, GRAD: tl.constexpr):
    """Forward: relu(acc)^2. GRAD: acc * 2 relu(h), with relu(h) = sqrt(aux) from the forward's output."""
    if GRAD:
        out = acc * (2.0 * tl.sqrt(aux.to(tl.float32)))
    else:
        r = tl.maximum(acc, 0.0)
        out = r * r
    c_desc.store([off_m, off_n], out.to(c_desc.dtype))


@triton.jit
def relu2_matmul_kernel(a_desc, b_desc, c_desc, aux_desc, M, N, K,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                        NUM_SMS: tl.constexpr, B_KMAJOR: tl.constexpr, GRAD: tl.constexpr,
                        SUBTILE: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """C (M, N) = relu(A @ B)^2, or with GRAD (A @ B) * 2 sqrt(aux): the MLP's c_fc with its activation, and
    the activation's gradient fused into the GEMM that makes d relu^2. Persistent over output tiles, operands
    through TMA descriptors (A (M, K); B (N, K) when B_KMAJOR, else (K, N)); fp32 accumulation, one rounding
    to C's dtype. SUBTILE stores each tile as two halves of BN / 2 columns (less shared memory). aux is loaded
    after the K loop: issued before it, its registers live across the loop (measured 30x slower)."""
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=True,
                            warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_of(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BK])
            if B_KMAJOR:
                b = b_desc.load([off_n, ki * BK]).T
            else:
                b = b_desc.load([ki * BK, off_n])
            acc = tl.dot(a, b, acc)
        aux0 = 0.0  # GRAD only: the tile of aux (both halves with SUBTILE)
        aux1 = 0.0
        if GRAD:
            aux0 = aux_desc.load([off_m, off_n])
            if SUBTILE:
                aux1 = aux_desc.load([off_m, off_n + BN // 2])
        if SUBTILE:
            halves = tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1))
            acc0, acc1 = tl.split(halves)
            _relu2_epilogue(acc0, aux0, c_desc, off_m, off_n, GRAD)
            _relu2_epilogue(acc1, aux1, c_desc, off_m, off_n + BN // 2, GRAD)
        else:
            _relu2_epilogue(acc, aux0, c_desc, off_m, off_n, GRAD)


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    """tanh in fp32: the hardware's tanh.approx (one special-function op, ~2^-11 relative: below the bf16
    logits' own rounding), or where inline assembly cannot run (the interpreter) 1 - 2 / (e^2x + 1)."""
    if FAST:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 - 2.0 / (tl.exp2(x * 2.885390081777927) + 1.0)


@triton.jit
def _softcap_ce_grad(t, cols, target, lse2, k, valid):
    """d loss / d z = (softmax(s) - onehot(target)) * (1 - t^2) for s = cap * t, t = tanh(z / cap); k * t is
    s in base 2 and lse2 the row's log2-sum-exp2 of it. Zero outside valid (the vocabulary's padding)."""
    p = tl.exp2(k * t - lse2)
    d = (p - tl.where(cols == target, 1.0, 0.0)) * (1.0 - t * t)
    return tl.where(valid, d, 0.0)


@triton.jit
def softcap_ce_kernel(logits, targets, losses, n_valid, n_cols, inv_cap, k, BLOCK: tl.constexpr,
                      ONE_PASS: tl.constexpr, FAST_TANH: tl.constexpr):
    """One row of logits z (rows, n_cols) per program, s = cap * tanh(z / cap) over its first n_valid
    columns: losses[row] = logsumexp(s) - s[target], and the row is overwritten with d loss / d z (zero in
    the padding columns). k = cap * log2(e). |s| <= cap keeps every exp(s) finite in fp32, so the sum needs
    no running max. ONE_PASS (BLOCK >= n_cols): the row stays in registers, one read and one tanh per
    element; otherwise two reads (the second mostly from L2) and two tanh."""
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * n_cols
    target = tl.load(targets + row)
    cols = tl.arange(0, BLOCK)
    t_target = _tanh(tl.load(base + target).to(tl.float32) * inv_cap, FAST_TANH)
    if ONE_PASS:
        valid = cols < n_valid
        t = _tanh(tl.load(base + cols, mask=valid, other=0.0).to(tl.float32) * inv_cap, FAST_TANH)
        lse2 = tl.log2(tl.sum(tl.where(valid, tl.exp2(k * t), 0.0), axis=0))
        d = _softcap_ce_grad(t, cols, target, lse2, k, valid)
        tl.store(base + cols, d.to(logits.dtype.element_ty), mask=cols < n_cols)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_valid, BLOCK):
            valid = start + cols < n_valid
            t = _tanh(tl.load(base + start + cols, mask=valid, other=0.0).to(tl.float32) * inv_cap, FAST_TANH)
            acc += tl.where(valid, tl.exp2(k * t), 0.0)
        lse2 = tl.log2(tl.sum(acc, axis=0))
        for start in range(0, n_cols, BLOCK):
            valid = start + cols < n_valid
            t = _tanh(tl.load(base + start + cols, mask=valid, other=0.0).to(tl.float32) * inv_cap, FAST_TANH)
            d = _softcap_ce_grad(t, start + cols, target, lse2, k, valid)
            tl.store(base + start + cols, d.to(logits.dtype.element_ty), mask=start + cols < n_cols)
    tl.store(losses + row, (lse2 - k * t_target) * 0.6931471805599453)
