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

    /// <inheritdoc />
    public Tensor Forward(Tensor q, Tensor k, Tensor v, Tensor kCache, Tensor vCache, AttentionMetadata metadata)
    {
        if (q.dtype != ScalarType.Float32 || q.device_type != TorchSharp.DeviceType.CPU || kCache.dtype != ScalarType.Float32)
            return _prefill.Forward(q, k, v, kCache, vCache, metadata);

        int numKvHeads = (int)kCache.shape[2], headDim = (int)kCache.shape[3], numHeads = (int)q.shape[1];
        int tokens = (int)q.shape[0];
        using var kFlat = kCache.view(-1, numKvHeads, headDim);
        using var vFlat = vCache.view(-1, numKvHeads, headDim);
        kFlat.index_copy_(0, metadata.SlotMapping, k);
        vFlat.index_copy_(0, metadata.SlotMapping, v);

        var output = empty([tokens, numHeads * headDim], ScalarType.Float32); // [tokens, numHeads * headDim]
        var decode = new List<int>();
        var prefill = new List<int>();
        for (int i = 0; i < metadata.Sequences.Count; i++)
            (metadata.Sequences[i].QueryLength == 1 ? decode : prefill).Add(i);

        if (decode.Count > 0)
        {
            using var qc = q.contiguous();
            float* qPtr = Pointer(qc), kPtr = Pointer(kCache), vPtr = Pointer(vCache), oPtr = Pointer(output);
            int groups = numHeads / numKvHeads;
            float scale = 1f / MathF.Sqrt(headDim);
            int blockSize = metadata.BlockSize;
            var spans = metadata.Sequences;
            var tables = metadata.BlockTables;
            int work = decode.Count * numKvHeads;
            var job = new DecodeJob(qPtr, kPtr, vPtr, oPtr, decode, spans, tables, blockSize, numHeads, numKvHeads, headDim, groups, scale);
            Parallel.For(0, work, new ParallelOptions { MaxDegreeOfParallelism = Environment.ProcessorCount }, () => new Scratch(), job.Run, _ => { });
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

    /// <summary>The decode work of one layer: item w is (decode sequence w / numKvHeads, KV head w % numKvHeads).</summary>
    private sealed class DecodeJob(float* q, float* k, float* v, float* o, List<int> decode, IReadOnlyList<SequenceSpan> spans, int[][] tables,
        int blockSize, int numHeads, int numKvHeads, int headDim, int groups, float scale)
    {
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public Scratch Run(int w, ParallelLoopState state, Scratch scratch)
        {
            int s = decode[w / numKvHeads], kvh = w % numKvHeads;
            var span = spans[s];
            long row = (long)span.QueryStart * numHeads * headDim;
            DecodeOne(q + row, k, v, o + row, tables[s], blockSize, span.ContextLength, kvh, groups, numKvHeads, headDim, scale, scratch);
            return scratch;
        }
    }

    private sealed class Scratch
    {
        public float[] Scores = new float[256];
        public float[] Acc = new float[256];
    }

    /// <summary>
    /// One sequence's single query row against its whole context, for the query heads of KV head <paramref name="kvh"/>:
    /// scores, softmax and the weighted sum of values, with hand-written 256-bit vector loops (the per-call overhead of
    /// span-based helpers dominates at these sizes: millions of 128-float dot products per step).
    /// </summary>
    // AggressiveOptimization: the kernel must be fully optimised from its first call. Under tiered compilation it would
    // start as unoptimised tier-0 code, where each Vector256 operation is a call (measured 15x slower).
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DecodeOne(float* q, float* kCache, float* vCache, float* output, int[] table, int blockSize, int contextLength,
        int kvh, int groups, int numKvHeads, int headDim, float scale, Scratch scratch)
    {
        if (scratch.Scores.Length < contextLength * groups) scratch.Scores = new float[Math.Max(contextLength * groups, scratch.Scores.Length * 2)];
        if (scratch.Acc.Length < headDim * groups) scratch.Acc = new float[headDim * groups];
        long rowStride = (long)numKvHeads * headDim;
        fixed (float* scores = scratch.Scores, acc = scratch.Acc)
        {
            // Scores for every query head of the group in one pass over the keys.
            // Walk the block table block by block: no division per position.
            for (int b = 0, j = 0; j < contextLength; b++)
            {
                float* krow = kCache + ((long)table[b] * blockSize * rowStride) + (long)kvh * headDim;
                for (int o = 0; o < blockSize && j < contextLength; o++, j++, krow += rowStride)
                    for (int g = 0; g < groups; g++)
                        scores[g * contextLength + j] = Dot(q + (long)(kvh * groups + g) * headDim, krow, headDim) * scale;
            }
            for (int g = 0; g < groups; g++) SoftMax(scores + g * contextLength, contextLength);
            new Span<float>(acc, headDim * groups).Clear();
            // Weighted sum of values, again one pass over the values for the whole group.
            for (int b = 0, j = 0; j < contextLength; b++)
            {
                float* vrow = vCache + ((long)table[b] * blockSize * rowStride) + (long)kvh * headDim;
                for (int o = 0; o < blockSize && j < contextLength; o++, j++, vrow += rowStride)
                    for (int g = 0; g < groups; g++)
                        Axpy(scores[g * contextLength + j], vrow, acc + g * headDim, headDim);
            }
            for (int g = 0; g < groups; g++)
                Buffer.MemoryCopy(acc + g * headDim, output + (long)(kvh * groups + g) * headDim, headDim * sizeof(float), headDim * sizeof(float));
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void SoftMax(float* x, int n)
    {
        float max = float.NegativeInfinity;
        for (int i = 0; i < n; i++) max = MathF.Max(max, x[i]);
        float sum = 0;
        for (int i = 0; i < n; i++) sum += x[i] = MathF.Exp(x[i] - max);
        float inv = 1f / sum;
        for (int i = 0; i < n; i++) x[i] *= inv;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining | MethodImplOptions.AggressiveOptimization)]
    private static float Dot(float* a, float* b, int n)
    {
        int i = 0;
        float sum = 0;
        if (Vector256.IsHardwareAccelerated && n >= 8)
        {
            var s0 = Vector256<float>.Zero;
            var s1 = Vector256<float>.Zero;
            for (; i + 16 <= n; i += 16)
            {
                s0 = Fma(Vector256.Load(a + i), Vector256.Load(b + i), s0);
                s1 = Fma(Vector256.Load(a + i + 8), Vector256.Load(b + i + 8), s1);
            }
            for (; i + 8 <= n; i += 8) s0 = Fma(Vector256.Load(a + i), Vector256.Load(b + i), s0);
            sum = Vector256.Sum(s0 + s1);
        }
        for (; i < n; i++) sum += a[i] * b[i];
        return sum;
    }

    /// <summary>y += a * x.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining | MethodImplOptions.AggressiveOptimization)]
    private static void Axpy(float a, float* x, float* y, int n)
    {
        int i = 0;
        if (Vector256.IsHardwareAccelerated && n >= 8)
        {
            var va = Vector256.Create(a);
            for (; i + 8 <= n; i += 8) Vector256.Store(Fma(va, Vector256.Load(x + i), Vector256.Load(y + i)), y + i);
        }
        for (; i < n; i++) y[i] += a * x[i];
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> Fma(Vector256<float> a, Vector256<float> b, Vector256<float> c) =>
        System.Runtime.Intrinsics.X86.Fma.IsSupported ? System.Runtime.Intrinsics.X86.Fma.MultiplyAdd(a, b, c) : a * b + c;

    private static float* Pointer(Tensor t)
    {
        var bytes = t.bytes;
        return (float*)Unsafe.AsPointer(ref MemoryMarshal.GetReference(bytes));
    }
}
