using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using LocalVllm.Engine.Attention;
using LocalVllm.Engine.Core;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Kernels.Cpu;

/// <summary>
/// Paged attention for float32 on the CPU that reads K/V blocks in place: decode rows (one query per sequence) and the
/// rows of prefill chunks with a short context are computed by a C# kernel straight from the cache's memory, row by
/// row, parallel over query rows (or row x KV head), with the query heads of a GQA group sharing each K/V load and no
/// copy of K or V. Prefill chunks over a long context, whose many query rows make a GEMM worthwhile, go to
/// <see cref="TorchPagedAttention"/>'s gather + scaled_dot_product_attention.
/// </summary>
public sealed unsafe class CpuPagedAttention : IAttentionBackend
{
    private readonly TorchPagedAttention _prefill = new();
    private readonly int _rowKernelMaxContext;

    // The kernel's query rows, reused from call to call (a prefill chunk has thousands: a fresh list per layer was
    // large-object garbage). A model runs its layers one after another on one thread, so one list per backend serves.
    private readonly List<QueryRow> _rows = [];

    /// <summary>Prefill chunks whose context is at most this many positions go through the C# kernel row by row.</summary>
    public const int DefaultRowKernelMaxContext = 512;

    /// <param name="rowKernelMaxContext">
    /// Prefill chunks (more than one query row) whose whole context is at most this long are computed by the C# kernel,
    /// one query row at a time over its causal prefix; longer ones by SDPA (0: decode rows only).
    /// </param>
    public CpuPagedAttention(int rowKernelMaxContext = DefaultRowKernelMaxContext) => _rowKernelMaxContext = rowKernelMaxContext;

    // Per-thread scratch, reused across layers and steps (a fresh one per call was garbage every layer).
    [ThreadStatic] private static Scratch? t_scratch;

    /// <summary>
    /// Only prefill chunks too long for the row kernel go through SDPA over gathered context slots; decode rows and
    /// short chunks read the block tables in place, so no context slots are built for them.
    /// </summary>
    public bool ReadsContextSlots(int queryLength, int contextLength) => queryLength > 1 && contextLength > _rowKernelMaxContext;

    /// <inheritdoc />
    public Tensor Forward(Tensor q, Tensor k, Tensor v, Tensor kCache, Tensor vCache, AttentionMetadata metadata)
    {
        if (q.dtype != ScalarType.Float32 || q.device_type != TorchSharp.DeviceType.CPU || kCache.dtype != ScalarType.Float32)
            return _prefill.Forward(q, k, v, kCache, vCache, metadata);

        int numKvHeads = (int)kCache.shape[2], headDim = (int)kCache.shape[3], numHeads = (int)q.shape[1];
        int tokens = (int)q.shape[0];
        using var kFlat = kCache.view(-1, numKvHeads, headDim);
        using var vFlat = vCache.view(-1, numKvHeads, headDim);
        if (tokens <= 64 && k.is_contiguous() && v.is_contiguous() && metadata.SlotMapping.device_type == TorchSharp.DeviceType.CPU)
            WriteRows(k, v, kCache, vCache, metadata.SlotMapping, (long)numKvHeads * headDim);
        else
        {
            kFlat.index_copy_(0, metadata.SlotMapping, k);
            vFlat.index_copy_(0, metadata.SlotMapping, v);
        }

        var output = empty([tokens, numHeads * headDim], ScalarType.Float32); // [tokens, numHeads * headDim]
        // Query rows for the C# kernel: every decode row, and every row of prefill chunks whose context is short
        // enough (row by row, each over its causal prefix); longer chunks go to SDPA's GEMMs.
        var rows = _rows;
        rows.Clear();
        var prefill = new List<int>();
        for (int i = 0; i < metadata.Sequences.Count; i++)
        {
            var span = metadata.Sequences[i];
            if (span.QueryLength == 1 || span.ContextLength <= _rowKernelMaxContext)
                for (int r = 0; r < span.QueryLength; r++)
                    rows.Add(new QueryRow(span.QueryStart + r, span.ContextLength - span.QueryLength + r + 1, i));
            else
                prefill.Add(i);
        }

        if (rows.Count > 0)
        {
            using var qc = q.contiguous();
            float* qPtr = Simd.Pointer(qc), kPtr = Simd.Pointer(kCache), vPtr = Simd.Pointer(vCache), oPtr = Simd.Pointer(output);
            int groups = numHeads / numKvHeads;
            float scale = 1f / MathF.Sqrt(headDim);
            var job = new RowJob(qPtr, kPtr, vPtr, oPtr, rows, metadata.BlockTables, metadata.BlockSize, numHeads, numKvHeads, headDim, groups, scale);
            CpuWorkers.Shared.For(job.Items, job.Run);
        }

        if (prefill.Count > 0)
        {
            // Long prefill chunks: gather each sequence's context and let SDPA do the GEMMs.
            foreach (var i in prefill)
            {
                var s = metadata.Sequences[i];
                using var scope = NewDisposeScope();
                var slots = metadata.ContextSlotsOf(i);
                var attended = TorchPagedAttention.AttendSequence(q, kFlat.index_select(0, slots), vFlat.index_select(0, slots), s, numHeads / numKvHeads);
                output.narrow(0, s.QueryStart, s.QueryLength).copy_(attended);
            }
        }
        return output;
    }

    /// <summary>
    /// The new K/V rows of a decode step, copied to their slots directly (two libtorch index_copy_ calls per layer
    /// cost more than the copy at these sizes). Slots are checked like index_copy_ would.
    /// </summary>
    private static void WriteRows(Tensor k, Tensor v, Tensor kCache, Tensor vCache, Tensor slotMapping, long rowFloats)
    {
        var slots = slotMapping.data<long>();
        long capacity = kCache.shape[0] * kCache.shape[1];
        float* kSrc = Simd.Pointer(k), vSrc = Simd.Pointer(v), kDst = Simd.Pointer(kCache), vDst = Simd.Pointer(vCache);
        long bytes = rowFloats * sizeof(float);
        for (int t = 0; t < (int)slots.Count; t++)
        {
            long slot = slots[t];
            if ((ulong)slot >= (ulong)capacity) throw new ArgumentOutOfRangeException(nameof(slotMapping), slot, $"Slot {slot} is outside the cache's {capacity} slots.");
            Buffer.MemoryCopy(kSrc + t * rowFloats, kDst + slot * rowFloats, bytes, bytes);
            Buffer.MemoryCopy(vSrc + t * rowFloats, vDst + slot * rowFloats, bytes, bytes);
        }
    }

    /// <summary>One query row for the C# kernel: its row in q and the output, how many cache positions it attends to, its sequence.</summary>
    private readonly record struct QueryRow(int Row, int ContextLength, int Sequence);

    /// <summary>
    /// The kernel's work in one layer. With enough rows to keep every core busy and long cache rows, an item is one
    /// query row over all its KV heads (cache rows read front to back), except for the rows left over when the count
    /// does not divide by the cores: those are split into one item per KV head and handed out last, so that they fill
    /// in the cores' ends (5 rows on 2 cores would otherwise take 3 rounds). Otherwise every item is one (query row,
    /// KV head) pair.
    /// </summary>
    private sealed class RowJob(float* q, float* k, float* v, float* o, List<QueryRow> rows, int[][] tables,
        int blockSize, int numHeads, int numKvHeads, int headDim, int groups, float scale)
    {
        // Whole rows pay off when a cache row is long (Qwen3-0.6B: 8 KV heads x 128 = 4 KB); with short rows
        // (stories260K: 128 bytes) the finer split balances better. Measured with `eng/bench micro --part attention`.
        private readonly int _whole = rows.Count >= 2 * Environment.ProcessorCount && numKvHeads * headDim >= 512
            ? rows.Count - rows.Count % Environment.ProcessorCount
            : 0;

        public int Items => _whole + (rows.Count - _whole) * numKvHeads;

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Run(int w)
        {
            var scratch = t_scratch ??= new Scratch();
            QueryRow row;
            int kvFrom, kvTo;
            if (w < _whole)
                (row, kvFrom, kvTo) = (rows[w], 0, numKvHeads);
            else
            {
                int split = w - _whole;
                (row, kvFrom) = (rows[_whole + split / numKvHeads], split % numKvHeads);
                kvTo = kvFrom + 1;
            }
            long offset = (long)row.Row * numHeads * headDim;
            AttendRow(q + offset, k, v, o + offset, tables[row.Sequence], blockSize, row.ContextLength, kvFrom, kvTo, groups, numKvHeads, headDim, scale, scratch);
        }
    }

    private sealed class Scratch
    {
        public float[] Scores = new float[256];
        public float[] Acc = new float[256];
    }

    /// <summary>
    /// One query row against the first <paramref name="contextLength"/> positions of its sequence (its whole context for
    /// a decode row, its causal prefix for a prefill row), for the query heads of KV heads
    /// [<paramref name="kvFrom"/>, <paramref name="kvTo"/>): scores, softmax and the weighted sum of values. The cache
    /// is walked block by block (a block's rows are contiguous), and within a block KV head by KV head, four positions
    /// at a time against two query heads of the GQA group: each K or V vector loaded feeds both heads, the two heads'
    /// query chunks feed four positions, and the four positions' dot products are reduced together.
    /// </summary>
    // AggressiveOptimization: the kernel must be fully optimised from its first call. Under tiered compilation it would
    // start as unoptimised tier-0 code, where each vector operation is a call (measured 15x slower).
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void AttendRow(float* q, float* kCache, float* vCache, float* output, int[] table, int blockSize, int contextLength,
        int kvFrom, int kvTo, int groups, int numKvHeads, int headDim, float scale, Scratch scratch)
    {
        int heads = (kvTo - kvFrom) * groups; // query heads handled here, consecutive from kvFrom * groups
        if (scratch.Scores.Length < contextLength * heads) scratch.Scores = new float[Math.Max(contextLength * heads, scratch.Scores.Length * 2)];
        if (scratch.Acc.Length < headDim * heads) scratch.Acc = new float[headDim * heads];
        long rowStride = (long)numKvHeads * headDim;
        float* q0 = q + (long)kvFrom * groups * headDim;
        bool wide = Vector512.IsHardwareAccelerated && headDim % 16 == 0;
        fixed (float* scores = scratch.Scores, acc = scratch.Acc)
        {
            for (int b = 0, j = 0; j < contextLength; b++, j += blockSize)
            {
                int count = Math.Min(blockSize, contextLength - j);
                long blockStart = (long)table[b] * blockSize * rowStride;
                // The same rows of the next block are prefetched meanwhile (the last block prefetches itself: no-ops).
                long nextStart = j + blockSize < contextLength ? (long)table[b + 1] * blockSize * rowStride : blockStart;
                for (int g = kvFrom; g < kvTo; g++)
                {
                    float* keys = kCache + blockStart + (long)g * headDim; // position o of the block at keys + o * rowStride
                    float* nextKeys = kCache + nextStart + (long)g * headDim;
                    for (int h = (g - kvFrom) * groups, last = h + groups; h < last; h += 2)
                    {
                        bool pair = h + 1 < last;
                        float* qa = q0 + (long)h * headDim, qb = pair ? qa + headDim : qa;
                        float* sa = scores + (long)h * contextLength + j, sb = pair ? sa + contextLength : sa;
                        int o = 0;
                        if (wide)
                            for (; o + 4 <= count; o += 4)
                                Scores4(qa, qb, keys + o * rowStride, rowStride, headDim, scale, sa + o, sb + o, nextKeys + o * rowStride);
                        for (; o < count; o++)
                        {
                            sa[o] = Dot(qa, keys + o * rowStride, headDim) * scale;
                            if (pair) sb[o] = Dot(qb, keys + o * rowStride, headDim) * scale;
                        }
                    }
                }
            }
            for (int h = 0; h < heads; h++) SoftMax(scores + (long)h * contextLength, contextLength);
            new Span<float>(acc, headDim * heads).Clear();
            for (int b = 0, j = 0; j < contextLength; b++, j += blockSize)
            {
                int count = Math.Min(blockSize, contextLength - j);
                long blockStart = (long)table[b] * blockSize * rowStride;
                long nextStart = j + blockSize < contextLength ? (long)table[b + 1] * blockSize * rowStride : blockStart;
                for (int g = kvFrom; g < kvTo; g++)
                {
                    float* values = vCache + blockStart + (long)g * headDim;
                    float* nextValues = vCache + nextStart + (long)g * headDim;
                    for (int h = (g - kvFrom) * groups, last = h + groups; h < last; h += 2)
                    {
                        bool pair = h + 1 < last;
                        float* pa = scores + (long)h * contextLength + j, pb = pair ? pa + contextLength : pa;
                        float* ya = acc + (long)h * headDim, yb = ya + headDim;
                        int o = 0;
                        if (wide)
                            for (; o + 4 <= count; o += 4)
                            {
                                if (pair) Axpy4Pair(pa + o, pb + o, values + o * rowStride, rowStride, ya, yb, headDim, nextValues + o * rowStride);
                                else Axpy4(pa + o, values + o * rowStride, rowStride, ya, headDim, nextValues + o * rowStride);
                            }
                        for (; o < count; o++)
                        {
                            Axpy(pa[o], values + o * rowStride, ya, headDim);
                            if (pair) Axpy(pb[o], values + o * rowStride, yb, headDim);
                        }
                    }
                }
            }
            Buffer.MemoryCopy(acc, output + (long)kvFrom * groups * headDim, (long)heads * headDim * sizeof(float), (long)heads * headDim * sizeof(float));
        }
    }

    /// <summary>
    /// Prefetches the cache line at p in four rows <paramref name="stride"/> floats apart into L2. The kernel fetches
    /// the next block's K (or V) rows this way while it reads the current block's: blocks lie anywhere in the pool, so
    /// the hardware prefetcher cannot run ahead across a block boundary. No branch beyond the JIT-time ISA check (a
    /// branch in the loop makes the JIT keep the accumulators on the stack).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Fetch4(float* p, long stride)
    {
        if (!Sse.IsSupported) return;
        Sse.Prefetch1(p);
        Sse.Prefetch1(p + stride);
        Sse.Prefetch1(p + 2 * stride);
        Sse.Prefetch1(p + 3 * stride);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void SoftMax(float* x, int n)
    {
        int i = 0;
        var maxV = Vector256.Create(float.NegativeInfinity);
        for (; i + 8 <= n; i += 8) maxV = Vector256.Max(maxV, Vector256.Load(x + i));
        float max = float.NegativeInfinity;
        for (int l = 0; l < 8; l++) max = MathF.Max(max, maxV[l]);
        for (; i < n; i++) max = MathF.Max(max, x[i]);
        var mv = Vector256.Create(max);
        var sumV = Vector256<float>.Zero;
        for (i = 0; i + 8 <= n; i += 8)
        {
            var e = Vector256.Exp(Vector256.Load(x + i) - mv);
            e.Store(x + i);
            sumV += e;
        }
        float sum = Vector256.Sum(sumV);
        for (; i < n; i++) sum += x[i] = MathF.Exp(x[i] - max);
        var inv = Vector256.Create(1f / sum);
        for (i = 0; i + 8 <= n; i += 8) (Vector256.Load(x + i) * inv).Store(x + i);
        for (; i < n; i++) x[i] *= inv[0];
    }

    /// <summary>a . b for a head (512-bit vectors when the head size allows).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining | MethodImplOptions.AggressiveOptimization)]
    private static float Dot(float* a, float* b, int n)
    {
        if (!Vector512.IsHardwareAccelerated || n % 32 != 0) return Simd.Dot(a, b, n);
        Vector512<float> s0 = default, s1 = default;
        for (int i = 0; i < n; i += 32)
        {
            s0 = Vector512.FusedMultiplyAdd(Vector512.Load(a + i), Vector512.Load(b + i), s0);
            s1 = Vector512.FusedMultiplyAdd(Vector512.Load(a + i + 16), Vector512.Load(b + i + 16), s1);
        }
        var s = s0 + s1;
        var half = s.GetLower() + s.GetUpper();
        return Vector128.Sum(half.GetLower() + half.GetUpper());
    }

    /// <summary>
    /// sa[p] = scale * qa . k_p and sb[p] = scale * qb . k_p for four key rows k_p = k + p * stride (n a multiple of
    /// 16): eight accumulators, each key vector feeding both query heads, reduced four at a time.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining | MethodImplOptions.AggressiveOptimization)]
    private static void Scores4(float* qa, float* qb, float* k, long stride, int n, float scale, float* sa, float* sb, float* next)
    {
        float* k0 = k, k1 = k + stride, k2 = k + 2 * stride, k3 = k + 3 * stride;
        Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default, b0 = default, b1 = default, b2 = default, b3 = default;
        for (int i = 0; i < n; i += 16)
        {
            Fetch4(next + i, stride);
            var x = Vector512.Load(qa + i);
            var y = Vector512.Load(qb + i);
            var r = Vector512.Load(k0 + i); a0 = Vector512.FusedMultiplyAdd(x, r, a0); b0 = Vector512.FusedMultiplyAdd(y, r, b0);
            r = Vector512.Load(k1 + i); a1 = Vector512.FusedMultiplyAdd(x, r, a1); b1 = Vector512.FusedMultiplyAdd(y, r, b1);
            r = Vector512.Load(k2 + i); a2 = Vector512.FusedMultiplyAdd(x, r, a2); b2 = Vector512.FusedMultiplyAdd(y, r, b2);
            r = Vector512.Load(k3 + i); a3 = Vector512.FusedMultiplyAdd(x, r, a3); b3 = Vector512.FusedMultiplyAdd(y, r, b3);
        }
        var s = Vector128.Create(scale);
        (Simd.Sum4(a0, a1, a2, a3) * s).Store(sa);
        (Simd.Sum4(b0, b1, b2, b3) * s).Store(sb);
    }

    /// <summary>ya += sum_p pa[p] * v_p and yb += sum_p pb[p] * v_p over four value rows v_p = v + p * stride (n a multiple of 16).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining | MethodImplOptions.AggressiveOptimization)]
    private static void Axpy4Pair(float* pa, float* pb, float* v, long stride, float* ya, float* yb, int n, float* next)
    {
        float* v0 = v, v1 = v + stride, v2 = v + 2 * stride, v3 = v + 3 * stride;
        Vector512<float> a0 = Vector512.Create(pa[0]), a1 = Vector512.Create(pa[1]), a2 = Vector512.Create(pa[2]), a3 = Vector512.Create(pa[3]);
        Vector512<float> b0 = Vector512.Create(pb[0]), b1 = Vector512.Create(pb[1]), b2 = Vector512.Create(pb[2]), b3 = Vector512.Create(pb[3]);
        for (int i = 0; i < n; i += 16)
        {
            Fetch4(next + i, stride);
            var x = Vector512.Load(ya + i);
            var y = Vector512.Load(yb + i);
            var r = Vector512.Load(v0 + i); x = Vector512.FusedMultiplyAdd(a0, r, x); y = Vector512.FusedMultiplyAdd(b0, r, y);
            r = Vector512.Load(v1 + i); x = Vector512.FusedMultiplyAdd(a1, r, x); y = Vector512.FusedMultiplyAdd(b1, r, y);
            r = Vector512.Load(v2 + i); x = Vector512.FusedMultiplyAdd(a2, r, x); y = Vector512.FusedMultiplyAdd(b2, r, y);
            r = Vector512.Load(v3 + i); x = Vector512.FusedMultiplyAdd(a3, r, x); y = Vector512.FusedMultiplyAdd(b3, r, y);
            x.Store(ya + i);
            y.Store(yb + i);
        }
    }

    /// <summary>y += sum_p a[p] * v_p over four value rows v_p = v + p * stride (n a multiple of 16).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining | MethodImplOptions.AggressiveOptimization)]
    private static void Axpy4(float* a, float* v, long stride, float* y, int n, float* next)
    {
        float* v0 = v, v1 = v + stride, v2 = v + 2 * stride, v3 = v + 3 * stride;
        Vector512<float> a0 = Vector512.Create(a[0]), a1 = Vector512.Create(a[1]), a2 = Vector512.Create(a[2]), a3 = Vector512.Create(a[3]);
        for (int i = 0; i < n; i += 16)
        {
            Fetch4(next + i, stride);
            var acc = Vector512.FusedMultiplyAdd(a0, Vector512.Load(v0 + i), Vector512.Load(y + i));
            acc = Vector512.FusedMultiplyAdd(a1, Vector512.Load(v1 + i), acc);
            acc = Vector512.FusedMultiplyAdd(a2, Vector512.Load(v2 + i), acc);
            acc = Vector512.FusedMultiplyAdd(a3, Vector512.Load(v3 + i), acc);
            acc.Store(y + i);
        }
    }

    /// <summary>y += a * x.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining | MethodImplOptions.AggressiveOptimization)]
    private static void Axpy(float a, float* x, float* y, int n)
    {
        int i = 0;
        if (Vector512.IsHardwareAccelerated && n >= 16)
        {
            var va = Vector512.Create(a);
            for (; i + 16 <= n; i += 16) Vector512.Store(Vector512.FusedMultiplyAdd(va, Vector512.Load(x + i), Vector512.Load(y + i)), y + i);
        }
        if (Vector256.IsHardwareAccelerated && n >= 8)
        {
            var va = Vector256.Create(a);
            for (; i + 8 <= n; i += 8) Vector256.Store(Simd.Fma(va, Vector256.Load(x + i), Vector256.Load(y + i)), y + i);
        }
        for (; i < n; i++) y[i] += a * x[i];
    }
}
