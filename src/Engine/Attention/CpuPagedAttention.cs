using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Attention;

/// <summary>
/// Paged attention for float32 on the CPU that reads K/V blocks in place: decode rows (one query per sequence) are
/// computed by a C# kernel straight from the cache's memory, parallel over (sequence, KV head) pairs, with the query
/// heads of a GQA group sharing one pass over their KV head and no copy of K or V. Prefill chunks, whose many query
/// rows make a GEMM worthwhile, go to <see cref="TorchPagedAttention"/>'s gather + scaled_dot_product_attention.
/// </summary>
public sealed unsafe class CpuPagedAttention : IAttentionBackend
{
    private readonly TorchPagedAttention _prefill = new();

    // Per-thread scratch, reused across layers and steps (a fresh one per call was garbage every layer).
    [ThreadStatic] private static Scratch? t_scratch;

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
        var decode = new List<int>();
        var prefill = new List<int>();
        for (int i = 0; i < metadata.Sequences.Count; i++)
            (metadata.Sequences[i].QueryLength == 1 ? decode : prefill).Add(i);

        if (decode.Count > 0)
        {
            using var qc = q.contiguous();
            float* qPtr = Simd.Pointer(qc), kPtr = Simd.Pointer(kCache), vPtr = Simd.Pointer(vCache), oPtr = Simd.Pointer(output);
            int groups = numHeads / numKvHeads;
            float scale = 1f / MathF.Sqrt(headDim);
            int blockSize = metadata.BlockSize;
            var spans = metadata.Sequences;
            var tables = metadata.BlockTables;
            var job = new DecodeJob(qPtr, kPtr, vPtr, oPtr, decode, spans, tables, blockSize, numHeads, numKvHeads, headDim, groups, scale);
            Parallel.For(0, job.Items, new ParallelOptions { MaxDegreeOfParallelism = Environment.ProcessorCount }, () => t_scratch ??= new Scratch(), job.Run, _ => { });
        }

        if (prefill.Count > 0)
        {
            // Prefill chunks: gather each sequence's context and let SDPA do the GEMMs.
            foreach (var i in prefill)
            {
                var s = metadata.Sequences[i];
                using var scope = NewDisposeScope();
                var slots = metadata.ContextSlots.narrow(0, s.ContextStart, s.ContextLength);
                var rows = TorchPagedAttention.AttendSequence(q, kFlat.index_select(0, slots), vFlat.index_select(0, slots), s, numHeads / numKvHeads);
                output.narrow(0, s.QueryStart, s.QueryLength).copy_(rows);
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

    /// <summary>
    /// The decode work of one layer. With enough sequences to keep every core busy and long cache rows an item is one
    /// sequence (all its KV heads, rows read front to back); otherwise an item is one (sequence, KV head) pair.
    /// </summary>
    private sealed class DecodeJob(float* q, float* k, float* v, float* o, List<int> decode, IReadOnlyList<SequenceSpan> spans, int[][] tables,
        int blockSize, int numHeads, int numKvHeads, int headDim, int groups, float scale)
    {
        // Whole sequences pay off when a cache row is long (Qwen3-0.6B: 8 KV heads x 128 = 4 KB); with short rows
        // (stories260K: 128 bytes) the finer split balances better. Measured with eng/bench-style kernel timings.
        public bool WholeSequences => decode.Count >= 2 * Environment.ProcessorCount && numKvHeads * headDim >= 512;
        public int Items => WholeSequences ? decode.Count : decode.Count * numKvHeads;

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public Scratch Run(int w, ParallelLoopState state, Scratch scratch)
        {
            bool whole = WholeSequences;
            int s = whole ? decode[w] : decode[w / numKvHeads];
            int kvFrom = whole ? 0 : w % numKvHeads, kvTo = whole ? numKvHeads : kvFrom + 1;
            var span = spans[s];
            long row = (long)span.QueryStart * numHeads * headDim;
            DecodeOne(q + row, k, v, o + row, tables[s], blockSize, span.ContextLength, kvFrom, kvTo, groups, numKvHeads, headDim, scale, scratch);
            return scratch;
        }
    }

    private sealed class Scratch
    {
        public float[] Scores = new float[256];
        public float[] Acc = new float[256];
    }

    /// <summary>
    /// One sequence's single query row against its whole context, for the query heads of KV heads
    /// [<paramref name="kvFrom"/>, <paramref name="kvTo"/>): scores, softmax and the weighted sum of values, with
    /// hand-written 256-bit vector loops. Each cache row holds every KV head of one position, so covering all KV heads
    /// of a sequence in one task reads the rows front to back instead of in strided pieces.
    /// </summary>
    // AggressiveOptimization: the kernel must be fully optimised from its first call. Under tiered compilation it would
    // start as unoptimised tier-0 code, where each Vector256 operation is a call (measured 15x slower).
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DecodeOne(float* q, float* kCache, float* vCache, float* output, int[] table, int blockSize, int contextLength,
        int kvFrom, int kvTo, int groups, int numKvHeads, int headDim, float scale, Scratch scratch)
    {
        int heads = (kvTo - kvFrom) * groups; // query heads handled here, consecutive from kvFrom * groups
        if (scratch.Scores.Length < contextLength * heads) scratch.Scores = new float[Math.Max(contextLength * heads, scratch.Scores.Length * 2)];
        if (scratch.Acc.Length < headDim * heads) scratch.Acc = new float[headDim * heads];
        long rowStride = (long)numKvHeads * headDim;
        float* q0 = q + (long)kvFrom * groups * headDim;
        long* kvOffset = stackalloc long[heads]; // where each query head's KV head sits in a cache row
        for (int h = 0; h < heads; h++) kvOffset[h] = (long)(kvFrom + h / groups) * headDim;
        fixed (float* scores = scratch.Scores, acc = scratch.Acc)
        {
            // Walk the block table block by block: no division per position.
            for (int b = 0, j = 0; j < contextLength; b++)
            {
                float* row = kCache + (long)table[b] * blockSize * rowStride;
                for (int o = 0; o < blockSize && j < contextLength; o++, j++, row += rowStride)
                    for (int h = 0; h < heads; h++)
                        scores[h * contextLength + j] = Dot(q0 + (long)h * headDim, row + kvOffset[h], headDim) * scale;
            }
            for (int h = 0; h < heads; h++) SoftMax(scores + h * contextLength, contextLength);
            new Span<float>(acc, headDim * heads).Clear();
            // Four positions at a time: each accumulator chunk is loaded and stored once per four rows.
            float** rows = stackalloc float*[4];
            int pending = 0;
            for (int b = 0, j = 0; j < contextLength; b++)
            {
                float* row = vCache + (long)table[b] * blockSize * rowStride;
                for (int o = 0; o < blockSize && j < contextLength; o++, j++, row += rowStride)
                {
                    rows[pending++] = row;
                    if (pending < 4) continue;
                    for (int h = 0; h < heads; h++)
                    {
                        float* p = scores + h * contextLength + j - 3;
                        Axpy4(p, rows, kvOffset[h], acc + h * headDim, headDim);
                    }
                    pending = 0;
                }
            }
            for (int r = 0; r < pending; r++)
                for (int h = 0; h < heads; h++)
                    Axpy(scores[h * contextLength + contextLength - pending + r], rows[r] + kvOffset[h], acc + h * headDim, headDim);
            Buffer.MemoryCopy(acc, output + (long)kvFrom * groups * headDim, (long)heads * headDim * sizeof(float), (long)heads * headDim * sizeof(float));
        }
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

    /// <summary>y += a[0] * (rows[0] + offset) + ... + a[3] * (rows[3] + offset).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining | MethodImplOptions.AggressiveOptimization)]
    private static void Axpy4(float* a, float** rows, long offset, float* y, int n)
    {
        float* x0 = rows[0] + offset, x1 = rows[1] + offset, x2 = rows[2] + offset, x3 = rows[3] + offset;
        int i = 0;
        if (Vector512.IsHardwareAccelerated)
        {
            Vector512<float> a0 = Vector512.Create(a[0]), a1 = Vector512.Create(a[1]), a2 = Vector512.Create(a[2]), a3 = Vector512.Create(a[3]);
            for (; i + 16 <= n; i += 16)
            {
                var acc = Vector512.FusedMultiplyAdd(a0, Vector512.Load(x0 + i), Vector512.Load(y + i));
                acc = Vector512.FusedMultiplyAdd(a1, Vector512.Load(x1 + i), acc);
                acc = Vector512.FusedMultiplyAdd(a2, Vector512.Load(x2 + i), acc);
                acc = Vector512.FusedMultiplyAdd(a3, Vector512.Load(x3 + i), acc);
                acc.Store(y + i);
            }
        }
        else if (Vector256.IsHardwareAccelerated)
        {
            Vector256<float> a0 = Vector256.Create(a[0]), a1 = Vector256.Create(a[1]), a2 = Vector256.Create(a[2]), a3 = Vector256.Create(a[3]);
            for (; i + 8 <= n; i += 8)
            {
                var acc = Simd.Fma(a0, Vector256.Load(x0 + i), Vector256.Load(y + i));
                acc = Simd.Fma(a1, Vector256.Load(x1 + i), acc);
                acc = Simd.Fma(a2, Vector256.Load(x2 + i), acc);
                acc = Simd.Fma(a3, Vector256.Load(x3 + i), acc);
                acc.Store(y + i);
            }
        }
        for (; i < n; i++) y[i] += a[0] * x0[i] + a[1] * x1[i] + a[2] * x2[i] + a[3] * x3[i];
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
