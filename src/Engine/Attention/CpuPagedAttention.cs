using TensorPrimitives = System.Numerics.Tensors.TensorPrimitives;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
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
            Parallel.For(0, work, new ParallelOptions { MaxDegreeOfParallelism = Environment.ProcessorCount }, () => new Scratch(), (w, _, scratch) =>
            {
                int s = decode[w / numKvHeads], kvh = w % numKvHeads;
                var span = spans[s];
                DecodeOne(qPtr + (long)span.QueryStart * numHeads * headDim, kPtr, vPtr, oPtr + (long)span.QueryStart * numHeads * headDim,
                    tables[s], blockSize, span.ContextLength, kvh, groups, numKvHeads, headDim, scale, scratch);
                return scratch;
            }, _ => { });
        }

        if (prefill.Count > 0)
        {
            // Prefill chunks: gather each sequence's context and let SDPA do the GEMMs.
            foreach (var i in prefill)
            {
                var s = metadata.Sequences[i];
                using var scope = NewDisposeScope();
                var slots = metadata.ContextSlots.narrow(0, s.ContextStart, s.ContextLength);
                var kCtx = kFlat.index_select(0, slots);
                var vCtx = vFlat.index_select(0, slots);
                var qi = q.narrow(0, s.QueryStart, s.QueryLength).transpose(0, 1).unsqueeze(0);
                var ki = ExpandHeads(kCtx, numHeads / numKvHeads);
                var vi = ExpandHeads(vCtx, numHeads / numKvHeads);
                var oi = s.QueryLength == s.ContextLength
                    ? nn.functional.scaled_dot_product_attention(qi, ki, vi, is_casual: true)
                    : nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask: TorchPagedAttention.CausalMask(s.QueryLength, s.ContextLength, q.device));
                output.narrow(0, s.QueryStart, s.QueryLength).copy_(oi.squeeze(0).transpose(0, 1).reshape(s.QueryLength, numHeads * headDim));
            }
        }
        return output;
    }

    private sealed class Scratch
    {
        public float[] Scores = new float[256];
        public float[] Acc = new float[256];
    }

    /// <summary>One sequence's single query row against its whole context, for the query heads of KV head <paramref name="kvh"/>.</summary>
    private static void DecodeOne(float* q, float* kCache, float* vCache, float* output, int[] table, int blockSize, int contextLength,
        int kvh, int groups, int numKvHeads, int headDim, float scale, Scratch scratch)
    {
        if (scratch.Scores.Length < contextLength) scratch.Scores = new float[Math.Max(contextLength, scratch.Scores.Length * 2)];
        if (scratch.Acc.Length < headDim) scratch.Acc = new float[headDim];
        var scores = scratch.Scores.AsSpan(0, contextLength);
        var acc = scratch.Acc.AsSpan(0, headDim);
        long rowStride = (long)numKvHeads * headDim;
        for (int g = 0; g < groups; g++)
        {
            int h = kvh * groups + g;
            var qh = new ReadOnlySpan<float>(q + (long)h * headDim, headDim);
            for (int j = 0; j < contextLength; j++)
            {
                long slot = (long)table[j / blockSize] * blockSize + j % blockSize;
                scores[j] = TensorPrimitives.Dot(qh, new ReadOnlySpan<float>(kCache + slot * rowStride + (long)kvh * headDim, headDim)) * scale;
            }
            TensorPrimitives.SoftMax(scores, scores);
            acc.Clear();
            for (int j = 0; j < contextLength; j++)
            {
                long slot = (long)table[j / blockSize] * blockSize + j % blockSize;
                TensorPrimitives.MultiplyAdd(new ReadOnlySpan<float>(vCache + slot * rowStride + (long)kvh * headDim, headDim), scores[j], acc, acc);
            }
            acc.CopyTo(new Span<float>(output + (long)h * headDim, headDim));
        }
    }

    private static float* Pointer(Tensor t)
    {
        var bytes = t.bytes;
        return (float*)Unsafe.AsPointer(ref MemoryMarshal.GetReference(bytes));
    }

    private static Tensor ExpandHeads(Tensor x, long groups)
    {
        using var t = x.transpose(0, 1);
        if (groups == 1) return t.unsqueeze(0);
        using var r = t.repeat_interleave(groups, dim: 0);
        return r.unsqueeze(0);
    }
}
