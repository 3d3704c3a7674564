using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Kernels.Cpu;

/// <summary>
/// bfloat16 matrices stored in panels for the AVX-512 kernel that serves every row count: 32 output features
/// (weight rows) per panel, and within it, for each pair of inputs (k, k + 1), the 32 rows' pairs side by side
/// ([n / 32][k / 2][32][2], the same bytes as [n, k]). One 64-byte load then holds 16 rows' pair: a shift gives their
/// weights at k as float32 (exact), an AND those at k + 1, and each is multiplied into input rows broadcast one
/// element at a time, with the output features along the lanes. So a panel is one contiguous stream from memory,
/// the products need no horizontal sums and no transposed write-back, and a pass of 8 input rows has 16 independent
/// accumulators. Rows are taken 8, 4, 2 and 1 at a time by tiles that all add a row's terms in the same order (k
/// ascending, one accumulator per 16 features), so a row gets the same bits alone or in any batch.
/// Measured against the row-major kernels (`micro --part formats`, docs/benchmarks.md): 2-16 rows of Qwen3-0.6B's
/// layers 1.3-1.6x faster, one row the same, 32-256 rows 1.1-1.15x.
/// </summary>
internal static unsafe class Bf16Panels
{
    /// <summary>Output features per panel.</summary>
    public const int Width = 32;

    /// <summary>Input rows packed and run per pass over the panels (a 256-row pack of 3,072 inputs is 3 MB).</summary>
    private const int ChunkRows = 256;

    /// <summary>
    /// How far ahead (in 32-bit pairs, 4 bytes each: 16 KB) the one- and two-row tiles request the panel stream, which
    /// they read from memory at its full rate: without it single-row decode ran 20-25 % slower than the row-major kernel,
    /// which requests rows ahead (qwen3-single 29-31 tok/s against 32-39; 1,024 and 2,048 ahead gave 31-33, 4,096 39).
    /// The 4- and 8-row tiles, compute-bound, do not request ahead within their panel (every pass doing so took 128-row
    /// prefill from about 300 tok/s to 180); their last pass requests the next panel instead (<see cref="Chunk"/>). Past
    /// the end of the matrix the hint is harmless: a prefetch never faults.
    /// </summary>
    private const int FetchAhead = 4096;

    /// <summary>Whether this CPU runs the panel kernel (AVX-512, as the broadcast kernel).</summary>
    public static bool Supported => SmallBatchLinear.BroadcastSupported;

    /// <summary>Whether a [<paramref name="n"/>, <paramref name="k"/>] matrix can be stored in panels.</summary>
    public static bool Fits(long n, long k) => n > 0 && n % Width == 0 && k > 0 && k % 2 == 0;

    /// <summary>A row-major bfloat16 [n, k] matrix rearranged into panels (a new tensor of the same shape).</summary>
    public static Tensor Pack(Tensor rowMajor)
    {
        var panels = rowMajor.contiguous().clone();
        PackInPlace(panels);
        return panels;
    }

    /// <summary>
    /// Rearranges a contiguous row-major bfloat16 [n, k] CPU matrix into panels where it lies: a panel occupies exactly
    /// the bytes of its 32 rows, so each is copied out and written back transposed, one panel's copy at a time. A
    /// whole second matrix would stay resident after load: the engine keeps freed heap memory (glibc trimming off).
    /// </summary>
    public static void PackInPlace(Tensor matrix)
    {
        long n = matrix.shape[0], k = matrix.shape[1];
        if (!matrix.is_contiguous() || matrix.dtype != ScalarType.BFloat16 || !Fits(n, k))
            throw new ArgumentException($"Panels take a contiguous bfloat16 matrix with a multiple of {Width} rows and an even row length, not {matrix.dtype} [{n}, {k}].", nameof(matrix));
        uint* m = (uint*)Simd.Bf16Pointer(matrix);
        long pairs = k / 2;
        SmallBatchLinear.ParallelOver((int)(n / Width), 1, (from, to) =>
        {
            uint* rows = (uint*)System.Runtime.InteropServices.NativeMemory.Alloc((nuint)(Width * pairs * sizeof(uint)));
            try
            {
                for (long b = from; b < to; b++)
                {
                    uint* panel = m + b * Width * pairs;
                    Buffer.MemoryCopy(panel, rows, Width * pairs * sizeof(uint), Width * pairs * sizeof(uint));
                    for (long pair = 0; pair < pairs; pair++)
                        for (int r = 0; r < Width; r++) panel[pair * Width + r] = rows[r * pairs + pair];
                }
            }
            finally
            {
                System.Runtime.InteropServices.NativeMemory.Free(rows);
            }
        });
    }

    /// <summary>The row-major matrix back from its panels (tests).</summary>
    public static Tensor Unpack(Tensor panels)
    {
        long n = panels.shape[0], k = panels.shape[1];
        using var v = panels.view(n / Width, k / 2, Width, 2);
        using var p = v.permute(0, 2, 1, 3);
        using var c = p.contiguous();
        return c.view(n, k);
    }

    /// <summary>Rows <paramref name="ids"/> (int64) of a panelled matrix, widened to float32 [ids, k].</summary>
    public static Tensor Rows(Tensor panels, Tensor ids)
    {
        long n = panels.shape[0], k = panels.shape[1];
        using var idc = ids.contiguous();
        var list = idc.data<long>();
        var y = empty([list.Count, k], ScalarType.Float32);
        ushort* p = Simd.Bf16Pointer(panels);
        float* yp = Simd.Pointer(y);
        for (int t = 0; t < (int)list.Count; t++)
        {
            long id = list[t];
            if ((ulong)id >= (ulong)n) throw new ArgumentOutOfRangeException(nameof(ids), id, $"Row {id} is outside the matrix's {n} rows.");
            ushort* src = p + id / Width * Width * k + id % Width * 2;
            float* dst = yp + t * k;
            for (long pair = 0; pair < k / 2; pair++, src += 2 * Width)
            {
                dst[2 * pair] = Bf16.ToSingle(src[0]);
                dst[2 * pair + 1] = Bf16.ToSingle(src[1]);
            }
        }
        return y;
    }

    /// <summary>y = x W^T for float32 <paramref name="x"/> [m, k] and a panelled bfloat16 W [n, k]: float32 [m, n].</summary>
    public static Tensor Apply(Tensor x, Tensor panels)
    {
        int m = (int)x.shape[0], k = (int)x.shape[1], n = (int)panels.shape[0];
        using var xc = x.contiguous();
        var y = empty([m, n], ScalarType.Float32);
        if (m == 0) return y;
        float* xp = Simd.Pointer(xc), yp = Simd.Pointer(y);
        uint* wp = (uint*)Simd.Bf16Pointer(panels);
        int eights = Math.Min(m, ChunkRows) / 8;
        float* packed = (float*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)((long)(eights * 8 + 4) * k * sizeof(float)), 64);
        try
        {
            for (int r0 = 0; r0 < m; r0 += ChunkRows)
                Chunk(xp + (long)r0 * k, wp, yp + (long)r0 * n, Math.Min(ChunkRows, m - r0), k, n, packed);
        }
        finally
        {
            System.Runtime.InteropServices.NativeMemory.AlignedFree(packed);
        }
        return y;
    }

    /// <summary>
    /// Up to <see cref="ChunkRows"/> rows: groups of 8 and one of 4 packed [k][rows] (so each broadcast reads the next
    /// element: rows k floats apart would share one cache set), 2 and 1 read in place; then every panel against them.
    /// </summary>
    private static void Chunk(float* x, uint* w, float* y, int m, int k, int n, float* packed)
    {
        int eights = m / 8, fours = (m % 8) / 4, tail = m - eights * 8 - fours * 4;
        if (eights > 1 && (long)m * k >= 1 << 16)
            SmallBatchLinear.ParallelOver(eights, 1, (from, to) => { for (int g = from; g < to; g++) PackRows(x + (long)g * 8 * k, k, 8, packed + (long)g * 8 * k); });
        else
            for (int g = 0; g < eights; g++) PackRows(x + (long)g * 8 * k, k, 8, packed + (long)g * 8 * k);
        if (fours == 1) PackRows(x + (long)eights * 8 * k, k, 4, packed + (long)eights * 8 * k);
        SmallBatchLinear.ParallelOver(n / Width, 1, (from, to) =>
        {
            for (int b = from; b < to; b++)
            {
                uint* p = w + (long)b * Width / 2 * k;
                float* yb = y + b * Width;
                // The last 8- or 4-row pass over this panel requests the next one (the range's last panel, itself) into L2
                // while it computes from cache; earlier passes request their own lines, already there. 16 rows of
                // Qwen3-0.6B's 28 layers: 36.6-38.6 ms against 42.3-46.6 without (`micro --part formats`, alternating).
                uint* next = b + 1 < to ? p + (long)Width / 2 * k : p;
                int lastGroup = fours == 1 ? eights : eights - 1;
                for (int g = 0; g < eights; g++) Tile8(p, packed + (long)g * 8 * k, k, yb + (long)g * 8 * n, n, g == lastGroup ? next : p);
                int r = eights * 8;
                if (fours == 1) { Tile4(p, packed + (long)r * k, k, yb + (long)r * n, n, next); r += 4; }
                if (tail >= 2) { Tile2(p, x + (long)r * k, k, yb + (long)r * n, n, k); r += 2; }
                if ((tail & 1) == 1) Tile1(p, x + (long)r * k, k, yb + (long)r * n);
            }
        });
    }

    /// <summary>dst[i * rows + r] = x[r * k + i] for <paramref name="rows"/> (4 or 8) rows: 8 x 8 blocks through registers.</summary>
    private static void PackRows(float* x, int k, int rows, float* dst)
    {
        int i = 0;
        if (rows == 8)
            for (; i + 8 <= k; i += 8) Simd.Transpose8x8(x + i, k, dst + (long)i * 8, 8);
        for (; i < k; i++)
            for (int r = 0; r < rows; r++) dst[(long)i * rows + r] = x[(long)r * k + i];
    }

    /// <summary>8 input rows ([k][8] packed) against one panel: output features along the lanes, 16 accumulators.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Tile8(uint* p, float* x, int k, float* y, long n, uint* next)
    {
        var mask = Vector512.Create(0xFFFF0000u);
        Vector512<float> a0 = default, c0 = default, a1 = default, c1 = default, a2 = default, c2 = default, a3 = default, c3 = default, a4 = default, c4 = default, a5 = default, c5 = default, a6 = default, c6 = default, a7 = default, c7 = default;
        // The pointers move with the loop: indexed operands made the JIT compute every address separately.
        for (uint* end = p + (long)k * 16; p < end; p += 32, x += 16, next += 32)
        {
            Sse.Prefetch1(next); Sse.Prefetch1(next + 16);
            var v0 = Vector512.Load(p); var v1 = Vector512.Load(p + 16);
            var e0 = Avx512F.ShiftLeftLogical(v0, 16).AsSingle(); var e1 = Avx512F.ShiftLeftLogical(v1, 16).AsSingle();
            Vector512<float> s;
            s = Vector512.Create(x[0]); a0 = Avx512F.FusedMultiplyAdd(e0, s, a0); c0 = Avx512F.FusedMultiplyAdd(e1, s, c0);
            s = Vector512.Create(x[1]); a1 = Avx512F.FusedMultiplyAdd(e0, s, a1); c1 = Avx512F.FusedMultiplyAdd(e1, s, c1);
            s = Vector512.Create(x[2]); a2 = Avx512F.FusedMultiplyAdd(e0, s, a2); c2 = Avx512F.FusedMultiplyAdd(e1, s, c2);
            s = Vector512.Create(x[3]); a3 = Avx512F.FusedMultiplyAdd(e0, s, a3); c3 = Avx512F.FusedMultiplyAdd(e1, s, c3);
            s = Vector512.Create(x[4]); a4 = Avx512F.FusedMultiplyAdd(e0, s, a4); c4 = Avx512F.FusedMultiplyAdd(e1, s, c4);
            s = Vector512.Create(x[5]); a5 = Avx512F.FusedMultiplyAdd(e0, s, a5); c5 = Avx512F.FusedMultiplyAdd(e1, s, c5);
            s = Vector512.Create(x[6]); a6 = Avx512F.FusedMultiplyAdd(e0, s, a6); c6 = Avx512F.FusedMultiplyAdd(e1, s, c6);
            s = Vector512.Create(x[7]); a7 = Avx512F.FusedMultiplyAdd(e0, s, a7); c7 = Avx512F.FusedMultiplyAdd(e1, s, c7);
            e0 = Avx512F.And(v0, mask).AsSingle(); e1 = Avx512F.And(v1, mask).AsSingle();
            s = Vector512.Create(x[8]); a0 = Avx512F.FusedMultiplyAdd(e0, s, a0); c0 = Avx512F.FusedMultiplyAdd(e1, s, c0);
            s = Vector512.Create(x[9]); a1 = Avx512F.FusedMultiplyAdd(e0, s, a1); c1 = Avx512F.FusedMultiplyAdd(e1, s, c1);
            s = Vector512.Create(x[10]); a2 = Avx512F.FusedMultiplyAdd(e0, s, a2); c2 = Avx512F.FusedMultiplyAdd(e1, s, c2);
            s = Vector512.Create(x[11]); a3 = Avx512F.FusedMultiplyAdd(e0, s, a3); c3 = Avx512F.FusedMultiplyAdd(e1, s, c3);
            s = Vector512.Create(x[12]); a4 = Avx512F.FusedMultiplyAdd(e0, s, a4); c4 = Avx512F.FusedMultiplyAdd(e1, s, c4);
            s = Vector512.Create(x[13]); a5 = Avx512F.FusedMultiplyAdd(e0, s, a5); c5 = Avx512F.FusedMultiplyAdd(e1, s, c5);
            s = Vector512.Create(x[14]); a6 = Avx512F.FusedMultiplyAdd(e0, s, a6); c6 = Avx512F.FusedMultiplyAdd(e1, s, c6);
            s = Vector512.Create(x[15]); a7 = Avx512F.FusedMultiplyAdd(e0, s, a7); c7 = Avx512F.FusedMultiplyAdd(e1, s, c7);
        }
        a0.Store(y); c0.Store(y + 16);
        a1.Store(y + n); c1.Store(y + n + 16);
        a2.Store(y + 2 * n); c2.Store(y + 2 * n + 16);
        a3.Store(y + 3 * n); c3.Store(y + 3 * n + 16);
        a4.Store(y + 4 * n); c4.Store(y + 4 * n + 16);
        a5.Store(y + 5 * n); c5.Store(y + 5 * n + 16);
        a6.Store(y + 6 * n); c6.Store(y + 6 * n + 16);
        a7.Store(y + 7 * n); c7.Store(y + 7 * n + 16);
    }

    /// <summary>4 input rows ([k][4] packed) against one panel: output features along the lanes, 8 accumulators.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Tile4(uint* p, float* x, int k, float* y, long n, uint* next)
    {
        var mask = Vector512.Create(0xFFFF0000u);
        Vector512<float> a0 = default, c0 = default, a1 = default, c1 = default, a2 = default, c2 = default, a3 = default, c3 = default;
        // The pointers move with the loop: indexed operands made the JIT compute every address separately.
        for (uint* end = p + (long)k * 16; p < end; p += 32, x += 8, next += 32)
        {
            Sse.Prefetch1(next); Sse.Prefetch1(next + 16);
            var v0 = Vector512.Load(p); var v1 = Vector512.Load(p + 16);
            var e0 = Avx512F.ShiftLeftLogical(v0, 16).AsSingle(); var e1 = Avx512F.ShiftLeftLogical(v1, 16).AsSingle();
            Vector512<float> s;
            s = Vector512.Create(x[0]); a0 = Avx512F.FusedMultiplyAdd(e0, s, a0); c0 = Avx512F.FusedMultiplyAdd(e1, s, c0);
            s = Vector512.Create(x[1]); a1 = Avx512F.FusedMultiplyAdd(e0, s, a1); c1 = Avx512F.FusedMultiplyAdd(e1, s, c1);
            s = Vector512.Create(x[2]); a2 = Avx512F.FusedMultiplyAdd(e0, s, a2); c2 = Avx512F.FusedMultiplyAdd(e1, s, c2);
            s = Vector512.Create(x[3]); a3 = Avx512F.FusedMultiplyAdd(e0, s, a3); c3 = Avx512F.FusedMultiplyAdd(e1, s, c3);
            e0 = Avx512F.And(v0, mask).AsSingle(); e1 = Avx512F.And(v1, mask).AsSingle();
            s = Vector512.Create(x[4]); a0 = Avx512F.FusedMultiplyAdd(e0, s, a0); c0 = Avx512F.FusedMultiplyAdd(e1, s, c0);
            s = Vector512.Create(x[5]); a1 = Avx512F.FusedMultiplyAdd(e0, s, a1); c1 = Avx512F.FusedMultiplyAdd(e1, s, c1);
            s = Vector512.Create(x[6]); a2 = Avx512F.FusedMultiplyAdd(e0, s, a2); c2 = Avx512F.FusedMultiplyAdd(e1, s, c2);
            s = Vector512.Create(x[7]); a3 = Avx512F.FusedMultiplyAdd(e0, s, a3); c3 = Avx512F.FusedMultiplyAdd(e1, s, c3);
        }
        a0.Store(y); c0.Store(y + 16);
        a1.Store(y + n); c1.Store(y + n + 16);
        a2.Store(y + 2 * n); c2.Store(y + 2 * n + 16);
        a3.Store(y + 3 * n); c3.Store(y + 3 * n + 16);
    }

    /// <summary>Two input rows read in place (<paramref name="xs"/> apart) against one panel: four accumulators.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Tile2(uint* p, float* x, int k, float* y, long n, long xs)
    {
        var mask = Vector512.Create(0xFFFF0000u);
        Vector512<float> a0 = default, c0 = default, a1 = default, c1 = default;
        float* x1 = x + xs;
        for (uint* end = p + (long)k * 16; p < end; p += 32, x += 2, x1 += 2)
        {
            Sse.Prefetch0(p + FetchAhead); Sse.Prefetch0(p + FetchAhead + 16);
            var v0 = Vector512.Load(p); var v1 = Vector512.Load(p + 16);
            var e0 = Avx512F.ShiftLeftLogical(v0, 16).AsSingle(); var e1 = Avx512F.ShiftLeftLogical(v1, 16).AsSingle();
            var s = Vector512.Create(x[0]); a0 = Avx512F.FusedMultiplyAdd(e0, s, a0); c0 = Avx512F.FusedMultiplyAdd(e1, s, c0);
            s = Vector512.Create(x1[0]); a1 = Avx512F.FusedMultiplyAdd(e0, s, a1); c1 = Avx512F.FusedMultiplyAdd(e1, s, c1);
            e0 = Avx512F.And(v0, mask).AsSingle(); e1 = Avx512F.And(v1, mask).AsSingle();
            s = Vector512.Create(x[1]); a0 = Avx512F.FusedMultiplyAdd(e0, s, a0); c0 = Avx512F.FusedMultiplyAdd(e1, s, c0);
            s = Vector512.Create(x1[1]); a1 = Avx512F.FusedMultiplyAdd(e0, s, a1); c1 = Avx512F.FusedMultiplyAdd(e1, s, c1);
        }
        a0.Store(y); c0.Store(y + 16); a1.Store(y + n); c1.Store(y + n + 16);
    }

    /// <summary>1 input row (in place) against one panel: output features along the lanes, 2 accumulators.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Tile1(uint* p, float* x, int k, float* y)
    {
        var mask = Vector512.Create(0xFFFF0000u);
        Vector512<float> a0 = default, c0 = default;
        // The pointers move with the loop: indexed operands made the JIT compute every address separately.
        for (uint* end = p + (long)k * 16; p < end; p += 32, x += 2)
        {
            Sse.Prefetch0(p + FetchAhead); Sse.Prefetch0(p + FetchAhead + 16);
            var v0 = Vector512.Load(p); var v1 = Vector512.Load(p + 16);
            var e0 = Avx512F.ShiftLeftLogical(v0, 16).AsSingle(); var e1 = Avx512F.ShiftLeftLogical(v1, 16).AsSingle();
            Vector512<float> s;
            s = Vector512.Create(x[0]); a0 = Avx512F.FusedMultiplyAdd(e0, s, a0); c0 = Avx512F.FusedMultiplyAdd(e1, s, c0);
            e0 = Avx512F.And(v0, mask).AsSingle(); e1 = Avx512F.And(v1, mask).AsSingle();
            s = Vector512.Create(x[1]); a0 = Avx512F.FusedMultiplyAdd(e0, s, a0); c0 = Avx512F.FusedMultiplyAdd(e1, s, c0);
        }
        a0.Store(y); c0.Store(y + 16);
    }
}
