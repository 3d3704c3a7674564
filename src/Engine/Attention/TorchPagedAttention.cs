using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace LocalVllm.Engine.Attention;

/// <summary>
/// Device-agnostic paged attention on TorchSharp ops: gathers each sequence's context from the cache by slot, then
/// runs scaled-dot-product attention with a causal mask offset by the cached prefix.
/// </summary>
public sealed class TorchPagedAttention : IAttentionBackend
{
    /// <inheritdoc />
    public Tensor Forward(Tensor q, Tensor k, Tensor v, Tensor kCache, Tensor vCache, AttentionMetadata metadata)
    {
        long numKvHeads = kCache.shape[2], headDim = kCache.shape[3];
        long numHeads = q.shape[1];
        long groups = numHeads / numKvHeads;

        using var kFlat = kCache.view(-1, numKvHeads, headDim); // [numBlocks * blockSize, numKvHeads, headDim]
        using var vFlat = vCache.view(-1, numKvHeads, headDim);
        kFlat.index_copy_(0, metadata.SlotMapping, k);
        vFlat.index_copy_(0, metadata.SlotMapping, v);

        var outputs = new Tensor[metadata.Sequences.Count];
        if (metadata.HasAllContextSlots)
        {
            using var kCtx = kFlat.index_select(0, metadata.ContextSlots!); // [sumContext, numKvHeads, headDim]
            using var vCtx = vFlat.index_select(0, metadata.ContextSlots!);
            for (int i = 0; i < outputs.Length; i++)
            {
                var s = metadata.Sequences[i];
                using var kn = kCtx.narrow(0, s.ContextStart, s.ContextLength);
                using var vn = vCtx.narrow(0, s.ContextStart, s.ContextLength);
                outputs[i] = AttendSequence(q, kn, vn, s, groups);
            }
        }
        else
            for (int i = 0; i < outputs.Length; i++)
            {
                using var slots = metadata.ContextSlotsOf(i);
                using var kn = kFlat.index_select(0, slots);
                using var vn = vFlat.index_select(0, slots);
                outputs[i] = AttendSequence(q, kn, vn, metadata.Sequences[i], groups);
            }
        if (outputs.Length == 1) return outputs[0];
        var result = cat(outputs, 0);
        foreach (var o in outputs) o.Dispose();
        return result;
    }

    /// <summary>
    /// One sequence's query rows against its gathered context <paramref name="kCtx"/>/<paramref name="vCtx"/>
    /// ([ctx, kvHeads, d]), causally offset by the cached prefix. Returns [qLen, heads * d].
    /// </summary>
    internal static Tensor AttendSequence(Tensor q, Tensor kCtx, Tensor vCtx, SequenceSpan s, long groups)
    {
        using var scope = NewDisposeScope();
        long numHeads = q.shape[1], headDim = q.shape[2];
        var qi = q.narrow(0, s.QueryStart, s.QueryLength).transpose(0, 1).unsqueeze(0); // [1, numHeads, qLen, headDim]
        var ki = ExpandHeads(kCtx, groups); // [1, numHeads, ctx, headDim]
        var vi = ExpandHeads(vCtx, groups);
        var oi = s.QueryLength == 1 ? F.scaled_dot_product_attention(qi, ki, vi)
            : s.QueryLength == s.ContextLength ? F.scaled_dot_product_attention(qi, ki, vi, is_casual: true)
            : F.scaled_dot_product_attention(qi, ki, vi, attn_mask: CausalMask(s.QueryLength, s.ContextLength, q.device));
        return oi.squeeze(0).transpose(0, 1).reshape(s.QueryLength, numHeads * headDim).MoveToOuterDisposeScope(); // [qLen, numHeads * headDim]
    }

    /// <summary>[ctx, kvHeads, d] to [1, kvHeads * groups, ctx, d], repeating each KV head for its query group.</summary>
    private static Tensor ExpandHeads(Tensor x, long groups)
    {
        using var t = x.transpose(0, 1); // [kvHeads, ctx, d]
        if (groups == 1) return t.unsqueeze(0);
        using var r = t.repeat_interleave(groups, dim: 0);
        return r.unsqueeze(0);
    }

    /// <summary>Query row i (absolute position ctx - qLen + i) may attend to keys 0..ctx - qLen + i.</summary>
    internal static Tensor CausalMask(int queryLength, int contextLength, Device device)
    {
        using var rows = arange(contextLength - queryLength, contextLength, dtype: ScalarType.Int64, device: device).unsqueeze(1);
        using var cols = arange(contextLength, dtype: ScalarType.Int64, device: device).unsqueeze(0);
        return cols.le(rows); // [qLen, ctx] true where attention is allowed
    }
}
