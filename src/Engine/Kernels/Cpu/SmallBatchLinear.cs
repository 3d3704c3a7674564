using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LocalVllm.Engine.Kernels.Cpu;

/// <summary>
/// <c>y = x W^T + b</c> on the CPU in float32 (up to <see cref="MaxRows"/> rows),
/// reading the weight in its checkpoint layout [out, in] once per call. Two kernels, chosen by row count:
/// <list type="bullet">
/// <item>up to <see cref="DotRowsMax"/> rows (single-stream decode, memory-bound): dot products in 3x3 register tiles,
/// three weight rows streamed at once against three input rows;</item>
/// <item>more rows, on CPUs with AVX-512 (compute-bound): the input is packed transposed into blocks of 16 or 32 rows
/// ([k][rows], zero-padded), and each weight element is broadcast once and multiplied into a whole block of rows held
/// in one or two 512-bit registers, eight weight rows at a time (8 or 16 accumulators): each weight element feeds
/// 16 or 32 multiply-adds from a register, with no horizontal sums. Up to 12 rows, a block holds 4 consecutive k of
/// each of 4 rows (two or three such blocks for 5-12 rows, all fed by each weight quad), so that the 16 lanes are not
/// mostly padding; when k is not a multiple of 4, pairs of k up to 8 rows.</item>
/// </list>
/// Measured against libtorch's linear in `eng/bench micro` (2 threads): see docs/benchmarks.md. Without AVX-512 the
/// dot kernel serves up to <see cref="DotRowsMaxWithoutAvx512"/> rows and libtorch the rest. int8 weights on a CPU
/// with AVX-VNNI go to <see cref="Q8Gemm"/> instead (inputs quantized too, integer products).
/// </summary>
internal static unsafe class SmallBatchLinear
{
    /// <summary>
    /// Rows up to which this class computes the product itself (libtorch's GEMM above). With AVX-512, every row count:
    /// the broadcast kernel runs 1.8x libtorch's linear on 512-8,192-row prefill chunks of Qwen3-0.6B's layers and
    /// 3x at 256 rows (`eng/bench micro`, docs/benchmarks.md), once its tiles are written back through a register
    /// transpose (<see cref="Scatter"/>); before that, long chunks were 2-7 % slower than libtorch and stayed with it.
    /// </summary>
    public static int MaxRows => BroadcastSupported ? int.MaxValue : DotRowsMaxWithoutAvx512;

    /// <summary>Rows up to which the dot kernel is used when the broadcast kernel is available (memory-bound there).</summary>
    public const int DotRowsMax = 2;

    /// <summary>
    /// Rows up to which an int8 weight goes through the dot kernel even with AVX-512: it dequantizes in registers,
    /// where the broadcast kernel dequantizes each tile into a scratch first; 3-4 rows of Qwen3-0.6B's layers took
    /// 21-30 ms against 36-42 through the broadcast kernel, 8 rows 57-83 against 51-59 (`micro --part formats`).
    /// </summary>
    public const int Int8DotRowsMax = 4;

    /// <summary>
    /// Rows up to which int8 weights with quantized inputs take <see cref="Q8Gemm.Dot"/>, its tiles above: at 3-4 rows
    /// the tiles (one half-empty block) took 22-24 ms for Qwen3-0.6B's 28 layers against 26-55 ms for the dot kernel,
    /// which reduces every group of every row on its own (`micro --part formats`).
    /// </summary>
    internal const int IntegerDotRowsMax = 2;

    /// <summary>Rows up to which the dot kernel is used on CPUs without AVX-512.</summary>
    public const int DotRowsMaxWithoutAvx512 = 32;

    /// <summary>Input rows per pass of the broadcast kernel (256 x 3,072 floats packed: 3 MB, within L3).</summary>
    private const int PanelRows = 256;

    /// <summary>Weight rows per broadcast tile.</summary>
    private const int TileRows = 8;

    /// <summary>Which kernel computes the product (tests and benchmarks pin one; the engine uses <see cref="Kernel.Auto"/>).</summary>
    public enum Kernel { Auto, Dot, Broadcast, Integer, IntegerDot }

    /// <summary>
    /// Whether int8 weights quantize the activations and take the integer kernels (<see cref="Q8Gemm"/>: its dot
    /// kernel up to <see cref="IntegerDotRowsMax"/> rows, its tiles above) where the CPU has AVX-VNNI. The environment
    /// variable LOCALVLLM_INT8_FLOAT_INPUTS=1 keeps float32 inputs instead (for measuring one against the other).
    /// </summary>
    internal static bool IntegerActivations = Environment.GetEnvironmentVariable("LOCALVLLM_INT8_FLOAT_INPUTS") != "1";

    /// <summary>
    /// Prefetches the cache line at <paramref name="p"/> into L2 (a hint: it never faults). The broadcast kernels fetch
    /// the next tile's weight rows this way while they compute the current tile (two cache lines per 32 weights
    /// consumed, one tile ahead): the hardware prefetcher picks up each of a tile's eight row streams only after it has
    /// started, so without it every tile began with cold misses, and 6-16-row products took about memory time plus FMA
    /// time instead of overlapping the two (docs/benchmarks.md). Unconditional on purpose: a branch in these loops makes
    /// the JIT keep the accumulators on the stack.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Fetch(float* p) => Sse.Prefetch1(p);

    /// <summary>Whether this CPU runs the broadcast kernel.</summary>
    public static bool BroadcastSupported => Vector512.IsHardwareAccelerated && Avx512F.IsSupported;

    /// <summary>
    /// y = x W^T + b; for an int8 <paramref name="weight"/>, <paramref name="scales"/> are its float32 scales [n, k / 32] (<see cref="Q8"/>),
    /// and the automatic choice quantizes the inputs (<see cref="Q8Gemm"/>) unless <paramref name="quantizeInputs"/> is false.
    /// </summary>
    public static Tensor Apply(Tensor x, Tensor weight, Tensor? bias, Kernel kernel = Kernel.Auto, Tensor? scales = null, bool quantizeInputs = true)
    {
        if (kernel == Kernel.Broadcast && !BroadcastSupported)
            throw new PlatformNotSupportedException("The broadcast kernel needs AVX-512.");
        bool bf16 = weight.dtype == ScalarType.BFloat16, q8 = weight.dtype == ScalarType.Int8;
        if (q8 && (scales is null || x.dtype != ScalarType.Float32 || x.device_type != TorchSharp.DeviceType.CPU))
            throw new ArgumentException("An int8 weight needs its scales and float32 CPU input.", nameof(scales));
        if (x.dtype != ScalarType.Float32 || !(bf16 || q8 || weight.dtype == ScalarType.Float32)
            || x.device_type != TorchSharp.DeviceType.CPU || !weight.is_contiguous())
            return F.linear(x, weight, bias);
        bool integer = kernel is Kernel.Integer or Kernel.IntegerDot || (kernel == Kernel.Auto && q8 && quantizeInputs && IntegerActivations && Q8Gemm.Supported);
        if (integer && (!q8 || !Q8Gemm.Supported))
            throw new PlatformNotSupportedException("The integer kernels need int8 weights and AVX-VNNI.");
        if (kernel == Kernel.Auto && !integer && x.shape[0] > MaxRows)
            return bf16 || q8 ? LinearByWidenedTiles(x, weight, scales, bias) : F.linear(x, weight, bias);
        int m = (int)x.shape[0], k = (int)x.shape[1], n = (int)weight.shape[0];
        using var xc = x.contiguous();
        var y = empty([m, n], ScalarType.Float32);
        if (m == 0) return y; // a step whose chunk needs no logits: nothing to compute (and no rows to write)
        float* xp = Simd.Pointer(xc), yp = Simd.Pointer(y);
        var w = q8 ? new WeightRows(null, null, (sbyte*)Simd.Pointer(weight), Simd.Pointer(scales!), k)
            : bf16 ? new WeightRows(null, Simd.Bf16Pointer(weight), null, null, k)
            : new WeightRows(Simd.Pointer(weight), null, null, null, k);
        if (integer && (kernel == Kernel.IntegerDot || (kernel == Kernel.Auto && m <= IntegerDotRowsMax)))
            Q8Gemm.Dot(xp, w.Q8Rows, w.Q8Scales, yp, m, k, n);
        else if (integer)
            Q8Gemm.Apply(xp, w.Q8Rows, w.Q8Scales, yp, m, k, n);
        else if (kernel == Kernel.Dot || (kernel == Kernel.Auto && (m <= (q8 ? Int8DotRowsMax : DotRowsMax) || !BroadcastSupported)))
            Dot(xp, w, yp, m, k, n);
        else
        {
            // Long prefill chunks go through in panels of rows whose packed copy stays in cache while every weight
            // tile passes over it (one pass over 8,192 rows would stream the whole packed input from memory per tile).
            for (int r0 = 0; r0 < m; r0 += PanelRows)
            {
                int rows = Math.Min(PanelRows, m - r0);
                Broadcast(xp + (long)r0 * k, w, yp + (long)r0 * n, rows, k, n);
            }
        }
        if (bias is not null) HeldScalars.AddInPlace(y, bias);
        return y;
    }

    /// <summary>
    /// How far ahead (in weight rows) the single-row bf16 dot kernel prefetches: each thread walks its rows in order,
    /// and without the hint every row began with cold misses (qwen3-single decode: 30-33 tok/s with 0-3 rows ahead or
    /// 8, up to 43 with 4 in the same quiet period; docs/benchmarks.md).
    /// </summary>
    private const int PrefetchRowsAhead = 4;

    /// <summary>Output features per libtorch product when a bfloat16 or int8 weight meets more rows than the kernels take.</summary>
    private const int WidenedTileRows = 256;

    /// <summary>
    /// A bfloat16 or int8 weight against more rows than <see cref="MaxRows"/> (any batch above 32 rows without AVX-512): libtorch's float32 GEMM over <see cref="WidenedTileRows"/> output features at a time, each
    /// tile of the weight widened (exact) or dequantized just before its product, so the whole matrix is never converted.
    /// </summary>
    private static Tensor LinearByWidenedTiles(Tensor x, Tensor weight, Tensor? scales, Tensor? bias)
    {
        long n = weight.shape[0], k = weight.shape[1];
        var y = empty([x.shape[0], n], ScalarType.Float32);
        using var xc = x.contiguous();
        for (long r0 = 0; r0 < n; r0 += WidenedTileRows)
        {
            long rows = Math.Min(WidenedTileRows, n - r0);
            using var slice = weight.narrow(0, r0, rows);
            using var tile = scales is null ? slice.to(ScalarType.Float32) : empty([rows, k], ScalarType.Float32);
            if (scales is not null)
                Q8.Dequantize((sbyte*)Simd.Pointer(weight) + r0 * k, Simd.Pointer(scales) + r0 * k / Q8.Group, Simd.Pointer(tile), rows * k);
            using var part = F.linear(xc, tile);
            using var target = y.narrow(1, r0, rows);
            target.copy_(part);
        }
        if (bias is not null) HeldScalars.AddInPlace(y, bias);
        return y;
    }

    /// <summary>
    /// The rows of a weight matrix [n, k] in float32, bfloat16 or int8 with scales (<see cref="Q8"/>). Kernels that
    /// reuse a tile of rows many times (the broadcast kernels) widen or dequantize it into a float32 scratch first and
    /// then run exactly the float32 code; the memory-bound dot kernels read the stored format directly.
    /// </summary>
    private readonly struct WeightRows(float* f32, ushort* bf16, sbyte* q8, float* scales, long k)
    {
        public bool IsBf16 => bf16 != null;
        public bool IsQ8 => q8 != null;

        /// <summary>Row <paramref name="row"/> as float32: in place, or converted into <paramref name="scratch"/> with the next rows up to <paramref name="count"/>.</summary>
        public float* Tile(int row, int count, float* scratch)
        {
            if (f32 != null) return f32 + row * k;
            if (bf16 != null) Bf16.Widen(bf16 + row * k, scratch, count * k);
            else Q8.Dequantize(q8 + row * k, scales + row * k / Q8.Group, scratch, count * k);
            return scratch;
        }

        /// <summary>Where row <paramref name="row"/> starts in memory (for prefetching).</summary>
        public float* Address(int row) => f32 != null ? f32 + row * k : bf16 != null ? (float*)(bf16 + row * k) : (float*)(q8 + row * k);

        public float* F32 => f32;
        public ushort* Bf16Rows => bf16;
        public sbyte* Q8Rows => q8;
        public float* Q8Scales => scales;

        /// <summary>Row <paramref name="row"/> dotted with <paramref name="x"/>.</summary>
        public float Dot(int row, float* x) =>
            f32 != null ? Simd.Dot(f32 + row * k, x, (int)k)
            : bf16 != null ? Bf16.Dot(bf16 + row * k, x, (int)k)
            : Q8.Dot(q8 + row * k, scales + row * k / Q8.Group, x, (int)k, q8 + row * k);
    }

    /// <summary>Runs <paramref name="body"/>(from, to) over [0, n) in chunks whose bounds are multiples of <paramref name="align"/> (the last ends at n).</summary>
    internal static void ParallelOver(int n, int align, Action<int, int> body)
    {
        int units = (n + align - 1) / align;
        int chunks = Math.Min(units, Environment.ProcessorCount * 8);
        CpuWorkers.Shared.For(chunks, c =>
            body((int)((long)units * c / chunks) * align, Math.Min(n, (int)((long)units * (c + 1) / chunks) * align)));
    }

    // ---- dot kernel -------------------------------------------------------------------------------------------

    private static void Dot(float* x, WeightRows w, float* y, int m, int k, int n)
    {
        if (w.IsBf16 && (m is 1 or 2) && k % Bf16.PairBlock == 0)
        {
            // One or two decoding streams: the input rearranged once into the paired layout (see Bf16).
            float* xp = (float*)NativeMemory.AlignedAlloc((nuint)((long)m * k * sizeof(float)), 64);
            try
            {
                for (int r = 0; r < m; r++) Bf16.Deinterleave(x + (long)r * k, xp + (long)r * k, k);
                ushort* wb = w.Bf16Rows;
                if (m == 1)
                    ParallelOver(n, 4, (from, to) =>
                    {
                        for (int row = from; row < to; row++) y[row] = Bf16.DotPaired(wb + (long)row * k, xp, k, wb + (long)Math.Min(row + PrefetchRowsAhead, to - 1) * k);
                    });
                else
                    ParallelOver(n, 4, (from, to) =>
                    {
                        for (int row = from; row < to; row++) Bf16.Dot2Paired(wb + (long)row * k, xp, xp + k, k, y + row, y + n + row);
                    });
            }
            finally
            {
                NativeMemory.AlignedFree(xp);
            }
        }
        else if (w.IsBf16) ParallelOver(n, 3, (from, to) => DotRangeBf16(x, w.Bf16Rows, y, m, k, n, from, to));
        else if (w.IsQ8)
        {
            sbyte* q = w.Q8Rows;
            float* sc = w.Q8Scales;
            int groups = k / Q8.Group;
            ParallelOver(n, 4, (from, to) =>
            {
                for (int row = from; row < to; row++)
                {
                    sbyte* qr = q + (long)row * k, ahead = q + (long)Math.Min(row + PrefetchRowsAhead, to - 1) * k;
                    float* sr = sc + (long)row * groups;
                    int r = 0;
                    for (; r + 2 <= m; r += 2)
                        Q8.Dot2(qr, sr, x + (long)r * k, x + (long)(r + 1) * k, k, y + (long)r * n + row, y + (long)(r + 1) * n + row, ahead);
                    for (; r < m; r++) y[(long)r * n + row] = Q8.Dot(qr, sr, x + (long)r * k, k, ahead);
                }
            });
        }
        else if (m == 1)
        {
            // Single-stream decode: one weight row at a time, the row FetchRowsAheadF32 further requested as it goes.
            float* wf = w.F32;
            ParallelOver(n, 4, (from, to) =>
            {
                for (int row = from; row < to; row++)
                    y[row] = Simd.DotAhead(wf + (long)row * k, x, k, wf + (long)Math.Min(row + FetchRowsAheadF32, to - 1) * k);
            });
        }
        else if (m == 2)
        {
            // Two decoding streams: each weight row read once for both, the row FetchRowsAheadF32 further requested.
            float* wf = w.F32;
            ParallelOver(n, 4, (from, to) =>
            {
                for (int row = from; row < to; row++)
                    Simd.Dot2Ahead(wf + (long)row * k, x, x + k, k, wf + (long)Math.Min(row + FetchRowsAheadF32, to - 1) * k, y + row, y + n + row);
            });
        }
        else ParallelOver(n, 3, (from, to) => DotRange(x, w.F32, y, m, k, n, from, to));
    }

    /// <summary>
    /// How far ahead (in rows) the single-row float32 dot kernel requests weight rows (a 4 KB row of Qwen3-0.6B is
    /// as far ahead as the bfloat16 kernel's four). With this and 512-bit loads, the 28 layers of a single-row step
    /// took 38-42 ms against 48-59 ms with the three-row 256-bit kernel (`micro --part single`, alternating runs);
    /// 0, 2 and 6 rows ahead were within the noise of each other.
    /// </summary>
    private const int FetchRowsAheadF32 = 2;

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DotRange(float* x, float* w, float* y, int m, int k, int n, int from, int to)
    {
        int row = from;
        if (k % 8 == 0)
        {
            // Three weight rows at a time against input rows in threes: nine accumulators, each loaded vector
            // feeds three FMAs (fifteen of the sixteen AVX registers).
            for (; row + 3 <= to; row += 3)
            {
                float* w0 = w + (long)row * k, w1 = w0 + k, w2 = w1 + k;
                int r = 0;
                for (; r + 3 <= m; r += 3)
                {
                    float* x0 = x + (long)r * k;
                    Tile3x3(w0, w1, w2, x0, x0 + k, x0 + 2 * k, k, y + (long)r * n + row, n);
                }
                for (; r < m; r++)
                {
                    float* xr = x + (long)r * k;
                    y[(long)r * n + row] = Simd.Dot(w0, xr, k);
                    y[(long)r * n + row + 1] = Simd.Dot(w1, xr, k);
                    y[(long)r * n + row + 2] = Simd.Dot(w2, xr, k);
                }
            }
        }
        for (; row < to; row++)
        {
            float* wr = w + (long)row * k;
            for (int r = 0; r < m; r++) y[(long)r * n + row] = Simd.Dot(wr, x + (long)r * k, k);
        }
    }

    /// <summary>y[i, j] = x_i . w_j for three input rows and three weight rows; y points at (row 0, column 0), row stride n.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining | MethodImplOptions.AggressiveOptimization)]
    private static void Tile3x3(float* w0, float* w1, float* w2, float* x0, float* x1, float* x2, int k, float* y, int n)
    {
        Vector256<float> a00 = default, a01 = default, a02 = default, a10 = default, a11 = default, a12 = default,
            a20 = default, a21 = default, a22 = default;
        for (int i = 0; i + 8 <= k; i += 8)
        {
            var v0 = Vector256.Load(w0 + i); var v1 = Vector256.Load(w1 + i); var v2 = Vector256.Load(w2 + i);
            var u = Vector256.Load(x0 + i);
            a00 = Simd.Fma(v0, u, a00); a01 = Simd.Fma(v1, u, a01); a02 = Simd.Fma(v2, u, a02);
            u = Vector256.Load(x1 + i);
            a10 = Simd.Fma(v0, u, a10); a11 = Simd.Fma(v1, u, a11); a12 = Simd.Fma(v2, u, a12);
            u = Vector256.Load(x2 + i);
            a20 = Simd.Fma(v0, u, a20); a21 = Simd.Fma(v1, u, a21); a22 = Simd.Fma(v2, u, a22);
        }
        y[0] = Vector256.Sum(a00); y[1] = Vector256.Sum(a01); y[2] = Vector256.Sum(a02);
        y[n] = Vector256.Sum(a10); y[n + 1] = Vector256.Sum(a11); y[n + 2] = Vector256.Sum(a12);
        y[2 * n] = Vector256.Sum(a20); y[2 * n + 1] = Vector256.Sum(a21); y[2 * n + 2] = Vector256.Sum(a22);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DotRangeBf16(float* x, ushort* w, float* y, int m, int k, int n, int from, int to)
    {
        int row = from;
        if (k % 16 == 0 && m >= 3)
        {
            for (; row + 3 <= to; row += 3)
            {
                ushort* w0 = w + (long)row * k, w1 = w0 + k, w2 = w1 + k;
                int r = 0;
                for (; r + 3 <= m; r += 3)
                {
                    float* x0 = x + (long)r * k;
                    Tile3x3Bf16(w0, w1, w2, x0, x0 + k, x0 + 2 * k, k, y + (long)r * n + row, n);
                }
                for (; r < m; r++)
                {
                    float* xr = x + (long)r * k;
                    y[(long)r * n + row] = Bf16.Dot(w0, xr, k);
                    y[(long)r * n + row + 1] = Bf16.Dot(w1, xr, k);
                    y[(long)r * n + row + 2] = Bf16.Dot(w2, xr, k);
                }
            }
        }
        for (; row < to; row++)
        {
            ushort* wr = w + (long)row * k;
            for (int r = 0; r < m; r++) y[(long)r * n + row] = Bf16.Dot(wr, x + (long)r * k, k);
        }
    }

    /// <summary><see cref="Tile3x3"/> with bfloat16 weight rows, widened sixteen at a time.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining | MethodImplOptions.AggressiveOptimization)]
    private static void Tile3x3Bf16(ushort* w0, ushort* w1, ushort* w2, float* x0, float* x1, float* x2, int k, float* y, int n)
    {
        Vector256<float> a00 = default, a01 = default, a02 = default, a10 = default, a11 = default, a12 = default,
            a20 = default, a21 = default, a22 = default;
        for (int i = 0; i + 16 <= k; i += 16)
        {
            var (v0, p0) = Bf16.Load16(w0 + i); var (v1, p1) = Bf16.Load16(w1 + i); var (v2, p2) = Bf16.Load16(w2 + i);
            var u = Vector256.Load(x0 + i); var t = Vector256.Load(x0 + i + 8);
            a00 = Simd.Fma(p0, t, Simd.Fma(v0, u, a00)); a01 = Simd.Fma(p1, t, Simd.Fma(v1, u, a01)); a02 = Simd.Fma(p2, t, Simd.Fma(v2, u, a02));
            u = Vector256.Load(x1 + i); t = Vector256.Load(x1 + i + 8);
            a10 = Simd.Fma(p0, t, Simd.Fma(v0, u, a10)); a11 = Simd.Fma(p1, t, Simd.Fma(v1, u, a11)); a12 = Simd.Fma(p2, t, Simd.Fma(v2, u, a12));
            u = Vector256.Load(x2 + i); t = Vector256.Load(x2 + i + 8);
            a20 = Simd.Fma(p0, t, Simd.Fma(v0, u, a20)); a21 = Simd.Fma(p1, t, Simd.Fma(v1, u, a21)); a22 = Simd.Fma(p2, t, Simd.Fma(v2, u, a22));
        }
        y[0] = Vector256.Sum(a00); y[1] = Vector256.Sum(a01); y[2] = Vector256.Sum(a02);
        y[n] = Vector256.Sum(a10); y[n + 1] = Vector256.Sum(a11); y[n + 2] = Vector256.Sum(a12);
        y[2 * n] = Vector256.Sum(a20); y[2 * n + 1] = Vector256.Sum(a21); y[2 * n + 2] = Vector256.Sum(a22);
    }

    // ---- broadcast kernel (AVX-512) ---------------------------------------------------------------------------

    /// <summary>
    /// Packs x into blocks of 32 rows ([k][32], the last block 16 wide when at most 16 rows are left), zero-padded,
    /// then computes eight weight rows at a time against every block.
    /// </summary>
    private static void Broadcast(float* x, WeightRows w, float* y, int m, int k, int n)
    {
        // Up to 8 rows, one 16-lane block holds several consecutive k of each row (lane r * g + q = x[r, g * i + q]),
        // so that the lanes are not mostly padding: the weight is then broadcast g elements at a time.
        // 5-12 rows: two or three blocks of four rows, all fed by each weight quad.
        int quadBlocks = k % 4 == 0 && m <= 12 ? (m + 3) / 4 : 0;
        int group = quadBlocks > 0 ? 4 : m <= 8 && k % 2 == 0 ? 2 : 1;
        if (group > 1)
        {
            int blocksPerStep = Math.Max(1, quadBlocks), stride = 16 * blocksPerStep;
            float* packed = (float*)NativeMemory.AlignedAlloc((nuint)((long)stride * (k / group) * sizeof(float)), 64);
            try
            {
                int rowsPerBlock = 16 / group;
                for (int r = 0; r < rowsPerBlock * blocksPerStep; r++)
                {
                    float* src = x + (long)r * k;
                    int lane = (r / rowsPerBlock) * 16 + (r % rowsPerBlock) * group;
                    for (int i = 0; i < k; i++)
                        packed[(long)(i / group) * stride + lane + i % group] = r < m ? src[i] : 0;
                }
                ParallelOver(n, TileRows, (from, to) => GroupedRange(packed, w, y, m, k, n, group, blocksPerStep, x, from, to));
            }
            finally
            {
                NativeMemory.AlignedFree(packed);
            }
            return;
        }

        int full = m / 32, rest = m % 32;
        int lastWidth = rest == 0 ? 0 : rest <= 16 ? 16 : 32;
        int blocks = full + (rest == 0 ? 0 : 1);
        long packedFloats = ((long)full * 32 + lastWidth) * k;
        float* xt = (float*)NativeMemory.AlignedAlloc((nuint)(packedFloats * sizeof(float)), 64);
        try
        {
            // Packing is a transpose of the whole input: split over k when it is large (prefill, long down_proj rows).
            if ((long)m * k >= 1 << 16)
                ParallelOver(k, 64, (from, to) => Pack(x, xt, m, k, blocks, full, lastWidth, from, to));
            else
                Pack(x, xt, m, k, blocks, full, lastWidth, 0, k);
            ParallelOver(n, TileRows, (from, to) => BroadcastRange(xt, w, y, m, k, n, full, lastWidth, x, from, to));
        }
        finally
        {
            NativeMemory.AlignedFree(xt);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void GroupedRange(float* packed, WeightRows w, float* y, int m, int k, int n, int group, int blocks, float* x, int from, int to)
    {
        float* tile = stackalloc float[TileRows * 48];
        float* scratch = w.IsBf16 || w.IsQ8 ? (float*)NativeMemory.AlignedAlloc((nuint)((long)TileRows * k * sizeof(float)), 64) : null;
        try
        {
            int row = from, width = 16 * blocks;
            for (; row + TileRows <= to; row += TileRows)
            {
                float* wr = w.Tile(row, TileRows, scratch);
                // The next tile of this range (the last one prefetches itself: lines already on their way).
                float* next = w.Address(row + 2 * TileRows <= to ? row + TileRows : row);
                if (blocks == 3) TileQuadTriples(wr, k, packed, tile, next);
                else if (blocks == 2) TileQuadPairs(wr, k, packed, tile, next);
                else if (group == 4) TileGroups4(wr, k, packed, tile, next);
                else TileGroups2(wr, k, packed, tile);
                for (int j = 0; j < TileRows; j++)
                    for (int r = 0; r < m; r++)
                    {
                        // Row r sits in block r / 4 at lanes (r % 4) * 4.. (quads), else at lanes r * group.. (pairs).
                        int lane = group == 4 ? (r / 4) * 16 + (r % 4) * 4 : r * group;
                        float sum = 0;
                        for (int q = 0; q < group; q++) sum += tile[j * width + lane + q];
                        y[(long)r * n + row + j] = sum;
                    }
            }
            for (; row < to; row++)
                for (int r = 0; r < m; r++) y[(long)r * n + row] = w.Dot(row, x + (long)r * k);
        }
        finally
        {
            if (scratch != null) NativeMemory.AlignedFree(scratch);
        }
    }

    /// <summary>Eight weight rows against up to 4 rows packed four k at a time: w[j, 4i..4i+3] broadcast as a 128-bit group.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void TileGroups4(float* w, long k, float* packed, float* tile, float* next)
    {
        Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default, a4 = default, a5 = default, a6 = default, a7 = default;
        float* w0 = w, w1 = w + k, w2 = w + 2 * k, w3 = w + 3 * k, w4 = w + 4 * k, w5 = w + 5 * k, w6 = w + 6 * k, w7 = w + 7 * k;
        for (long i = 0; i < k; i += 4)
        {
            Fetch(next + i * 8); Fetch(next + i * 8 + 16);
            var u = Vector512.Load(packed + i * 4);
            a0 = Avx512F.FusedMultiplyAdd(Avx512F.BroadcastVector128ToVector512(w0 + i), u, a0);
            a1 = Avx512F.FusedMultiplyAdd(Avx512F.BroadcastVector128ToVector512(w1 + i), u, a1);
            a2 = Avx512F.FusedMultiplyAdd(Avx512F.BroadcastVector128ToVector512(w2 + i), u, a2);
            a3 = Avx512F.FusedMultiplyAdd(Avx512F.BroadcastVector128ToVector512(w3 + i), u, a3);
            a4 = Avx512F.FusedMultiplyAdd(Avx512F.BroadcastVector128ToVector512(w4 + i), u, a4);
            a5 = Avx512F.FusedMultiplyAdd(Avx512F.BroadcastVector128ToVector512(w5 + i), u, a5);
            a6 = Avx512F.FusedMultiplyAdd(Avx512F.BroadcastVector128ToVector512(w6 + i), u, a6);
            a7 = Avx512F.FusedMultiplyAdd(Avx512F.BroadcastVector128ToVector512(w7 + i), u, a7);
        }
        a0.Store(tile); a1.Store(tile + 16); a2.Store(tile + 32); a3.Store(tile + 48);
        a4.Store(tile + 64); a5.Store(tile + 80); a6.Store(tile + 96); a7.Store(tile + 112);
    }

    /// <summary>Eight weight rows against two blocks of 4 rows packed four k at a time: each quad feeds both blocks.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void TileQuadPairs(float* w, long k, float* packed, float* tile, float* next)
    {
        Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default, a4 = default, a5 = default, a6 = default, a7 = default;
        Vector512<float> c0 = default, c1 = default, c2 = default, c3 = default, c4 = default, c5 = default, c6 = default, c7 = default;
        float* w0 = w, w1 = w + k, w2 = w + 2 * k, w3 = w + 3 * k, w4 = w + 4 * k, w5 = w + 5 * k, w6 = w + 6 * k, w7 = w + 7 * k;
        for (long i = 0; i < k; i += 4)
        {
            Fetch(next + i * 8); Fetch(next + i * 8 + 16);
            var u = Vector512.Load(packed + i * 8);
            var v = Vector512.Load(packed + i * 8 + 16);
            var s = Avx512F.BroadcastVector128ToVector512(w0 + i); a0 = Avx512F.FusedMultiplyAdd(s, u, a0); c0 = Avx512F.FusedMultiplyAdd(s, v, c0);
            s = Avx512F.BroadcastVector128ToVector512(w1 + i); a1 = Avx512F.FusedMultiplyAdd(s, u, a1); c1 = Avx512F.FusedMultiplyAdd(s, v, c1);
            s = Avx512F.BroadcastVector128ToVector512(w2 + i); a2 = Avx512F.FusedMultiplyAdd(s, u, a2); c2 = Avx512F.FusedMultiplyAdd(s, v, c2);
            s = Avx512F.BroadcastVector128ToVector512(w3 + i); a3 = Avx512F.FusedMultiplyAdd(s, u, a3); c3 = Avx512F.FusedMultiplyAdd(s, v, c3);
            s = Avx512F.BroadcastVector128ToVector512(w4 + i); a4 = Avx512F.FusedMultiplyAdd(s, u, a4); c4 = Avx512F.FusedMultiplyAdd(s, v, c4);
            s = Avx512F.BroadcastVector128ToVector512(w5 + i); a5 = Avx512F.FusedMultiplyAdd(s, u, a5); c5 = Avx512F.FusedMultiplyAdd(s, v, c5);
            s = Avx512F.BroadcastVector128ToVector512(w6 + i); a6 = Avx512F.FusedMultiplyAdd(s, u, a6); c6 = Avx512F.FusedMultiplyAdd(s, v, c6);
            s = Avx512F.BroadcastVector128ToVector512(w7 + i); a7 = Avx512F.FusedMultiplyAdd(s, u, a7); c7 = Avx512F.FusedMultiplyAdd(s, v, c7);
        }
        a0.Store(tile); c0.Store(tile + 16); a1.Store(tile + 32); c1.Store(tile + 48);
        a2.Store(tile + 64); c2.Store(tile + 80); a3.Store(tile + 96); c3.Store(tile + 112);
        a4.Store(tile + 128); c4.Store(tile + 144); a5.Store(tile + 160); c5.Store(tile + 176);
        a6.Store(tile + 192); c6.Store(tile + 208); a7.Store(tile + 224); c7.Store(tile + 240);
    }

    /// <summary>Eight weight rows against three blocks of 4 rows packed four k at a time: each quad feeds all three (24 accumulators).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void TileQuadTriples(float* w, long k, float* packed, float* tile, float* next)
    {
        Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default, a4 = default, a5 = default, a6 = default, a7 = default;
        Vector512<float> b0 = default, b1 = default, b2 = default, b3 = default, b4 = default, b5 = default, b6 = default, b7 = default;
        Vector512<float> c0 = default, c1 = default, c2 = default, c3 = default, c4 = default, c5 = default, c6 = default, c7 = default;
        float* w0 = w, w1 = w + k, w2 = w + 2 * k, w3 = w + 3 * k, w4 = w + 4 * k, w5 = w + 5 * k, w6 = w + 6 * k, w7 = w + 7 * k;
        for (long i = 0; i < k; i += 4)
        {
            Fetch(next + i * 8); Fetch(next + i * 8 + 16);
            float* p = packed + i * 12;
            var u = Vector512.Load(p);
            var v = Vector512.Load(p + 16);
            var t = Vector512.Load(p + 32);
            var s = Avx512F.BroadcastVector128ToVector512(w0 + i); a0 = Avx512F.FusedMultiplyAdd(s, u, a0); b0 = Avx512F.FusedMultiplyAdd(s, v, b0); c0 = Avx512F.FusedMultiplyAdd(s, t, c0);
            s = Avx512F.BroadcastVector128ToVector512(w1 + i); a1 = Avx512F.FusedMultiplyAdd(s, u, a1); b1 = Avx512F.FusedMultiplyAdd(s, v, b1); c1 = Avx512F.FusedMultiplyAdd(s, t, c1);
            s = Avx512F.BroadcastVector128ToVector512(w2 + i); a2 = Avx512F.FusedMultiplyAdd(s, u, a2); b2 = Avx512F.FusedMultiplyAdd(s, v, b2); c2 = Avx512F.FusedMultiplyAdd(s, t, c2);
            s = Avx512F.BroadcastVector128ToVector512(w3 + i); a3 = Avx512F.FusedMultiplyAdd(s, u, a3); b3 = Avx512F.FusedMultiplyAdd(s, v, b3); c3 = Avx512F.FusedMultiplyAdd(s, t, c3);
            s = Avx512F.BroadcastVector128ToVector512(w4 + i); a4 = Avx512F.FusedMultiplyAdd(s, u, a4); b4 = Avx512F.FusedMultiplyAdd(s, v, b4); c4 = Avx512F.FusedMultiplyAdd(s, t, c4);
            s = Avx512F.BroadcastVector128ToVector512(w5 + i); a5 = Avx512F.FusedMultiplyAdd(s, u, a5); b5 = Avx512F.FusedMultiplyAdd(s, v, b5); c5 = Avx512F.FusedMultiplyAdd(s, t, c5);
            s = Avx512F.BroadcastVector128ToVector512(w6 + i); a6 = Avx512F.FusedMultiplyAdd(s, u, a6); b6 = Avx512F.FusedMultiplyAdd(s, v, b6); c6 = Avx512F.FusedMultiplyAdd(s, t, c6);
            s = Avx512F.BroadcastVector128ToVector512(w7 + i); a7 = Avx512F.FusedMultiplyAdd(s, u, a7); b7 = Avx512F.FusedMultiplyAdd(s, v, b7); c7 = Avx512F.FusedMultiplyAdd(s, t, c7);
        }
        a0.Store(tile); b0.Store(tile + 16); c0.Store(tile + 32); a1.Store(tile + 48); b1.Store(tile + 64); c1.Store(tile + 80);
        a2.Store(tile + 96); b2.Store(tile + 112); c2.Store(tile + 128); a3.Store(tile + 144); b3.Store(tile + 160); c3.Store(tile + 176);
        a4.Store(tile + 192); b4.Store(tile + 208); c4.Store(tile + 224); a5.Store(tile + 240); b5.Store(tile + 256); c5.Store(tile + 272);
        a6.Store(tile + 288); b6.Store(tile + 304); c6.Store(tile + 320); a7.Store(tile + 336); b7.Store(tile + 352); c7.Store(tile + 368);
    }

    /// <summary>Eight weight rows against up to 8 rows packed two k at a time: w[j, 2i..2i+1] broadcast as a 64-bit pair.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void TileGroups2(float* w, long k, float* packed, float* tile)
    {
        Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default, a4 = default, a5 = default, a6 = default, a7 = default;
        float* w0 = w, w1 = w + k, w2 = w + 2 * k, w3 = w + 3 * k, w4 = w + 4 * k, w5 = w + 5 * k, w6 = w + 6 * k, w7 = w + 7 * k;
        for (long i = 0; i < k; i += 2)
        {
            var u = Vector512.Load(packed + i * 8);
            a0 = Avx512F.FusedMultiplyAdd(Pair(w0 + i), u, a0);
            a1 = Avx512F.FusedMultiplyAdd(Pair(w1 + i), u, a1);
            a2 = Avx512F.FusedMultiplyAdd(Pair(w2 + i), u, a2);
            a3 = Avx512F.FusedMultiplyAdd(Pair(w3 + i), u, a3);
            a4 = Avx512F.FusedMultiplyAdd(Pair(w4 + i), u, a4);
            a5 = Avx512F.FusedMultiplyAdd(Pair(w5 + i), u, a5);
            a6 = Avx512F.FusedMultiplyAdd(Pair(w6 + i), u, a6);
            a7 = Avx512F.FusedMultiplyAdd(Pair(w7 + i), u, a7);
        }
        a0.Store(tile); a1.Store(tile + 16); a2.Store(tile + 32); a3.Store(tile + 48);
        a4.Store(tile + 64); a5.Store(tile + 80); a6.Store(tile + 96); a7.Store(tile + 112);
    }

    /// <summary>p[0], p[1] repeated across 16 lanes (one 64-bit broadcast).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Pair(float* p) => Vector512.Create(*(double*)p).AsSingle();

    /// <summary>
    /// x rows -> blocks of 32 (the last 16 or 32 wide, zero-padded) laid out [k][width], for k in [from, to): whole
    /// groups of 16 rows by 16 k go through a register transpose, the rest (padding, the last k) element by element.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Pack(float* x, float* xt, int m, int k, int blocks, int full, int lastWidth, int from, int to)
    {
        for (int b = 0; b < blocks; b++)
        {
            int width = b < full ? 32 : lastWidth;
            int rows = Math.Min(32, m - b * 32);
            float* src = x + (long)b * 32 * k;
            float* dst = xt + (long)b * 32 * k;
            for (int g = 0; g < width; g += 16)
            {
                int i = from;
                if (g + 16 <= rows)
                    for (; i + 16 <= to; i += 16)
                        Transpose16x16(src + (long)g * k + i, k, dst + (long)i * width + g, width);
                for (; i < to; i++)
                {
                    float* d = dst + (long)i * width;
                    for (int r = g; r < g + 16; r++) d[r] = r < rows ? src[(long)r * k + i] : 0;
                }
            }
        }
    }

    /// <summary>dst[t * dstStride + r] = src[r * srcStride + t] for a 16 x 16 tile, in registers (four shuffle stages).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining | MethodImplOptions.AggressiveOptimization)]
    private static void Transpose16x16(float* src, long srcStride, float* dst, long dstStride)
    {
        // Stage 1: rows 2p, 2p+1 interleaved within 128-bit lanes (lo: columns 4L, 4L+1; hi: 4L+2, 4L+3).
        var lo = stackalloc Vector512<float>[8];
        var hi = stackalloc Vector512<float>[8];
        for (int p = 0; p < 8; p++)
        {
            var r0 = Vector512.Load(src + 2 * p * srcStride);
            var r1 = Vector512.Load(src + (2 * p + 1) * srcStride);
            lo[p] = Avx512F.UnpackLow(r0, r1);
            hi[p] = Avx512F.UnpackHigh(r0, r1);
        }
        // Stage 2: four rows 4q..4q+3 per 128-bit lane; v[c * 4 + q] holds column 4L + c of those rows in lane L.
        var v = stackalloc Vector512<float>[16];
        for (int q = 0; q < 4; q++)
        {
            Vector512<double> l0 = lo[2 * q].AsDouble(), l1 = lo[2 * q + 1].AsDouble(), h0 = hi[2 * q].AsDouble(), h1 = hi[2 * q + 1].AsDouble();
            v[q] = Avx512F.UnpackLow(l0, l1).AsSingle();
            v[4 + q] = Avx512F.UnpackHigh(l0, l1).AsSingle();
            v[8 + q] = Avx512F.UnpackLow(h0, h1).AsSingle();
            v[12 + q] = Avx512F.UnpackHigh(h0, h1).AsSingle();
        }
        // Stages 3-4: a 4 x 4 transpose of 128-bit lanes per column offset c; output column 4L + c.
        for (int c = 0; c < 4; c++)
        {
            Vector512<float> v0 = v[c * 4], v1 = v[c * 4 + 1], v2 = v[c * 4 + 2], v3 = v[c * 4 + 3];
            var u0 = Avx512F.Shuffle4x128(v0, v1, 0x44);
            var u1 = Avx512F.Shuffle4x128(v0, v1, 0xEE);
            var u2 = Avx512F.Shuffle4x128(v2, v3, 0x44);
            var u3 = Avx512F.Shuffle4x128(v2, v3, 0xEE);
            Avx512F.Shuffle4x128(u0, u2, 0x88).Store(dst + (0 + c) * dstStride);
            Avx512F.Shuffle4x128(u0, u2, 0xDD).Store(dst + (4 + c) * dstStride);
            Avx512F.Shuffle4x128(u1, u3, 0x88).Store(dst + (8 + c) * dstStride);
            Avx512F.Shuffle4x128(u1, u3, 0xDD).Store(dst + (12 + c) * dstStride);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void BroadcastRange(float* xt, WeightRows w, float* y, int m, int k, int n, int full, int lastWidth, float* x, int from, int to)
    {
        float* tile = stackalloc float[TileRows * 32];
        float* scratch = w.IsBf16 || w.IsQ8 ? (float*)NativeMemory.AlignedAlloc((nuint)((long)TileRows * k * sizeof(float)), 64) : null;
        try
        {
            int row = from;
            for (; row + TileRows <= to; row += TileRows)
            {
                float* wr = w.Tile(row, TileRows, scratch);
                // The first block's pass prefetches the next tile; later passes (and the range's last tile) prefetch the
                // current one, whose lines are already in cache.
                float* next = row + 2 * TileRows <= to ? w.Address(row + TileRows) : wr;
                for (int b = 0; b < full; b++)
                {
                    Tile8x32(wr, k, xt + (long)b * 32 * k, tile, b == 0 ? next : wr);
                    Scatter(tile, 32, 32, y + (long)b * 32 * n + row, n);
                }
                if (lastWidth == 32)
                {
                    Tile8x32(wr, k, xt + (long)full * 32 * k, tile, full == 0 ? next : wr);
                    Scatter(tile, 32, m - full * 32, y + (long)full * 32 * n + row, n);
                }
                else if (lastWidth == 16)
                {
                    Tile8x16(wr, k, xt + (long)full * 32 * k, tile, full == 0 ? next : wr);
                    Scatter(tile, 16, m - full * 32, y + (long)full * 32 * n + row, n);
                }
            }
            // Fewer than eight weight rows left (only when n is not a multiple of 8).
            for (; row < to; row++)
                for (int r = 0; r < m; r++) y[(long)r * n + row] = w.Dot(row, x + (long)r * k);
        }
        finally
        {
            if (scratch != null) NativeMemory.AlignedFree(scratch);
        }
    }

    /// <summary>
    /// tile[j * width + r] -> y[r * n + j] for the first <paramref name="rows"/> rows of each weight row's block: eight
    /// rows at a time through an 8 x 8 transpose in registers (one 32-byte store per output row), the rest element by
    /// element. The element-by-element form alone took about 40 % of a 256-row product's time (256 scattered scalar
    /// stores per tile; docs/benchmarks.md).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Scatter(float* tile, int width, int rows, float* y, int n)
    {
        int r0 = 0;
        for (; r0 + 8 <= rows; r0 += 8) Simd.Transpose8x8(tile + r0, width, y + (long)r0 * n, n);
        for (int j = 0; j < TileRows; j++)
            for (int r = r0; r < rows; r++) y[(long)r * n + j] = tile[j * width + r];
    }

    /// <summary>Eight weight rows (stride k) against a 32-row block of packed x: 16 accumulators.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Tile8x32(float* w, long k, float* xt, float* tile, float* next)
    {
        Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default, a4 = default, a5 = default, a6 = default, a7 = default;
        Vector512<float> c0 = default, c1 = default, c2 = default, c3 = default, c4 = default, c5 = default, c6 = default, c7 = default;
        float* w0 = w, w1 = w + k, w2 = w + 2 * k, w3 = w + 3 * k, w4 = w + 4 * k, w5 = w + 5 * k, w6 = w + 6 * k, w7 = w + 7 * k;
        for (long i = 0; i < k; i++)
        {
            Fetch(next + i * 8); // every other one is a line already requested: cheaper than a branch
            var u = Vector512.Load(xt + i * 32);
            var v = Vector512.Load(xt + i * 32 + 16);
            var s = Vector512.Create(w0[i]); a0 = Avx512F.FusedMultiplyAdd(s, u, a0); c0 = Avx512F.FusedMultiplyAdd(s, v, c0);
            s = Vector512.Create(w1[i]); a1 = Avx512F.FusedMultiplyAdd(s, u, a1); c1 = Avx512F.FusedMultiplyAdd(s, v, c1);
            s = Vector512.Create(w2[i]); a2 = Avx512F.FusedMultiplyAdd(s, u, a2); c2 = Avx512F.FusedMultiplyAdd(s, v, c2);
            s = Vector512.Create(w3[i]); a3 = Avx512F.FusedMultiplyAdd(s, u, a3); c3 = Avx512F.FusedMultiplyAdd(s, v, c3);
            s = Vector512.Create(w4[i]); a4 = Avx512F.FusedMultiplyAdd(s, u, a4); c4 = Avx512F.FusedMultiplyAdd(s, v, c4);
            s = Vector512.Create(w5[i]); a5 = Avx512F.FusedMultiplyAdd(s, u, a5); c5 = Avx512F.FusedMultiplyAdd(s, v, c5);
            s = Vector512.Create(w6[i]); a6 = Avx512F.FusedMultiplyAdd(s, u, a6); c6 = Avx512F.FusedMultiplyAdd(s, v, c6);
            s = Vector512.Create(w7[i]); a7 = Avx512F.FusedMultiplyAdd(s, u, a7); c7 = Avx512F.FusedMultiplyAdd(s, v, c7);
        }
        a0.Store(tile); c0.Store(tile + 16); a1.Store(tile + 32); c1.Store(tile + 48);
        a2.Store(tile + 64); c2.Store(tile + 80); a3.Store(tile + 96); c3.Store(tile + 112);
        a4.Store(tile + 128); c4.Store(tile + 144); a5.Store(tile + 160); c5.Store(tile + 176);
        a6.Store(tile + 192); c6.Store(tile + 208); a7.Store(tile + 224); c7.Store(tile + 240);
    }

    /// <summary>Eight weight rows (stride k) against a 16-row block of packed x: 8 accumulators.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Tile8x16(float* w, long k, float* xt, float* tile, float* next)
    {
        Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default, a4 = default, a5 = default, a6 = default, a7 = default;
        float* w0 = w, w1 = w + k, w2 = w + 2 * k, w3 = w + 3 * k, w4 = w + 4 * k, w5 = w + 5 * k, w6 = w + 6 * k, w7 = w + 7 * k;
        for (long i = 0; i < k; i++)
        {
            Fetch(next + i * 8); // every other one is a line already requested: cheaper than a branch
            var u = Vector512.Load(xt + i * 16);
            a0 = Avx512F.FusedMultiplyAdd(Vector512.Create(w0[i]), u, a0);
            a1 = Avx512F.FusedMultiplyAdd(Vector512.Create(w1[i]), u, a1);
            a2 = Avx512F.FusedMultiplyAdd(Vector512.Create(w2[i]), u, a2);
            a3 = Avx512F.FusedMultiplyAdd(Vector512.Create(w3[i]), u, a3);
            a4 = Avx512F.FusedMultiplyAdd(Vector512.Create(w4[i]), u, a4);
            a5 = Avx512F.FusedMultiplyAdd(Vector512.Create(w5[i]), u, a5);
            a6 = Avx512F.FusedMultiplyAdd(Vector512.Create(w6[i]), u, a6);
            a7 = Avx512F.FusedMultiplyAdd(Vector512.Create(w7[i]), u, a7);
        }
        a0.Store(tile); a1.Store(tile + 16); a2.Store(tile + 32); a3.Store(tile + 48);
        a4.Store(tile + 64); a5.Store(tile + 80); a6.Store(tile + 96); a7.Store(tile + 112);
    }
}
