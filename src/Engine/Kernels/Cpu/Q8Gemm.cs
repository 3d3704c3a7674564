using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace LocalVllm.Engine.Kernels.Cpu;

/// <summary>
/// int8 weights (<see cref="Q8"/>) against int8 activations, as llama.cpp's Q8_0 x Q8_0: each input row is quantized
/// per group of 32 the way Q8_0 quantizes weights (scale = max|x| / 127, values rounded to nearest), and the products
/// are integer dot products (AVX-VNNI <c>vpdpbusd</c>: four u8 x s8 products added into each 32-bit lane, at twice
/// the float32 FMA's multiply-add rate on this machine), scaled per group by the two scales and summed in float32.
/// Batches (prefill chunks, batched decode) go through tiles (<see cref="Apply"/>); one or two decode rows through a
/// dot kernel (<see cref="Dot"/>) that gives each row the same bits as the tiles do.
/// <para>
/// Layout: a block of 8 input rows, one 32-bit lane each, holds 4 consecutive k of each row per 32-byte vector
/// (group g, quad t at byte (g * 8 + t) * 32 + row * 4). <c>vpdpbusd</c> takes its first operand unsigned, so each
/// broadcast weight quad is offset by 128 (XOR 0x80) and the offset's contribution, 128 x the group's sum of the row's
/// quantized inputs, is taken off per group: y = sum_g ws_g * xs_g * (acc_g - 128 * sum_g(qx)).
/// </para>
/// </summary>
internal static unsafe class Q8Gemm
{
    /// <summary>Input rows per block (the 32-bit lanes of a 256-bit vector).</summary>
    private const int BlockRows = 8;

    /// <summary>Weight rows per tile (see <see cref="Tile4x2"/>).</summary>
    private const int TileRows = 4;

    /// <summary>Input rows per panel: their packed form (k bytes each) stays in L2 while every weight tile passes over it.</summary>
    private const int PanelRows = 256;

    /// <summary>Whether this CPU runs the kernel (AVX-VNNI with AVX2 and FMA).</summary>
    public static bool Supported => AvxVnni.IsSupported && Avx2.IsSupported && Fma.IsSupported;

    /// <summary>y [m, n] = x [m, k] W^T for int8 W [n, k] with its group scales [n, k / 32]; k a multiple of 32.</summary>
    public static void Apply(float* x, sbyte* w, float* scales, float* y, int m, int k, int n)
    {
        if (!Supported) throw new PlatformNotSupportedException("The int8 x int8 kernel needs AVX-VNNI.");
        if (k % Q8.Group != 0) throw new ArgumentException($"Rows of {k} are not whole groups of {Q8.Group}.", nameof(k));
        int groups = k / Q8.Group, blocks = (m + BlockRows - 1) / BlockRows;
        sbyte* xq = (sbyte*)NativeMemory.AlignedAlloc((nuint)((long)blocks * BlockRows * k), 64);
        // Per block and group, 8 lanes: the rows' scales, then their offset corrections (scale * 128 * sum of values).
        float* xs = (float*)NativeMemory.AlignedAlloc((nuint)((long)blocks * groups * BlockRows * 2 * sizeof(float)), 64);
        float* xc = xs + (long)blocks * groups * BlockRows;
        try
        {
            int chunks = Math.Min(blocks, Environment.ProcessorCount * 4);
            CpuWorkers.Shared.For(chunks, c =>
            {
                for (int b = blocks * c / chunks, end = blocks * (c + 1) / chunks; b < end; b++)
                    for (int lane = 0; lane < BlockRows; lane++)
                    {
                        int r = b * BlockRows + lane;
                        Quantize(r < m ? x + (long)r * k : null, k, xq + (long)b * BlockRows * k + lane * 4,
                            xs + (long)b * groups * BlockRows + lane, xc + (long)b * groups * BlockRows + lane);
                    }
            });
            int panelBlocks = PanelRows / BlockRows;
            for (int b0 = 0; b0 < blocks; b0 += panelBlocks)
            {
                int b1 = Math.Min(blocks, b0 + panelBlocks);
                SmallBatchLinear.ParallelOver(n, TileRows, (from, to) => Range(xq, xs, xc, w, scales, y, m, k, n, groups, b0, b1, from, to));
            }
        }
        finally
        {
            NativeMemory.AlignedFree(xq);
            NativeMemory.AlignedFree(xs);
        }
    }

    /// <summary>
    /// One input row quantized per group into its lane of a packed block (<paramref name="dst"/> points at the lane's
    /// first quad); a padding row (<paramref name="src"/> null) is zeros with zero scales.
    /// </summary>
    private static void Quantize(float* src, int k, sbyte* dst, float* scale, float* correction)
    {
        sbyte* values = stackalloc sbyte[Q8.Group];
        for (int g = 0; g < k / Q8.Group; g++)
        {
            QuantizeGroup(src == null ? null : src + g * Q8.Group, values, out float d, out float c);
            sbyte* block = dst + (long)g * 8 * 32;
            for (int t = 0; t < 8; t++) *(int*)(block + t * 32) = *(int*)(values + t * 4);
            scale[(long)g * BlockRows] = d;
            correction[(long)g * BlockRows] = c;
        }
    }

    /// <summary>
    /// One group of 32 inputs as int8: scale d = max|x| / 127, values round(x / d) (to nearest even), and the offset
    /// correction d * 128 * (sum of the values) that <see cref="Scale"/> takes off. Zeros when <paramref name="src"/> is null.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void QuantizeGroup(float* src, sbyte* values, out float d, out float correction)
    {
        if (src == null)
        {
            *(Vector256<sbyte>*)values = default;
            d = 0;
            correction = 0;
            return;
        }
        var mx = Vector256.Max(Vector256.Max(Vector256.Abs(Vector256.Load(src)), Vector256.Abs(Vector256.Load(src + 8))),
            Vector256.Max(Vector256.Abs(Vector256.Load(src + 16)), Vector256.Abs(Vector256.Load(src + 24))));
        var h = Vector128.Max(mx.GetLower(), mx.GetUpper());
        float amax = MathF.Max(MathF.Max(h[0], h[1]), MathF.Max(h[2], h[3]));
        d = amax / 127f;
        var id = Vector256.Create(d != 0 ? 1f / d : 0f);
        int sum = 0;
        for (int i = 0; i < Q8.Group; i += 8)
        {
            var q = Avx.ConvertToVector256Int32(Vector256.Load(src + i) * id); // rounded to nearest even, within +-127
            sum += Vector256.Sum(q);
            for (int e = 0; e < 8; e++) values[i + e] = (sbyte)q[e];
        }
        correction = d * 128f * sum;
    }

    /// <summary>
    /// y [m, n] = x W^T for a few rows (decode): each row quantized exactly as <see cref="Apply"/> quantizes it, each
    /// weight row dotted with it group by group, and the groups' sums scaled and added in the same order with the same
    /// fused operations as the tiles, so that a row's outputs are the same bits whichever kernel a batch takes.
    /// </summary>
    public static void Dot(float* x, sbyte* w, float* scales, float* y, int m, int k, int n)
    {
        if (!Supported) throw new PlatformNotSupportedException("The int8 x int8 kernel needs AVX-VNNI.");
        if (k % Q8.Group != 0) throw new ArgumentException($"Rows of {k} are not whole groups of {Q8.Group}.", nameof(k));
        int groups = k / Q8.Group;
        sbyte* xq = (sbyte*)NativeMemory.AlignedAlloc((nuint)((long)m * k), 64);
        float* xs = (float*)NativeMemory.AlignedAlloc((nuint)((long)m * groups * 2 * sizeof(float)), 64);
        float* xc = xs + (long)m * groups;
        try
        {
            for (int r = 0; r < m; r++)
                for (int g = 0; g < groups; g++)
                    QuantizeGroup(x + (long)r * k + g * Q8.Group, xq + (long)r * k + g * Q8.Group, out xs[(long)r * groups + g], out xc[(long)r * groups + g]);
            SmallBatchLinear.ParallelOver(n, 4, (from, to) =>
            {
                for (int row = from; row < to; row++)
                {
                    sbyte* wr = w + (long)row * k, ahead = w + (long)Math.Min(row + 4, to - 1) * k;
                    for (int r = 0; r < m; r++)
                        y[(long)r * n + row] = DotRow(wr, scales + (long)row * groups, groups, xq + (long)r * k, xs + (long)r * groups, xc + (long)r * groups, ahead);
                }
            });
        }
        finally
        {
            NativeMemory.AlignedFree(xq);
            NativeMemory.AlignedFree(xs);
        }
    }

    /// <summary>One weight row against one quantized input row (values contiguous, per-group scales and corrections).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static float DotRow(sbyte* w, float* ws, int groups, sbyte* xq, float* xs, float* xc, sbyte* ahead)
    {
        var flip = Vector256.Create((byte)0x80);
        float o = 0;
        int g = 0;
        for (; g + 8 <= groups; g += 8)
        {
            sbyte* wg = w + g * Q8.Group, xg = xq + g * Q8.Group;
            Sse.Prefetch0(ahead + g * Q8.Group); Sse.Prefetch0(ahead + g * Q8.Group + 64);
            Sse.Prefetch0(ahead + g * Q8.Group + 128); Sse.Prefetch0(ahead + g * Q8.Group + 192);
            var a0 = AvxVnni.MultiplyWideningAndAdd(Vector256<int>.Zero, Vector256.Load((byte*)wg) ^ flip, Vector256.Load(xg));
            var a1 = AvxVnni.MultiplyWideningAndAdd(Vector256<int>.Zero, Vector256.Load((byte*)wg + 32) ^ flip, Vector256.Load(xg + 32));
            var a2 = AvxVnni.MultiplyWideningAndAdd(Vector256<int>.Zero, Vector256.Load((byte*)wg + 64) ^ flip, Vector256.Load(xg + 64));
            var a3 = AvxVnni.MultiplyWideningAndAdd(Vector256<int>.Zero, Vector256.Load((byte*)wg + 96) ^ flip, Vector256.Load(xg + 96));
            var a4 = AvxVnni.MultiplyWideningAndAdd(Vector256<int>.Zero, Vector256.Load((byte*)wg + 128) ^ flip, Vector256.Load(xg + 128));
            var a5 = AvxVnni.MultiplyWideningAndAdd(Vector256<int>.Zero, Vector256.Load((byte*)wg + 160) ^ flip, Vector256.Load(xg + 160));
            var a6 = AvxVnni.MultiplyWideningAndAdd(Vector256<int>.Zero, Vector256.Load((byte*)wg + 192) ^ flip, Vector256.Load(xg + 192));
            var a7 = AvxVnni.MultiplyWideningAndAdd(Vector256<int>.Zero, Vector256.Load((byte*)wg + 224) ^ flip, Vector256.Load(xg + 224));
            // The eight groups' sums, exact, in one vector: two levels of pairwise adds, then the 128-bit halves added.
            var h0 = Avx2.HorizontalAdd(Avx2.HorizontalAdd(a0, a1), Avx2.HorizontalAdd(a2, a3));
            var h1 = Avx2.HorizontalAdd(Avx2.HorizontalAdd(a4, a5), Avx2.HorizontalAdd(a6, a7));
            var sums = Vector256.Create(h0.GetLower() + h0.GetUpper(), h1.GetLower() + h1.GetUpper());
            var t = Fma.MultiplySubtract(Avx.ConvertToVector256Single(sums), Vector256.Load(xs + g), Vector256.Load(xc + g));
            for (int e = 0; e < 8; e++) o = MathF.FusedMultiplyAdd(t.GetElement(e), ws[g + e], o);
        }
        for (; g < groups; g++)
        {
            var a = AvxVnni.MultiplyWideningAndAdd(Vector256<int>.Zero, Vector256.Load((byte*)w + g * Q8.Group) ^ flip, Vector256.Load(xq + g * Q8.Group));
            float t = MathF.FusedMultiplyAdd(Vector256.Sum(a), xs[g], -xc[g]);
            o = MathF.FusedMultiplyAdd(t, ws[g], o);
        }
        return o;
    }

    private static void Range(sbyte* xq, float* xs, float* xc, sbyte* w, float* ws, float* y, int m, int k, int n, int groups,
        int b0, int b1, int from, int to)
    {
        float* outs = stackalloc float[2 * TileRows * BlockRows];
        int row = from;
        for (; row + TileRows <= to; row += TileRows)
        {
            sbyte* wr = w + (long)row * k;
            float* sr = ws + (long)row * groups;
            sbyte* next = row + 2 * TileRows <= to ? wr + (long)TileRows * k : wr;
            int b = b0;
            for (; b + 2 <= b1; b += 2)
            {
                Tile4x2(wr, k, sr, groups, xq + (long)b * BlockRows * k, xq + (long)(b + 1) * BlockRows * k,
                    xs + (long)b * groups * BlockRows, xc + (long)b * groups * BlockRows, outs, b == b0 ? next : wr);
                Store(outs, y, m, n, b, row);
                Store(outs + TileRows * BlockRows, y, m, n, b + 1, row);
            }
            if (b < b1)
            {
                Tile4x1(wr, k, sr, groups, xq + (long)b * BlockRows * k, xs + (long)b * groups * BlockRows, xc + (long)b * groups * BlockRows, outs, b == b0 ? next : wr);
                Store(outs, y, m, n, b, row);
            }
        }
        // Weight rows left over when n is not a multiple of 4: group by group, in the tiles' order and operations.
        for (; row < to; row++)
            for (int r = 0; r < m; r++)
            {
                int b = r / BlockRows, lane = r % BlockRows;
                float o = 0;
                for (int g = 0; g < groups; g++)
                {
                    int acc = 0;
                    sbyte* wg = w + (long)row * k + g * Q8.Group;
                    sbyte* xg = xq + (long)b * BlockRows * k + (long)g * 256 + lane * 4;
                    for (int t = 0; t < 8; t++)
                        for (int e = 0; e < 4; e++) acc += (wg[t * 4 + e] + 128) * xg[t * 32 + e];
                    long at = ((long)b * groups + g) * BlockRows + lane;
                    o = MathF.FusedMultiplyAdd(MathF.FusedMultiplyAdd(acc, xs[at], -xc[at]), ws[(long)row * groups + g], o);
                }
                y[(long)r * n + row] = o;
            }
    }

    /// <summary>outs[j * 8 + lane] (weight row j, input row block * 8 + lane) into y, for the block's real rows.</summary>
    private static void Store(float* outs, float* y, int m, int n, int block, int row)
    {
        int rows = Math.Min(BlockRows, m - block * BlockRows);
        for (int lane = 0; lane < rows; lane++)
        {
            float* d = y + (long)(block * BlockRows + lane) * n + row;
            for (int j = 0; j < TileRows; j++) d[j] = outs[j * BlockRows + lane];
        }
    }

    /// <summary>The weight quad at <paramref name="p"/> in all eight 32-bit lanes, offset by 128 to unsigned bytes.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<byte> Quad(sbyte* p, Vector256<byte> flip) => Vector256.Create(*(int*)p).AsByte() ^ flip;

    /// <summary>
    /// Four weight rows against two blocks of 8 input rows: eight integer accumulators per group, then scaled into
    /// outs[j * 8 + lane] (block a) and outs[32 + j * 8 + lane] (block b). Four rows, not eight: <c>vpdpbusd</c> has
    /// only a VEX encoding here, so its operands must sit in the first sixteen vector registers (with sixteen
    /// accumulators the JIT parked them in the upper ones and moved each in and out around every product).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Tile4x2(sbyte* w, long k, float* ws, int groups, sbyte* xa, sbyte* xb, float* sa, float* ca, float* outs, sbyte* next)
    {
        var flip = Vector256.Create((byte)0x80);
        long blockFloats = (long)groups * BlockRows;
        Vector256<float> oa0 = default, oa1 = default, oa2 = default, oa3 = default, ob0 = default, ob1 = default, ob2 = default, ob3 = default;
        sbyte* w0 = w, w1 = w + k, w2 = w + 2 * k, w3 = w + 3 * k;
        for (int g = 0; g < groups; g++)
        {
            Vector256<int> a0 = default, a1 = default, a2 = default, a3 = default, b0 = default, b1 = default, b2 = default, b3 = default;
            long o = (long)g * Q8.Group;
            Sse.Prefetch1(next + o); Sse.Prefetch1(next + k + o); Sse.Prefetch1(next + 2 * k + o); Sse.Prefetch1(next + 3 * k + o);
            sbyte* pa = xa + (long)g * 256, pb = xb + (long)g * 256;
            for (int t = 0; t < 8; t++)
            {
                var u = Vector256.Load(pa + t * 32);
                var v = Vector256.Load(pb + t * 32);
                long q = o + t * 4;
                var s = Quad(w0 + q, flip); a0 = AvxVnni.MultiplyWideningAndAdd(a0, s, u); b0 = AvxVnni.MultiplyWideningAndAdd(b0, s, v);
                s = Quad(w1 + q, flip); a1 = AvxVnni.MultiplyWideningAndAdd(a1, s, u); b1 = AvxVnni.MultiplyWideningAndAdd(b1, s, v);
                s = Quad(w2 + q, flip); a2 = AvxVnni.MultiplyWideningAndAdd(a2, s, u); b2 = AvxVnni.MultiplyWideningAndAdd(b2, s, v);
                s = Quad(w3 + q, flip); a3 = AvxVnni.MultiplyWideningAndAdd(a3, s, u); b3 = AvxVnni.MultiplyWideningAndAdd(b3, s, v);
            }
            var sA = Vector256.Load(sa + (long)g * BlockRows); var cA = Vector256.Load(ca + (long)g * BlockRows);
            var sB = Vector256.Load(sa + blockFloats + (long)g * BlockRows); var cB = Vector256.Load(ca + blockFloats + (long)g * BlockRows);
            oa0 = Scale(a0, sA, cA, ws[g], oa0); ob0 = Scale(b0, sB, cB, ws[g], ob0);
            oa1 = Scale(a1, sA, cA, ws[groups + g], oa1); ob1 = Scale(b1, sB, cB, ws[groups + g], ob1);
            oa2 = Scale(a2, sA, cA, ws[2 * groups + g], oa2); ob2 = Scale(b2, sB, cB, ws[2 * groups + g], ob2);
            oa3 = Scale(a3, sA, cA, ws[3 * groups + g], oa3); ob3 = Scale(b3, sB, cB, ws[3 * groups + g], ob3);
        }
        oa0.Store(outs); oa1.Store(outs + 8); oa2.Store(outs + 16); oa3.Store(outs + 24);
        ob0.Store(outs + 32); ob1.Store(outs + 40); ob2.Store(outs + 48); ob3.Store(outs + 56);
    }

    /// <summary><see cref="Tile4x2"/> for one block.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Tile4x1(sbyte* w, long k, float* ws, int groups, sbyte* xa, float* sa, float* ca, float* outs, sbyte* next)
    {
        var flip = Vector256.Create((byte)0x80);
        Vector256<float> oa0 = default, oa1 = default, oa2 = default, oa3 = default;
        sbyte* w0 = w, w1 = w + k, w2 = w + 2 * k, w3 = w + 3 * k;
        for (int g = 0; g < groups; g++)
        {
            Vector256<int> a0 = default, a1 = default, a2 = default, a3 = default;
            long o = (long)g * Q8.Group;
            Sse.Prefetch1(next + o); Sse.Prefetch1(next + k + o); Sse.Prefetch1(next + 2 * k + o); Sse.Prefetch1(next + 3 * k + o);
            sbyte* pa = xa + (long)g * 256;
            for (int t = 0; t < 8; t++)
            {
                var u = Vector256.Load(pa + t * 32);
                long q = o + t * 4;
                a0 = AvxVnni.MultiplyWideningAndAdd(a0, Quad(w0 + q, flip), u);
                a1 = AvxVnni.MultiplyWideningAndAdd(a1, Quad(w1 + q, flip), u);
                a2 = AvxVnni.MultiplyWideningAndAdd(a2, Quad(w2 + q, flip), u);
                a3 = AvxVnni.MultiplyWideningAndAdd(a3, Quad(w3 + q, flip), u);
            }
            var sA = Vector256.Load(sa + (long)g * BlockRows); var cA = Vector256.Load(ca + (long)g * BlockRows);
            oa0 = Scale(a0, sA, cA, ws[g], oa0); oa1 = Scale(a1, sA, cA, ws[groups + g], oa1);
            oa2 = Scale(a2, sA, cA, ws[2 * groups + g], oa2); oa3 = Scale(a3, sA, cA, ws[3 * groups + g], oa3);
        }
        oa0.Store(outs); oa1.Store(outs + 8); oa2.Store(outs + 16); oa3.Store(outs + 24);
    }

    /// <summary>o + ws * (acc * xs - corrections): one group's integer sums of a weight row, scaled and offset-corrected.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> Scale(Vector256<int> acc, Vector256<float> xs, Vector256<float> corrections, float ws, Vector256<float> o) =>
        Fma.MultiplyAdd(Fma.MultiplySubtract(Avx.ConvertToVector256Single(acc), xs, corrections), Vector256.Create(ws), o);
}
